"""Run directories: a directory of `<prefix>_<step>` checkpoints, read at one step (the newest unless asked).

`flax.training.checkpoints.save_checkpoint` writes `checkpoint_<step>` into
its directory: a msgpack file (msgpack backend), an Orbax checkpoint directory
(Orbax backend; arrays inside its msgpack `checkpoint` file before 2024), and
T5X writes `checkpoint_<step>` directories of its own. A `CheckpointManager`
root (`<step>/<item>/`) is Orbax's to resolve (`sources.orbax`), by the same
rule (newest step), except when a step is asked for: then it is resolved here.
The step is picked by `locate.choose_step`; the entry is opened by
`open_source` and reported with the run directory as its location.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from flax_warmstart._src.sources.base import Source
from flax_warmstart._src.sources.locate import Step, choose_step, steps_in
from flax_warmstart._src.sources.msgpack_tree import starts_with_map

MSGPACK_FILE = "checkpoint"
_ORBAX_FILE = "_METADATA"


def is_checkpoint_dir(path: str) -> bool:
  """Whether a directory is itself one checkpoint: Orbax's `_METADATA` or a msgpack `checkpoint` file in it."""
  return os.path.isfile(os.path.join(path, _ORBAX_FILE)) or starts_with_map(os.path.join(path, MSGPACK_FILE))


def _direct_step(entry: str) -> bool:
  """A step entry that is a checkpoint itself (a msgpack file, or a checkpoint directory), or a step directory
  whose items are msgpack-based (legacy Orbax `CheckpointManager`)."""
  if os.path.isfile(entry):
    return starts_with_map(entry)
  if not os.path.isdir(entry):
    return False
  if is_checkpoint_dir(entry):
    return True
  return any(starts_with_map(os.path.join(entry, n, MSGPACK_FILE)) for n in os.listdir(entry))


def _any_step(entry: str) -> bool:
  """Any step entry, a `CheckpointManager` step (`<step>/<item>/_METADATA`) included."""
  if _direct_step(entry):
    return True
  return os.path.isdir(entry) and any(is_checkpoint_dir(os.path.join(entry, n)) for n in os.listdir(entry))


def is_run_dir(path: str) -> bool:
  """Whether `path` is a run directory of `<prefix>_<step>` checkpoints that is not Orbax's to resolve."""
  return os.path.isdir(path) and not is_checkpoint_dir(path) and bool(steps_in(path, _direct_step))


def has_steps(path: str) -> bool:
  """Whether `path` is a directory of step checkpoints of any kind (a `CheckpointManager` root included)."""
  return os.path.isdir(path) and not is_checkpoint_dir(path) and bool(steps_in(path, _any_step))


def open_run_dir(
  location: str, *, step: Step = None, item: str | None = None, prefer_names: Iterable[str] = (), **_: Any
) -> Source:
  """Opens one step of a run directory: the newest, or the one asked for.

  Args:
    location: The run directory.
    step: None for the newest step, a step number, or `"min:<metric>"` /
      `"max:<metric>"` (see `locate.choose_step`).
    item: Passed on to the step's source (an item of an Orbax step).
    prefer_names: Passed on to the step's source.

  Returns:
    The step's source, its `requested` the run directory and its `step` the
    step chosen.

  Raises:
    WarmStartError: If the step asked for is not there (listing those that are).

  Examples:
    >>> import tempfile, numpy as np
    >>> from flax import serialization
    >>> run = tempfile.mkdtemp()
    >>> for s in (5, 10, 0.5):
    ...   with open(f"{run}/checkpoint_{s}", "wb") as f:
    ...     _ = f.write(serialization.to_bytes({"w": np.full(2, s)}))
    >>> open_run_dir(run).step, open_run_dir(run, step=0.5).step
    (10, 0.5)
  """
  from flax_warmstart._src.sources import open_source  # noqa: PLC0415 (the package imports this module)

  steps = steps_in(location, _any_step if step is not None else _direct_step)
  chosen, entry = choose_step(location, steps, step)
  source = open_source(entry, item=item, prefer_names=prefer_names)
  if dataclasses.is_dataclass(source):
    source = dataclasses.replace(source, requested=location, step=chosen)
  return source
