"""The Orbax source: `CheckpointManager` roots, step directories and checkpoint directories.

A location may be a `CheckpointManager` root (its latest finalized step is
used), a step directory (one or several items), or a checkpoint directory
written by `StandardCheckpointer` / `PyTreeCheckpointer`. Metadata (names,
shapes, dtypes) is read first; `restore` then reads only the tensors asked
for, each placed directly with the sharding it is asked for, and
`open_arrays` hands single-process reads their TensorStore arrays so that
the read stage fills buffers of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from flax_warmstart._src.errors import DAMAGED_HINT, WarmStartError
from flax_warmstart._src.naming import Variable, flatten_checkpoint_tree
from flax_warmstart._src.sources.base import Source
from flax_warmstart._src.sources.orbax_metadata import ITEM_FILE, metadata_tree, ts_context

_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")
_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"


@dataclasses.dataclass(frozen=True, eq=False)
class OrbaxSource(Source):
  """A located Orbax checkpoint (one PyTree item) and its metadata; no array has been read.

  Attributes:
    path: The item directory that Orbax reads.
    requested: The location the user gave.
    step: The training step, when the location names one (a manager step).
    variables: Checkpoint name -> `Variable` (shape, dtype), in tree order.
    tree: The checkpoint's metadata tree.
    use_zarr3: Whether arrays are stored as zarr v3.
    fingerprint: `(size, mtime_ns)` of the item's `_METADATA` when it was read.
  """

  format: ClassVar[str] = "orbax"
  path: epath.Path
  requested: str
  step: int | None
  variables: Mapping[str, Variable]
  tree: Any
  use_zarr3: bool = False
  fingerprint: tuple[int, int] | None = None

  @functools.cached_property
  def metadata_leaves(self) -> list[Any]:
    """The leaves of `tree`, indexed by `Variable.index`."""
    return jax.tree_util.tree_leaves(self.tree)

  @property
  def location(self) -> str:
    return str(self.path)

  def check_unchanged(self) -> None:
    now = _fingerprint(self.path)
    if now != self.fingerprint:
      raise WarmStartError(
        f"Checkpoint {self.describe()} changed on disk after it was planned from (its {ITEM_FILE} was"
        f" {'removed' if now is None else 'rewritten'}); nothing was read. Build the plan again"
        " (flax_warmstart.plan) for the checkpoint as it is now."
      )

  def open_arrays(self, names: Iterable[str]) -> dict[str, ts.TensorStore]:
    return open_arrays(self, names)

  def restore(self, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
    return restore(self, targets)


def is_orbax(path: epath.Path) -> bool:
  """Whether a directory is an Orbax checkpoint, a step directory with items, or a manager root with steps."""
  return path.is_dir() and (_is_item(path) or bool(_item_dirs(path)) or bool(_step_dirs(path)))


def open_orbax(
  location: str | os.PathLike,
  *,
  item: str | None = None,
  prefer_names: Iterable[str] = (),
) -> OrbaxSource:
  """Locates an Orbax checkpoint and reads its metadata (names, shapes, dtypes).

  Args:
    location: A `CheckpointManager` root, a step directory or a checkpoint
      directory.
    item: The item to read in a step directory with several items.
    prefer_names: Names of the live state; with several candidate items and no
      `item`, the item holding most of these names is read.

  Returns:
    The source.

  Raises:
    WarmStartError: If no checkpoint is found, or the item is ambiguous.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"params": {"w": jnp.ones((2, 3))}})
    >>> source = open_orbax(path)
    >>> source.format, source.variables["w"].shape
    ('orbax', (2, 3))
  """
  requested = os.fspath(location)
  path, step = locate(requested)
  if _is_item(path):
    if item is not None and path.name != item:
      raise WarmStartError(
        f"ckpt_item={item!r} was asked for, but {requested} is a single checkpoint"
        " directory, not a step directory with items. Drop ckpt_item."
      )
    return _read(path, requested, step)
  items = _item_dirs(path)
  by_name = {p.name: p for p in items}
  if item is not None:
    if item not in by_name:
      raise WarmStartError(
        f"No item {item!r} in checkpoint step {path}; its items are {sorted(by_name)}. Set ckpt_item to one of them."
      )
    return _read(by_name[item], requested, step)
  if len(items) == 1:
    return _read(items[0], requested, step)
  candidates = [_read(p, requested, step) for p in items]
  prefer = set(prefer_names)
  scores = {c.path.name: len(prefer & set(c.variables)) for c in candidates}
  best = max(scores.values())
  winners = [c for c in candidates if scores[c.path.name] == best]
  if len(winners) == 1 and best > 0:
    return winners[0]
  tied = ", ".join(f"{c.path.name!r} ({scores[c.path.name]} of the state's names)" for c in winners)
  raise WarmStartError(
    f"Checkpoint step {path} holds several items and {len(winners)} match the state equally well: {tied}."
    " Name the one to read with WarmStartSettings(ckpt_item=...) (on the command line: --item)."
  )


def locate(location: str | os.PathLike) -> tuple[epath.Path, int | None]:
  """Resolves a location to a checkpoint directory (a manager root to its latest step).

  A manager root resolves to its latest step only: when that step is damaged
  (no `_METADATA` in it or its items) this is an error naming it, never a
  silent fall back to an older step; give the older step's directory to use
  it. A directory Orbax is still writing (`*.orbax-checkpoint-tmp-*`) is
  refused, as Orbax refuses it.

  Returns:
    `(directory, step)`; `step` is None when the location names none.

  Raises:
    WarmStartError: Saying what was looked for, if there is no checkpoint, or
      what is wrong with a damaged or unfinished one.
  """
  requested = os.fspath(location)
  if not requested:
    raise WarmStartError("No checkpoint location given (an empty path). Give a checkpoint directory.")
  # Orbax needs absolute local paths; URLs (gs://...) are left as they are.
  path = epath.Path(requested if "://" in requested else os.path.abspath(requested))
  if not path.exists():
    raise WarmStartError(
      f"No checkpoint at {requested}: the path does not exist. Give an Orbax"
      " CheckpointManager directory, a step directory or a checkpoint directory."
    )
  if not path.is_dir():
    raise WarmStartError(
      f"No checkpoint at {requested}: it is a file. Give the checkpoint's directory (perhaps {path.parent})."
    )
  if _is_tmp(path):
    raise WarmStartError(
      f"{requested} is a checkpoint that Orbax is still writing, or whose save never finished (its name ends"
      " in .orbax-checkpoint-tmp-*); Orbax does not read it either. Wait for the save to finish, or use a"
      " finalized step."
    )
  if _is_item(path) or _item_dirs(path):
    _check_items(path, requested)
    _step_metadata(path)  # raises if damaged
    return path, _step_of(path)
  candidates = _numbered_dirs(path)
  if candidates:
    step, step_dir = max(candidates)
    damage = _damage(step_dir)
    if damage:
      older = [s for s, d in sorted(candidates, reverse=True)[1:] if not _damage(d)]
      hint = (
        f" To use the older step {older[0]}, give its directory ({step_dir.parent / str(older[0])}) explicitly."
        if older
        else ""
      )
      raise WarmStartError(
        f"The latest step of {requested}, {step_dir.name}, is damaged: {damage}. It is not read, and no older"
        f" step is used in its place.{hint} Or remove the damaged step directory if it is garbage. {DAMAGED_HINT}"
      )
    _check_items(step_dir, requested)
    return step_dir, step
  listing = sorted(p.name for p in path.iterdir())[:10]
  if any(_is_tmp(p) for p in path.iterdir()):
    raise WarmStartError(
      f"No finalized Orbax checkpoint at {requested} yet: a save is still in progress ({listing})."
      " CheckpointManager saves asynchronously; call mgr.wait_until_finished() before reading it."
    )
  raise WarmStartError(
    f"No Orbax checkpoint found at {requested}. Looked for a checkpoint directory"
    f" (with a {ITEM_FILE} file), a step directory (with item directories such as"
    " default/), and a CheckpointManager root (with finalized numbered step"
    f" directories); found {listing or 'an empty directory'}."
  )


def holds_steps(location: str | os.PathLike) -> bool:
  """Whether a directory holds anything that looks like a checkpoint: a step directory or item, readable or not."""
  path = epath.Path(location if "://" in os.fspath(location) else os.path.abspath(location))
  if not path.is_dir():
    return False
  return _is_item(path) or bool(_numbered_dirs(path)) or any(p.is_dir() and _is_item(p) for p in path.iterdir())


def step_directory(root: str | os.PathLike, step: int) -> str:
  """The directory of step `step` of a manager root (`root/<step>` or `root/<prefix>_<step>`).

  Raises:
    WarmStartError: If the root has no such step, listing the steps it has.
  """
  path = epath.Path(root if "://" in os.fspath(root) else os.path.abspath(root))
  steps = dict(_numbered_dirs(path)) if path.is_dir() else {}
  if step not in steps:
    raise WarmStartError(f"{os.fspath(root)} has no step {step}; its steps are {sorted(steps) or 'none'}.")
  return os.fspath(steps[step])


def _is_tmp(path: epath.Path) -> bool:
  return ".orbax-checkpoint-tmp" in path.name or ocp.path.step.is_tmp_checkpoint(path)


def _numbered_dirs(path: epath.Path) -> list[tuple[int, epath.Path]]:
  """A manager root's step directories (named like steps, finalized by name), readable or not."""
  out = []
  for p in path.iterdir():
    match = _STEP_NAME.match(p.name)
    if match and p.is_dir() and not _is_tmp(p):
      out.append((int(match.group(1)), p))
  return out


def _damage(step_dir: epath.Path) -> str:
  """What is wrong with a step directory, or '' if it holds readable items."""
  try:
    _step_metadata(step_dir)
  except WarmStartError:
    return f"its {_CHECKPOINT_METADATA} file cannot be read"
  if _is_item(step_dir):
    return ""
  subdirs = [p for p in step_dir.iterdir() if p.is_dir()]
  if not subdirs:
    return f"it holds no checkpoint (no {ITEM_FILE} file and no item directories)"
  if not any(_is_item(p) for p in subdirs):
    names = ", ".join(sorted(p.name for p in subdirs)[:5])
    return f"its item directories ({names}) have no {ITEM_FILE} file"
  if not ocp.path.step.is_checkpoint_finalized(step_dir):
    return "its save did not finish"
  return ""


def _check_items(path: epath.Path, requested: str) -> None:
  """Raises if a step directory has an item directory that looks like a PyTree item but lacks its metadata."""
  if _is_item(path):
    return
  broken = [
    p.name
    for p in path.iterdir()
    if p.is_dir() and not _is_item(p) and any(q.name in ("manifest.ocdbt", "d", "array_metadatas") for q in p.iterdir())
  ]
  if broken:
    raise WarmStartError(
      f"Checkpoint step {path} (from {requested}) is damaged: item(s) {sorted(broken)} hold array data but no"
      f" {ITEM_FILE} file. {DAMAGED_HINT}"
    )


def _is_item(path: epath.Path) -> bool:
  return (path / ITEM_FILE).exists()


def _item_dirs(path: epath.Path) -> list[epath.Path]:
  return sorted((p for p in path.iterdir() if p.is_dir() and _is_item(p)), key=lambda p: p.name)


def _step_of(path: epath.Path) -> int | None:
  """The step of a manager's step directory or of an item inside one; None for a standalone checkpoint.

  A standalone checkpoint (`StandardCheckpointer.save(".../run_0")`) keeps its
  `_CHECKPOINT_METADATA` in itself, with a single handler; a manager's step
  keeps it at the step level, above its items. So neither a standalone
  directory named like a step nor one inside a directory named like a step
  (pytest's `tmp_path` ends in `_0`) gets a step.
  """
  match = _STEP_NAME.match(path.name)
  if match and not _standalone(path):
    return int(match.group(1))
  match = _STEP_NAME.match(path.parent.name)
  if match and _is_item(path) and _step_metadata(path.parent) is not None and not _standalone(path.parent):
    return int(match.group(1))
  return None


def _step_metadata(path: epath.Path) -> ocp.metadata.StepMetadata | None:
  """A directory's `_CHECKPOINT_METADATA`, through Orbax's public reader; None if absent.

  Raises:
    WarmStartError: If the file exists but cannot be read (truncated, zeroed, not JSON).
  """
  file = path / _CHECKPOINT_METADATA
  if not file.exists():
    return None
  try:
    json.loads(file.read_text())  # checked here first: Orbax's reader logs an ERROR and returns None
    return ocp.metadata.get_step_metadata(path)
  except Exception as err:  # noqa: BLE001 (any parse failure is damage, reported with the path)
    raise WarmStartError(
      f"Checkpoint {path} is damaged: its {_CHECKPOINT_METADATA} file cannot be read"
      f" ({type(err).__name__}: {err}). {DAMAGED_HINT}"
    ) from err


def _standalone(path: epath.Path) -> bool:
  """Whether `path` is a checkpoint saved on its own (one handler in its `_CHECKPOINT_METADATA`)."""
  metadata = _step_metadata(path)
  return metadata is not None and isinstance(metadata.item_handlers, str)


def custom_metadata(path: epath.Path) -> dict[str, Any]:
  """The `custom_metadata` a `CheckpointManager.save` stored with a step ({} if none)."""
  metadata = _step_metadata(path)
  return dict(metadata.custom_metadata or {}) if metadata is not None else {}


def _step_dirs(path: epath.Path) -> list[tuple[int, epath.Path]]:
  steps = []
  for p in path.iterdir():
    match = _STEP_NAME.match(p.name)
    if not match or not p.is_dir() or ocp.path.step.is_tmp_checkpoint(p):
      continue
    if (_is_item(p) or _item_dirs(p)) and ocp.path.step.is_checkpoint_finalized(p):
      steps.append((int(match.group(1)), p))
  return steps


def _fingerprint(path: epath.Path) -> tuple[int, int] | None:
  try:
    stat = os.stat(os.fspath(path / ITEM_FILE)) if "://" not in os.fspath(path) else None
  except OSError:
    return None
  return None if stat is None else (stat.st_size, stat.st_mtime_ns)


def _read(path: epath.Path, requested: str, step: int | None) -> OrbaxSource:
  fingerprint = _fingerprint(path)
  try:
    json.loads((path / ITEM_FILE).read_text())
  except (OSError, ValueError) as err:  # truncated, zeroed, not UTF-8, not JSON
    raise WarmStartError(
      f"Checkpoint {path} is damaged: its {ITEM_FILE} file cannot be read ({type(err).__name__}: {err}). {DAMAGED_HINT}"
    ) from err
  cached = _opened(path, fingerprint)
  if "tree" not in cached:
    try:
      cached["tree"] = metadata_tree(path)
    except WarmStartError:
      raise
    except Exception as err:  # noqa: BLE001 (Orbax's own reader on a damaged checkpoint)
      raise WarmStartError(
        f"Checkpoint {path} is damaged: Orbax cannot read its metadata ({type(err).__name__}: {err}). {DAMAGED_HINT}"
      ) from err
  tree, use_zarr3 = cached["tree"]
  variables = {v.name: v for v, _ in flatten_checkpoint_tree(tree)}
  return OrbaxSource(
    path=path,
    requested=requested,
    step=step,
    variables=variables,
    tree=tree,
    use_zarr3=use_zarr3,
    fingerprint=fingerprint,
  )


def open_arrays(source: OrbaxSource, names: Iterable[str]) -> dict[str, ts.TensorStore]:
  """Opens saved arrays for reading into buffers of our own (see `flax_warmstart._src.read`).

  Only arrays that Orbax stored with TensorStore, opened with Orbax's own spec
  and context (no data is read: in a multi-process run each process then
  reads only its own shards); the others (strings and other values not
  stored as arrays) are left to `restore`.

  Args:
    source: From `open_orbax`.
    names: Checkpoint names.

  Returns:
    Checkpoint name -> opened TensorStore (metadata read, no data), for the
    names that can be read so.

  Raises:
    WarmStartError: If an array cannot be opened (naming it and the checkpoint).

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"w": jnp.ones((2, 3)), "step": 7})
    >>> stores = open_arrays(open_orbax(path), ["w", "step"])
    >>> {name: store.shape for name, store in stores.items()}
    {'w': (2, 3), 'step': ()}
  """
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(source.path)
  entry = _opened(source.path, source.fingerprint)
  # One TensorStore context per opened checkpoint (path and fingerprint): a rewrite gets a fresh one.
  context = entry.setdefault("context", ts_context(use_ocdbt))
  stores = entry.setdefault("stores", {})
  opened = {name: stores[name] for name in names if name in stores}
  opening = {}
  for name in names:
    if name in opened:
      continue
    meta = source.metadata_leaves[source.variables[name].index]
    if not isinstance(meta, ocp.metadata.ArrayMetadata) or not meta.name:
      continue
    info = ocp.type_handlers.ParamInfo(
      name=meta.name,
      parent_dir=epath.Path(meta.directory or source.path),
      use_zarr3=source.use_zarr3,
      ts_context=context,
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    opening[name] = ts.open(spec, open=True, context=context)
  for name, future in opening.items():
    try:
      opened[name] = stores[name] = future.result()
    except Exception as err:
      raise WarmStartError(
        f"Reading {name!r} from {source.describe()} failed: {type(err).__name__}: {err}. {DAMAGED_HINT}"
      ) from err
  return opened


# What was read of the last few checkpoints opened: their metadata tree and opened arrays (no data), keyed
# by the item's path and its `_METADATA` fingerprint (a rewrite changes the key). TensorStore keeps a little
# memory for every open (measured: ~0.8 KiB per array, ~300 KiB per call of a 400-array warm start, and
# Orbax's own metadata reader ~290 KiB per call of a 50-leaf plan), so repeated calls on the same checkpoint
# reuse these instead of opening again: memory stays flat over many calls (benchmarks/memory_growth.py).
_OPENED: collections.OrderedDict[tuple[str, tuple[int, int]], dict[str, Any]] = collections.OrderedDict()
_OPENED_MAX = 8


def _opened(path: epath.Path, fingerprint: tuple[int, int] | None) -> dict[str, Any]:
  """The cache entry of a checkpoint item ({} and not kept when it has no fingerprint, e.g. a remote path)."""
  if fingerprint is None:
    return {}
  key = (os.fspath(path), fingerprint)
  entry = _OPENED.pop(key, None)
  entry = {} if entry is None else entry
  _OPENED[key] = entry
  while len(_OPENED) > _OPENED_MAX:
    _OPENED.popitem(last=False)
  return entry


def restore(source: OrbaxSource, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
  """Reads only the named tensors through Orbax's placeholder partial restore (see `Source.restore`).

  The item tree is the checkpoint's own metadata tree, with `ocp.PLACEHOLDER`
  for every tensor not asked for, so nothing else is read.
  """
  if not targets:
    return {}
  meta_leaves, treedef = jax.tree_util.tree_flatten(source.tree)
  item = [ocp.PLACEHOLDER] * len(meta_leaves)
  args: list[ocp.RestoreArgs] = [ocp.RestoreArgs()] * len(meta_leaves)
  for name, spec in targets.items():
    index = source.variables[name].index
    meta = meta_leaves[index]
    if spec is not None and spec.sharding is not None and isinstance(meta, ocp.metadata.ArrayMetadata):
      item[index] = spec
      args[index] = ocp.ArrayRestoreArgs(sharding=spec.sharding, dtype=spec.dtype, global_shape=spec.shape)
    elif isinstance(meta, ocp.metadata.ArrayMetadata):
      item[index] = meta
      args[index] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=None if spec is None else spec.dtype)
    else:  # a string or another value Orbax does not store as an array: restored as it was saved
      item[index] = meta
  restored = ocp.PyTreeCheckpointHandler().restore(
    source.path,
    args=ocp.args.PyTreeRestore(
      item=jax.tree_util.tree_unflatten(treedef, item),
      restore_args=jax.tree_util.tree_unflatten(treedef, args),
    ),
  )
  values = jax.tree_util.tree_leaves(restored)
  return {name: values[source.variables[name].index] for name in targets}
