"""The `flax-warmstart` command line: inspect, diff, plan and run warm starts offline.

Examples:
  flax-warmstart inspect /runs/old --filter 'encoder/.*'
  flax-warmstart diff /runs/old /runs/new
  flax-warmstart plan /runs/old --init my_model:create_state --settings settings.yaml
  flax-warmstart run /runs/old /runs/warm --init my_model:create_state --gin_file finetune.gin
  flax-warmstart run /runs/old /runs/new /runs/warm --settings settings.json

The new model comes either as NEW, a checkpoint of its fresh init, or as
`--init module:function` (or `path/to/file.py:function`): a function returning
the new state (a TrainState, Linen variables, params, an NNX state), called
with the `--init-arg`s; a parameter named `rng` or `key` gets
`jax.random.key(--seed)`, one named `seed` the seed itself.

Exit codes: 0 success, 1 a request that cannot be carried out (the message
says why), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import yaml

from flax_warmstart._src.errors import WarmStartError, closest_names, install_extra
from flax_warmstart._src.execute import execute, execute_leaves, progress
from flax_warmstart._src.init_from_code import cwd_importable, load_init, new_model
from flax_warmstart._src.naming import flatten_state
from flax_warmstart._src.planning import bind_leaves, build_plan, check_can_reset
from flax_warmstart._src.report import human_bytes
from flax_warmstart._src.rows import Action, is_step
from flax_warmstart._src.settings import WarmStartSettings
from flax_warmstart._src.sources import open_source
from flax_warmstart._src.sources.orbax import locate
from flax_warmstart._src.state import tree_of

logger = logging.getLogger("flax_warmstart")

EXIT_CODES = (
  "exit codes: 0 success, 1 the request cannot be carried out (one line says why), 2 usage error, 130 interrupted."
)

EPILOG = f"""examples:
  flax-warmstart inspect /runs/old --filter 'encoder/.*'
  flax-warmstart diff /runs/old /runs/new
  flax-warmstart plan /runs/old --init my_model:create_state --settings settings.yaml
  flax-warmstart run /runs/old /runs/warm --init my_model.py:create_state --init-arg vocab_size=32128
  flax-warmstart run /runs/old /runs/warm --init my_model:create_state \\
      --gin_file finetune.gin --gin_bindings 'NEW_VOCAB = "/data/new.vocab"' --seed 1
  flax-warmstart run /runs/old /runs/new /runs/warm --settings settings.json

The new model: NEW, a checkpoint of its fresh init, or --init module:function
(or path/to/file.py:function), a function returning the new state or its
abstract form; --init-arg NAME=VALUE passes arguments (Python literals, else
strings), a parameter named rng or key gets jax.random.key(--seed), one named
seed the seed. Only the leaves not loaded from OLD are computed.

Settings: --settings FILE (JSON or YAML with WarmStartSettings fields, or .gin),
or Gin as T5X takes it: --gin_file (repeatable), --gin_bindings (repeatable),
with %INITIAL_CHECKPOINT and %INITIAL_CHECKPOINT_PATH bound to OLD unless given.
A YAML settings file, e.g.
  vars_to_warm_start: [".*"]
  var_name_to_prev_var_name: {{backbone/kernel: encoder/kernel}}
  optimizer_state: reset

OUT is an Orbax checkpoint directory (StandardCheckpointer().restore(OUT,
abstract_state)), or with --manager a CheckpointManager root holding one step;
either way with the plan's provenance (flax_warmstart.load_provenance(OUT)).
Warnings and INFO lines (what was loaded, cast, remapped) go to stderr; -q
silences them.

{EXIT_CODES}"""

CHECKPOINT_FORMS = (
  "a CheckpointManager root (latest step), a step or checkpoint directory, or a checkpoint of another format"
  " (Flax msgpack, T5X, TensorFlow, safetensors, npz)"
)
VERBOSITY = {"-q": 0, "default": 1, "-v": 2}


@functools.cache
def _version() -> str:
  from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

  from flax_warmstart import __version__  # noqa: PLC0415 (the package imports this module lazily)

  found = []
  for dist in ("jax", "flax", "orbax-checkpoint"):
    try:
      found.append(f"{dist} {version(dist)}")
    except PackageNotFoundError:
      continue
  return f"flax-warmstart {__version__} ({', '.join(found)})"


def _global_flags(parser: argparse.ArgumentParser, *, in_verb: bool) -> None:
  """-v, -q and --version, before the verb and after it (there without defaults, so they do not override)."""
  default = argparse.SUPPRESS if in_verb else VERBOSITY["default"]
  parser.add_argument(
    "-v",
    "--verbose",
    dest="verbosity",
    action="store_const",
    const=VERBOSITY["-v"],
    default=default,
    help="also DEBUG lines, and the traceback when --init's code fails",
  )
  parser.add_argument(
    "-q",
    "--quiet",
    dest="verbosity",
    action="store_const",
    const=VERBOSITY["-q"],
    default=default,
    help="no warnings or INFO lines on stderr (errors still show)",
  )
  parser.add_argument("--version", action="version", version=_version(), help="show the versions and exit")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="flax-warmstart",
    description="Inspect checkpoints and warm-start a new model from an old checkpoint, offline.",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _global_flags(parser, in_verb=False)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def verb(name: str, help_: str, description: str, *positionals: tuple[str, str, str | None]) -> Any:
    p = sub.add_parser(
      name,
      help=help_,
      description=textwrap.fill(description, 79),
      epilog=f"`flax-warmstart --help` shows examples.\n{EXIT_CODES}",
      formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for metavar, text, nargs in positionals:
      p.add_argument(metavar.lower(), metavar=metavar, nargs=nargs, help=text)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _global_flags(p, in_verb=True)
    verbs[name] = p
    return p

  verbs: dict[str, argparse.ArgumentParser] = {}
  parser.set_defaults(verbs=verbs)

  old = ("OLD", f"the checkpoint to warm-start from: {CHECKPOINT_FORMS}", None)
  new = (
    "NEW",
    "a checkpoint of the new model's fresh init: its structure, shapes and dtypes, and the values of the leaves not"
    " loaded from OLD (or give --init instead)",
    "?",
  )
  out = (
    "OUT",
    "the directory to write the warm-started state to, as an Orbax checkpoint with the plan's provenance (see"
    " --manager)",
    None,
  )
  p = verb(
    "inspect",
    "names, shapes, dtypes and bytes of a checkpoint",
    "List a checkpoint's tensors under the names the settings use.",
    ("CKPT", f"the checkpoint: {CHECKPOINT_FORMS}", None),
  )
  p.add_argument("--filter", metavar="REGEX", help="only names that re.search this regex")
  p.add_argument("--item", help="item of a step directory with several items")
  p.add_argument("--step", type=_step_arg, help="step of a directory of steps: a number, or min:METRIC / max:METRIC")
  verb(
    "diff",
    "compare the names, shapes and dtypes of two checkpoints",
    "Compare two checkpoints' names, shapes and dtypes (metadata only).",
    ("OLD", f"the first checkpoint: {CHECKPOINT_FORMS}", None),
    ("NEW", "the second checkpoint", None),
  )
  plan = verb(
    "plan",
    "show what a warm start of the new model from OLD would do",
    "Show, from metadata only, what each leaf of the new model would do: load (from which tensor of OLD), keep,"
    " init or reset. Nothing is read or written.",
    old,
    new,
  )
  run = verb(
    "run",
    "warm-start the new model from OLD offline and write it to OUT",
    "Warm-start the new model from OLD and write the result to OUT, an Orbax checkpoint directory that"
    " StandardCheckpointer().restore(OUT, abstract_state) reads (with --manager, a CheckpointManager root of one"
    " step), holding the plan's provenance (flax_warmstart.load_provenance(OUT)).",
    old,
    new,
    out,
  )
  run.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  run.add_argument(
    "--manager",
    action="store_true",
    help="write OUT as a CheckpointManager root with one step (the state's step, or 0), not a single checkpoint",
  )
  run.add_argument(
    "--allow-empty",
    action="store_true",
    help="write OUT even when the settings load no leaf from OLD (OUT would be the fresh new model)",
  )
  run.add_argument("--no-progress", action="store_true", help="no progress display")
  for p in (plan, run):
    new_model = p.add_argument_group("the new model without a checkpoint (instead of NEW)")
    new_model.add_argument(
      "--init",
      metavar="MODULE:FUNCTION",
      help="a function returning the new state or its abstract form, as module:function (imported from the current"
      " directory or PYTHONPATH) or path/to/file.py:function",
    )
    new_model.add_argument(
      "--init-arg",
      metavar="NAME=VALUE",
      action="append",
      type=_init_arg,
      default=[],
      help="an argument of --init's function (repeatable); VALUE is a Python literal, else a string",
    )
    p.add_argument(
      "--seed",
      type=int,
      default=0,
      help="seed of the random key for random backup initializers, and for --init's rng or key parameter (default 0)",
    )
    p.add_argument(
      "--step",
      type=_step_arg,
      help="step of OLD when it is a directory of steps (a number, or min:METRIC / max:METRIC); overrides the"
      " settings' ckpt_step",
    )
    settings = p.add_argument_group("settings")
    settings.add_argument(
      "--settings", metavar="FILE", help="WarmStartSettings as JSON, YAML or Gin (.gin, needs the gin extra)"
    )
    settings.add_argument(
      "--gin_file",
      metavar="FILE",
      action="append",
      default=[],
      help="a Gin file binding flax_warmstart.WarmStartSettings (repeatable; configurables of other libraries, such"
      " as T5X's, are skipped)",
    )
    settings.add_argument(
      "--gin_bindings",
      metavar="BINDING",
      action="append",
      default=[],
      help="a Gin binding applied after the files (repeatable), e.g. 'NEW_VOCAB = \"/data/new.vocab\"'",
    )
    settings.add_argument(
      "--gin_search_paths",
      metavar="DIR",
      action="append",
      default=[],
      help="directories (comma-separated, repeatable) where Gin files and their includes are looked up",
    )
  return parser


def _step_arg(text: str) -> int | str:
  return int(text) if text.isdigit() else text


def _init_arg(text: str) -> tuple[str, Any]:
  """`NAME=VALUE` of --init-arg: VALUE a Python literal (`3`, `[1, 2]`, `'a'`), else the string itself."""
  name, sep, value = text.partition("=")
  name = name.strip()
  if not sep or not name.isidentifier():
    raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. --init-arg vocab_size=32128)")
  try:
    return name, ast.literal_eval(value.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return name, value


def load_settings(
  path: str | None,
  old: str,
  *,
  gin_files: Sequence[str] = (),
  gin_bindings: Sequence[str] = (),
  gin_search_paths: Sequence[str] = (),
) -> WarmStartSettings:
  """WarmStartSettings from a JSON, YAML or Gin file, or Gin files and bindings; OLD is the checkpoint read.

  Args:
    path: The settings file, or None.
    old: The checkpoint to warm-start from; it wins over the file's
      `ckpt_to_initialize_from`, and Gin's `%INITIAL_CHECKPOINT` and
      `%INITIAL_CHECKPOINT_PATH` are bound to it unless given.
    gin_files: Gin files, parsed after a `.gin` `path`.
    gin_bindings: Gin bindings, applied after the files.
    gin_search_paths: Where Gin looks up files and includes.

  Returns:
    The settings (the defaults when nothing is given).

  Raises:
    WarmStartError: If a file is missing, unreadable or invalid.

  Examples:
    >>> load_settings(None, "/runs/old").vars_to_warm_start
    '.*'
  """
  gin_given = bool(gin_files or gin_bindings)
  if path is not None and (path.endswith(".gin") or gin_given):
    if not path.endswith(".gin"):
      raise WarmStartError(
        f"--settings {path} is not a .gin file, so it cannot be combined with --gin_file or --gin_bindings: give the"
        " settings in one form."
      )
    gin_files, path = [path, *gin_files], None
  if gin_given or gin_files:
    return _settings_from_gin(old, gin_files, gin_bindings, gin_search_paths)
  if path is None:
    return WarmStartSettings(old)
  if not os.path.isfile(path):
    raise WarmStartError(f"Settings file {path} does not exist.")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as err:
    raise WarmStartError(f"Settings file {path} is not UTF-8 text: {err}") from None
  try:
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
  except (ValueError, yaml.YAMLError) as err:
    raise WarmStartError(
      f"Settings file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}"
    ) from None
  if data is None:
    data = {}
  if not isinstance(data, dict):
    raise WarmStartError(
      f"Settings file {path} must hold a mapping of WarmStartSettings fields, not {type(data).__name__}."
    )
  data = dict(data)
  given = data.get("ckpt_to_initialize_from")
  if given and os.fspath(given) != os.fspath(old):
    logger.warning(
      "Settings file %s names ckpt_to_initialize_from=%s; reading OLD=%s as the command line says.", path, given, old
    )
  data["ckpt_to_initialize_from"] = old
  return WarmStartSettings.from_dict(data)


def _settings_from_gin(
  old: str, files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]
) -> WarmStartSettings:
  """Gin files and bindings parsed into a fresh Gin config, as T5X's launcher takes them.

  The config stays bound until the command ends, so that a `@gin.configurable`
  `--init` function takes its arguments from it.
  """
  try:
    import gin  # noqa: PLC0415 (optional extra)

    from flax_warmstart.gin import settings_from_gin  # noqa: PLC0415
  except ImportError:
    raise WarmStartError(
      f"--gin_file, --gin_bindings and .gin settings need gin-config, which is not installed: {install_extra('gin', 'gin-config')}."
    ) from None
  gin.clear_config()  # cleared again when the command ends (`_fresh_gin`)
  return settings_from_gin(
    list(files),
    old,
    bindings=bindings,
    search_paths=[p for given in search_paths for p in given.split(",") if p],
  )


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
  ckpt = open_source(args.ckpt, item=args.item, step=args.step)
  try:
    regex = re.compile(args.filter) if args.filter else None
  except re.error as err:
    raise WarmStartError(f"--filter {args.filter!r} is not a valid regex: {err}.") from None
  rows = [
    {"name": v.name, "shape": list(v.shape), "dtype": str(v.dtype), "bytes": _nbytes(v)}
    for v in sorted(ckpt.variables.values(), key=lambda v: v.name)
    if regex is None or regex.search(v.name)
  ]
  return {
    "checkpoint": args.ckpt,
    "path": ckpt.location,
    "step": ckpt.step,
    "variables": rows,
    "bytes": sum(r["bytes"] for r in rows),
  }


def _nbytes(v: Any) -> int:
  return int(np.prod(v.shape, dtype=np.int64)) * (v.dtype.itemsize if v.dtype.kind != "O" else 0)


def _print_inspect(info: dict[str, Any]) -> None:
  step = f"@step {info['step']}" if info["step"] is not None else ""
  print(f"{info['checkpoint']}{step}: {len(info['variables'])} variables, {human_bytes(info['bytes'])}")
  _print_table(
    [(r["name"], str(tuple(r["shape"])), r["dtype"], human_bytes(r["bytes"])) for r in info["variables"]],
    ("name", "shape", "dtype", "bytes"),
  )


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
  widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
  for row in (header, *rows):
    print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _diff(args: argparse.Namespace) -> dict[str, Any]:
  old = open_source(args.old).variables
  new = open_source(args.new).variables
  out: dict[str, Any] = {"same": [], "shape": [], "dtype": [], "only_old": [], "only_new": []}
  for name in sorted(set(old) | set(new)):
    if name not in new:
      out["only_old"].append({"name": name, "shape": list(old[name].shape)})
    elif name not in old:
      out["only_new"].append(
        {"name": name, "shape": list(new[name].shape), "closest_old": closest_names(name, set(old) - set(new))}
      )
    elif old[name].shape != new[name].shape:
      out["shape"].append({"name": name, "old": list(old[name].shape), "new": list(new[name].shape)})
    elif old[name].dtype != new[name].dtype:
      out["dtype"].append({"name": name, "old": str(old[name].dtype), "new": str(new[name].dtype)})
    else:
      out["same"].append(name)
  return out


def _print_diff(d: dict[str, Any]) -> None:
  n = len(d["same"])
  print(f"{n} {'name matches' if n == 1 else 'names match'} in shape and dtype.")
  for e in d["shape"]:
    print(f"shape differs: {e['name']}: {tuple(e['old'])} -> {tuple(e['new'])}")
  for e in d["dtype"]:
    print(f"dtype differs: {e['name']}: {e['old']} -> {e['new']}")
  for e in d["only_old"]:
    print(f"only in OLD:   {e['name']} {tuple(e['shape'])}")
  for e in d["only_new"]:
    hint = f" (closest in OLD: {', '.join(e['closest_old'])})" if e["closest_old"] else ""
    print(f"only in NEW:   {e['name']} {tuple(e['shape'])}{hint}")


def _settings(args: argparse.Namespace) -> WarmStartSettings:
  settings = load_settings(
    args.settings,
    args.old,
    gin_files=args.gin_file,
    gin_bindings=args.gin_bindings,
    gin_search_paths=args.gin_search_paths,
  )
  if args.step is not None:
    settings = dataclasses.replace(settings, ckpt_step=args.step)
  return settings


def _plan(args: argparse.Namespace) -> tuple[Any, Any, Any]:
  """The plan for the new model from OLD: `(plan, NEW's source or the NewModel, settings)`."""
  if args.init:
    init_fn = load_init(args.init, args.init_arg, args.seed)  # imported before Gin parses: its configurables count
    settings = _settings(args)
    model = new_model(args.init, init_fn, verbose=args.verbosity >= VERBOSITY["-v"])
    from flax_warmstart._src.api import plan as plan_state  # noqa: PLC0415

    return plan_state(model.state, settings), model, settings
  settings = _settings(args)
  if settings.optimizer_state == "reset":
    try:
      check_can_reset(None)  # refused before anything is read: a checkpoint holds no optimizer
    except WarmStartError as err:
      raise WarmStartError(
        f"{err} Or give the new model with --init module:function, returning a TrainState with its optimizer."
      ) from None
  new = open_source(args.new)
  old = open_source(args.old, item=settings.ckpt_item, prefer_names=list(new.variables), step=settings.ckpt_step)
  variables = list(new.variables.values())
  leaves = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]
  return bind_leaves(build_plan(variables, leaves, old, settings), leaves, abstract_is_init=False), new, settings


def _check_out(out: str, old: str, new: str | None, force: bool) -> str:
  """Refuses an OUT that would harm OLD or NEW or that cannot be written, before anything is read or written."""
  if not out:
    raise WarmStartError("OUT is empty: give the directory to write the warm-started checkpoint to.")
  if "://" in out:
    return out
  target = os.path.realpath(out)
  for label, given in (("OLD", old), ("NEW", new)):
    if given is None or "://" in given:
      continue
    inputs = {os.path.realpath(given)}
    try:
      inputs.add(os.path.realpath(os.fspath(locate(given)[0])))
    except WarmStartError:
      pass  # reported when the checkpoint is read
    for src in inputs:
      if target == src or target.startswith(src + os.sep) or src.startswith(target + os.sep):
        raise WarmStartError(
          f"OUT {out} is {'the same as' if target == src else 'inside or around'} {label} ({given}): writing it"
          f" would {'replace' if target == src or src.startswith(target + os.sep) else 'change'} the checkpoint"
          " being read. Choose an OUT outside both checkpoints."
        )
  if os.path.exists(target):
    if not force:
      raise WarmStartError(f"{out} exists; pass --force to overwrite it.")
    if not os.path.isdir(target):
      raise WarmStartError(f"OUT {out} is a file; give a directory to write the checkpoint to.")
  parent = os.path.dirname(target)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WarmStartError(f"Cannot write OUT {out}: {parent} is a file, not a directory.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WarmStartError(f"Cannot write OUT {out}: no permission to write in {parent}.")
  return target


def _run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  out = _check_out(args.out, args.old, args.new, args.force)
  plan, new, _ = _plan(args)
  if not plan.loaded and not args.allow_empty:
    fresh = f"the fresh state of --init {args.init}" if args.init else "a copy of NEW"
    raise WarmStartError(
      f"The settings load no leaf from {args.old}, so OUT would be {fresh}; nothing was written."
      " Check vars_to_warm_start (flax-warmstart plan shows what each leaf does), or pass --allow-empty."
    )
  rng = jax.random.key(args.seed)
  with progress(not args.no_progress) as step:
    if args.init:
      if new.init_fn is None and new.abstract:
        _refuse_abstract_without_init(plan, args.init, args.old)
      step(f"warm-starting from {args.old} ({human_bytes(plan.nbytes)})")
      state = execute(plan, new.state, rng=rng, init_fn=new.init_fn, show_progress=False)
      tree = tree_of(state)
    else:
      step(f"reading {args.new}")
      restored = new.restore(dict.fromkeys(new.variables))
      # The live state is NEW's tree, its leaves host arrays named as in NEW's metadata.
      leaves = [restored[name] for name in new.variables]
      step(f"warm-starting from {args.old} ({human_bytes(plan.nbytes)})")
      leaves = execute_leaves(plan, leaves, rng=rng, update=step)
      tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(new.tree), leaves)
    step(f"writing {args.out}")
    record = plan.provenance() | {"command": shlex.join(["flax-warmstart", *argv]), "seed": args.seed}
    step_number = _write(out, tree, record, manager=args.manager, force=args.force, shown=args.out)
  result = {"out": args.out, "summary": plan.summary()}
  if step_number is not None:
    result["step"] = step_number
  return result


def _refuse_abstract_without_init(plan: Any, spec: str, old: str) -> None:
  names = [row.name for row in plan.leaves if row.action is Action.INIT]
  if names:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise WarmStartError(
      f"--init {spec} returns an abstract state (jax.ShapeDtypeStruct leaves), and {len(names)} leaves are not"
      f" loaded from {old}: {shown}. Make it return the initialised state (only the leaves not loaded are"
      " computed), or load those leaves too."
    )


def _state_step(tree: Any) -> int:
  """The value of the state's step leaf (the one rule, `rows.is_step`), or 0 when it has none."""
  variables, leaves, _ = flatten_state(tree)
  for v, leaf in zip(variables, leaves, strict=True):
    if is_step(v) and np.ndim(leaf) == 0:
      return int(np.asarray(leaf))
  return 0


def _write(out: str, tree: Any, record: dict[str, Any], *, manager: bool, force: bool, shown: str) -> int | None:
  """Writes OUT (a checkpoint directory, or a CheckpointManager root of one step) with the provenance record."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from flax_warmstart._src.provenance import PROVENANCE_KEY  # noqa: PLC0415

  try:
    if not manager:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, tree, force=force, custom_metadata={PROVENANCE_KEY: record})
      return None
    step = _state_step(tree)
    if force and os.path.isdir(out):
      import shutil  # noqa: PLC0415

      shutil.rmtree(out)
    with ocp.CheckpointManager(out) as mgr:
      mgr.save(step, args=ocp.args.StandardSave(tree), custom_metadata={PROVENANCE_KEY: record})
    return step
  except Exception as err:  # noqa: BLE001 (a file-system failure is the user's to fix: one line)
    raise WarmStartError(f"Writing OUT {shown} failed: {type(err).__name__}: {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code.

  Args:
    argv: The arguments (default: `sys.argv[1:]`).

  Returns:
    0 on success, 1 when the request cannot be carried out, 130 when
    interrupted (usage errors exit with 2 through argparse).

  Examples:
    >>> main(["-q", "inspect", "/no/such/dir"])
    1
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command in ("plan", "run"):
    _check_args(args.verbs[args.command], args)
  level = {0: logging.ERROR, 1: logging.INFO, 2: logging.DEBUG}[args.verbosity]
  settings_file = getattr(args, "settings", None) or ""
  uses_gin = bool(getattr(args, "gin_file", None) or getattr(args, "gin_bindings", None)) or settings_file.endswith(
    ".gin"
  )
  with _logging_to_stderr(level), cwd_importable(), _fresh_gin(uses_gin):
    return _main(args, argv)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exactly one of NEW and --init (`run OLD OUT --init ...` leaves NEW's slot empty), settings in one form."""
  verb = f"flax-warmstart {args.command}"
  if args.init and args.new is not None:
    parser.error(
      f"give the new model either as NEW or with --init, not both (got NEW={args.new} and --init {args.init})."
    )
  if not args.init and args.new is None:
    usage = "OLD NEW OUT" if args.command == "run" else "OLD NEW"
    parser.error(
      f"the new model is missing: give NEW, a checkpoint of its fresh init ({verb} {usage}), or --init"
      f" module:function, a function returning its state ({verb} {usage.replace(' NEW', '')} --init"
      " my_model:create_state)."
    )
  if args.init_arg and not args.init:
    parser.error("--init-arg needs --init MODULE:FUNCTION.")
  if args.settings and not args.settings.endswith(".gin") and (args.gin_file or args.gin_bindings):
    parser.error(
      f"--settings {args.settings} is JSON or YAML, so it cannot be combined with --gin_file or --gin_bindings:"
      " give the settings in one form (a .gin --settings file is parsed before the --gin_file files)."
    )


@contextlib.contextmanager
def _fresh_gin(uses_gin: bool) -> Iterator[None]:
  """Clears the Gin config a command parsed when it ends (an in-process `main` must not leave its bindings)."""
  try:
    yield
  finally:
    gin = sys.modules.get("gin")
    if uses_gin and gin is not None:
      gin.clear_config()


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is when a record is emitted (so in-process callers may swap it)."""

  @property
  def stream(self) -> Any:  # type: ignore[override]
    return sys.stderr

  @stream.setter
  def stream(self, value: Any) -> None:
    del value


@contextlib.contextmanager
def _logging_to_stderr(level: int) -> Iterator[None]:
  """Shows the library's INFO lines and everyone's warnings on stderr for one command; restores logging after.

  `level` is the library's (`flax_warmstart`) level; other libraries show
  warnings, nothing with -q. Importing Orbax gives the root logger absl's
  handler; it is replaced for the command's duration, so that `main(argv)`
  called in-process leaves the caller's logging as it was.
  """
  root, ours = logging.getLogger(), logging.getLogger("flax_warmstart")
  saved = (root.handlers[:], root.level, ours.level)
  handler = _StderrHandler()
  handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
  root.handlers[:] = [handler]
  root.setLevel(logging.WARNING if level <= logging.INFO else logging.ERROR)
  ours.setLevel(level)
  try:
    yield
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


def _main(args: argparse.Namespace, argv: Sequence[str]) -> int:
  try:
    if args.command == "inspect":
      info = _inspect(args)
      print(json.dumps(info, indent=2)) if args.json else _print_inspect(info)
    elif args.command == "diff":
      d = _diff(args)
      print(json.dumps(d, indent=2)) if args.json else _print_diff(d)
    elif args.command == "plan":
      plan, _, _ = _plan(args)
      print(plan.to_json() if args.json else plan)
    else:
      result = _run(args, argv)
      where = f" (CheckpointManager step {result['step']})" if "step" in result else ""
      print(json.dumps(result) if args.json else f"Wrote {result['out']}{where}: {result['summary']}")
    sys.stdout.flush()  # a closed pipe shows here, inside the handler below
  except WarmStartError as err:
    print(f"flax-warmstart: error: {err}", file=sys.stderr)
    return 1
  except BrokenPipeError:  # e.g. `flax-warmstart plan ... | head`
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except OSError as err:  # a path that cannot be read or written: the user's to fix, in one line
    print(f"flax-warmstart: error: {err}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("flax-warmstart: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
