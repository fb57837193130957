"""Finding an Orbax checkpoint, reading its metadata, restoring chosen tensors.

A checkpoint location may be a `CheckpointManager` root (its latest finalized
step is used), a step directory (one or several items), or a checkpoint
directory written by `StandardCheckpointer` / `PyTreeCheckpointer`. Metadata
(names, shapes, dtypes) is read first; `restore` then reads only the tensors
asked for, each placed directly with the sharding it is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from flax_warmstart.errors import WarmStartError
from flax_warmstart.naming import Variable, flatten_checkpoint_tree

_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")
_ITEM_FILE = "_METADATA"
_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
# Item names tried, in order, when a step directory holds several PyTree items.
_PREFERRED_ITEMS = ("default", "state", "train_state")


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
  """A located Orbax checkpoint and its metadata; no array has been read.

  Attributes:
    path: The item directory that Orbax reads.
    requested: The location the user gave.
    step: The training step, when the location names one (a manager step).
    variables: Checkpoint name -> `Variable` (shape, dtype), in tree order.
    tree: The checkpoint's metadata tree, or for an in-memory checkpoint (see
      `in_memory`) its values.
    in_memory: True for a state dict already in memory (T5X hands one over):
      `restore` then takes values from `tree` instead of reading files.
  """

  path: epath.Path
  requested: str
  step: int | None
  variables: Mapping[str, Variable]
  tree: Any
  in_memory: bool = False
  use_zarr3: bool = False

  @functools.cached_property
  def metadata_leaves(self) -> list[Any]:
    """The leaves of `tree`, indexed by `Variable.index`."""
    return jax.tree_util.tree_leaves(self.tree)

  def describe(self) -> str:
    """The location given plus the step, for messages: `/runs/old@step 20`."""
    return f"{self.requested}@step {self.step}" if self.step is not None else self.requested


def load_checkpoint(
  location: str | os.PathLike,
  *,
  item: str | None = None,
  prefer_names: Iterable[str] = (),
) -> Checkpoint:
  """Locates a checkpoint and reads its metadata (names, shapes, dtypes).

  Args:
    location: A `CheckpointManager` root, a step directory or a checkpoint
      directory.
    item: The item to read in a step directory with several items.
    prefer_names: Names of the live state; with several candidate items and no
      `item`, the item holding most of these names is read.

  Returns:
    The `Checkpoint`.

  Raises:
    WarmStartError: If no checkpoint is found, or the item is ambiguous.
  """
  requested = os.fspath(location)
  path, step = locate(requested)
  items = _item_dirs(path) if not _is_item(path) else []
  if _is_item(path):
    if item is not None and path.name != item:
      raise WarmStartError(
        f"ckpt_item={item!r} was asked for, but {requested} is a single checkpoint"
        " directory, not a step directory with items. Drop ckpt_item."
      )
    return _read(path, requested, step)
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
  if len(winners) > 1:
    named = [c for c in winners if c.path.name in _PREFERRED_ITEMS]
    winners = sorted(named, key=lambda c: _PREFERRED_ITEMS.index(c.path.name))[:1] or winners
  if len(winners) == 1:
    return winners[0]
  raise WarmStartError(
    f"Checkpoint step {path} holds several items ({sorted(by_name)}) and none"
    " matches the state better than the others. Name the one to read with"
    " WarmStartSettings(ckpt_item=...)."
  )


def locate(location: str | os.PathLike) -> tuple[epath.Path, int | None]:
  """Resolves a location to a checkpoint directory (a manager root to its latest step).

  Returns:
    `(directory, step)`; `step` is None when the location names none.

  Raises:
    WarmStartError: Saying what was looked for, if there is no checkpoint.
  """
  requested = os.fspath(location)
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
  if _is_item(path) or _item_dirs(path):
    return path, _step_of(path)
  steps = _step_dirs(path)
  if steps:
    step, step_dir = max(steps)
    return step_dir, step
  listing = sorted(p.name for p in path.iterdir())[:10]
  if any(ocp.path.step.is_tmp_checkpoint(p) for p in path.iterdir()):
    raise WarmStartError(
      f"No finalized Orbax checkpoint at {requested} yet: a save is still in progress ({listing})."
      " CheckpointManager saves asynchronously; call mgr.wait_until_finished() before reading it."
    )
  raise WarmStartError(
    f"No Orbax checkpoint found at {requested}. Looked for a checkpoint directory"
    f" (with a {_ITEM_FILE} file), a step directory (with item directories such as"
    " default/), and a CheckpointManager root (with finalized numbered step"
    f" directories); found {listing or 'an empty directory'}."
  )


def _is_item(path: epath.Path) -> bool:
  return (path / _ITEM_FILE).exists()


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
  if match and _is_item(path) and (path.parent / _CHECKPOINT_METADATA).exists() and not _standalone(path.parent):
    return int(match.group(1))
  return None


def _standalone(path: epath.Path) -> bool:
  """Whether `path` is a checkpoint saved on its own (one handler in its `_CHECKPOINT_METADATA`)."""
  try:
    handlers = json.loads((path / _CHECKPOINT_METADATA).read_text()).get("item_handlers")
  except (OSError, ValueError, AttributeError):
    return False
  return isinstance(handlers, str)


def _step_dirs(path: epath.Path) -> list[tuple[int, epath.Path]]:
  steps = []
  for p in path.iterdir():
    match = _STEP_NAME.match(p.name)
    if not match or not p.is_dir() or ocp.path.step.is_tmp_checkpoint(p):
      continue
    if (_is_item(p) or _item_dirs(p)) and ocp.path.step.is_checkpoint_finalized(p):
      steps.append((int(match.group(1)), p))
  return steps


def _read(path: epath.Path, requested: str, step: int | None) -> Checkpoint:
  fast = _array_metadata_tree(path)
  if fast is not None:
    tree, use_zarr3 = fast
  else:
    metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    use_zarr3 = bool(getattr(metadata, "use_zarr3", False))
  variables = {v.name: v for v, _ in flatten_checkpoint_tree(tree)}
  return Checkpoint(path=path, requested=requested, step=step, variables=variables, tree=tree, use_zarr3=use_zarr3)


def _array_metadata_tree(path: epath.Path) -> tuple[Any, bool] | None:
  """Orbax's metadata tree, with its arrays' shapes and dtypes read from their zarr metadata in one batch.

  `PyTreeCheckpointHandler.metadata` opens every array's TensorStore, one
  asyncio task each: 2.2 s for 4,000 arrays on this project's machine, most
  of a plan's time. Here Orbax builds the same tree from `_METADATA` itself
  (`InternalTreeMetadata.as_custom_metadata`), and only its `jax.Array`
  handler is replaced: every array's `.zarray` / `zarr.json` is read
  concurrently through one key-value store (0.1 s), giving the same
  `ArrayMetadata` leaves minus the saved sharding, which nothing here uses.
  Any surprise returns None, and Orbax's own `metadata` is used.
  """
  try:
    from orbax.checkpoint._src.metadata import tree as tree_metadata_lib  # noqa: PLC0415
    from orbax.checkpoint._src.serialization import type_handler_registry  # noqa: PLC0415

    internal = tree_metadata_lib.InternalTreeMetadata.from_json(json.loads((path / _ITEM_FILE).read_text()))
    if internal.value_metadata_tree is not None:  # rich types: Orbax's own path
      return None
    use_ocdbt = internal.use_ocdbt if internal.use_ocdbt is not None else ocp.type_handlers.is_ocdbt_checkpoint(path)
    registry = _ZarrArrayRegistry(type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY, path, use_ocdbt)
    tree = internal.as_custom_metadata(path, registry)
    return tree, bool(internal.use_zarr3)
  except Exception:  # noqa: BLE001 (any surprise: Orbax's own, slower path)
    return None


class _ZarrArrayRegistry:
  """Orbax's type handler registry, but `jax.Array` metadata comes from one batched read of zarr metadata."""

  def __init__(self, base: Any, path: epath.Path, use_ocdbt: bool):
    self._base, self._path, self._use_ocdbt = base, path, use_ocdbt

  def get(self, typestr: str) -> Any:
    return self if typestr == "jax.Array" else self._base.get(typestr)

  async def metadata(self, infos: list[Any]) -> list[ocp.metadata.ArrayMetadata]:
    context = _ts_context(self._use_ocdbt)
    spec = ocp.type_handlers.get_json_tspec_read(infos[0], use_ocdbt=self._use_ocdbt)
    # The array's key-value store is the checkpoint's with the array's name appended to its path.
    kvstore_spec = dict(spec["kvstore"])
    prefix = kvstore_spec.get("path", "").rstrip("/")
    if not prefix.endswith(infos[0].name):
      raise ValueError(f"unexpected array path {prefix!r}")
    kvstore_spec["path"] = prefix[: -len(infos[0].name)]
    # TensorStore's own threads do the reads; waiting here without the event
    # loop avoids one loop iteration per array (0.2 s for 4,000).
    kvstore = ts.KvStore.open(kvstore_spec, context=context).result()
    use_zarr3 = bool(infos[0].use_zarr3)
    suffix = "zarr.json" if use_zarr3 else ".zarray"
    reads = [kvstore.read(f"{info.name}/{suffix}") for info in infos]
    out = []
    for info, read in zip(infos, reads, strict=True):
      result = read.result()
      if result.state != "value":
        raise KeyError(f"{info.name}/{suffix}")
      zarr = json.loads(result.value)
      dtype = jax.numpy.dtype(zarr["data_type"] if use_zarr3 else zarr["dtype"])
      out.append(
        ocp.metadata.ArrayMetadata(
          name=info.name, directory=self._path, shape=tuple(zarr["shape"]), sharding=None, dtype=dtype
        )
      )
    return out


def open_arrays(checkpoint: Checkpoint, names: Iterable[str]) -> dict[str, ts.TensorStore]:
  """Opens saved arrays for reading into buffers of our own (see `execute`).

  Only in a single process and for arrays that Orbax stored with TensorStore,
  opened with Orbax's own spec and context; the others (in-memory
  checkpoints, strings and other values not stored as arrays, and every
  array in a multi-process run, where each process reads its own shards)
  are left to `restore`.

  Args:
    checkpoint: From `load_checkpoint`.
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
    >>> stores = open_arrays(load_checkpoint(path), ["w", "step"])
    >>> {name: store.shape for name, store in stores.items()}
    {'w': (2, 3), 'step': ()}
  """
  if checkpoint.in_memory or jax.process_count() > 1:
    return {}
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(checkpoint.path)
  context = _ts_context(use_ocdbt)
  opening = {}
  for name in names:
    meta = checkpoint.metadata_leaves[checkpoint.variables[name].index]
    if not isinstance(meta, ocp.metadata.ArrayMetadata) or not meta.name:
      continue
    info = ocp.type_handlers.ParamInfo(
      name=meta.name,
      parent_dir=epath.Path(meta.directory or checkpoint.path),
      use_zarr3=checkpoint.use_zarr3,
      ts_context=context,
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    opening[name] = ts.open(spec, open=True, context=context)
  opened = {}
  for name, future in opening.items():
    try:
      opened[name] = future.result()
    except Exception as err:
      raise WarmStartError(
        f"Reading {name!r} from {checkpoint.describe()} failed: {type(err).__name__}: {err}. {DAMAGED_HINT}"
      ) from err
  return opened


# What to check when a checkpoint that was planned from cannot be read.
DAMAGED_HINT = (
  "The checkpoint's files may be incomplete or damaged; check that the save finished (a CheckpointManager"
  " step is final once its directory has no .orbax-checkpoint-tmp suffix)."
)


@functools.cache
def _ts_context(use_ocdbt: bool) -> ts.Context:
  return ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)


def restore(checkpoint: Checkpoint, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
  """Reads only the named tensors of a checkpoint.

  Args:
    checkpoint: From `load_checkpoint`.
    targets: Checkpoint name -> a `jax.ShapeDtypeStruct` with a sharding (the
      tensor is restored as a `jax.Array` with that sharding and dtype, read
      shard by shard), one without a sharding (a host numpy array of that
      dtype), or None (a host numpy array as saved).

  Returns:
    Checkpoint name -> restored value.
  """
  if not targets:
    return {}
  if checkpoint.in_memory:
    leaves = checkpoint.metadata_leaves
    return {name: _materialize(leaves[checkpoint.variables[name].index], spec) for name, spec in targets.items()}
  meta_leaves, treedef = jax.tree_util.tree_flatten(checkpoint.tree)
  item = [ocp.PLACEHOLDER] * len(meta_leaves)
  args: list[ocp.RestoreArgs] = [ocp.RestoreArgs()] * len(meta_leaves)
  for name, spec in targets.items():
    index = checkpoint.variables[name].index
    meta = meta_leaves[index]
    if spec is not None and spec.sharding is not None and isinstance(meta, ocp.metadata.ArrayMetadata):
      item[index] = spec
      args[index] = ocp.ArrayRestoreArgs(sharding=spec.sharding, dtype=spec.dtype, global_shape=spec.shape)
    else:
      item[index] = meta
      args[index] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=None if spec is None else spec.dtype)
  restored = ocp.PyTreeCheckpointHandler().restore(
    checkpoint.path,
    args=ocp.args.PyTreeRestore(
      item=jax.tree_util.tree_unflatten(treedef, item),
      restore_args=jax.tree_util.tree_unflatten(treedef, args),
    ),
  )
  values = jax.tree_util.tree_leaves(restored)
  return {name: values[checkpoint.variables[name].index] for name in targets}


def _materialize(value: Any, spec: jax.ShapeDtypeStruct | None) -> Any:
  """An in-memory value as an array: T5X's lazy arrays are read with `.get()`."""
  if hasattr(value, "get") and not isinstance(value, np.ndarray | jax.Array):
    value = value.get()
  if spec is None:
    return np.asarray(value)
  if spec.sharding is None:
    return np.asarray(value, dtype=spec.dtype)
  return jax.device_put(np.asarray(value, dtype=spec.dtype), spec.sharding)


def in_memory_checkpoint(tree: Any, description: str, step: int | None = None) -> Checkpoint:
  """A `Checkpoint` over a state dict already in memory (its leaves have shape and dtype).

  Args:
    tree: The state dict; leaves are arrays or lazy arrays with `shape` and `dtype`.
    description: How to name it in messages.
    step: Its step, if known.

  Returns:
    The checkpoint, whose `restore` returns values from `tree`.

  Examples:
    >>> import numpy as np
    >>> ckpt = in_memory_checkpoint({"w": np.ones(2)}, "<in memory>")
    >>> restore(ckpt, {"w": None})["w"].tolist()
    [1.0, 1.0]
  """
  variables = {v.name: v for v, _ in flatten_checkpoint_tree(tree)}
  return Checkpoint(
    path=epath.Path("."), requested=description, step=step, variables=variables, tree=tree, in_memory=True
  )


def list_variables(location: str | os.PathLike, *, item: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
  """Lists a checkpoint's names and shapes, like `tf.train.list_variables`.

  Names follow the naming contract (see `flax_warmstart.variable_names`), so
  they are the names that `WarmStartSettings` refers to. Reads metadata only.

  Args:
    location: A `CheckpointManager` root (latest step), a step directory or a
      checkpoint directory.
    item: The item to list in a step directory with several items.

  Returns:
    Sorted `(name, shape)` pairs.

  Raises:
    WarmStartError: If no checkpoint is found at `location`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"params": {"w": jnp.ones((2, 3))}})
    >>> list_variables(path)
    [('w', (2, 3))]
  """
  checkpoint = load_checkpoint(location, item=item)
  return sorted((v.name, v.shape) for v in checkpoint.variables.values())
