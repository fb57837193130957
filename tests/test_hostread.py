"""Reads into our own host buffers (flax_warmstart/_src/hostread.py): whole tensors, kept rows, streamed chunks.

Which leaves `warm_start` reads this way (and which through the source's restore) is tested in test_read.py;
the gather backends against `hostread.rows` in test_transform.py.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from conftest import save_checkpoint

import flax_warmstart as fws
from flax_warmstart._src import hostread
from flax_warmstart._src.sources import orbax as checkpoint_lib


def _stores(path, names):
  ckpt = checkpoint_lib.open_orbax(path)
  return checkpoint_lib.open_arrays(ckpt, names)


@pytest.fixture
def saved(tmp_path):
  table = np.arange(6 * 5, dtype=np.float32).reshape(6, 5) / 7
  tree = {"params": {"emb": jnp.asarray(table), "ids": jnp.arange(4, dtype=jnp.int32)}, "step": 3}
  return table, save_checkpoint(tmp_path / "ckpt", tree)


def test_whole_reads_into_an_aligned_buffer_with_a_cast(saved):
  table, path = saved
  stores = _stores(path, ["emb", "ids"])
  reads = [hostread.whole(stores["emb"], ml_dtypes.bfloat16), hostread.whole(stores["ids"], np.int32)]
  hostread.run(reads, max_bytes_in_flight=1 << 20)
  assert reads[0].out.ctypes.data % 64 == 0 and reads[0].out.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(reads[0].out, table.astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(reads[1].out, np.arange(4))


@pytest.mark.parametrize("axis", [0, 1])
def test_rows_reads_only_kept_rows_into_their_new_places(saved, axis):
  table, path = saved
  old = table if axis == 0 else table.T  # (6, 5) or (5, 6): vocabulary of 6 on `axis`
  store = _stores(path, ["emb"])["emb"]
  if axis == 1:
    store = store.T
  index = np.array([5, -1, 0, 0, 2, -1, 3])  # reordered, a duplicate, two new rows
  shape = (7, 5) if axis == 0 else (4, 7)  # axis 1: the leading 4 of 5 hidden rows, as TensorFlow does
  read = hostread.rows(store, index, shape, np.float32, axis)
  hostread.run([read], max_bytes_in_flight=1)
  kept = index >= 0
  expected = np.take(old, index[kept], axis=axis)
  if axis == 0:
    np.testing.assert_array_equal(read.out[kept], expected)
  else:
    np.testing.assert_array_equal(read.out[:, kept], expected[:4])


def test_run_bounds_the_bytes_in_flight(monkeypatch, saved):
  _, path = saved
  store = _stores(path, ["emb"])["emb"]
  reads = [hostread.whole(store, np.float32) for _ in range(6)]  # 120 bytes each
  in_flight, peak = [], [0]
  start, wait = hostread.Read.start, hostread.Read.wait

  def tracked_start(self):
    in_flight.append(self)
    peak[0] = max(peak[0], sum(r.nbytes for r in in_flight))
    start(self)

  def tracked_wait(self):
    wait(self)
    in_flight.remove(self)

  monkeypatch.setattr(hostread.Read, "start", tracked_start)
  monkeypatch.setattr(hostread.Read, "wait", tracked_wait)
  hostread.run(reads, max_bytes_in_flight=250)
  assert peak[0] == 240 and not in_flight
  hostread.run(reads[:2], max_bytes_in_flight=10)  # larger than the bound: one at a time
  assert peak[0] == 240


@pytest.fixture
def stream_all(monkeypatch):
  """Streams every single-chunk array, however small (the threshold is 64 MiB)."""
  monkeypatch.setattr(hostread, "_STREAM_BYTES", 0)
  monkeypatch.setattr(hostread, "_PIECE_BYTES", 40)  # several byte ranges, the last one short


@pytest.mark.parametrize("compressed", [True, False])
def test_streamed_whole_and_rows_equal_tensorstore_reads(tmp_path, stream_all, compressed):
  table = np.random.default_rng(0).normal(size=(37, 6)).astype(np.float32)
  path = str(tmp_path / "ckpt")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compressed)) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave({"emb": jnp.asarray(table)}))
  store = _stores(path, ["emb"])["emb"]
  chunk = hostread._single_chunk(store)
  assert chunk is not None and chunk.zstd == compressed
  assert hostread._single_chunk(store.T) is None and hostread._single_chunk(store[:5]) is None
  index = np.array([36, -1, 0, 5, 5, -1, 17, 1])
  reads = {
    "same": hostread.whole(store, np.float32),
    "cast": hostread.whole(store, ml_dtypes.bfloat16),
    "rows": hostread.rows(store, index, (8, 6), np.float32, axis=0),
    "cols": hostread.rows(store, index[index < 6], (4, 6), np.float32, axis=1),  # old (37, 6) as [hidden, vocab]
  }
  hostread.run(reads.values(), max_bytes_in_flight=1 << 20)
  np.testing.assert_array_equal(reads["same"].out, table)
  np.testing.assert_array_equal(reads["cast"].out, table.astype(ml_dtypes.bfloat16))
  kept = index >= 0
  np.testing.assert_array_equal(reads["rows"].out[kept], table[index[kept]])
  cols = index[index < 6]
  np.testing.assert_array_equal(reads["cols"].out[:, cols >= 0], table[:4, cols[cols >= 0]])


def test_streamed_warm_start_equals_the_tensorstore_one(tmp_path, monkeypatch):
  old = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
  path = save_checkpoint(tmp_path / "ckpt", {"params": {"emb": jnp.asarray(old), "w": jnp.asarray(old[:3])}})
  info = fws.VocabInfo(
    [f"t{i}" for i in range(49, -1, -3)] + ["new"],
    18,
    num_oov_buckets=1,
    old_vocab=[f"t{i}" for i in range(50)],
    backup_initializer=jax.nn.initializers.constant(7.0),
  )
  settings = fws.WarmStartSettings(path, var_name_to_vocab_info={"emb": info})
  live = {"params": {"emb": jnp.zeros((19, 4)), "w": jnp.zeros((3, 4), jnp.bfloat16)}}
  expected = fws.warm_start(live, settings)
  monkeypatch.setattr(hostread, "_STREAM_BYTES", 0)
  monkeypatch.setattr(hostread, "_PIECE_BYTES", 64)
  out = fws.warm_start(live, settings)
  for name in ("emb", "w"):
    np.testing.assert_array_equal(out["params"][name], expected["params"][name])
  np.testing.assert_array_equal(out["params"]["emb"][0], old[49])
  np.testing.assert_array_equal(out["params"]["emb"][-2:], np.full((2, 4), 7.0))


@pytest.mark.parametrize("streamed", [True, False])
def test_a_read_that_fails_midway_names_what_it_read(tmp_path, monkeypatch, streamed):
  import pathlib

  if streamed:
    monkeypatch.setattr(hostread, "_STREAM_BYTES", 0)
  noise = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)  # incompressible: not inline in the index
  path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.asarray(noise)})
  store = _stores(path, ["w"])["w"]  # opened: metadata read
  read = hostread.whole(store, np.float32, label="'w' from the test")
  for data in pathlib.Path(path).glob("ocdbt.process_*/d/*"):  # the array data (the root d/ holds the index)
    data.write_bytes(bytes(data.stat().st_size))  # zeros: no longer a zstd frame
  with pytest.raises(fws.WarmStartError, match=r"Reading 'w' from the test failed: .*save finished"):
    hostread.run([read], max_bytes_in_flight=1 << 20)


def test_bfloat16_chunks_stream_too(tmp_path, stream_all):
  table = np.random.default_rng(2).normal(size=(21, 5)).astype(ml_dtypes.bfloat16)
  path = save_checkpoint(tmp_path / "ckpt", {"emb": jnp.asarray(table)})
  store = _stores(path, ["emb"])["emb"]
  assert hostread._single_chunk(store) is not None
  index = np.array([20, -1, 3, 0])
  reads = [hostread.whole(store, ml_dtypes.bfloat16), hostread.rows(store, index, (4, 5), np.float32, axis=0)]
  hostread.run(reads, max_bytes_in_flight=1 << 20)
  np.testing.assert_array_equal(reads[0].out, table)
  np.testing.assert_array_equal(reads[1].out[index >= 0], table[index[index >= 0]].astype(np.float32))


def _save_sharded(path, table, mesh, spec):
  """An Orbax checkpoint of `table` saved from `mesh` as `spec`: one zarr chunk per distinct shard."""
  from jax.sharding import NamedSharding

  return save_checkpoint(path, {"t": jax.device_put(jnp.asarray(table), NamedSharding(mesh, spec))})


def _regions(mesh, spec, shape):
  from jax.sharding import NamedSharding

  indices = NamedSharding(mesh, spec).addressable_devices_indices_map(shape).values()
  return list({tuple(s.indices(n)[:2] for s, n in zip(i, shape, strict=True)): i for i in indices}.values())


@pytest.fixture
def count_decodes(monkeypatch):
  """Counts how often each stored chunk is decoded (streamed or read through TensorStore)."""
  decoded = []
  blocks, scatter = hostread.row_blocks, hostread._scatter_chunk

  def counting_blocks(chunk, *args):
    decoded.append(chunk.key)
    return blocks(chunk, *args)

  def counting_scatter(store, grid, position, *args):
    if grid is None:
      decoded.append(".".join(map(str, position)))
    return scatter(store, grid, position, *args)

  monkeypatch.setattr(hostread, "row_blocks", counting_blocks)
  monkeypatch.setattr(hostread, "_scatter_chunk", counting_scatter)
  return decoded


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "tensorstore"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
  "new_spec", [("a", "b"), ("b", "a"), (None, "b"), ("b", None), ()], ids=lambda s: "P" + "".join(map(str, s))
)
def test_gather_shards_decodes_each_old_chunk_once(
  tmp_path, mesh, monkeypatch, count_decodes, streamed, axis, new_spec
):
  """Every region equals its own shard read (`rows` with `window=`), and each old chunk is decoded at most once."""
  from jax.sharding import PartitionSpec as P

  if not streamed:
    monkeypatch.setattr(hostread, "zarr2_grid", lambda store: None)
  monkeypatch.setattr(hostread, "_GRID_PIECE_BYTES", 96)  # several blocks and byte ranges per chunk
  rng = np.random.default_rng(axis)
  old = rng.normal(size=(12, 16) if axis == 0 else (16, 12)).astype(np.float32)  # vocabulary of 12 on `axis`
  path = _save_sharded(tmp_path / "ckpt", old, mesh, P("a", "b"))  # chunks of (6, 4) or (8, 3)
  store = _stores(path, ["t"])["t"]
  index = rng.permutation(np.r_[np.arange(12), -np.ones(4, int)])[:16]  # 16 new rows: shuffled, some new
  index[3] = index[5] = 7  # a duplicate
  shape = (16, 16) if axis == 0 else (12, 16)  # axis 1: the leading 12 of 16 hidden rows
  regions = _regions(mesh, P(*new_spec), shape)
  outs, reads = hostread.gather_shards(store, index, shape, ml_dtypes.bfloat16, axis, regions)
  hostread.run(reads, max_bytes_in_flight=1 << 20)
  kept = np.flatnonzero(index >= 0)
  expected = np.zeros(shape, ml_dtypes.bfloat16)
  if axis == 0:
    expected[kept] = old[index[kept]].astype(ml_dtypes.bfloat16)
  else:
    expected[:, kept] = old[:12, index[kept]].astype(ml_dtypes.bfloat16)
  for region, out in zip(regions, outs, strict=True):
    assert out.ctypes.data % 64 == 0 and out.dtype == ml_dtypes.bfloat16
    mine = np.take(out, np.flatnonzero(index[region[axis]] >= 0), axis=axis)
    want = np.take(expected[region], np.flatnonzero(index[region[axis]] >= 0), axis=axis)
    np.testing.assert_array_equal(mine, want)
  assert len(count_decodes) == len(set(count_decodes)) > 0
  assert len(count_decodes) <= 8


def test_gather_shards_reads_only_the_chunks_its_regions_need(tmp_path, mesh, count_decodes):
  """Regions of one row block whose rows all come from one old row block decode only that block's chunks."""
  from jax.sharding import PartitionSpec as P

  old = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
  store = _stores(_save_sharded(tmp_path / "ckpt", old, mesh, P("a", "b")), ["t"])["t"]  # chunks of (6, 4)
  index = np.array([7, 6, -1, 11, 8, 9, -1, 10])  # rows of the second old row block only
  regions = [(slice(0, 8), slice(0, 4)), (slice(0, 8), slice(4, 8))]  # the first 8 columns
  outs, reads = hostread.gather_shards(store, index, (8, 16), np.float32, 0, regions)
  hostread.run(reads, max_bytes_in_flight=1 << 20)
  assert sorted(count_decodes) == ["1.0", "1.1"]
  kept = index >= 0
  np.testing.assert_array_equal(np.concatenate(outs, axis=1)[kept], old[index[kept], :8])


def test_gather_shards_reads_a_missing_chunk_as_its_fill_value(tmp_path):
  """A chunk that was never written (all fill value) reads as the fill value, through TensorStore."""
  spec = {
    "driver": "zarr",
    "kvstore": {"driver": "file", "path": str(tmp_path / "z")},
    "metadata": {"shape": [8, 4], "chunks": [4, 4], "dtype": "<f4", "compressor": {"id": "zstd", "level": 1}},
  }
  store = ts.open(spec, create=True).result()
  store[:4].write(np.ones((4, 4), np.float32)).result()  # chunk 1.0 stays missing
  store = ts.open({"driver": "zarr", "kvstore": spec["kvstore"]}).result()
  assert hostread.zarr2_grid(store) is not None
  index = np.array([6, 0, -1, 5])
  outs, reads = hostread.gather_shards(store, index, (4, 4), np.float32, 0, [(slice(0, 2),), (slice(2, 4),)])
  hostread.run(reads, max_bytes_in_flight=1 << 20)
  np.testing.assert_array_equal(outs[0], [[0] * 4, [1] * 4])
  np.testing.assert_array_equal(outs[1][1], [0] * 4)


@pytest.mark.parametrize("how", ["numpy", "many_chunks"])
def test_gather_shards_falls_back_to_a_read_per_region(tmp_path, mesh, monkeypatch, how):
  """A numpy-like source (no chunks) or a grid of too many chunks: each region is read on its own, with `rows`."""
  from jax.sharding import PartitionSpec as P

  old = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
  if how == "numpy":
    store = old
  else:
    store = _stores(_save_sharded(tmp_path / "ckpt", old, mesh, P("a", "b")), ["t"])["t"]
    monkeypatch.setattr(hostread, "MAX_GATHER_CHUNKS", 2)
  index = np.array([11, -1, 0, 5, 6, 3, -1, 2])
  regions = _regions(mesh, P("a", "b"), (8, 16))
  outs, reads = hostread.gather_shards(store, index, (8, 16), np.float32, 0, regions)
  assert len(reads) == len(regions) and all(r.out is o for r, o in zip(reads, outs, strict=True))
  hostread.run(reads, max_bytes_in_flight=1 << 20)
  for region, out in zip(regions, outs, strict=True):
    sub = index[region[0]]
    np.testing.assert_array_equal(out[sub >= 0], old[sub[sub >= 0]][:, region[1]])


def test_gather_shards_checks_the_old_table_is_large_enough(tmp_path):
  store = ts.array(np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match=r"smaller than \(4, 5\) off axis 0"):
    hostread.gather_shards(store, np.arange(4), (4, 5), np.float32, 0, [(slice(None),)])


def test_a_damaged_chunk_fails_the_gather_naming_the_tensor(tmp_path, mesh):
  import pathlib

  from jax.sharding import PartitionSpec as P

  noise = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)  # chunks too large to be inline
  store = _stores(_save_sharded(tmp_path / "ckpt", noise, mesh, P("a", "b")), ["t"])["t"]
  outs, reads = hostread.gather_shards(
    store, np.arange(256)[::-1], (256, 64), np.float32, 0, _regions(mesh, P("a", "b"), (256, 64)), label="'t' here"
  )
  for data in pathlib.Path(tmp_path / "ckpt").glob("ocdbt.process_*/d/*"):
    data.write_bytes(bytes(data.stat().st_size))
  with pytest.raises(fws.WarmStartError, match=r"Reading 't' here failed"):
    hostread.run(reads, max_bytes_in_flight=1 << 20)
