"""Model surgery through rename rules (`flax_warmstart._src.surgery`, executed by `chain.py`).

Real Flax models (Linen `nn.scan`, NNX `nnx.scan`) against their unrolled
twins in both directions, a tied GPT-2-like head into an untied one, a dense
MLP upcycled into experts, depth growth, each with Adam slots, written by
Orbax into `tmp_path` and read back through the public API.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import rows, save_checkpoint
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws
from flax_warmstart._src import chain
from flax_warmstart._src.serialize import settings_from_dict, settings_to_dict

D, H, N = 4, 6, 3
X = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)


class Block(nn.Module):
  """x + down(tanh(up(x))): a residual MLP layer."""

  @nn.compact
  def __call__(self, x, _=None):
    return x + nn.Dense(D, name="down")(jnp.tanh(nn.Dense(H, name="up")(x))), None


class Scanned(nn.Module):
  """N `Block`s under `nn.scan`: params `layers/up/kernel` of shape (N, D, H) (or (D, N, H) with axis 1)."""

  n: int = N
  axis: int = 0

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=self.n)
    return stack(name="layers")(x, None)[0]


class Unrolled(nn.Module):
  """The same N layers as `layers_0` ... `layers_{N-1}`."""

  n: int = N

  @nn.compact
  def __call__(self, x):
    for i in range(self.n):
      x = Block(name=f"layers_{i}")(x)[0]
    return x


def trained(model, steps=2, seed=0):
  """A TrainState of `model` with Adam after `steps` updates (non-zero slots)."""
  params = model.init(jax.random.key(seed), X)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: jnp.mean(state.apply_fn({"params": p}, X) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  for _ in range(steps):
    state = step(state)
  return state


def fresh(model, seed=1):
  params = model.init(jax.random.key(seed), X)["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


UNSTACK = [(r"layers_(\d+)/(.*)", fws.Take(r"layers/\2", axis=0, index=r"\1"))]
STACK = [(r"layers/(.*)", fws.Stack(r"layers_{i}/\1", axis=0))]


@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
  state = trained(Scanned())
  return state, save_checkpoint(tmp_path_factory.mktemp("scanned") / "ckpt", state)


@pytest.fixture(scope="module")
def unrolled_run(tmp_path_factory):
  state = trained(Unrolled(), seed=3)
  return state, save_checkpoint(tmp_path_factory.mktemp("unrolled") / "ckpt", state)


def test_scanned_to_unrolled_forward_and_adam_slots(scanned_run):
  old, path = scanned_run
  new = fresh(Unrolled())
  settings = fws.WarmStartSettings(path, vars_to_warm_start=".*", rename_rules=UNSTACK, optimizer_state="load")
  out = fws.warm_start(new, settings)
  np.testing.assert_array_equal(out.apply_fn({"params": out.params}, X), old.apply_fn({"params": old.params}, X))
  mu_old, mu_new = old.opt_state[0].mu, out.opt_state[0].mu
  for i in range(N):
    np.testing.assert_array_equal(out.params[f"layers_{i}"]["up"]["kernel"], old.params["layers"]["up"]["kernel"][i])
    np.testing.assert_array_equal(mu_new[f"layers_{i}"]["down"]["bias"], mu_old["layers"]["down"]["bias"][i])
    np.testing.assert_array_equal(
      out.opt_state[0].nu[f"layers_{i}"]["up"]["kernel"], old.opt_state[0].nu["layers"]["up"]["kernel"][i]
    )


def test_unstacking_reads_only_each_layer(scanned_run):
  _, path = scanned_run
  plan = fws.plan(fresh(Unrolled()), path, fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK))
  row = rows(plan)["layers_1/up/kernel"]
  assert row.inputs == ("layers/up/kernel",)
  assert row.nbytes == D * H * 4  # one layer of the (N, D, H) float32 stack
  assert plan.nbytes == sum(x.size * 4 for x in jax.tree_util.tree_leaves(fresh(Scanned()).params))
  assert "layers/up/kernel[1, :, :] (4, 6)" in row.chain()
  assert "layers/up/kernel[1, :, :]" in str(plan)
  assert rows(plan)["layers_1/up/kernel"].reason == "selected, transformed by rename_rules[0]"


def test_unrolled_to_scanned_forward_and_adam_slots(unrolled_run):
  old, path = unrolled_run
  new = fresh(Scanned())
  settings = fws.WarmStartSettings(path, vars_to_warm_start=".*", rename_rules=STACK, optimizer_state="load")
  out = fws.warm_start(new, settings)
  np.testing.assert_array_equal(out.apply_fn({"params": out.params}, X), old.apply_fn({"params": old.params}, X))
  np.testing.assert_array_equal(
    out.opt_state[0].mu["layers"]["up"]["kernel"],
    np.stack([old.opt_state[0].mu[f"layers_{i}"]["up"]["kernel"] for i in range(N)]),
  )
  row = rows(fws.plan(new, path, settings))["layers/up/kernel"]
  assert row.inputs == tuple(f"layers_{i}/up/kernel" for i in range(N))
  assert row.chain().startswith("stack(axis=0) of 3 [layers_0/up/kernel (4, 6) ... layers_2/up/kernel] -> (3, 4, 6)")


def test_round_trip_scanned_unrolled_scanned(scanned_run, tmp_path):
  old, path = scanned_run
  unrolled = fws.warm_start(fresh(Unrolled()), fws.WarmStartSettings(path, [".*"], rename_rules=UNSTACK))
  back_path = save_checkpoint(tmp_path / "unrolled", unrolled)
  back = fws.warm_start(fresh(Scanned()), fws.WarmStartSettings(back_path, [".*"], rename_rules=STACK))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, old.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back.opt_state, old.opt_state)


def test_param_scan_axis_1(tmp_path):
  old = trained(Scanned(axis=1))
  assert old.params["layers"]["up"]["kernel"].shape == (D, N, H)
  path = save_checkpoint(tmp_path / "ckpt", old)
  rules = [(r"layers_(\d+)/(.*)", fws.Take(r"layers/\2", axis=1, index=r"\1"))]
  out = fws.warm_start(fresh(Unrolled()), fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  np.testing.assert_allclose(
    out.apply_fn({"params": out.params}, X), old.apply_fn({"params": old.params}, X), rtol=1e-6
  )
  back_path = save_checkpoint(tmp_path / "unrolled", out)
  stack = [(r"layers/(.*)", fws.Stack(r"layers_{i}/\1", axis=1))]
  back = fws.warm_start(fresh(Scanned(axis=1)), fws.WarmStartSettings(back_path, [".*"], rename_rules=stack))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, old.params)


def test_depth_growth_each_layer_twice_new_slots_zero(scanned_run):
  old, path = scanned_run
  rules = [(r"layers/(.*)", fws.Take(r"layers/\1", axis=0, index=[0, 0, 1, 1, 2, 2]))]
  out = fws.warm_start(fresh(Scanned(n=2 * N)), fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  kernel = out.params["layers"]["up"]["kernel"]
  np.testing.assert_array_equal(kernel, np.repeat(old.params["layers"]["up"]["kernel"], 2, axis=0))
  mu = out.opt_state[0].mu["layers"]["up"]["kernel"]
  for k, i in enumerate([0, 0, 1, 1, 2, 2]):  # the first copy of a layer keeps its slot; the new copy starts at 0
    expected = old.opt_state[0].mu["layers"]["up"]["kernel"][i] if k % 2 == 0 else 0
    np.testing.assert_array_equal(mu[k], np.broadcast_to(expected, mu[k].shape))
  copy = [(r"layers/(.*)", fws.Take(r"layers/\1", axis=0, index=[0, 0, 1, 1, 2, 2], slots="copy"))]
  out = fws.warm_start(fresh(Scanned(n=2 * N)), fws.WarmStartSettings(path, [".*"], rename_rules=copy))
  np.testing.assert_array_equal(
    out.opt_state[0].mu["layers"]["up"]["kernel"], np.repeat(old.opt_state[0].mu["layers"]["up"]["kernel"], 2, axis=0)
  )


def test_depth_growth_stack_repeated_from_unrolled(unrolled_run):
  """A 2N-layer scanned model from N unrolled layers, the old stack repeated: Stack of Takes is not needed, Take of Stack is."""
  old, path = unrolled_run
  rules = [(r"layers/(.*)", fws.Take(fws.Stack(r"layers_{i}/\1", num=N), axis=0, index=[0, 1, 2, 0, 1, 2]))]
  out = fws.warm_start(fresh(Scanned(n=2 * N)), fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  for k in range(2 * N):
    np.testing.assert_array_equal(
      out.params["layers"]["down"]["kernel"][k], old.params[f"layers_{k % N}"]["down"]["kernel"]
    )


# -- execution: each stacked tensor decoded once -----------------------------------------------------------------------


def _decodes(monkeypatch):
  """Counts, per stored chunk key, how often `chain` streams it; makes a TensorStore slice read fail."""
  from flax_warmstart._src import chain, hostread

  counts: dict[str, int] = {}
  decoded = hostread.decoded_stream

  def counting(chunk, *args, **kwargs):
    key = chunk.kvstore.path + chunk.key
    counts[key] = counts.get(key, 0) + 1
    return decoded(chunk, *args, **kwargs)

  def no_slice_read(store, index, out, label):
    raise AssertionError(f"{label} was read through TensorStore")

  monkeypatch.setattr(hostread, "decoded_stream", counting)
  monkeypatch.setattr(chain, "_read_into", no_slice_read)
  return counts


@pytest.mark.parametrize("axis", [0, 1])
def test_unstack_decodes_each_stacked_tensor_once_in_pieces(tmp_path, monkeypatch, axis):
  from flax_warmstart._src import chain

  stacked = np.arange(5 * 6 * 7, dtype=np.float32).reshape((5, 6, 7) if axis == 0 else (6, 5, 7))
  path = save_checkpoint(tmp_path / "ckpt", {"layers": {"k": stacked}})
  counts = _decodes(monkeypatch)
  monkeypatch.setattr(chain, "_PIECE_BYTES", 100)  # 100 bytes: a layer spans pieces, a piece spans layers (axis 0)
  live = {f"layers_{i}": {"k": jnp.zeros((6, 7))} for i in range(5)}
  rules = [(r"layers_(\d+)/(.*)", fws.Take(r"layers/\2", axis=axis, index=r"\1"))]
  out = fws.warm_start(live, fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  for i in range(5):
    np.testing.assert_array_equal(out[f"layers_{i}"]["k"], np.take(stacked, i, axis=axis))
  assert list(counts.values()) == [1]  # one stored chunk, decoded once for the five leaves


@pytest.mark.parametrize("piece", [8, 1 << 20])
def test_unstack_some_layers_skips_the_others(tmp_path, monkeypatch, piece):
  from flax_warmstart._src import chain

  stacked = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
  path = save_checkpoint(tmp_path / "ckpt", {"layers": {"k": stacked}})
  counts = _decodes(monkeypatch)
  monkeypatch.setattr(chain, "_PIECE_BYTES", piece)
  live = {"layers_3": {"k": jnp.zeros((3, 2))}, "layers_1": {"k": jnp.zeros((3, 2))}}  # layers 0, 2 and 4 are not
  out = fws.warm_start(live, fws.WarmStartSettings(path, [".*"], rename_rules=UNSTACK))
  np.testing.assert_array_equal(out["layers_1"]["k"], stacked[1])
  np.testing.assert_array_equal(out["layers_3"]["k"], stacked[3])
  assert list(counts.values()) == [1]


@pytest.mark.parametrize("axis", [0, 1])
def test_stack_streams_large_layers_into_their_slots(tmp_path, monkeypatch, axis):
  from flax_warmstart._src import chain

  layers = [np.full((64, 1024), i, np.float32) + np.arange(1024, dtype=np.float32) for i in range(3)]  # 256 KiB each
  path = save_checkpoint(tmp_path / "ckpt", {f"layers_{i}": {"k": x} for i, x in enumerate(layers)})
  counts = _decodes(monkeypatch)
  monkeypatch.setattr(chain, "_STREAM_BYTES", 1 << 16)  # these layers count as large
  shape = (3, 64, 1024) if axis == 0 else (64, 3, 1024)
  rules = [(r"layers/(.*)", fws.Stack(r"layers_{i}/\1", axis=axis))]
  abstract = {"layers": {"k": jax.ShapeDtypeStruct(shape, jnp.float32)}}
  out = fws.warm_start(abstract, fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  np.testing.assert_array_equal(out["layers"]["k"], np.stack(layers, axis=axis))
  assert sorted(counts.values()) == [1, 1, 1]


def test_unstack_from_a_chunk_that_is_not_stored(tmp_path, monkeypatch):
  """A chunk of only the fill value may not be stored: the slices are then read through TensorStore."""
  import dataclasses

  from flax_warmstart._src import chain

  stacked = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
  path = save_checkpoint(tmp_path / "ckpt", {"layers": {"k": stacked}})
  one_chunk = chain._one_chunk
  monkeypatch.setattr(chain, "_one_chunk", lambda store: dataclasses.replace(one_chunk(store), key="9.9.9"))
  live = {f"layers_{i}": {"k": jnp.ones((4, 2))} for i in range(3)}
  out = fws.warm_start(live, fws.WarmStartSettings(path, [".*"], rename_rules=UNSTACK))
  for i in range(3):
    np.testing.assert_array_equal(out[f"layers_{i}"]["k"], stacked[i])


def test_sliced_reads_fall_back_to_tensorstore_when_not_one_chunk(scanned_run, monkeypatch):
  """The reference path: with no streamable chunk, every slice is a TensorStore read; the same values."""
  from flax_warmstart._src import chain

  old, path = scanned_run
  settings = fws.WarmStartSettings(path, [".*"], rename_rules=UNSTACK)
  streamed = fws.warm_start(fresh(Unrolled()), settings)
  monkeypatch.setattr(chain, "_one_chunk", lambda store: None)
  reference = fws.warm_start(fresh(Unrolled()), settings)
  jax.tree_util.tree_map(np.testing.assert_array_equal, streamed.params, reference.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, streamed.opt_state, reference.opt_state)
  np.testing.assert_array_equal(streamed.params["layers_2"]["up"]["kernel"], old.params["layers"]["up"]["kernel"][2])


# -- tied embedding into an untied head -------------------------------------------------------------------------------

V = 11


class TiedLM(nn.Module):
  tied: bool = True

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(V, D, name="wte")
    h = Block(name="block")(wte(tokens))[0]
    return wte.attend(h) if self.tied else nn.Dense(V, use_bias=False, name="lm_head")(h)


def test_tied_embedding_into_untied_head_logits_equal(tmp_path):
  tokens = jnp.array([[1, 2, 3], [4, 5, 10]])
  tied = TiedLM(True)
  params = tied.init(jax.random.key(0), tokens)["params"]
  path = save_checkpoint(tmp_path / "ckpt", {"params": params})
  untied = TiedLM(False)
  live = {"params": untied.init(jax.random.key(1), tokens)["params"]}
  rules = [(r"lm_head/kernel", fws.Transpose("wte/embedding"))]
  out = fws.warm_start(live, fws.WarmStartSettings(path, ".*", rename_rules=rules))
  np.testing.assert_allclose(untied.apply(out, tokens), tied.apply({"params": params}, tokens), rtol=1e-6, atol=1e-6)
  # And back, untied -> tied, through an assignment map with the transform on the checkpoint side.
  back_path = save_checkpoint(tmp_path / "untied", out)
  target = {"params": tied.init(jax.random.key(2), tokens)["params"]}
  back = fws.init_from_checkpoint(
    target, back_path, {fws.Transpose("lm_head/kernel"): "wte/embedding", "block/": "block/"}
  )
  np.testing.assert_array_equal(back["params"]["wte"]["embedding"], params["wte"]["embedding"])


def test_pytorch_layout_and_heads_reshape(tmp_path):
  w = np.arange(24, dtype=np.float32).reshape(6, 4)  # PyTorch Linear weight [out, in]
  path = save_checkpoint(
    tmp_path / "ckpt", {"q_proj": {"weight": w}, "qkv": np.arange(48, dtype=np.float32).reshape(4, 12)}
  )
  live = {"query": {"kernel": jnp.zeros((4, 6))}, "heads": {"kernel": jnp.zeros((4, 3, 4))}}
  rules = [("query/kernel", fws.Transpose("q_proj/weight")), ("heads/kernel", fws.Reshape("qkv"))]
  out = fws.warm_start(live, fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  np.testing.assert_array_equal(out["query"]["kernel"], w.T)
  np.testing.assert_array_equal(out["heads"]["kernel"], np.arange(48, dtype=np.float32).reshape(4, 3, 4))
  # Nested, with explicit axes: heads merged back after a transpose.
  nested = [("query/kernel", fws.Reshape(fws.Transpose("qkv", axes=[0, 1]), shape=[4, 6])), ("heads/kernel", None)]
  with pytest.raises(fws.WarmStartError, match=r"cannot reshape \(4, 12\) \(48 entries\) into \(4, 6\)"):
    fws.plan(live, path, fws.WarmStartSettings(path, [".*"], rename_rules=nested))


# -- sparse upcycling ------------------------------------------------------------------------------------------------

E = 4


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Block(name="mlp")(x)[0]


class MoE(nn.Module):
  """E experts, each a `Block` (params with a leading expert axis), mixed by a router's softmax."""

  @nn.compact
  def __call__(self, x):
    experts = nn.vmap(
      Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0, axis_size=E
    )(name="experts")
    outs = experts(x, None)[0]  # (E, batch, D)
    gates = jax.nn.softmax(nn.Dense(E, name="router")(x), axis=-1)  # (batch, E)
    return jnp.einsum("ebd,be->bd", outs, gates)


def test_sparse_upcycling_experts_equal_dense_mlp(tmp_path):
  dense = trained(Dense())
  path = save_checkpoint(tmp_path / "ckpt", dense)
  moe = fresh(MoE())
  assert moe.params["experts"]["up"]["kernel"].shape == (E, D, H)
  rules = [(r"experts/(.*)", fws.Broadcast(r"mlp/\1", axis=0)), (r"router/.*", None)]
  settings = fws.WarmStartSettings(path, [".*"], rename_rules=rules)
  out = fws.warm_start(moe, settings)
  for e in range(E):
    np.testing.assert_array_equal(out.params["experts"]["up"]["kernel"][e], dense.params["mlp"]["up"]["kernel"])
  np.testing.assert_allclose(
    out.apply_fn({"params": out.params}, X), dense.apply_fn({"params": dense.params}, X), rtol=1e-5
  )
  np.testing.assert_array_equal(out.params["router"]["kernel"], moe.params["router"]["kernel"])  # fresh
  # The experts' Adam slots are new: zeros; the dense tensor is read once per leaf, not E times.
  assert not np.any(out.opt_state[0].mu["experts"]["up"]["kernel"])
  plan = fws.plan(moe, path, settings)
  assert rows(plan)["experts/up/kernel"].nbytes == D * H * 4
  assert rows(plan)["experts/up/kernel/opt_state/0/mu"].nbytes == 0
  copy = [(r"experts/(.*)", fws.Broadcast(r"mlp/\1", slots="copy")), (r"router/.*", None)]
  out = fws.warm_start(moe, fws.WarmStartSettings(path, [".*"], rename_rules=copy))
  for e in range(E):
    np.testing.assert_array_equal(
      out.opt_state[0].mu["experts"]["up"]["kernel"][e], dense.opt_state[0].mu["mlp"]["up"]["kernel"]
    )


def test_upcycling_with_noise_is_close_and_needs_rng(tmp_path):
  dense = trained(Dense())
  path = save_checkpoint(tmp_path / "ckpt", dense)
  rules = [(r"experts/(.*)", fws.Broadcast(r"mlp/\1", noise=0.01)), (r"router/.*", None)]
  settings = fws.WarmStartSettings(path, ".*", rename_rules=rules)
  with pytest.raises(fws.WarmStartError, match=r"Broadcast with noise.*pass rng=jax.random.key"):
    fws.warm_start(fresh(MoE()), settings)
  out = fws.warm_start(fresh(MoE()), settings, rng=jax.random.key(0))
  kernel, base = out.params["experts"]["up"]["kernel"], dense.params["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(kernel, np.broadcast_to(base, kernel.shape), rtol=0.06)
  assert not np.array_equal(kernel[0], kernel[1])  # independent per expert
  again = fws.warm_start(fresh(MoE()), settings, rng=jax.random.key(0))
  np.testing.assert_array_equal(again.params["experts"]["up"]["kernel"], kernel)  # reproducible


# -- NNX ---------------------------------------------------------------------------------------------------------------


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jnp.tanh(self.up(x)))


class NNXScanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=N)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NNXBlock(rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return layer(x)

    return body(self.layers, x)


class NNXUnrolled(nnx.Module):
  def __init__(self, rngs):
    for i in range(N):
      setattr(self, f"layers_{i}", NNXBlock(rngs))

  def __call__(self, x):
    for i in range(N):
      x = getattr(self, f"layers_{i}")(x)
    return x


def test_nnx_scan_to_unrolled_and_back(tmp_path):
  scanned = NNXScanned(nnx.Rngs(0))
  assert "layers/up/kernel" in fws.variable_names(scanned)
  path = save_checkpoint(tmp_path / "scanned", nnx.state(scanned, nnx.Param))
  unrolled = fws.warm_start(NNXUnrolled(nnx.Rngs(1)), fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK))
  np.testing.assert_allclose(unrolled(X), scanned(X), rtol=1e-6)
  back_path = save_checkpoint(tmp_path / "unrolled", nnx.state(unrolled, nnx.Param))
  back = fws.warm_start(NNXScanned(nnx.Rngs(2)), fws.WarmStartSettings(back_path, ".*", rename_rules=STACK))
  np.testing.assert_array_equal(back(X), scanned(X))


# -- sharded -----------------------------------------------------------------------------------------------------------


def test_sharded_unstack_stack_and_broadcast_on_the_mesh(tmp_path, mesh):
  stacked = np.arange(N * 8 * 12, dtype=np.float32).reshape(N, 8, 12)
  path = save_checkpoint(tmp_path / "ckpt", {"layers": {"k": stacked}, "mlp": {"k": stacked[0]}})
  spec = NamedSharding(mesh, P("a", "b"))
  live = {f"layers_{i}": {"k": jax.device_put(jnp.zeros((8, 12)), spec)} for i in range(N)}
  live["moe"] = {"k": jax.device_put(jnp.zeros((4, 8, 12)), NamedSharding(mesh, P(None, "a", "b")))}
  live["t"] = jax.device_put(jnp.zeros((12, 8)), NamedSharding(mesh, P("b", "a")))
  rules = UNSTACK + [(r"moe/(.*)", fws.Broadcast(r"mlp/\1")), ("t", fws.Transpose("mlp/k"))]
  out = fws.warm_start(live, fws.WarmStartSettings(path, [".*"], rename_rules=rules))
  for i in range(N):
    assert out[f"layers_{i}"]["k"].sharding == spec
    np.testing.assert_array_equal(out[f"layers_{i}"]["k"], stacked[i])
  assert out["moe"]["k"].sharding == live["moe"]["k"].sharding
  np.testing.assert_array_equal(out["moe"]["k"], np.broadcast_to(stacked[0], (4, 8, 12)))
  np.testing.assert_array_equal(out["t"], stacked[0].T)
  # Unrolled (sharded) -> stacked (sharded), from an abstract state with init_fn.
  unrolled_path = save_checkpoint(tmp_path / "unrolled", {k: v for k, v in out.items() if k.startswith("layers_")})
  abstract = {
    "layers": {"k": jax.ShapeDtypeStruct((N, 8, 12), jnp.float32, sharding=NamedSharding(mesh, P(None, "a", "b")))}
  }
  back = fws.warm_start(abstract, fws.WarmStartSettings(unrolled_path, [".*"], rename_rules=STACK))
  assert back["layers"]["k"].sharding == abstract["layers"]["k"].sharding
  np.testing.assert_array_equal(back["layers"]["k"], stacked)


def test_every_transform_shard_by_shard_equals_one_device(tmp_path, mesh):
  """Each shard's region mapped back through the tree gives what the whole leaf gives, noise included."""
  stacked = np.arange(N * 8 * 12, dtype=np.float32).reshape(N, 8, 12) / 7
  rules = [
    ("deeper", fws.Take("layers/k", index=[0, 0, 1, 2, 2, 1, 0, 2])),
    ("moe", fws.Broadcast("mlp/k", axis=1, num=4, noise=0.1)),
    ("heads", fws.Reshape("flat/k", shape=[12, 2, 4])),
    ("tstack", fws.Transpose(fws.Stack("layers_{i}/k", axis=2), axes=[1, 0, 2])),
    ("one", fws.Transpose(fws.Take("layers/k", index=2), axes=[1, 0])),
  ]
  path = save_checkpoint(
    tmp_path / "ckpt2",
    {"layers": {"k": stacked}, "mlp": {"k": stacked[1]}, "flat": {"k": stacked[2].reshape(96)}}
    | {f"layers_{i}": {"k": stacked[i]} for i in range(N)},
  )
  shapes = {"deeper": (8, 8, 12), "moe": (8, 4, 12), "heads": (12, 2, 4), "tstack": (12, 8, N), "one": (12, 8)}
  specs = {
    "deeper": P("a", None, "b"),
    "moe": P("b", "a"),
    "heads": P("b", "a"),
    "tstack": P("b", "a"),
    "one": P(None, "b"),
  }
  settings = fws.WarmStartSettings(path, ".*", rename_rules=rules)
  one = fws.warm_start({k: jnp.zeros(s) for k, s in shapes.items()}, settings, rng=jax.random.key(5))
  live = {k: jax.device_put(jnp.zeros(s), NamedSharding(mesh, specs[k])) for k, s in shapes.items()}
  out = fws.warm_start(live, settings, rng=jax.random.key(5))
  for k in shapes:
    assert out[k].sharding == live[k].sharding, k
    np.testing.assert_array_equal(out[k], one[k], err_msg=k)
  np.testing.assert_array_equal(one["deeper"], stacked[[0, 0, 1, 2, 2, 1, 0, 2]])
  np.testing.assert_array_equal(one["heads"], stacked[2].reshape(12, 2, 4))
  np.testing.assert_array_equal(one["tstack"], np.stack(list(stacked), axis=2).transpose(1, 0, 2))
  np.testing.assert_array_equal(one["one"], stacked[2].T)
  assert not np.array_equal(one["moe"][:, 0], one["moe"][:, 1])  # each expert's own noise
  np.testing.assert_allclose(one["moe"].mean(axis=1), stacked[1], rtol=0.5)


def test_sharded_unstack_from_a_flax_msgpack_file(tmp_path, mesh):
  """A Flax msgpack file's arrays are numpy arrays, not TensorStores: each shard's box is sliced out of them."""
  from flax import serialization

  stacked = np.arange(N * 8 * 12, dtype=np.float32).reshape(N, 8, 12)
  path = tmp_path / "ckpt.msgpack"
  path.write_bytes(serialization.msgpack_serialize({"layers": {"k": stacked}}))
  spec = NamedSharding(mesh, P("a", "b"))
  live = {f"layers_{i}": {"k": jax.device_put(jnp.zeros((8, 12)), spec)} for i in range(N)}
  out = fws.warm_start(live, fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK))
  for i in range(N):
    assert out[f"layers_{i}"]["k"].sharding == spec
    np.testing.assert_array_equal(out[f"layers_{i}"]["k"], stacked[i])


def test_a_sharded_reshape_reads_its_input_once(tmp_path, mesh, monkeypatch):
  """A Reshape cannot map a shard back to a box of its input: the input is read and held once for all the shards."""
  flat = np.arange(12 * 8, dtype=np.float32)
  path = save_checkpoint(tmp_path / "ckpt", {"flat": flat})
  reads = []
  read_into = chain._read_into
  monkeypatch.setattr(
    chain,
    "_read_into",
    lambda store, index, out, label: (reads.append(out.shape), read_into(store, index, out, label))[1],
  )
  live = {"heads": jax.device_put(jnp.zeros((12, 2, 4)), NamedSharding(mesh, P("b", "a")))}
  out = fws.warm_start(live, fws.WarmStartSettings(path, ".*", rename_rules=[("heads", fws.Reshape("flat"))]))
  assert out["heads"].sharding == live["heads"].sharding
  np.testing.assert_array_equal(out["heads"], flat.reshape(12, 2, 4))
  assert reads == [(96,)], reads  # 8 shards, one read


def test_broadcast_noise_of_a_window_is_that_window_of_the_whole():
  """A shard draws only the noise blocks its rows fall in; every window gets the whole tensor's numbers."""
  key, shape = jax.random.key(3), (600, 5)
  whole = chain._noise(key, shape, ())
  assert whole.shape == shape and 0.9 < whole.std() < 1.1
  for lines, cols in [((0, 600), (0, 5)), ((250, 520), (1, 4)), ((256, 512), (0, 5)), ((599, 600), (2, 3))]:
    window = (slice(*lines), slice(*cols))
    np.testing.assert_array_equal(chain._noise(key, shape, window), whole[window])
  assert chain._noise(key, (), ()).shape == ()


def _rchar():
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_sharded_stack_unstacked_on_the_mesh_reads_each_chunk_once(tmp_path, mesh, monkeypatch):
  """A scanned stack saved from the mesh (each chunk holds every layer of a shard) into sharded unrolled layers:
  each stored chunk is decoded once for all the layers' shards, as Orbax's own restore reads it, not once per layer
  and shard (TensorStore decodes whole chunks; its cache hides the repeated reads from the byte count, not the
  decoding)."""
  decoded = []
  copy_chunk = chain._copy_chunk
  monkeypatch.setattr(
    chain, "_copy_chunk", lambda store, box, targets: (decoded.append(box), copy_chunk(store, box, targets))
  )
  n, rows, cols = 6, 256, 512
  stacked = np.random.default_rng(0).normal(size=(n, rows, cols)).astype(np.float32)
  saved = jax.device_put(stacked, NamedSharding(mesh, P(None, "a", "b")))
  path = save_checkpoint(tmp_path / "ckpt", {"layers": {"k": saved}})
  layer = NamedSharding(mesh, P("a", "b"))
  abstract = {f"layers_{i}": {"k": jax.ShapeDtypeStruct((rows, cols), jnp.float32, sharding=layer)} for i in range(n)}
  settings = fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK)
  fws.plan(abstract, settings)  # metadata read and cached outside the measured call
  before = _rchar()
  out = fws.warm_start(abstract, settings, show_progress=False)
  read = _rchar() - before
  for i in range(n):
    assert out[f"layers_{i}"]["k"].sharding == layer
    np.testing.assert_array_equal(out[f"layers_{i}"]["k"], stacked[i])
  # The 8 shards' chunks, each decoded once, each for the n layers of its shard.
  assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 8, decoded
  assert all(box[0] == (0, n) for box in decoded), decoded
  assert read < 1.25 * stacked.nbytes, (read, stacked.nbytes)  # random floats: zstd keeps them near their size


# -- settings files, Gin-like data, casts ------------------------------------------------------------------------------


def test_transforms_round_trip_through_json_and_yaml(scanned_run):
  _, path = scanned_run
  rules = [
    (r"layers_(\d+)/(.*)", fws.Take(r"layers/\2", axis=0, index=r"\1")),
    (r"a/(.*)", fws.Stack(r"b_{i}/\1", axis=1, num=4)),
    ("c", fws.Transpose(fws.Take("d", index=[0, 0, 1], slots="copy"), axes=[1, 0])),
    ("e", fws.Reshape("f", shape=[2, -1])),
    (r"g/(.*)", fws.Broadcast(r"h/\1", axis=1, noise=0.5, slots="copy")),
  ]
  settings = fws.WarmStartSettings(path, rename_rules=rules)
  data = settings_to_dict(settings)
  assert data["rename_rules"][2] == [
    "c",
    {"transpose": {"source": {"take": {"source": "d", "index": [0, 0, 1], "slots": "copy"}}, "axes": [1, 0]}},
  ]
  assert settings_from_dict(json.loads(json.dumps(data))) == settings
  assert settings_from_dict(yaml.safe_load(yaml.safe_dump(data))) == settings
  text = """
ckpt_to_initialize_from: /runs/old
rename_rules:
  - ['layers_(\\d+)/(.*)', {take: {source: 'layers/\\2', index: '\\1'}}]
  - ['lm_head/kernel', {transpose: wte/embedding}]
"""
  loaded = settings_from_dict(yaml.safe_load(text))
  assert loaded.rename_rules[0][1] == fws.Take(r"layers/\2", axis=0, index=r"\1")
  assert loaded.rename_rules[1][1] == fws.Transpose("wte/embedding")


def test_unstack_with_a_cast(scanned_run):
  old, path = scanned_run
  new = fresh(Unrolled())
  new = new.replace(params=jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), new.params))
  out = fws.warm_start(new, fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK))
  assert out.params["layers_2"]["up"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    out.params["layers_2"]["up"]["kernel"], old.params["layers"]["up"]["kernel"][2].astype(jnp.bfloat16)
  )


# -- errors: before any read, naming the rule and both shapes -----------------------------------------------------------


def test_index_past_the_stack(scanned_run, no_reads):
  _, path = scanned_run
  with pytest.raises(fws.WarmStartError) as err:
    fws.plan(fresh(Unrolled(n=N + 1)), path, fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK))
  message = str(err.value)
  assert (
    "rename_rules[0] for 'layers_3/up/kernel': take(axis=0, index='3'): index 3 is past the 3 entries of axis 0"
    in message
  )
  assert "'layers/up/kernel' (3, 4, 6)" in message


def test_stack_missing_a_layer(unrolled_run, no_reads):
  _, path = unrolled_run
  with pytest.raises(
    fws.WarmStartError,
    match=r"stack\(axis=0\) of 4 needs every layer, but 1 cannot be read \(i = 3\): no tensor 'layers_3/up/kernel'",
  ):
    fws.plan(fresh(Scanned(n=N + 1)), path, fws.WarmStartSettings(path, ".*", rename_rules=STACK))


def test_transpose_that_does_not_give_the_live_shape(tmp_path, no_reads):
  path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros((3, 4, 5), np.float32)})
  live = {"v": jnp.zeros((5, 3, 4))}
  with pytest.raises(fws.WarmStartError) as err:
    fws.plan(live, path, fws.WarmStartSettings(path, [".*"], rename_rules=[("v", fws.Transpose("w"))]))
  message = str(err.value)
  assert (
    "rename_rules[0] for 'v': w (3, 4, 5) -> transpose(2, 1, 0) (5, 4, 3) gives shape (5, 4, 3), but 'v' has shape (5, 3, 4)"
    in message
  )
  assert "fws.Transpose('w', axes=[2, 0, 1])" in message


@pytest.mark.parametrize(
  ("saved", "live", "hint"),
  [
    ((24, 4, 6), (4, 6), r"stacked over 24 layers along axis 0: load one with fws.Take\('x', axis=0"),
    ((4, 24, 6), (4, 6), r"stacked over 24 layers along axis 1"),
    ((6, 4), (4, 6), r"looks transposed: fws.Transpose\('x'\)"),
    ((4, 6), (4, 2, 3), r"same number of entries: fws.Reshape\('x'\)"),
    ((4, 6), (8, 4, 6), r"one more axis \(8 at axis 0\): fws.Broadcast\('x', axis=0\)"),
    ((4, 6), (8, 6), r"give it a VocabInfo if its rows are a vocabulary, or fws.Take\('x', axis=0, index=\[...\]\)"),
  ],
)
def test_shape_mismatch_suggests_the_transform(tmp_path, no_reads, saved, live, hint):
  path = save_checkpoint(tmp_path / "ckpt", {"x": np.zeros(saved, np.float32)})
  with pytest.raises(fws.WarmStartError, match=hint):
    fws.plan({"x": jnp.zeros(live)}, path, fws.WarmStartSettings(path, [".*"]))


def test_invalid_transforms_fail_at_construction():
  with pytest.raises(fws.WarmStartError, match=r"Take.index must be an int"):
    fws.Take("x", index=1.5)
  with pytest.raises(fws.WarmStartError, match=r"has no '\{i\}' in its template"):
    fws.Stack("layers_0/x")
  with pytest.raises(fws.WarmStartError, match=r"permutation of 0..1"):
    fws.Transpose("x", axes=[0, 0])
  with pytest.raises(fws.WarmStartError, match=r"noise must be a number >= 0"):
    fws.Broadcast("x", noise=-1)
  with pytest.raises(fws.WarmStartError, match=r"slots must be one of \['zeros', 'copy'\]"):
    fws.Broadcast("x", slots="keep")
  with pytest.raises(
    fws.WarmStartError, match=r"rename_rules\[0\]: unknown transform 'transposed'. Closest names: 'transpose'"
  ):
    fws.WarmStartSettings("/x", rename_rules=[("a", {"transposed": "b"})])
  with pytest.raises(fws.WarmStartError, match=r"template 'old/\\\\2' does not fit regex"):
    fws.WarmStartSettings("/x", rename_rules=[(r"new/(.*)", fws.Transpose(r"old/\2"))])


def test_transform_and_vocab_info_on_one_leaf_is_an_error(tmp_path, no_reads):
  path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros((4, 3), np.float32)})
  vocab = fws.VocabInfo(["a", "b", "c"], 3, 0, ["a", "b", "c", "d"])
  settings = fws.WarmStartSettings(
    path, [".*"], var_name_to_vocab_info={"v": vocab}, rename_rules=[("v", fws.Transpose("w"))]
  )
  with pytest.raises(
    fws.WarmStartError, match=r"cannot also load through transpose; remap its vocabulary or transform it"
  ):
    fws.plan({"v": jnp.zeros((3, 4))}, path, settings)


def test_plan_json_and_provenance_carry_the_chain(scanned_run):
  _, path = scanned_run
  plan = fws.plan(fresh(Unrolled()), path, fws.WarmStartSettings(path, ".*", rename_rules=UNSTACK))
  leaf = next(x for x in plan.to_dict()["leaves"] if x["name"] == "layers_2/down/bias")
  assert leaf["inputs"] == ["layers/down/bias"] and leaf["chain"] == "layers/down/bias[2, :] (4,)"
  assert leaf["bytes"] == D * 4
  record = plan.provenance()
  assert record["settings"][0]["rename_rules"][0][1] == {"take": {"source": r"layers/\2", "index": r"\1"}}
  json.dumps(record)
  unstack = fws.plan(fresh(Scanned()), path, fws.WarmStartSettings(path, ".*"))
  assert plan.unused_tensors() == unstack.unused_tensors()  # the slots (a str regex selects params only)
  assert not [name for name in plan.unused_tensors()[path] if name.startswith("layers/") and "opt_state" not in name]


def test_t5x_hook_unstacks_from_the_in_memory_state_dict():
  """The T5X state transformation's source has no lazily readable arrays: tensors are restored whole, once."""
  from flax_warmstart import t5x

  stacked = np.arange(N * 2 * 3, dtype=np.float32).reshape(N, 2, 3)
  ckpt = {"target": {"layers": {"k": stacked}}, "state": {"step": np.array(7)}}
  target = {
    "target": {f"layers_{i}": {"k": np.zeros((2, 3), np.float32)} for i in range(N)},
    "state": {"step": np.array(0)},
  }
  fn = t5x.state_transformation(fws.WarmStartSettings("gs://bucket/old", vars_to_warm_start=".*", rename_rules=UNSTACK))
  out = fn(ckpt, target)
  for i in range(N):
    np.testing.assert_array_equal(out["target"][f"layers_{i}"]["k"], stacked[i])


def test_gin_configures_transforms_and_warm_starts(scanned_run):
  gin = pytest.importorskip("gin")
  import flax_warmstart.gin  # noqa: F401 (registers the configurables)

  old, path = scanned_run
  gin.clear_config()
  try:
    gin.parse_config(
      f"""
flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = "{path}"
flax_warmstart.WarmStartSettings.vars_to_warm_start = [".*"]
flax_warmstart.WarmStartSettings.rename_rules = [
  (r"layers_(\\d+)/up/(.*)", @unstack/flax_warmstart.Take()),
  (r"layers_(\\d+)/down/(.*)", {{"take": {{"source": r"layers/down/\\2", "index": r"\\1"}}}}),
]
unstack/flax_warmstart.Take.source = r"layers/up/\\2"
unstack/flax_warmstart.Take.index = r"\\1"
"""
    )
    settings = gin.get_configurable("flax_warmstart.WarmStartSettings")()
  finally:
    gin.clear_config()
  assert settings.rename_rules[0][1] == fws.Take(r"layers/up/\2", axis=0, index=r"\1")
  out = fws.warm_start(fresh(Unrolled()), settings)
  np.testing.assert_array_equal(out.apply_fn({"params": out.params}, X), old.apply_fn({"params": old.params}, X))


def test_command_line_runs_a_settings_file_with_transforms(scanned_run, tmp_path):
  from conftest import run_cli

  old, path = scanned_run
  new_path = save_checkpoint(tmp_path / "new", fresh(Unrolled()))
  settings = tmp_path / "surgery.yaml"
  settings.write_text(
    "vars_to_warm_start: ['.*']\n"
    "rename_rules:\n"
    "  - ['layers_(\\d+)/(.*)', {take: {source: 'layers/\\2', index: '\\1'}}]\n"
  )
  shown = run_cli("plan", path, new_path, "--settings", settings)
  assert shown.returncode == 0, shown.stderr
  assert "layers/up/kernel[2, :, :] (4, 6)" in shown.stdout
  done = run_cli("run", path, new_path, tmp_path / "out", "--settings", settings)
  assert done.returncode == 0, done.stderr
  restored = fws.warm_start(fresh(Unrolled()), fws.WarmStartSettings(tmp_path / "out", [".*"]))
  np.testing.assert_array_equal(restored.params["layers_2"]["up"]["kernel"], old.params["layers"]["up"]["kernel"][2])
