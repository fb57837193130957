"""The safetensors source: Hugging Face `model.safetensors`, and sharded files with their index JSON.

A location may be a `.safetensors` file, a `*.safetensors.index.json` file
(`{"weight_map": {tensor: shard file}}`), or a directory holding either
(`model.safetensors.index.json` first, then `model.safetensors`, then a single
`*.safetensors` file). Each file is checked and listed with the `safetensors`
package's `safe_open` (the `safetensors` extra); the tensors' byte offsets
come from the file's JSON header (8-byte little-endian length, then
`{name: {dtype, shape, data_offsets}}`), and each tensor is a `FileArray`
over its raw little-endian bytes: only the tensors, and for a vocabulary remap
or a shard only the rows, that are asked for are read.

Dotted names become slash names (`model.layers.0.mlp.up_proj.weight` ->
`model/layers/0/mlp/up_proj/weight`); a file whose names already hold `/`
keeps them as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.sources.lazy import FileArray, TreeSource, nest, require, split_names, tree_source

INDEX_SUFFIX = ".safetensors.index.json"
_DTYPES = {
  "BOOL": np.dtype(bool),
  "U8": np.dtype("u1"),
  "I8": np.dtype("i1"),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
  "C64": np.dtype("<c8"),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):  # ml_dtypes >= 0.5
  _DTYPES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)


class SafetensorsSource(TreeSource):
  """safetensors files (one, or the shards of an index) opened for reading; see the module doc."""

  format: ClassVar[str] = "safetensors"


def is_safetensors(path: str) -> bool:
  """Whether `path` is a `.safetensors` file, an index JSON, or a directory holding either."""
  if os.path.isfile(path):
    return path.endswith((".safetensors", INDEX_SUFFIX))
  return os.path.isdir(path) and any(n.endswith((".safetensors", INDEX_SUFFIX)) for n in os.listdir(path))


def open_safetensors(location: str, **_: Any) -> SafetensorsSource:
  """Opens safetensors file(s) and reads their headers (names, shapes, dtypes, offsets).

  Args:
    location: A `.safetensors` file, a `*.safetensors.index.json` file, or a
      directory holding one.

  Returns:
    The source.

  Raises:
    WarmStartError: Naming the file, if a file or shard is missing, truncated
      or damaged, or the directory's choice is ambiguous.
    MissingExtraError: If the `safetensors` package is not installed.

  Examples:
    >>> import tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = tempfile.mkdtemp() + "/model.safetensors"
    >>> save_file({"model.embed.weight": np.ones((4, 2), np.float32)}, path)
    >>> source = open_safetensors(path)
    >>> source.variables["model/embed/weight"].shape
    (4, 2)
  """
  path = _resolve(location)
  if path.endswith(INDEX_SUFFIX):
    files, weight_map = _index(path)
  else:
    files, weight_map = [path], None
  headers = {f: _header(f) for f in files}
  flat: dict[str, FileArray] = {}
  if weight_map is None:
    flat = headers[path]
  else:
    missing = []
    for name, shard in weight_map.items():
      found = headers[os.path.join(os.path.dirname(path), shard)]
      if name not in found:
        missing.append(f"{name!r} is listed in {path} as in {shard}, which does not hold it")
      else:
        flat[name] = found[name]
    if missing:
      raise WarmStartError(missing, header=f"The safetensors index {path} does not match its shards")
  paths = split_names(flat)
  tree = nest({paths[k]: v for k, v in flat.items()}, path)
  return tree_source(SafetensorsSource, tree, path=path, requested=location, files=[path, *files])


def _resolve(location: str) -> str:
  """The file to read: the location itself, or the index or single file in a directory."""
  if not os.path.isdir(location):
    return location
  names = sorted(os.listdir(location))
  indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
  files = [n for n in names if n.endswith(".safetensors")]
  for choice in ("model" + INDEX_SUFFIX, *(indexes if len(indexes) == 1 else []), "model.safetensors"):
    if choice in names:
      return os.path.join(location, choice)
  if len(files) == 1 and not indexes:
    return os.path.join(location, files[0])
  raise WarmStartError(
    f"{location} holds several safetensors checkpoints ({', '.join(indexes + files)}) and no"
    f" model{INDEX_SUFFIX} or model.safetensors: give the path of the index JSON or of the file to read."
  )


def _index(path: str) -> tuple[list[str], dict[str, str]]:
  """The shard files and `weight_map` of an index JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError(f"weight_map is a {type(weight_map).__name__}")
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise WarmStartError(
      f"The safetensors index {path} cannot be read: {type(err).__name__}: {err}. It should hold"
      ' {"weight_map": {tensor name: shard file}}; check that it was copied completely.'
    ) from err
  directory = os.path.dirname(path)
  shards = sorted(set(weight_map.values()))
  missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
  if missing:
    raise WarmStartError(
      f"The safetensors index {path} lists {len(shards)} shard files, but {', '.join(missing)}"
      f" {'is' if len(missing) == 1 else 'are'} missing from {directory}. Download or copy every shard."
    )
  return [os.path.join(directory, s) for s in shards], weight_map


def _header(path: str) -> dict[str, FileArray]:
  """A safetensors file's tensors, checked by `safe_open` and located through the header."""
  package = require("safetensors", "safetensors", f"Reading {path}")
  try:
    with package.safe_open(path, framework="numpy") as f:
      keys = list(f.keys())
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
  except Exception as err:  # SafetensorError, OSError, ValueError: the file is not whole
    raise WarmStartError(
      f"{path} is not a readable safetensors file ({_size(path)}): {type(err).__name__}: {err}. The file may be"
      " truncated or damaged; check that it was downloaded or copied completely."
    ) from err
  return {name: _tensor(path, 8 + n, size, name, header[name]) for name in keys}


def _tensor(path: str, start: int, size: int, name: str, info: dict[str, Any]) -> FileArray:
  dtype = _DTYPES.get(info["dtype"])
  if dtype is None:
    raise WarmStartError(
      f"Tensor {name!r} in {path} has dtype {info['dtype']}, which this reader does not support"
      f" (it reads {', '.join(_DTYPES)})."
    )
  shape = tuple(int(d) for d in info["shape"])
  begin, end = (int(x) for x in info["data_offsets"])
  if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start + end > size:
    raise WarmStartError(f"Tensor {name!r} in {path} has a damaged header entry {info}.")
  return FileArray(path, start + begin, shape, dtype)


def _size(path: str) -> str:
  try:
    return f"{os.path.getsize(path)} bytes"
  except OSError:
    return "unreadable"


def files_of(source: SafetensorsSource) -> Iterable[str]:
  """The files a source reads from (for tests and reports)."""
  return sorted({leaf.path for leaf in source.leaves})
