"""Checkpoint sources: one module per format, and `open_source`, which picks one from what is on disk.

Formats: Orbax (`orbax.py`; its 2023 layout in `orbax_legacy.py`), TensorFlow
(`tensorflow.py`), Flax msgpack (`flax_msgpack.py`), T5X (`t5x.py`),
safetensors (`safetensors.py`), npz (`npz.py`), and a state dict in memory
(`memory.py`, the T5X hook). `rundir.py` picks the step of a run directory
and `locate.py` holds the rule, `file://` URLs and the message for a path no
format reads. A new format is a new module with a `Source` subclass and a
recogniser added to `_FORMATS` below; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.sources import flax_msgpack, locate, npz, orbax_legacy, rundir, safetensors, t5x
from flax_warmstart._src.sources.base import Source
from flax_warmstart._src.sources.memory import MemorySource, in_memory_source
from flax_warmstart._src.sources.orbax import OrbaxSource, is_orbax, open_orbax
from flax_warmstart._src.sources.tensorflow import is_tensorflow, open_tensorflow

__all__ = ["MemorySource", "OrbaxSource", "Source", "in_memory_source", "open_source"]

# (recogniser, opener) per format, tried in order; then Orbax, for what is an
# Orbax checkpoint or a remote path, and otherwise `locate.unknown_layout`:
# what is at the path, and every layout read.
_FORMATS: list[tuple[Callable[[str], bool], Callable[..., Source]]] = [
  (is_tensorflow, open_tensorflow),
  # A directory holding flax_model.msgpack is read as Flax (its names are a
  # Flax model's) even when it also holds model.safetensors (PyTorch's names).
  (flax_msgpack.is_flax_msgpack_dir, flax_msgpack.open_flax_msgpack),
  (safetensors.is_safetensors, safetensors.open_safetensors),
  (npz.is_npz, npz.open_npz),
  (rundir.is_run_dir, rundir.open_run_dir),
  (t5x.is_t5x, t5x.open_t5x),
  (orbax_legacy.is_orbax_legacy, orbax_legacy.open_orbax_legacy),
  (flax_msgpack.is_flax_msgpack, flax_msgpack.open_flax_msgpack),
]


def open_source(
  location: str | os.PathLike | Source,
  *,
  item: str | None = None,
  prefer_names: Iterable[str] = (),
  step: locate.Step = None,
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
    step: Which step of a directory of steps (a `CheckpointManager` root, a
      run directory of `checkpoint_<step>` files or directories): None for
      the newest, a step number, or `"min:<metric>"` / `"max:<metric>"` for
      the best step by a metric saved with it (see `locate.choose_step`).

  Returns:
    The source: its `variables` (metadata), and `restore` for the tensors.

  Raises:
    WarmStartError: Saying what was found at `location` and which layouts
      are read, if no format recognises it; if `step` is given for a location
      without steps, or names a step that is not there.

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
  requested = os.fspath(location)
  path = locate.local_path(requested)
  if step is not None and isinstance(step, int) and is_tensorflow(path) and os.path.isdir(path):
    source = open_tensorflow(path, item=item, prefer_names=prefer_names, step=step)  # <prefix>-<step>
  elif step is not None:
    if not rundir.has_steps(path):
      raise WarmStartError(
        f"step={step!r} was asked for, but {requested} is not a directory of checkpoint steps (a CheckpointManager"
        " root or a run directory of checkpoint_<step> entries). Give such a directory, or no step."
      )
    source = rundir.open_run_dir(path, step=step, item=item, prefer_names=prefer_names)
  else:
    source = _open(requested, path, item, prefer_names)
  if path != requested and dataclasses.is_dataclass(source) and getattr(source, "requested", None) == path:
    source = dataclasses.replace(source, requested=requested)
  return source


def _open(requested: str, path: str, item: str | None, prefer_names: Iterable[str]) -> Source:
  for recognises, opener in _FORMATS:
    if recognises(path):
      return opener(path, item=item, prefer_names=prefer_names)
  if "://" not in path and not _orbax_may_read(path):
    raise locate.unknown_layout(requested, path)
  return open_orbax(path, item=item, prefer_names=prefer_names)


def _orbax_may_read(path: str) -> bool:
  """Whether Orbax should look at a local path: an Orbax checkpoint, or a directory where a save is in progress."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415

  directory = epath.Path(os.path.abspath(path))
  if not directory.is_dir():
    return False
  return is_orbax(directory) or any(ocp.path.step.is_tmp_checkpoint(p) for p in directory.iterdir())
