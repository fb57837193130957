"""The tree in a Flax msgpack file, its arrays located by file offset instead of read.

Flax (`flax.serialization.msgpack_serialize`), Orbax's 2023 aggregate files
and T5X's `checkpoint` file all write a pytree as msgpack, with each array as
a msgpack extension of type 1 holding `(shape, dtype name, raw C-order bytes)`
(type 3 for a numpy scalar, type 2 for a complex number) and arrays over
1 GiB split into flat pieces under a `__msgpack_chunked_array__` dict.
`msgpack_restore` decodes all of it at once; `read_tree` instead walks the
file's structure, skipping over each array's bytes, and returns the tree with
every array as a `FileArray` at its offset: reading the structure costs a few
reads per leaf, and each tensor (or row block) is read only when asked for.
The decoding follows `flax.serialization` (tests compare with
`msgpack_restore`).
"""

from __future__ import annotations

import functools
import io
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.sources.lazy import ChunkedArray, FileArray, Value

_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def starts_with_map(path: str) -> bool:
  """Whether a file begins with a msgpack map (as every serialized state dict does)."""
  try:
    with open(path, "rb") as f:
      first = f.read(1)
  except OSError:
    return False
  return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def read_tree(path: str) -> Any:
  """The msgpack tree in `path`: dicts, lists and plain values, with arrays as `FileArray`/`ChunkedArray`.

  The walk is remembered per (file, size, modification time), so that
  recognisers and openers share it.

  Args:
    path: A file written by `flax.serialization.msgpack_serialize` (or `to_bytes`).

  Returns:
    The tree. Numpy scalars and complex numbers are `Value`s; other plain
    values (ints, floats, strings, None) are as msgpack decodes them.

  Raises:
    WarmStartError: Naming the file, if it is truncated or not msgpack.

  Examples:
    >>> import tempfile, numpy as np
    >>> from flax import serialization
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with open(path, "wb") as f:
    ...   _ = f.write(serialization.msgpack_serialize({"w": np.arange(4.0), "step": 3}))
    >>> tree = read_tree(path)
    >>> tree["w"].shape, tree["w"][1:3].tolist(), tree["step"]
    ((4,), [1.0, 2.0], 3)
  """
  st = os.stat(path)
  return _read_tree_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_tree_cached(path: str, size: int, mtime_ns: int) -> Any:
  del size, mtime_ns  # the cache key
  return _read_tree(path)


def _read_tree(path: str) -> Any:
  """Walks the file (see `read_tree`)."""
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      tree = _Walker(f, path, size).value()
  except (ValueError, struct.error, UnicodeDecodeError, TypeError) as err:
    raise WarmStartError(
      f"{path} is not a readable msgpack checkpoint ({size} bytes): {err}. The file may be truncated or damaged;"
      " check that it was copied or written completely."
    ) from err
  return _unchunk(tree)


class _Walker:
  """Reads one msgpack object from a file, locating arrays rather than reading them."""

  def __init__(self, f: io.BufferedReader, path: str, size: int):
    self.f, self.path, self.size = f, path, size

  def read(self, n: int) -> bytes:
    data = self.f.read(n)
    if len(data) != n:
      raise ValueError(f"it ends at byte {self.size}, inside an entry that needs {n - len(data)} more bytes")
    return data

  def skip(self, n: int) -> int:
    """Skips `n` bytes; returns where they start."""
    start = self.f.tell()
    if start + n > self.size:
      raise ValueError(f"it ends at byte {self.size}, {start + n - self.size} bytes before the end of an array")
    self.f.seek(n, io.SEEK_CUR)
    return start

  def uint(self, n: int) -> int:
    return int.from_bytes(self.read(n), "big")

  def value(self) -> Any:
    b = self.read(1)[0]
    if b <= 0x7F:
      return b
    if b >= 0xE0:
      return b - 0x100
    if 0x80 <= b <= 0x8F:
      return self.map(b & 0x0F)
    if 0x90 <= b <= 0x9F:
      return [self.value() for _ in range(b & 0x0F)]
    if 0xA0 <= b <= 0xBF:
      return self.read(b & 0x1F).decode()
    simple = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in simple:
      return simple[b]
    if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
      return self.read(self.uint(1 << (b - 0xC4)))
    if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32
      n = self.uint(1 << (b - 0xC7))
      return self.ext(struct.unpack(">b", self.read(1))[0], n)
    if b == 0xCA:
      return struct.unpack(">f", self.read(4))[0]
    if b == 0xCB:
      return struct.unpack(">d", self.read(8))[0]
    if 0xCC <= b <= 0xCF:  # uint 8..64
      return self.uint(1 << (b - 0xCC))
    if 0xD0 <= b <= 0xD3:  # int 8..64
      return int.from_bytes(self.read(1 << (b - 0xD0)), "big", signed=True)
    if 0xD4 <= b <= 0xD8:  # fixext 1..16
      code = struct.unpack(">b", self.read(1))[0]
      return self.ext(code, 1 << (b - 0xD4))
    if 0xD9 <= b <= 0xDB:  # str 8/16/32
      return self.read(self.uint(1 << (b - 0xD9))).decode()
    if b in (0xDC, 0xDD):  # array 16/32
      return [self.value() for _ in range(self.uint(2 if b == 0xDC else 4))]
    if b in (0xDE, 0xDF):  # map 16/32
      return self.map(self.uint(2 if b == 0xDE else 4))
    raise ValueError(f"byte 0x{b:02x} at {self.f.tell() - 1} starts no msgpack value")

  def map(self, n: int) -> dict[str, Any]:
    out = {}
    for _ in range(n):
      key = self.value()
      out[key if isinstance(key, str) else str(key)] = self.value()
    return out

  def ext(self, code: int, n: int) -> Any:
    start = self.f.tell()
    if code not in (_NDARRAY, _NPSCALAR):
      payload = self.read(n)
      if code == _COMPLEX:
        import msgpack  # noqa: PLC0415 (comes with flax)

        real, imag = msgpack.unpackb(payload)
        return Value(complex(real, imag))
      raise ValueError(f"unknown msgpack extension type {code} at byte {start}")
    # (shape, dtype name, bytes), packed as msgpack inside the extension.
    if self.read(1)[0] != 0x93:
      raise ValueError(f"the array at byte {start} is not (shape, dtype, data)")
    shape = tuple(self.value())
    name = self.value()
    name = name.decode() if isinstance(name, bytes) else name
    b = self.read(1)[0]
    if b not in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB, *range(0xA0, 0xC0)):
      raise ValueError(f"the array at byte {start} holds no bytes")
    length = b & 0x1F if b >= 0xA0 and b <= 0xBF else self.uint(1 << ((b - 0xC4) if b <= 0xC6 else (b - 0xD9)))
    dtype = _dtype(name)
    if length != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f"the array at byte {start} has {length} bytes for shape {shape} {name}")
    offset = self.skip(length)
    if self.f.tell() != start + n:
      raise ValueError(f"the extension at byte {start} is {n} bytes, its array ends at {self.f.tell() - start}")
    array = FileArray(self.path, offset, shape, dtype)
    return Value(array[...][()]) if code == _NPSCALAR else array


def _dtype(name: str) -> np.dtype:
  """A dtype by its numpy name, ml_dtypes' included (`bfloat16`, `float8_e4m3fn`), little-endian."""
  if hasattr(ml_dtypes, name) and name not in ("finfo", "iinfo"):
    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name).newbyteorder("<")


def _unchunk(tree: Any) -> Any:
  """Flax's chunked arrays (`{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}`) as `ChunkedArray`s."""
  if isinstance(tree, list):
    return [_unchunk(x) for x in tree]
  if not isinstance(tree, dict):
    return tree
  if tree.get(_CHUNKED) is True:
    shape = tuple(_as_tuple(tree["shape"]))
    pieces = tuple(_as_tuple(tree["chunks"]))
    if not pieces or not all(isinstance(p, FileArray) for p in pieces):
      raise WarmStartError(f"A chunked array of shape {shape} has no readable pieces.")
    return ChunkedArray(pieces=pieces, shape=shape, dtype=pieces[0].dtype)
  return {k: _unchunk(v) for k, v in tree.items()}


def _as_tuple(x: Any) -> list[Any]:
  """Flax's `_tuple_to_dict` form (`{"0": a, "1": b}`) back to a list."""
  return [x[str(i)] for i in range(len(x))] if isinstance(x, dict) else list(x)
