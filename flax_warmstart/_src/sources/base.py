"""The source interface: a checkpoint's tensor metadata, and its tensors on request.

A source answers two questions (DESIGN.md, "Sources"): which tensors do you
hold (`variables`: names under the naming contract, shapes, dtypes; metadata
only), and give me these tensors, placed like this (`restore`). A source that
can hand out its arrays for reading into buffers of our own (Orbax's
TensorStore arrays) also implements `open_arrays`; the read stage
(`flax_warmstart._src.read`) then reads them straight into the live leaf's
memory, only the rows a vocabulary remap keeps.

One module per format implements it; `open_source` (in this package's
`__init__`) picks the module from what is on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from flax_warmstart._src.naming import Variable


class Source:
  """A checkpoint opened for reading: metadata read, no array yet.

  Attributes:
    format: The format's name, for messages and reports (`"orbax"`).
    requested: The location the user gave (or a description of an in-memory
      state dict).
    step: The training step, when the location names one.
    variables: Checkpoint name -> `Variable` (shape, dtype), in tree order,
      under the naming contract.
  """

  format: ClassVar[str] = "?"
  requested: str
  step: int | None
  variables: Mapping[str, Variable]

  def describe(self) -> str:
    """The location given plus the step, for messages: `/runs/old@step 20`."""
    return f"{self.requested}@step {self.step}" if self.step is not None else self.requested

  @property
  def location(self) -> str:
    """Where the tensors are read from (the resolved directory), for reports."""
    return self.requested

  def check_unchanged(self) -> None:
    """Raises `WarmStartError` if the checkpoint changed on disk since its metadata was read.

    The read stage calls it before reading, so that a plan made before the
    checkpoint was rewritten is never executed against the new files. The
    default checks nothing; file-based sources compare what they recorded
    when opened (e.g. the metadata file's size and modification time).
    """

  def open_arrays(self, names: Iterable[str]) -> dict[str, Any]:
    """Saved arrays that can be read lazily, part by part, into buffers of our own.

    Each is a `tensorstore.TensorStore`, or a numpy-like array read on
    indexing: a `numpy.memmap` over a file's raw bytes (safetensors, npz,
    TensorFlow bundles store tensors so), or any object with `shape`,
    `dtype` and numpy indexing by slices and at most one 1-D integer array.
    The read stage reads whole tensors, a vocabulary's kept rows, or each
    device's shard from them. The default is none: every tensor goes
    through `restore`.

    Args:
      names: Checkpoint names.

    Returns:
      The names that can be read so, with their opened arrays (no data read).
    """
    del names
    return {}

  def restore(self, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
    """Reads only the named tensors.

    The default reads from `open_arrays`: a sharded target is assembled shard
    by shard (`jax.make_array_from_callback`: each process reads only its
    addressable shards' parts), a host target is read whole. Sources whose
    arrays are not lazily readable override it.

    Args:
      targets: Checkpoint name -> a `jax.ShapeDtypeStruct` with a sharding (the
        tensor comes back as a `jax.Array` with that sharding and dtype), one
        without a sharding (a host numpy array of that dtype), or None (a host
        numpy array as saved).

    Returns:
      Checkpoint name -> value.
    """
    arrays = self.open_arrays(targets)
    missing = sorted(set(targets) - set(arrays))
    if missing:
      raise NotImplementedError(f"{type(self).__name__} cannot read {missing}: it must implement restore.")
    out = {}
    for name, spec in targets.items():
      array = arrays[name]
      if spec is None:
        out[name] = np.asarray(array[...] if hasattr(array, "__getitem__") else array)
      elif spec.sharding is None:
        out[name] = np.asarray(array[...], dtype=spec.dtype)
      else:
        dtype = spec.dtype
        out[name] = jax.make_array_from_callback(
          tuple(array.shape), spec.sharding, lambda index, a=array, d=dtype: np.asarray(a[index], dtype=d)
        )
    return out
