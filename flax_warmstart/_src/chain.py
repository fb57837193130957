"""Executing the transforms of rename rules (`surgery.Node` trees) for the leaves that load through them.

Memory-bounded by construction, in three phases over all such leaves:

1. **Plan the reads.** Each tensor a tree reads becomes one read into a
   64-byte-aligned host buffer of its own (`hostread`): only the slice a
   `Take` of one layer needs (the plan pushed the index into the read), only
   the rows a `Take` of a list needs, and each layer of a `Stack` straight
   into its slot of the output. Tensors of a source that hands out no lazily
   readable arrays are restored once each, whole, through the source.
   The slices of one saved array that all leaves together read (every
   layer of a scanned stack that an unrolled model takes, with its Adam
   slots) are gathered: when the array is one stored chunk (as Orbax writes
   an array saved from one device) that chunk is decoded once, streamed in
   4 MiB pieces, each piece's rows copied into every slice's buffer that
   wants them (`_SlicedArrays`). TensorStore would decode the whole chunk
   once per slice, 24 times for a 24-layer stack, each into a temporary of
   the chunk's size.
2. **Read**, all leaves together, at most a bounded number of bytes in
   flight (`hostread.run`).
3. **Compute** the rest of each tree on the host (`numpy.transpose`,
   `reshape`, the copies of a `Broadcast` and its noise), into an aligned
   buffer; `transform.conform` then places it as the live leaf is placed
   (adopted without a copy on one CPU device). A leaf split over several
   devices is computed shard by shard instead (`_Inputs.prepare_region`):
   each shard's region is mapped back through the tree, only its part of the
   inputs is read, and each device adopts its own buffer, so a process reads
   and holds only its shards. The index operations run on the host, where
   the reads land: no device holds more than its shard, and nothing is
   compiled per chain.

Nothing here reads more than the plan's `nbytes`, and no tensor is held
twice but for one leaf's transpose or reshape.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from flax_warmstart._src import hostread
from flax_warmstart._src.arrays import aligned_empty
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.rows import Action, LeafPlan, WarmStartPlan
from flax_warmstart._src.surgery import Node

Thunk = Callable[[], np.ndarray]
# The byte ranges a gathered array is streamed in (and its scratch block): several stream at once.
_PIECE_BYTES = 1 << 22
# A whole array at least this large that is one stored chunk is streamed too (TensorStore decodes into a temporary).
_STREAM_BYTES = 1 << 20
_threads = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="flax_warmstart_chain")


def check_keys(plan: WarmStartPlan, rng: jax.Array | None) -> None:
  """Before any read: a `Broadcast` with noise needs the `rng` of `warm_start`.

  Raises:
    WarmStartError: Naming the leaf and the fix.
  """
  if rng is not None:
    return
  for row in plan.leaves:
    if row.action is Action.LOAD and row.expr is not None and _has_noise(row.expr):
      raise WarmStartError(
        f"{row.name!r} loads through {row.renamed_by}, a Broadcast with noise, which draws random numbers: pass"
        " rng=jax.random.key(...) to warm_start (or --seed on the command line), or set noise=0."
      )


def _has_noise(node: Node) -> bool:
  return (node.op == "broadcast" and bool(node.param)) or any(_has_noise(a) for a in node.args)


def _read_into(store: Any, index: tuple[Any, ...], out: np.ndarray, label: str) -> hostread.Read:
  """A read of `store[index]` straight into `out` (a buffer, or a slot of one), cast to its dtype."""
  if isinstance(store, ts.TensorStore):
    source = store if store.dtype.numpy_dtype == out.dtype else ts.cast(store, out.dtype)
    source = source[index].translate_to[0] if index else source
    target = ts.array(out)
    return hostread.Read(out, out.nbytes, lambda: target.write(source), label)
  return hostread.Read(
    out,
    out.nbytes,
    lambda: _threads.submit(lambda: np.copyto(out, store[index] if index else store[...], casting="unsafe")),
    label,
  )


# A slice read: its box in the saved array (`(start, stop)` per axis), the axes of the box dropped in its buffer, the
# buffer, and what is read for messages.
_Part = tuple[tuple[tuple[int, int], ...], tuple[int, ...], np.ndarray, str]


class _SlicedArrays:
  """The slices of saved arrays that the leaves read, gathered per array so that each stored chunk is decoded once.

  `add` defers a slice read; `reads` then makes, per saved array:

  * one streamed read when the array is a single stored chunk and either has
    several slices read or is at least `_STREAM_BYTES` (a layer of a `Stack`,
    decoded straight into its slot: TensorStore would decode it into a
    temporary and copy it);
  * one read per stored chunk when the array has several chunks and some
    chunk holds parts of several slices (the layers of a scanned stack saved
    from a mesh, each layer's shards read by the shards of unrolled leaves):
    TensorStore decodes that chunk once and each slice's part is copied out;
  * else a TensorStore read per slice (its chunks hold only one slice each).
  """

  def __init__(self) -> None:
    self._by_store: dict[int, tuple[Any, list[_Part]]] = {}

  def add(
    self, store: ts.TensorStore, box: tuple[tuple[int, int], ...], squeeze: tuple[int, ...], out: np.ndarray, label: str
  ) -> None:
    self._by_store.setdefault(id(store), (store, []))[1].append((box, squeeze, out, label))

  def reads(self) -> list[hostread.Read]:
    reads = []
    for store, parts in self._by_store.values():
      nbytes = _nbytes(store)
      chunk = _one_chunk(store) if len(parts) > 1 or nbytes >= _STREAM_BYTES else None
      if chunk is not None:
        piece = min(_PIECE_BYTES, nbytes)
        label = f"{len(parts)} slices of {parts[0][3]}"
        # In flight: a decoded piece and the stored piece prefetched, not the outputs (allocated already).
        reads.append(
          hostread.Read(
            None,
            2 * piece,
            lambda s=store, c=chunk, p=parts, n=piece: _threads.submit(_stream_slices, s, c, p, n),
            label,
          )
        )
        continue
      by_chunk = _shared_chunks(store, parts) if len(parts) > 1 else None
      if by_chunk is None:
        reads.extend(_read_into(store, _slices(box, squeeze), out, label) for box, squeeze, out, label in parts)
        continue
      for box, targets in by_chunk.items():
        chunk_bytes = math.prod(b - a for a, b in box) * store.dtype.numpy_dtype.itemsize
        label = f"a chunk {box} of {len(targets)} slices of {targets[0][3]}"
        # In flight: the decoded chunk and TensorStore's own copy of it while it decodes.
        reads.append(
          hostread.Read(
            None, 2 * chunk_bytes, lambda s=store, b=box, t=targets: _threads.submit(_copy_chunk, s, b, t), label
          )
        )
    return reads


def _slices(box: tuple[tuple[int, int], ...], squeeze: tuple[int, ...]) -> tuple[Any, ...]:
  """The index of a box: slices, and an int for each squeezed axis."""
  return tuple(a if k in squeeze else slice(a, b) for k, (a, b) in enumerate(box))


def _shared_chunks(
  store: ts.TensorStore, parts: Sequence[_Part]
) -> dict[tuple[tuple[int, int], ...], list[_Part]] | None:
  """Stored chunk box -> the parts it holds, when some chunk holds several parts (else None: read each part alone)."""
  chunks = hostread.chunk_shape(store)
  if chunks is None:
    return None
  shape = tuple(store.shape)
  spans = [[range(a // c, -(-b // c)) for (a, b), c in zip(box, chunks, strict=True)] for box, *_ in parts]
  if sum(math.prod(len(r) for r in span) for span in spans) > hostread.MAX_GATHER_CHUNKS:
    return None
  by_chunk: dict[tuple[tuple[int, int], ...], list[_Part]] = {}
  for part, span in zip(parts, spans, strict=True):
    for position in itertools.product(*span):
      box = tuple((p * c, min((p + 1) * c, n)) for p, c, n in zip(position, chunks, shape, strict=True))
      by_chunk.setdefault(box, []).append(part)
  if all(len(targets) == 1 for targets in by_chunk.values()):
    return None
  return by_chunk


def _copy_chunk(store: ts.TensorStore, box: tuple[tuple[int, int], ...], targets: Sequence[_Part]) -> None:
  """Reads one stored chunk (TensorStore decodes it once) and copies each slice's part of it into its buffer."""
  block = store[tuple(slice(a, b) for a, b in box)].read().result()
  for part_box, squeeze, out, _ in targets:
    inner = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(part_box, box, strict=True))
    if any(a >= b for a, b in inner):
      continue
    source = block[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inner, box, strict=True))]
    view = np.expand_dims(out, squeeze) if squeeze else out
    np.copyto(
      view[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inner, part_box, strict=True))], source, casting="unsafe"
    )


def _nbytes(store: ts.TensorStore) -> int:
  return math.prod(store.shape) * store.dtype.numpy_dtype.itemsize


def _one_chunk(store: ts.TensorStore) -> Any:
  """The array's single stored chunk when it can be streamed (zarr v2, one C-order chunk, zstd or raw), else None."""
  grid = hostread.zarr2_grid(store)
  if grid is None or grid.chunks != tuple(store.shape):
    return None
  return grid.chunk((0,) * store.ndim)


def _stream_slices(store: ts.TensorStore, chunk: Any, parts: Sequence[_Part], piece: int) -> None:
  """Decodes `chunk` once, up to the last row any slice needs, into every slice's buffer."""
  try:
    _stream_parts(chunk, parts, piece)
  except hostread.MissingChunkError:  # not stored (only the fill value; raised before any write): TensorStore knows it
    for box, squeeze, out, _ in parts:
      np.copyto(out, store[_slices(box, squeeze)].read().result(), casting="unsafe")


def _stream_parts(chunk: Any, parts: Sequence[_Part], piece: int) -> None:
  targets = [(box, np.expand_dims(out, squeeze) if squeeze else out) for box, squeeze, out, _ in parts]
  targets.sort(key=lambda t: t[0][0])
  if _in_stream_order(chunk, targets):
    _decode_into(chunk, targets, piece)
    return
  for start, block in hostread.row_blocks(chunk, max(region[0][1] for region, _ in targets), piece):
    stop = start + len(block)
    for region, out in targets:
      (a, b), rest = region[0], region[1:]
      lo, hi = max(a, start), min(b, stop)
      if lo < hi:
        source = block[(slice(lo - start, hi - start), *(slice(x, y) for x, y in rest))]
        np.copyto(out[lo - a : hi - a], source, casting="unsafe")


def _in_stream_order(chunk: Any, targets: Sequence[tuple[tuple[tuple[int, int], ...], np.ndarray]]) -> bool:
  """Whether each slice is whole rows of the chunk, in a C-contiguous buffer of its dtype, none overlapping.

  Then the slices are consecutive byte ranges of the decoded chunk, in order
  (the layers of a stack on axis 0): each is decoded straight into its buffer.
  """
  last = 0
  for region, out in targets:
    full = all(r == (0, d) for r, d in zip(region[1:], chunk.shape[1:], strict=True))
    if not (full and out.flags.c_contiguous and out.dtype == chunk.dtype and region[0][0] >= last):
      return False
    last = region[0][1]
  return True


def _decode_into(chunk: Any, targets: Sequence[tuple[tuple[tuple[int, int], ...], np.ndarray]], piece: int) -> None:
  """Decodes the chunk up to the last slice, each slice straight into its buffer, the rows between into scratch."""
  row_bytes = math.prod(chunk.shape[1:]) * chunk.dtype.itemsize
  scratch, position = None, 0
  with hostread.decoded_stream(chunk, piece) as stream:
    for region, out in targets:
      skip = (region[0][0] - position) * row_bytes
      while skip:
        scratch = np.empty(min(piece, skip), np.uint8) if scratch is None else scratch
        n = min(skip, len(scratch))
        hostread.read_exactly(stream, memoryview(scratch)[:n])
        skip -= n
      hostread.read_exactly(stream, memoryview(out.reshape(-1).view(np.uint8)))
      position = region[0][1]


class _Inputs:
  """The checkpoint tensors of one leaf's tree: lazily readable arrays, or values restored by the source."""

  def __init__(self, stores: Mapping[str, Any], restored: dict[str, Any], sliced: _SlicedArrays, label: str) -> None:
    self.stores, self.restored, self.sliced, self.label = stores, restored, sliced, label
    self._whole: dict[int, Thunk] = {}  # a node computed whole for its regions (a reshape): read and held once

  def _read(
    self,
    reads: list[hostread.Read],
    node: Node,
    out: np.ndarray,
    label: str,
    region: tuple[tuple[int, int], ...] | None = None,
  ) -> None:
    """Reads `node` (a read of a tensor, or of one slice of it), or `region` of its value, into `out`.

    Slices of a TensorStore array are gathered per array (`_SlicedArrays`).
    """
    store = self.stores[node.name]
    box = _box(node, tuple(store.shape), region)
    whole = box == tuple((0, d) for d in store.shape)
    if isinstance(store, ts.TensorStore) and (not whole or _nbytes(store) >= _STREAM_BYTES):
      self.sliced.add(store, box, node.squeeze, out, label)
    else:
      reads.append(_read_into(store, _slices(box, node.squeeze) if not whole else (), out, label))

  def _restored(self, node: Node, region: tuple[tuple[int, int], ...] | None = None) -> Thunk:
    """A read node (or `region` of its value) of a tensor the source restored whole."""
    value = self.restored[node.name]
    index = _slices(_box(node, np.shape(value), region), node.squeeze)
    return lambda: np.asarray(value[index])

  def prepare(self, node: Node, reads: list[hostread.Read], key: jax.Array | None) -> Thunk:
    """Adds the node's reads to `reads`; returns a function computing its value once they are done."""
    label = f"{node.name!r} ({self.label})"
    if node.op == "read":
      if node.name not in self.stores:
        return self._restored(node)
      out = aligned_empty(node.shape, node.dtype)
      self._read(reads, node, out, label)
      return lambda: out
    if node.op == "zeros":
      return lambda: _zeros(node.shape, node.dtype)
    child = node.args[0]
    if node.op == "take" and child.op == "read" and child.region is None and child.name in self.stores:
      # Only the rows taken are read, each once, into their places.
      store, index = self.stores[child.name], np.asarray(node.param)
      read = hostread.rows(store, index, node.shape, node.dtype, node.axis, label=label)
      reads.append(read)
      return lambda: _zero_entries(read.out, node)
    if node.op == "stack":
      out = aligned_empty(node.shape, node.dtype)
      later = []
      for k, arg in enumerate(node.args):
        slot = (slice(None),) * node.axis + (k,)
        if arg.op == "read" and arg.name in self.stores:  # each layer straight into its slot
          self._read(reads, arg, out[slot], f"{arg.name!r} ({self.label})")
        else:
          later.append((slot, self.prepare(arg, reads, key)))

      def stacked() -> np.ndarray:
        for slot, thunk in later:
          out[slot] = thunk()
        return out

      return stacked
    inner = self.prepare(child, reads, key)
    if node.op == "take":
      return lambda: _zero_entries(np.take(inner(), np.asarray(node.param), axis=node.axis), node)
    if node.op == "transpose":
      return lambda: np.transpose(inner(), node.param)
    if node.op == "reshape":
      return lambda: np.reshape(np.ascontiguousarray(inner()), node.shape)
    if node.op == "broadcast":
      return lambda: _broadcast(inner(), node, key)
    raise AssertionError(node.op)

  def prepare_region(
    self, node: Node, region: tuple[tuple[int, int], ...], reads: list[hostread.Read], key: jax.Array | None
  ) -> Thunk:
    """`prepare` for one rectangular region of the node's value (a device's shard): only what it needs is read.

    The region is mapped back through the tree: a `Stack` reads only the
    layers and the part of each that the region covers, a `Transpose` reads
    the permuted region, a `Take` the rows the region keeps, a `Broadcast`
    the region of the dense tensor once (its noise is the same as the whole
    leaf's). A `Reshape` of a partial region computes its whole input first.
    """
    if region == tuple((0, d) for d in node.shape):
      return self.prepare(node, reads, key)
    shape = tuple(b - a for a, b in region)
    label = f"{node.name!r} ({self.label})"
    if node.op == "read":
      if node.name not in self.stores:
        return self._restored(node, region)
      out = aligned_empty(shape, node.dtype)
      self._read(reads, node, out, label, region)
      return lambda: out
    if node.op == "zeros":
      return lambda: _zeros(shape, node.dtype)
    ax = node.axis
    if node.op == "stack":
      a, b = region[ax]
      inner_region = region[:ax] + region[ax + 1 :]
      out = aligned_empty(shape, node.dtype)
      later = []
      for k in range(a, b):
        arg, slot = node.args[k], (slice(None),) * ax + (k - a,)
        if arg.op == "read" and arg.name in self.stores:  # each layer's part straight into its slot
          self._read(reads, arg, out[slot], label, inner_region)
        else:
          later.append((slot, self.prepare_region(arg, inner_region, reads, key)))

      def stacked() -> np.ndarray:
        for slot, thunk in later:
          out[slot] = thunk()
        return out

      return stacked
    child = node.args[0]
    if node.op == "transpose":
      inner_region = [(0, 0)] * len(region)
      for j, c in enumerate(node.param):
        inner_region[c] = region[j]
      inner = self.prepare_region(child, tuple(inner_region), reads, key)
      return lambda: np.transpose(inner(), node.param)
    if node.op == "take" and isinstance(node.param, int):
      inner = self.prepare_region(child, region[:ax] + ((node.param, node.param + 1),) + region[ax:], reads, key)
      return lambda: np.take(inner(), 0, axis=ax)
    if node.op == "take":
      a, b = region[ax]
      index = np.asarray(node.param[a:b])
      zero = None if node.zero is None else node.zero[a:b]
      if child.op == "read" and child.region is None and child.name in self.stores:  # only the rows kept
        window = tuple(slice(lo, hi) for lo, hi in region)
        read = hostread.rows(self.stores[child.name], index, shape, node.dtype, ax, window=window, label=label)
        reads.append(read)
        return lambda: _zero_mask(read.out, ax, zero)
      inner = self.prepare_region(child, region[:ax] + ((0, child.shape[ax]),) + region[ax + 1 :], reads, key)
      return lambda: _zero_mask(np.take(inner(), index, axis=ax), ax, zero)
    if node.op == "broadcast":
      a, b = region[ax]
      inner_region = region[:ax] + region[ax + 1 :]
      inner = self.prepare_region(child, inner_region, reads, key)
      return lambda: _broadcast(inner(), node, key, experts=range(a, b), region=inner_region)
    # A reshape: computed whole once for all the leaf's regions (shards), each region then copied out of it.
    whole = self._whole.get(id(node))
    if whole is None:
      whole = self._whole[id(node)] = _once(self.prepare(node, reads, key))
    window = tuple(slice(lo, hi) for lo, hi in region)
    return lambda: np.array(whole()[window])


def _once(thunk: Thunk) -> Thunk:
  """`thunk`, computed on the first call only."""
  value: list[np.ndarray] = []

  def cached() -> np.ndarray:
    if not value:
      value.append(thunk())
    return value[0]

  return cached


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  out = aligned_empty(shape, dtype)
  out[...] = 0
  return out


def _zero_entries(value: np.ndarray, node: Node) -> np.ndarray:
  """In an optimizer slot, the entries a repeated index made are new: zero."""
  return _zero_mask(value, node.axis, node.zero)


def _zero_mask(value: np.ndarray, axis: int, zero: Sequence[bool] | None) -> np.ndarray:
  if zero is not None and any(zero):
    value[(slice(None),) * axis + (np.flatnonzero(np.asarray(zero)),)] = 0
  return value


def _box(
  node: Node, shape: tuple[int, ...], region: tuple[tuple[int, int], ...] | None = None
) -> tuple[tuple[int, int], ...]:
  """The box in a read node's tensor (of `shape`) of `region` of its value (all of it if None); squeezed axes 1 wide."""
  own = node.region if node.region is not None else tuple((0, d) for d in shape)
  if region is None:
    return tuple(own)
  out, k = [], 0
  for axis, (start, stop) in enumerate(own):
    if axis in node.squeeze:
      out.append((start, stop))
    else:
      a, b = region[k]
      out.append((start + a, start + b))
      k += 1
  return tuple(out)


def _broadcast(
  value: np.ndarray,
  node: Node,
  key: jax.Array | None,
  *,
  experts: Sequence[int] | None = None,
  region: tuple[tuple[int, int], ...] | None = None,
) -> np.ndarray:
  """Copies of `value` along a new axis, each times `1 + noise * N(0, 1)` (drawn per copy).

  With `experts` and `region` (a device's shard): those copies of that region
  of the dense tensor, with the same noise as the whole leaf's, drawing only
  the noise of the rows it holds (`_noise`).
  """
  experts = range(node.shape[node.axis]) if experts is None else experts
  out = aligned_empty((*value.shape[: node.axis], len(experts), *value.shape[node.axis :]), node.dtype)
  dense_shape = node.args[0].shape
  window = tuple(slice(a, b) for a, b in region) if region is not None else ()
  for k, e in enumerate(experts):
    slot = (slice(None),) * node.axis + (k,)
    if node.param:
      out[slot] = value * (1 + node.param * _noise(jax.random.fold_in(key, e), dense_shape, window))
    else:
      out[slot] = value
  return out


# A Broadcast's noise is drawn in blocks of this many entries of the dense tensor's first axis, each from its own key,
# so that a shard draws only the blocks its rows fall in, and every sharding gets the same numbers.
_NOISE_ROWS = 256


def _noise(key: jax.Array, shape: tuple[int, ...], window: tuple[slice, ...]) -> np.ndarray:
  """Standard normal float32 noise for `window` of a tensor of `shape`: block b of rows from `fold_in(key, b)`."""
  if not shape:
    return np.asarray(jax.random.normal(key, (), np.float32))
  rows = shape[0]
  a, b = window[0].indices(rows)[:2] if window else (0, rows)
  if a >= b:
    return np.zeros((0, *shape[1:]), np.float32)[(slice(None), *window[1:])]
  first, last = a // _NOISE_ROWS, (b - 1) // _NOISE_ROWS
  blocks = [
    np.asarray(
      jax.random.normal(
        jax.random.fold_in(key, block), (min(_NOISE_ROWS, rows - block * _NOISE_ROWS), *shape[1:]), np.float32
      )
    )
    for block in range(first, last + 1)
  ]
  drawn = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
  return drawn[(slice(a - first * _NOISE_ROWS, b - first * _NOISE_ROWS), *window[1:])]


def _aligned(value: np.ndarray) -> np.ndarray:
  """The value in a 64-byte-aligned C-contiguous buffer (`jax.device_put` adopts it on CPU), copied only if needed."""
  if value.flags.c_contiguous and value.ctypes.data % 64 == 0:
    return value
  out = aligned_empty(value.shape, value.dtype)
  np.copyto(out, value)
  return out


def sharded(live: Any) -> bool:
  """Whether a live leaf is split over several devices (or processes): its shards are computed one by one."""
  sharding = getattr(live, "sharding", None) if isinstance(live, jax.Array | jax.ShapeDtypeStruct) else None
  return sharding is not None and (len(sharding.device_set) > 1 or not sharding.is_fully_addressable)


def run(
  plan: WarmStartPlan,
  indices: Sequence[int],
  keys: Mapping[int, jax.Array | None],
  *,
  max_bytes_in_flight: int,
  live: Sequence[Any] | None = None,
) -> dict[int, Any]:
  """Computes the leaves of `plan` at `indices` (rows with an `expr`).

  Args:
    plan: The plan.
    indices: Rows that load through a transform tree.
    keys: Row index -> PRNG key (for a `Broadcast`'s noise), or None.
    max_bytes_in_flight: The bound on bytes being read at once.
    live: The live leaves (placed), in the plan's order. A leaf split over
      several devices is computed shard by shard: each addressable shard's
      region (each distinct one once) is mapped back through the tree and
      only its part of the inputs is read, into a buffer its device adopts,
      so a process reads and holds only its shards.

  Returns:
    Row index -> value: a host array in the checkpoint's dtype (the caller
    casts and places it), or for a sharded leaf a `jax.Array` with the leaf's
    sharding and dtype.

  Raises:
    WarmStartError: If a read fails, naming the tensor, leaf and checkpoint.
  """
  if not indices:
    return {}
  rows: list[LeafPlan] = [plan.leaves[i] for i in indices]
  by_source: dict[int, tuple[Any, set[str]]] = {}
  for row in rows:
    by_source.setdefault(id(row.checkpoint), (row.checkpoint, set()))[1].update(row.inputs)
  stores: dict[int, dict[str, Any]] = {}
  restored: dict[int, dict[str, Any]] = {}
  for cid, (source, names) in by_source.items():
    source.check_unchanged()
    stores[cid] = source.open_arrays(names)
    rest = {name: None for name in names if name not in stores[cid]}
    restored[cid] = source.restore(rest) if rest else {}
  reads: list[hostread.Read] = []
  sliced = _SlicedArrays()
  thunks = {}
  shards: dict[int, dict[tuple[tuple[int, int], ...], Thunk]] = {}
  for i, row in zip(indices, rows, strict=True):
    cid = id(row.checkpoint)
    inputs = _Inputs(stores[cid], restored[cid], sliced, f"for {row.name!r} from {row.checkpoint.describe()}")
    if live is not None and sharded(live[i]):
      shards[i] = {}
      for index in live[i].sharding.addressable_devices_indices_map(tuple(row.shape)).values():
        region = _region(index, row.shape)
        if region not in shards[i]:
          shards[i][region] = inputs.prepare_region(row.expr, region, reads, keys.get(i))
    else:
      thunks[i] = inputs.prepare(row.expr, reads, keys.get(i))
  hostread.run([*sliced.reads(), *reads], max_bytes_in_flight=max_bytes_in_flight)
  out: dict[int, Any] = {i: _aligned(np.asarray(thunk())) for i, thunk in thunks.items()}
  for i, parts in shards.items():
    out[i] = _assemble(live[i], tuple(plan.leaves[i].shape), parts)
  return out


def _region(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _assemble(live: Any, shape: tuple[int, ...], parts: Mapping[tuple[tuple[int, int], ...], Thunk]) -> jax.Array:
  """A sharded leaf from its shards' values, each cast to the leaf's dtype in a buffer its device adopts."""
  values = {}
  for region, thunk in parts.items():
    value = np.asarray(thunk())
    values[region] = _aligned(value if value.dtype == live.dtype else value.astype(live.dtype))
  index_map = live.sharding.addressable_devices_indices_map(shape)
  arrays = [jax.device_put(values[_region(index, shape)], device) for device, index in index_map.items()]
  return jax.make_array_from_single_device_arrays(shape, live.sharding, arrays)
