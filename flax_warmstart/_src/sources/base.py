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

import abc
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax

from flax_warmstart._src.naming import Variable


class Source(abc.ABC):
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

  def open_arrays(self, names: Iterable[str]) -> dict[str, Any]:
    """Arrays that can be read into buffers of our own: checkpoint name -> opened `tensorstore.TensorStore`.

    The default is none: every tensor goes through `restore`.

    Args:
      names: Checkpoint names.

    Returns:
      The names that can be read so, with their opened arrays (no data read).
    """
    del names
    return {}

  @abc.abstractmethod
  def restore(self, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
    """Reads only the named tensors.

    Args:
      targets: Checkpoint name -> a `jax.ShapeDtypeStruct` with a sharding (the
        tensor comes back as a `jax.Array` with that sharding and dtype), one
        without a sharding (a host numpy array of that dtype), or None (a host
        numpy array as saved).

    Returns:
      Checkpoint name -> value.
    """
