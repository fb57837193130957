"""The `flax-warmstart` command line: inspect, diff, plan and run warm starts offline.

Examples:
  flax-warmstart inspect /runs/old --filter 'encoder/.*'
  flax-warmstart diff /runs/old /runs/new
  flax-warmstart plan /runs/old /runs/new --settings settings.yaml
  flax-warmstart run /runs/old /runs/new /runs/warm --settings settings.json

Exit codes: 0 success, 1 a request that cannot be carried out (the message
says why), 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import yaml

from flax_warmstart._src.errors import WarmStartError, closest_names
from flax_warmstart._src.execute import execute_leaves, progress
from flax_warmstart._src.planning import bind_leaves, build_plan, check_can_reset
from flax_warmstart._src.report import human_bytes
from flax_warmstart._src.settings import WarmStartSettings
from flax_warmstart._src.sources import open_source
from flax_warmstart._src.sources.orbax import locate

EPILOG = """examples:
  flax-warmstart inspect /runs/old --filter 'encoder/.*'
  flax-warmstart diff /runs/old /runs/new
  flax-warmstart plan /runs/old /runs/new --settings settings.yaml
  flax-warmstart run /runs/old /runs/new /runs/warm --settings settings.json

A settings file (JSON, YAML, or .gin binding flax_warmstart.WarmStartSettings)
holds WarmStartSettings fields, e.g.
  vars_to_warm_start: [".*"]
  var_name_to_prev_var_name: {backbone/kernel: encoder/kernel}
  optimizer_state: reset
CKPT, OLD and NEW are CheckpointManager roots (latest step), step directories
or checkpoint directories.
exit codes: 0 success, 1 the request cannot be carried out, 2 usage error."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="flax-warmstart",
    description="Inspect Orbax checkpoints and warm-start one from another.",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded (INFO)")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def verb(name: str, help_: str, *positionals: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for arg in positionals:
      p.add_argument(arg.lower(), metavar=arg)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p

  p = verb("inspect", "names, shapes, dtypes and bytes of a checkpoint", "CKPT")
  p.add_argument("--filter", metavar="REGEX", help="only names that re.search this regex")
  p.add_argument("--item", help="item of a step directory with several items")
  p.add_argument("--step", type=_step_arg, help="step of a directory of steps: a number, or min:METRIC / max:METRIC")
  verb("diff", "compare the names, shapes and dtypes of two checkpoints", "OLD", "NEW")
  plan = verb("plan", "show the plan for warm-starting NEW's structure from OLD", "OLD", "NEW")
  run = verb("run", "warm-start NEW from OLD offline and write the result to OUT", "OLD", "NEW", "OUT")
  run.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  run.add_argument(
    "--allow-empty",
    action="store_true",
    help="write OUT even when the settings load no leaf from OLD (OUT would be a copy of NEW)",
  )
  run.add_argument("--no-progress", action="store_true", help="no progress display")
  for p in (plan, run):
    p.add_argument(
      "--step",
      type=_step_arg,
      help="step of OLD when it is a directory of steps (a number, or min:METRIC / max:METRIC); overrides the"
      " settings' ckpt_step",
    )
    p.add_argument(
      "--settings", metavar="FILE", help="WarmStartSettings as JSON, YAML or Gin (.gin, needs the gin extra)"
    )
  return parser


def _step_arg(text: str) -> int | str:
  return int(text) if text.isdigit() else text


def load_settings(path: str | None, old: str) -> WarmStartSettings:
  """WarmStartSettings from a JSON, YAML or Gin file; OLD is the checkpoint they warm-start from.

  Args:
    path: The settings file, or None for the defaults.
    old: The checkpoint to warm-start from.

  Returns:
    The settings.

  Raises:
    WarmStartError: If the file is missing, unreadable or invalid.

  Examples:
    >>> load_settings(None, "/runs/old").vars_to_warm_start
    '.*'
  """
  if path is None:
    return WarmStartSettings(old)
  if not os.path.isfile(path):
    raise WarmStartError(f"Settings file {path} does not exist.")
  if path.endswith(".gin"):
    try:
      from flax_warmstart.gin import settings_from_gin  # noqa: PLC0415 (optional extra)
    except ImportError as err:
      raise WarmStartError(str(err)) from None
    return settings_from_gin(path, old)
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
    logging.getLogger("flax_warmstart").warning(
      "Settings file %s names ckpt_to_initialize_from=%s; reading OLD=%s as the command line says.", path, given, old
    )
  data["ckpt_to_initialize_from"] = old
  return WarmStartSettings.from_dict(data)


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
  print(f"{len(d['same'])} names match in shape and dtype.")
  for e in d["shape"]:
    print(f"shape differs: {e['name']}: {tuple(e['old'])} -> {tuple(e['new'])}")
  for e in d["dtype"]:
    print(f"dtype differs: {e['name']}: {e['old']} -> {e['new']}")
  for e in d["only_old"]:
    print(f"only in OLD:   {e['name']} {tuple(e['shape'])}")
  for e in d["only_new"]:
    hint = f" (closest in OLD: {', '.join(e['closest_old'])})" if e["closest_old"] else ""
    print(f"only in NEW:   {e['name']} {tuple(e['shape'])}{hint}")


def _plan(args: argparse.Namespace) -> tuple[Any, Any, Any]:
  """The plan for NEW's structure (abstract leaves) from OLD, and NEW itself."""
  settings = load_settings(args.settings, args.old)
  if settings.optimizer_state == "reset":
    check_can_reset(None)  # refused before anything is read: a checkpoint holds no optimizer
  new = open_source(args.new)
  if args.step is not None:
    settings = dataclasses.replace(settings, ckpt_step=args.step)
  old = open_source(args.old, item=settings.ckpt_item, prefer_names=list(new.variables), step=settings.ckpt_step)
  variables = list(new.variables.values())
  leaves = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]
  return bind_leaves(build_plan(variables, leaves, old, settings), leaves, abstract_is_init=False), new, settings


def _check_out(out: str, old: str, new: str, force: bool) -> str:
  """Refuses an OUT that would harm OLD or NEW or that cannot be written, before anything is read or written."""
  if not out:
    raise WarmStartError("OUT is empty: give the directory to write the warm-started checkpoint to.")
  if "://" in out:
    return out
  target = os.path.realpath(out)
  for label, given in (("OLD", old), ("NEW", new)):
    if "://" in given:
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


def _run(args: argparse.Namespace) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # noqa: PLC0415

  out = _check_out(args.out, args.old, args.new, args.force)
  plan, new, _ = _plan(args)
  if not plan.loaded and not args.allow_empty:
    raise WarmStartError(
      f"The settings load no leaf from {args.old}, so OUT would be a copy of NEW; nothing was written."
      " Check vars_to_warm_start (flax-warmstart plan shows what each leaf does), or pass --allow-empty."
    )
  with progress(not args.no_progress) as step:
    step(f"reading {args.new}")
    restored = new.restore(dict.fromkeys(new.variables))
    # The live state is NEW's tree, its leaves host arrays named as in NEW's metadata.
    leaves = [restored[name] for name in new.variables]
    step(f"warm-starting from {args.old} ({human_bytes(plan.nbytes)})")
    leaves = execute_leaves(plan, leaves, update=step)
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(new.tree), leaves)
    step(f"writing {args.out}")
    try:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, tree, force=args.force)
    except Exception as err:  # noqa: BLE001 (a file-system failure is the user's to fix: one line)
      raise WarmStartError(f"Writing OUT {args.out} failed: {type(err).__name__}: {err}") from err
  return {"out": args.out, "summary": plan.summary()}


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code.

  Args:
    argv: The arguments (default: `sys.argv[1:]`).

  Returns:
    0 on success, 1 when the request cannot be carried out (usage errors exit
    with 2 through argparse).

  Examples:
    >>> main(["inspect", "/no/such/dir"])
    1
  """
  args = _parser().parse_args(argv)
  with _logging_to_stderr(logging.INFO if args.verbose else logging.WARNING):
    return _main(args)


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
  """Shows warnings (and with -v, the library's INFO) on stderr for one command; restores logging after.

  Importing Orbax gives the root logger absl's handler; it is replaced for the
  command's duration, so that `main(argv)` called in-process leaves the
  caller's logging as it was.
  """
  root, ours = logging.getLogger(), logging.getLogger("flax_warmstart")
  saved = (root.handlers[:], root.level, ours.level)
  handler = _StderrHandler()
  handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
  root.handlers[:] = [handler]
  root.setLevel(logging.WARNING)
  ours.setLevel(level)
  try:
    yield
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


def _main(args: argparse.Namespace) -> int:
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
      result = _run(args)
      print(json.dumps(result) if args.json else f"Wrote {result['out']}: {result['summary']}")
    sys.stdout.flush()  # a closed pipe shows here, inside the handler below
  except WarmStartError as err:
    print(f"flax-warmstart: error: {err}", file=sys.stderr)
    return 1
  except BrokenPipeError:  # e.g. `flax-warmstart plan ... | head`
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except OSError as err:  # a path that cannot be read or written: the user's to fix, in one line
    print(f"flax-warmstart: error: {err}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
