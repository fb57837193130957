"""Warm starts from an abstract state (`jax.eval_shape`) with `init_fn` for the leaves not loaded.

The result must be bit-identical to warm-starting the concretely initialised
state, with each leaf placed as its abstract leaf says.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, assert_trees_equal, save_checkpoint, save_manager_step
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws

TX = optax.adam(1e-2)


def _create(model, seed=1):
  params = model.init(jax.random.key(seed), jnp.ones((2, 3)))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=TX)


@pytest.fixture
def old(adam_mlp):
  """`make_state(MLP(features=4), seed=0, steps=2)` and its checkpoint: the session's, read-only."""
  return adam_mlp


def test_abstract_train_state_equals_the_concrete_warm_start(old):
  _, path = old
  init = functools.partial(_create, MLP(features=4, encoder_name="backbone"))
  settings = fws.WarmStartSettings(
    path,
    vars_to_warm_start="backbone",
    var_name_to_prev_var_name={"backbone/kernel": "encoder/kernel", "backbone/bias": "encoder/bias"},
  )
  abstract = jax.eval_shape(init)
  assert isinstance(abstract.params["head"]["kernel"], jax.ShapeDtypeStruct)
  out = fws.warm_start(abstract, settings, init_fn=init)
  expected = fws.warm_start(init(), settings)
  assert_trees_equal(out.params, expected.params)
  assert_trees_equal(out.opt_state, expected.opt_state)
  assert out.step == expected.step == 0
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(out))
  np.testing.assert_array_equal(out.params["backbone"]["kernel"], old[0].params["encoder"]["kernel"])
  # The head is the init's, not zeros: init_fn ran for it.
  np.testing.assert_array_equal(out.params["head"]["kernel"], init().params["head"]["kernel"])


def test_abstract_leaves_take_their_sharding(old):
  _, path = old
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  init = functools.partial(_create, MLP(features=8))

  def spec(x):
    return P(None, "model") if jnp.ndim(x) == 2 and jnp.shape(x)[1] % 4 == 0 else P()

  concrete = init()
  shardings = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, spec(x)), concrete)
  abstract = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(lambda: concrete), shardings
  )
  # The checkpoint's encoder is 3x4; the new one 3x8: load the head's bias only, and the step.
  settings = fws.WarmStartSettings(path, vars_to_warm_start=["head/bias", "step"])
  out = fws.warm_start(abstract, settings, init_fn=init)
  for x, s in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(shardings), strict=True):
    assert x.sharding == s
  np.testing.assert_array_equal(out.params["head"]["bias"], old[0].params["head"]["bias"])
  np.testing.assert_array_equal(out.params["encoder"]["kernel"], concrete.params["encoder"]["kernel"])
  assert int(out.step) == int(old[0].step) == 2


def test_abstract_vocabulary_remap_equals_the_concrete_one(tmp_path):
  old_vocab, new_vocab = ["a", "b", "c", "d"], ["d", "x", "b", "a", "y"]
  table = jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3)
  path = save_checkpoint(tmp_path / "old", {"params": {"emb": table, "out": {"bias": jnp.ones(3)}}})

  def init():
    return {"params": {"emb": jnp.full((6, 3), -1.0), "out": {"bias": jnp.zeros(3)}}}

  info = fws.VocabInfo(
    new_vocab, 5, num_oov_buckets=1, old_vocab=old_vocab, backup_initializer=jax.nn.initializers.normal(1.0)
  )
  settings = fws.WarmStartSettings(path, vars_to_warm_start=None, var_name_to_vocab_info={"emb": info})
  rng = jax.random.key(3)
  out = fws.warm_start(jax.eval_shape(init), settings, init_fn=init, rng=rng)
  expected = fws.warm_start(init(), settings, rng=rng)
  assert_trees_equal(out, expected)
  np.testing.assert_array_equal(out["params"]["emb"][np.array([0, 2, 3])], table[np.array([3, 1, 0])])
  np.testing.assert_array_equal(out["params"]["out"]["bias"], np.zeros(3))  # not selected: init_fn's


def test_abstract_state_with_optimizer_reset(old):
  _, path = old
  init = functools.partial(_create, MLP(features=4))
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], optimizer_state="reset")
  out = fws.warm_start(jax.eval_shape(init), settings, init_fn=init)
  expected = fws.warm_start(init(), settings)
  assert_trees_equal(out.params, expected.params)
  assert_trees_equal(out.opt_state, expected.opt_state)
  assert_trees_equal(out.opt_state, out.tx.init(out.params))


def test_fully_loaded_abstract_state_needs_no_init_fn(old):
  state, path = old
  out = fws.warm_start(jax.eval_shape(lambda: state), fws.WarmStartSettings(path, vars_to_warm_start=[".*"]))
  assert_trees_equal(out.params, state.params)
  assert_trees_equal(out.opt_state, state.opt_state)


def test_missing_init_fn_is_an_error_before_any_read(old, no_reads):
  _, path = old
  abstract = jax.eval_shape(functools.partial(_create, MLP(features=4)))
  with pytest.raises(fws.WarmStartError, match=r"abstract .* not loaded .*'head/bias'.*init_fn="):
    fws.warm_start(abstract, fws.WarmStartSettings(path, vars_to_warm_start="encoder"))


def test_init_fn_of_another_model_is_an_error(old, no_reads):
  _, path = old
  abstract = jax.eval_shape(functools.partial(_create, MLP(features=4)))
  other = functools.partial(_create, MLP(features=4, encoder_name="backbone"))
  with pytest.raises(fws.WarmStartError, match=r"other variables.*backbone/bias"):
    fws.warm_start(abstract, fws.WarmStartSettings(path, vars_to_warm_start="encoder"), init_fn=other)
  wider = functools.partial(_create, MLP(features=4, outputs=3))
  with pytest.raises(
    fws.WarmStartError, match=r"'head/kernel': init_fn gives \(4, 3\) float32, the state has \(4, 2\)"
  ):
    fws.warm_start(abstract, fws.WarmStartSettings(path, vars_to_warm_start="encoder"), init_fn=wider)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.encoder = nnx.Linear(3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)


def test_abstract_nnx_split(old):
  state, path = old

  def init():
    return nnx.split(_Net(nnx.Rngs(5)))

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _Net(nnx.Rngs(5))))
  settings = fws.WarmStartSettings(path, vars_to_warm_start="encoder")
  _, out = fws.warm_start((graphdef, abstract), settings, init_fn=init)
  model = nnx.merge(graphdef, out)
  np.testing.assert_array_equal(model.encoder.kernel[...], state.params["encoder"]["kernel"])
  np.testing.assert_array_equal(model.head.kernel[...], init()[1]["head"]["kernel"][...])


def test_the_plan_of_an_abstract_state_names_its_placement(old):
  _, path = old
  abstract = jax.eval_shape(functools.partial(_create, MLP(features=4)))
  rows = {row.name: row for row in fws.plan(abstract, path).leaves}
  assert rows["encoder/kernel"].sharding == "default device"
  assert rows["encoder/kernel"].action == "load" and rows["head/kernel"].action == "load"


def test_resume_or_warm_start_and_assignment_maps_take_an_abstract_state(old, tmp_path):
  state, path = old
  init = functools.partial(_create, MLP(features=4))
  abstract = jax.eval_shape(init)
  run_dir = tmp_path / "run"
  # No checkpoint in the run yet: a warm start, init_fn for what is not loaded.
  out = fws.warm_start_or_resume(
    abstract, run_dir, fws.WarmStartSettings(path, vars_to_warm_start="encoder"), init_fn=init
  )
  np.testing.assert_array_equal(out.params["encoder"]["kernel"], state.params["encoder"]["kernel"])
  np.testing.assert_array_equal(out.params["head"]["kernel"], init().params["head"]["kernel"])
  # The run has its own checkpoint: every leaf resumed from it, no init_fn needed.
  save_manager_step(run_dir, 1, state)
  resumed = fws.warm_start_or_resume(abstract, run_dir, path)
  assert_trees_equal(resumed.params, state.params)
  mapped = fws.init_from_checkpoint(abstract, path, {"encoder/": "encoder/"}, init_fn=init)
  np.testing.assert_array_equal(mapped.params["encoder"]["bias"], state.params["encoder"]["bias"])
  np.testing.assert_array_equal(mapped.params["head"]["bias"], init().params["head"]["bias"])
