"""The one gather (flax_warmstart/_src/transform.py): its backends against each other, and `table_sharding`.

A vocabulary remap is one gather, `out[..., i, ...] = old[..., index[i], ...]`,
with the rows whose index is -1 filled (from a fill table, or zeros), run by
several backends that must agree bit for bit on the same random table and
index:

* `take_host`: numpy, into a 64-byte-aligned buffer;
* `take_device`: jitted, unsharded, and on the 8-device mesh with the old table
  placed by `table_sharding` and the result in the live leaf's sharding;
* `hostread.rows` + `fill_missing`: only the kept rows read, from a
  TensorStore, a numpy array, a saved single-chunk array streamed piece by
  piece, and shard by shard (`window`) as the read stage does for a sharded
  leaf.

On axis 1 (a softmax kernel `[hidden, vocab]`) an old table with more hidden
rows than the new one gives its leading rows, as in TensorFlow
(`arrays.leading`). Each backend is fed as `transform.apply_take` and the read
stage feed it; the expected table is computed here without the library.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flax_warmstart._src import hostread
from flax_warmstart._src import transform as transform_lib
from flax_warmstart._src.arrays import leading

NEW_ROWS = 8
FILL_ROWS = 3

# (id, axis, old table shape, new table shape)
CASES = [
  ("axis0", 0, (11, 8), (NEW_ROWS, 8)),
  ("axis1", 1, (8, 11), (8, NEW_ROWS)),
  ("axis1_leading_rows", 1, (12, 11), (8, NEW_ROWS)),  # 12 old hidden rows, 8 new: the leading 8
]


def gather_case(axis, old_shape, new_shape, fill, seed=0):
  """A random old table, an index (reordered, duplicated, two -1 rows), a fill table or None, its fill_index."""
  rng = np.random.default_rng(seed)
  old = rng.normal(size=old_shape).astype(np.float32)
  index = rng.choice(old_shape[axis], NEW_ROWS, replace=True)
  index[[1, 5]] = -1
  index[3] = index[2]  # a duplicate
  fill_shape = tuple(FILL_ROWS if d == axis else n for d, n in enumerate(new_shape))
  fill_table = rng.normal(size=fill_shape).astype(np.float32) if fill else None
  fill_index = rng.integers(0, FILL_ROWS, NEW_ROWS).astype(np.int32)
  return old, index.astype(np.int32), fill_table, fill_index


def expected_table(old, index, fill, fill_index, new_shape, axis, dtype):
  """The gather, written out row by row without the library."""
  old = np.moveaxis(old, axis, 0)
  other = [n for d, n in enumerate(new_shape) if d != axis]
  rows = []
  for i, k in enumerate(index):
    if k >= 0:
      row = old[k][tuple(slice(0, n) for n in other)]  # the leading entries off the vocabulary axis
    elif fill is None:
      row = np.zeros(other, np.float32)
    else:
      row = np.moveaxis(fill, axis, 0)[fill_index[i]]
    rows.append(row)
  return np.moveaxis(np.stack(rows), 0, axis).astype(dtype)


def host_backend(old, index, fill, fill_index, new_shape, axis, dtype):
  """`take_host`, fed as `apply_take` feeds it: the old table cut to the leading rows."""
  return transform_lib.take_host(old[leading(new_shape, axis)], index, fill, fill_index, axis=axis, dtype=dtype)


def device_backend(old, index, fill, fill_index, new_shape, axis, dtype, live_sharding=None):
  """`take_device`, fed as `apply_take` feeds it; sharded: the table placed by `table_sharding`."""
  table = jnp.asarray(old, dtype)
  if live_sharding is not None:
    table = jax.device_put(table, transform_lib.table_sharding(live_sharding, old.shape, axis))
  table = transform_lib.leading_on_device(table, new_shape, axis)
  if fill is not None:
    fill = jnp.asarray(fill)
    if live_sharding is not None:
      fill = transform_lib.place_fill(fill, table, live_sharding, axis)
  return transform_lib.take_device(table, index, fill, fill_index, axis=axis, out_sharding=live_sharding)


def rows_backend(store, index, fill, fill_index, new_shape, axis, dtype):
  """`hostread.rows` (the kept rows only), then `fill_missing` for the -1 rows, as the read stage does."""
  read = hostread.rows(store, index, new_shape, dtype, axis)
  hostread.run([read], max_bytes_in_flight=1 << 20)
  transform_lib.fill_missing(read.out, index, fill, fill_index, axis=axis)
  return read.out


def _assert_equal(got, want, backend):
  got = np.asarray(got)
  assert got.dtype == want.dtype, (backend, got.dtype, want.dtype)
  np.testing.assert_array_equal(got, want, err_msg=backend)


@pytest.mark.parametrize("fill", [True, False], ids=["fill", "zeros"])
@pytest.mark.parametrize(("axis", "old_shape", "new_shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_host_device_and_read_backends_agree(axis, old_shape, new_shape, fill):
  old, index, fill_table, fill_index = gather_case(axis, old_shape, new_shape, fill)
  dtype = np.dtype(np.float32)
  want = expected_table(old, index, fill_table, fill_index, new_shape, axis, dtype)
  args = (index, fill_table, fill_index, new_shape, axis, dtype)
  host = host_backend(old, *args)
  assert host.ctypes.data % 64 == 0
  _assert_equal(host, want, "take_host")
  _assert_equal(device_backend(old, *args), want, "take_device")
  _assert_equal(rows_backend(ts.array(old), *args), want, "hostread.rows (TensorStore)")
  _assert_equal(rows_backend(old, *args), want, "hostread.rows (numpy)")


def test_the_backends_cast_alike():
  """A float32 table into a bfloat16 leaf: every backend casts the same way (the cast commutes with the gather)."""
  axis, old_shape, new_shape = CASES[2][1:]
  old, index, fill_table, fill_index = gather_case(axis, old_shape, new_shape, fill=True, seed=1)
  dtype = np.dtype(ml_dtypes.bfloat16)
  want = expected_table(old, index, fill_table, fill_index, new_shape, axis, dtype)
  args = (index, fill_table, fill_index, new_shape, axis, dtype)
  _assert_equal(host_backend(old, *args), want, "take_host")
  _assert_equal(device_backend(old, *args), want, "take_device")
  _assert_equal(rows_backend(ts.array(old), *args), want, "hostread.rows (TensorStore)")
  _assert_equal(rows_backend(old, *args), want, "hostread.rows (numpy)")


SPECS = [P("a", "b"), P("b", None), P(None, ("a", "b"))]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize(("axis", "old_shape", "new_shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sharded_device_backend_agrees(axis, old_shape, new_shape, spec, mesh):
  """`take_device` on the 8-device mesh: the table placed by `table_sharding`, the result in the live sharding."""
  old, index, fill_table, fill_index = gather_case(axis, old_shape, new_shape, fill=True, seed=3)
  dtype = np.dtype(np.float32)
  want = expected_table(old, index, fill_table, fill_index, new_shape, axis, dtype)
  live = NamedSharding(mesh, spec)
  sharded = device_backend(old, index, fill_table, fill_index, new_shape, axis, dtype, live_sharding=live)
  assert sharded.sharding == live
  _assert_equal(sharded, want, "take_device sharded")
  for shard in sharded.addressable_shards:
    _assert_equal(shard.data, want[shard.index], f"device shard {shard.index}")


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize(("axis", "old_shape", "new_shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_shard_by_shard_rows_agree(axis, old_shape, new_shape, spec, mesh):
  """Each shard of a sharded leaf read on its own (`hostread.rows` with its `window`), as `read._ShardedRead` does."""
  old, index, fill_table, fill_index = gather_case(axis, old_shape, new_shape, fill=True, seed=3)
  dtype = np.dtype(np.float32)
  want = expected_table(old, index, fill_table, fill_index, new_shape, axis, dtype)
  live = NamedSharding(mesh, spec)
  for idx in live.addressable_devices_indices_map(new_shape).values():
    sub = index[idx[axis]]
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(idx, new_shape, strict=True))
    read = hostread.rows(ts.array(old), sub, shape, dtype, axis, window=idx)
    hostread.run([read], max_bytes_in_flight=1 << 20)
    window = tuple(slice(None) if d == axis else s for d, s in enumerate(idx))
    transform_lib.fill_missing(read.out, sub, fill_table[window], fill_index[idx[axis]], axis=axis)
    _assert_equal(read.out, want[idx], f"shard {idx}")


TABLE_CASES = [
  # (live spec, old shape, axis, every live mesh axis fits on one non-vocab axis)
  (P("a", "b"), (6, 8), 0, True),
  (P("b", "a"), (6, 8), 0, True),
  (P(("a", "b"), None), (6, 16), 0, True),
  (P(None, "b"), (8, 6), 1, True),
  (P("a", "b"), (8, 6), 1, True),
  (P("a", None, "b"), (6, 2, 4), 0, False),  # 8 devices divide no other axis: keeps "b"
]


@pytest.mark.parametrize("spec, old_shape, axis, all_axes", TABLE_CASES)
def test_table_sharding_keeps_the_vocabulary_axis_whole(mesh, spec, old_shape, axis, all_axes):
  live = NamedSharding(mesh, spec)
  sharding = transform_lib.table_sharding(live, old_shape, axis)
  entries = list(sharding.spec) + [None] * (len(old_shape) - len(sharding.spec))
  assert entries[axis] is None, sharding.spec
  used = {a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}
  placed = {a for e in entries if e is not None for a in (e if isinstance(e, tuple) else (e,))}
  assert placed and placed <= used
  if all_axes:
    assert placed == used, sharding.spec

  old = jax.device_put(np.arange(np.prod(old_shape), dtype=np.float32).reshape(old_shape), sharding)
  for shard in old.addressable_shards:
    assert shard.data.shape[axis] == old_shape[axis]
    assert shard.data.size < old.size, (shard.data.shape, old_shape)

  # The gather's output has the live leaf's layout, shard for shard.
  new_shape = list(old_shape)
  new_shape[axis] = 8
  index = np.array([5, 0, -1, 3, 1, -1, 2, 4], np.int32)
  leaf = jax.device_put(jnp.zeros(new_shape), live)
  out = transform_lib.take_device(old, index, None, np.zeros(8, np.int32), axis=axis, out_sharding=live)
  assert out.sharding == live
  assert [s.data.shape for s in out.addressable_shards] == [s.data.shape for s in leaf.addressable_shards]
  expected = np.take(np.asarray(old), np.maximum(index, 0), axis=axis)
  expected = np.where((index < 0).reshape([-1 if d == axis else 1 for d in range(len(old_shape))]), 0, expected)
  np.testing.assert_array_equal(np.asarray(out), expected)
