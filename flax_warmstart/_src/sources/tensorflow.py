"""The TensorFlow source: `tf.compat.v1.train.Saver` and `tf.train.Checkpoint` bundles, read without TensorFlow.

Locations, resolved as TensorFlow resolves `ckpt_to_initialize_from` ("the
directory with checkpoint file(s) or path to checkpoint"):

* a directory with a `checkpoint` state file: the checkpoint it names
  (`model_checkpoint_path`, the newest save). A recorded absolute path that
  does not exist here (the directory was copied from another machine) is
  looked up by its file name in this directory;
* a directory without a state file: its only checkpoint, or the one with the
  highest `-N` suffix; a SavedModel directory: its `variables/variables`;
* a checkpoint prefix (`model.ckpt-500`, `ckpt-3`), or its `.index` file or
  one of its `.data-*` files.

The `.index` table and the `.data-*` files are read here
(`tensorflow_bundle`); TensorFlow is only a test oracle. Tensors are
memory-mapped: a read touches only the rows (or the partitions) it needs,
and the mapped pages are dropped from the process after each read, so a
read holds no more than its output. The CRC32C of each tensor read is checked,
as TensorFlow checks it: computed from the first read on, in 16 MiB pieces on
two threads while the read copies, and compared when the copy is done
(`check`), so a damaged tensor fails its read with a `WarmStartError`.
The step is the prefix's `-N` suffix (for `tf.train.Checkpoint` that is its
save counter, as TensorFlow numbers it), else the value of `global_step`.

Names follow the naming contract:

* Saver names stay as they are: `dense/kernel`, `global_step`.
* Object-based names lose their `/.ATTRIBUTES/VARIABLE_VALUE` suffix
  (`model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE` -> `model/dense/kernel`);
  the `_CHECKPOINTABLE_OBJECT_GRAPH` entry and `save_counter` (bookkeeping of
  `tf.train.Checkpoint`, no model state) are not listed.
* Optimizer slots stored beside their variable get this library's slot names
  (those of optax's `adam` and `sgd(momentum=...)` states in a `TrainState`),
  so that a parameter's selection, rename and vocabulary remap carry them:

  | TensorFlow | here |
  |---|---|
  | `v/Adam`, `v/.OPTIMIZER_SLOT/<opt>/m` | `v/opt_state/0/mu` |
  | `v/Adam_1`, `v/.OPTIMIZER_SLOT/<opt>/v` | `v/opt_state/0/nu` |
  | `v/Momentum`, `v/.OPTIMIZER_SLOT/<opt>/momentum` | `v/opt_state/0/trace` |

  only where that is unambiguous: `v` is a variable of the checkpoint, the
  slots of `v` come from one optimizer family (Adam or momentum), and no two
  entries would get the same name (two optimizers' slots, or a second Adam's
  `v/Adam_2`, keep their TensorFlow names). Other slots (Adagrad, RMSProp,
  Ftrl) keep their TensorFlow names: their optax state sits elsewhere.
* A checkpoint does not record which variables were trainable: floating
  point tensors are listed as parameters, except scalar optimizer
  bookkeeping (`beta1_power`, `iter`, ...); integers, booleans and strings
  (and `global_step`) as other leaves.

Not read: TensorFlow's V1 checkpoint format (a single `model.ckpt` file
written before TF 0.12, without `.index`: a different table of
`SavedSlice`s) and tensors of dtype `resource` or `variant` (serialized C++
objects such as dataset iterators; listed, with dtype `object`, but not
readable). Strings are read as numpy arrays of `bytes`, as
`tf.train.load_checkpoint` returns them. Big-endian bundles are read with
big-endian dtypes.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import dataclasses
import glob
import math
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from flax_warmstart._src import crc32c
from flax_warmstart._src.errors import DAMAGED_HINT, WarmStartError
from flax_warmstart._src.naming import Variable
from flax_warmstart._src.sources import tensorflow_bundle as bundle
from flax_warmstart._src.sources.base import Source

STATE_FILE = "checkpoint"
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
_SLOT_MARK = "/.OPTIMIZER_SLOT/"
_BOOKKEEPING = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter" + _VALUE)
# Slot -> (optimizer family, name of the optax state field).
_SAVER_SLOTS = {"Adam": ("adam", "mu"), "Adam_1": ("adam", "nu"), "Momentum": ("momentum", "trace")}
_OBJECT_SLOTS = {"m": ("adam", "mu"), "v": ("adam", "nu"), "momentum": ("momentum", "trace")}
_OPTIMIZER_SCALARS = {"beta1_power", "beta2_power", "iter", "iterations", "learning_rate", "decay", "save_counter"}
_DATA_FILE = re.compile(r"^(.*)\.data-\d{5}-of-\d{5}$")
_STEP_SUFFIX = re.compile(r"-(\d+)$")
_PIECE_BYTES = 1 << 24  # CRC pieces: a multiple of the lane block of `crc32c`
_SMALL_BYTES = 1 << 20  # tensors up to this size are checksummed at once, on the reading thread
_crc_threads = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="flax_warmstart_crc")
_scratch = threading.local()  # each CRC thread's piece buffer


@dataclasses.dataclass(frozen=True)
class _Part:
  """One stored tensor (a whole tensor, or one slice of a partitioned one) in a data file."""

  key: str
  file: str
  offset: int
  size: int
  crc: int
  shape: tuple[int, ...]
  start: tuple[int, ...]  # where the slice starts in the full tensor


@dataclasses.dataclass(frozen=True)
class _Tensor:
  key: str
  dtype: np.dtype
  enum: int
  shape: tuple[int, ...]
  parts: tuple[_Part, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class TensorFlowSource(Source):
  """A TensorFlow checkpoint (one prefix) and its metadata; no tensor has been read.

  Attributes:
    requested: The location the user gave.
    step: The `-N` suffix of the prefix, else `global_step`'s value, else None.
    variables: Name -> `Variable`, under the naming contract (see the module docstring).
    path: The checkpoint prefix (`<dir>/model.ckpt-500`).
    tensors: Name -> where its bytes are.
  """

  format: ClassVar[str] = "tensorflow"
  requested: str
  step: int | None
  variables: Mapping[str, Variable]
  path: str
  tensors: Mapping[str, _Tensor]

  @property
  def location(self) -> str:
    return self.path

  def open_arrays(self, names: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
      tensor = self.tensors[name]
      if tensor.dtype.kind == "O":
        continue
      parts = [_PartArray(p, tensor.dtype, self.path) for p in tensor.parts]
      out[name] = parts[0] if len(parts) == 1 and not any(tensor.parts[0].start) else _Assembled(tensor, parts)
    return out

  def restore(self, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
    arrays = self.open_arrays(targets)
    out = {}
    for name, spec in targets.items():
      if name not in arrays:
        out[name] = _read_strings(self.tensors[name], self.path)
      elif spec is None or spec.sharding is None:
        out[name] = np.array(arrays[name][...], dtype=None if spec is None else spec.dtype)
      else:
        array, dtype = arrays[name], spec.dtype
        out[name] = jax.make_array_from_callback(
          tuple(array.shape), spec.sharding, lambda index, a=array, d=dtype: np.asarray(a[index], dtype=d)
        )
    for array in arrays.values():
      array.check()
    return out


class _PartArray:
  """One stored tensor, memory-mapped and read on indexing.

  Its CRC32C is computed in the background from the first read on (16 MiB
  pieces read with `readinto` into a buffer per thread, two threads, while the
  read copies from the mapping), and `check` waits for it: the read stage calls
  `check` after its copy, so damaged bytes fail the read.
  """

  def __init__(self, part: _Part, dtype: np.dtype, prefix: str):
    self.part, self.dtype, self.shape, self.prefix = part, dtype, part.shape, prefix
    self.ndim = len(part.shape)
    self._lock = threading.Lock()
    self._map: mmap.mmap | None = None
    self._view: np.ndarray | None = None
    self._pieces: list[tuple[int, int, concurrent.futures.Future[int]]] | None = None
    self._checked = False

  def _open(self) -> np.ndarray:
    with self._lock:
      if self._view is None:
        if self.part.size == 0:
          self._view = np.zeros(self.shape, self.dtype)
        else:
          start = self.part.offset - self.part.offset % mmap.ALLOCATIONGRANULARITY
          with open(self.part.file, "rb") as f:
            self._map = mmap.mmap(
              f.fileno(), self.part.offset + self.part.size - start, access=mmap.ACCESS_READ, offset=start
            )
          count = math.prod(self.shape)
          flat = np.frombuffer(self._map, self.dtype, count=count, offset=self.part.offset - start)
          self._view = flat.reshape(self.shape)
        size = self.part.size
        if size <= _SMALL_BYTES:  # checksummed here, from the mapping
          done: concurrent.futures.Future[int] = concurrent.futures.Future()
          done.set_result(crc32c.raw(self._view.reshape(-1).view(np.uint8)))
          self._pieces = [(0, size, done)]
        else:
          self._pieces = [
            (s, min(s + _PIECE_BYTES, size), _crc_threads.submit(self._piece, s, min(s + _PIECE_BYTES, size)))
            for s in range(0, size, _PIECE_BYTES)
          ]
      self._release()
      return self._view

  def _piece(self, start: int, stop: int) -> int:
    """The raw CRC32C of bytes `start:stop` of the tensor, read into this thread's scratch buffer."""
    scratch = getattr(_scratch, "buffer", None)
    if scratch is None:
      scratch = _scratch.buffer = np.empty(_PIECE_BYTES, np.uint8)
    view, done = memoryview(scratch)[: stop - start], 0
    with open(self.part.file, "rb", buffering=0) as f:
      f.seek(self.part.offset + start)
      while done < len(view):
        n = f.readinto(view[done:])
        if not n:
          raise ValueError(f"{self.part.file} ends before byte {self.part.offset + stop}")
        done += n
    return crc32c.raw(scratch[: stop - start])

  def _release(self) -> None:
    """Drops the mapped pages from this process (they stay in the page cache): a read holds only its output."""
    if self._map is not None and hasattr(self._map, "madvise"):
      self._map.madvise(mmap.MADV_DONTNEED)

  def check(self) -> None:
    """Waits for the CRC32C of the stored bytes and compares it with the stored one.

    Raises:
      WarmStartError: Naming the tensor and the data file, if they differ.
    """
    self._open()
    if self._checked:
      return
    crc = 0
    try:
      for start, stop, future in self._pieces or ():
        crc = crc32c.combine(crc, future.result(), stop - start)
    except (OSError, ValueError) as err:
      raise WarmStartError(f"Reading {self.part.key!r} from {self.part.file} failed: {err}. {DAMAGED_HINT}") from err
    _compare(crc32c.finish(crc, self.part.size), self.part, self.prefix)
    self._checked = True
    self._release()

  def __getitem__(self, index: Any) -> np.ndarray:
    return self._open()[index]

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    view = self._open()
    return np.array(view, dtype=dtype) if dtype is not None or copy else view


def _compare(actual: int, part: _Part, prefix: str) -> None:
  expected = crc32c.unmask(part.crc)
  if actual != expected:
    raise WarmStartError(
      f"Checkpoint {prefix} is damaged: the {part.size} bytes of {part.key!r} at offset {part.offset} of"
      f" {part.file} fail their CRC32C check (stored {expected:08x}, computed {actual:08x}). {DAMAGED_HINT}"
    )


class _Assembled:
  """A partitioned tensor: its slices assembled on indexing (only the slices that the index touches are read)."""

  def __init__(self, tensor: _Tensor, parts: list[_PartArray]):
    self.shape, self.dtype, self.ndim = tensor.shape, tensor.dtype, len(tensor.shape)
    self.parts = parts

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    return np.asarray(self[...], dtype=dtype)

  def check(self) -> None:
    """Checks the CRC32C of every slice read so far (see `_PartArray.check`)."""
    for part in self.parts:
      if part._view is not None:
        part.check()

  def __getitem__(self, index: Any) -> np.ndarray:
    dims = _normalize(index, self.shape)
    if dims is None:  # an index of another kind: assemble the whole tensor, then index it
      return self[...][index]
    squeeze = tuple(d for d, ix in enumerate(dims) if isinstance(ix, int))
    dims = [slice(ix, ix + 1) if isinstance(ix, int) else ix for ix in dims]
    out_shape = tuple(ix.stop - ix.start if isinstance(ix, slice) else len(ix) for ix in dims)
    out = np.empty(out_shape, self.dtype)
    for part in self.parts:
      source, target = [], []
      for ix, lo, n in zip(dims, part.part.start, part.shape, strict=True):
        if isinstance(ix, slice):
          a, b = max(ix.start, lo), min(ix.stop, lo + n)
          source.append(slice(a - lo, b - lo))
          target.append(slice(a - ix.start, b - ix.start))
          if a >= b:
            break
        else:
          selected = np.flatnonzero((ix >= lo) & (ix < lo + n))
          source.append(ix[selected] - lo)
          target.append(selected)
          if not selected.size:
            break
      else:
        out[tuple(target)] = part[tuple(source)]
    return out.reshape(tuple(n for d, n in enumerate(out_shape) if d not in squeeze))


def _normalize(index: Any, shape: tuple[int, ...]) -> list[Any] | None:
  """An index as one entry per dimension: an int, a `slice(start, stop)` (step 1), or a 1-D int array (one at most)."""
  index = index if isinstance(index, tuple) else (index,)
  if any(ix is Ellipsis for ix in index):
    at = index.index(Ellipsis)
    index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
  index = index + (slice(None),) * (len(shape) - len(index))
  if len(index) != len(shape):
    return None
  out: list[Any] = []
  arrays = 0
  for ix, n in zip(index, shape, strict=True):
    if isinstance(ix, slice):
      start, stop, step = ix.indices(n)
      if step != 1:
        return None
      out.append(slice(start, max(start, stop)))
    elif isinstance(ix, int | np.integer):
      out.append(int(ix) % n if n else int(ix))
    else:
      ix = np.asarray(ix)
      if ix.ndim != 1 or ix.dtype.kind not in "iu" or arrays:
        return None
      arrays += 1
      out.append(np.where(ix < 0, ix + n, ix))
  return out


def _read_strings(tensor: _Tensor, prefix: str) -> np.ndarray:
  """A DT_STRING tensor: varint lengths, a masked CRC32C of the lengths, then the bytes (`ReadStringTensor`)."""
  if tensor.enum != bundle.DT_STRING:
    raise WarmStartError(
      f"{tensor.key!r} in checkpoint {prefix} has TensorFlow dtype"
      f" {bundle.UNREADABLE.get(tensor.enum, f'number {tensor.enum}')}, which this reader does not read"
      " (resource and variant tensors are serialized TensorFlow objects). Leave it out of the warm start."
    )
  (part,) = tensor.parts
  count = math.prod(tensor.shape)
  if part.size == 0:
    return np.full(tensor.shape, b"", dtype=object)
  with open(part.file, "rb") as f:
    f.seek(part.offset)
    data = f.read(part.size)
  try:
    if len(data) != part.size:
      raise bundle.BundleError("the data file ends early")
    lengths, pos = [], 0
    for _ in range(count):
      n, pos = bundle.varint(data, pos)
      lengths.append(n)
    packed = b"".join(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n) for n in lengths)
    crc = crc32c.value(packed)
    stored = data[pos : pos + 4]
    if len(stored) != 4 or crc32c.unmask(int.from_bytes(stored, "little")) != crc:
      raise bundle.BundleError("the checksum of its string lengths does not match")
    pos += 4
    if pos + sum(lengths) != len(data):
      raise bundle.BundleError(f"its string lengths add up to {sum(lengths)} bytes, not {len(data) - pos}")
  except bundle.BundleError as err:
    raise WarmStartError(
      f"Checkpoint {prefix} is damaged: {part.key!r} in {part.file}: {err}. {DAMAGED_HINT}"
    ) from None
  _compare(crc32c.value(data[pos:], crc32c.value(stored, crc)), part, prefix)
  values = np.empty(count, dtype=object)
  for i, n in enumerate(lengths):
    values[i] = data[pos : pos + n]
    pos += n
  return values.reshape(tensor.shape)


def is_tensorflow(location: str | os.PathLike) -> bool:
  """Whether a location looks like a TensorFlow checkpoint (files only looked at, none read but a state file's head)."""
  path = _local(location)
  if os.path.isfile(path):
    return path.endswith((".index", ".meta")) or bool(_DATA_FILE.match(path))
  if os.path.isdir(path):
    bundles = [p for p in _prefixes(path) if glob.glob(glob.escape(p) + ".data-*-of-*")]
    return _state_file(path) is not None or bool(bundles) or os.path.isfile(_saved_model(path) + ".index")
  return os.path.isfile(path + ".index") or bool(glob.glob(glob.escape(path) + ".data-*-of-*"))


def _local(location: str | os.PathLike) -> str:
  path = os.fspath(location)
  return os.path.abspath(path[len("file://") :] if path.startswith("file://") else path)


def _saved_model(directory: str) -> str:
  return os.path.join(directory, "variables", "variables")


def _prefixes(directory: str) -> list[str]:
  """The checkpoint prefixes in a directory (each with an `.index` file)."""
  return sorted(p[: -len(".index")] for p in glob.glob(os.path.join(glob.escape(directory), "*.index")))


def _state_file(directory: str) -> str | None:
  """The `checkpoint` state file of a directory (a text proto), if there is one."""
  path = os.path.join(directory, STATE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    head = f.read(4096)
  return path if head.lstrip().startswith((b"model_checkpoint_path", b"all_model_checkpoint_paths")) else None


def _recorded_path(state_file: str) -> str | None:
  """`model_checkpoint_path` of a state file (the newest checkpoint), unescaped."""
  with open(state_file, encoding="utf-8", errors="replace") as f:
    for line in f:
      match = re.match(r'\s*model_checkpoint_path\s*:\s*(".*")\s*$', line)
      if match:
        try:
          return ast.literal_eval("b" + match.group(1)).decode("utf-8")
        except (ValueError, SyntaxError):
          return match.group(1)[1:-1]
  return None


def locate(location: str | os.PathLike, step: int | None = None) -> str:
  """Resolves a location to a checkpoint prefix, as TensorFlow does (see the module docstring).

  Args:
    location: A directory, a prefix, or one of its files.
    step: In a directory, the checkpoint `<prefix>-<step>` rather than the newest.

  Raises:
    WarmStartError: Saying what was found and what was looked for, if there is no checkpoint.
  """
  requested = os.fspath(location)
  path = _local(location)
  if step is not None:
    if not os.path.isdir(path):
      raise WarmStartError(f"step={step!r} was asked for, but {requested} is one checkpoint, not a directory of them.")
    numbered = {int(m.group(1)): p for p in _prefixes(path) if (m := _STEP_SUFFIX.search(p))}
    if not isinstance(step, int) or step not in numbered:
      raise WarmStartError(
        f"No TensorFlow checkpoint of step {step!r} in {requested}; its steps are {sorted(numbered)}."
        " Give one of them, or no step for the newest."
      )
    return numbered[step]
  if os.path.isfile(path):
    match = _DATA_FILE.match(path)
    prefix = path.rsplit(".", 1)[0] if path.endswith((".index", ".meta")) else match.group(1) if match else path
  elif os.path.isdir(path):
    prefix = _in_directory(path, requested)
  else:
    prefix = path
  if not os.path.isfile(prefix + ".index"):
    found = sorted(os.path.basename(p) for p in glob.glob(glob.escape(prefix) + ".*"))[:10]
    raise WarmStartError(
      f"No TensorFlow checkpoint at {requested}: {prefix}.index does not exist"
      + (f" (found {found}; the .index file is missing or the save did not finish)." if found else ".")
      + " Give a checkpoint directory, a prefix such as model.ckpt-500, or its .index file."
    )
  return prefix


def _in_directory(directory: str, requested: str) -> str:
  state = _state_file(directory)
  prefixes = _prefixes(directory)
  if state is not None:
    recorded = _recorded_path(state)
    if recorded:
      candidates = [os.path.join(directory, recorded)]  # a relative path, or an absolute one that exists
      # Copied from another machine: the same file name here.
      candidates.append(os.path.join(directory, re.split(r"[\\/]", recorded)[-1]))
      for prefix in candidates:
        if os.path.isfile(prefix + ".index"):
          return os.path.normpath(prefix)
    raise WarmStartError(
      f"No TensorFlow checkpoint at {requested}: its state file {state} names"
      f" {recorded!r}, but neither that nor {os.path.basename(recorded or '')!r} in this directory has an"
      f" .index file. Checkpoints here: {[os.path.basename(p) for p in prefixes] or 'none'}; give one as"
      " <dir>/<prefix>, or fix model_checkpoint_path."
    )
  if not prefixes and os.path.isfile(_saved_model(directory) + ".index"):
    return _saved_model(directory)
  if len(prefixes) == 1:
    return prefixes[0]
  numbered = [(int(m.group(1)), p) for p in prefixes if (m := _STEP_SUFFIX.search(p))]
  if prefixes and numbered:
    return max(numbered)[1]
  listing = sorted(os.listdir(directory))[:10]
  raise WarmStartError(
    f"No TensorFlow checkpoint at {requested}: "
    + (
      f"it holds several checkpoints without step numbers ({[os.path.basename(p) for p in prefixes]}) and no"
      " checkpoint state file; give one as <dir>/<prefix>."
      if prefixes
      else f"found {listing or 'an empty directory'}, no .index file and no checkpoint state file."
    )
  )


def open_tensorflow(
  location: str | os.PathLike, *, item: str | None = None, prefer_names: Iterable[str] = (), step: int | None = None
) -> TensorFlowSource:
  """Locates a TensorFlow checkpoint and reads its `.index` (names, shapes, dtypes; no tensor).

  Args:
    location: A directory, a prefix, an `.index` or a `.data-*` file (see the module docstring).
    item: Must be None: a TensorFlow checkpoint has no items.
    prefer_names: Unused (a TensorFlow checkpoint has one tree).
    step: In a directory, read `<prefix>-<step>` rather than the newest checkpoint.

  Returns:
    The source.

  Raises:
    WarmStartError: If there is no checkpoint, or its `.index` or data files are damaged or missing.
  """
  del prefer_names
  requested = os.fspath(location)
  if item is not None:
    raise WarmStartError(
      f"ckpt_item={item!r} was asked for, but {requested} is a TensorFlow checkpoint, which has no items. Drop ckpt_item."
    )
  prefix = locate(location, step)
  index_file = prefix + ".index"
  with open(index_file, "rb") as f:
    data = f.read()
  try:
    table = bundle.read_table(data)
    if not table or table[0][0] != b"":
      raise bundle.BundleError("its first entry is not the bundle header")
    header = bundle.parse_header(table[0][1])
    entries = {key: bundle.parse_entry(value) for key, value in table[1:]}
  except bundle.BundleError as err:
    raise WarmStartError(
      f"Checkpoint {prefix} is damaged: its index {index_file} cannot be read: {err}. {DAMAGED_HINT}"
    ) from None
  tensors, problems = _tensors(prefix, header, entries)
  if problems:
    raise WarmStartError(problems, header=f"Checkpoint {prefix} is damaged ({DAMAGED_HINT})")
  named = contract_names(sorted(tensors))
  variables, by_name = {}, {}
  for i, (key, (name, param, slot)) in enumerate(sorted(named.items(), key=lambda kv: kv[1][0])):
    t = tensors[key]
    variables[name] = Variable(name, _kind(name, t, slot), i, param, slot, t.shape, t.dtype)
    by_name[name] = t
  source = TensorFlowSource(requested=requested, step=None, variables=variables, path=prefix, tensors=by_name)
  return dataclasses.replace(source, step=_step(source))


def _tensors(
  prefix: str, header: bundle.Header, entries: dict[bytes, bundle.Entry]
) -> tuple[dict[str, _Tensor], list[str]]:
  """The stored tensors (slices assembled into their partitioned tensor), and every problem found in them."""
  problems: list[str] = []
  sizes: dict[str, int | None] = {}
  tensors = {}

  def part(key: str, entry: bundle.Entry, start: tuple[int, ...], dtype: np.dtype) -> _Part:
    file = bundle.data_filename(prefix, entry.shard_id, header.num_shards)
    if file not in sizes:
      sizes[file] = os.path.getsize(file) if os.path.isfile(file) else None
      if sizes[file] is None:
        problems.append(f"its data file {file} is missing")
    expected = math.prod(entry.shape) * dtype.itemsize
    if dtype.kind != "O" and entry.size != expected:
      problems.append(f"{key!r} has {entry.size} bytes in the index, but {expected} for {entry.shape} {dtype}")
    elif sizes[file] is not None and entry.offset + entry.size > sizes[file]:
      problems.append(
        f"{key!r} ends at byte {entry.offset + entry.size} of {file}, which has {sizes[file]} bytes (cut short)"
      )
    return _Part(key, file, entry.offset, entry.size, entry.crc32c, entry.shape, start)

  for raw_key, entry in entries.items():
    if raw_key.startswith(b"\x00"):  # a slice of a partitioned tensor, read through its tensor
      continue
    key = raw_key.decode("utf-8", errors="replace")
    dtype = bundle.DTYPES.get(entry.dtype, np.dtype(object))
    if header.endianness == 1 and dtype.itemsize > 1 and dtype.kind != "O":
      dtype = dtype.newbyteorder(">")
    if not entry.slices:
      tensors[key] = _Tensor(key, dtype, entry.dtype, entry.shape, (part(key, entry, (0,) * len(entry.shape), dtype),))
      continue
    parts, volume = [], 0
    for extents in entry.slices:
      full = tuple(
        (0, n) if length == -1 else (start, length) for (start, length), n in zip(extents, entry.shape, strict=False)
      )
      stored = entries.get(bundle.slice_key(raw_key, extents))
      if stored is None or len(full) != len(entry.shape):
        problems.append(f"the slice {full} of {key!r} is missing from the index")
        continue
      parts.append(
        part(f"{key}[{', '.join(f'{s}:{s + n}' for s, n in full)}]", stored, tuple(s for s, _ in full), dtype)
      )
      volume += math.prod(n for _, n in full)
    if volume != math.prod(entry.shape):
      problems.append(f"the slices of {key!r} cover {volume} of its {math.prod(entry.shape)} elements")
    tensors[key] = _Tensor(key, dtype, entry.dtype, entry.shape, tuple(parts))
  return tensors, problems


def contract_names(keys: Iterable[str]) -> dict[str, tuple[str, str | None, str | None]]:
  """Names TensorFlow checkpoint keys under the naming contract (see the module docstring).

  Args:
    keys: The checkpoint's keys.

  Returns:
    Key -> `(name, param, slot)`; `param` and `slot` are set for a slot
    (`("v/opt_state/0/mu", "v", "opt_state/0/mu")`). Bookkeeping keys are left out.

  Examples:
    >>> names = contract_names(["w", "w/Adam", "w/Adam_1", "global_step", "beta1_power"])
    >>> [names[k][0] for k in ["w", "w/Adam", "w/Adam_1", "global_step"]]
    ['w', 'w/opt_state/0/mu', 'w/opt_state/0/nu', 'global_step']
    >>> contract_names(["v/.ATTRIBUTES/VARIABLE_VALUE", "v/.OPTIMIZER_SLOT/opt/momentum/.ATTRIBUTES/VARIABLE_VALUE",
    ...                 "save_counter/.ATTRIBUTES/VARIABLE_VALUE", "_CHECKPOINTABLE_OBJECT_GRAPH"])
    {'v/.ATTRIBUTES/VARIABLE_VALUE': ('v', None, None), 'v/.OPTIMIZER_SLOT/opt/momentum/.ATTRIBUTES/VARIABLE_VALUE': ('v/opt_state/0/trace', 'v', 'opt_state/0/trace')}
  """
  base = {k: k[: -len(_VALUE)] if k.endswith(_VALUE) else k for k in keys if k not in _BOOKKEEPING}
  names = set(base.values())
  slots: dict[str, tuple[str, str, str]] = {}  # key -> (param, family, field)
  for key, name in base.items():
    if _SLOT_MARK in name:
      param, rest = name.split(_SLOT_MARK, 1)
      found = _OBJECT_SLOTS.get(rest.split("/")[-1]) if rest.count("/") == 1 else None
    else:
      param, _, leaf = name.rpartition("/")
      found = _SAVER_SLOTS.get(leaf) if leaf != "Adam_1" or f"{param}/Adam" in names else None
    if found is not None and param in names:
      slots[key] = (param, *found)
  families = collections.defaultdict(set)
  for param, family, _ in slots.values():
    families[param].add(family)
  targets = collections.Counter(f"{p}/opt_state/0/{f}" for p, _, f in slots.values())
  out: dict[str, tuple[str, str | None, str | None]] = {}
  for key, name in base.items():
    if key in slots:
      param, _, field = slots[key]
      target = f"{param}/opt_state/0/{field}"
      if len(families[param]) == 1 and targets[target] == 1 and target not in names:
        out[key] = (target, param, f"opt_state/0/{field}")
        continue
    out[key] = (name, None, None)
  used = collections.Counter(name for name, _, _ in out.values())
  return {k: (k, None, None) if used[v[0]] > 1 and k != v[0] else v for k, v in out.items()}


def _kind(name: str, tensor: _Tensor, slot: str | None) -> str:
  if slot is not None:
    return "slot"
  leaf = name.rsplit("/", 1)[-1]
  scalar_bookkeeping = not tensor.shape and leaf in _OPTIMIZER_SCALARS
  floating = tensor.dtype.kind in "fc" or tensor.dtype.name.startswith(("bfloat", "float"))
  return "param" if floating and not scalar_bookkeeping and _SLOT_MARK not in name else "other"


def _step(source: TensorFlowSource) -> int | None:
  match = _STEP_SUFFIX.search(os.path.basename(source.path))
  if match:
    return int(match.group(1))
  step = source.tensors.get("global_step")
  if step is None or step.shape or step.dtype.kind not in "iu":
    return None
  return int(source.restore({"global_step": None})["global_step"])
