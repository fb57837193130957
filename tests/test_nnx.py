"""Flax NNX as a first-class state, and every kind of leaf a training state holds (issue 12).

Real NNX modules (with `nnx.Dropout`, which keeps an RNG stream, and
`nnx.List` layers), real `nnx.Optimizer`s (Adam, an `optax.chain`), real Linen
`TrainState`s and real Orbax checkpoints. Each form of NNX state comes back as
the same kind, with new objects and the input untouched; a model with its
optimizer is named like a Linen `TrainState`, so that either warm-starts the
other with `vars_to_warm_start=[".*"]` and no rules.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import MLP, assert_trees_equal, make_state, save_checkpoint
from flax import nnx
from flax.training import train_state

import flax_warmstart as fws
from flax_warmstart import cli

X = jnp.ones((2, 3))
PARAMS = ["encoder/bias", "encoder/kernel", "head/bias", "head/kernel"]
RNG = ["drop/rngs/count", "drop/rngs/key"]


def slots(prefix="opt_state/0", names=("mu", "nu")):
  return [f"{p}/{prefix}/{s}" for s in names for p in PARAMS]


# What a Linen TrainState(Adam) of conftest's MLP is named, and so an NNX model with its optimizer.
TRAIN_STATE_NAMES = sorted(["step", *PARAMS, "opt_state/0/count", *slots()])


class Net(nnx.Module):
  """The NNX twin of conftest's MLP (same names and shapes), with Dropout: it holds an RNG stream."""

  def __init__(self, rngs, features=4):
    self.encoder = nnx.Linear(3, features, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(features, 2, rngs=rngs)

  def __call__(self, x, train=False):
    return self.head(self.drop(nnx.relu(self.encoder(x)), deterministic=not train))


class Deep(nnx.Module):
  """Layers in an nnx.List, and the model's own nnx.Rngs."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(2)])
    self.rngs = rngs

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def nnx_loss(model):
  return jnp.mean(model(X) ** 2)


def linen_loss(state, params=None):
  return jnp.mean(state.apply_fn({"params": state.params if params is None else params}, X) ** 2)


def make_pair(seed=1, tx=None, steps=0):
  """An NNX model with its optimizer, after `steps` real updates."""
  model = Net(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx or optax.adam(1e-2), wrt=nnx.Param)
  for _ in range(steps):
    optimizer.update(model, nnx.grad(nnx_loss)(model))
  return model, optimizer


def named(state):
  """`{name: leaf}`: `variable_names` beside the leaves of the state (of its nnx.state for NNX objects)."""
  tree = state if isinstance(state, train_state.TrainState | dict) else nnx.state(state)
  return dict(zip(fws.variable_names(state), jax.tree_util.tree_leaves(tree), strict=True))


def host(tree):
  """A deep host copy of every leaf (key data for keys), to see later that the input was not mutated."""
  return [np.array(jax.random.key_data(x) if _is_key(x) else x) for x in jax.tree_util.tree_leaves(tree)]


def _is_key(x):
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def assert_same_values(got, want, names):
  for name in names:
    a, b = got[name], want[name]
    if _is_key(a) or _is_key(b):
      assert _is_key(a) and _is_key(b), name
      assert jax.random.key_impl(a) == jax.random.key_impl(b), name
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def settings(path, select=(".*",), **kwargs):
  return fws.WarmStartSettings(path, vars_to_warm_start=list(select), **kwargs)


# ----------------------------------------------------------------------------
# Names


def test_every_form_of_a_model_with_its_optimizer_is_named_like_a_train_state():
  model, optimizer = make_pair()
  forms = {
    "tuple": (model, optimizer),
    "list": [model, optimizer],
    "dict": {"model": model, "optimizer": optimizer},
    "nnx.state(tuple)": nnx.state((model, optimizer)),
    "nnx.split(tuple)": nnx.split((model, optimizer)),
    "dict of states": {"model": nnx.state(model), "optimizer": nnx.state(optimizer)},
  }
  want = sorted([*RNG, *TRAIN_STATE_NAMES])
  for form, state in forms.items():
    assert sorted(fws.variable_names(state)) == want, form
  assert sorted(fws.variable_names(make_state(MLP(), optax.adam(1e-2)))) == TRAIN_STATE_NAMES
  # A model alone, and an optimizer alone (without its parameters, slots are named by their path).
  assert fws.variable_names(model) == [*RNG, *PARAMS]
  assert fws.variable_names(optimizer) == [
    "opt_state/0/count",
    *[f"opt_state/0/{s}/{p}" for s in ("mu", "nu") for p in PARAMS],
    "step",
  ]


def test_checkpoints_of_the_pair_read_like_a_train_state_and_inspect_shows_it(tmp_path, capsys):
  model, optimizer = make_pair(steps=1)
  want = sorted([*RNG, *TRAIN_STATE_NAMES])
  for layout, tree in {
    "pair": nnx.state((model, optimizer)),
    "dict": {"model": nnx.state(model), "optimizer": nnx.state(optimizer)},
  }.items():
    path = save_checkpoint(tmp_path / layout, tree)
    assert [n for n, _ in fws.list_variables(path)] == want, layout
    assert cli.main(["inspect", path, "--json"]) == 0
    shown = [v["name"] for v in json.loads(capsys.readouterr().out)["variables"]]
    assert sorted(shown) == want, layout


def test_chain_and_nnx_list_names(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  model, optimizer = make_pair(tx=tx)
  names = fws.variable_names((model, optimizer))
  assert "encoder/kernel/opt_state/1/0/mu" in names and "opt_state/1/0/count" in names
  assert sorted(names) == sorted([*RNG, *fws.variable_names(make_state(MLP(), tx))])
  deep = Deep(nnx.Rngs(0))
  deep_names = fws.variable_names((deep, nnx.Optimizer(deep, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)))
  assert "layers/1/kernel/opt_state/0/trace" in deep_names and "rngs/default/key" in deep_names


# ----------------------------------------------------------------------------
# Linen TrainState <-> NNX model and optimizer, with no rules


def test_linen_train_state_checkpoint_warm_starts_nnx_model_and_optimizer(tmp_path):
  old = make_state(MLP(), optax.adam(1e-2), steps=2)
  path = save_checkpoint(tmp_path / "linen", old)
  model, optimizer = make_pair(seed=1)
  before = host(nnx.state((model, optimizer)))
  p = fws.plan((model, optimizer), settings(path))
  rows = {row.name: row for row in p.leaves}
  assert {n for n, row in rows.items() if row.action == "load"} == set(TRAIN_STATE_NAMES)
  assert rows["drop/rngs/key"].code is fws.Reason.RNG_NOT_IN_CHECKPOINT
  assert rows["drop/rngs/key"].kind == "key<threefry2x32>" and "key<threefry2x32>" in str(p)

  new_model, new_optimizer = fws.warm_start((model, optimizer), settings(path))
  assert type(new_model) is Net and type(new_optimizer) is nnx.Optimizer
  assert new_model is not model and new_optimizer is not optimizer
  assert_trees_equal(host(nnx.state((model, optimizer))), before)  # the input is untouched
  got, want = named((new_model, new_optimizer)), named(old)
  assert_same_values(got, want, TRAIN_STATE_NAMES)  # params, mu, nu, count and step
  assert int(new_optimizer.step[...]) == old.step == 2
  assert new_optimizer.step[...].dtype == jnp.uint32  # the live dtype
  assert_same_values(got, named((model, optimizer)), RNG)  # the RNG stream keeps its own

  # One more training step on each side gives the same loss.
  np.testing.assert_allclose(nnx_loss(new_model), linen_loss(old), rtol=1e-6)
  new_optimizer.update(new_model, nnx.grad(nnx_loss)(new_model))
  old = old.apply_gradients(grads=jax.grad(lambda p: linen_loss(old, p))(old.params))
  np.testing.assert_allclose(nnx_loss(new_model), linen_loss(old), rtol=1e-6)


@pytest.mark.parametrize("layout", ["pair", "dict"])
def test_nnx_checkpoint_warm_starts_linen_train_state(tmp_path, layout):
  model, optimizer = make_pair(seed=0, steps=2)
  tree = (
    nnx.state((model, optimizer))
    if layout == "pair"
    else {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
  )
  path = save_checkpoint(tmp_path / "nnx", tree)
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  out = fws.warm_start(new, settings(path))
  assert type(out) is train_state.TrainState and type(out.step) is int and out.step == 2
  assert_same_values(named(out), named((model, optimizer)), TRAIN_STATE_NAMES)
  np.testing.assert_allclose(linen_loss(out), nnx_loss(model), rtol=1e-6)
  out = out.apply_gradients(grads=jax.grad(lambda p: linen_loss(out, p))(out.params))
  optimizer.update(model, nnx.grad(nnx_loss)(model))
  np.testing.assert_allclose(linen_loss(out), nnx_loss(model), rtol=1e-6)


def test_optax_chain_linen_to_nnx(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  old = make_state(MLP(), tx, steps=1)
  path = save_checkpoint(tmp_path / "linen", old)
  model, optimizer = fws.warm_start(make_pair(seed=1, tx=tx), settings(path))
  assert_same_values(named((model, optimizer)), named(old), fws.variable_names(old))


# ----------------------------------------------------------------------------
# Every NNX form in, the same kind out


FORMS = {
  "module": lambda m, o: m,
  "optimizer": lambda m, o: o,
  "tuple": lambda m, o: (m, o),
  "list": lambda m, o: [m, o],
  "dict": lambda m, o: {"model": m, "optimizer": o},
  "nnx.state": lambda m, o: nnx.state((m, o)),
  "dict of states": lambda m, o: {"model": nnx.state(m), "optimizer": nnx.state(o)},
  "nnx.split": lambda m, o: nnx.split((m, o)),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_comes_back_as_the_same_kind(tmp_path, form):
  old_model, old_optimizer = make_pair(seed=0, steps=1)
  # An optimizer alone is named without its parameters: its checkpoint is an optimizer's too.
  saved = nnx.state(old_optimizer) if form == "optimizer" else nnx.state((old_model, old_optimizer))
  path = save_checkpoint(tmp_path / "ckpt", saved)
  model, optimizer = make_pair(seed=1)
  state = FORMS[form](model, optimizer)
  before = host(nnx.state((model, optimizer)))
  out = fws.warm_start(state, settings(path))
  assert type(out) is type(state)
  if form == "nnx.split":
    assert out[0] == state[0] and isinstance(out[1], nnx.State)
  for got, given in zip(
    jax.tree_util.tree_leaves(out, is_leaf=nnx.graph.is_graph_node),
    jax.tree_util.tree_leaves(state, is_leaf=nnx.graph.is_graph_node),
    strict=False,
  ):
    if nnx.graph.is_graph_node(given):
      assert type(got) is type(given) and got is not given  # new objects
  assert_trees_equal(host(nnx.state((model, optimizer))), before)
  # Everything loads, RNG streams included (an NNX checkpoint holds them).
  assert_same_values(named(out if form != "nnx.split" else out[1]), named(saved), fws.variable_names(state))


def test_result_applies_in_place_with_nnx_update(tmp_path):
  old_model, _ = make_pair(seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old_model))
  model = Net(nnx.Rngs(1))
  nnx.update(model, nnx.state(fws.warm_start(model, path)))
  np.testing.assert_array_equal(np.asarray(model(X)), np.asarray(old_model(X)))


def test_init_from_checkpoint_and_resume_take_nnx_objects(tmp_path):
  old_model, old_optimizer = make_pair(seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old_model))
  model = Net(nnx.Rngs(1))
  out = fws.init_from_checkpoint(model, path, {"encoder/": "encoder/"})
  assert type(out) is Net
  np.testing.assert_array_equal(np.asarray(out.encoder.kernel[...]), np.asarray(old_model.encoder.kernel[...]))
  np.testing.assert_array_equal(np.asarray(out.head.kernel[...]), np.asarray(model.head.kernel[...]))
  run = tmp_path / "run"
  with ocp.CheckpointManager(run) as mgr:
    mgr.save(3, args=ocp.args.StandardSave(nnx.state((old_model, old_optimizer))))
  model, optimizer = fws.warm_start_or_resume(make_pair(seed=1), run, path)
  assert_same_values(named((model, optimizer)), named((old_model, old_optimizer)), fws.variable_names(model))


def test_abstract_nnx_state_with_init_fn(tmp_path):
  old = make_state(MLP(), optax.adam(1e-2), steps=2)
  path = save_checkpoint(tmp_path / "linen", old)
  abstract = nnx.eval_shape(lambda: make_pair(seed=1))
  p = fws.plan(abstract, settings(path))
  assert {row.name for row in p.initialized} == set(RNG)
  model, optimizer = fws.warm_start(abstract, settings(path), init_fn=lambda: make_pair(seed=1))
  assert type(model) is Net and isinstance(model.encoder.kernel[...], jax.Array)
  assert_same_values(named((model, optimizer)), named(old), TRAIN_STATE_NAMES)
  assert_same_values(named((model, optimizer)), named(make_pair(seed=1)), RNG)  # computed by init_fn


# ----------------------------------------------------------------------------
# Every kind of leaf


class KeyState(train_state.TrainState):
  key: jax.Array


def key_state(seed, impl=None):
  model = MLP()
  params = model.init(jax.random.key(seed), X)["params"]
  return KeyState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2), key=jax.random.key(seed, impl=impl))


def test_train_state_with_a_typed_key_field(tmp_path):
  old = key_state(0)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = key_state(1)
  assert "key" in fws.variable_names(new)
  out = fws.warm_start(new, path)  # parameters only: the key is kept
  assert out.key is new.key
  out = fws.warm_start(new, settings(path))  # everything: the key loads, a typed key of its impl
  assert _is_key(out.key) and jax.random.key_impl(out.key) == jax.random.key_impl(new.key)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(out.key)), np.asarray(jax.random.key_data(old.key)))
  # A key of another impl cannot take this key data: a plan error naming the leaf.
  with pytest.raises(fws.WarmStartError, match=r"'key' cannot load .* rbg PRNG key .* another impl"):
    fws.plan(key_state(1, impl="rbg"), settings(path))


def loader_state(seed, name):
  return {
    "params": MLP().init(jax.random.key(seed), X)["params"],
    "loader": {"bit_generator": name, "position": 100 * seed, "epoch_fraction": 0.25 * seed},
    "scale": np.float32(seed),
    "counts": jnp.arange(3, dtype=jnp.int32) * seed,
    "mask": jnp.array([seed % 2 == 0, True]),
    "ema": None,
  }


def test_strings_and_scalars_saved_by_pytree_checkpointer_resume(tmp_path):
  old = loader_state(3, "PCG64")
  run = tmp_path / "run"
  with ocp.CheckpointManager(run, item_handlers=ocp.PyTreeCheckpointHandler()) as mgr:
    mgr.save(7, args=ocp.args.PyTreeSave(old))
  new = loader_state(1, "MT19937")
  names = fws.variable_names(new)  # None holds no leaf: it has no name, and comes back as it was
  assert sorted(names) == sorted(
    ["counts", *PARAMS, "loader/bit_generator", "loader/epoch_fraction", "loader/position", "mask", "scale"]
  )
  p = fws.plan(new, settings(run))
  kinds = {row.name: row.kind for row in p.leaves}
  assert kinds["loader/bit_generator"] == "str" and kinds["loader/position"] == "scalar"
  assert kinds["counts"] == kinds["mask"] == "array"
  out = fws.warm_start_or_resume(new, run, tmp_path / "no_old_run")
  assert out["loader"] == {"bit_generator": "PCG64", "position": 300, "epoch_fraction": 0.75}
  assert type(out["loader"]["position"]) is int and type(out["loader"]["epoch_fraction"]) is float
  assert type(out["scale"]) is np.float32 and out["scale"] == 3
  assert out["counts"].dtype == jnp.int32 and out["counts"].tolist() == [0, 3, 6]
  assert out["mask"].dtype == jnp.bool_ and out["mask"].tolist() == [False, True]
  assert out["ema"] is None
  assert new["loader"]["bit_generator"] == "MT19937"  # the input is untouched
  # Not selected, they keep their own values.
  kept = fws.warm_start(new, settings(run, ["encoder/.*"]))
  assert kept["loader"] is not new["loader"] and kept["loader"] == new["loader"]


def test_a_kind_that_cannot_load_is_a_plan_error_naming_the_leaf(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones(2), "name": jnp.zeros(())})
  pytree = tmp_path / "strings"
  ocp.PyTreeCheckpointer().save(pytree, {"w": "a string", "name": "PCG64"})
  with pytest.raises(fws.WarmStartError) as err:
    fws.plan({"w": jnp.zeros(2), "name": "MT19937"}, settings(path))
  assert "'name' cannot load from checkpoint tensor 'name': it is a string in the state" in str(err.value)
  with pytest.raises(fws.WarmStartError, match="'w' cannot load .* the checkpoint holds a string"):
    fws.plan({"w": jnp.zeros(2), "name": "MT19937"}, settings(pytree))
  with pytest.raises(
    fws.WarmStartError, match="'w' cannot load .* holds an object of type object, which no checkpoint can load"
  ):
    fws.plan({"w": object(), "name": jnp.zeros(())}, settings(path))
  with pytest.raises(fws.WarmStartError, match="Variable 'w' cannot load tensor 'w'"):
    fws.plan_init_from_checkpoint({"w": jnp.zeros(2)}, pytree, {"w": "w"})
  # Not selected, an object leaf is kept as it is.
  marker = object()
  assert fws.warm_start({"w": jnp.zeros(2), "name": marker}, settings(path, ["w"]))["name"] is marker


def test_masked_optimizer_slots_have_no_leaf_and_load(tmp_path):
  tx = optax.masked(
    optax.adam(1e-2), {"encoder": {"kernel": True, "bias": False}, "head": {"kernel": True, "bias": False}}
  )
  old = make_state(MLP(), tx, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(MLP(), tx, seed=1, steps=0)
  assert "encoder/bias/opt_state/inner_state/0/mu" not in fws.variable_names(new)
  out = fws.warm_start(new, settings(path))
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(new)
  assert_same_values(named(out), named(old), fws.variable_names(old))
