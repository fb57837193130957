"""CRC32C (Castagnoli) in numpy, for checking the tensors of TensorFlow checkpoints.

TensorFlow stores a masked CRC32C of every tensor's bytes and of every block
of its `.index` table. No C implementation comes with this library's
dependencies, and a byte-at-a-time Python loop runs at about 5 MB/s, so the
bulk of the bytes is checksummed in parallel lanes with numpy:

CRC is linear over GF(2). With `A` the operator "append 4 zero bytes" on a
raw CRC register (initial value 0, no final xor), the raw CRC of the 32-bit
words `w_0 .. w_{N-1}` is `XOR_i A^(N-i) w_i`. Cut the words into `L`
interleaved lanes (lane `k` holds words `k, k+L, k+2L, ...`), run each lane
through the register with the step `c <- A^L(c) ^ w` (two lookups in 16-bit
tables per word, vectorised over the lanes, each step reading `L` contiguous
words), and the raw CRC of the whole is the raw CRC of the `L` lane registers
taken as words, a problem `L` times smaller. About 1 GB/s on one core of this
project's machine; numpy releases the GIL, so pieces run concurrently.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8
_MASK32 = 0xFFFFFFFF
# Lane counts, largest first: a buffer is cut into runs of 4 * lanes * k bytes.
_LANES = (65536, 2048, 64)


@functools.cache
def _byte_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    c = byte
    for _ in range(8):
      c = (c >> 1) ^ (_POLY if c & 1 else 0)
    table.append(c)
  return tuple(table)


def _apply(matrix: tuple[int, ...], x: int) -> int:
  """A 32x32 GF(2) matrix (as its 32 columns) applied to a 32-bit vector."""
  out, i = 0, 0
  while x:
    if x & 1:
      out ^= matrix[i]
    x >>= 1
    i += 1
  return out


@functools.cache
def _zeros_power(k: int) -> tuple[int, ...]:
  """The operator that appends 2**k zero bytes to a raw CRC register."""
  if k == 0:
    table = _byte_table()
    return tuple((1 << i >> 8) ^ table[(1 << i) & 0xFF] for i in range(32))
  half = _zeros_power(k - 1)
  return tuple(_apply(half, column) for column in half)


def _shift(crc: int, nbytes: int) -> int:
  """A raw CRC register after `nbytes` zero bytes more."""
  k = 0
  while nbytes and crc:
    if nbytes & 1:
      crc = _apply(_zeros_power(k), crc)
    nbytes >>= 1
    k += 1
  return crc


@functools.cache
def _lane_tables(lanes: int) -> tuple[np.ndarray, np.ndarray]:
  """The step `A^lanes` as two 65,536-entry tables, for the low and high 16 bits of a register."""
  columns = []
  for i in range(32):  # A^lanes applied to each basis vector: 4 * lanes zero bytes
    columns.append(_shift(1 << i, 4 * lanes))
  x = np.arange(1 << 16, dtype=np.uint32)
  low, high = np.zeros(1 << 16, np.uint32), np.zeros(1 << 16, np.uint32)
  for i in range(16):
    bit = ((x >> i) & 1).astype(bool)
    low[bit] ^= np.uint32(columns[i])
    high[bit] ^= np.uint32(columns[16 + i])
  return low, high


def _raw_bytes(data: bytes | memoryview) -> int:
  table, crc = _byte_table(), 0
  for b in bytes(data):
    crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
  return crc


def _raw_words(words: np.ndarray, lanes: int) -> int:
  """The raw CRC of `words` (uint32, a multiple of `lanes` long), lane-parallel."""
  low, high = _lane_tables(lanes)
  rows = words.reshape(-1, lanes)
  crc = np.zeros(lanes, np.uint32)
  a, b = np.empty(lanes, np.intp), np.empty(lanes, np.intp)
  x, y = np.empty(lanes, np.uint32), np.empty(lanes, np.uint32)
  for row in rows:
    np.bitwise_and(crc, 0xFFFF, out=a)
    np.right_shift(crc, 16, out=b)
    np.take(low, a, out=x, mode="wrap")
    np.take(high, b, out=y, mode="wrap")
    np.bitwise_xor(x, y, out=crc)
    np.bitwise_xor(crc, row, out=crc)
  return raw(crc.view(np.uint8))


def raw(data: Any) -> int:
  """The raw CRC32C register (initial value 0, no final xor) after `data`.

  Args:
    data: A bytes-like object or a contiguous numpy array (read as its bytes).

  Returns:
    The register, an int below 2**32.
  """
  buffer = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
  crc, start, n = 0, 0, len(buffer)
  for lanes in _LANES:
    step = 4 * lanes
    end = start + (n - start) // step * step
    if end - start >= 2 * step:
      words = buffer[start:end]
      if words.ctypes.data % 4:  # unaligned (TensorFlow packs tensors back to back): copy
        words = words.copy()
      crc = _shift(crc, end - start) ^ _raw_words(words.view(np.uint32), lanes)
      start = end
  tail = buffer[start:]
  return _shift(crc, len(tail)) ^ _raw_bytes(tail.tobytes())


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
  """The raw CRC of `a + b` from the raw CRCs of `a` and `b` and the length of `b`."""
  return _shift(crc_a, len_b) ^ crc_b


def finish(raw_crc: int, nbytes: int, crc: int = 0) -> int:
  """The CRC32C of bytes whose raw CRC is `raw_crc`, extending `crc` (the CRC32C of what came before).

  Examples:
    >>> hex(finish(raw(b"123456789"), 9))  # the standard check value
    '0xe3069283'
  """
  return _shift(crc ^ _MASK32, nbytes) ^ raw_crc ^ _MASK32


def value(data: Any, crc: int = 0) -> int:
  """The CRC32C of `data`, extending `crc` (TensorFlow's `crc32c::Extend`; `Value` when `crc` is 0).

  Examples:
    >>> hex(value(b"123456789"))
    '0xe3069283'
    >>> value(b"6789", value(b"12345")) == value(b"123456789")
    True
  """
  n = data.nbytes if isinstance(data, np.ndarray) else len(memoryview(data).cast("B"))
  return finish(raw(data), n, crc)


def mask(crc: int) -> int:
  """TensorFlow's (and LevelDB's) masked form of a CRC, as stored in its files."""
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _MASK32


def unmask(masked: int) -> int:
  """The CRC from its masked form.

  Examples:
    >>> unmask(mask(0x12345678)) == 0x12345678
    True
  """
  rot = (masked - _MASK_DELTA) & _MASK32
  return ((rot >> 17) | (rot << 15)) & _MASK32
