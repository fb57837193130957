"""The read stage: how each tensor a plan loads is read, and where it is placed.

One place decides, per tensor, between:

* **our own buffers** (`hostread`): in a single process, where the target is
  host memory or a single CPU device and the source hands out its arrays
  (`Source.open_arrays`: Orbax's TensorStore arrays). Each tensor (for a
  vocabulary gather, only the old rows the new table keeps, in their new
  places) is read straight into a 64-byte-aligned buffer that
  `jax.device_put` adopts without a copy;
* **the source's own read** (`Source.restore`): sharded targets (Orbax reads
  shard by shard, each placed on its device; an old vocabulary table sharded
  off its vocabulary axis, so the gather stays local), multi-process runs,
  and sources without direct array access (an in-memory state dict).

Each tensor feeding several leaves is read once per target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from flax_warmstart._src import hostread, report
from flax_warmstart._src import transform as transform_lib
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.planning import Action, LeafPlan, WarmStartPlan

# Reads into our own buffers keep at most max(this, a tenth of their bytes) in flight.
MIN_BYTES_IN_FLIGHT = 64 << 20


@dataclasses.dataclass
class Fetched:
  """A tensor read for one leaf.

  Attributes:
    value: The value read: the whole tensor, or for a host read with a gather,
      the new table with the kept rows in place.
    taken: Whether the row's `Take` already ran during the read (only the
      rows to fill, index -1, are left).
  """

  value: Any
  taken: bool = False


def host_target(row: LeafPlan, live: Any) -> bool:
  """Whether a tensor can be read straight into the leaf's own memory: host memory or one CPU device."""
  if row.remap is not None:
    return transform_lib.host_gather_ok(row.remap, live)
  if isinstance(live, np.ndarray):
    return True
  return transform_lib.on_one_cpu(live)


def restore_spec(leaf: Any, row: LeafPlan) -> jax.ShapeDtypeStruct | None:
  """How the source reads a tensor for this live leaf: sharded like it, or to host.

  An old vocabulary table is read sharded off its vocabulary axis (see
  `transform.table_sharding`), for a local gather.
  """
  if not isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
    return None
  if row.remap is None:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if transform_lib.host_gather_ok(row.remap, leaf):  # to host memory, gathered there
    return jax.ShapeDtypeStruct(row.source_shape, leaf.dtype)
  sharding = transform_lib.table_sharding(leaf.sharding, row.source_shape, row.remap.info.axis)
  return jax.ShapeDtypeStruct(row.source_shape, leaf.dtype, sharding=sharding)


def _host_read(store: Any, row: LeafPlan, live: Any) -> hostread.Read:
  label = f"{row.source!r} (for {row.name!r}) from {row.checkpoint.describe()}"
  take = row.take
  if take is None:
    return hostread.whole(store, live.dtype, label=label)
  return hostread.rows(store, take.index, row.shape, live.dtype, take.axis, label=label)


def read_inputs(
  plan: WarmStartPlan, live: Sequence[Any], update: Callable[[str], None] = lambda message: None
) -> dict[int, Fetched]:
  """Reads what the plan's `LOAD` rows need, each tensor placed for its leaf.

  Args:
    plan: The plan.
    live: The live leaves in the plan's order (abstract ones placed: each has
      a sharding).
    update: Called with the current phase, for a progress display.

  Returns:
    Row index -> what was read for it.

  Raises:
    WarmStartError: If a read fails (naming the tensor, the leaf and the
      checkpoint).
  """
  loading = [i for i, row in enumerate(plan.leaves) if row.action is Action.LOAD]
  direct: dict[int, hostread.Read] = {}
  targets: dict[int, dict[str, jax.ShapeDtypeStruct | None]] = {id(c): {} for c in plan.checkpoints}
  for c in plan.checkpoints:
    c.check_unchanged()
    mine = [i for i in loading if plan.leaves[i].checkpoint is c]
    stores = c.open_arrays({plan.leaves[i].source for i in mine if host_target(plan.leaves[i], live[i])})
    for i in mine:
      row = plan.leaves[i]
      if row.source in stores:
        _check_shape(row, tuple(stores[row.source].shape))
        direct[i] = _host_read(stores[row.source], row, live[i])
      elif row.source not in targets[id(c)]:
        targets[id(c)][row.source] = restore_spec(live[i], row)
  where = ", ".join(c.describe() for c in plan.checkpoints)
  update(f"Reading {len(loading)} tensors ({report.human_bytes(plan.nbytes)}) from {where}")
  reads = list(direct.values())
  hostread.run(reads, max_bytes_in_flight=max(MIN_BYTES_IN_FLIGHT, sum(r.nbytes for r in reads) // 10))
  # The source's reads are waited for (their host staging buffers freed)
  # before the gathers allocate their outputs.
  restored = {id(c): jax.block_until_ready(c.restore(targets[id(c)])) for c in plan.checkpoints}
  out = {}
  for i in loading:
    row = plan.leaves[i]
    if i in direct:
      out[i] = Fetched(direct.pop(i).out, taken=row.take is not None)
    else:
      value = restored[id(row.checkpoint)][row.source]
      _check_shape(row, tuple(np.shape(value)))
      out[i] = Fetched(value)
  return out


def _check_shape(row: LeafPlan, found: tuple[int, ...]) -> None:
  """A tensor read must have the shape the plan was made for (the checkpoint may have been rewritten)."""
  if row.source_shape is not None and found != tuple(row.source_shape):
    raise WarmStartError(
      f"Checkpoint tensor {row.source!r} (for {row.name!r}) in {row.checkpoint.describe()} has shape {found},"
      f" but the plan was made for {tuple(row.source_shape)}: the checkpoint changed after it was planned from."
      " Build the plan again for the checkpoint as it is now."
    )
