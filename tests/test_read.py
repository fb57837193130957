"""The read stage (flax_warmstart/_src/read.py): which tensors go to our own host buffers, which to the source's restore.

In one process a leaf in host memory or on one CPU device is read straight
into its own 64-byte-aligned buffer (`hostread`), and a sharded leaf shard by
shard into buffers its devices adopt; an old vocabulary table whose new rows
need statistics of the whole table (`MeanOfOldRows`) and a Python scalar go
through the source's restore. A read that fails names the tensor, the leaf and
the checkpoint.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_checkpoint
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws
from flax_warmstart._src import read as read_lib
from flax_warmstart._src import transform as transform_lib
from flax_warmstart._src.sources import orbax as checkpoint_lib


@pytest.fixture
def saved(tmp_path):
  table = np.arange(6 * 5, dtype=np.float32).reshape(6, 5) / 7
  tree = {"params": {"emb": jnp.asarray(table), "ids": jnp.arange(4, dtype=jnp.int32)}, "step": 3}
  return table, save_checkpoint(tmp_path / "ckpt", tree)


def _orbax_targets(monkeypatch):
  """Records what `warm_start` leaves to Orbax's restore."""
  seen = []
  restore = checkpoint_lib.restore

  def recording(checkpoint, targets):
    seen.extend(targets)
    return restore(checkpoint, targets)

  monkeypatch.setattr(checkpoint_lib, "restore", recording)
  return seen


def test_one_device_state_is_read_into_its_own_buffers(monkeypatch, saved):
  table, path = saved
  seen = _orbax_targets(monkeypatch)
  live = {"params": {"emb": jnp.zeros((7, 5)), "ids": jnp.zeros(4, jnp.int32)}, "step": 0}
  info = fws.VocabInfo(["f", "x", "a"], 3, num_oov_buckets=0, old_vocab=list("abcdef"))
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], var_name_to_vocab_info={"emb": info})
  with pytest.raises(fws.WarmStartError, match=r"ckpt: 1 problem\n  - 'emb': 7 rows exceed new_vocab_size \(3\)"):
    fws.warm_start(live, settings)
  live["params"]["emb"] = jnp.zeros((3, 5))
  out = fws.warm_start(live, settings)
  assert seen == ["step"]  # only the Python int went through Orbax
  np.testing.assert_array_equal(out["params"]["emb"], table[np.array([5, 0, 0])] * np.array([[1], [0], [1]]))
  assert out["params"]["emb"].unsafe_buffer_pointer() % 64 == 0
  np.testing.assert_array_equal(out["params"]["ids"], np.arange(4))
  assert out["step"] == 3


@pytest.mark.parametrize("spec", [P(), P("x"), P(None, "x"), P("a", "b")])
def test_sharded_state_is_read_shard_by_shard_into_its_own_buffers(monkeypatch, saved, spec):
  """Each addressable shard is read on its own into an aligned buffer its device adopts; Orbax reads nothing."""
  table, path = saved
  seen = _orbax_targets(monkeypatch)
  mesh = jax.make_mesh((8,), ("x",)) if "a" not in spec else jax.make_mesh((2, 4), ("a", "b"))
  big = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
  path = save_checkpoint(path + "_big", {"params": {"emb": big}})
  sharding = NamedSharding(mesh, spec)
  live = {"params": {"emb": jax.device_put(jnp.zeros((8, 16)), sharding)}}
  out = fws.warm_start(live, path)
  assert seen == []
  np.testing.assert_array_equal(out["params"]["emb"], big)
  assert out["params"]["emb"].sharding == sharding
  for shard in out["params"]["emb"].addressable_shards:
    assert shard.data.unsafe_buffer_pointer() % 64 == 0


@pytest.mark.parametrize("axis", [0, 1])
def test_a_sharded_remap_reads_each_shards_kept_rows(monkeypatch, tmp_path, axis):
  """The gather runs per shard: only the old rows a shard keeps, of its columns; new rows filled in the shard."""
  rng = np.random.default_rng(0)
  old = rng.normal(size=(6, 12) if axis == 0 else (12, 6)).astype(np.float32)
  path = save_checkpoint(tmp_path / "ckpt", {"t": old})
  new_vocab = ["f", "x", "a", "c", "y", "b", "e", "d"]
  info = fws.VocabInfo(new_vocab, 8, 0, list("abcdef"), backup_initializer=jax.nn.initializers.constant(7.0), axis=axis)
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], var_name_to_vocab_info={"t": info})
  shape = (8, 12) if axis == 0 else (12, 8)
  ref = fws.warm_start({"t": np.zeros(shape, np.float32)}, settings)["t"]
  seen = _orbax_targets(monkeypatch)
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  sharding = NamedSharding(mesh, P("a", "b"))
  out = fws.warm_start({"t": jax.device_put(jnp.zeros(shape), sharding)}, settings)["t"]
  assert seen == [] and out.sharding == sharding
  np.testing.assert_array_equal(np.asarray(out), ref)
  index = np.array([5, -1, 0, 2, -1, 1, 4, 3])
  kept = np.take(old, index[index >= 0], axis=axis)
  np.testing.assert_array_equal(np.take(np.asarray(out), np.flatnonzero(index >= 0), axis=axis), kept)
  assert np.all(np.take(np.asarray(out), np.flatnonzero(index < 0), axis=axis) == 7.0)


def test_a_failed_read_names_the_tensor_and_the_checkpoint(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"params": {"w": jnp.ones((4, 3))}})
  live = {"params": {"w": jnp.zeros((4, 3))}}
  plan = fws.plan(live, path)
  for data in (pathlib.Path(path) / "d").iterdir():
    data.write_bytes(b"")  # damaged after the plan was made
  with pytest.raises(fws.WarmStartError, match=r"Reading 'w' .*from .*ckpt failed: .*save finished"):
    fws.warm_start(live, plan=plan)


def test_the_decisions_per_leaf(tmp_path, mesh):
  """`host_target`, `shard_target` and `restore_spec` on the rows of a real plan: decisions from the row and the leaf."""
  old = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
  path = save_checkpoint(tmp_path / "ckpt", {"emb": old, "stat": old, "w": old, "n": 3})
  vocab = ["f", "x", "a", "c", "y", "b", "e", "d"]
  sharding = NamedSharding(mesh, P("a", "b"))
  live = {
    "emb": jax.device_put(jnp.zeros((8, 8)), sharding),  # a gather on a sharded leaf
    "stat": jax.device_put(jnp.zeros((8, 8)), sharding),  # the same, new rows from the old rows' mean
    "w": np.zeros((6, 8), np.float32),  # host memory
    "n": 0,  # a Python scalar
  }
  settings = fws.WarmStartSettings(
    path,
    vars_to_warm_start=[".*"],
    var_name_to_vocab_info={
      "emb": fws.VocabInfo(vocab, 8, 0, list("abcdef")),
      "stat": fws.VocabInfo(vocab, 8, 0, list("abcdef"), backup_initializer=fws.MeanOfOldRows()),
    },
  )
  rows = {row.name: row for row in fws.plan(live, settings).leaves}
  one_cpu = jax.device_put(jnp.zeros((6, 8)), jax.devices()[0])

  assert read_lib.host_target(rows["w"], live["w"]) and not read_lib.shard_target(rows["w"], live["w"])
  assert read_lib.host_target(rows["w"], one_cpu) and read_lib.restore_spec(live["w"], rows["w"]) is None
  assert not read_lib.host_target(rows["emb"], live["emb"]) and read_lib.shard_target(rows["emb"], live["emb"])
  # Statistics of the whole old table: Orbax reads it sharded off its vocabulary axis, the gather runs on devices.
  assert not read_lib.host_target(rows["stat"], live["stat"]) and not read_lib.shard_target(rows["stat"], live["stat"])
  spec = read_lib.restore_spec(live["stat"], rows["stat"])
  assert spec.shape == (6, 8) and spec.sharding == transform_lib.table_sharding(sharding, (6, 8), 0)
  spec = read_lib.restore_spec(live["emb"], rows["w"])  # no gather: read as the leaf is placed
  assert spec.sharding == sharding
  assert not read_lib.host_target(rows["n"], live["n"]) and not read_lib.shard_target(rows["n"], live["n"])
  assert read_lib.restore_spec(live["n"], rows["n"]) is None


@pytest.mark.parametrize("backup", [None, "mean"], ids=["shard_reads", "device_gather"])
@pytest.mark.parametrize("spec", [P("a", "b"), P(None, "b")], ids=str)
def test_sharded_axis1_remap_takes_the_leading_hidden_rows(tmp_path, mesh, backup, spec):
  """TensorFlow's rule on a sharded leaf: an old `[hidden, vocab]` kernel with 12 hidden rows into one with 8."""
  old = np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32)
  path = save_checkpoint(tmp_path / "ckpt", {"t": old})
  initializer = fws.MeanOfOldRows() if backup == "mean" else None
  info = fws.VocabInfo(list("fxacyb") + ["g", "h"], 8, 0, list("abcdef"), backup_initializer=initializer, axis=1)
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], var_name_to_vocab_info={"t": info})
  expected = fws.warm_start({"t": np.zeros((8, 8), np.float32)}, settings)["t"]
  np.testing.assert_array_equal(expected[:, [2, 5]], old[:8, [0, 1]])  # a and b: the leading 8 rows
  out = fws.warm_start({"t": jax.device_put(jnp.zeros((8, 8)), NamedSharding(mesh, spec))}, settings)["t"]
  np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("saved_spec", [P("a", "b"), P("b", None)], ids=str)
def test_a_sharded_remap_decodes_each_old_chunk_once(monkeypatch, tmp_path, mesh, axis, saved_spec):
  """An old table saved from a mesh (several chunks) warm-starts a sharded leaf as the host path does, each old
  chunk decoded once however many shards take rows from it; Orbax reads nothing."""
  from flax_warmstart._src import hostread

  rng = np.random.default_rng(axis)
  old = rng.normal(size=(16, 24) if axis == 0 else (24, 16)).astype(np.float32)  # vocabulary of 16 on `axis`
  path = save_checkpoint(tmp_path / "ckpt", {"t": jax.device_put(jnp.asarray(old), NamedSharding(mesh, saved_spec))})
  old_vocab = [f"w{i}" for i in range(16)]
  new_vocab = [old_vocab[i] for i in rng.permutation(16)[:12]] + ["n0", "n1", "n2", "n3"]
  info = fws.VocabInfo(new_vocab, 16, 0, old_vocab, backup_initializer=jax.nn.initializers.constant(3.0), axis=axis)
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], var_name_to_vocab_info={"t": info})
  shape = (16, 24) if axis == 0 else (24, 16)
  expected = fws.warm_start({"t": np.zeros(shape, np.float32)}, settings)["t"]  # the host path
  seen = _orbax_targets(monkeypatch)
  decoded = []
  blocks = hostread.row_blocks
  monkeypatch.setattr(hostread, "row_blocks", lambda chunk, *a: (decoded.append(chunk.key), blocks(chunk, *a))[1])
  sharding = NamedSharding(mesh, P("a", "b"))
  abstract = {"t": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}
  out = fws.warm_start(abstract, settings, init_fn=lambda: {"t": jnp.zeros(shape)})["t"]
  assert seen == [] and out.sharding == sharding
  np.testing.assert_array_equal(np.asarray(out), expected)
  store = checkpoint_lib.open_arrays(checkpoint_lib.open_orbax(path), ["t"])["t"]
  chunks = np.prod(np.ceil(np.divide(old.shape, store.chunk_layout.read_chunk.shape)))
  assert 1 < len(decoded) == len(set(decoded)) <= chunks  # each chunk once (one with no kept row: not at all)
  for shard in out.addressable_shards:
    assert shard.data.unsafe_buffer_pointer() % 64 == 0
