"""Every form of training state, each with a real model and a real Orbax checkpoint.

For each form an "old" state is trained a step or two from seed 0 and saved; a
"new" state from another seed is warm-started from it. Each test checks that:

1. selected leaves hold the old values exactly, unselected leaves their own;
2. the result has the input's Python type, tree structure, and per leaf the
   same shape, dtype, leaf type and (for jax arrays) sharding;
3. the input state is not mutated;
4. `fws.variable_names` gives the documented names.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BNMLP, MLP, BatchStatsState, make_state, save_checkpoint
from flax import nnx
from flax.core import FrozenDict, freeze
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws

X = jnp.ones((2, 3))
PARAMS = ["encoder/bias", "encoder/kernel", "head/bias", "head/kernel"]


# ----------------------------------------------------------------------------
# Checking helpers


def is_split(state):
  return isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], nnx.GraphDef)


def _inner(state):
  """The `nnx.State` of an `nnx.split` pair, else the state itself."""
  return state[1] if is_split(state) else state


def named(state):
  """`{name: leaf}` of a state, pairing `variable_names` with the tree's leaves."""
  inner = _inner(state)
  names = fws.variable_names(state)
  leaves = jax.tree_util.tree_leaves(inner)
  assert len(names) == len(leaves), (names, leaves)
  assert len(set(names)) == len(names), names
  return dict(zip(names, leaves, strict=True))


def snapshot(state):
  """A deep host copy of every leaf, to detect mutation of the input later."""
  return [np.array(x) for x in jax.tree_util.tree_leaves(_inner(state))]


def _host(x):
  """A numpy view of a leaf to compare bit for bit (bfloat16 widened exactly)."""
  a = np.asarray(x)
  return a.astype(np.float32) if a.dtype == jnp.bfloat16 else a


def _dtype(x):
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def assert_unmutated(state, before):
  after = jax.tree_util.tree_leaves(_inner(state))
  assert len(after) == len(before)
  for x, y in zip(after, before, strict=True):
    np.testing.assert_array_equal(_host(x), _host(y))
    assert _dtype(x) == y.dtype


def check_warm_start(new, out, old, selected, before):
  """Checks (1)-(3) of the module docstring.

  Args:
    new: The live state given to `warm_start`.
    out: What `warm_start` returned.
    old: The state the checkpoint was saved from (any form with the same names).
    selected: Names expected to come from the checkpoint.
    before: `snapshot(new)` taken before the warm start.
  """
  assert type(out) is type(new)
  if is_split(new):
    assert len(out) == 2
    assert out[0] == new[0]
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(new)
  new_named, out_named, old_named = named(new), named(out), named(old)
  assert list(out_named) == list(new_named)
  selected = set(selected)
  assert selected <= set(new_named), selected - set(new_named)
  for name, got in out_named.items():
    live = new_named[name]
    if isinstance(live, jax.Array):
      assert isinstance(got, jax.Array), (name, type(got))
      assert got.sharding == live.sharding, (name, got.sharding, live.sharding)
    else:
      assert type(got) is type(live), (name, type(got), type(live))
    assert np.shape(got) == np.shape(live), name
    assert _dtype(got) == _dtype(live), (name, _dtype(got), _dtype(live))
    if name in selected:
      expected = np.asarray(old_named[name]).astype(_dtype(live))
    else:
      expected = np.asarray(live)
    np.testing.assert_array_equal(_host(got), _host(expected), err_msg=name)
  # Not vacuous: something selected and something kept really differ in value.
  differs = {n for n in selected if not np.array_equal(_host(old_named[n]), _host(new_named[n]))}
  assert differs or not selected, "old and new states agree on every selected leaf"
  assert_unmutated(new, before)


def adam_names(prefix="opt_state/0", params=PARAMS, count=True):
  names = [f"{prefix}/count"] if count else []
  return names + [f"{p}/{prefix}/mu" for p in params] + [f"{p}/{prefix}/nu" for p in params]


def settings(path, vars_to_warm_start=".*", **kwargs):
  return fws.WarmStartSettings(path, vars_to_warm_start=vars_to_warm_start, **kwargs)


# ----------------------------------------------------------------------------
# 1-4. flax TrainState with several optax optimizers


ADAM_NAMES = ["step", *PARAMS, *adam_names()]


def test_train_state_adam_names(adam_mlp):
  state, path = adam_mlp
  assert fws.variable_names(state) == ADAM_NAMES
  assert [n for n, _ in fws.list_variables(path)] == sorted(ADAM_NAMES)


def test_train_state_adam_default_settings_loads_params_only(adam_mlp):
  old, path = adam_mlp  # 2 steps
  new = make_state(tx=optax.adam(1e-2), seed=1, steps=3)
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, old, PARAMS, before)
  assert out.step == 3
  assert out.tx is new.tx and out.apply_fn is new.apply_fn


def test_train_state_adam_list_loads_everything(adam_mlp):
  old, path = adam_mlp  # 2 steps
  new = make_state(tx=optax.adam(1e-2), seed=1, steps=3)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, ADAM_NAMES, before)
  assert out.step == 2
  assert int(out.opt_state[0].count) == 2


def test_train_state_changed_head_warm_starts_encoder_and_its_slots(adam_mlp):
  old, path = adam_mlp
  new = make_state(MLP(outputs=3), tx=optax.adam(1e-2), seed=1, steps=2)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, ["encoder/", "step"]))
  enc = ["encoder/bias", "encoder/kernel"]
  check_warm_start(new, out, old, ["step", *enc, *adam_names(params=enc, count=False)], before)
  assert out.params["head"]["kernel"].shape == (4, 3)


def test_train_state_sgd_momentum(tmp_path):
  tx = optax.sgd(1e-2, momentum=0.9)
  old = make_state(tx=tx, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(tx=tx, seed=1, steps=2)
  names = ["step", *PARAMS, *[f"{p}/opt_state/0/trace" for p in PARAMS]]
  assert fws.variable_names(new) == names
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, names, before)


def test_train_state_sgd_momentum_tf_style_regex_excludes_slot(tmp_path):
  # TensorFlow's "v2[^/]" takes v2 (via its tensor name v2:0) but not v2's slots.
  tx = optax.sgd(1e-2, momentum=0.9)
  old = make_state(tx=tx, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(tx=tx, seed=1, steps=2)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, ["head/kernel[^/]", "encoder/kernel"]))
  selected = ["head/kernel", "encoder/kernel", "encoder/kernel/opt_state/0/trace"]
  check_warm_start(new, out, old, selected, before)


def test_train_state_chain_clip_adam(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  old = make_state(tx=tx, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(tx=tx, seed=1, steps=2)
  names = ["step", *PARAMS, *adam_names("opt_state/1/0")]
  assert fws.variable_names(new) == names
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, names, before)
  assert int(out.opt_state[1][0].count) == 1


def _multi_transform():
  labels = {"encoder": {"bias": "a", "kernel": "a"}, "head": {"bias": "b", "kernel": "b"}}
  return optax.multi_transform({"a": optax.adam(1e-2), "b": optax.sgd(1e-2, momentum=0.9)}, labels)


def test_train_state_multi_transform(tmp_path):
  old = make_state(tx=_multi_transform(), seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(tx=_multi_transform(), seed=1, steps=2)
  a, b = "opt_state/inner_states/a/inner_state/0", "opt_state/inner_states/b/inner_state/0"
  enc, head = PARAMS[:2], PARAMS[2:]
  names = ["step", *PARAMS, *adam_names(a, params=enc), *[f"{p}/{b}/trace" for p in head]]
  assert fws.variable_names(new) == names
  assert sorted(n for n, _ in fws.list_variables(path)) == sorted(names)
  # The masked-out parts are MaskedNodes in the live tree.
  assert isinstance(new.opt_state.inner_states["a"].inner_state[0].mu["head"]["kernel"], optax.MaskedNode)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, names, before)
  assert isinstance(out.opt_state.inner_states["a"].inner_state[0].mu["head"]["kernel"], optax.MaskedNode)
  assert isinstance(out.opt_state.inner_states["b"].inner_state[0].trace["encoder"]["bias"], optax.MaskedNode)


def test_train_state_multi_transform_param_selection_carries_slots(tmp_path):
  old = make_state(tx=_multi_transform(), seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(tx=_multi_transform(), seed=1, steps=2)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, ["head/kernel"]))
  selected = ["head/kernel", "head/kernel/opt_state/inner_states/b/inner_state/0/trace"]
  check_warm_start(new, out, old, selected, before)


# ----------------------------------------------------------------------------
# 5-6. batch_stats: a TrainState subclass and a Linen variables dict


def _bn_batch(seed):
  return jax.random.normal(jax.random.key(100 + seed), (4, 3))


def make_bn_state(seed=0, steps=1):
  model = BNMLP()
  x = _bn_batch(seed)
  variables = model.init(jax.random.key(seed), x)
  state = BatchStatsState.create(
    apply_fn=model.apply, params=variables["params"], tx=optax.adam(1e-2), batch_stats=variables["batch_stats"]
  )

  def loss(params, batch_stats):
    y, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
    return jnp.mean(y**2), updates["batch_stats"]

  for _ in range(steps):
    grads, batch_stats = jax.grad(loss, has_aux=True)(state.params, state.batch_stats)
    state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
  return state


BN_PARAMS = ["bn/bias", "bn/scale", *PARAMS]
BN_STATS = ["batch_stats/bn/mean", "batch_stats/bn/var"]
BN_NAMES = ["step", *BN_PARAMS, *adam_names(params=BN_PARAMS), *BN_STATS]


def test_batch_stats_state_names(tmp_path):
  state = make_bn_state()
  # tree order: step, params, opt_state, then the subclass's batch_stats field.
  assert sorted(fws.variable_names(state)) == sorted(BN_NAMES)
  assert fws.variable_names(state)[-2:] == BN_STATS


def test_batch_stats_state_default_settings_keeps_stats(tmp_path):
  old = make_bn_state(seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_bn_state(seed=1, steps=2)
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, old, BN_PARAMS, before)
  assert isinstance(out, BatchStatsState)


@pytest.mark.parametrize("regexes", [[".*"], ["bn/", "encoder/", "head/", "batch_stats/.*"]])
def test_batch_stats_state_list_selects_stats(tmp_path, regexes):
  old = make_bn_state(seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_bn_state(seed=1, steps=2)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, regexes))
  if regexes == [".*"]:
    selected = BN_NAMES
  else:  # every parameter, its slots and the stats; not step nor count.
    selected = [n for n in BN_NAMES if n not in ("step", "opt_state/0/count")]
  check_warm_start(new, out, old, selected, before)


def make_linen_variables(seed):
  model = BNMLP()
  x = _bn_batch(seed)
  variables = model.init(jax.random.key(seed), x)
  _, updates = model.apply(variables, x, mutable=["batch_stats"])
  return {"params": variables["params"], "batch_stats": updates["batch_stats"]}


def test_linen_variables_dict(tmp_path):
  old = make_linen_variables(0)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_linen_variables(1)
  assert fws.variable_names(new) == [*BN_STATS, *BN_PARAMS]
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, old, BN_PARAMS, before)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, BN_PARAMS + BN_STATS, before)


def test_linen_variables_dict_from_train_state_checkpoint(tmp_path):
  old = make_bn_state(seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_linen_variables(1)
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, BN_PARAMS + BN_STATS, before)


# ----------------------------------------------------------------------------
# 7. A bare params tree: dict and FrozenDict


def test_bare_params_dict(tmp_path):
  old = MLP().init(jax.random.key(0), X)["params"]
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = MLP().init(jax.random.key(1), X)["params"]
  assert fws.variable_names(new) == PARAMS
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, old, PARAMS, before)
  assert type(out) is dict


def test_bare_params_frozen_dict_from_train_state_checkpoint(tmp_path):
  old = make_state(seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = freeze(MLP(outputs=3).init(jax.random.key(1), X)["params"])
  assert fws.variable_names(new) == PARAMS
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, "encoder"))
  check_warm_start(new, out, old, PARAMS[:2], before)
  assert type(out) is FrozenDict
  assert type(out["encoder"]) is FrozenDict


# ----------------------------------------------------------------------------
# 8. Flax NNX


class NNXMLP(nnx.Module):
  """The NNX twin of conftest's MLP: same module and parameter names and shapes."""

  def __init__(self, rngs, features=4, outputs=2):
    self.encoder = nnx.Linear(3, features, rngs=rngs)
    self.head = nnx.Linear(features, outputs, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.encoder(x)))


class NNXBNMLP(nnx.Module):
  def __init__(self, rngs):
    self.encoder = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.bn(self.encoder(x)))


def train_nnx(model, seed, steps, tx=None):
  """`steps` real optimizer updates (BatchNorm stats move too); returns the optimizer."""
  optimizer = nnx.Optimizer(model, tx or optax.adam(1e-2), wrt=nnx.Param)
  x = _bn_batch(seed)
  for _ in range(steps):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
  return optimizer


def test_nnx_state_names_and_default_settings(tmp_path):
  old = NNXBNMLP(nnx.Rngs(0))
  train_nnx(old, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old))
  new = NNXBNMLP(nnx.Rngs(1))
  train_nnx(new, seed=1, steps=2)
  state = nnx.state(new)
  assert fws.variable_names(state) == ["bn/bias", "bn/mean", "bn/scale", "bn/var", *PARAMS]
  assert sorted(n for n, _ in fws.list_variables(path)) == sorted(fws.variable_names(state))
  before = snapshot(state)
  out = fws.warm_start(state, path)
  assert isinstance(out, nnx.State)
  # A str regex selects nnx.Param leaves only: BatchStats keep their values.
  check_warm_start(state, out, nnx.state(old), ["bn/bias", "bn/scale", *PARAMS], before)
  assert isinstance(out["encoder"]["kernel"], nnx.Param)
  assert isinstance(out["bn"]["mean"], nnx.BatchStat)
  # The model the live state came from still holds its own values.
  assert_unmutated(nnx.state(new), before)
  before = snapshot(state)
  out = fws.warm_start(state, settings(path, [".*"]))
  check_warm_start(state, out, nnx.state(old), fws.variable_names(state), before)
  nnx.update(new, out)
  old.eval()
  new.eval()
  np.testing.assert_array_equal(np.asarray(new(X)), np.asarray(old(X)))


def test_nnx_split_pair(tmp_path):
  old = NNXMLP(nnx.Rngs(0))
  train_nnx(old, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old))
  new = NNXMLP(nnx.Rngs(1))
  graphdef, state = nnx.split(new)
  assert fws.variable_names((graphdef, state)) == PARAMS
  before = snapshot(state)
  out = fws.warm_start((graphdef, state), path)
  assert isinstance(out, tuple) and len(out) == 2
  check_warm_start((graphdef, state), out, nnx.state(old), PARAMS, before)
  merged = nnx.merge(*out)
  np.testing.assert_array_equal(np.asarray(merged(X)), np.asarray(old(X)))
  assert_unmutated(nnx.state(new), before)


def test_linen_checkpoint_into_nnx_model(adam_mlp):
  old, path = adam_mlp
  new = NNXMLP(nnx.Rngs(1))
  graphdef, state = nnx.split(new)
  before = snapshot(state)
  out = fws.warm_start((graphdef, state), path)
  check_warm_start((graphdef, state), out, old, PARAMS, before)
  np.testing.assert_array_equal(np.asarray(nnx.merge(*out)(X)), np.asarray(old.apply_fn({"params": old.params}, X)))


def test_nnx_checkpoint_into_linen_train_state(tmp_path):
  old = NNXMLP(nnx.Rngs(0))
  train_nnx(old, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old))
  assert sorted(n for n, _ in fws.list_variables(path)) == PARAMS
  new = make_state(MLP(), seed=1, steps=2)
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, nnx.state(old), PARAMS, before)
  np.testing.assert_array_equal(np.asarray(out.apply_fn({"params": out.params}, X)), np.asarray(old(X)))


def test_nnx_checkpoint_into_linen_params_dict(tmp_path):
  old = NNXMLP(nnx.Rngs(0))
  train_nnx(old, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old))
  new = {"params": MLP().init(jax.random.key(1), X)["params"]}
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, nnx.state(old), PARAMS, before)


def test_nnx_optimizer_state(tmp_path):
  old = NNXBNMLP(nnx.Rngs(0))
  old_opt = train_nnx(old, seed=0, steps=1)
  path = save_checkpoint(tmp_path / "ckpt", nnx.state(old_opt))
  new = NNXBNMLP(nnx.Rngs(1))
  new_opt = train_nnx(new, seed=1, steps=2)
  state = nnx.state(new_opt)
  params = ["bn/bias", "bn/scale", *PARAMS]
  names = [
    "opt_state/0/count",
    *[f"opt_state/0/mu/{p}" for p in params],
    *[f"opt_state/0/nu/{p}" for p in params],
    "step",
  ]
  assert fws.variable_names(state) == names
  before = snapshot(state)
  out = fws.warm_start(state, settings(path, [".*"]))
  check_warm_start(state, out, nnx.state(old_opt), names, before)
  assert_unmutated(nnx.state(new_opt), before)
  nnx.update(new_opt, out)
  assert int(new_opt.step[...]) == 1


# ----------------------------------------------------------------------------
# 9. A sharded TrainState on an 8-device CPU mesh


def _place(state, mesh, specs):
  """Puts every jax array of `state` on `mesh`, by (module, kind) -> spec; the rest replicated."""

  def put(path, leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    keys = tuple(jax.tree_util.keystr((k,), simple=True) for k in path)
    return jax.device_put(leaf, NamedSharding(mesh, specs.get(keys[-2:], P())))

  return jax.tree_util.tree_map_with_path(put, state)


def test_sharded_train_state(tmp_path):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  model = MLP(features=8, outputs=4)
  saved_specs = {("encoder", "kernel"): P(None, "model"), ("head", "kernel"): P(None, "model")}
  live_specs = {
    ("encoder", "kernel"): P(None, ("data", "model")),
    ("encoder", "bias"): P("model"),
    ("head", "kernel"): P("model", None),
  }
  old = _place(make_state(model, seed=0, steps=1), mesh, saved_specs)
  assert old.params["head"]["kernel"].sharding == NamedSharding(mesh, P(None, "model"))
  assert old.opt_state[0].mu["encoder"]["kernel"].sharding == NamedSharding(mesh, P(None, "model"))
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = _place(make_state(model, seed=1, steps=2), mesh, live_specs)
  assert new.params["head"]["kernel"].sharding == NamedSharding(mesh, P("model", None))
  assert new.opt_state[0].nu["encoder"]["bias"].sharding == NamedSharding(mesh, P("model"))
  assert new.opt_state[0].count.sharding == NamedSharding(mesh, P())
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  # check_warm_start compares every jax leaf's sharding with the live input's.
  check_warm_start(new, out, old, ADAM_NAMES, before)
  assert out.params["head"]["kernel"].sharding == NamedSharding(mesh, P("model", None))
  assert out.opt_state[0].mu["encoder"]["kernel"].sharding == NamedSharding(mesh, P(None, ("data", "model")))


# ----------------------------------------------------------------------------
# 10. dtype cast


def test_float32_checkpoint_into_bfloat16_model(adam_mlp, caplog):
  caplog.set_level(logging.INFO, logger="flax_warmstart")
  old, path = adam_mlp
  assert old.params["encoder"]["kernel"].dtype == jnp.float32
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), MLP().init(jax.random.key(1), X)["params"])
  new = {"params": params}
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, old, PARAMS, before)
  for name, leaf in named(out).items():
    assert leaf.dtype == jnp.bfloat16, name
    expected = named(old)[name].astype(jnp.bfloat16)
    assert jnp.array_equal(leaf, expected), name
  # The casts are reported at INFO.
  records = [r for r in caplog.records if r.name == "flax_warmstart"]
  casts = [r.getMessage() for r in records if r.levelno == logging.INFO and "cast" in r.getMessage().lower()]
  assert casts, [r.getMessage() for r in records]
  assert "float32" in casts[0] and "bfloat16" in casts[0], casts
  assert all(name in casts[0] for name in PARAMS), casts


def test_float32_to_bfloat16_is_not_reported_as_a_change_of_kind(tmp_path, caplog):
  # float32 -> bfloat16 stays floating point: an INFO about the cast, no WARNING about
  # "a change of kind" (numpy reports bfloat16's dtype.kind as "V", not "f").
  caplog.set_level(logging.INFO, logger="flax_warmstart")
  path = save_checkpoint(tmp_path / "ckpt", {"params": {"w": jnp.ones((2,), jnp.float32)}})
  fws.warm_start({"params": {"w": jnp.zeros((2,), jnp.bfloat16)}}, path)
  warnings = [r.getMessage() for r in caplog.records if r.name == "flax_warmstart" and r.levelno >= logging.WARNING]
  assert not warnings


def test_bfloat16_train_state_with_adam_slots_cast(adam_mlp):
  old, path = adam_mlp
  model = MLP()
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.init(jax.random.key(1), X)["params"])
  new = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))
  assert new.opt_state[0].mu["encoder"]["kernel"].dtype == jnp.bfloat16
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, ADAM_NAMES, before)


# ----------------------------------------------------------------------------
# 11. Python scalars and numpy leaves keep their type


def test_python_int_step_keeps_its_type(tmp_path):
  old = make_state(seed=0, steps=3)
  old = old.replace(step=jnp.asarray(old.step, dtype=jnp.int32))
  assert isinstance(old.step, jax.Array)
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = make_state(seed=1, steps=0)
  assert type(new.step) is int and new.step == 0
  before = snapshot(new)
  out = fws.warm_start(new, settings(path, [".*"]))
  check_warm_start(new, out, old, ADAM_NAMES, before)
  assert type(out.step) is int
  assert out.step == 3


def test_numpy_and_python_scalar_leaves(tmp_path):
  old = {
    "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
    "s": jnp.asarray(2.5, jnp.float32),
    "n": jnp.asarray(7, jnp.int32),
    "f": jnp.asarray(0.25, jnp.float32),
  }
  path = save_checkpoint(tmp_path / "ckpt", old)
  new = {"w": np.zeros((2, 3), np.float32), "s": np.float32(0.0), "n": 1, "f": 1.0}
  assert fws.variable_names(new) == ["f", "n", "s", "w"]
  before = snapshot(new)
  out = fws.warm_start(new, path)
  check_warm_start(new, out, old, ["f", "n", "s", "w"], before)
  assert type(out["w"]) is np.ndarray and out["w"].dtype == np.float32
  assert type(out["s"]) is np.float32 and out["s"] == 2.5
  assert type(out["n"]) is int and out["n"] == 7
  assert type(out["f"]) is float and out["f"] == 0.25
  # The input's numpy array is not the result's (no aliasing into the live state).
  assert out["w"] is not new["w"]
  out["w"][0, 0] = 99.0
  assert new["w"][0, 0] == 0.0
