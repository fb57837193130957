"""Nothing silent (issue 13, kinds 7 and 8): a request that loads nothing warns (log and plan) with
TensorFlow's result, and a user's exclusion excludes even where TensorFlow's `name:0` alias would not."""

import logging

import jax.numpy as jnp
import pytest
from conftest import make_state, save_checkpoint

import flax_warmstart as fws
from flax_warmstart import cli


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  state = make_state()
  return state, save_checkpoint(tmp_path_factory.mktemp("silent") / "ckpt", state)


@pytest.mark.parametrize("selection", ["zzz", ["zzz"], lambda name, leaf: False])
def test_a_selection_that_loads_nothing_warns_in_the_log_and_the_plan(saved, selection, caplog):
  state, path = saved
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    plan = fws.plan(state, fws.WarmStartSettings(path, vars_to_warm_start=selection))
  assert not plan.loaded  # TensorFlow's result: nothing loaded, no error
  assert len(plan.warnings) == 1 and "selects no variable: nothing is loaded" in plan.warnings[0]
  assert plan.warnings[0] in caplog.text
  assert f"WARNING: {plan.warnings[0]}" in str(plan) and plan.to_dict()["warnings"] == list(plan.warnings)
  assert "WARNING" in plan._repr_html_()


def test_a_selection_that_loads_something_does_not_warn(saved, caplog):
  state, path = saved
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    plan = fws.plan(state, path)
  assert plan.loaded and not plan.warnings and not caplog.records


def test_an_empty_assignment_map_warns(saved, caplog):
  state, path = saved
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    out = fws.init_from_checkpoint(state, path, {})
  assert "assignment_map is empty: nothing is loaded" in caplog.text
  assert out.step == state.step


def test_the_command_line_shows_the_warning(saved, tmp_path, capsys):
  state, path = saved
  settings = tmp_path / "s.yaml"
  settings.write_text('vars_to_warm_start: "zzz"\n')
  assert cli.main(["plan", path, path, "--settings", str(settings)]) == 0
  out = capsys.readouterr()
  assert "WARNING" in out.err and "nothing is loaded" in out.err
  assert "WARNING: vars_to_warm_start='zzz'" in out.out


@pytest.mark.parametrize("pattern", [r"(?!step$)", r"^(?!step$).*", r"(?!step$|opt_state)"])
def test_an_exclusion_excludes_despite_the_tensorflow_alias(saved, pattern):
  state, path = saved
  plan = fws.plan(state, fws.WarmStartSettings(path, vars_to_warm_start=[pattern]))
  rows = {row.name: row for row in plan.leaves}
  assert rows["step"].action == "keep"
  assert rows["encoder/kernel"].action == "load"


def test_tensorflow_regexes_that_need_the_alias_still_work(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"v2": jnp.ones(2), "v2/Momentum": jnp.ones(2), "v20": jnp.ones(1)})
  state = {"v2": jnp.zeros(2), "v2/Momentum": jnp.zeros(2), "v20": jnp.zeros(1)}
  plan = fws.plan(state, fws.WarmStartSettings(path, vars_to_warm_start=["v2[^/]"]))
  assert {row.name for row in plan.loaded} == {"v2", "v20"}  # TF's documented example
  plan = fws.plan(state, fws.WarmStartSettings(path, vars_to_warm_start=["v2:0$"]))
  assert {row.name for row in plan.loaded} == {"v2"}
