"""The `flax-warmstart` command line (flax_warmstart/cli.py).

Most tests call `cli.main(argv)` in this process (`conftest.run_cli`: it
returns the exit code; stdout and stderr are captured). One smoke test starts
a real `python -m flax_warmstart.cli run` subprocess, from relative paths (the
`warm` fixture, whose output three tests check). OLD is a CheckpointManager
root (the session's Adam-trained MLP TrainState at step 2, `adam_mlp_run`),
NEW a checkpoint of a changed model (the `encoder` scope renamed `backbone`, a
wider `head`), plus a small vocabulary case. Exit codes: 0 success, 1 a request
that cannot be carried out (one `flax-warmstart: error:` message, never a
traceback), 2 a usage error.
"""

import functools
import json
import logging
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import INIT_MODULE, INIT_MODULE_SOURCE, MLP, make_state, run_cli, save_checkpoint

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ERROR = "flax-warmstart: error:"

ENCODER = ["encoder/kernel", "encoder/bias"]
HEAD = ["head/kernel", "head/bias"]
SLOTS = ["", "/opt_state/0/mu", "/opt_state/0/nu"]
# The OLD checkpoint's names (the naming contract), shapes and dtypes.
OLD_VARS = {
  **{p + s: ((3, 4) if p.endswith("kernel") else (4,), "float32") for p in ENCODER for s in SLOTS},
  **{p + s: ((4, 2) if p.endswith("kernel") else (2,), "float32") for p in HEAD for s in SLOTS},
  "opt_state/0/count": ((), "int32"),
}
BACKBONE_NAMES = [p.replace("encoder", "backbone") + s for p in ENCODER for s in SLOTS]
HEAD_NAMES = [p + s for p in HEAD for s in SLOTS]
ENCODER_NAMES = [p + s for p in ENCODER for s in SLOTS]

RENAME_YAML = """\
# Warm-start everything; the encoder was renamed backbone, the head changed shape.
vars_to_warm_start: [".*"]
rename_rules:
  - ['backbone/(.*)', 'encoder/\\1']
  - ['head/.*', null]
"""
RENAME_JSON = {"vars_to_warm_start": [".*"], "rename_rules": [["backbone/(.*)", "encoder/\\1"], ["head/.*", None]]}

OLD_VOCAB = ["a", "b", "c"]
NEW_VOCAB = ["c", "z", "a", "b"]  # z is new: its row comes from the backup initializer.


def cli(*args, cwd=None):
  """Runs `flax-warmstart ARGS` in this process: `(returncode, stdout, stderr)`."""
  return run_cli(*args, cwd=cwd)


def cli_subprocess(*args, cwd=None):
  """Runs `flax-warmstart ARGS` in a fresh interpreter (`python -m flax_warmstart.cli`)."""
  return subprocess.run(
    [sys.executable, "-m", "flax_warmstart.cli", *map(str, args)],
    capture_output=True,
    text=True,
    timeout=120,
    env=ENV,
    cwd=cwd,
  )


def assert_ok(result):
  assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
  assert "Traceback" not in result.stderr, result.stderr


def assert_user_error(result, *fragments):
  """Exit 1, one `flax-warmstart: error:` message naming `fragments`, no traceback, nothing on stdout."""
  assert "Traceback" not in result.stderr, result.stderr
  assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
  assert result.stderr.startswith(ERROR), result.stderr
  assert result.stdout == "", result.stdout
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr)


def table_rows(text):
  """The rows of a printed table under its `name ...` header, as `{name: cells}`."""
  lines = text.splitlines()
  start = next(k for k, line in enumerate(lines) if line.split()[:1] == ["name"])
  rows = {}
  for line in lines[start + 1 :]:
    if not line.strip() or line.startswith(("Unused", "[")):
      continue
    cells = line.split()
    rows[cells[0]] = cells[1:]
  return rows


def restore(path):
  """A checkpoint written by the CLI, read back with plain Orbax (host arrays)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.fspath(path))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, adam_mlp_run):
  root = tmp_path_factory.mktemp("cli")
  old_state, old = adam_mlp_run  # read-only: shared by the session
  new_state = make_state(MLP(encoder_name="backbone", outputs=3), seed=1, steps=1)
  new = save_checkpoint(root / "new", new_state)
  (root / "rename.yaml").write_text(RENAME_YAML)
  (root / "rename.json").write_text(json.dumps(RENAME_JSON))

  # Vocabulary: a bare params dict whose embedding rows follow a vocabulary file.
  (root / "old_vocab.txt").write_text("\n".join(OLD_VOCAB) + "\n")
  (root / "new_vocab.txt").write_text("\n".join(NEW_VOCAB) + "\n")
  old_table = np.arange(6, dtype=np.float32).reshape(3, 2)
  vold = save_checkpoint(root / "vold", {"params": {"embedder": {"embedding": old_table}}})
  vnew = save_checkpoint(root / "vnew", {"params": {"embedder": {"embedding": np.full((4, 2), -1, np.float32)}}})
  vocab_settings = {
    "var_name_to_vocab_info": {
      "embedder/embedding": {
        "new_vocab": str(root / "new_vocab.txt"),
        "new_vocab_size": len(NEW_VOCAB),
        "num_oov_buckets": 0,
        "old_vocab": str(root / "old_vocab.txt"),
        "backup_initializer": {"constant": 0.5},
      }
    }
  }
  (root / "vocab.json").write_text(json.dumps(vocab_settings))
  return types.SimpleNamespace(
    root=root,
    old=old,
    new=new,
    old_state=old_state,
    new_state=new_state,
    yaml=root / "rename.yaml",
    json=root / "rename.json",
    vold=vold,
    vnew=vnew,
    vocab_json=root / "vocab.json",
    old_table=old_table,
  )


# --help and usage errors.


EXAMPLES = ("flax-warmstart inspect", "flax-warmstart diff", "flax-warmstart plan", "flax-warmstart run")
POSITIONALS = {"inspect": ["CKPT"], "diff": ["OLD", "NEW"], "plan": ["OLD", "NEW"], "run": ["OLD", "NEW", "OUT"]}


def test_top_level_help_shows_examples_exit_codes_and_the_ways_to_give_the_new_model():
  result = cli("--help")
  assert_ok(result)
  out = result.stdout
  assert out.startswith("usage: flax-warmstart"), out
  for text in (*EXAMPLES, "inspect", "diff", "plan", "run", "-v", "-q", "--version", "--init", "--gin_file"):
    assert text in out, (text, out)
  assert "exit codes: 0 success, 1 the request cannot be carried out" in out and "2 usage error" in out, out
  assert "%INITIAL_CHECKPOINT" in out and "load_provenance" in out, out


@pytest.mark.parametrize("verb", list(POSITIONALS))
def test_verb_help_explains_every_positional_without_repeating_the_examples(verb):
  result = cli(verb, "--help")
  assert_ok(result)
  out = result.stdout
  assert out.startswith(f"usage: flax-warmstart {verb}"), out
  assert "examples:" not in out and "/runs/old" not in out, out
  assert "exit codes:" in out, out
  section = out.split("positional arguments:")[1].split("options:")[0]
  for positional in POSITIONALS[verb]:
    line = next(line for line in section.splitlines() if line.split()[:1] == [positional])
    assert len(line.split()) > 3, (positional, section)  # a help text follows the name
  options = {
    "inspect": ["--filter", "--item", "--step"],
    "diff": [],
    "plan": ["--settings", "--init", "--init-arg", "--seed", "--gin_file", "--gin_bindings", "--step"],
    "run": ["--settings", "--init", "--seed", "--gin_file", "--force", "--manager", "--no-progress", "--allow-empty"],
  }[verb]
  for option in [*options, "--json", "-v", "-q", "--version"]:
    assert option in out, (option, out)


@pytest.mark.parametrize("where", ["before", "after"])
def test_version(where):
  import flax_warmstart as fws

  result = cli(*(["--version", "inspect", "x"] if where == "before" else ["inspect", "x", "--version"]))
  assert_ok(result)
  assert result.stdout.startswith(f"flax-warmstart {fws.__version__} (jax "), result.stdout


def test_usage_errors_exit_2(ckpts):
  result = cli("diff", ckpts.old)  # NEW is missing
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "usage:" in result.stderr and "Traceback" not in result.stderr, result.stderr


USAGE_ERRORS = {
  # name: (arguments after OLD, fragments of the message)
  "plan_without_new": (["plan"], ["flax-warmstart plan: error: the new model is missing", "NEW", "--init"]),
  "run_without_new": (["run", "out"], ["the new model is missing", "flax-warmstart run OLD NEW OUT", "--init"]),
  "new_and_init": (["plan", "new", "--init", "m:f"], ["either as NEW or with --init, not both"]),
  "init_arg_without_init": (["plan", "new", "--init-arg", "a=1"], ["--init-arg needs --init"]),
  "init_arg_not_name_value": (["plan", "--init", "m:f", "--init-arg", "a"], ["--init-arg", "NAME=VALUE"]),
  "seed_not_a_number": (["plan", "new", "--seed", "one"], ["--seed", "invalid int value"]),
  "gin_with_yaml": (["plan", "new", "--settings", "s.yaml", "--gin_file", "a.gin"], ["--settings", "--gin_file"]),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_name_the_flag_and_exit_2(ckpts, case):
  verb, *rest = USAGE_ERRORS[case][0]
  result = cli(verb, ckpts.old, *rest)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr and result.stdout == "", result
  assert result.stderr.startswith(f"usage: flax-warmstart {verb}"), result.stderr
  for fragment in USAGE_ERRORS[case][1]:
    assert fragment in result.stderr, (fragment, result.stderr)


@pytest.mark.parametrize("flag", ["-q", "--quiet", "-v", "--verbose"])
def test_global_flags_are_accepted_after_the_verb(ckpts, flag):
  before = cli(flag, "plan", ckpts.old, ckpts.new, "--settings", ckpts.yaml)
  after = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.yaml, flag)
  assert_ok(before)
  assert_ok(after)
  assert before.stdout == after.stdout


# inspect


def test_inspect_manager_root_lists_names_shapes_dtypes_bytes_and_step(ckpts):
  result = cli("inspect", ckpts.old)
  assert_ok(result)
  header = result.stdout.splitlines()[0]
  assert "@step 2" in header, header
  assert f"{len(OLD_VARS) + 1} variables" in header, header  # + step
  total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in OLD_VARS.values())
  assert f"{total + 8} B" in header or f"{total + 4} B" in header, header  # the step is an int64 or int32
  rows = table_rows(result.stdout)
  assert set(rows) == {*OLD_VARS, "step"}, sorted(rows)
  for name, (shape, dtype) in OLD_VARS.items():
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [name])
    assert re.search(rf"^{re.escape(name)}\s+{re.escape(str(shape))}\s+{dtype}\s+{nbytes} B$", line), line
  assert rows["step"][-3].startswith("int"), rows["step"]


def test_inspect_filter_restricts_the_rows(ckpts):
  result = cli("inspect", ckpts.old, "--filter", "^head/")
  assert_ok(result)
  assert set(table_rows(result.stdout)) == set(HEAD_NAMES), result.stdout
  assert "6 variables" in result.stdout.splitlines()[0], result.stdout


def test_inspect_json(ckpts):
  result = cli("inspect", ckpts.old, "--json")
  assert_ok(result)
  info = json.loads(result.stdout)
  assert info["step"] == 2
  assert info["checkpoint"] == ckpts.old
  got = {v["name"]: (tuple(v["shape"]), v["dtype"]) for v in info["variables"]}
  assert {k: v for k, v in got.items() if k != "step"} == OLD_VARS
  assert got["step"][0] == () and got["step"][1].startswith("int"), got["step"]
  for v in info["variables"]:
    assert v["bytes"] == int(np.prod(v["shape"])) * np.dtype(v["dtype"]).itemsize, v
  assert info["bytes"] == sum(v["bytes"] for v in info["variables"])
  assert [v["name"] for v in info["variables"]] == sorted(got)


def test_inspect_missing_path_is_a_user_error(ckpts):
  missing = ckpts.root / "no_such_checkpoint"
  assert_user_error(cli("inspect", missing), str(missing), "does not exist")


def test_inspect_invalid_filter_regex_is_a_user_error(ckpts):
  assert_user_error(cli("inspect", ckpts.old, "--filter", "encoder/(kernel"))


# diff


def test_diff_text(ckpts):
  result = cli("diff", ckpts.old, ckpts.new)
  assert_ok(result)
  out = result.stdout
  assert "2 names match in shape and dtype" in out, out  # opt_state/0/count and step
  assert "shape differs: head/kernel: (4, 2) -> (4, 3)" in out, out
  assert "shape differs: head/bias: (2,) -> (3,)" in out, out
  for name in ENCODER_NAMES:
    assert re.search(rf"only in OLD:\s+{re.escape(name)} \(", out), (name, out)
  for name in BACKBONE_NAMES:
    assert re.search(rf"only in NEW:\s+{re.escape(name)} \(", out), (name, out)
  assert re.search(r"only in NEW:\s+backbone/kernel \(3, 4\) \(closest in OLD: encoder/kernel\b", out), out
  assert re.search(r"only in NEW:\s+backbone/bias \(4,\) \(closest in OLD: encoder/bias\b", out), out
  assert "dtype differs" not in out


def test_diff_json(ckpts):
  result = cli("diff", ckpts.old, ckpts.new, "--json")
  assert_ok(result)
  d = json.loads(result.stdout)
  assert set(d) == {"same", "shape", "dtype", "only_old", "only_new"}, d
  assert sorted(d["same"]) == ["opt_state/0/count", "step"]
  assert d["dtype"] == []
  shapes = {e["name"]: (tuple(e["old"]), tuple(e["new"])) for e in d["shape"]}
  assert set(shapes) == set(HEAD_NAMES)
  assert shapes["head/kernel"] == ((4, 2), (4, 3)) and shapes["head/bias"] == ((2,), (3,))
  assert {e["name"]: tuple(e["shape"]) for e in d["only_old"]} == {n: OLD_VARS[n][0] for n in ENCODER_NAMES}
  only_new = {e["name"]: e for e in d["only_new"]}
  assert set(only_new) == set(BACKBONE_NAMES)
  assert tuple(only_new["backbone/kernel"]["shape"]) == (3, 4)
  for name in BACKBONE_NAMES:
    assert only_new[name]["closest_old"][0] == name.replace("backbone", "encoder"), only_new[name]


# plan


def check_rename_leaves(leaves):
  """The plan of RENAME_YAML: backbone/* copied from encoder/*, head/* kept, the rest copied."""
  assert set(leaves) == {*BACKBONE_NAMES, *HEAD_NAMES, "opt_state/0/count", "step"}, sorted(leaves)
  for name in BACKBONE_NAMES:
    assert leaves[name]["action"] == "load", leaves[name]
    assert leaves[name]["source"] == name.replace("backbone", "encoder"), leaves[name]
  for name in HEAD_NAMES:
    assert leaves[name]["action"] == "keep", leaves[name]
    assert leaves[name]["source"] is None, leaves[name]
  for name in ("opt_state/0/count", "step"):
    assert leaves[name]["action"] == "load", leaves[name]
    assert leaves[name]["source"] == name, leaves[name]


def test_plan_yaml_settings_table(ckpts):
  result = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.yaml)
  assert_ok(result)
  out = result.stdout
  assert out.startswith(f"8 of 14 leaves from {ckpts.old}@step 2"), out
  rows = table_rows(out)
  for name in BACKBONE_NAMES:
    assert rows[name][:2] == ["load", name.replace("backbone", "encoder")], (name, rows[name])
  for name in HEAD_NAMES:
    assert rows[name][0] == "keep", (name, rows[name])
  assert rows["step"][0] == "load" and rows["opt_state/0/count"][0] == "load", out
  assert re.search(r"Unused in .*head/kernel", out), out  # OLD's head is read by nothing


def test_plan_yaml_settings_json(ckpts):
  result = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.yaml, "--json")
  assert_ok(result)
  plan = json.loads(result.stdout)
  check_rename_leaves({leaf["name"]: leaf for leaf in plan["leaves"]})
  assert plan["checkpoints"][0]["step"] == 2
  (source,) = plan["sources"]
  assert source["rename_rules"] == [["backbone/(.*)", "encoder/\\1"], ["head/.*", None]]
  assert source["vars_to_warm_start"] == [".*"]
  assert source["ckpt_to_initialize_from"] == ckpts.old  # OLD, since the file names no checkpoint


def test_plan_json_settings_file(ckpts):
  result = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.json, "--json")
  assert_ok(result)
  check_rename_leaves({leaf["name"]: leaf for leaf in json.loads(result.stdout)["leaves"]})


BAD_SETTINGS = {
  # name: (file name, content or None for no file, fragments the message must hold)
  "missing": ("missing.yaml", None, ["missing.yaml", "does not exist"]),
  "invalid_json": ("bad.json", '{"vars_to_warm_start": [".*"],', ["bad.json", "not valid JSON"]),
  "invalid_yaml": ("bad.yaml", "rename_rules: [\n  - a\n", ["bad.yaml", "not valid YAML"]),
  "yaml_list": ("list.yaml", "- vars_to_warm_start\n- step\n", ["list.yaml", "mapping", "list"]),
  "unknown_field": ("unknown.yaml", 'vars_to_warm_strat: [".*"]\n', ["'vars_to_warm_strat'", "'vars_to_warm_start'"]),
  "bad_value": ("badval.yaml", "step: sometimes\n", ["step", "sometimes", "reset"]),
  # Beyond the obvious: malformed files must not crash either.
  "not_utf8": ("latin1.yaml", b"step: r\xe9set\n", ["latin1.yaml"]),
  "rename_rules_not_a_list": ("rules.yaml", "rename_rules: 5\n", ["rename_rules"]),
  "vocab_info_not_a_mapping": ("vocab.yaml", "var_name_to_vocab_info: {backbone/kernel: 5}\n", ["backbone/kernel"]),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_plan_bad_settings_file_is_a_user_error(ckpts, tmp_path, case):
  filename, content, fragments = BAD_SETTINGS[case]
  path = tmp_path / filename
  if isinstance(content, bytes):
    path.write_bytes(content)
  elif content is not None:
    path.write_text(content)
  assert_user_error(cli("plan", ckpts.old, ckpts.new, "--settings", path), *fragments)


def test_plan_that_cannot_be_carried_out_names_the_missing_tensor(ckpts):
  # Default settings: NEW's backbone/* are not in OLD, and the head changed shape.
  result = cli("plan", ckpts.old, ckpts.new)
  assert_user_error(result, "Cannot warm-start", "'backbone/kernel'", "'backbone/bias'", "no tensor", "head/kernel")


def test_optimizer_reset_is_refused_offline_before_reading(ckpts, tmp_path):
  settings = tmp_path / "reset.yaml"
  settings.write_text("optimizer_state: reset\n")
  result = cli("run", ckpts.old, ckpts.new, str(tmp_path / "out"), "--settings", str(settings))
  assert_user_error(result, "optimizer_state='reset'", "optimizer_state='keep'")
  assert not (tmp_path / "out").exists()


# run


@pytest.fixture(scope="module")
def warm(ckpts):
  """`run` with the rename settings, with paths relative to NEW's directory: a real subprocess (smoke test)."""
  old = os.path.relpath(ckpts.old, ckpts.root)
  result = cli_subprocess("run", old, "new", "warm", "--settings", "rename.yaml", "--no-progress", cwd=ckpts.root)
  return types.SimpleNamespace(result=result, out=ckpts.root / "warm", old=old)


def check_warm_checkpoint(path, ckpts):
  """OUT holds NEW's structure: backbone/* from OLD's encoder/*, head/* from NEW, OLD's step and count."""
  out = restore(path)
  old, new = ckpts.old_state, ckpts.new_state
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(out["params"]["backbone"][leaf], old.params["encoder"][leaf])
    np.testing.assert_array_equal(out["params"]["head"][leaf], new.params["head"][leaf])
    for slot in ("mu", "nu"):
      got = out["opt_state"][0][slot]
      np.testing.assert_array_equal(got["backbone"][leaf], getattr(old.opt_state[0], slot)["encoder"][leaf])
      np.testing.assert_array_equal(got["head"][leaf], getattr(new.opt_state[0], slot)["head"][leaf])
  assert int(out["step"]) == 2
  assert int(out["opt_state"][0]["count"]) == int(old.opt_state[0].count) == 2


def test_run_in_a_subprocess_writes_the_warm_started_checkpoint(warm, ckpts):
  assert_ok(warm.result)
  assert warm.result.stdout.startswith(f"Wrote warm: 8 of 14 leaves from {warm.old}@step 2"), warm.result.stdout
  check_warm_checkpoint(warm.out, ckpts)


def test_run_refuses_an_existing_out(warm, ckpts):
  assert_ok(warm.result)
  before = sorted(os.listdir(warm.out))
  result = cli("run", ckpts.old, ckpts.new, warm.out, "--settings", ckpts.yaml)
  assert_user_error(result, str(warm.out), "--force")
  assert sorted(os.listdir(warm.out)) == before


def test_run_force_overwrites(ckpts, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("from an earlier run")
  result = cli("run", ckpts.old, ckpts.new, out, "--settings", ckpts.json, "--force", "--no-progress", "--json")
  assert_ok(result)
  summary = json.loads(result.stdout)
  assert summary["out"] == str(out)
  assert summary["summary"].startswith("8 of 14 leaves"), summary
  assert not (out / "stale.txt").exists()
  check_warm_checkpoint(out, ckpts)


def test_run_output_can_be_inspected(warm):
  assert_ok(warm.result)
  result = cli("inspect", warm.out, "--json")
  assert_ok(result)
  got = {v["name"]: tuple(v["shape"]) for v in json.loads(result.stdout)["variables"]}
  assert got["backbone/kernel"] == (3, 4) and got["head/kernel"] == (4, 3), got
  assert set(got) == {*BACKBONE_NAMES, *HEAD_NAMES, "opt_state/0/count", "step"}, sorted(got)


def test_info_lines_show_on_stderr_and_quiet_silences_them(ckpts, tmp_path):
  result = cli("run", ckpts.old, ckpts.new, tmp_path / "out", "--settings", ckpts.yaml, "--no-progress")
  assert_ok(result)
  assert re.search(r"^INFO flax_warmstart: Warm-started 8 of 14 leaves", result.stderr, re.M), result.stderr
  assert "Wrote" not in result.stderr and result.stdout.startswith("Wrote"), result
  quiet = cli("run", ckpts.old, ckpts.new, tmp_path / "quiet", "--settings", ckpts.yaml, "--no-progress", "-q")
  assert_ok(quiet)
  assert quiet.stderr == "" and quiet.stdout.startswith("Wrote"), quiet


def test_warnings_show_on_stderr(ckpts, tmp_path):
  settings = tmp_path / "other.yaml"
  settings.write_text(RENAME_YAML + "ckpt_to_initialize_from: /somewhere/else\n")
  result = cli("plan", ckpts.old, ckpts.new, "--settings", settings)
  assert_ok(result)
  assert re.search(r"^WARNING flax_warmstart: .*ckpt_to_initialize_from=/somewhere/else", result.stderr, re.M), result
  assert cli("plan", ckpts.old, ckpts.new, "--settings", settings, "-q").stderr == ""


# Vocabulary remap through a settings file.


def test_vocab_plan_json(ckpts):
  result = cli("plan", ckpts.vold, ckpts.vnew, "--settings", ckpts.vocab_json, "--json")
  assert_ok(result)
  (leaf,) = json.loads(result.stdout)["leaves"]
  assert leaf["name"] == "embedder/embedding" and leaf["action"] == "load", leaf
  assert leaf["source_shape"] == [3, 2] and leaf["shape"] == [4, 2], leaf
  assert leaf["vocab"]["copied"] == 3 and leaf["vocab"]["new"] == 1 and leaf["vocab"]["oov"] == 0, leaf


def test_vocab_run(ckpts, tmp_path):
  out = tmp_path / "vout"
  result = cli("run", ckpts.vold, ckpts.vnew, out, "--settings", ckpts.vocab_json, "--no-progress")
  assert_ok(result)
  table = restore(out)["params"]["embedder"]["embedding"]
  rows = {tok: ckpts.old_table[OLD_VOCAB.index(tok)] for tok in OLD_VOCAB}
  expected = np.stack([rows.get(tok, np.full(2, 0.5, np.float32)) for tok in NEW_VOCAB])
  np.testing.assert_array_equal(table, expected)


# The new model from code: --init module:function (conftest.INIT_MODULE_SOURCE), --init-arg, --seed.


def fresh_state(seed=0, **kwargs):
  """What `--init fws_cli_model:create_state` computes with `--seed seed`."""
  return init_module_namespace()["create_state"](jax.random.key(seed), **kwargs)


@functools.cache
def init_module_namespace():
  namespace = {}
  exec(INIT_MODULE_SOURCE, namespace)  # noqa: S102 (the test's own model source)
  return namespace


RENAMED = ["--init-arg", "encoder_name='backbone'", "--init-arg", "outputs=3"]


def test_plan_with_init_needs_no_new_checkpoint(ckpts, in_init_dir):
  result = cli("plan", ckpts.old, "--init", f"{INIT_MODULE}:create_state", *RENAMED, "--settings", ckpts.yaml, "--json")
  assert_ok(result)
  check_rename_leaves_init({leaf["name"]: leaf for leaf in json.loads(result.stdout)["leaves"]})


def check_rename_leaves_init(leaves):
  """RENAME_YAML's plan for the abstract state of --init: as with NEW, but the head is computed (init), not kept."""
  assert set(leaves) == {*BACKBONE_NAMES, *HEAD_NAMES, "opt_state/0/count", "step"}, sorted(leaves)
  for name in BACKBONE_NAMES:
    assert (leaves[name]["action"], leaves[name]["source"]) == ("load", name.replace("backbone", "encoder"))
  for name in HEAD_NAMES:
    assert leaves[name]["action"] == "init", leaves[name]


@pytest.fixture
def in_init_dir(init_module, monkeypatch):
  """Runs the test in the directory of the --init module, so `fws_cli_model:create_state` imports."""
  monkeypatch.chdir(init_module.parent)
  return init_module


@pytest.mark.parametrize("form", ["module", "file"])
def test_run_with_init_writes_old_weights_and_the_fresh_head(ckpts, init_module, tmp_path, form):
  spec = f"{INIT_MODULE}:create_state" if form == "module" else f"{init_module}:create_state"
  out = tmp_path / "warm"
  cwd = init_module.parent if form == "module" else tmp_path
  result = cli("run", ckpts.old, out, "--init", spec, *RENAMED, "--settings", ckpts.yaml, "--seed", "3", cwd=cwd)
  assert_ok(result)
  assert result.stdout.startswith(f"Wrote {out}: 8 of 14 leaves from {ckpts.old}@step 2"), result.stdout
  got, old, fresh = restore(out), ckpts.old_state, fresh_state(3, encoder_name="backbone", outputs=3)
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(got["params"]["backbone"][leaf], old.params["encoder"][leaf])
    np.testing.assert_array_equal(got["params"]["head"][leaf], fresh.params["head"][leaf])  # key(--seed)
    np.testing.assert_array_equal(got["opt_state"][0]["mu"]["head"][leaf], np.zeros_like(fresh.params["head"][leaf]))
  assert int(got["step"]) == 2


def test_init_seed_parameter_and_linen_variables(ckpts, in_init_dir, tmp_path):
  # create_variables(seed, ...) takes the seed itself and returns Linen variables: every parameter loads but the head.
  settings = tmp_path / "params.yaml"
  settings.write_text("vars_to_warm_start: 'encoder/'\n")
  out = tmp_path / "warm"
  result = cli(
    "run", ckpts.old, out, "--init", f"{INIT_MODULE}:create_variables", "--seed", "5", "--settings", settings
  )
  assert_ok(result)
  got = restore(out)["params"]
  expected = init_module_namespace()["create_variables"](5)["params"]
  np.testing.assert_array_equal(got["encoder"]["kernel"], ckpts.old_state.params["encoder"]["kernel"])
  np.testing.assert_array_equal(got["head"]["kernel"], expected["head"]["kernel"])


def test_init_makes_optimizer_reset_possible(ckpts, in_init_dir, tmp_path):
  # With NEW the reset is refused (a checkpoint has no optimizer); --init's TrainState carries one.
  settings = tmp_path / "reset.yaml"
  settings.write_text("vars_to_warm_start: ['.*']\noptimizer_state: reset\nstep: reset\n")
  out = tmp_path / "warm"
  result = cli("run", ckpts.old, out, "--init", f"{INIT_MODULE}:create_state", "--init-arg", "optimizer=sgd",
               "--settings", settings)  # fmt: skip
  assert_ok(result)
  got, old = restore(out), ckpts.old_state
  np.testing.assert_array_equal(got["params"]["encoder"]["kernel"], old.params["encoder"]["kernel"])
  trace = got["opt_state"][0]["trace"]  # sgd with momentum, fresh: zeros
  assert all(not np.any(x) for x in jax.tree_util.tree_leaves(trace)), trace
  assert int(got["step"]) == 0


def test_optimizer_reset_with_new_suggests_init(ckpts, tmp_path):
  settings = tmp_path / "reset.yaml"
  settings.write_text("optimizer_state: reset\n")
  assert_user_error(cli("plan", ckpts.old, ckpts.new, "--settings", settings), "optimizer_state='keep'", "--init")


def test_abstract_init_plans_and_runs_when_everything_loads(ckpts, in_init_dir, tmp_path):
  spec = f"{INIT_MODULE}:abstract_state"
  assert_ok(cli("plan", ckpts.old, "--init", spec, *RENAMED[:2], "--settings", ckpts.yaml))
  # The head is not loaded and an abstract state cannot compute it: one clear error, nothing written.
  result = cli("run", ckpts.old, tmp_path / "warm", "--init", spec, *RENAMED, "--settings", ckpts.yaml)
  assert_user_error(result, "--init fws_cli_model:abstract_state", "abstract", "'head/kernel'", "initialised state")
  assert not (tmp_path / "warm").exists()
  # Same model: every leaf loads from OLD.
  settings = tmp_path / "all.yaml"
  settings.write_text("vars_to_warm_start: ['.*']\n")
  out = tmp_path / "all"
  assert_ok(cli("run", ckpts.old, out, "--init", spec, "--settings", settings))
  assert_trees_equal_np(restore(out)["params"], ckpts.old_state.params)


def assert_trees_equal_np(a, b):
  assert jax.tree_util.tree_structure(dict(a)) == jax.tree_util.tree_structure(dict(b))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


INIT_ERRORS = {
  # name: (--init, extra arguments, fragments of the one-line message)
  "no_colon": ("fws_cli_model.create_state", [], ["is not MODULE:FUNCTION", "my_model:create_state"]),
  "no_module": ("no_such_model:create", [], ["no module named 'no_such_model'", "PYTHONPATH", "file.py:function"]),
  "no_file": ("missing/model.py:create", [], ["missing/model.py is not a file"]),
  "no_function": ("fws_cli_model:create_stat", [], ["has no 'create_stat'", "Did you mean create_state"]),
  "not_callable": ("fws_cli_model:NOT_A_FUNCTION", [], ["NOT_A_FUNCTION is a int"]),
  "unknown_arg": ("fws_cli_model:create_state", ["--init-arg", "width=3"], ["'width'", "encoder_name", "--init-arg"]),
  "missing_arg": ("numpy:full", ["--init-arg", "shape=2"], ["missing a required argument: 'fill_value'", "--init-arg"]),
  "it_raises": ("fws_cli_model:fails", [], ["--init fws_cli_model:fails failed", "RuntimeError", "not mounted", "-v"]),
  "import_fails": ("broken.py:create", [], ["importing broken.py failed", "SyntaxError"]),
}


@pytest.mark.parametrize("case", list(INIT_ERRORS))
def test_init_errors_are_one_line_user_errors(ckpts, in_init_dir, case):
  (in_init_dir.parent / "broken.py").write_text("def create(:\n")
  spec, extra, fragments = INIT_ERRORS[case]
  assert_user_error(cli("plan", ckpts.old, "--init", spec, *extra), *fragments)


def test_init_failure_traceback_with_verbose(ckpts, in_init_dir):
  result = cli("plan", ckpts.old, "--init", f"{INIT_MODULE}:fails", "-v")
  assert result.returncode == 1, result
  assert "Traceback" in result.stderr and "the dataset is not mounted" in result.stderr, result.stderr


def test_init_module_imports_leave_sys_path_as_it_was(ckpts, in_init_dir):
  before = sys.path[:]
  assert_ok(cli("plan", ckpts.old, "--init", f"{INIT_MODULE}:create_state"))
  assert sys.path == before


# OUT: an Orbax checkpoint with the plan's provenance, opened as the README says.


def test_out_holds_provenance_and_opens_with_standard_checkpointer(ckpts, in_init_dir, tmp_path):
  import flax_warmstart as fws

  out = tmp_path / "warm"
  argv = ["run", ckpts.old, out, "--init", f"{INIT_MODULE}:create_state", *RENAMED, "--settings", ckpts.yaml]
  assert_ok(cli(*argv, "--seed", "7"))
  record = fws.load_provenance(out)
  assert record["leaves"]["backbone/kernel"] == {"action": "load", "source": "encoder/kernel", "checkpoint": 0}
  assert record["leaves"]["head/kernel"]["action"] == "init"
  assert record["seed"] == 7 and record["command"].startswith("flax-warmstart run "), record
  assert "--init fws_cli_model:create_state" in record["command"], record
  # As the README says: the abstract state of the same model restores it.
  abstract = jax.eval_shape(lambda: fresh_state(0, encoder_name="backbone", outputs=3))
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.fspath(out), abstract)
  np.testing.assert_array_equal(state.params["backbone"]["kernel"], ckpts.old_state.params["encoder"]["kernel"])
  assert int(state.step) == 2


def test_out_as_a_checkpoint_manager_root(ckpts, tmp_path):
  import flax_warmstart as fws

  out = tmp_path / "run"
  result = cli("run", ckpts.old, ckpts.new, out, "--settings", ckpts.yaml, "--manager", "--json")
  assert_ok(result)
  assert json.loads(result.stdout)["step"] == 2  # the state's step, loaded from OLD
  with ocp.CheckpointManager(os.fspath(out)) as mgr:
    assert mgr.all_steps() == [2]
    restored = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
  np.testing.assert_array_equal(restored["params"]["backbone"]["kernel"], ckpts.old_state.params["encoder"]["kernel"])
  assert fws.load_provenance(out)["leaves"]["backbone/bias"]["source"] == "encoder/bias"
  text = cli("run", ckpts.old, ckpts.new, out, "--settings", ckpts.yaml, "--manager", "--force")
  assert_ok(text)
  assert text.stdout.startswith(f"Wrote {out} (CheckpointManager step 2): 8 of 14 leaves"), text.stdout


# --seed: random backup initializers on the command line.


def test_random_backup_initializer_uses_the_seed(ckpts, tmp_path):
  settings = json.loads(ckpts.vocab_json.read_text())
  settings["var_name_to_vocab_info"]["embedder/embedding"]["backup_initializer"] = {"normal": 0.02}
  path = tmp_path / "normal.json"
  path.write_text(json.dumps(settings))
  tables = {}
  for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
    assert_ok(cli("run", ckpts.vold, ckpts.vnew, tmp_path / name, "--settings", path, "--seed", seed))
    tables[name] = restore(tmp_path / name)["params"]["embedder"]["embedding"]
  new_row = NEW_VOCAB.index("z")
  np.testing.assert_array_equal(tables["a"], tables["b"])  # reproducible
  assert not np.array_equal(tables["a"][new_row], tables["c"][new_row])
  assert 0 < np.abs(tables["a"][new_row]).max() < 0.2
  np.testing.assert_array_equal(tables["a"][NEW_VOCAB.index("a")], ckpts.old_table[0])


# The demo's --keep directory, twice.


def run_demo_in_process(*args):
  from flax_warmstart import demo

  root, ours = logging.getLogger(), logging.getLogger("flax_warmstart")
  saved = root.handlers[:], root.level, ours.level
  try:
    return demo.main(list(args))
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


def test_demo_keep_reruns_cleanly(tmp_path, capsys):
  # An earlier run's directory (a CheckpointManager root with another step) is replaced, not added to.
  with ocp.CheckpointManager(os.fspath(tmp_path / "old_run")) as mgr:
    mgr.save(5, args=ocp.args.StandardSave({"w": np.ones(2, np.float32)}))
  assert run_demo_in_process("--keep", os.fspath(tmp_path), "--steps", "1") == 0
  assert "Traceback" not in capsys.readouterr().err
  with ocp.CheckpointManager(os.fspath(tmp_path / "old_run")) as mgr:
    assert mgr.all_steps() == [1]


@pytest.mark.slow
def test_demo_keep_reruns_cleanly_with_the_same_step(tmp_path):
  # As a user reruns it: a fresh process each time, and the step directory exists already (was StepAlreadyExistsError).
  for _ in range(2):
    again = subprocess.run(
      [sys.executable, "-m", "flax_warmstart.demo", "--keep", tmp_path, "--steps", "1"],
      capture_output=True,
      text=True,
      timeout=300,
      env=ENV,
    )
    assert_ok(again)
    assert "computes the same features as the old one: True" in again.stdout, again.stdout
  with ocp.CheckpointManager(os.fspath(tmp_path / "old_run")) as mgr:
    assert mgr.all_steps() == [1]
