"""Reading saved arrays straight into host buffers of our own.

On a CPU, a restored array's memory is the state's memory. Orbax reads each
array into a fresh `np.zeros` block and `jax.device_put` then copies it into
a second one (glibc's large blocks are 16 bytes off a 64-byte boundary, so
the CPU client cannot adopt them): every byte of the state is written twice,
into freshly faulted pages. Here TensorStore writes each array (or, for a
vocabulary remap, only the old rows that the new table keeps, in their new
order) into a 64-byte-aligned buffer that `jax.device_put` adopts without a
copy, so the state's memory is touched once and the old table never exists
on its own.

A large tensor saved from one device is a single zarr chunk (Orbax writes one
chunk per shard). TensorStore would decode it whole into a temporary before
copying it out, holding the tensor twice; such chunks (zstd or uncompressed,
as Orbax writes them) are instead streamed: read in 16 MiB byte ranges,
decompressed with `zstandard` straight into the output buffer (or, for a
remap, into a small scratch block whose kept rows are scattered into place).

A vocabulary gather into the shards of a device mesh (`gather_shards`)
decodes each old chunk once, streamed the same way in smaller pieces (or read
whole through TensorStore when its format cannot be streamed), and scatters
its kept rows into every shard's buffer that wants them: a new row shard's
rows come from every old row shard, so reading shard by shard would decode
each old chunk once per output shard that touches it.

Reads run concurrently (TensorStore's threads, and a thread per streamed
chunk) with a bound on the bytes in flight.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
import zstandard

from flax_warmstart._src.arrays import aligned_empty, leading
from flax_warmstart._src.errors import DAMAGED_HINT, WarmStartError

# Single-chunk arrays at least this large are streamed; the byte ranges they are read in.
_STREAM_BYTES = 1 << 26
_PIECE_BYTES = 1 << 24
# The byte ranges (and scratch blocks) of a chunk streamed for `gather_shards`: several stream at once.
_GRID_PIECE_BYTES = 1 << 20
# A gather over more old chunks than this reads shard by shard (`rows`): chunks that small are cheap to decode twice.
MAX_GATHER_CHUNKS = 4096


@dataclasses.dataclass
class Read:
  """One read into a host buffer: `out` holds the data once `wait` returns.

  Attributes:
    out: The output buffer (64-byte aligned); None for a read that scatters
      into buffers it does not own (`gather_shards`).
    nbytes: Its size, for the in-flight bound (for `gather_shards`, its
      scratch memory).
    launch: Starts the read; returns a future (TensorStore's or a thread's).
    label: What is read, from where, for an error message.
  """

  out: np.ndarray | None
  nbytes: int
  launch: Callable[[], Any]
  label: str = "a tensor"
  future: Any = None

  def start(self) -> None:
    self.future = self.launch()

  def wait(self) -> None:
    try:
      self.future.result()
    except Exception as err:
      raise WarmStartError(f"Reading {self.label} failed: {type(err).__name__}: {err}. {DAMAGED_HINT}") from err


_WORKERS = 4
_threads = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="flax_warmstart_read")


def _as_dtype(store: ts.TensorStore, dtype: Any) -> ts.TensorStore:
  dtype = np.dtype(dtype)
  return store if store.dtype.numpy_dtype == dtype else ts.cast(store, ts.dtype(dtype.name))


def _host_copy(source: Any, index: tuple[Any, ...], out: np.ndarray, out_index: tuple[Any, ...] = ()) -> None:
  """`out[out_index] = source[index]` for a numpy-like saved array (a `numpy.memmap`: only those pages are read).

  Copied in blocks of about `_PIECE_BYTES` along axis 0 (a whole array) or
  along the gather axis (`out_index = (*lead, kept)`, old rows taken in file
  order), so that no temporary holds more than a block and a source that maps
  its file drops each block's pages. A source with a `check()` method (one
  that checksums its bytes while they are copied: TensorFlow's CRC32C) is
  checked after the copy; it raises if they were damaged.
  """
  axis = len(out_index) - 1 if index else 0
  if out.ndim == 0 or out.nbytes <= _PIECE_BYTES or not out.shape[axis]:
    out[out_index or (Ellipsis,)] = source[index] if index else np.asarray(source)
  elif not index:
    per = max(1, _PIECE_BYTES // (out.nbytes // out.shape[0]))
    for start in range(0, out.shape[0], per):
      out[start : start + per] = source[start : start + per]
  else:
    per = max(1, _PIECE_BYTES // (out.nbytes // out.shape[axis]))
    kept, old = out_index[-1], index[axis]
    order = np.argsort(old, kind="stable")
    for start in range(0, len(order), per):
      block = order[start : start + per]
      out[(*out_index[:-1], kept[block])] = source[(*index[:axis], old[block], *index[axis + 1 :])]
  if hasattr(source, "check"):
    source.check()


def whole(store: ts.TensorStore | np.ndarray, dtype: Any, *, label: str = "a tensor") -> Read:
  """A read of a whole saved array, cast to `dtype`, into a new aligned buffer.

  Args:
    store: The saved array (from `Source.open_arrays`): a TensorStore, or a
      numpy-like array (a `numpy.memmap` over a file's raw bytes, or any
      object with `shape`, `dtype` and numpy indexing by slices and one 1-D
      integer array) that a source of a raw format hands out.
    dtype: The dtype to read it as.
    label: What is read, from where, for an error message.

  Returns:
    The read, not yet started (see `run`).

  Examples:
    >>> import numpy as np, tensorstore as ts
    >>> read = whole(ts.array(np.arange(6, dtype=np.float32).reshape(3, 2)), "float32")
    >>> run([read], max_bytes_in_flight=1 << 20)
    >>> read.out.tolist()
    [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
  """
  out = aligned_empty(tuple(store.shape), dtype)
  if not isinstance(store, ts.TensorStore):
    return Read(out, out.nbytes, lambda: _threads.submit(_host_copy, store, (), out), label)
  chunk = _single_chunk(store)
  if chunk is not None:
    return Read(out, out.nbytes, lambda: _threads.submit(_stream_whole, chunk, out), label)
  source, target = _as_dtype(store, dtype), ts.array(out)
  return Read(out, out.nbytes, lambda: target.write(source), label)


def rows(
  store: ts.TensorStore | np.ndarray,
  index: np.ndarray,
  shape: tuple[int, ...],
  dtype: Any,
  axis: int,
  *,
  window: tuple[slice, ...] | None = None,
  label: str = "a tensor",
) -> Read:
  """A read of old rows into their new places: `out[..., i, ...] = old[..., index[i], ...]` where `index[i] >= 0`.

  Only those rows are copied (rows with index -1 are left uninitialised, for
  the caller to fill); the old table never exists whole in memory.

  Args:
    store: The saved old table (a TensorStore or a numpy-like array, see `whole`).
    index: The old row of each new row along `axis`, or -1.
    shape: The new table's shape.
    dtype: Its dtype.
    axis: The vocabulary axis.
    window: For a device's shard: the slice of every other axis of the old
      table to read (the slice at `axis` is ignored); by default the leading
      `shape[d]` entries (TensorFlow's rule, see `arrays.leading`).
    label: What is read, from where, for an error message.

  Returns:
    The read, not yet started (see `run`).

  Raises:
    ValueError: If the old table is smaller than `shape` off `axis`.

  Examples:
    >>> import numpy as np, tensorstore as ts
    >>> old = ts.array(np.arange(6, dtype=np.float32).reshape(3, 2))
    >>> read = rows(old, np.array([2, -1, 0]), (3, 2), "float32", axis=0)
    >>> run([read], max_bytes_in_flight=1 << 20)
    >>> read.out[[0, 2]].tolist()  # row 1 is new: left for the caller to fill
    [[4.0, 5.0], [0.0, 1.0]]
  """
  out = aligned_empty(shape, dtype)
  other = [d for d in range(len(shape)) if d != axis]
  if any(store.shape[d] < shape[d] for d in other):
    raise ValueError(f"The old table {tuple(store.shape)} is smaller than {shape} off axis {axis}.")
  kept = np.flatnonzero(index >= 0)
  lead = (slice(None),) * axis
  if window is None:
    region = leading(shape, axis, len(store.shape))
  else:  # a shard's slice of the new table: the same extent of the old one (a slice(None) is the leading rows)
    region = tuple(slice(s.start or 0, (s.start or 0) + shape[d]) for d, s in enumerate(window))
  region = tuple(slice(None) if d == axis else s for d, s in enumerate(region))
  if not isinstance(store, ts.TensorStore):
    source_index = tuple(index[kept] if d == axis else s for d, s in enumerate(region))
    return Read(out, out.nbytes, lambda: _threads.submit(_host_copy, store, source_index, out, (*lead, kept)), label)
  chunk = _single_chunk(store) if window is None else None
  if chunk is not None and axis in (0, 1):
    return Read(out, out.nbytes, lambda: _threads.submit(_stream_rows, chunk, out, index, axis), label)
  source = _as_dtype(store, dtype)[region].translate_to[0]
  target = ts.array(out).oindex[(*lead, kept)]
  source = source.oindex[(*lead, index[kept])]
  return Read(out, out.nbytes, lambda: target.write(source), label)


def region(
  store: ts.TensorStore | np.ndarray, index: tuple[slice, ...], dtype: Any, *, label: str = "a tensor"
) -> Read:
  """A read of one rectangular region of a saved array (a device's shard), cast to `dtype`, into a new aligned buffer.

  Args:
    store: The saved array (a TensorStore or a numpy-like array, see `whole`).
    index: One slice per axis (as `Sharding.addressable_devices_indices_map` gives).
    dtype: The dtype to read it as.
    label: What is read, from where, for an error message.

  Returns:
    The read, not yet started (see `run`).

  Examples:
    >>> import numpy as np, tensorstore as ts
    >>> read = region(ts.array(np.arange(12, dtype=np.float32).reshape(4, 3)), (slice(2, 4), slice(None)), "float32")
    >>> run([read], max_bytes_in_flight=1 << 20)
    >>> read.out.tolist()
    [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
  """
  index = tuple(index) + (slice(None),) * (len(store.shape) - len(index))
  shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, store.shape, strict=True))
  out = aligned_empty(shape, dtype)
  if not isinstance(store, ts.TensorStore):  # basic slicing of a memmap is a view: copied without a temporary
    return Read(out, out.nbytes, lambda: _threads.submit(np.copyto, out, store[index], casting="unsafe"), label)
  source, target = _as_dtype(store, dtype)[index].translate_to[0], ts.array(out)
  return Read(out, out.nbytes, lambda: target.write(source), label)


def gather_shards(
  store: ts.TensorStore | np.ndarray,
  index: np.ndarray,
  shape: tuple[int, ...],
  dtype: Any,
  axis: int,
  regions: Sequence[tuple[slice, ...]],
  *,
  label: str = "a tensor",
) -> tuple[list[np.ndarray], list[Read]]:
  """Reads old rows into their new places in several shards of the new table, each old chunk decoded once.

  `outs[k]` is the new table's `regions[k]` (as `rows` with `window=regions[k]`
  would read it): its entries whose old row exists hold it, the rows with
  index -1 are left uninitialised for the caller to fill. Each old chunk that
  any region needs is decoded once, streamed in small blocks where Orbax's
  zarr v2 format allows (else read whole through TensorStore), and its kept
  entries are scattered into every region that wants them; the old table never
  exists whole. Without a chunk grid (a numpy-like source, an in-memory store)
  or with very many small chunks, each region is read on its own (`rows`).

  Args:
    store: The saved old table (a TensorStore or a numpy-like array, see `whole`).
    index: The old row of each new row along `axis`, or -1.
    shape: The new table's shape.
    dtype: Its dtype.
    axis: The vocabulary axis.
    regions: One slice per axis of the new table for each output buffer (a
      device's shard); off `axis`, the same extent of the old table is read.
    label: What is read, from where, for an error message.

  Returns:
    The output buffers, one per region (64-byte aligned), and the reads that
    fill them, not yet started (see `run`); they are filled when every read
    has been waited for.

  Raises:
    ValueError: If the old table is smaller than `shape` off `axis`.

  Examples:
    >>> import numpy as np, tensorstore as ts
    >>> old = ts.array(np.arange(8, dtype=np.float32).reshape(4, 2))
    >>> outs, reads = gather_shards(old, np.array([3, -1, 0, 1]), (4, 2), "float32", 0, [(slice(0, 2),), (slice(2, 4),)])
    >>> run(reads, max_bytes_in_flight=1 << 20)
    >>> outs[0][0].tolist(), outs[1].tolist()  # row 1 is new: left for the caller to fill
    ([6.0, 7.0], [[0.0, 1.0], [2.0, 3.0]])
  """
  shape = tuple(shape)
  if any(store.shape[d] < shape[d] for d in range(len(shape)) if d != axis):
    raise ValueError(f"The old table {tuple(store.shape)} is smaller than {shape} off axis {axis}.")
  boxes = [_box(r, shape) for r in regions]
  chunks = chunk_shape(store)
  positions = None if chunks is None else _needed_chunks(index, axis, boxes, chunks, tuple(store.shape))
  if positions is None or len(positions) > MAX_GATHER_CHUNKS:
    reads = []
    for box in boxes:
      window = tuple(slice(a, b) for a, b in box)
      sub_shape = tuple(b - a for a, b in box)
      reads.append(rows(store, index[window[axis]], sub_shape, dtype, axis, window=window, label=label))
    return [r.out for r in reads], reads
  outs = [aligned_empty(tuple(b - a for a, b in box), dtype) for box in boxes]
  kept = [_sorted_kept(index[a:b]) for a, b in (box[axis] for box in boxes)]
  grid = zarr2_grid(store) if isinstance(store, ts.TensorStore) else None
  tasks = []
  for position in positions:
    targets = [t for k, box in enumerate(boxes) if (t := _target(outs[k], box, kept[k], position, chunks, axis))]
    if targets:
      tasks.append((position, targets))
  # Memory a chunk in flight holds: streamed, a scratch block and two byte ranges (and zstd's window); else
  # TensorStore's decoded chunk and the block read from it.
  scratch = 4 * _GRID_PIECE_BYTES if grid is not None else 2 * math.prod(chunks) * store.dtype.numpy_dtype.itemsize
  in_flight = min(len(tasks), _WORKERS) * scratch

  def launch() -> _AllOf:
    return _AllOf([_threads.submit(_scatter_chunk, store, grid, p, chunks, targets, axis) for p, targets in tasks])

  return outs, [Read(None, in_flight, launch, label)] if tasks else []


class _AllOf:
  """The futures of a read's parts, waited for together (the first failure cancels the rest)."""

  def __init__(self, futures: list[concurrent.futures.Future]) -> None:
    self.futures = futures

  def result(self) -> None:
    try:
      for future in self.futures:
        future.result()
    except BaseException:
      for future in self.futures:
        future.cancel()
      raise


def _box(region: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A region's `(start, stop)` per axis of `shape`."""
  region = tuple(region) + (slice(None),) * (len(shape) - len(region))
  out = []
  for s, n in zip(region, shape, strict=True):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"A shard's region must have unit steps, got {region}.")
    out.append((start, max(start, stop)))
  return tuple(out)


def chunk_shape(store: Any) -> tuple[int, ...] | None:
  """The shape of the chunks TensorStore reads whole (grid at the origin, domain from 0), or None."""
  if not isinstance(store, ts.TensorStore) or not store.shape:
    return None
  try:
    layout = store.chunk_layout
    chunks, origin = layout.read_chunk.shape, layout.grid_origin
  except (ValueError, TypeError, AttributeError):
    return None
  if chunks is None or not all(chunks) or tuple(origin or ()) != (0,) * len(chunks):
    return None
  if tuple(store.domain.inclusive_min) != (0,) * len(chunks):
    return None
  return tuple(int(c) for c in chunks)


def _sorted_kept(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(new, old)`: a shard's kept positions and their old rows, ordered by old row."""
  new = np.flatnonzero(sub >= 0)
  old = sub[new]
  order = np.argsort(old, kind="stable")
  return new[order], old[order]


def _needed_chunks(
  index: np.ndarray, axis: int, boxes: list[tuple[tuple[int, int], ...]], chunks: tuple[int, ...], old_shape: tuple
) -> list[tuple[int, ...]] | None:
  """The grid positions of the old chunks some region reads from (None when there are too many to list)."""
  per_axis = []
  for d, c in enumerate(chunks):
    if d == axis:
      old = index[index >= 0]
      needed = set(np.unique(old // c).tolist()) if old.size else set()
    else:
      needed = set()
      for box in boxes:
        a, b = box[d]
        if b > a:
          needed.update(range(a // c, (min(b, old_shape[d]) - 1) // c + 1))
    per_axis.append(sorted(needed))
  if math.prod(len(p) for p in per_axis) > MAX_GATHER_CHUNKS:
    return None
  return [tuple(p) for p in itertools.product(*per_axis)]


@dataclasses.dataclass(frozen=True)
class _Target:
  """Where one old chunk's kept entries go in one output buffer.

  Attributes:
    out: The buffer.
    new: Positions along the vocabulary axis in `out`, ordered by `old`.
    old: Their rows along that axis in the chunk (chunk-local, ascending).
    out_box: Per axis, the `(start, stop)` in `out` (the vocabulary axis's entry unused).
    chunk_box: Per axis, the same extent in the chunk (chunk-local).
  """

  out: np.ndarray
  new: np.ndarray
  old: np.ndarray
  out_box: tuple[tuple[int, int], ...]
  chunk_box: tuple[tuple[int, int], ...]


def _target(
  out: np.ndarray,
  box: tuple[tuple[int, int], ...],
  kept: tuple[np.ndarray, np.ndarray],
  position: tuple[int, ...],
  chunks: tuple[int, ...],
  axis: int,
) -> _Target | None:
  """What of the chunk at `position` goes into the buffer `out` of the region `box`, or None if nothing."""
  out_box, chunk_box = [], []
  for d, ((a, b), c, p) in enumerate(zip(box, chunks, position, strict=True)):
    lo, hi = max(a, p * c), min(b, (p + 1) * c)
    if d != axis and lo >= hi:
      return None
    out_box.append((lo - a, hi - a))
    chunk_box.append((lo - p * c, hi - p * c))
  new, old = kept
  c0 = position[axis] * chunks[axis]
  lo, hi = np.searchsorted(old, [c0, c0 + chunks[axis]])
  if lo == hi:
    return None
  return _Target(out, new[lo:hi], old[lo:hi] - c0, tuple(out_box), tuple(chunk_box))


def _scatter_chunk(
  store: ts.TensorStore,
  grid: _Grid | None,
  position: tuple[int, ...],
  chunks: tuple[int, ...],
  targets: list[_Target],
  axis: int,
) -> None:
  """Decodes the chunk at `position` once (up to the last row along axis 0 any target needs) into its targets."""
  if axis == 0:
    limit = max(int(t.old[-1]) + 1 for t in targets)
  else:
    limit = max(t.chunk_box[0][1] for t in targets)
  if grid is not None:
    try:
      for start, block in row_blocks(grid.chunk(position), limit, _GRID_PIECE_BYTES):
        for t in targets:
          _put(t, axis, start, block)
      return
    except MissingChunkError:  # only the fill value: TensorStore knows it
      pass
  box = tuple(
    slice(p * c, min(p * c + (limit if d == 0 else c), n))
    for d, (p, c, n) in enumerate(zip(position, chunks, store.shape, strict=True))
  )
  block = store[box].read().result()
  for t in targets:
    _put(t, axis, 0, block)


def _put(t: _Target, axis: int, start: int, block: np.ndarray) -> None:
  """Copies a target's entries from `block` (the chunk's rows `start, ...` along axis 0) into its buffer."""
  out_index: list[Any] = [slice(a, b) for a, b in t.out_box]
  in_index: list[Any] = [slice(a, b) for a, b in t.chunk_box]
  if axis == 0:
    lo, hi = np.searchsorted(t.old, [start, start + len(block)])
    if lo == hi:
      return
    out_index[0], in_index[0] = t.new[lo:hi], t.old[lo:hi] - start
  else:
    (ca, cb), (oa, _) = t.chunk_box[0], t.out_box[0]
    lo, hi = max(ca, start), min(cb, start + len(block))
    if lo >= hi:
      return
    out_index[0] = slice(oa + lo - ca, oa + hi - ca)
    in_index[0] = slice(lo - start, hi - start)
    out_index[axis], in_index[axis] = t.new, t.old
  t.out[tuple(out_index)] = block[tuple(in_index)]


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One stored zarr v2 chunk (of full chunk shape, as zarr v2 stores even edge chunks)."""

  kvstore: ts.KvStore
  key: str
  zstd: bool
  dtype: np.dtype
  shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Grid:
  """A zarr v2 array whose chunks can be streamed: C order, zstd or raw, no filters, the array as saved."""

  kvstore: ts.KvStore
  separator: str
  zstd: bool
  dtype: np.dtype
  chunks: tuple[int, ...]

  def chunk(self, position: tuple[int, ...]) -> _Chunk:
    return _Chunk(self.kvstore, self.separator.join(map(str, position)), self.zstd, self.dtype, self.chunks)


def is_single_chunk(store: Any) -> bool:
  """Whether a saved array is one large chunk that `whole` and `rows` stream (reading slices of it would decode it whole)."""
  return isinstance(store, ts.TensorStore) and _single_chunk(store) is not None


def _single_chunk(store: ts.TensorStore) -> _Chunk | None:
  """The array's single chunk when it can be streamed (large, zarr v2, one C-order chunk, zstd or raw), else None."""
  shape = tuple(store.shape)
  # The size first: `spec().to_json()` keeps memory per call (tensorstore 0.1.86), so only large arrays pay it.
  if not shape or math.prod(shape) * store.dtype.numpy_dtype.itemsize < _STREAM_BYTES:
    return None
  grid = zarr2_grid(store)
  if grid is None or grid.chunks != shape:
    return None
  return grid.chunk((0,) * len(shape))


def zarr2_grid(store: ts.TensorStore) -> _Grid | None:
  """The array's chunk grid when its chunks can be streamed (zarr v2, C order, zstd or raw, untransformed), else None."""
  shape = tuple(store.shape)
  try:
    spec = store.spec()
    meta = spec.to_json().get("metadata", {})
  except (ValueError, TypeError):
    return None
  try:
    dtype = np.dtype(meta["dtype"])  # "<f4", or "bfloat16" (registered by ml_dtypes, which jax imports)
  except (KeyError, TypeError):
    return None
  compressor = meta.get("compressor")
  transform = spec.transform
  chunks = tuple(meta.get("chunks", ()))
  if (
    meta.get("zarr_format") != 2
    or dtype.byteorder == ">"
    or not (dtype.kind in "biuf" or dtype.name.startswith(("bfloat", "float")))  # ml_dtypes' floats are kind V
    or not shape
    or tuple(meta.get("shape", ())) != shape
    or len(chunks) != len(shape)
    or not all(chunks)
    or meta.get("order") != "C"
    or meta.get("filters")
    or (compressor is not None and compressor.get("id") != "zstd")
    or tuple(transform.domain.inclusive_min) != (0,) * len(shape)
    or [(m.offset, m.stride, m.input_dimension) for m in transform.output] != [(0, 1, d) for d in range(len(shape))]
  ):
    return None
  return _Grid(store.kvstore, meta.get("dimension_separator", "."), compressor is not None, dtype, chunks)


class MissingChunkError(ValueError):
  """A chunk that is not stored (it holds only the fill value)."""


class _PieceReader(io.RawIOBase):
  """A chunk's stored bytes as a file, read in byte ranges with the next one prefetched.

  `read` hands out each byte range as TensorStore returned it (zstd's stream
  reader takes whatever `read` returns as its next input, so the compressed
  bytes are not copied again); `readinto` copies, for a raw chunk.
  """

  def __init__(self, chunk: _Chunk, piece: int = _PIECE_BYTES):
    self._kvstore, self._key, self._piece = chunk.kvstore, chunk.key, piece
    self._offset, self._data, self._pos, self._done = 0, b"", 0, False
    self._next = self._fetch()

  def _fetch(self) -> Any:
    return self._kvstore.read(self._key, byte_range=slice(self._offset, self._offset + self._piece))

  def _advance(self) -> bool:
    """Makes the next byte range current; False at the end of the chunk."""
    if self._done:
      return False
    try:
      result = self._next.result()
    except ValueError:  # OUT_OF_RANGE: the last piece is shorter; read to the end.
      result = self._kvstore.read(self._key, byte_range=slice(self._offset, None)).result()
    if result.state != "value":
      raise MissingChunkError(f"The chunk {self._key!r} of {self._kvstore.path!r} is missing.")
    self._data, self._pos = result.value, 0
    self._offset += len(self._data)
    self._done = len(self._data) < self._piece
    if not self._done:
      self._next = self._fetch()
    return bool(self._data)

  def readable(self) -> bool:
    return True

  def read(self, size: int = -1) -> bytes | memoryview:
    """The rest of the current byte range (or the next one), whatever `size` asks; empty at the end."""
    if self._pos == len(self._data) and not self._advance():
      return b""
    data = self._data if self._pos == 0 else memoryview(self._data)[self._pos :]
    self._pos = len(self._data)
    return data

  def readinto(self, buffer: Any) -> int:
    if self._pos == len(self._data) and not self._advance():
      return 0
    n = min(len(buffer), len(self._data) - self._pos)
    memoryview(buffer).cast("B")[:n] = memoryview(self._data)[self._pos : self._pos + n]
    self._pos += n
    return n


def decoded_stream(chunk: _Chunk, piece: int = _PIECE_BYTES) -> io.RawIOBase:
  """The chunk's decoded bytes as a stream, its stored bytes read in `piece`-byte ranges (zstd or raw).

  Raises `MissingChunkError` before any byte is returned if the chunk is not stored.
  """
  reader = _PieceReader(chunk, piece)
  return zstandard.ZstdDecompressor().stream_reader(reader, read_size=piece) if chunk.zstd else reader


def read_exactly(stream: Any, buffer: memoryview) -> None:
  """Reads exactly `len(buffer)` bytes into `buffer`."""
  done = 0
  while done < len(buffer):
    n = stream.readinto(buffer[done:])
    if not n:
      raise ValueError(f"A saved chunk ended {len(buffer) - done} bytes early.")
    done += n


def row_blocks(chunk: _Chunk, rows_limit: int, piece: int = _PIECE_BYTES) -> Iterator[tuple[int, np.ndarray]]:
  """`(first row, block)` along axis 0 of the decoded chunk, a scratch block reused, up to row `rows_limit`."""
  row_elems = math.prod(chunk.shape[1:])
  per_block = max(1, piece // max(1, row_elems * chunk.dtype.itemsize))
  scratch = np.empty(per_block * row_elems, chunk.dtype)
  with decoded_stream(chunk, piece) as stream:
    for start in range(0, rows_limit, per_block):
      n = min(per_block, rows_limit - start)
      block = scratch[: n * row_elems]
      read_exactly(stream, memoryview(block.view(np.uint8)))
      yield start, block.reshape((n, *chunk.shape[1:]))


def _stream_whole(chunk: _Chunk, out: np.ndarray) -> None:
  if out.dtype == chunk.dtype:  # decompressed straight into the output
    with decoded_stream(chunk) as stream:
      read_exactly(stream, memoryview(out.reshape(-1).view(np.uint8)))
    return
  for start, block in row_blocks(chunk, chunk.shape[0]):
    out[start : start + len(block)] = block


def _stream_rows(chunk: _Chunk, out: np.ndarray, index: np.ndarray, axis: int) -> None:
  kept = np.flatnonzero(index >= 0)
  if axis == 1:  # rows of the old table are the leading entries of axis 0 of the new one
    old_cols = index[kept]
    for start, block in row_blocks(chunk, out.shape[0]):
      out[start : start + len(block), kept] = block[:, old_cols]
    return
  order = np.argsort(index[kept], kind="stable")
  old, new = index[kept][order], kept[order]
  cursor = 0
  for start, block in row_blocks(chunk, int(old[-1]) + 1 if old.size else 0):  # up to the last row kept
    end = int(np.searchsorted(old, start + len(block)))
    out[new[cursor:end]] = block[old[cursor:end] - start]
    cursor = end


def run(reads: Iterable[Read], max_bytes_in_flight: int) -> None:
  """Runs reads concurrently, starting a new one only while the bytes in flight stay within a bound.

  A read larger than the bound runs alone. Reads run on TensorStore's thread
  pools; this thread only waits.

  Args:
    reads: The reads, started in this order.
    max_bytes_in_flight: The bound on the output bytes of the reads in flight.
  """
  in_flight: list[Read] = []
  for read in reads:
    while in_flight and sum(r.nbytes for r in in_flight) + read.nbytes > max_bytes_in_flight:
      in_flight.pop(0).wait()
    read.start()
    in_flight.append(read)
  for read in in_flight:
    read.wait()
