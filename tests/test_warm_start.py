"""warm_start, plan/execute and the resume guard (flax_warmstart/warm_start.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, assert_trees_equal, make_state, save_checkpoint, save_manager_step

import flax_warmstart as fws


@pytest.fixture
def old_state(adam_mlp):
  """The session's Adam MLP TrainState after 2 steps (read-only)."""
  return adam_mlp.state


@pytest.fixture
def old_ckpt(adam_mlp):
  """Its Orbax checkpoint (read-only)."""
  return adam_mlp.path


def test_three_call_forms_agree(old_ckpt, old_state):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  settings = fws.WarmStartSettings(old_ckpt)
  a = fws.warm_start(new, old_ckpt)
  b = fws.warm_start(new, settings)
  c = fws.warm_start(new, old_ckpt, settings)
  for out in (a, b, c):
    assert_trees_equal(out.params, old_state.params)
    # A str regex selects parameters only: the optimizer state is the new one.
    assert_trees_equal(out.opt_state, new.opt_state)
    assert out.step == new.step


def test_explicit_path_wins_over_settings(tmp_path, old_ckpt, old_state, caplog):
  other = save_checkpoint(tmp_path / "other", make_state(MLP(), optax.adam(1e-2), seed=5))
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  with caplog.at_level(logging.INFO, logger="flax_warmstart"):
    out = fws.warm_start(new, old_ckpt, fws.WarmStartSettings(other))
  assert_trees_equal(out.params, old_state.params)
  assert "instead of settings.ckpt_to_initialize_from" in caplog.text


def test_bad_call_forms():
  with pytest.raises(fws.WarmStartError, match="No checkpoint given"):
    fws.warm_start({"w": jnp.ones(1)})
  with pytest.raises(fws.WarmStartError, match="instead got int"):
    fws.warm_start({"w": jnp.ones(1)}, 3)  # type: ignore[arg-type]
  s = fws.WarmStartSettings("/x")
  with pytest.raises(fws.WarmStartError, match="Pass WarmStartSettings once"):
    fws.warm_start({"w": jnp.ones(1)}, s, s)


def test_input_is_not_mutated(old_ckpt):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  before = jax.tree.map(np.array, new)
  out = fws.warm_start(new, old_ckpt, fws.WarmStartSettings(old_ckpt, vars_to_warm_start=[".*"]))
  assert_trees_equal(new, before)
  assert out is not new


def test_execute_runs_the_plan_it_was_given(old_ckpt, old_state):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  plan = fws.plan(new, fws.WarmStartSettings(old_ckpt, vars_to_warm_start=["encoder/"]))
  assert {leaf.name for leaf in plan.loaded} == {
    "encoder/kernel",
    "encoder/bias",
    *(f"encoder/{p}/opt_state/0/{s}" for p in ("kernel", "bias") for s in ("mu", "nu")),
  }
  out = fws.execute(plan, new)
  assert_trees_equal(out.params["encoder"], old_state.params["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])
  assert_trees_equal(out.opt_state[0].mu["encoder"], old_state.opt_state[0].mu["encoder"])
  with pytest.raises(fws.WarmStartError, match="built for a state with other variables"):
    fws.execute(plan, new.params)


def test_errors_are_collected_and_raised_before_reading(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"params": {"a": jnp.ones((2, 1)), "fruit_weights": jnp.ones(3)}})
  live = {"params": {"a": jnp.zeros((1, 2)), "fruit_weigths": jnp.zeros(3), "b": jnp.zeros(1)}}
  settings = fws.WarmStartSettings(path, vars_to_warm_start="a|fruit", var_name_to_prev_var_name={"bb": "b"})
  with pytest.raises(fws.WarmStartError) as err:
    fws.warm_start(live, settings)
  problems = err.value.problems
  assert len(problems) == 3, problems
  text = str(err.value)
  assert "'bb' was not used" in text and "Closest names: 'b'" in text
  assert "shape (1, 2) in the state" in text and "(2, 1)" in text
  assert "no tensor 'fruit_weigths'" in text and "Closest names: 'fruit_weights'" in text
  assert str(path) in text


def test_skip_missing_keeps_and_reports(tmp_path, caplog):
  path = save_checkpoint(tmp_path / "ckpt", {"params": {"a": jnp.ones(2)}})
  live = {"params": {"a": jnp.zeros(2), "new_head": jnp.full(2, 7.0)}}
  with pytest.raises(fws.WarmStartError, match="new_head"):
    fws.warm_start(live, path)
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    out = fws.warm_start(live, fws.WarmStartSettings(path, skip_missing=True))
  assert np.all(out["params"]["a"] == 1.0) and np.all(out["params"]["new_head"] == 7.0)
  assert "skip_missing" in caplog.text and "new_head" in caplog.text
  plan = fws.plan(live, fws.WarmStartSettings(path, skip_missing=True))
  assert [(leaf.name, leaf.action) for leaf in plan.leaves] == [("a", "load"), ("new_head", "keep")]


def test_logging_counts_and_names(old_ckpt, caplog):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  with caplog.at_level(logging.DEBUG, logger="flax_warmstart"):
    fws.warm_start(new, old_ckpt)
  info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
  assert any("4 of 14 leaves" in m and "kept" in m for m in info), info
  debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
  assert "Warm-starting variable: encoder/kernel; prev_var_name: Unchanged" in debug
  # As TensorFlow: one line per variable warm-started (4 of 14), none for those kept, initialised or reset.
  assert len([m for m in debug if m.startswith("Warm-starting variable:")]) == 4, debug
  caplog.clear()
  with caplog.at_level(logging.DEBUG, logger="flax_warmstart"):  # from the abstract state: 10 leaves initialised
    fws.warm_start(jax.eval_shape(lambda: new), old_ckpt, init_fn=lambda: new)
  debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
  assert len([m for m in debug if m.startswith("Warm-starting variable:")]) == 4, debug


def test_float_to_int_cast_warns(tmp_path, caplog):
  path = save_checkpoint(tmp_path / "ckpt", {"counter": jnp.asarray(3.0)})
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    out = fws.warm_start({"counter": jnp.asarray(0, jnp.int32)}, path)
  assert out["counter"].dtype == jnp.int32 and out["counter"] == 3
  assert "change of kind" in caplog.text


def test_plan_str_is_a_table(old_ckpt):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  plan = fws.plan(new, fws.WarmStartSettings(old_ckpt, vars_to_warm_start="encoder"))
  text = str(plan)
  lines = text.splitlines()
  assert lines[0].startswith("2 of 14 leaves from")
  assert lines[1].split() == ["name", "action", "source", "shape", "dtype", "read", "sharding", "reason"]
  assert [line.split()[0] for line in lines[2:16]] == fws.variable_names(new)
  # The checkpoint tensors nothing reads are listed last.
  assert lines[16].startswith(f"Unused in {old_ckpt}: ") and "head/kernel" in lines[16]
  assert len(lines) == 17


def test_resume_guard_prefers_the_runs_own_checkpoint(tmp_path, old_ckpt, old_state):
  run = tmp_path / "run"
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  assert not fws.has_checkpoint(run)
  first = fws.warm_start_or_resume(new, run, old_ckpt)
  assert_trees_equal(first.params, old_state.params)
  # The run trains and saves; a restart must resume, not warm-start again.
  progressed = make_state(MLP(), optax.adam(1e-2), seed=9, steps=3)
  save_manager_step(run, 3, progressed)
  assert fws.has_checkpoint(run)
  resumed = fws.warm_start_or_resume(new, run, old_ckpt)
  assert_trees_equal(resumed.params, progressed.params)
  assert_trees_equal(resumed.opt_state, progressed.opt_state)
  assert resumed.step == 3 and isinstance(resumed.step, int)
