"""Which checkpoint of a directory of steps: `WarmStartSettings(ckpt_step=...)` and `--step` (issue 14, item 5)."""

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

import flax_warmstart as fws
from flax_warmstart import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("steps") / "run"
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
  with ocp.CheckpointManager(root, options=options) as mgr:
    for step, loss in ((1, 0.9), (2, 0.3), (3, 0.5)):
      mgr.save(step, args=ocp.args.StandardSave({"w": jnp.full(2, float(step))}), metrics={"loss": loss})
  return str(root)


@pytest.mark.parametrize("ckpt_step, expected", [(None, 3.0), (1, 1.0), ("min:loss", 2.0), ("max:loss", 1.0)])
def test_ckpt_step_picks_the_step(run, ckpt_step, expected):
  settings = fws.WarmStartSettings(run, vars_to_warm_start=[".*"], ckpt_step=ckpt_step)
  plan = fws.plan({"w": jnp.zeros(2)}, settings)
  assert plan.checkpoints[0].step == int(expected)
  assert float(fws.warm_start({"w": jnp.zeros(2)}, plan=plan)["w"][0]) == expected
  assert fws.WarmStartSettings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize("bad", [-1, 1.5, "best", "min:", True])
def test_an_invalid_ckpt_step_names_the_field(bad):
  with pytest.raises(fws.WarmStartError, match="`ckpt_step` must be None"):
    fws.WarmStartSettings("/runs/old", ckpt_step=bad)


def test_a_step_that_is_not_there_is_an_error(run):
  with pytest.raises(fws.WarmStartError, match="7"):
    fws.plan({"w": jnp.zeros(2)}, fws.WarmStartSettings(run, ckpt_step=7))


def test_the_command_line_takes_step(run, capsys):
  assert cli.main(["inspect", run, "--step", "1", "--json"]) == 0
  assert '"step": 1' in capsys.readouterr().out
  assert cli.main(["plan", run, run, "--step", "min:loss"]) == 0
  assert "@step 2" in capsys.readouterr().out


def test_ckpt_step_in_a_tensorflow_directory_picks_that_prefix():
  import os

  saver = os.path.join(os.path.dirname(__file__), "fixtures", "tf", "saver")
  assert (
    fws.plan({"unused": jnp.zeros(1)}, fws.WarmStartSettings(saver, vars_to_warm_start="zzz")).checkpoints[0].step == 20
  )
  plan = fws.plan({"unused": jnp.zeros(1)}, fws.WarmStartSettings(saver, vars_to_warm_start="zzz", ckpt_step=10))
  assert plan.checkpoints[0].step == 10 and plan.checkpoints[0].format == "tensorflow"
