"""Building a plan (flax_warmstart/_src/planning.py): several sources, overlaps, and the optimizer_state / step policies.

Every test uses real Orbax checkpoints of real Flax TrainStates trained with
real optax optimizers (`conftest.make_state`): the session's `adam_mlp`
(read only) and a second one written once for this module.

* Several `WarmStartSettings` build one plan: each checkpoint is read once,
  overlaps are errors unless `overlap="first"/"last"`, and the problems of all
  sources are reported together.
* `optimizer_state` and `step` say what happens to the optimizer state and the
  step whatever `vars_to_warm_start` selects, including across a change of
  optimizer, and the result keeps the live state's type, structure and
  shardings.
"""

import collections
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, adam_slots, assert_trees_equal, make_state, rows, save_checkpoint
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws
from flax_warmstart._src.sources import orbax as checkpoint_lib

ADAM = optax.adam(1e-2)


@pytest.fixture(scope="module")
def old(adam_mlp):
  """An Adam TrainState of `MLP()` (scope `encoder`) after 2 steps, and its checkpoint: the session's, read-only."""
  return adam_mlp


@pytest.fixture(scope="module")
def other(tmp_path_factory):
  """A second Adam TrainState of `MLP()` (other seed, 3 steps), and its checkpoint."""
  state = make_state(MLP(), ADAM, seed=5, steps=3)
  return state, save_checkpoint(tmp_path_factory.mktemp("b") / "ckpt", state)


@pytest.fixture(scope="module")
def new():
  """A live Adam TrainState of `MLP()` after 3 steps: trained slots, step 3."""
  return make_state(MLP(), ADAM, seed=1, steps=3)


# ----------------------------------------------------------------------------
# 1. Several sources


def test_two_checkpoints_into_one_state(old, other, new):
  (a_state, a), (b_state, b) = old, other
  sources = [
    fws.WarmStartSettings(a, vars_to_warm_start="encoder"),
    fws.WarmStartSettings(b, vars_to_warm_start="head"),
  ]
  plan = fws.plan(new, sources)
  assert len(plan.checkpoints) == 2
  assert {os.fspath(c.path) for c in plan.checkpoints} == {a, b}
  by_name = rows(plan)
  assert os.fspath(by_name["encoder/kernel"].checkpoint.path) == a
  assert os.fspath(by_name["head/kernel"].checkpoint.path) == b
  out = fws.warm_start(new, sources)
  assert_trees_equal(out.params["encoder"], a_state.params["encoder"])
  assert_trees_equal(out.params["head"], b_state.params["head"])
  assert_trees_equal(out.opt_state, new.opt_state)
  assert out.step == new.step


def test_same_leaf_from_two_sources_is_an_error(old, other, new):
  (_, a), (_, b) = old, other
  sources = [fws.WarmStartSettings(a), fws.WarmStartSettings(b, vars_to_warm_start="head")]
  with pytest.raises(fws.WarmStartError) as info:
    fws.plan(new, sources)
  problems = info.value.problems
  assert len(problems) == 2  # head/bias and head/kernel
  claimed = [p for p in problems if p.startswith("'head/kernel'")]
  assert len(claimed) == 1
  assert f"source #0 ({a})" in claimed[0]
  assert f"source #1 ({b})" in claimed[0]
  assert "overlap='first'" in claimed[0]
  assert not any("encoder" in p for p in problems)


@pytest.mark.parametrize("overlap", ["first", "last"])
def test_overlap_first_or_last_picks_the_source(old, other, new, overlap):
  (a_state, a), (b_state, b) = old, other
  sources = [fws.WarmStartSettings(a), fws.WarmStartSettings(b, vars_to_warm_start="head")]
  out = fws.warm_start(new, sources, overlap=overlap)
  head_from = a_state if overlap == "first" else b_state
  assert_trees_equal(out.params["encoder"], a_state.params["encoder"])
  assert_trees_equal(out.params["head"], head_from.params["head"])
  row = rows(fws.plan(new, sources, overlap=overlap))["head/kernel"]
  assert os.fspath(row.checkpoint.path) == (a if overlap == "first" else b)


def test_bad_overlap_value(old, other, new):
  sources = [fws.WarmStartSettings(old[1]), fws.WarmStartSettings(other[1])]
  with pytest.raises(fws.WarmStartError, match="overlap must be"):
    fws.plan(new, sources, overlap="both")


@pytest.fixture
def spies(monkeypatch):
  """Counts `open_source` calls per location and `restore` calls per checkpoint path."""
  from flax_warmstart._src import api as api_lib

  loads, restores = collections.Counter(), collections.Counter()
  real_load, real_restore = api_lib.open_source, checkpoint_lib.restore

  def open_source(location, **kwargs):
    loads[os.path.realpath(os.fspath(location))] += 1
    return real_load(location, **kwargs)

  def restore(checkpoint, targets):
    restores[os.path.realpath(os.fspath(checkpoint.path))] += 1
    return real_restore(checkpoint, targets)

  monkeypatch.setattr(api_lib, "open_source", open_source)
  monkeypatch.setattr(checkpoint_lib, "restore", restore)
  return loads, restores


def test_same_checkpoint_in_two_sources_is_read_once(old, new, spies):
  a_state, a = old
  loads, restores = spies
  sources = [
    fws.WarmStartSettings(a, vars_to_warm_start="encoder"),
    # The same directory, spelled as a pathlib.Path.
    fws.WarmStartSettings(pathlib.Path(a), vars_to_warm_start="head"),
  ]
  out = fws.warm_start(new, sources)
  assert_trees_equal(out.params, a_state.params)
  assert loads == {os.path.realpath(a): 1}
  assert restores == {os.path.realpath(a): 1}
  assert len(fws.plan(new, sources).checkpoints) == 1


def test_same_checkpoint_with_trailing_slash_is_read_once(old, new, spies):
  a_state, a = old
  loads, restores = spies
  sources = [
    fws.WarmStartSettings(a, vars_to_warm_start="encoder"),
    fws.WarmStartSettings(a + os.sep, vars_to_warm_start="head"),
  ]
  out = fws.warm_start(new, sources)
  assert_trees_equal(out.params, a_state.params)
  assert sum(restores.values()) == 1, restores
  assert sum(loads.values()) == 1, loads


def test_problems_of_several_sources_are_reported_together(old, other, new, tmp_path, spies):
  (_, a), (_, b) = old, other
  _, restores = spies
  sources = [
    fws.WarmStartSettings(a, vars_to_warm_start="encoder", var_name_to_prev_var_name={"encoder/kernel": "enc/kernel"}),
    fws.WarmStartSettings(b, vars_to_warm_start="head", rename_rules=[(r"decoder/.*", None)]),
    fws.WarmStartSettings(tmp_path / "nowhere"),
  ]
  with pytest.raises(fws.WarmStartError, match="Cannot warm-start from several sources") as info:
    fws.warm_start(new, sources)
  problems = info.value.problems
  assert len(problems) == 3, problems
  assert problems[0].startswith("source #0") and "'enc/kernel'" in problems[0]
  assert problems[1].startswith("source #1") and "rename_rules[0]" in problems[1]
  assert problems[2].startswith("source #2") and "nowhere" in problems[2]
  assert not restores  # nothing was read


# ----------------------------------------------------------------------------
# 2. optimizer_state and step policies


def test_optimizer_state_load_loads_slots_of_loaded_params_only(old, new):
  old_state, path = old
  settings = fws.WarmStartSettings(path, vars_to_warm_start="encoder", optimizer_state="load")
  by_name = rows(fws.plan(new, settings))
  assert by_name["encoder/kernel/opt_state/0/mu"].action == "load"
  assert by_name["opt_state/0/count"].action == "load"
  assert by_name["head/kernel/opt_state/0/mu"].action == "keep"
  assert by_name["step"].action == "keep"
  out = fws.warm_start(new, settings)
  assert_trees_equal(out.params["encoder"], old_state.params["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])
  assert_trees_equal(adam_slots(out, "encoder"), adam_slots(old_state, "encoder"))
  assert_trees_equal(adam_slots(out, "head"), adam_slots(new, "head"))
  assert int(out.opt_state[0].count) == 2  # the old count, not the live 3
  assert out.step == new.step == 3

  # The default regex ".*": a parameter that a None rule keeps is not loaded,
  # so neither are its slots.
  settings = fws.WarmStartSettings(path, optimizer_state="load", rename_rules=[(r"head/.*", None)])
  out = fws.warm_start(new, settings)
  assert_trees_equal(out.params["encoder"], old_state.params["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])
  assert_trees_equal(adam_slots(out, "encoder"), adam_slots(old_state, "encoder"))
  assert_trees_equal(adam_slots(out, "head"), adam_slots(new, "head"))
  assert int(out.opt_state[0].count) == 2
  # Every parameter loaded: the whole optimizer state is the old one.
  out = fws.warm_start(new, fws.WarmStartSettings(path, optimizer_state="load"))
  assert_trees_equal(out.opt_state, old_state.opt_state)
  assert out.step == new.step


def test_optimizer_state_keep_with_a_list_keeps_all_optimizer_leaves(old, new):
  old_state, path = old
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], optimizer_state="keep")
  out = fws.warm_start(new, settings)
  assert_trees_equal(out.params, old_state.params)
  assert_trees_equal(out.opt_state, new.opt_state)
  assert out.step == old_state.step  # the list still selects the step


@pytest.mark.parametrize("vars_to_warm_start", [".*", [".*"]])
def test_optimizer_state_reset_is_the_fresh_init_of_the_loaded_params(old, new, vars_to_warm_start):
  old_state, path = old
  settings = fws.WarmStartSettings(path, vars_to_warm_start=vars_to_warm_start, optimizer_state="reset")
  plan = fws.plan(new, settings)
  opt_rows = [row for row in plan.leaves if "opt_state" in row.name]
  assert opt_rows and all(row.action == "reset" for row in opt_rows)
  assert all(row.reason == "optimizer_state='reset'" for row in opt_rows)
  assert {row.name for row in plan.reset} == {row.name for row in opt_rows}
  out = fws.warm_start(new, settings)
  assert_trees_equal(out.params, old_state.params)
  assert_trees_equal(out.opt_state, new.tx.init(out.params))
  assert int(out.opt_state[0].count) == 0
  for leaf in jax.tree_util.tree_leaves((out.opt_state[0].mu, out.opt_state[0].nu)):
    assert not np.any(np.asarray(leaf))
  # The live state had trained slots.
  assert np.any(np.asarray(new.opt_state[0].mu["encoder"]["kernel"]))


def test_optimizer_state_reset_inits_from_the_loaded_params(old):
  # schedule_free's state holds `z`, initialised to the params themselves: a
  # reset must build it from the warm-started params, not the live ones.
  old_state, path = old
  live = make_state(MLP(), optax.contrib.schedule_free_adamw(1e-2), seed=1, steps=2)
  out = fws.warm_start(live, fws.WarmStartSettings(path, optimizer_state="reset"))
  assert_trees_equal(out.params, old_state.params)
  assert_trees_equal(out.opt_state, live.tx.init(old_state.params))
  assert_trees_equal(out.opt_state.z, old_state.params)


def test_reset_from_two_sources_inits_from_the_merged_params(old, other):
  (a_state, a), (b_state, b) = old, other
  live = make_state(MLP(), optax.contrib.schedule_free_adamw(1e-2), seed=1, steps=2)
  sources = [
    fws.WarmStartSettings(a, vars_to_warm_start="encoder", optimizer_state="reset"),
    fws.WarmStartSettings(b, vars_to_warm_start="head"),
  ]
  out = fws.warm_start(live, sources)
  merged = {"encoder": a_state.params["encoder"], "head": b_state.params["head"]}
  assert_trees_equal(out.params, type(out.params)(merged))
  assert_trees_equal(out.opt_state, live.tx.init(out.params))


def test_reset_without_tx_is_an_error(old, new, tmp_path):
  _, path = old
  # A Linen-style dict holding optimizer state but no optimizer.
  as_dict = {"params": new.params, "opt_state": new.opt_state}
  with pytest.raises(fws.WarmStartError, match="optimizer_state='keep'") as info:
    fws.warm_start(as_dict, fws.WarmStartSettings(path, optimizer_state="reset"))
  assert "dict" in str(info.value)

  # An NNX optimizer's state.
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
  nnx_path = save_checkpoint(tmp_path / "nnx", nnx.state(optimizer))
  settings = fws.WarmStartSettings(nnx_path, vars_to_warm_start=[".*"], optimizer_state="reset")
  with pytest.raises(fws.WarmStartError, match="optimizer_state='keep'"):
    fws.warm_start(nnx.state(optimizer), settings)


def test_step_load_continues_the_old_step(old, new, caplog):
  old_state, path = old
  with caplog.at_level(logging.INFO, logger="flax_warmstart"):
    out = fws.warm_start(new, fws.WarmStartSettings(path, step="load"))
  assert out.step == old_state.step == 2
  assert type(out.step) is int
  assert "learning-rate schedules continue" in caplog.text
  # A jax-array step stays a jax array of its dtype.
  live = new.replace(step=jnp.asarray(9, jnp.int32))
  out = fws.warm_start(live, fws.WarmStartSettings(path, step="load"))
  assert isinstance(out.step, jax.Array) and out.step.dtype == jnp.int32
  assert int(out.step) == 2


def test_step_reset_gives_zero_of_the_live_type(old, new, caplog):
  _, path = old
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], step="reset")
  row = rows(fws.plan(new, settings))["step"]
  assert (row.action, row.reason) == ("reset", "step='reset'")
  with caplog.at_level(logging.INFO, logger="flax_warmstart"):
    out = fws.warm_start(new, settings)
  assert out.step == 0 and type(out.step) is int
  assert "schedules restart" in caplog.text
  # Only the step is reset: the list still loads the optimizer state.
  assert int(out.opt_state[0].count) == 2
  live = new.replace(step=jnp.asarray(7, jnp.int32))
  out = fws.warm_start(live, settings)
  assert isinstance(out.step, jax.Array) and out.step.dtype == jnp.int32
  assert out.step.shape == () and int(out.step) == 0
  assert out.step.sharding == live.step.sharding


def test_step_keep_keeps_the_live_step_even_with_a_list(old, new):
  old_state, path = old
  out = fws.warm_start(new, fws.WarmStartSettings(path, vars_to_warm_start=[".*"], step="keep"))
  assert out.step == new.step == 3
  assert_trees_equal(out.opt_state, old_state.opt_state)


@pytest.mark.parametrize("field", ["optimizer_state", "step"])
@pytest.mark.parametrize("value", ["fresh", None, 0])
def test_invalid_policy_fails_at_construction(field, value):
  with pytest.raises(fws.WarmStartError, match=f"`{field}` must be one of"):
    fws.WarmStartSettings("/runs/old", **{field: value})


# ----------------------------------------------------------------------------
# 3. Changing the optimizer between runs


def test_adam_to_sgd_momentum_with_a_list_alone_fails(old):
  _, path = old
  live = make_state(MLP(), optax.sgd(0.1, momentum=0.9), seed=1, steps=2)
  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, fws.WarmStartSettings(path, vars_to_warm_start=[".*"]))
  message = str(info.value)
  assert "'encoder/kernel/opt_state/0/trace'" in message
  assert "optimizer_state='reset'/'keep'" in message
  assert len(info.value.problems) == 4  # one trace per parameter


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_adam_to_sgd_momentum_with_reset_or_keep(old, policy):
  old_state, path = old
  tx = optax.sgd(0.1, momentum=0.9)
  live = make_state(MLP(), tx, seed=1, steps=0 if policy == "keep" else 2)
  out = fws.warm_start(live, fws.WarmStartSettings(path, vars_to_warm_start=[".*"], optimizer_state=policy))
  assert_trees_equal(out.params, old_state.params)
  fresh = tx.init(out.params)
  assert_trees_equal(out.opt_state, fresh)
  assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(out.opt_state[0].trace))
  assert out.step == old_state.step


def test_adam_to_adafactor_with_default_settings(old):
  old_state, path = old
  live = make_state(MLP(), optax.adafactor(1e-3), seed=1, steps=2)
  out = fws.warm_start(live, path)
  assert_trees_equal(out.params, old_state.params)
  assert_trees_equal(out.opt_state, live.opt_state)
  assert out.step == live.step


# ----------------------------------------------------------------------------
# 4. Type, structure and shardings of the result


def test_sharded_reset_keeps_type_structure_and_shardings(old, mesh):
  old_state, path = old
  specs = {
    ("encoder", "kernel"): P(None, "b"),
    ("encoder", "bias"): P("b"),
    ("head", "kernel"): P("b", None),
  }

  def put(path, leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    keys = tuple(jax.tree_util.keystr((k,), simple=True) for k in path)
    return jax.device_put(leaf, NamedSharding(mesh, specs.get(keys[-2:], P())))

  live = jax.tree_util.tree_map_with_path(put, make_state(MLP(), ADAM, seed=1, steps=2))
  out = fws.warm_start(live, fws.WarmStartSettings(path, optimizer_state="reset"))
  assert type(out) is train_state.TrainState
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(live)
  for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(live), strict=True):
    assert type(got) is type(want) or (isinstance(got, jax.Array) and isinstance(want, jax.Array))
    assert jnp.shape(got) == jnp.shape(want)
    assert jnp.result_type(got) == jnp.result_type(want)
    if isinstance(want, jax.Array):
      assert got.sharding == want.sharding, (got.sharding, want.sharding)
  assert out.opt_state[0].mu["encoder"]["kernel"].sharding == NamedSharding(mesh, P(None, "b"))
  assert out.opt_state[0].nu["head"]["kernel"].sharding == NamedSharding(mesh, P("b", None))
  assert out.opt_state[0].count.sharding == NamedSharding(mesh, P())
  assert_trees_equal(out.params, old_state.params)
  assert_trees_equal(out.opt_state, ADAM.init(old_state.params))
  assert out.step == live.step
