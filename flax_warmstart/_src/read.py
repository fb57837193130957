"""The read stage: how each tensor a plan loads is read, and where it is placed.

One place decides, per tensor, between:

* **our own buffers** (`hostread`), wherever the source hands out its arrays
  (`Source.open_arrays`: Orbax's TensorStore arrays, memory maps of raw
  formats). Where the target is host memory or a single CPU device, each
  tensor (for a vocabulary gather, only the old rows the new table keeps, in
  their new places) is read straight into a 64-byte-aligned buffer that
  `jax.device_put` adopts without a copy. Where the target is sharded, each
  addressable shard is read on its own (for a gather: only the old rows that
  shard keeps, of that shard's columns) into its own buffer, the rows new to
  the vocabulary filled there, and placed on its device
  (`jax.make_array_from_single_device_arrays`); the old table never exists
  whole, resharded or twice, and each process reads only its shards;
* **the source's own read** (`Source.restore`): sources without direct array
  access (an in-memory state dict), values that are not arrays, a gather
  whose new rows need statistics of the whole old table (`MeanOfOldRows`),
  and a large tensor saved as one chunk going to several shards (each shard
  would decode the whole chunk).

Each tensor feeding several leaves is read once per target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flax_warmstart._src import hostread, report
from flax_warmstart._src import transform as transform_lib
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.rows import Action, LeafPlan, WarmStartPlan

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
    filled: Whether those rows are filled too (a sharded read): `value` is
      the leaf's final value but for the cast.
  """

  value: Any
  taken: bool = False
  filled: bool = False


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


def shard_target(row: LeafPlan, live: Any) -> bool:
  """Whether a tensor is read shard by shard into buffers of our own: a placed leaf, not on the host path.

  Not when a gather's new rows need statistics of the whole old table
  (`MeanOfOldRows`, `MeanCovarianceOfOldRows`): the source's sharded read and
  the device gather compute them.
  """
  if not isinstance(live, jax.Array | jax.ShapeDtypeStruct) or live.sharding is None or host_target(row, live):
    return False
  return row.remap is None or not transform_lib.needs_old_table(row.remap)


class _ShardedRead:
  """The reads of one tensor's addressable shards (one buffer per distinct region), and their assembly on the devices.

  A plain tensor is read region by region (`hostread.region`); a vocabulary
  gather decodes each old chunk once and scatters its kept rows into every
  region's buffer that wants them (`hostread.gather_shards`).
  """

  def __init__(self, store: Any, row: LeafPlan, live: Any, fill: Any, label: str) -> None:
    self.row, self.live = row, live
    self.shape = tuple(row.shape)
    self.index_map = live.sharding.addressable_devices_indices_map(self.shape)
    self.fill = None if fill is None else np.asarray(fill)
    self.regions = {self._key(idx): idx for idx in self.index_map.values()}  # distinct, in device order
    take = row.take
    if take is None:
      self.reads = {key: hostread.region(store, idx, live.dtype, label=label) for key, idx in self.regions.items()}
      self.outs = {key: read.out for key, read in self.reads.items()}
      return
    outs, reads = hostread.gather_shards(
      store, take.index, self.shape, live.dtype, take.axis, list(self.regions.values()), label=label
    )
    self.outs = dict(zip(self.regions, outs, strict=True))
    self.reads = dict(enumerate(reads))

  def _key(self, idx: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(idx, self.shape, strict=True))

  def assemble(self) -> jax.Array:
    take = self.row.take
    if take is not None:  # the rows new to the vocabulary, in each shard's buffer
      fill_index = transform_lib.fill_index_of(take.remap)
      for key, idx in self.regions.items():
        window = tuple(slice(None) if d == take.axis else s for d, s in enumerate(idx))
        fill = None if self.fill is None else self.fill[window]
        sub = take.index[idx[take.axis]]
        transform_lib.fill_missing(self.outs[key], sub, fill, fill_index[idx[take.axis]], axis=take.axis)
    arrays = [jax.device_put(self.outs[self._key(idx)], device) for device, idx in self.index_map.items()]
    return jax.make_array_from_single_device_arrays(self.shape, self.live.sharding, arrays)


def _host_read(store: Any, row: LeafPlan, live: Any) -> hostread.Read:
  label = f"{row.source!r} (for {row.name!r}) from {row.checkpoint.describe()}"
  take = row.take
  if take is None:
    return hostread.whole(store, live.dtype, label=label)
  return hostread.rows(store, take.index, row.shape, live.dtype, take.axis, label=label)


def read_inputs(
  plan: WarmStartPlan,
  live: Sequence[Any],
  update: Callable[[str], None] = lambda message: None,
  fills: Mapping[int, Any] | None = None,
) -> dict[int, Fetched]:
  """Reads what the plan's `LOAD` rows need, each tensor placed for its leaf.

  Args:
    plan: The plan.
    live: The live leaves in the plan's order (abstract ones placed: each has
      a sharding).
    update: Called with the current phase, for a progress display.
    fills: Row index -> the fill rows of its gather (`transform.initial_fill`),
      for the gathers that run shard by shard here.

  Returns:
    Row index -> what was read for it.

  Raises:
    WarmStartError: If a read fails (naming the tensor, the leaf and the
      checkpoint).
  """
  fills = fills or {}
  # Rows that load through a rule's transform tree are read by `chain.run`.
  loading = [i for i, row in enumerate(plan.leaves) if row.action is Action.LOAD and row.expr is None]
  direct: dict[int, hostread.Read] = {}
  sharded: dict[int, _ShardedRead] = {}
  targets: dict[int, dict[str, jax.ShapeDtypeStruct | None]] = {id(c): {} for c in plan.checkpoints}
  for c in plan.checkpoints:
    c.check_unchanged()
    mine = [i for i in loading if plan.leaves[i].checkpoint is c]
    wanted = {plan.leaves[i].source for i in mine if host_target(plan.leaves[i], live[i])}
    wanted |= {plan.leaves[i].source for i in mine if shard_target(plan.leaves[i], live[i])}
    stores = c.open_arrays(wanted)
    for i in mine:
      row = plan.leaves[i]
      store = stores.get(row.source)
      if store is not None:
        _check_shape(row, tuple(store.shape))
      label = f"{row.source!r} (for {row.name!r}) from {c.describe()}"
      if store is not None and host_target(row, live[i]):
        direct[i] = _host_read(store, row, live[i])
      elif store is not None and shard_target(row, live[i]) and not hostread.is_single_chunk(store):
        sharded[i] = _ShardedRead(store, row, live[i], fills.get(i), label)
      elif row.source not in targets[id(c)]:
        targets[id(c)][row.source] = restore_spec(live[i], row)
  where = ", ".join(c.describe() for c in plan.checkpoints)
  update(f"Reading {len(loading)} tensors ({report.human_bytes(plan.nbytes)}) from {where}")
  reads = list(direct.values()) + [read for s in sharded.values() for read in s.reads.values()]
  hostread.run(reads, max_bytes_in_flight=max(MIN_BYTES_IN_FLIGHT, sum(r.nbytes for r in reads) // 10))
  # The source's reads are waited for (their host staging buffers freed)
  # before the gathers allocate their outputs.
  restored = {id(c): jax.block_until_ready(c.restore(targets[id(c)])) for c in plan.checkpoints}
  out = {}
  for i in loading:
    row = plan.leaves[i]
    if i in direct:
      out[i] = Fetched(direct.pop(i).out, taken=row.take is not None)
    elif i in sharded:
      out[i] = Fetched(sharded.pop(i).assemble(), taken=row.take is not None, filled=True)
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
