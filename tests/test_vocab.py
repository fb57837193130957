"""Vocabulary remapping beyond TensorFlow (flax_warmstart/_src/vocab.py, and the gather in transform.py).

TensorFlow's own VocabInfo scenarios are ported in test_vocab_tf.py. These
cover what the JAX port adds: optimizer slots that follow their rows (and
factored slots that cannot), new-row initializers (mean, mean + covariance,
donor tokens, explicit vectors, JAX initializers with `rng`), statistics and
their log, sharded tables, dtypes and ranks, and vocabulary sources. The
gather's backends are tested against each other in test_transform.py.
"""

import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import save_checkpoint
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws
from flax_warmstart._src import vocab as vocab_lib
from flax_warmstart._src.naming import flatten_state
from flax_warmstart._src.sources import orbax as checkpoint_lib

EMBED = "embedder/embedding"
OLD_VOCAB = ["<pad>", "a", "b", "c", "d", "e"]
# <pad>, d, b, a are copied; z is new; y gets c's row through a donor; e is dropped.
NEW_VOCAB = ["<pad>", "d", "b", "z", "a", "y"]
NEW_ROWS = len(NEW_VOCAB) + 1  # one OOV row
PARAM_INDEX = [0, 4, 2, -1, 1, 3, -1]  # y <- c (donor)
SLOT_INDEX = [0, 4, 2, -1, 1, -1, -1]  # slots do not take donors: new rows start at zero


class TextModel(nn.Module):
  """An embedding (`embedder/embedding`) and a dense head."""

  vocab: int
  features: int = 4

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.features, name="embedder")(ids)
    return nn.Dense(3, name="head")(x.mean(axis=1))


def train(vocab, tx, seed, steps):
  """A TrainState of TextModel after `steps` updates touching every embedding row."""
  model = TextModel(vocab)
  ids = jnp.arange(vocab, dtype=jnp.int32).reshape(1, vocab)
  params = model.init(jax.random.key(seed), ids)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state):
    def loss(p):
      return jnp.sum((state.apply_fn({"params": p}, ids) - 1.0) ** 2)

    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for _ in range(steps):
    state = step(state)
  return state


def named(state):
  """Leaf name -> host array."""
  variables, leaves, _ = flatten_state(state)
  return {v.name: np.asarray(leaf) for v, leaf in zip(variables, leaves, strict=True)}


def assert_rows(actual, old, index, fill, axis=0):
  """Row `r` of `actual` (along `axis`) is old row `index[r]`, or `fill` where -1."""
  actual, old = np.moveaxis(np.asarray(actual), axis, 0), np.moveaxis(np.asarray(old), axis, 0)
  assert actual.shape[0] == len(index)
  for r, i in enumerate(index):
    expected = old[i] if i >= 0 else np.broadcast_to(np.asarray(fill, actual.dtype), actual.shape[1:])
    np.testing.assert_array_equal(actual[r], expected, err_msg=f"row {r} (old {i})")


def info_for(**kwargs):
  kwargs.setdefault("donor_tokens", {"y": "c"})
  return fws.VocabInfo(NEW_VOCAB, len(NEW_VOCAB), 1, OLD_VOCAB, **kwargs)


OPTIMIZERS = {
  "adam": (lambda: optax.adam(1e-2), ("mu", "nu")),
  "sgd_momentum": (lambda: optax.sgd(1e-1, momentum=0.9), ("trace",)),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """name -> (old state, its checkpoint, new state trained one step), built once."""
  cache = {}

  def get(name):
    if name not in cache:
      make_tx = OPTIMIZERS[name][0]
      old = train(len(OLD_VOCAB), make_tx(), seed=0, steps=2)
      ckpt = save_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", old)
      new = train(NEW_ROWS, make_tx(), seed=1, steps=1)
      cache[name] = (old, ckpt, new)
    return cache[name]

  return get


# 1. Optimizer slots follow their rows.


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_slots_follow_their_rows(trained, opt):
  old, ckpt, new = trained(opt)
  slots = OPTIMIZERS[opt][1]
  settings = fws.WarmStartSettings(
    ckpt,
    vars_to_warm_start=[".*"],
    var_name_to_vocab_info={EMBED: info_for(backup_initializer=jax.nn.initializers.constant(0.5))},
  )
  plan = fws.plan(new, settings)
  rows = {leaf.name: leaf for leaf in plan.leaves}
  assert rows[EMBED].action == "load" and rows[EMBED].remap is not None and rows[EMBED].remap.follows is None
  for slot in slots:
    row = rows[f"{EMBED}/opt_state/0/{slot}"]
    assert row.action == "load" and row.remap is not None, row
    assert row.remap.follows == EMBED
    assert row.remap.index.tolist() == SLOT_INDEX
  assert rows[EMBED].remap.index.tolist() == PARAM_INDEX

  out = named(fws.execute(plan, new))
  before = named(old)
  assert_rows(out[EMBED], before[EMBED], PARAM_INDEX, 0.5)
  for slot in slots:
    name = f"{EMBED}/opt_state/0/{slot}"
    assert np.all(before[name] != 0), "the old slot should be non-zero for this test to mean anything"
    assert_rows(out[name], before[name], SLOT_INDEX, 0.0)
  # Everything else is an ordinary copy.
  for name, value in before.items():
    if not name.startswith(EMBED):
      np.testing.assert_array_equal(out[name], value, err_msg=name)


def test_str_regex_leaves_slots_alone(trained):
  old, ckpt, new = trained("adam")
  settings = fws.WarmStartSettings(
    ckpt, var_name_to_vocab_info={EMBED: info_for(backup_initializer=jax.nn.initializers.constant(0.5))}
  )
  plan = fws.plan(new, settings)
  rows = {leaf.name: leaf for leaf in plan.leaves}
  assert rows[f"{EMBED}/opt_state/0/mu"].action == "keep"
  out, now = named(fws.execute(plan, new)), named(new)
  assert_rows(out[EMBED], named(old)[EMBED], PARAM_INDEX, 0.5)
  for slot in ("mu", "nu"):
    name = f"{EMBED}/opt_state/0/{slot}"
    assert np.any(now[name] != 0)
    np.testing.assert_array_equal(out[name], now[name])
  np.testing.assert_array_equal(out["opt_state/0/count"], now["opt_state/0/count"])


# 2. Factored slots.


def test_factored_slots_are_kept_and_reported(tmp_path, caplog):
  tx = lambda: optax.adafactor(1e-2, min_dim_size_to_factor=2)  # noqa: E731
  old = train(len(OLD_VOCAB), tx(), seed=0, steps=2)
  ckpt = save_checkpoint(tmp_path / "ckpt", old)
  new = train(NEW_ROWS, tx(), seed=1, steps=1)
  now = named(new)
  # Really factored: one slot per axis of the [7, 4] embedding.
  assert {now[f"{EMBED}/opt_state/0/{s}"].shape for s in ("v_row", "v_col")} == {(NEW_ROWS,), (4,)}
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=[".*"], var_name_to_vocab_info={EMBED: info_for()})
  plan = fws.plan(new, settings)
  rows = {leaf.name: leaf for leaf in plan.leaves}
  factored = [n for n in rows if n.startswith(f"{EMBED}/opt_state/") and rows[n].shape != (NEW_ROWS, 4)]
  assert {f"{EMBED}/opt_state/0/v_row", f"{EMBED}/opt_state/0/v_col"} <= set(factored)
  for name in factored:
    assert rows[name].action == "keep"
    assert "factored" in rows[name].reason and EMBED in rows[name].reason, rows[name].reason

  with caplog.at_level(logging.INFO, logger="flax_warmstart"):
    out = named(fws.execute(plan, new))
  assert_rows(out[EMBED], named(old)[EMBED], PARAM_INDEX, 0.0)
  for name in factored:
    np.testing.assert_array_equal(out[name], now[name], err_msg=name)
  # The head's (factored, same-shape) slots are ordinary copies.
  np.testing.assert_array_equal(out["head/kernel/opt_state/0/v_row"], named(old)["head/kernel/opt_state/0/v_row"])
  assert f"{EMBED}/opt_state/0/v_row" in caplog.text


# 3. New-row initializers, on a plain params tree.

OLD_TOKENS = [f"t{i}" for i in range(10)]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  """(checkpoint, old [10, 4] table) with dyadic values, so means are exact."""
  rng = np.random.default_rng(0)
  old = (rng.integers(-16, 17, size=(10, 4)) / 8).astype(np.float32)
  ckpt = save_checkpoint(tmp_path_factory.mktemp("table") / "ckpt", {"embedder": {"embedding": jnp.asarray(old)}})
  return ckpt, old


def remap_table(ckpt, info, rows, *, dtype=jnp.float32, rng=None, width=4):
  live = {"embedder": {"embedding": jnp.zeros((rows, width), dtype)}}
  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMBED: info}), rng=rng)
  value = out["embedder"]["embedding"]
  assert value.dtype == dtype and value.shape == (rows, width)
  return np.asarray(value)


# t9 lies beyond old_vocab_size=8: a new token although the checkpoint has its row.
MEAN_NEW = ["t3", "new1", "t0", "t9"]
MEAN_INDEX = [3, -1, 0, -1, -1, -1]


def test_mean_of_old_rows(table):
  ckpt, old = table
  info = fws.VocabInfo(MEAN_NEW, 4, 2, OLD_TOKENS, old_vocab_size=8, backup_initializer=fws.MeanOfOldRows())
  out = remap_table(ckpt, info, 6)
  mean = old[:8].astype(np.float32).mean(axis=0)  # exact: dyadic values over 8 rows
  assert_rows(out, old, MEAN_INDEX, mean)


def test_mean_covariance_of_old_rows(table):
  ckpt, old = table
  info = fws.VocabInfo(MEAN_NEW, 4, 2, OLD_TOKENS, old_vocab_size=8, backup_initializer=fws.MeanCovarianceOfOldRows())
  with pytest.raises(fws.WarmStartError, match="rng"):
    remap_table(ckpt, info, 6)
  a = remap_table(ckpt, info, 6, rng=jax.random.key(0))
  b = remap_table(ckpt, info, 6, rng=jax.random.key(0))
  c = remap_table(ckpt, info, 6, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  new_rows = [r for r, i in enumerate(MEAN_INDEX) if i < 0]
  assert not np.array_equal(a[new_rows], c[new_rows])
  for r, i in enumerate(MEAN_INDEX):
    if i >= 0:
      np.testing.assert_array_equal(a[r], old[i])
  mean = old[:8].mean(axis=0)
  np.testing.assert_allclose(a[new_rows], np.broadcast_to(mean, (len(new_rows), 4)), atol=1e-3)

  # At scale 1 the draws have the old rows' mean and covariance.
  n = 500
  wide = fws.VocabInfo(["t1"], 1, n, OLD_TOKENS, old_vocab_size=8, backup_initializer=fws.MeanCovarianceOfOldRows(1.0))
  draws = remap_table(ckpt, wide, n + 1, rng=jax.random.key(0))[1:]
  centered = old[:8] - mean
  cov = centered.T @ centered / 8
  np.testing.assert_allclose(draws.mean(axis=0), mean, atol=4 * np.sqrt(np.diag(cov).max() / n) + 1e-3)
  np.testing.assert_allclose(np.cov(draws.T, bias=True), cov, atol=0.4)


def test_donor_tokens(table):
  ckpt, old = table
  info = fws.VocabInfo(["t1", "K[Ac]", "new"], 3, 0, OLD_TOKENS, donor_tokens={"K[Ac]": "t5"})
  assert_rows(remap_table(ckpt, info, 3), old, [1, 5, -1], 0.0)


@pytest.mark.parametrize(
  "donors, message",
  [
    ({"new": "nope"}, "donor token 'nope' .* not in the old vocabulary"),
    ({"t1": "t5"}, "'t1' is in the old vocabulary already"),
    ({"absent": "t5"}, "donor entry for 'absent', which is not among the new vocabulary"),
  ],
)
def test_donor_token_errors(table, donors, message):
  ckpt, _ = table
  live = {"embedder": {"embedding": jnp.zeros((3, 4))}}
  info = fws.VocabInfo(["t1", "K[Ac]", "new"], 3, 0, OLD_TOKENS, donor_tokens=donors)
  with pytest.raises(fws.WarmStartError, match=message):
    fws.plan(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMBED: info}))


def test_token_vectors(table):
  ckpt, old = table
  vec = np.array([1.5, -2.0, 0.25, 3.0], np.float32)
  info = fws.VocabInfo(
    ["t1", "new", "other"],
    3,
    1,
    OLD_TOKENS,
    token_vectors={"new": vec},
    backup_initializer=jax.nn.initializers.constant(0.3),
  )
  out = remap_table(ckpt, info, 4)
  np.testing.assert_array_equal(out[0], old[1])
  np.testing.assert_array_equal(out[1], vec)
  np.testing.assert_array_equal(out[2:], np.full((2, 4), 0.3, np.float32))

  live = {"embedder": {"embedding": jnp.zeros((3, 4))}}
  for vectors, message in [
    ({"new": [1.0, 2.0, 3.0]}, r"shape \(3,\), expected \(4,\)"),
    ({"t1": vec}, "already gets a row from the old vocabulary"),
    ({"absent": vec}, "not among the new vocabulary"),
  ]:
    info = fws.VocabInfo(["t1", "new", "other"], 3, 0, OLD_TOKENS, token_vectors=vectors)
    with pytest.raises(fws.WarmStartError, match=message):
      fws.plan(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMBED: info}))


def test_random_jax_initializer_needs_rng(table):
  ckpt, old = table
  info = fws.VocabInfo(["t1", "new", "t2"], 3, 2, OLD_TOKENS, backup_initializer=jax.nn.initializers.normal(0.02))
  with pytest.raises(fws.WarmStartError, match="rng"):
    remap_table(ckpt, info, 5)
  a = remap_table(ckpt, info, 5, rng=jax.random.key(0))
  b = remap_table(ckpt, info, 5, rng=jax.random.key(0))
  c = remap_table(ckpt, info, 5, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[[0, 2]], old[[1, 2]])
  np.testing.assert_array_equal(c[[0, 2]], old[[1, 2]])
  new = a[[1, 3, 4]]
  assert not np.array_equal(new, c[[1, 3, 4]])
  assert np.all(new != 0) and np.all(np.abs(new) < 0.2)
  assert len(np.unique(new)) == new.size


def test_shape_dependent_initializers(table):
  ckpt, old = table
  new_tokens, n_oov = ["t1", "new", "t2", "new2"], 3
  info = fws.VocabInfo(new_tokens, 4, n_oov, OLD_TOKENS, backup_initializer=jax.nn.initializers.constant(0.3))
  assert_rows(remap_table(ckpt, info, 7), old, [1, -1, 2, -1, -1, -1, -1], np.float32(0.3))

  info = fws.VocabInfo(new_tokens, 4, n_oov, OLD_TOKENS, backup_initializer=jax.nn.initializers.glorot_uniform())
  out = remap_table(ckpt, info, 7, rng=jax.random.key(0))
  np.testing.assert_array_equal(out[[0, 2]], old[[1, 2]])
  # Called as TensorFlow calls it: [cells, 1] for the new tokens, then the OOV block.
  cells = 2 * 4
  assert np.all(np.abs(out[[1, 3]]) <= np.sqrt(6 / (cells + 1)))
  assert np.all(np.abs(out[4:]) <= np.sqrt(6 / (n_oov + 4)))
  assert len(np.unique(out[[1, 3, 4, 5, 6]])) == 5 * 4


# 4. Statistics.


def test_statistics_in_plan_and_log(trained, caplog):
  _, ckpt, _ = trained("adam")
  new_vocab = ["<pad>", "d", "b", "z", "a", "y", "w", "x"]
  live = train(len(new_vocab) + 2, optax.adam(1e-2), seed=2, steps=0)
  info = fws.VocabInfo(
    new_vocab,
    len(new_vocab),
    2,
    OLD_VOCAB,
    donor_tokens={"y": "c"},
    token_vectors={"w": np.ones(4, np.float32)},
  )
  settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMBED: info})
  row = next(leaf for leaf in fws.plan(live, settings).leaves if leaf.name == EMBED)
  # copied: <pad> d b a; donated: y; explicit: w; new: z x; OOV: 2; dropped: e.
  expected = {"copied": 4, "donated": 1, "explicit": 1, "new": 2, "oov": 2, "dropped": 1}
  assert row.remap.mapping.stats() == expected
  assert row.remap.mapping.index.tolist() == [0, 4, 2, -1, 1, 3, -1, -1, -1, -1]

  with caplog.at_level(logging.INFO, logger="flax_warmstart"):
    fws.warm_start(live, settings)
  messages = [r.getMessage() for r in caplog.records if r.name == "flax_warmstart" and r.levelno >= logging.INFO]
  logged = [m for m in messages if EMBED in m and "copied" in m]
  assert logged, f"no INFO record with the statistics of {EMBED}: {messages}"
  for key, n in expected.items():
    assert re.search(rf"\b{n}\s+{key}\b|\b{key}\W+{n}\b", logged[0]), (key, n, logged[0])


# 5. Sharding on the 8-device CPU mesh.


def test_sharded_remap_matches_unsharded(tmp_path, mesh, monkeypatch):
  rng = np.random.default_rng(1)
  old = {
    "embedder": {"embedding": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
  }
  ckpt = save_checkpoint(tmp_path / "ckpt", old)
  new_vocab = ["<pad>", "d", "b", "z", "a", "y", "c"]  # + 1 OOV = 8
  settings = fws.WarmStartSettings(
    ckpt,
    var_name_to_vocab_info={
      EMBED: fws.VocabInfo(new_vocab, 7, 1, OLD_VOCAB, backup_initializer=jax.nn.initializers.normal(0.02)),
      "head/kernel": fws.VocabInfo(new_vocab, 7, 1, OLD_VOCAB, backup_initializer=fws.MeanOfOldRows(), axis=1),
    },
  )
  shardings = {
    EMBED: NamedSharding(mesh, P("a", "b")),
    "head/kernel": NamedSharding(mesh, P(None, "b")),
  }
  plain = {"embedder": {"embedding": jnp.zeros((8, 8))}, "head": {"kernel": jnp.zeros((8, 8))}}
  sharded = {
    "embedder": {"embedding": jax.device_put(plain["embedder"]["embedding"], shardings[EMBED])},
    "head": {"kernel": jax.device_put(plain["head"]["kernel"], shardings["head/kernel"])},
  }
  ref = fws.warm_start(plain, settings, rng=jax.random.key(0))
  restored = {}
  real_restore = checkpoint_lib.restore

  def spy(checkpoint, targets):
    restored.update(real_restore(checkpoint, targets))
    return restored

  monkeypatch.setattr(checkpoint_lib, "restore", spy)
  out = fws.warm_start(sharded, settings, rng=jax.random.key(0))
  # The embedding was read shard by shard (each device's kept rows of its columns), never restored whole.
  assert EMBED not in restored
  # The head's new columns are the mean of the old ones (MeanOfOldRows): its old table was read sharded off
  # its vocabulary axis, so no device holds a whole table.
  for name, axis in (("head/kernel", 1),):
    table = restored[name]
    assert isinstance(table, jax.Array) and len(table.addressable_shards) == 8, name
    for shard in table.addressable_shards:
      assert shard.data.shape[axis] == table.shape[axis] and shard.data.size < table.size, (name, shard.data.shape)
  for name, (a, b) in {
    EMBED: (out["embedder"]["embedding"], ref["embedder"]["embedding"]),
    "head/kernel": (out["head"]["kernel"], ref["head"]["kernel"]),
  }.items():
    assert a.sharding == shardings[name], (name, a.sharding)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  kernel, old_kernel = np.asarray(out["head"]["kernel"]), np.asarray(old["head"]["kernel"])
  index = np.array([0, 4, 2, -1, 1, -1, 3, -1])
  np.testing.assert_array_equal(kernel[:, index >= 0], old_kernel[:, index[index >= 0]])
  mean = np.broadcast_to(old_kernel.mean(axis=1, keepdims=True), (8, 3))
  np.testing.assert_allclose(kernel[:, index < 0], mean, rtol=1e-6)  # float32 sums in XLA's order


# 6. dtypes and ranks.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_from_float32(table, dtype):
  ckpt, old = table
  info = fws.VocabInfo(["t3", "new", "t0"], 3, 1, OLD_TOKENS, backup_initializer=jax.nn.initializers.constant(0.5))
  out = remap_table(ckpt, info, 4, dtype=dtype)
  assert out.dtype == jnp.dtype(dtype)
  assert_rows(out, old.astype(dtype), [3, -1, 0, -1], 0.5)

  info = fws.VocabInfo(["t3", "new"], 2, 0, OLD_TOKENS, backup_initializer=fws.MeanOfOldRows())
  out = remap_table(ckpt, info, 2, dtype=dtype)
  np.testing.assert_array_equal(out[1], old.astype(dtype).astype(np.float32).mean(0).astype(dtype))


def test_rank1_bias_and_rank3_variable(tmp_path):
  rng = np.random.default_rng(2)
  old = {
    "out": {"bias": jnp.asarray(rng.normal(size=(6,)), jnp.float32)},
    "cube": {"w": jnp.asarray(rng.normal(size=(6, 2, 3)), jnp.float32)},
  }
  ckpt = save_checkpoint(tmp_path / "ckpt", old)
  new_vocab = ["e", "z", "a", "q"]  # + 1 OOV
  cube_vec = np.arange(6, dtype=np.float32).reshape(2, 3)
  settings = fws.WarmStartSettings(
    ckpt,
    var_name_to_vocab_info={
      "out/bias": fws.VocabInfo(
        new_vocab, 4, 1, OLD_VOCAB, backup_initializer=jax.nn.initializers.constant(0.5), token_vectors={"q": 2.5}
      ),
      "cube/w": fws.VocabInfo(
        new_vocab, 4, 1, OLD_VOCAB, backup_initializer=jax.nn.initializers.constant(0.5), token_vectors={"q": cube_vec}
      ),
    },
  )
  live = {"out": {"bias": jnp.zeros((5,))}, "cube": {"w": jnp.zeros((5, 2, 3))}}
  out = fws.warm_start(live, settings)
  bias, cube = np.asarray(out["out"]["bias"]), np.asarray(out["cube"]["w"])
  assert bias.shape == (5,) and cube.shape == (5, 2, 3)
  assert_rows(bias[[0, 1, 2, 4]], old["out"]["bias"], [5, -1, 1, -1], 0.5)
  assert bias[3] == 2.5
  assert_rows(cube[[0, 1, 2, 4]], old["cube"]["w"], [5, -1, 1, -1], 0.5)
  np.testing.assert_array_equal(cube[3], cube_vec)


# 7. Vocabulary sources.


def test_token_lists_files_and_crlf_agree(tmp_path, table):
  ckpt, old = table
  new_tokens = ["t3", "new", "t0", "t7"]
  files = {}
  for name, tokens, sep in [("old", OLD_TOKENS, "\n"), ("new", new_tokens, "\n"), ("new_crlf", new_tokens, "\r\n")]:
    path = tmp_path / f"{name}.txt"
    path.write_bytes((sep.join(tokens) + sep).encode())
    files[name] = path
  old_crlf = tmp_path / "old_crlf.txt"
  old_crlf.write_bytes(("\r\n".join(OLD_TOKENS) + "\r\n").encode())
  assert vocab_lib.read_vocab(str(files["new_crlf"])) == new_tokens
  assert vocab_lib.read_vocab(old_crlf) == OLD_TOKENS

  init = jax.nn.initializers.constant(0.5)
  results = [
    remap_table(ckpt, fws.VocabInfo(new, 4, 1, old_src, backup_initializer=init), 5)
    for new, old_src in [
      (new_tokens, OLD_TOKENS),
      (str(files["new"]), str(files["old"])),
      (files["new"], files["old"]),  # os.PathLike
      (str(files["new_crlf"]), str(old_crlf)),
      (new_tokens, str(old_crlf)),
    ]
  ]
  assert_rows(results[0], old, [3, -1, 0, 7, -1], 0.5)
  for other in results[1:]:
    np.testing.assert_array_equal(other, results[0])
