"""Transforms on a tensor's way from the checkpoint to a leaf, and the one gather that runs them.

A plan row that loads a leaf carries a chain of transforms (DESIGN.md,
"Transforms"), each a small frozen value whose output shape is known in the
plan: `Take` (here the vocabulary gather: new row `i` is old row
`index[i]`, rows with index -1 filled; the rule transforms of
`surgery.py` run through `chain.py`) and `Cast` (always last, to the live
dtype). The gather has two backends with one meaning, tested against each
other: on the host (`take_host`, into a 64-byte-aligned buffer that
`jax.device_put` adopts; the read stage also reads only the kept rows of a
saved table straight into such a buffer, see `hostread.rows`) and on devices
(`take_device`, one jitted function per axis and sharding: the old table is
restored sharded along a non-vocabulary axis, so every device holds a slice
of every row and gathers locally, never the whole table).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flax_warmstart._src.arrays import aligned_empty, leading
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.settings import NEW_ROW_INITIALIZERS
from flax_warmstart._src.surgery import Take
from flax_warmstart._src.typing import Shape
from flax_warmstart._src.vocab import Remap


@dataclasses.dataclass(frozen=True)
class Cast:
  """A cast to the live leaf's dtype: always the chain's last transform.

  Attributes:
    dtype: The dtype cast to.

  Examples:
    >>> Cast(np.dtype("bfloat16")).describe()
    'cast(bfloat16)'
  """

  dtype: np.dtype

  def describe(self) -> str:
    return f"cast({self.dtype})"


Transform = Take | Cast


def table_sharding(
  live: jax.sharding.Sharding | None, shape: tuple[int, ...], axis: int
) -> jax.sharding.Sharding | None:
  """The sharding to restore an old table with, so that the gather stays local.

  Every mesh axis the live leaf is sharded over is moved onto a non-vocabulary
  axis of the old table that it divides; the vocabulary axis is not sharded.
  Each device then holds a slice of every old row, never the whole table.

  Args:
    live: The sharding of the live leaf (None for a host array).
    shape: The old table's shape.
    axis: The vocabulary axis.

  Returns:
    A sharding for the old table.

  Examples:
    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("x",))
    >>> tuple(table_sharding(NamedSharding(mesh, P("x", None)), (10, 4), axis=0).spec)
    (None, 'x')
  """
  if not isinstance(live, NamedSharding):
    return live
  mesh = live.mesh
  used = [a for entry in live.spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
  if not used:
    return NamedSharding(mesh, PartitionSpec())
  size = math.prod(mesh.shape[a] for a in used)
  others = sorted((d for d in range(len(shape)) if d != axis), key=lambda d: -shape[d])
  for d in others:
    if shape[d] % size == 0:
      spec = [None] * len(shape)
      spec[d] = tuple(used)
      return NamedSharding(mesh, PartitionSpec(*spec))
  # Keep what divides of the live layout on the non-vocabulary axes.
  spec = [None] * len(shape)
  for d, entry in enumerate(live.spec):
    names = entry if isinstance(entry, tuple) else (entry,)
    if d != axis and entry is not None and shape[d] % math.prod(mesh.shape[a] for a in names) == 0:
      spec[d] = entry
  return NamedSharding(mesh, PartitionSpec(*spec))


def _take(table: jax.Array, index: jax.Array, fill: jax.Array | None, fill_index: jax.Array, *, axis: int) -> jax.Array:
  taken = jnp.take(table, jnp.maximum(index, 0), axis=axis, mode="clip")
  shape = [1] * table.ndim
  shape[axis] = index.shape[0]
  missing = (index < 0).reshape(shape)
  if fill is None or fill.shape[axis] == 0:  # Every row found in the old vocabulary.
    values = jnp.zeros((), table.dtype)
  else:
    values = jnp.take(fill.astype(table.dtype), fill_index, axis=axis, mode="clip")
  return jnp.where(missing, values, taken)


@functools.lru_cache(maxsize=64)
def _jitted(axis: int, out_sharding: jax.sharding.Sharding | None) -> Any:
  fn = functools.partial(_take, axis=axis)
  return jax.jit(fn, out_shardings=out_sharding) if out_sharding is not None else jax.jit(fn)


def take_device(
  table: jax.Array,
  index: np.ndarray,
  fill: jax.Array | None,
  fill_index: np.ndarray,
  *,
  axis: int,
  out_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
  """The gather on devices: old rows into a new table, rows with index -1 from `fill` (one jit per axis and sharding).

  Args:
    table: The old table (restored with `table_sharding`).
    index: `int32 [new rows]`: the old row of each new row, or -1.
    fill: Rows for the -1 entries, along `axis` (None: zeros).
    fill_index: `int32 [new rows]`: the row of `fill` for each -1 entry.
    axis: The vocabulary axis.
    out_sharding: The sharding of the result (the live leaf's).

  Returns:
    The new table: `table` with its `axis` replaced by `len(index)` entries.

  Examples:
    >>> import numpy as np, jax.numpy as jnp
    >>> old = jnp.array([[0.5], [1.0], [1.5], [2.0]])
    >>> take_device(old, np.array([3, -1, 0]), None, np.zeros(3, np.int32), axis=0).tolist()
    [[2.0], [0.0], [0.5]]
  """
  return _jitted(axis, out_sharding)(table, jnp.asarray(index, jnp.int32), fill, jnp.asarray(fill_index, jnp.int32))


@functools.partial(jax.jit, static_argnames=("axis", "rows", "count", "scale"))
def _old_rows_statistic(
  table: jax.Array, key: jax.Array | None, *, axis: int, rows: int, count: int, scale: float | None
) -> jax.Array:
  old = jnp.moveaxis(jax.lax.slice_in_dim(table, 0, rows, axis=axis), axis, 0)
  flat = old.reshape(rows, -1).astype(jnp.float32)
  mean = flat.mean(axis=0)
  if scale is None:
    out = jnp.broadcast_to(mean, (count, flat.shape[1]))
  else:
    centered = flat - mean
    cov = centered.T @ centered / rows
    out = jax.random.multivariate_normal(key, mean, scale * cov, shape=(count,), method="eigh")
  return jnp.moveaxis(out.reshape((count, *old.shape[1:])), 0, axis).astype(table.dtype)


def old_rows_fill(
  initializer: Any, table: jax.Array, key: jax.Array | None, *, axis: int, rows: int, count: int
) -> jax.Array:
  """Rows from a `MeanOfOldRows` / `MeanCovarianceOfOldRows` initializer.

  Args:
    initializer: The new-row initializer.
    table: The old table.
    key: A PRNG key (needed for `MeanCovarianceOfOldRows`).
    axis: The vocabulary axis.
    rows: Old vocabulary rows to compute statistics over (the first `rows`).
    count: Number of rows to make.

  Returns:
    `count` rows along `axis`.

  Raises:
    WarmStartError: If a random initializer gets no key.
  """
  scale = getattr(initializer, "scale", None)
  if scale is not None and key is None:
    raise WarmStartError("MeanCovarianceOfOldRows draws random rows: pass rng=jax.random.key(...) to warm_start.")
  return _old_rows_statistic(table, key, axis=axis, rows=rows, count=count, scale=scale)


def _with_axis(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
  return (*shape[:axis], size, *shape[axis + 1 :])


def _call(init: Any, key: jax.Array | None, shape: tuple[int, ...], dtype: Any, name: str) -> jax.Array:
  """Calls a user's backup initializer; any failure is a `WarmStartError` naming the leaf and the setting."""
  setting = f"var_name_to_vocab_info[{name!r}].backup_initializer ({_describe_callable(init)})"
  if isinstance(init, type) and issubclass(init, NEW_ROW_INITIALIZERS):
    raise WarmStartError(f"{setting} is the class {init.__name__}; pass an instance: {init.__name__}().")
  try:
    out = init(key, shape, dtype)
  except Exception as err:
    if key is None:
      hint = " If it draws random numbers, pass rng=jax.random.key(...) to warm_start."
    else:
      hint = " It is called as init(key, shape, dtype) -> array, like a jax.nn.initializers initializer."
    if isinstance(err, TypeError):
      hint += " An initializer factory must be called first: jax.nn.initializers.normal(0.02), not .normal."
    raise WarmStartError(
      f"{setting} failed when asked for shape {shape} {np.dtype(dtype)}: {type(err).__name__}: {err}.{hint}"
    ) from err
  if callable(out) and not hasattr(out, "shape"):
    raise WarmStartError(
      f"{setting} returned a function, not an array: it looks like an initializer factory that was not called."
      " Call it first, e.g. jax.nn.initializers.normal(0.02) rather than jax.nn.initializers.normal."
    )
  if tuple(np.shape(out)) != shape:
    raise WarmStartError(f"{setting} returned shape {np.shape(out)} when asked for {shape}.")
  return jnp.asarray(out, dtype)


def _describe_callable(fn: Any) -> str:
  return getattr(fn, "__qualname__", None) or type(fn).__name__


def initial_fill(
  remap: Remap, shape: tuple[int, ...], dtype: Any, key: jax.Array | None, name: str
) -> jax.Array | None:
  """The fill rows that need no old table, made before anything is read.

  A JAX backup initializer is called as TensorFlow calls it: once with shape
  `[n_missing_cells, 1]` for the new tokens' cells in row-major order (even
  when there are none), then, if there are OOV rows or columns, once with the
  OOV block's shape. Explicit token vectors sit between the two blocks.

  Args:
    remap: The planned remap.
    shape: The live leaf's shape.
    dtype: The live leaf's dtype.
    key: PRNG key for this leaf, or None.
    name: The leaf's name, for messages.

  Returns:
    The fill table along the vocabulary axis (missing, explicit, OOV rows), or
    None when every filled row is zero or depends on the old table.
  """
  mapping, init, axis = remap.mapping, remap.info.backup_initializer, remap.info.axis
  if remap.follows or isinstance(init, NEW_ROW_INITIALIZERS):
    return None
  if init is None and not mapping.explicit:
    return None
  missing_shape = _with_axis(shape, axis, mapping.num_missing)
  oov_shape = _with_axis(shape, axis, mapping.oov)
  if init is None:
    missing, oov = jnp.zeros(missing_shape, dtype), jnp.zeros(oov_shape, dtype)
  else:
    keys = [None, None] if key is None else [jax.random.fold_in(key, i) for i in range(2)]
    cells = (math.prod(missing_shape), 1)
    missing = _call(init, keys[0], cells, dtype, name).reshape(missing_shape)
    oov = _call(init, keys[1], oov_shape, dtype, name) if mapping.oov else jnp.zeros(oov_shape, dtype)
  return jnp.concatenate([missing, _explicit(remap, shape, dtype), oov], axis=axis)


def _explicit(remap: Remap, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  axis = remap.info.axis
  if not remap.mapping.explicit:
    return jnp.zeros(_with_axis(shape, axis, 0), dtype)
  return jnp.asarray(np.stack([vec for _, vec in remap.mapping.explicit], axis=axis), dtype)


def apply_take(take: Take, table: Any, fill: jax.Array | None, live: Any, key: jax.Array | None) -> jax.Array:
  """Runs a `Take` on a restored old table, into the live leaf's shape, dtype and sharding.

  On the host backend where the leaf lives in host memory or on one CPU device
  (`host_gather_ok`), else on devices, jitted with the leaf's sharding.

  Args:
    take: The planned gather.
    table: The old table, restored (ideally with `table_sharding`).
    fill: From `initial_fill`.
    live: The live leaf (its shape, dtype and sharding are the result's).
    key: PRNG key for this leaf (for `MeanCovarianceOfOldRows`), or None.

  Returns:
    The new value of the leaf.
  """
  remap = take.remap
  mapping, info, axis = remap.mapping, remap.info, take.axis
  shape, dtype = tuple(live.shape), live.dtype
  sharding = live.sharding if isinstance(live, jax.Array | jax.ShapeDtypeStruct) else None
  fill_index = fill_index_of(remap)
  if host_gather_ok(remap, live):
    out = take_host(np.asarray(table)[leading(shape, axis)], take.index, fill, fill_index, axis=axis, dtype=dtype)
    return jax.device_put(out, sharding) if sharding is not None else out
  table = jnp.asarray(table, dtype) if not isinstance(table, jax.Array) else table.astype(dtype)
  table = leading_on_device(table, shape, axis)
  if not remap.follows and isinstance(info.backup_initializer, NEW_ROW_INITIALIZERS):
    draws = old_rows_fill(
      info.backup_initializer,
      table,
      None if key is None else jax.random.fold_in(key, 2),
      axis=axis,
      rows=mapping.old_rows_used,
      count=mapping.num_missing + mapping.oov,
    )
    parts = jnp.split(draws, [mapping.num_missing], axis=axis)
    fill = jnp.concatenate([parts[0], _explicit(remap, shape, dtype), parts[1]], axis=axis)
  if fill is not None and isinstance(table, jax.Array):
    fill = place_fill(fill, table, sharding, axis)
  return take_device(table, take.index, fill, fill_index, axis=axis, out_sharding=sharding)


def leading_on_device(table: jax.Array, shape: Shape, axis: int) -> jax.Array:
  """`table[leading(shape, axis)]` for a table on devices, sharded or not.

  An axis that is sliced is first gathered whole on its devices: an uneven
  slice of a sharded axis has no sharding of its own (jax's explicit sharding
  refuses it). Only an axis-1 vocabulary whose hidden size shrank is sliced.
  """
  sliced = [d for d in range(table.ndim) if d != axis and table.shape[d] != shape[d]]
  if sliced and isinstance(table.sharding, NamedSharding):
    spec = list(table.sharding.spec) + [None] * (table.ndim - len(table.sharding.spec))
    for d in sliced:
      spec[d] = None
    table = jax.device_put(table, NamedSharding(table.sharding.mesh, PartitionSpec(*spec)))
  for d in sliced:
    table = jax.lax.slice_in_dim(table, 0, shape[d], axis=d)
  return table


def place_fill(fill: jax.Array, table: jax.Array, live: jax.sharding.Sharding | None, axis: int) -> jax.Array:
  """The fill rows laid out as the table is off the vocabulary axis, so the gather's `where` sees compatible shardings."""
  spec = getattr(table.sharding, "spec", None)
  if isinstance(table.sharding, NamedSharding) and (axis >= len(spec) or spec[axis] is None):
    return jax.device_put(fill, table.sharding)
  return jax.device_put(fill, table_sharding(live, fill.shape, axis) or table.sharding)


def fill_index_of(remap: Remap) -> np.ndarray:
  """The row of the fill table for each new row with index -1 (a slot's fill is zeros, row 0)."""
  return remap.mapping.fill_index if not remap.follows else np.zeros_like(remap.mapping.fill_index)


def on_one_cpu(live: Any) -> bool:
  """Whether a live leaf (an array or an abstract one) is placed on a single CPU device.

  Examples:
    >>> import jax.numpy as jnp
    >>> on_one_cpu(jnp.zeros(2)) == (jax.default_backend() == "cpu")
    True
  """
  sharding = getattr(live, "sharding", None) if isinstance(live, jax.Array | jax.ShapeDtypeStruct) else None
  if sharding is None or len(sharding.device_set) != 1:
    return False
  return next(iter(sharding.device_set)).platform == "cpu"


def needs_old_table(remap: Remap) -> bool:
  """Whether a gather's new rows are computed from the whole old table (`MeanOfOldRows`, `MeanCovarianceOfOldRows`)."""
  return isinstance(remap.info.backup_initializer, NEW_ROW_INITIALIZERS) and not remap.follows


def host_gather_ok(remap: Remap, live: Any) -> bool:
  """Whether to gather on the host: the live leaf is on one CPU device (or host).

  There the gather writes straight into a 64-byte-aligned numpy buffer that
  `jax.device_put` adopts without a copy, so the old table is never copied to
  a "device" and the output's memory is touched once.
  """
  if needs_old_table(remap):
    return False
  return isinstance(live, np.ndarray) or on_one_cpu(live)


def take_host(
  table: np.ndarray, index: np.ndarray, fill: Any, fill_index: np.ndarray, *, axis: int, dtype: Any
) -> np.ndarray:
  """The gather on the host: `take_device`'s result, into a 64-byte-aligned buffer (zero-copy for `jax.device_put` on CPU).

  Args:
    table: The old table (numpy, already in `dtype`).
    index: The old row of each new row, or -1.
    fill: Rows for the -1 entries (None: zeros).
    fill_index: The row of `fill` for each -1 entry.
    axis: The vocabulary axis.
    dtype: The result's dtype.

  Returns:
    The new table.

  Examples:
    >>> import numpy as np
    >>> old = np.array([[0.5], [1.0], [1.5], [2.0]], np.float32)
    >>> take_host(old, np.array([3, -1, 0]), None, np.zeros(3, np.int32), axis=0, dtype=np.float32).tolist()
    [[2.0], [0.0], [0.5]]
  """
  table = np.asarray(table, dtype)
  shape = (*table.shape[:axis], len(index), *table.shape[axis + 1 :])
  out = aligned_empty(shape, dtype)
  np.take(table, np.maximum(index, 0), axis=axis, out=out, mode="clip")
  fill_missing(out, index, fill, fill_index, axis=axis)
  return out


def fill_missing(out: np.ndarray, index: np.ndarray, fill: Any, fill_index: np.ndarray, *, axis: int) -> None:
  """Writes the rows with index -1 of a host table from `fill` (zeros when None), in place.

  Args:
    out: The new table.
    index: The old row of each new row, or -1.
    fill: Rows for the -1 entries, along `axis` (None: zeros).
    fill_index: The row of `fill` for each -1 entry.
    axis: The vocabulary axis.

  Examples:
    >>> out = np.ones((3, 2), np.float32)
    >>> fill_missing(out, np.array([0, -1, 1]), None, np.zeros(3, np.int32), axis=0)
    >>> out.tolist()
    [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
  """
  missing = np.flatnonzero(index < 0)
  if not missing.size:
    return
  where = (slice(None),) * axis + (missing,)
  if fill is None or np.shape(fill)[axis] == 0:
    out[where] = 0
  else:
    out[where] = np.take(np.asarray(fill, out.dtype), fill_index[missing], axis=axis)


def conform(value: Any, live: Any) -> Any:
  """The chain's last step: a value with the live leaf's type, dtype (the `Cast`) and sharding.

  A `jax.Array` (or abstract) leaf gets a `jax.Array` with its sharding; a
  numpy array or scalar, and a Python scalar, keep their type.

  Examples:
    >>> import numpy as np
    >>> conform(np.array([1.5, 2.5]), np.zeros(2, np.float16)).dtype
    dtype('float16')
    >>> conform(np.array(3), 0)
    3
  """
  if isinstance(live, jax.Array | jax.ShapeDtypeStruct):
    if not isinstance(value, jax.Array):
      return jax.device_put(np.asarray(value, dtype=live.dtype), live.sharding)
    if value.dtype != live.dtype:
      value = value.astype(live.dtype)
    if value.sharding != live.sharding:
      value = jax.device_put(value, live.sharding)
    return value
  if isinstance(live, str):  # a string leaf loads only from a string (the plan checks)
    return str(np.asarray(value)[()])
  host = np.asarray(value)
  if isinstance(live, np.ndarray):
    return np.array(host, dtype=live.dtype)
  if isinstance(live, np.generic):
    return host.astype(live.dtype)[()]
  if isinstance(live, bool | int | float | complex):
    return type(live)(host.item())
  return jnp.asarray(host)
