"""The Flax msgpack source: `flax.training.checkpoints` step files and Hugging Face's `flax_model.msgpack`.

A location may be a msgpack file (`checkpoint_20` written by
`flax.training.checkpoints.save_checkpoint` with the msgpack backend, or
`flax_model.msgpack`), or a directory holding `flax_model.msgpack`. A run
directory of `checkpoint_<step>` files is resolved to its newest step first
(`flax_warmstart._src.sources.rundir`). The file holds the state dict that
`flax.serialization.to_state_dict` made (a `TrainState` as `{"step",
"params", "opt_state": {"0": {"mu", ...}}}`), so names follow the naming
contract as for the same state saved by Orbax. The tree is read with
`msgpack_tree.read_tree`: arrays are located, not read, and each tensor is
read on request.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from flax_warmstart._src.sources.lazy import TreeSource, as_leaves, tree_source
from flax_warmstart._src.sources.locate import step_value
from flax_warmstart._src.sources.msgpack_tree import read_tree, starts_with_map

HF_FILE = "flax_model.msgpack"


class FlaxMsgpackSource(TreeSource):
  """A Flax msgpack file opened for reading; see the module doc."""

  format: ClassVar[str] = "flax-msgpack"


def is_flax_msgpack(path: str) -> bool:
  """Whether `path` is a msgpack state-dict file."""
  return os.path.isfile(path) and starts_with_map(path)


def is_flax_msgpack_dir(path: str) -> bool:
  """Whether `path` is a directory holding Hugging Face's `flax_model.msgpack`."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_FILE))


def open_flax_msgpack(location: str, **_: Any) -> FlaxMsgpackSource:
  """Opens a Flax msgpack file and reads its structure (names, shapes, dtypes, offsets).

  Args:
    location: A msgpack file, or a directory holding `flax_model.msgpack`.

  Returns:
    The source; its step is the file's (`checkpoint_20` -> 20), if named so.

  Raises:
    WarmStartError: Naming the file, if it is truncated or damaged.

  Examples:
    >>> import tempfile, numpy as np
    >>> from flax import serialization
    >>> run = tempfile.mkdtemp()
    >>> with open(run + "/checkpoint_7", "wb") as f:
    ...   _ = f.write(serialization.to_bytes({"params": {"w": np.ones(3)}, "step": 7}))
    >>> source = open_flax_msgpack(run + "/checkpoint_7")
    >>> source.step, sorted(source.variables)
    (7, ['step', 'w'])
  """
  path = os.path.join(location, HF_FILE) if os.path.isdir(location) else location
  tree = as_leaves(read_tree(path))
  name = os.path.basename(path)
  step = step_value(name) if name != HF_FILE else None
  return tree_source(FlaxMsgpackSource, tree, path=path, requested=location, step=step, files=[path])
