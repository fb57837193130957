"""The npz source: `np.savez` files of params (big_vision releases, plain numpy).

Names are the file's keys split at `/` (big_vision's flattened
`params/encoder/kernel`) or, when no key holds a `/`, at `.`. An uncompressed
member (`np.savez`) is read in place: its `.npy` header gives shape, dtype and
where the raw bytes start inside the zip, so each tensor is a `FileArray` and
only the tensors (and rows) asked for are read, like `np.load(mmap_mode="r")`
on a `.npy` file. A compressed member (`np.savez_compressed`) cannot be read
in parts: it is decompressed whole when read. Arrays of Python objects
(pickled) are refused.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from typing import Any, ClassVar

import numpy as np

from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.sources.lazy import FileArray, TreeSource, nest, split_names, tree_source


class NpzSource(TreeSource):
  """An `.npz` file opened for reading; see the module doc."""

  format: ClassVar[str] = "npz"


@dataclasses.dataclass(frozen=True)
class ZipMember:
  """A compressed `.npy` member of an npz: read whole (decompressed) when indexed.

  Attributes:
    path: The npz file.
    member: The member's name.
    shape: The array's shape.
    dtype: Its dtype.
  """

  path: str
  member: str
  shape: tuple[int, ...]
  dtype: np.dtype

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    del copy
    with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
      out = np.lib.format.read_array(f, allow_pickle=False)
    return out if dtype is None else out.astype(dtype, copy=False)

  def __getitem__(self, index: Any) -> np.ndarray:
    return np.asarray(self.__array__()[index])


def is_npz(path: str) -> bool:
  """Whether `path` is an `.npz` file (a zip of `.npy` members)."""
  if not os.path.isfile(path):
    return False
  if path.endswith(".npz"):
    return True
  try:
    with open(path, "rb") as f:
      if f.read(4) != b"PK\x03\x04":
        return False
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (OSError, zipfile.BadZipFile):
    return False
  return bool(names) and all(n.endswith(".npy") for n in names)


def open_npz(location: str, **_: Any) -> NpzSource:
  """Opens an npz file and reads each member's `.npy` header (names, shapes, dtypes, offsets).

  Args:
    location: The `.npz` file.

  Returns:
    The source.

  Raises:
    WarmStartError: Naming the file, if it is truncated or damaged, or holds
      pickled objects.

  Examples:
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/params.npz"
    >>> np.savez(path, **{"params/enc/kernel": np.ones((3, 2)), "step": np.array(5)})
    >>> source = open_npz(path)
    >>> sorted((n, v.shape) for n, v in source.variables.items())
    [('enc/kernel', (3, 2)), ('step', ())]
  """
  path = location
  size = os.path.getsize(path)
  flat: dict[str, Any] = {}
  try:
    with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
      for info in z.infolist():
        if not info.filename.endswith(".npy"):
          continue
        flat[info.filename[: -len(".npy")]] = _member(z, raw, info, path, size)
  except (OSError, zipfile.BadZipFile, ValueError, EOFError, struct.error) as err:
    raise WarmStartError(
      f"{path} is not a readable npz file ({size} bytes): {type(err).__name__}: {err}. The file may be truncated"
      " or damaged; check that it was downloaded or copied completely."
    ) from err
  paths = split_names(flat)
  tree = nest({paths[k]: v for k, v in flat.items()}, path)
  return tree_source(NpzSource, tree, path=path, requested=location, files=[path])


def _member(z: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo, path: str, size: int) -> FileArray | ZipMember:
  """One member: a `FileArray` at its bytes inside the zip if stored, else a `ZipMember`."""
  with z.open(info) as f:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    header_bytes = f.tell() if f.seekable() else None
  if dtype.hasobject:
    raise WarmStartError(
      f"{info.filename} in {path} holds Python objects (pickled), which are not read: save numeric arrays."
    )
  if info.compress_type != zipfile.ZIP_STORED or header_bytes is None:
    return ZipMember(path, info.filename, tuple(shape), dtype)
  # The local file header: 30 bytes, then the name and the extra field.
  raw.seek(info.header_offset)
  local = raw.read(30)
  if local[:4] != b"PK\x03\x04":
    raise ValueError(f"no local header for {info.filename} at byte {info.header_offset}")
  name_len, extra_len = struct.unpack("<HH", local[26:30])
  offset = info.header_offset + 30 + name_len + extra_len + header_bytes
  array = FileArray(path, offset, tuple(shape), dtype, fortran=bool(fortran) and len(shape) > 1)
  if offset + array.nbytes > size:
    raise ValueError(f"{info.filename} ends {offset + array.nbytes - size} bytes after the end of the file")
  return array
