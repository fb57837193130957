"""Checkpoint sources: one module per format, and `open_source`, which picks one from what is on disk.

Formats today: Orbax (`orbax.py`) and a state dict in memory (`memory.py`, the
T5X hook). A new format is a new module with a `Source` subclass and a
recogniser added to `_FORMATS` below; nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from flax_warmstart._src.sources.base import Source
from flax_warmstart._src.sources.memory import MemorySource, in_memory_source
from flax_warmstart._src.sources.orbax import OrbaxSource, open_orbax

__all__ = ["MemorySource", "OrbaxSource", "Source", "in_memory_source", "open_source"]

# (recogniser, opener) per format, tried in order; Orbax last, as its opener
# also gives the error message for a path no format recognises.
_FORMATS: list[tuple[Callable[[str], bool], Callable[..., Source]]] = []


def open_source(
  location: str | os.PathLike | Source,
  *,
  item: str | None = None,
  prefer_names: Iterable[str] = (),
) -> Source:
  """Opens a checkpoint for reading: recognises its format and reads its metadata only.

  Args:
    location: A checkpoint location (for Orbax: a `CheckpointManager` root,
      whose latest step is used, a step directory or a checkpoint directory),
      or a `Source` already opened (returned as it is).
    item: The item to read where a location holds several (Orbax step
      directories with several items).
    prefer_names: Names of the live state; with several candidate items and no
      `item`, the item holding most of these names is read.

  Returns:
    The source: its `variables` (metadata), and `restore` for the tensors.

  Raises:
    WarmStartError: Saying what was found at `location` and which layouts
      are read, if no format recognises it.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"w": jnp.ones(3)})
    >>> source = open_source(path)
    >>> source.format, sorted(source.variables)
    ('orbax', ['w'])
  """
  if isinstance(location, Source):
    return location
  path = os.fspath(location)
  for recognises, opener in _FORMATS:
    if recognises(path):
      return opener(path, item=item, prefer_names=prefer_names)
  return open_orbax(path, item=item, prefer_names=prefer_names)
