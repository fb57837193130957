"""Sources over a tree of lazily readable leaves: what the raw formats (safetensors, npz, msgpack) share.

A format module finds its tensors (a file, an offset, a shape and a dtype, or
a TensorStore spec, or a small value stored inline), arranges them in a tree
of names, and hands it to `tree_source`; the `TreeSource` it returns names the
leaves under the naming contract and reads them on request:

* `FileArray`: a tensor stored as raw bytes at a known offset of a file. It
  indexes like a numpy array; each index reads only the bytes it needs, with
  `os.preadv` into an array of its own (no memory mapping, so the pages read
  are not kept in this process's memory after the copy), in blocks of at most
  16 MiB: a vocabulary remap reads only the kept rows' blocks.
* `StoreArray`: a TensorStore array (T5X's zarr arrays, Orbax's), opened on
  request.
* `Value`: a value stored inline (a step, a small array already decoded).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from flax_warmstart._src.errors import DAMAGED_HINT, WarmStartError, install_extra
from flax_warmstart._src.naming import Variable, flatten_checkpoint_tree
from flax_warmstart._src.sources.base import Source

# Reads of a `FileArray` go in blocks of at most this many bytes.
_BLOCK_BYTES = 1 << 24


class RowArray:
  """A lazy numpy-like array read in blocks of rows along axis 0: indexing reads only the rows it touches.

  Subclasses give `shape`, `dtype` and `_read_rows(lo, hi, out)` (rows `lo:hi`
  into `out`, a C-ordered array, or a new one); indexing by ints, slices, `...`
  and one 1-D integer array works as in numpy. A run of whole rows is read
  straight into the result; a gather reads each block of rows into a scratch
  buffer reused by the thread (fresh pages are slow to touch) and copies the
  rows it needs out of it.
  """

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    del copy  # always a new array
    out = self[...]
    return out if dtype is None else out.astype(dtype, copy=False)

  def __getitem__(self, index: Any) -> np.ndarray:
    index = _expand(index, self.ndim)
    if self.ndim == 0 or self.size == 0:
      whole = self._read_rows(0, self.shape[0] if self.ndim else 1)
      return np.asarray(whole[index]) if index else whole
    first, rest = index[0], (slice(None), *index[1:])
    rows = np.arange(self.shape[0])[first]
    scalar_row = np.ndim(rows) == 0
    rows = np.atleast_1d(rows)
    # The result's shape, from a zero-stride stand-in.
    probe = np.lib.stride_tricks.as_strided(np.zeros(1, self.dtype), (len(rows), *self.shape[1:]), (0,) * self.ndim)
    out = np.empty(probe[rest].shape, self.dtype)
    whole_rows = all(isinstance(i, slice) and i == slice(None) for i in rest) and out.shape == probe.shape
    if len(rows) and whole_rows and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
      self._read_rows(int(rows[0]), int(rows[-1]) + 1, out)  # a run of whole rows: no copy
    elif len(rows):
      row_bytes = self.nbytes // self.shape[0]
      per_block = max(1, _BLOCK_BYTES // max(1, row_bytes))
      order = np.argsort(rows, kind="stable")
      ordered = rows[order]
      starts = np.flatnonzero(np.diff(ordered // per_block, prepend=-1))
      ends = np.append(starts[1:], len(ordered))
      for i, j in zip(starts.tolist(), ends.tolist(), strict=True):
        lo, hi = int(ordered[i]), int(ordered[j - 1]) + 1
        if (j - i) * 8 < hi - lo:  # sparse in this block: read only the runs of rows it needs
          out[order[i:j]] = self._read_runs(ordered[i:j])[rest]
        else:
          block = _scratch((hi - lo) * row_bytes).view(self.dtype).reshape((hi - lo, *self.shape[1:]))
          out[order[i:j]] = self._read_rows(lo, hi, block)[ordered[i:j] - lo][rest]
    return out[0] if scalar_row else out

  def _read_rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    raise NotImplementedError

  def _read_runs(self, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows, each run of consecutive rows in one read."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist(), strict=True)
    return np.concatenate([self._read_rows(int(rows[s]), int(rows[e - 1]) + 1) for s, e in runs])


@dataclasses.dataclass(frozen=True)
class FileArray(RowArray):
  """A tensor stored as raw bytes (C or Fortran order) at `offset` in `path`: a lazy numpy-like array.

  Indexing reads only the rows (along axis 0) that the index touches, with
  `os.preadv` into an array of its own; a Fortran-ordered tensor is read whole.

  Attributes:
    path: The file.
    offset: Where the tensor's first byte is.
    shape: The tensor's shape.
    dtype: Its dtype (byte order included).
    fortran: Whether it is stored in Fortran order.

  Examples:
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/raw"
    >>> with open(path, "wb") as f:
    ...   _ = f.write(b"header" + np.arange(12, dtype="<f4").tobytes())
    >>> a = FileArray(path, 6, (4, 3), np.dtype("<f4"))
    >>> a[np.array([3, 0]), 1:].tolist()
    [[10.0, 11.0], [1.0, 2.0]]
  """

  path: str
  offset: int
  shape: tuple[int, ...]
  dtype: np.dtype
  fortran: bool = False

  @property
  def where(self) -> str:
    """The file it is read from, for messages."""
    return self.path

  def __getitem__(self, index: Any) -> np.ndarray:
    if self.fortran:
      whole = np.empty(self.shape, self.dtype, order="F")
      _pread(self.path, self.offset, whole)
      index = _expand(index, self.ndim)
      return np.asarray(whole[index]) if index else whole
    return super().__getitem__(index)

  def _read_rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    if self.ndim == 0:
      out = np.empty((), self.dtype) if out is None else out
      _pread(self.path, self.offset, out)
      return out
    out = np.empty((hi - lo, *self.shape[1:]), self.dtype) if out is None else out
    _pread(self.path, self.offset + lo * (self.nbytes // self.shape[0] if self.shape[0] else 0), out)
    return out


@dataclasses.dataclass(frozen=True)
class ChunkedArray(RowArray):
  """A tensor stored as consecutive flat pieces (Flax msgpack splits arrays over 1 GiB so).

  Attributes:
    pieces: The flat pieces, in order (1-D `FileArray`s).
    shape: The tensor's shape.
    dtype: Its dtype.
  """

  pieces: tuple[FileArray, ...]
  shape: tuple[int, ...]
  dtype: np.dtype

  def _read_rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    shape = (hi - lo, *self.shape[1:]) if self.ndim else ()
    out = np.empty(shape, self.dtype) if out is None else out
    flat = out.reshape(-1)
    per_row = math.prod(self.shape[1:])
    start, stop = lo * per_row, (hi if self.ndim else 1) * per_row
    offset = 0
    for piece in self.pieces:
      n = piece.shape[0]
      a, b = max(start, offset), min(stop, offset + n)
      if a < b:
        piece._read_rows(a - offset, b - offset, flat[a - start : b - start])
      offset += n
    return out


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
  """A byte buffer of `nbytes` (at least) that this thread reuses: its pages are touched once."""
  buffer = getattr(_local, "buffer", None)
  if buffer is None or buffer.nbytes < nbytes:
    buffer = _local.buffer = np.empty(max(nbytes, _BLOCK_BYTES), np.uint8)
  return buffer[:nbytes]


def _expand(index: Any, ndim: int) -> tuple[Any, ...]:
  """A numpy index as a tuple of `ndim` entries (no `...`)."""
  index = index if isinstance(index, tuple) else (index,)
  if any(i is Ellipsis for i in index):
    k = next(n for n, i in enumerate(index) if i is Ellipsis)
    index = index[:k] + (slice(None),) * (ndim - len(index) + 1) + index[k + 1 :]
  return index + (slice(None),) * (ndim - len(index))


def _pread(path: str, offset: int, out: np.ndarray) -> None:
  """Reads `out.nbytes` bytes at `offset` of `path` into `out` (contiguous)."""
  view = memoryview(out.reshape(-1, order="A").view(np.uint8))
  fd = os.open(path, os.O_RDONLY)
  try:
    done = 0
    while done < len(view):
      n = os.preadv(fd, [view[done:]], offset + done)
      if n == 0:
        raise OSError(f"{path} ends at byte {offset + done}, {len(view) - done} bytes before the tensor's end")
      done += n
  finally:
    os.close(fd)


@dataclasses.dataclass(frozen=True)
class StoreArray:
  """A TensorStore array, opened on request.

  Attributes:
    spec: The TensorStore spec (JSON) to open it with.
    shape: Its shape (from metadata).
    dtype: Its dtype.
    context: The TensorStore context, if not the default.
  """

  spec: Mapping[str, Any]
  shape: tuple[int, ...]
  dtype: np.dtype
  context: Any = None

  @property
  def where(self) -> str:
    """The array's location, for messages."""
    kvstore = self.spec.get("kvstore")
    return str(kvstore.get("path", kvstore) if isinstance(kvstore, Mapping) else kvstore)

  def open(self) -> Any:
    import tensorstore as ts  # noqa: PLC0415

    kwargs = {"context": self.context} if self.context is not None else {}
    return ts.open(dict(self.spec), open=True, **kwargs).result()


@dataclasses.dataclass(frozen=True)
class Value:
  """A value stored inline in the checkpoint's own file (a step, a small decoded array)."""

  value: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.value)) if not isinstance(self.value, str | bytes) else ()

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(object) if isinstance(self.value, str | bytes) else np.asarray(self.value).dtype


def _open(leaf: Any) -> Any:
  if isinstance(leaf, StoreArray):
    return leaf.open()
  if isinstance(leaf, Value):
    return leaf.value if isinstance(leaf.value, str | bytes) else np.asarray(leaf.value)
  return leaf  # FileArray and other numpy-like arrays


@dataclasses.dataclass(frozen=True, eq=False)
class TreeSource(Source):
  """A checkpoint whose tensors are leaves of a tree, each readable on its own (see the module doc).

  Attributes:
    format: The format's name.
    path: The file or directory read (after resolving a run directory or URL).
    requested: The location the user gave.
    step: The step, when the location names one.
    variables: Checkpoint name -> `Variable`, under the naming contract.
    tree: The nested tree of leaves (`FileArray`, `StoreArray`, `Value`).
    stamps: `(file, size, mtime_ns)` of the files whose metadata was read, to
      notice a checkpoint rewritten after it was opened.
  """

  format: ClassVar[str] = "?"
  path: str
  requested: str
  step: int | float | None
  variables: Mapping[str, Variable]
  tree: Any
  stamps: tuple[tuple[str, int, int], ...] = ()

  @functools.cached_property
  def leaves(self) -> list[Any]:
    """The leaves of `tree`, indexed by `Variable.index`."""
    return jax.tree_util.tree_leaves(self.tree)

  @property
  def location(self) -> str:
    return self.path

  def check_unchanged(self) -> None:
    changed = [f for f, size, mtime in self.stamps if _stamp(f) != (f, size, mtime)]
    if changed:
      raise WarmStartError(
        f"{', '.join(changed)} changed on disk after {self.describe()} was opened: the plan may not match it any"
        " more. Open the checkpoint (build the plan) again."
      )

  def open_arrays(self, names: Iterable[str]) -> dict[str, Any]:
    out = {}
    for name in names:
      leaf = self.leaves[self.variables[name].index]
      try:
        out[name] = _open(leaf)
      except Exception as err:
        where = f" ({leaf.where})" if hasattr(leaf, "where") else ""
        raise WarmStartError(
          f"Opening {name!r} of {self.describe()}{where} failed: {type(err).__name__}: {err}. {DAMAGED_HINT}"
        ) from err
    return out

  def restore(self, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
    """Reads only the named tensors (see `Source.restore`); host results are arrays of their own, not views of files."""
    arrays = self.open_arrays(targets)
    out = {}
    for name, spec in targets.items():
      array = arrays[name]
      try:
        if isinstance(array, str | bytes):
          out[name] = array
        elif spec is None or spec.sharding is None:
          out[name] = np.array(array[...], dtype=None if spec is None else spec.dtype)
        else:
          out[name] = jax.make_array_from_callback(
            tuple(array.shape),
            spec.sharding,
            lambda index, a=array, d=spec.dtype: np.array(a[index], dtype=d),
          )
      except WarmStartError:
        raise
      except Exception as err:
        raise WarmStartError(
          f"Reading {name!r} from {self.describe()} failed: {type(err).__name__}: {err}. {DAMAGED_HINT}"
        ) from err
    return out


def _stamp(path: str) -> tuple[str, int, int]:
  try:
    st = os.stat(path)
  except OSError:
    return (path, -1, -1)
  return (path, st.st_size, st.st_mtime_ns)


def stamps(files: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
  """`(file, size, mtime_ns)` of each file, for `TreeSource.stamps`."""
  return tuple(_stamp(f) for f in files)


def nest(flat: Mapping[tuple[str, ...], Any], where: str) -> dict[str, Any]:
  """`{("a", "b"): x}` -> `{"a": {"b": x}}`.

  Args:
    flat: Key path -> leaf.
    where: The file the keys come from, for messages.

  Returns:
    The nested tree.

  Raises:
    WarmStartError: If a key is both a tensor and a prefix of another (`a.b` and `a.b.c`).
  """
  out: dict[str, Any] = {}
  clashes = []
  for path, leaf in flat.items():
    node = out
    for depth, key in enumerate(path[:-1]):
      child = node.setdefault(key, {})
      if not isinstance(child, dict):
        clashes.append(f"{'/'.join(path[: depth + 1])!r} is a tensor and also the scope of {'/'.join(path)!r}")
        break
      node = child
    else:
      if path[-1] in node:
        clashes.append(f"{'/'.join(path)!r} is a tensor and also a scope (or appears twice)")
      node[path[-1]] = leaf
  if clashes:
    raise WarmStartError(clashes, header=f"Cannot name the tensors of {where}")
  return out


def as_leaves(
  tree: Any, leaf: Callable[[Any], Any] | None = None, is_leaf: Callable[[Any], bool] = lambda x: False
) -> Any:
  """A decoded tree (dicts, lists, values) with every leaf a readable leaf; None leaves (unused slots) dropped.

  Args:
    tree: The tree, e.g. from `msgpack_tree.read_tree`.
    leaf: Maps a raw leaf to a leaf object (or None to drop it); by default
      arrays stay as they are and plain values become `Value`s.
    is_leaf: Marks dicts that are leaves (T5X's TensorStore specs).

  Returns:
    The tree of leaves.
  """
  if isinstance(tree, dict) and not is_leaf(tree):
    out = {k: as_leaves(v, leaf, is_leaf) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None}
  if isinstance(tree, list):
    return [as_leaves(v, leaf, is_leaf) for v in tree]
  if leaf is not None:
    tree = leaf(tree)
  if tree is None or isinstance(tree, RowArray | StoreArray | Value):
    return tree
  return Value(tree)


def split_names(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
  """Flat tensor names as key paths: split at `/` when any name holds one, else at `.`.

  Examples:
    >>> split_names(["model.layers.0.weight"])
    {'model.layers.0.weight': ('model', 'layers', '0', 'weight')}
    >>> split_names(["params/enc/kernel", "step"])
    {'params/enc/kernel': ('params', 'enc', 'kernel'), 'step': ('step',)}
  """
  names = list(names)
  sep = "/" if any("/" in n for n in names) else "."
  return {n: tuple(p for p in n.split(sep) if p) or (n,) for n in names}


def tree_source(
  cls: type[TreeSource],
  tree: Any,
  *,
  path: str,
  requested: str,
  step: int | float | None = None,
  files: Iterable[str] = (),
) -> TreeSource:
  """A `TreeSource` of class `cls` over `tree`, its leaves named under the naming contract.

  Args:
    cls: The format's `TreeSource` subclass.
    tree: Nested dicts (and lists) whose leaves have `shape` and `dtype`.
    path: The file or directory read.
    requested: The location the user gave.
    step: The step, if known.
    files: The files whose metadata was read (stamped for `check_unchanged`).

  Returns:
    The source.
  """
  variables = {v.name: v for v, _ in flatten_checkpoint_tree(tree)}
  return cls(path=path, requested=requested, step=step, variables=variables, tree=tree, stamps=stamps(files))


class MissingExtraError(WarmStartError, ImportError):
  """An optional dependency a format needs is not installed: names the extra to install.

  Both a `WarmStartError` (the command line reports it in one line) and an
  `ImportError` (what a missing optional dependency raises, STYLE.md).
  """


def require(module: str, extra: str, what: str) -> Any:
  """Imports an optional dependency, or raises `MissingExtraError` naming the extra that installs it.

  Args:
    module: The module to import (`"safetensors"`).
    extra: The `flax_warmstart` extra that installs it.
    what: What needs it, for the message (`"Reading model.safetensors"`).

  Returns:
    The module.
  """
  import importlib  # noqa: PLC0415

  try:
    return importlib.import_module(module)
  except ImportError as err:
    raise MissingExtraError(
      f"{what} needs the {module!r} package, which is not installed: {install_extra(extra, module)}."
    ) from err
