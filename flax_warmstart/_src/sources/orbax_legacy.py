"""The legacy Orbax source: 2023 checkpoints whose structure (and small arrays) are in a msgpack `checkpoint` file.

Orbax up to 0.4 (and Flax's `save_checkpoint` with its Orbax backend, through
`orbax_utils.save_args_from_target`) wrote each item as a directory with a
msgpack file named `checkpoint` holding the whole tree: an *aggregated* leaf
is stored in it (a Flax-encoded array or a plain value), every other leaf is
the string `PLACEHOLDER://<name>` and its array is a TensorStore array named
`<name>` in the directory (zarr, or OCDBT where `manifest.ocdbt` exists).
Orbax 0.3 wrote no `_METADATA` beside it. Today's Orbax reader lists the
aggregated leaves as `() object`; this source reads both kinds: aggregated
arrays are located in the msgpack file (`msgpack_tree`) and read on request,
the others are opened with Orbax's own TensorStore spec.

A directory is read here when it holds a msgpack `checkpoint` file that is
not T5X's and either has no `_METADATA` or stores at least one leaf inline;
a directory whose every leaf is a placeholder and that has `_METADATA` is
left to today's Orbax reader. A step directory of such items (a 2023
`CheckpointManager` step: `<step>/default/checkpoint`) is read too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

import jax
import numpy as np

from flax_warmstart._src.errors import DAMAGED_HINT, WarmStartError
from flax_warmstart._src.sources.lazy import RowArray, StoreArray, TreeSource, Value, as_leaves, tree_source
from flax_warmstart._src.sources.locate import step_value
from flax_warmstart._src.sources.msgpack_tree import read_tree, starts_with_map
from flax_warmstart._src.sources.rundir import MSGPACK_FILE

PLACEHOLDER = "PLACEHOLDER://"
_PREFERRED_ITEMS = ("default", "state", "train_state")


class LegacyOrbaxSource(TreeSource):
  """A 2023 Orbax checkpoint (msgpack `checkpoint` file plus TensorStore arrays); see the module doc."""

  format: ClassVar[str] = "orbax-legacy"


def _is_item(path: str) -> bool:
  file = os.path.join(path, MSGPACK_FILE)
  if not starts_with_map(file):
    return False
  try:
    tree = read_tree(file)
  except WarmStartError:
    return True  # damaged: claimed, so that opening it names the file
  if isinstance(tree, dict) and {"version", "optimizer"} <= set(tree):
    return False  # T5X's
  if not os.path.isfile(os.path.join(path, "_METADATA")):
    return True
  leaves = jax.tree_util.tree_leaves(tree)
  return any(not (isinstance(x, str) and x.startswith(PLACEHOLDER)) for x in leaves)


def _items(path: str) -> list[str]:
  """The item directories of a step directory (names that are not steps: those make a run directory)."""
  return sorted(
    n
    for n in os.listdir(path)
    if step_value(n) is None and os.path.isdir(os.path.join(path, n)) and _is_item(os.path.join(path, n))
  )


def is_orbax_legacy(path: str) -> bool:
  """Whether `path` is a legacy Orbax item directory (or its `checkpoint` file), or a step directory of such items."""
  if os.path.isfile(path) and os.path.basename(path) == MSGPACK_FILE:
    path = os.path.dirname(path) or "."
  return os.path.isdir(path) and (_is_item(path) or bool(_items(path)))


def open_orbax_legacy(
  location: str, *, item: str | None = None, prefer_names: Iterable[str] = (), **_: Any
) -> LegacyOrbaxSource:
  """Opens a legacy Orbax checkpoint: reads its msgpack tree and opens each placeholder's metadata.

  Args:
    location: An item directory (or its `checkpoint` file), or a step
      directory of items.
    item: The item to read in a step directory with several.
    prefer_names: Names of the live state; with several items and no `item`,
      the item holding most of them is read.

  Returns:
    The source.

  Raises:
    WarmStartError: Naming the file, if the msgpack file is damaged or an
      array is missing; if the item is ambiguous or not there.
  """
  path = os.path.dirname(location) if os.path.isfile(location) else location
  path = os.path.abspath(path)
  step = step_value(os.path.basename(path))
  if not _is_item(path):
    items = _items(path)
    if item is not None:
      if item not in items:
        raise WarmStartError(
          f"No item {item!r} in checkpoint step {path}; its items are {items}. Set ckpt_item to one of them."
        )
      return _open_item(os.path.join(path, item), location, step)
    candidates = [_open_item(os.path.join(path, n), location, step) for n in items]
    prefer = set(prefer_names)
    scores = [len(prefer & set(c.variables)) for c in candidates]
    best = [c for c, s in zip(candidates, scores, strict=True) if s == max(scores)]
    if len(best) > 1:
      named = [c for c in best if os.path.basename(c.path) in _PREFERRED_ITEMS]
      best = sorted(named, key=lambda c: _PREFERRED_ITEMS.index(os.path.basename(c.path)))[:1] or best
    if len(best) == 1:
      return best[0]
    raise WarmStartError(
      f"Checkpoint step {path} holds several items ({items}) and none matches the state better than the others."
      " Name the one to read with WarmStartSettings(ckpt_item=...)."
    )
  return _open_item(path, location, step)


def _open_item(path: str, requested: str, step: int | float | None) -> LegacyOrbaxSource:
  file = os.path.join(path, MSGPACK_FILE)
  tree = read_tree(file)
  placeholders = [
    x[len(PLACEHOLDER) :] for x in jax.tree_util.tree_leaves(tree) if isinstance(x, str) and x.startswith(PLACEHOLDER)
  ]
  stores = _open_stores(path, placeholders)

  def leaf(x: Any) -> Any:
    if x is None:
      return None
    if isinstance(x, str) and x.startswith(PLACEHOLDER):
      return stores[x[len(PLACEHOLDER) :]]
    return x if isinstance(x, RowArray | Value) else Value(x)

  return tree_source(LegacyOrbaxSource, as_leaves(tree, leaf), path=path, requested=requested, step=step, files=[file])


def _open_stores(path: str, names: list[str]) -> dict[str, StoreArray]:
  """Each placeholder's array, its metadata read (shape, dtype) with Orbax's TensorStore spec."""
  if not names:
    return {}
  import orbax.checkpoint as ocp  # noqa: PLC0415
  import tensorstore as ts  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415

  from flax_warmstart._src.sources.orbax_metadata import ts_context  # noqa: PLC0415

  use_ocdbt = os.path.isfile(os.path.join(path, "manifest.ocdbt"))
  context = ts_context(use_ocdbt)
  specs = {}
  for name in names:
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(path), use_zarr3=False, ts_context=context)
    specs[name] = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
  opening = {name: ts.open(spec, open=True, context=context) for name, spec in specs.items()}
  out = {}
  for name, future in opening.items():
    try:
      store = future.result()
    except Exception as err:
      raise WarmStartError(
        f"The array {name!r} of the legacy Orbax checkpoint {path} cannot be opened ({os.path.join(path, name)}):"
        f" {type(err).__name__}: {err}. {DAMAGED_HINT}"
      ) from err
    out[name] = StoreArray(specs[name], tuple(store.shape), np.dtype(store.dtype.numpy_dtype), context)
  return out
