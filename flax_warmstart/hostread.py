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

Reads run concurrently on TensorStore's threads with a bound on the bytes in
flight (each read briefly holds a decoded chunk besides its output).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorstore as ts

# Buffers at least this large get their own anonymous memory map.
_MMAP_BYTES = 1 << 24


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
  """An uninitialised host array at a 64-byte-aligned address (zero-copy for `jax.device_put` on CPU).

  Large arrays get their own anonymous memory map: page-aligned, and filled
  about 5x faster on first touch than a malloc'd block of the same size on
  this project's machine (measured: 0.65 s against 3.2 s for 1.2 GiB), since
  the kernel can back a fresh mapping with huge pages.

  Args:
    shape: The array's shape.
    dtype: Its dtype.
    align: The address alignment in bytes.

  Returns:
    A writable array whose data starts at a multiple of `align`.

  Examples:
    >>> aligned_empty((3, 5), "float32").ctypes.data % 64
    0
  """
  dtype = np.dtype(dtype)
  count = math.prod(shape)
  nbytes = count * dtype.itemsize
  if nbytes >= _MMAP_BYTES:
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)
  raw = np.empty(nbytes + align, np.uint8)
  offset = (-raw.ctypes.data) % align
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass
class Read:
  """One read into a host buffer: `out` holds the data once `future` is done."""

  out: np.ndarray
  source: ts.TensorStore
  target: ts.TensorStore
  nbytes: int
  future: Any = None

  def start(self) -> None:
    self.future = self.target.write(self.source)

  def wait(self) -> None:
    self.future.result()


def _as_dtype(store: ts.TensorStore, dtype: Any) -> ts.TensorStore:
  dtype = np.dtype(dtype)
  return store if store.dtype.numpy_dtype == dtype else ts.cast(store, ts.dtype(dtype.name))


def whole(store: ts.TensorStore, dtype: Any) -> Read:
  """A read of a whole saved array, cast to `dtype`, into a new aligned buffer.

  Args:
    store: The saved array (from `checkpoint.open_arrays`).
    dtype: The dtype to read it as.

  Returns:
    The read, not yet started (see `run`).
  """
  out = aligned_empty(tuple(store.shape), dtype)
  return Read(out, _as_dtype(store, dtype), ts.array(out), out.nbytes)


def rows(store: ts.TensorStore, index: np.ndarray, shape: tuple[int, ...], dtype: Any, axis: int) -> Read:
  """A read of old rows into their new places: `out[..., i, ...] = old[..., index[i], ...]` where `index[i] >= 0`.

  Only those rows are copied (rows with index -1 are left uninitialised, for
  the caller to fill); a chunk that holds kept rows is decoded once.

  Args:
    store: The saved old table.
    index: The old row of each new row along `axis`, or -1.
    shape: The new table's shape.
    dtype: Its dtype.
    axis: The vocabulary axis.

  Returns:
    The read, not yet started (see `run`).
  """
  out = aligned_empty(shape, dtype)
  source = _as_dtype(store, dtype)
  other = [d for d in range(len(shape)) if d != axis]
  if any(source.shape[d] < shape[d] for d in other):
    raise ValueError(f"The old table {tuple(source.shape)} is smaller than {shape} off axis {axis}.")
  # TensorFlow uses the leading entries of the other axes (a softmax kernel's hidden size).
  source = source[tuple(slice(0, shape[d]) if d != axis else slice(None) for d in range(len(shape)))]
  kept = np.flatnonzero(index >= 0)
  lead = (slice(None),) * axis
  target = ts.array(out).oindex[(*lead, kept)]
  return Read(out, source.oindex[(*lead, index[kept])], target, out.nbytes)


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
