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

Reads run concurrently (TensorStore's threads, and a thread per streamed
chunk) with a bound on the bytes in flight.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorstore as ts
import zstandard

from flax_warmstart._src.arrays import aligned_empty, leading
from flax_warmstart._src.errors import DAMAGED_HINT, WarmStartError

# Single-chunk arrays at least this large are streamed; the byte ranges they are read in.
_STREAM_BYTES = 1 << 26
_PIECE_BYTES = 1 << 24


@dataclasses.dataclass
class Read:
  """One read into a host buffer: `out` holds the data once `wait` returns.

  Attributes:
    out: The output buffer (64-byte aligned).
    nbytes: Its size, for the in-flight bound.
    launch: Starts the read; returns a future (TensorStore's or a thread's).
    label: What is read, from where, for an error message.
  """

  out: np.ndarray
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


_threads = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="flax_warmstart_read")


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


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """The one zarr v2 chunk that holds a whole saved array."""

  kvstore: ts.KvStore
  key: str
  zstd: bool
  dtype: np.dtype
  shape: tuple[int, ...]


def is_single_chunk(store: Any) -> bool:
  """Whether a saved array is one large chunk that `whole` and `rows` stream (reading slices of it would decode it whole)."""
  return isinstance(store, ts.TensorStore) and _single_chunk(store) is not None


def _single_chunk(store: ts.TensorStore) -> _Chunk | None:
  """The array's single chunk when it can be streamed (large, zarr v2, one C-order chunk, zstd or raw), else None."""
  shape = tuple(store.shape)
  # The size first: `spec().to_json()` keeps memory per call (tensorstore 0.1.86), so only large arrays pay it.
  if not shape or math.prod(shape) * store.dtype.numpy_dtype.itemsize < _STREAM_BYTES:
    return None
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
  if (
    meta.get("zarr_format") != 2
    or dtype.byteorder == ">"
    or not (dtype.kind in "biuf" or dtype.name.startswith(("bfloat", "float")))  # ml_dtypes' floats are kind V
    or not shape
    or math.prod(shape) * dtype.itemsize < _STREAM_BYTES
    or tuple(meta.get("shape", ())) != shape
    or tuple(meta.get("chunks", ())) != shape
    or meta.get("order") != "C"
    or meta.get("filters")
    or (compressor is not None and compressor.get("id") != "zstd")
    or tuple(transform.domain.inclusive_min) != (0,) * len(shape)
    or [(m.offset, m.stride, m.input_dimension) for m in transform.output] != [(0, 1, d) for d in range(len(shape))]
  ):
    return None
  key = meta.get("dimension_separator", ".").join(["0"] * len(shape))
  return _Chunk(store.kvstore, key, compressor is not None, dtype, shape)


class _PieceReader(io.RawIOBase):
  """A chunk's stored bytes as a file, read in byte ranges with the next one prefetched."""

  def __init__(self, chunk: _Chunk):
    self._kvstore, self._key = chunk.kvstore, chunk.key
    self._offset, self._data, self._pos, self._done = 0, b"", 0, False
    self._next = self._fetch()

  def _fetch(self) -> Any:
    return self._kvstore.read(self._key, byte_range=slice(self._offset, self._offset + _PIECE_BYTES))

  def readable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    if self._pos == len(self._data):
      if self._done:
        return 0
      try:
        result = self._next.result()
      except ValueError:  # OUT_OF_RANGE: the last piece is shorter; read to the end.
        result = self._kvstore.read(self._key, byte_range=slice(self._offset, None)).result()
      if result.state != "value":
        raise ValueError(f"The chunk {self._key!r} of {self._kvstore.path!r} is missing.")
      self._data, self._pos = result.value, 0
      self._offset += len(self._data)
      self._done = len(self._data) < _PIECE_BYTES
      if not self._done:
        self._next = self._fetch()
      if not self._data:
        return 0
    n = min(len(buffer), len(self._data) - self._pos)
    memoryview(buffer).cast("B")[:n] = self._data[self._pos : self._pos + n]
    self._pos += n
    return n


def _decoded(chunk: _Chunk) -> io.RawIOBase:
  reader = _PieceReader(chunk)
  return zstandard.ZstdDecompressor().stream_reader(reader, read_size=_PIECE_BYTES) if chunk.zstd else reader


def _fill(stream: Any, buffer: memoryview) -> None:
  """Reads exactly `len(buffer)` bytes into `buffer`."""
  done = 0
  while done < len(buffer):
    n = stream.readinto(buffer[done:])
    if not n:
      raise ValueError(f"A saved chunk ended {len(buffer) - done} bytes early.")
    done += n


def _blocks(chunk: _Chunk, rows_limit: int) -> Iterator[tuple[int, np.ndarray]]:
  """`(first row, block)` along axis 0 of the decoded chunk, a scratch block reused, up to row `rows_limit`."""
  row_elems = math.prod(chunk.shape[1:])
  per_block = max(1, _PIECE_BYTES // max(1, row_elems * chunk.dtype.itemsize))
  scratch = np.empty(per_block * row_elems, chunk.dtype)
  with _decoded(chunk) as stream:
    for start in range(0, rows_limit, per_block):
      n = min(per_block, rows_limit - start)
      block = scratch[: n * row_elems]
      _fill(stream, memoryview(block.view(np.uint8)))
      yield start, block.reshape((n, *chunk.shape[1:]))


def _stream_whole(chunk: _Chunk, out: np.ndarray) -> None:
  if out.dtype == chunk.dtype:  # decompressed straight into the output
    with _decoded(chunk) as stream:
      _fill(stream, memoryview(out.reshape(-1).view(np.uint8)))
    return
  for start, block in _blocks(chunk, chunk.shape[0]):
    out[start : start + len(block)] = block


def _stream_rows(chunk: _Chunk, out: np.ndarray, index: np.ndarray, axis: int) -> None:
  kept = np.flatnonzero(index >= 0)
  if axis == 1:  # rows of the old table are the leading entries of axis 0 of the new one
    old_cols = index[kept]
    for start, block in _blocks(chunk, out.shape[0]):
      out[start : start + len(block), kept] = block[:, old_cols]
    return
  order = np.argsort(index[kept], kind="stable")
  old, new = index[kept][order], kept[order]
  cursor = 0
  for start, block in _blocks(chunk, int(old[-1]) + 1 if old.size else 0):  # up to the last row kept
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
