"""The T5X source: T5X's native checkpoints (`use_orbax=False`), the layout of the public T5/mT5/ByT5 releases.

A T5X step directory (`checkpoint_<step>/`) holds a msgpack file `checkpoint`
with `{"version": 3, "optimizer": state_dict}` (T5X's `Checkpointer.save`),
where `state_dict` is `{"target": params, "state": {"step": ...,
"param_states": {...}}}`. Each partitioned array's leaf is the TensorStore
spec (JSON) T5X wrote it with: a zarr array whose key-value store path is
relative to the step directory (`target.encoder.layers_0.mlp.wi.kernel`),
under `kvstore.path` or (tensorstore < 0.1.14) the spec's own `path`, with a
`gcs`, `gfile` or `file` driver; unpartitioned leaves (the step) are stored in
the msgpack file itself. As T5X's `_read_ts` does, the path is resolved
against the step directory the checkpoint is read from (the driver recorded
is ignored), so a copied or downloaded release reads where it lies.

Names are those of `flax_warmstart.t5x` (params under `target`, slots
`<param>/state/param_states/<slot>`, `state/step`). A model directory of
`checkpoint_<step>` directories is resolved to its newest step first
(`sources.rundir`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax
import numpy as np

from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.sources.lazy import StoreArray, TreeSource, as_leaves, tree_source
from flax_warmstart._src.sources.locate import step_value
from flax_warmstart._src.sources.msgpack_tree import read_tree, starts_with_map
from flax_warmstart._src.sources.rundir import MSGPACK_FILE


class T5XSource(TreeSource):
  """A T5X native checkpoint opened for reading; see the module doc."""

  format: ClassVar[str] = "t5x"


def _is_spec(x: Any) -> bool:
  return isinstance(x, dict) and {"driver", "kvstore", "metadata"} <= set(x)


def _directory(location: str) -> str:
  return os.path.dirname(location) if os.path.isfile(location) else location


def is_t5x(path: str) -> bool:
  """Whether `path` is a T5X step directory (or its `checkpoint` file)."""
  file = os.path.join(_directory(path), MSGPACK_FILE)
  if not starts_with_map(file):
    return False
  try:
    tree = read_tree(file)
  except WarmStartError:
    return False  # left to the legacy Orbax reader, which names the damaged file
  return isinstance(tree, dict) and {"version", "optimizer"} <= set(tree)


def open_t5x(location: str, **_: Any) -> T5XSource:
  """Opens a T5X checkpoint: reads its msgpack file; arrays are opened (TensorStore) on request.

  Args:
    location: A T5X step directory or its `checkpoint` file.

  Returns:
    The source; its step is the directory's (`checkpoint_1000` -> 1000).

  Raises:
    WarmStartError: Naming the file, if the msgpack file is damaged or a spec
      cannot be understood.
  """
  path = os.path.abspath(_directory(location))
  file = os.path.join(path, MSGPACK_FILE)
  state = read_tree(file)["optimizer"]

  def leaf(x: Any) -> Any:
    return _store(x, path, file) if _is_spec(x) else x

  tree = as_leaves(state, leaf, is_leaf=_is_spec)
  return tree_source(
    T5XSource, tree, path=path, requested=location, step=step_value(os.path.basename(path)), files=[file]
  )


def _store(spec: dict[str, Any], directory: str, file: str) -> StoreArray:
  """An array's saved TensorStore spec, its path resolved against `directory` (T5X's `_read_ts`)."""
  try:
    relative = spec["kvstore"].get("path") or spec["path"]
    metadata = spec["metadata"]
    shape = metadata["shape"]
    shape = tuple(int(shape[str(i)]) for i in range(len(shape))) if isinstance(shape, dict) else tuple(map(int, shape))
    dtype = np.dtype(jax.numpy.dtype(spec.get("dtype") or metadata["dtype"]))
  except (KeyError, TypeError, AttributeError) as err:
    raise WarmStartError(
      f"{file} holds an array spec that cannot be read ({type(err).__name__}: {err}): {spec}."
    ) from err
  location = os.path.join(directory, relative)
  kvstore: Any = location if "://" in location else {"driver": "file", "path": location}
  return StoreArray({"driver": spec["driver"], "kvstore": kvstore}, shape, dtype)
