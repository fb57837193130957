"""Every Python and Gin snippet in README.md runs, against real models and checkpoints.

Each ```python or ```gin block of the README is preceded by a marker comment
`<!-- snippet: NAME -->` naming one of the setups below (`SETUPS`). A block
without a marker, or with an unknown name, fails, and so does a fence without a
language: no snippet goes untested. Each block is one test, named after its
marker.

A setup builds real parts in `tmp_path`, the working directory of the test: an
optax `TrainState` of a Flax Linen model whose variable names are the
snippet's (its structure traced from the model, its values random), an Orbax
checkpoint of an "old" model where the snippet reads it, and the vocabulary
files the snippet names. It runs the snippet with `exec`,
one statement at a time, in a namespace holding `fws`, `jax`, `ocp` and the
names the snippet expects from its context (`state`, `settings`, `plan`,
`mgr`, `step`), then checks what the snippet loaded against the checkpoint.
Where a snippet lists alternatives (several `settings = ...`), each value it
assigns is kept and warm-started in turn.

The snippets' absolute placeholder paths (`PLACEHOLDERS`: "/runs/old", "/tmp",
...) become directories under `tmp_path` by exact substitution of the quoted
string literal, `"/runs/old"` -> `"<tmp_path>/runs/old"`; nothing else in a
snippet is changed, and a snippet with any other absolute path fails. Gin
blocks are parsed by gin after `import flax_warmstart.gin`, with their macros
bound to the test's checkpoint.

Shell commands: each line of a ```bash block that names DEMO_DIR
("/tmp/fws_example", where `python -m flax_warmstart.demo --keep` writes the
example's checkpoints and settings) runs, in order, in a fresh directory that
takes DEMO_DIR's place; every other command must be in `NOT_RUN`, with the
reason it is not run. Each `$ command` section of a ```text block must be the
output of one of those commands: it is compared with what the command prints
(stdout and stderr together), paths, sizes, timings and runs of spaces
normalized, `...` standing for any text. The commands run in this process
(`main(args)` of `flax_warmstart.cli`, or of the module of `python -m`), and,
marked slow, each in a fresh Python as from a shell.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import io
import itertools
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

import absl.logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import save_checkpoint, save_manager_step
from flax import nnx
from flax.training import train_state

import flax_warmstart as fws

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = ("/runs/old", "/runs/new", "/runs/pretrain", "/runs/lm", "/tmp")
FENCE = re.compile(r"^```(.*)$")
MARKER = re.compile(r"^<!-- snippet: (\S+) -->$")
ROOT = README.parent
# What a program started by a test runs: this checkout's flax_warmstart, JAX on the CPU.
CHILD_ENV = {
  **os.environ,
  "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
  "JAX_PLATFORMS": "cpu",
  # One CPU device, as on a user's machine (conftest.py gives this process eight).
  "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip(),
}

# ```bash commands: those naming DEMO_DIR (the files of `python -m flax_warmstart.demo --keep DEMO_DIR`) run,
# in order, in a fresh directory; every other command must be listed here with the reason it is not run.
DEMO_DIR = "/tmp/fws_example"
NOT_RUN = {
  'pip install -e ".[test]" && python -m flax_warmstart.demo': "changes the environment; .ci/run runs it on a clean clone",
  "python -m pytest": "the test suite itself; .ci/run runs it",
  'pip install -e ".[safetensors]"': "changes the environment",
  "flax-warmstart inspect hf_model/model.safetensors.index.json --filter 'embed'": "the user's Hugging Face files",
  "flax-warmstart inspect file:///runs/flax_run": "the user's Flax run directory (tests/test_cli.py reads file:// URLs)",
}


# ----------------------------------------------------------------------------
# Reading the README


class Snippet(NamedTuple):
  lang: str
  marker: str | None  # the setup it runs against
  line: int  # 1-based line of its first code line
  code: str


def read_readme(text: str) -> tuple[list[Snippet], list[str]]:
  """The python and gin blocks of a Markdown text, and the problems of its fences and markers."""
  lines = text.split("\n")
  snippets, problems = [], []
  i = 0
  while i < len(lines):
    fence = FENCE.match(lines[i])
    if not fence:
      if MARKER.match(lines[i]) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
        problems.append(f"line {i + 1}: a snippet marker not directly followed by a ``` fence")
      i += 1
      continue
    lang = fence.group(1).strip()
    end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
    if end is None:
      problems.append(f"line {i + 1}: a ``` fence that is never closed")
      break
    if not lang:
      problems.append(f"line {i + 1}: a ``` fence without a language (python, gin, bash, text)")
    if lang in ("python", "gin"):
      marker = MARKER.match(lines[i - 1]) if i else None
      snippets.append(Snippet(lang, marker and marker.group(1), i + 2, "\n".join(lines[i + 1 : end])))
    i = end + 1
  return snippets, problems


SNIPPETS, FENCE_PROBLEMS = read_readme(README.read_text())


def snippet_ids(snippets: list[Snippet]) -> list[str]:
  """Marker names, suffixed `-2`, `-3` when repeated; unmarked blocks by line."""
  counts: dict[str, int] = {}
  ids = []
  for s in snippets:
    name = s.marker or f"unmarked-line{s.line}"
    counts[name] = counts.get(name, 0) + 1
    ids.append(name if counts[name] == 1 else f"{name}-{counts[name]}")
  return ids


def localize(snippet: Snippet, tmp: pathlib.Path) -> str:
  """The snippet with each quoted placeholder path moved under `tmp`."""
  others = {p for p in re.findall(r"[\"'](/\w[^\"']*)[\"']", snippet.code) if p not in PLACEHOLDERS}
  if others:
    pytest.fail(f"README.md line {snippet.line}: absolute paths {sorted(others)} are not in PLACEHOLDERS.")
  code = snippet.code
  for path in PLACEHOLDERS:
    code = code.replace(f'"{path}"', json.dumps(f"{tmp}{path}"))
  return code


def run(snippet: Snippet, tmp: pathlib.Path, watch: tuple[str, ...] = (), **names) -> tuple[dict, dict[str, list]]:
  """Executes a Python snippet one statement at a time; returns its namespace and every value bound to `watch`."""
  module = ast.parse(localize(snippet, tmp))
  ast.increment_lineno(module, snippet.line - 1)  # tracebacks point at README.md lines
  ns = {"__name__": "readme", "fws": fws, "jax": jax, "ocp": ocp, **names}
  seen: dict[str, list] = {name: [] for name in watch}
  for statement in module.body:
    exec(compile(ast.Module([statement], type_ignores=[]), str(README), "exec"), ns)
    targets = statement.targets if isinstance(statement, ast.Assign) else []
    for name in watch:
      if any(isinstance(t, ast.Name) and t.id == name for t in targets):
        seen[name].append(ns[name])
  return ns, seen


@contextlib.contextmanager
def gin_config():
  """Gin with flax_warmstart's configurables registered, cleared before and after."""
  gin = pytest.importorskip("gin")
  import flax_warmstart.gin  # noqa: F401, PLC0415 (registers the configurables)

  gin.clear_config()
  try:
    yield gin
  finally:
    gin.clear_config()


# ----------------------------------------------------------------------------
# Tiny real models


dense = functools.partial(nn.Dense, 4)
normal = nn.initializers.normal()


class Stack(nn.Module):
  """Dense(4) layers applied in turn, each named by a slash path: `Stack(("encoder/proj", "encoder/out", "head"))`."""

  paths: tuple[str, ...]

  @nn.compact
  def __call__(self, x):
    for scope, group in itertools.groupby(self.paths, lambda path: path.split("/")[0]):
      inner = tuple(path.partition("/")[2] for path in group)
      x = dense(name=scope)(x) if inner == ("",) else Stack(inner, name=scope)(x)
    return x


class Table(nn.Module):
  """One bare parameter of shape `[rows, cols]` (a TensorFlow variable such as `embedding_weights`), looked up."""

  param_name: str
  rows: int
  cols: int = 2

  @nn.compact
  def __call__(self, ids):
    return self.param(self.param_name, normal, (self.rows, self.cols))[ids]


class InputLayer(nn.Module):
  """TensorFlow's feature-column input layer: an embedding column, and a linear column over the same vocabulary."""

  rows: int
  linear: bool = True

  @nn.compact
  def __call__(self, ids):
    x = Table("embedding_weights", self.rows, name="sc_vocab_embedding")(ids)
    if self.linear:
      x = jnp.concatenate([x, Table("weights", self.rows, 1, name="sc_vocab_column")(ids)], axis=-1)
    return x


class TFExamples(nn.Module):
  """The variables of TensorFlow's WarmStartSettings examples: `input_layer/...`, `v1`, `v2`."""

  rows: int
  old: bool = False  # the old model also has `old_tensor_name`

  @nn.compact
  def __call__(self, ids):
    x = InputLayer(self.rows, name="input_layer")(ids)
    if self.old:
      x = x + self.param("old_tensor_name", normal, (self.rows, 1))[ids]
    return x @ self.param("v1", normal, (3, 3)) + self.param("v2", normal, (3,))


class SeedExample(nn.Module):
  """TensorFlow's seed example: an embedding over `rows` tokens and a softmax kernel over `classes`."""

  rows: int
  classes: int = 3

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(self.classes, use_bias=False, name="logits")(
      InputLayer(self.rows, linear=False, name="input_layer")(ids)
    )


class LM(nn.Module):
  """`embedder/embedding` (`[vocab, 2]`) -> `head`."""

  vocab: int

  @nn.compact
  def __call__(self, ids):
    return dense(name="head")(nn.Embed(self.vocab, 2, name="embedder")(ids))


class EmbEncoderHead(nn.Module):
  """`emb` (a bare `[8, 4]` table) -> `encoder` -> `head`."""

  @nn.compact
  def __call__(self, ids):
    x = self.param("emb", normal, (8, 4))[ids]
    return dense(name="head")(nn.relu(dense(name="encoder")(x)))


class Distill(nn.Module):
  """init_from_checkpoint's targets: `backbone/encoder`, a `teacher` copy of the old model, `new_head`, `enc/emb`, `dec/emb`."""

  @nn.compact
  def __call__(self, ids):
    x = Table("emb", 8, 4, name="enc")(ids) + Table("emb", 8, 4, name="dec")(ids)
    x = Stack(("encoder",), name="backbone")(x)
    return dense(name="new_head")(x) + EmbEncoderHead(name="teacher")(ids)


X = jnp.ones((1, 4))
IDS = jnp.zeros((1,), jnp.int32)
TX = optax.adam(1e-2)


def draw(shapes, seed: int, ints: int = 0):
  """A tree of numpy values shaped like `shapes`: floats drawn from `seed`, integers (counters) `ints`."""
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return rng.normal(size=leaf.shape).astype(leaf.dtype)
    return np.full(leaf.shape, ints, leaf.dtype)

  return jax.tree.map(fill, shapes)


def adam_state(module: nn.Module, x: jax.Array, *, seed: int, steps: int = 1) -> train_state.TrainState:
  """An Adam `TrainState` of `module` as after `steps` updates: step and count `steps`, params and slots random.

  The structure is the real one (`module.init` and `TrainState.create` with optax's Adam, traced by
  `jax.eval_shape`); the values are drawn with numpy, so that nothing is compiled and this file
  stays fast.
  """

  def create(key):
    return train_state.TrainState.create(apply_fn=module.apply, params=module.init(key, x)["params"], tx=TX)

  return jax.tree.map(jnp.asarray, draw(jax.eval_shape(create, jax.random.key(0)), seed, steps))


def flat(tree) -> dict[str, np.ndarray]:
  """`{slash/name: value}` of a tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(x) for path, x in leaves}


def params(state) -> dict[str, np.ndarray]:
  return flat(state.params)


def mu(state) -> dict[str, np.ndarray]:
  return flat(state.opt_state[0].mu)


def assert_same(actual: dict, expected: dict, names=None, *, sources: dict | None = None):
  """`actual[name] == expected[sources.get(name, name)]` for each name (all of `actual` by default)."""
  sources = sources or {}
  names = list(actual) if names is None else list(names)
  assert names
  for name in names:
    np.testing.assert_array_equal(actual[name], expected[sources.get(name, name)], err_msg=name)


def write_vocab(path: str, tokens: list[str]) -> list[str]:
  pathlib.Path(path).write_text("".join(f"{t}\n" for t in tokens))
  return tokens


# ----------------------------------------------------------------------------
# Setups: one per marker name


SETUPS: dict[str, Callable[[Snippet, pathlib.Path], None]] = {}


def setup(name: str):
  def register(fn):
    SETUPS[name] = fn
    return fn

  return register


def encoder_rename_parts(tmp: pathlib.Path):
  """The "Use" section's models: the old encoder's `proj` becomes the new encoder's `out`."""
  old = adam_state(Stack(("encoder/proj", "encoder/out", "head")), X, seed=0, steps=2)
  save_manager_step(tmp / "runs/old", 2, old)
  live = adam_state(Stack(("encoder/out", "head")), X, seed=1)
  return old, live


@setup("use")
def use(snippet, tmp):
  old, live = encoder_rename_parts(tmp)
  _, seen = run(snippet, tmp, watch=("state",), state=live)
  by_settings, every_param = seen["state"]
  # vars_to_warm_start=".*encoder.*", encoder/out/kernel renamed from encoder/proj/kernel; head not selected.
  assert_same(
    params(by_settings),
    params(old),
    ["encoder/out/kernel", "encoder/out/bias"],
    sources={"encoder/out/kernel": "encoder/proj/kernel"},
  )
  assert_same(params(by_settings), params(live), ["head/kernel", "head/bias"])
  # "/runs/old" alone: every parameter by its own name, nothing else.
  assert_same(params(every_param), params(old))
  assert_same(mu(every_param), mu(live))
  assert every_param.step == live.step


def encoder_rename_settings(tmp):
  return fws.WarmStartSettings(
    str(tmp / "runs/old"),
    vars_to_warm_start=".*encoder.*",
    var_name_to_prev_var_name={"encoder/out/kernel": "encoder/proj/kernel"},
  )


@setup("plan")
def plan_(snippet, tmp):
  old, live = encoder_rename_parts(tmp)
  with contextlib.redirect_stdout(io.StringIO()) as out:
    ns, _ = run(snippet, tmp, state=live, settings=encoder_rename_settings(tmp))
  table = out.getvalue()
  assert re.search(r"encoder/out/kernel +load +encoder/proj/kernel", table), table
  assert re.search(r"head/kernel +keep", table), table
  actions = {row.name: (row.action, row.source) for row in ns["plan"].leaves}
  assert actions["encoder/out/kernel"] == ("load", "encoder/proj/kernel")
  assert actions["head/bias"][0] == "keep"
  assert_same(
    params(ns["state"]), params(old), ["encoder/out/kernel"], sources={"encoder/out/kernel": "encoder/proj/kernel"}
  )
  assert_same(params(ns["state"]), params(live), ["head/kernel"])


@setup("provenance")
def provenance(snippet, tmp):
  old, live = encoder_rename_parts(tmp)
  plan = fws.plan(live, encoder_rename_settings(tmp))
  state = fws.warm_start(live, plan=plan)
  mgr = ocp.CheckpointManager(tmp / "runs/new")  # asynchronous, as by default
  try:
    ns, _ = run(snippet, tmp, state=state, plan=plan, mgr=mgr, step=int(state.step))
    restored = mgr.restore(int(state.step), args=ocp.args.StandardRestore(state))
  finally:
    mgr.close()
  record = ns["record"]
  assert record["leaves"] == json.loads(json.dumps(plan.provenance()))["leaves"]
  assert record["leaves"]["encoder/out/kernel"] == {"action": "load", "source": "encoder/proj/kernel", "checkpoint": 0}
  assert record["leaves"]["head/kernel"] == {"action": "keep"}
  assert record["checkpoints"][0]["step"] == 2
  assert_same(
    params(restored), params(old), ["encoder/out/kernel"], sources={"encoder/out/kernel": "encoder/proj/kernel"}
  )


@setup("gin_settings")
def gin_settings(snippet, tmp):
  old = adam_state(Stack(("encoder", "head")), X, seed=0, steps=2)
  ckpt = save_checkpoint(tmp / "old", old)
  live = adam_state(Stack(("backbone", "head")), X, seed=1)
  (tmp / "settings.gin").write_text(snippet.code)
  with gin_config():
    from flax_warmstart.gin import settings_from_gin  # noqa: PLC0415 (optional extra)

    settings = settings_from_gin(tmp / "settings.gin", ckpt)  # as `flax-warmstart plan/run --settings` reads it
  assert settings.vars_to_warm_start == ("backbone/",)
  out = fws.warm_start(live, settings)
  renamed = {"backbone/kernel": "encoder/kernel", "backbone/bias": "encoder/bias"}
  assert_same(params(out), params(old), renamed, sources=renamed)
  assert_same(mu(out), mu(old), renamed, sources=renamed)  # a list selects slots; renames carry them
  assert_same(params(out), params(live), ["head/kernel", "head/bias"])
  assert out.step == live.step


@setup("tf_examples")
def tf_examples(snippet, tmp):
  old = adam_state(TFExamples(101, old=True), IDS, seed=0, steps=2)
  save_checkpoint(tmp / "tmp", old)
  live = adam_state(TFExamples(101), IDS, seed=1)
  old_vocab = write_vocab("old_vocab.txt", [f"w{i}" for i in range(100)])
  new_vocab = write_vocab("new_vocab.txt", [f"w{i}" for i in range(99, 39, -1)] + [f"x{i}" for i in range(40)])
  _, seen = run(snippet, tmp, watch=("state", "settings"), state=live)
  (every_weight,) = seen["state"]
  input_only, with_vocab, vocab_only, renamed, trainable, everything, v1_v2 = seen["settings"]
  emb, column = "input_layer/sc_vocab_embedding/embedding_weights", "input_layer/sc_vocab_column/weights"
  old_params = params(old)
  old_params.pop("old_tensor_name")
  assert_same(params(every_weight), old_params)

  out = fws.warm_start(live, input_only)
  assert_same(params(out), old_params, [emb, column])
  assert_same(params(out), params(live), ["v1", "v2"])

  # Row i is the old row of new_vocab[i]; new tokens and the OOV row are zeros (no backup_initializer).
  expected = np.zeros((101, 2), np.float32)
  for i, token in enumerate(new_vocab):
    if token in old_vocab:
      expected[i] = old_params[emb][old_vocab.index(token)]
  out = fws.warm_start(live, with_vocab)
  np.testing.assert_array_equal(params(out)[emb], expected)
  assert_same(params(out), old_params, [column, "v1", "v2"])
  out = fws.warm_start(live, vocab_only)
  np.testing.assert_array_equal(params(out)[emb], expected)
  assert_same(params(out), params(live), [column, "v1", "v2"])

  out = fws.warm_start(live, renamed)
  assert_same(params(out), params(old), [column], sources={column: "old_tensor_name"})
  assert_same(params(out), old_params, [emb, "v1", "v2"])

  out = fws.warm_start(live, trainable)
  assert_same(params(out), old_params)
  assert_same(mu(out), mu(live))
  assert out.step == live.step
  out = fws.warm_start(live, everything)
  assert_same(flat(out.opt_state), flat(old.opt_state))  # slots and count too
  assert out.step == old.step

  out = fws.warm_start(live, v1_v2)
  assert_same(params(out), old_params, ["v1", "v2"])
  assert_same(mu(out), mu(old), ["v1"])
  assert_same(mu(out), mu(live), ["v2", emb])
  assert_same(params(out), params(live), [emb, column])


@setup("vocab")
def vocab(snippet, tmp):
  old = adam_state(LM(32_000), IDS, seed=0, steps=2)
  save_manager_step(tmp / "runs/old", 2, old)
  live = adam_state(LM(32_101), IDS, seed=1)
  old_vocab = write_vocab("old_vocab.txt", [f"t{i}" for i in range(32_000)])
  write_vocab("new_vocab.txt", [f"t{i}" for i in range(31_999, 99, -1)] + [f"new{i}" for i in range(200)])
  ns, _ = run(snippet, tmp, state=live)
  table = params(ns["state"])["embedder/embedding"]
  old_table = params(old)["embedder/embedding"]
  assert table.shape == (32_101, 2)
  np.testing.assert_array_equal(table[:31_900], old_table[31_999:99:-1])  # every kept token's old row
  fresh = table[31_900:]  # 200 new tokens and the OOV row: normal(0.02), reproducible from rng
  assert fresh.shape == (201, 2) and 0.01 < fresh.std() < 0.04 and np.all(fresh != 0)
  assert len(old_vocab) == len(old_table)
  assert_same(params(ns["state"]), params(old), ["head/kernel", "head/bias"])
  again = fws.warm_start(live, ns["settings"], rng=jax.random.key(0))
  np.testing.assert_array_equal(params(again)["embedder/embedding"], table)


@setup("tf_vocab_seed")
def tf_vocab_seed(snippet, tmp):
  old = adam_state(SeedExample(4), IDS, seed=0, steps=2)
  save_checkpoint(tmp / "runs/old", old)
  live = adam_state(SeedExample(6), IDS, seed=1)
  write_vocab("old.txt", ["a", "b", "c", "d"])
  write_vocab("new.txt", ["d", "b", "x", "a", "y"])
  write_vocab("old_classes.txt", ["neg", "neutral", "pos"])
  write_vocab("new_classes.txt", ["pos", "neg", "unknown"])
  ns, _ = run(snippet, tmp, state=live)
  out = fws.warm_start(live, ns["settings"])
  emb, kernel = "input_layer/sc_vocab_embedding/embedding_weights", "logits/kernel"
  new_rows = [3, 1, None, 0, None, None]  # d, b, x (new), a, y (new), OOV

  def remapped(old_table, fill):
    return np.stack([old_table[i] if i is not None else np.full(2, fill, np.float32) for i in new_rows])

  np.testing.assert_array_equal(params(out)[emb], remapped(params(old)[emb], 0.42))
  np.testing.assert_array_equal(mu(out)[emb], remapped(mu(old)[emb], 0))  # slots follow, new rows 0
  old_kernel = params(old)[kernel]
  np.testing.assert_array_equal(params(out)[kernel], np.stack([old_kernel[:, 2], old_kernel[:, 0], np.zeros(2)], 1))
  assert out.step == live.step  # neither regex selects the step


@setup("init_from_checkpoint")
def init_from_checkpoint(snippet, tmp):
  old = adam_state(EmbEncoderHead(), IDS, seed=0, steps=2)
  save_checkpoint(tmp / "runs/old", old)
  live = adam_state(Distill(), IDS, seed=1)
  _, seen = run(snippet, tmp, watch=("state",), state=live)
  scopes, pairs = seen["state"]
  got, want = params(scopes), params(old)
  assert_same(
    got,
    want,
    ["backbone/encoder/kernel", "backbone/encoder/bias"],
    sources={"backbone/encoder/kernel": "encoder/kernel", "backbone/encoder/bias": "encoder/bias"},
  )
  assert_same(mu(scopes), mu(old), ["backbone/encoder/kernel"], sources={"backbone/encoder/kernel": "encoder/kernel"})
  assert_same(got, want, [f"teacher/{name}" for name in want], sources={f"teacher/{name}": name for name in want})
  assert_same(got, want, ["new_head/kernel"], sources={"new_head/kernel": "head/kernel"})
  assert_same(got, params(live), ["new_head/bias", "enc/emb", "dec/emb"])
  assert_same(params(pairs), want, ["enc/emb", "dec/emb"], sources={"enc/emb": "emb", "dec/emb": "emb"})
  assert_same(params(pairs), got, ["backbone/encoder/kernel", "new_head/bias"])


@setup("rename_rules")
def rename_rules(snippet, tmp):
  old = adam_state(Stack(("encoder", "head")), X, seed=0, steps=2)
  save_checkpoint(tmp / "runs/old", old)
  live = adam_state(Stack(("backbone/encoder", "head")), X, seed=1)
  ns, _ = run(snippet, tmp, state=live)
  out = fws.warm_start(live, ns["settings"])
  renamed = {"backbone/encoder/kernel": "encoder/kernel", "backbone/encoder/bias": "encoder/bias"}
  assert_same(params(out), params(old), renamed, sources=renamed)
  assert_same(mu(out), mu(old), renamed, sources=renamed)  # slots follow the rule
  assert_same(params(out), params(live), ["head/kernel", "head/bias"])  # None: the new head's init
  assert_same(mu(out), mu(live), ["head/kernel"])
  assert out.step == old.step == 2  # [".*"] with no rule for it: loaded by its own name


@setup("model_surgery")
def model_surgery(snippet, tmp):
  rng = np.random.default_rng(0)
  old = {
    "layers": {"k": rng.normal(size=(2, 3, 4))},
    "block_0": {"k": rng.normal(size=(3, 4))},
    "block_1": {"k": rng.normal(size=(3, 4))},
    "wte": {"embedding": rng.normal(size=(5, 3))},
    "attn": {"q_proj": {"kernel": rng.normal(size=(3, 4))}},
    "mlp": {"k": rng.normal(size=(3, 4))},
  }
  old = jax.tree.map(lambda x: np.asarray(x, np.float32), old)
  save_checkpoint(tmp / "runs/old", old)
  shapes = {
    "layers_0": {"k": (3, 4)},
    "layers_1": {"k": (3, 4)},
    "blocks": {"k": (2, 3, 4)},
    "deep": {"k": (4, 3, 4)},
    "lm_head": {"kernel": (3, 5)},
    "attn": {"query": {"kernel": (3, 2, 2)}},
    "moe": {"experts": {"k": (4, 3, 4)}, "router": {"kernel": (3, 4)}},
  }
  live = jax.tree.map(lambda shape: jnp.full(shape, -1.0), shapes, is_leaf=lambda x: isinstance(x, tuple))
  ns, _ = run(snippet, tmp, state=live)
  out = ns["state"]
  np.testing.assert_array_equal(out["layers_1"]["k"], old["layers"]["k"][1])
  np.testing.assert_array_equal(out["blocks"]["k"], np.stack([old["block_0"]["k"], old["block_1"]["k"]]))
  np.testing.assert_array_equal(out["deep"]["k"], old["layers"]["k"][[0, 0, 1, 1]])
  np.testing.assert_array_equal(out["lm_head"]["kernel"], old["wte"]["embedding"].T)
  np.testing.assert_array_equal(out["attn"]["query"]["kernel"], old["attn"]["q_proj"]["kernel"].reshape(3, 2, 2))
  np.testing.assert_array_equal(out["moe"]["experts"]["k"], np.broadcast_to(old["mlp"]["k"], (4, 3, 4)))
  np.testing.assert_array_equal(out["moe"]["router"]["kernel"], live["moe"]["router"]["kernel"])  # fresh


@setup("gin_t5x")
def gin_t5x(snippet, tmp):
  def t5x_state(module, seed):
    """A T5X state dict of a Linen model: params under `target`, Adafactor `param_states`, `step`."""
    target = draw(jax.eval_shape(module.init, jax.random.key(0), X)["params"], seed)

    def slot(p):  # factored v_row/v_col for matrices, v for vectors; m unused
      matrix = p.ndim == 2
      return {
        "m": None,
        "v": None if matrix else np.full(p.shape, seed + 0.25, np.float32),
        "v_col": np.full(p.shape[1], seed + 0.5, np.float32) if matrix else None,
        "v_row": np.full(p.shape[0], seed + 0.5, np.float32) if matrix else None,
      }

    slots = jax.tree.map(slot, target)
    return {"target": target, "state": {"param_states": slots, "step": np.asarray(100 * seed, np.int32)}}

  old = t5x_state(Stack(("encoder/layers_0", "decoder/layers_0")), seed=1)
  ckpt = save_checkpoint(tmp / "t5x_old", old)
  target = t5x_state(Stack(("backbone/layers_0", "decoder/layers_0")), seed=0)
  (tmp / "finetune.gin").write_text(snippet.code)
  with gin_config() as gin:

    @gin.configurable("utils.RestoreCheckpointConfig")
    def restore_checkpoint_config(state_transformation_fns=()):  # T5X's, reduced to the field bound here
      return tuple(state_transformation_fns)

    try:
      gin.parse_config_files_and_bindings([str(tmp / "finetune.gin")], [f"INITIAL_CHECKPOINT_PATH = {ckpt!r}"])
      (fn,) = restore_checkpoint_config()
      settings = gin.get_configurable("flax_warmstart.WarmStartSettings")()
    finally:
      if "utils.RestoreCheckpointConfig" in gin.config._REGISTRY:  # noqa: SLF001
        gin.config._REGISTRY.pop("utils.RestoreCheckpointConfig")  # noqa: SLF001
  assert fn.__module__ == "flax_warmstart.t5x"
  assert settings.ckpt_to_initialize_from == ckpt
  with ocp.StandardCheckpointer() as ckptr:  # T5X reads the checkpoint at INITIAL_CHECKPOINT_PATH
    ckpt_state = ckptr.restore(settings.ckpt_to_initialize_from)
  assert fn(ckpt_state, target, is_resuming=True) is ckpt_state
  out = fn(ckpt_state, target, is_resuming=False)
  renamed = {name: name.replace("backbone/", "encoder/") for name in flat(target["target"])}
  assert_same(flat(out["target"]), flat(old["target"]), sources=renamed)
  assert_same(flat(out["state"]), flat(target["state"]))  # parameters only: Adafactor state and step stay fresh
  assert int(out["state"]["step"]) == 0


@setup("several_sources")
def several_sources(snippet, tmp):
  pretrain = adam_state(Stack(("encoder", "head")), X, seed=0, steps=2)
  save_manager_step(tmp / "runs/pretrain", 2, pretrain)
  lm = adam_state(Stack(("decoder", "head")), X, seed=2, steps=3)
  save_checkpoint(tmp / "runs/lm", lm)
  live = adam_state(Stack(("encoder", "decoder", "head")), X, seed=1)
  ns, _ = run(snippet, tmp, state=live)
  out = params(ns["state"])
  assert_same(out, params(pretrain), ["encoder/kernel", "encoder/bias"])
  assert_same(out, params(lm), ["decoder/kernel", "decoder/bias"])
  assert_same(out, params(live), ["head/kernel", "head/bias"])


@setup("abstract_state")
def abstract_state(snippet, tmp):
  model = Stack(("encoder", "head"))
  old = adam_state(model, X, seed=0, steps=2)
  save_manager_step(tmp / "runs/old", 2, old)
  ns, _ = run(snippet, tmp, model=model, x=X)
  state, fresh = ns["state"], ns["init_fn"]()
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
  assert_same(params(state), params(old))  # every parameter from the checkpoint
  assert_same(flat(state.opt_state), flat(fresh.opt_state))  # the rest from init_fn
  assert int(state.step) == 0


class NNXStack(nnx.Module):
  """The NNX twin of `Stack(("encoder", "head"))` (same names and shapes), with Dropout: it holds an RNG stream."""

  def __init__(self, rngs):
    self.encoder = nnx.Linear(4, 4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 4, rngs=rngs)


def unboxed(tree) -> dict[str, np.ndarray]:
  """`flat` of a tree of NNX Variables, without their `value` level."""
  return {name.removesuffix("/value"): value for name, value in flat(tree).items()}


@setup("nnx")
def nnx_(snippet, tmp):
  old = adam_state(Stack(("encoder", "head")), X, seed=0, steps=2)
  save_checkpoint(tmp / "runs/old", old)
  model = NNXStack(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
  key = jax.random.key_data(model.drop.rngs.key[...])
  linen = adam_state(Stack(("encoder", "head")), X, seed=1)
  ns, _ = run(snippet, tmp, model=model, optimizer=optimizer, state=linen)
  new_model, new_optimizer = ns["new_model"], ns["new_optimizer"]
  assert type(new_model) is NNXStack and new_model is not model
  for obj in (new_model, model):  # the result, and the objects updated in place
    assert_same(unboxed(nnx.state(obj, nnx.Param)), params(old))
    np.testing.assert_array_equal(jax.random.key_data(obj.drop.rngs.key[...]), key)  # not in a Linen checkpoint
  for opt in (new_optimizer, optimizer):
    assert_same(unboxed(opt.opt_state[0].mu), mu(old))
    assert_same(unboxed(opt.opt_state[0].nu), flat(old.opt_state[0].nu))
    assert int(opt.step[...]) == int(old.step) == 2 and int(opt.opt_state[0].count[...]) == 2
  back = ns["state"]  # the Linen TrainState, warm-started from the NNX checkpoint
  assert_same(params(back), params(old))
  assert_same(mu(back), mu(old))
  assert int(back.step) == 2


@contextlib.contextmanager
def logging_as_after_importing_orbax():
  """Logging as in a program that imported Orbax first: absl's implicit `basicConfig()` handler on the root logger.

  The handler is absl's own (one absl log call on a bare root logger makes it, as Orbax's import does), writing to
  the StringIO yielded instead of stderr. Logging is restored after.
  """
  root, ours = logging.getLogger(), logging.getLogger("flax_warmstart")
  saved = root.handlers[:], root.level, ours.level
  root.handlers[:] = []
  try:
    absl.logging.vlog(1, "as Orbax's import does")
    (handler,) = root.handlers
    out = io.StringIO()
    handler.setStream(out)
    yield out
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


@setup("logging")
def logging_(snippet, tmp):
  """The recipe works in a program that imported Orbax before configuring logging (a plain basicConfig would not)."""
  save_checkpoint(tmp / "runs/old", {"encoder": {"kernel": np.ones((4, 4), np.float32)}})
  state = {"encoder": {"kernel": jnp.zeros((4, 4), jnp.bfloat16)}}
  with logging_as_after_importing_orbax() as out:
    logging.basicConfig(level=logging.INFO)  # what does not work here, and why the README gives the recipe
    fws.warm_start(state, str(tmp / "runs/old"))
    assert out.getvalue() == ""
    run(snippet, tmp)
    fws.warm_start(state, str(tmp / "runs/old"))
  lines = out.getvalue().splitlines()
  assert any(
    line.startswith(f"INFO:flax_warmstart:Warm-started 1 of 1 leaves from {tmp}/runs/old") for line in lines
  ), lines
  assert "INFO:flax_warmstart:Cast 1 leaves to the state's dtype: encoder/kernel (float32->bfloat16)." in lines, lines
  assert all(line.startswith("INFO:flax_warmstart:") for line in lines), "other libraries' INFO shown too"


# ----------------------------------------------------------------------------
# Tests


def test_readme_fences_and_markers():
  problems = list(FENCE_PROBLEMS)
  problems += [
    f"line {s.line}: a ```{s.lang} block without a known `<!-- snippet: NAME -->` marker just before it"
    f" (got {s.marker!r}; one of {sorted(SETUPS)})"
    for s in SNIPPETS
    if s.marker not in SETUPS
  ]
  assert not problems, "README.md:\n" + "\n".join(problems)
  assert sorted({s.marker for s in SNIPPETS}) == sorted(SETUPS), "a setup no README snippet uses"


def test_marker_checks_catch_untested_snippets():
  text = "```python\nx = 1\n```\n<!-- snippet: nope -->\n```gin\na.b = 1\n```\n```\nbare\n```\n<!-- snippet: use -->\n"
  snippets, problems = read_readme(text)
  assert [(s.lang, s.marker, s.line) for s in snippets] == [("python", None, 2), ("gin", "nope", 6)]
  assert problems == [
    "line 8: a ``` fence without a language (python, gin, bash, text)",
    "line 11: a snippet marker not directly followed by a ``` fence",
  ]
  assert snippet_ids([*snippets, snippets[1]]) == ["unmarked-line2", "nope", "nope-2"]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=snippet_ids(SNIPPETS))
def test_readme_snippet_runs(snippet, tmp_path, monkeypatch):
  if snippet.marker not in SETUPS:
    pytest.fail(
      f"README.md line {snippet.line}: this ```{snippet.lang} block needs a `<!-- snippet: NAME -->` marker"
      f" naming its setup, one of {sorted(SETUPS)} (got {snippet.marker!r}); add a setup for a new one."
    )
  monkeypatch.chdir(tmp_path)
  SETUPS[snippet.marker](snippet, tmp_path)


# ----------------------------------------------------------------------------
# Shell commands and their output


class Block(NamedTuple):
  lang: str
  line: int  # 1-based line of its first content line
  lines: list[str]


class Command(NamedTuple):
  text: str  # as in the README, without a trailing `# comment`
  line: int


class Output(NamedTuple):
  """A `$ command` of a ```text block and the output the README shows for it."""

  command: str
  line: int
  text: str


def blocks(text: str, lang: str) -> list[Block]:
  """The ```lang blocks of a Markdown text."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    fence = FENCE.match(lines[i])
    end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), len(lines)) if fence else i
    if fence and fence.group(1).strip() == lang:
      out.append(Block(lang, i + 2, lines[i + 1 : end]))
    i = end + 1
  return out


def commands(text: str) -> list[Command]:
  """The commands of the ```bash blocks, one a line, each without its trailing comment."""
  return [
    Command(re.sub(r"\s+#\s.*$", "", line).strip(), block.line + k)
    for block in blocks(text, "bash")
    for k, line in enumerate(block.lines)
    if line.strip() and not line.lstrip().startswith("#")
  ]


def outputs(text: str) -> tuple[list[Output], list[str]]:
  """The `$ command` sections of the ```text blocks, and the problems of blocks that are not made of them."""
  found, problems = [], []
  for block in blocks(text, "text"):
    starts = [k for k, line in enumerate(block.lines) if line.startswith("$ ")]
    if not starts or any(line.strip() for line in block.lines[: starts[0]]):
      problems.append(f"line {block.line}: a ```text block that does not start with a `$ command` line")
    for a, b in zip(starts, [*starts[1:], len(block.lines)], strict=False):
      shown = "\n".join(block.lines[a + 1 : b]).rstrip("\n")
      found.append(Output(block.lines[a][2:].strip(), block.line + a, shown))
  return found, problems


README_TEXT = README.read_text()
COMMANDS = commands(README_TEXT)
RUN = [c for c in COMMANDS if DEMO_DIR in c.text]
OUTPUTS, OUTPUT_PROBLEMS = outputs(README_TEXT)


def argv(command: str, demo_dir: pathlib.Path) -> tuple[str, list[str]]:
  """The module whose `main(args)` a README command runs, and its args, with DEMO_DIR moved to `demo_dir`."""
  words = [word.replace(DEMO_DIR, str(demo_dir)) for word in shlex.split(command, comments=True)]
  if words[0] == "flax-warmstart":
    return "flax_warmstart.cli", words[1:]
  if words[:2] == ["python", "-m"] and len(words) > 2:
    return words[2], words[3:]
  raise ValueError(f"README command {command!r}: only `python -m ...` and `flax-warmstart ...` commands can run here")


class Ran(NamedTuple):
  returncode: int
  output: str  # stdout and stderr, as a terminal shows them


def run_in_process(module: str, args: list[str]) -> Ran:
  """`module.main(args)` in this process, its stdout and stderr captured together; logging restored after."""
  root, ours = logging.getLogger(), logging.getLogger("flax_warmstart")
  saved = root.handlers[:], root.level, ours.level
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      try:
        code = importlib.import_module(module).main(args)
      except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code if isinstance(exit_.code, int) else 1
  finally:
    root.handlers[:], _, _ = saved
    root.setLevel(saved[1])
    ours.setLevel(saved[2])
  return Ran(code, out.getvalue())


def run_in_subprocess(module: str, args: list[str]) -> Ran:
  """`python -m module args` (the console script `flax-warmstart` is `-m flax_warmstart.cli`), as from a shell."""
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    env=CHILD_ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=600,
  )
  return Ran(proc.returncode, proc.stdout)


SIZE = re.compile(r"\b\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)\b")
TIME = re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|s|sec|seconds)\b")


def normalized(text: str, demo_dir: str | None = None) -> str:
  """Paths to DEMO_DIR, sizes and timings to placeholders, runs of spaces to one, no trailing blanks."""
  if demo_dir:
    text = text.replace(demo_dir, DEMO_DIR)
  text = TIME.sub("<time>", SIZE.sub("<size>", text))
  return "\n".join(re.sub(r" +", " ", line).rstrip() for line in text.rstrip("\n").split("\n"))


def shows(readme: str, actual: str) -> bool:
  """Whether the README's (normalized) output matches the actual one; `...` stands for any text, lines included."""
  pattern = ".*?".join(re.escape(part) for part in readme.split("..."))
  return re.fullmatch(pattern, actual, re.DOTALL) is not None


@pytest.fixture(
  scope="module",
  params=["in_process", pytest.param("subprocess", marks=pytest.mark.slow)],
)
def ran(request, tmp_path_factory) -> tuple[pathlib.Path, dict[str, Ran]]:
  """Runs the README's runnable commands in order in a fresh directory: in this process (`main(args)` of each
  module, fast) and, marked slow, each in its own Python as from a shell (what a user sees, logging included)."""
  cwd = tmp_path_factory.mktemp("readme_shell")
  demo_dir = cwd / "fws_example"
  runner = run_in_process if request.param == "in_process" else run_in_subprocess
  with contextlib.chdir(cwd):
    return demo_dir, {command.text: runner(*argv(command.text, demo_dir)) for command in RUN}


def test_readme_shell_commands_are_run_or_excused():
  problems = list(OUTPUT_PROBLEMS)
  texts = [c.text for c in COMMANDS]
  for c in COMMANDS:
    if DEMO_DIR not in c.text and c.text not in NOT_RUN:
      problems.append(f"line {c.line}: `{c.text}` neither uses {DEMO_DIR} (the demo's files) nor is in NOT_RUN")
    if DEMO_DIR in c.text:
      try:
        argv(c.text, pathlib.Path(DEMO_DIR))
      except ValueError as err:
        problems.append(f"line {c.line}: {err}")
  problems += [
    f"NOT_RUN lists `{text}`, which no ```bash block of the README has" for text in NOT_RUN if text not in texts
  ]
  run = [c.text for c in RUN]
  problems += [
    f"line {o.line}: the output of `$ {o.command}` is shown, but no ```bash block runs that command on {DEMO_DIR}"
    for o in OUTPUTS
    if o.command not in run
  ]
  assert not problems, "README.md:\n" + "\n".join(problems)
  assert RUN and OUTPUTS


def test_readme_shell_helpers():
  text = (
    "```bash\npip install x  # a comment\nflax-warmstart plan /tmp/fws_example/a\n```\n```text\n$ a\n1\n\n$ b\n```\n"
  )
  assert commands(text) == [Command("pip install x", 2), Command("flax-warmstart plan /tmp/fws_example/a", 3)]
  assert outputs(text) == ([Output("a", 6, "1"), Output("b", 9, "")], [])
  assert outputs("```text\nno command\n```\n")[1] == [
    "line 2: a ```text block that does not start with a `$ command` line"
  ]
  assert normalized("/x/y@step 3: 1.7 KiB  in 0.25 s   \n", "/x/y") == f"{DEMO_DIR}@step 3: <size> in <time>"
  assert shows("a\n...\nd", "a\nb\nc\nd") and shows("head/k...", "head/kernel, step") and not shows("a\nd", "a\nb\nd")
  assert argv("flax-warmstart inspect /tmp/fws_example/old", pathlib.Path("/w")) == (
    "flax_warmstart.cli",
    ["inspect", "/w/old"],
  )
  assert argv("python -m flax_warmstart.demo --keep /tmp/fws_example", pathlib.Path("/w"))[1] == ["--keep", "/w"]


@pytest.mark.parametrize("command", RUN, ids=[f"line{c.line}" for c in RUN])
def test_readme_command_runs(command, ran):
  _, results = ran
  result = results[command.text]
  assert result.returncode == 0, (
    f"README.md line {command.line}: `{command.text}` exited {result.returncode}:\n{result.stdout}"
  )


@pytest.mark.parametrize("shown", OUTPUTS, ids=[f"line{o.line}" for o in OUTPUTS])
def test_readme_output_is_the_commands(shown, ran):
  demo_dir, results = ran
  if shown.command not in results:
    pytest.fail(
      f"README.md line {shown.line}: `{shown.command}` is not run (see test_readme_shell_commands_are_run_or_excused)"
    )
  actual = results[shown.command].output.replace(str(demo_dir), DEMO_DIR)
  if not shows(normalized(shown.text), normalized(actual)):
    pytest.fail(
      f"README.md line {shown.line}: the output shown for `$ {shown.command}` is not what it prints"
      " (compared with paths, sizes, timings and runs of spaces normalized; `...` stands for any text)."
      f"\n--- README.md shows:\n{shown.text}\n--- the command prints:\n{actual.rstrip()}"
    )
