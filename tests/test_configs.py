"""The sample Gin configs shipped in flax_warmstart/configs: each parses and runs end to end.

Each runs twice: in Python (`settings_from`) and from the command line as a
user types it (`flax-warmstart run OLD [NEW] OUT --gin_file CONFIG
--gin_bindings ...`, with `%INITIAL_CHECKPOINT` bound to OLD), the new model
as NEW or from code (`--init`, conftest's `fws_cli_model`).
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import MLP, assert_trees_equal, make_state, run_cli, save_checkpoint
from flax.training import train_state

gin = pytest.importorskip("gin")
import flax_warmstart as fws  # noqa: E402
import flax_warmstart.gin  # noqa: E402, F401

CONFIGS = pathlib.Path(fws.__file__).parent / "configs"


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def settings_from(config, **macros):
  bindings = [f"{name} = {value!r}" for name, value in macros.items()]
  gin.parse_config_files_and_bindings([str(CONFIGS / config)], bindings)
  return gin.get_configurable("flax_warmstart.WarmStartSettings")()


def test_every_sample_is_tested():
  # t5x_warm_start.gin binds T5X's own configurable; tests/test_t5x.py runs it.
  assert sorted(p.name for p in CONFIGS.glob("*.gin")) == sorted(
    ["all_params.gin", "new_vocabulary.gin", "rename_rules.gin", "optimizer_reset.gin", "t5x_warm_start.gin"]
  )


def test_all_params(adam_mlp):
  old, ckpt = adam_mlp
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=1)
  out = fws.warm_start(new, settings_from("all_params.gin", INITIAL_CHECKPOINT=ckpt))
  assert_trees_equal(out.params, old.params)
  assert_trees_equal(out.opt_state, new.opt_state)
  assert out.step == new.step


def test_new_vocabulary(tmp_path):
  ckpt = save_checkpoint(tmp_path / "old", {"params": {"emb": jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])}})
  (tmp_path / "old.txt").write_text("a\nb\nc")
  (tmp_path / "new.txt").write_text("c\nz\na")
  settings = settings_from(
    "new_vocabulary.gin",
    INITIAL_CHECKPOINT=ckpt,
    EMBEDDING="emb",
    NEW_VOCAB=str(tmp_path / "new.txt"),
    OLD_VOCAB=str(tmp_path / "old.txt"),
    NEW_VOCAB_SIZE=3,
  )
  live = {"params": {"emb": jnp.zeros((4, 2)), "head": jnp.full((2,), 7.0)}}
  out = fws.warm_start(live, settings, rng=jax.random.key(0))
  emb = np.asarray(out["params"]["emb"])
  np.testing.assert_array_equal(emb[0], [3.0, 3.0])
  np.testing.assert_array_equal(emb[2], [1.0, 1.0])
  assert 0 < np.abs(emb[[1, 3]]).max() < 0.2  # new token and OOV row: N(0, 0.02)
  np.testing.assert_array_equal(out["params"]["head"], [7.0, 7.0])  # vars_to_warm_start=None: only the vocab


def _adam_state(params):
  return train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2))


def test_rename_rules(tmp_path):
  old = _adam_state({"encoder": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}})
  old = old.apply_gradients(grads=jax.tree.map(jnp.ones_like, old.params))
  ckpt = save_checkpoint(tmp_path / "old", old)
  new = _adam_state({"backbone": {"encoder": {"kernel": jnp.zeros((2, 2))}}, "head": {"kernel": jnp.zeros((2, 3))}})
  out = fws.warm_start(new, settings_from("rename_rules.gin", INITIAL_CHECKPOINT=ckpt))
  assert_trees_equal(out.params["backbone"]["encoder"], old.params["encoder"])
  assert_trees_equal(out.opt_state[0].mu["backbone"]["encoder"], old.opt_state[0].mu["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])
  assert out.step == 0


def test_optimizer_reset(tmp_path):
  old = make_state(MLP(), optax.adam(1e-2), seed=0, steps=3)
  ckpt = save_checkpoint(tmp_path / "old", old)
  new = make_state(MLP(), optax.sgd(0.1, momentum=0.9), seed=1, steps=2)
  out = fws.warm_start(new, settings_from("optimizer_reset.gin", INITIAL_CHECKPOINT=ckpt))
  assert_trees_equal(out.params, old.params)
  assert_trees_equal(out.opt_state, new.tx.init(old.params))
  assert out.step == 0


# From the command line.


def restore(path):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.fspath(path))


def run(*args):
  """`flax-warmstart run ARGS` in this process; the output checkpoint read back with plain Orbax."""
  result = run_cli("run", *args, "--no-progress")
  assert result.returncode == 0, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr, result.stderr
  return result


def assert_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), (a, b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_every_sample_runs_from_the_command_line():
  tested = {
    name.removeprefix("test_cli_").removesuffix("_gin") + ".gin" for name in globals() if name.startswith("test_cli_")
  }
  assert tested == {p.name for p in CONFIGS.glob("*.gin")}


def test_cli_all_params_gin(adam_mlp, init_module, tmp_path):
  old, ckpt = adam_mlp
  out = tmp_path / "out"
  run(ckpt, out, "--init", f"{init_module}:create_state", "--gin_file", CONFIGS / "all_params.gin")
  got = restore(out)
  assert_equal(got["params"], old.params)
  assert int(got["step"]) == 0
  assert not np.any(got["opt_state"][0]["mu"]["encoder"]["kernel"])  # fresh Adam


def test_cli_new_vocabulary_gin(tmp_path):
  old = save_checkpoint(
    tmp_path / "old", {"params": {"emb": np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], np.float32)}}
  )
  new = save_checkpoint(
    tmp_path / "new", {"params": {"emb": np.zeros((4, 2), np.float32), "head": np.full(2, 7.0, np.float32)}}
  )
  (tmp_path / "old.txt").write_text("a\nb\nc")
  (tmp_path / "new.txt").write_text("c\nz\na")
  bindings = [
    "EMBEDDING = 'emb'",
    f"NEW_VOCAB = '{tmp_path / 'new.txt'}'",
    f"OLD_VOCAB = '{tmp_path / 'old.txt'}'",
    "NEW_VOCAB_SIZE = 3",
  ]
  args = ["--gin_file", CONFIGS / "new_vocabulary.gin", *(x for b in bindings for x in ("--gin_bindings", b))]
  run(old, new, tmp_path / "out", *args)  # normal(0.02) draws from jax.random.key(--seed), 0 by default
  emb = restore(tmp_path / "out")["params"]["emb"]
  np.testing.assert_array_equal(emb[0], [3.0, 3.0])
  np.testing.assert_array_equal(emb[2], [1.0, 1.0])
  assert 0 < np.abs(emb[[1, 3]]).max() < 0.2  # new token and OOV row: N(0, 0.02)
  np.testing.assert_array_equal(restore(tmp_path / "out")["params"]["head"], [7.0, 7.0])
  run(old, new, tmp_path / "seed1", *args, "--seed", "1")
  assert not np.array_equal(restore(tmp_path / "seed1")["params"]["emb"][1], emb[1])


def test_cli_rename_rules_gin(tmp_path):
  old = _adam_state({"encoder": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}})
  old = old.apply_gradients(grads=jax.tree.map(jnp.ones_like, old.params))
  ckpt = save_checkpoint(tmp_path / "old", old)
  new = _adam_state({"backbone": {"encoder": {"kernel": jnp.zeros((2, 2))}}, "head": {"kernel": jnp.zeros((2, 3))}})
  new_ckpt = save_checkpoint(tmp_path / "new", new)
  run(ckpt, new_ckpt, tmp_path / "out", "--gin_file", CONFIGS / "rename_rules.gin")
  got = restore(tmp_path / "out")
  assert_equal(got["params"]["backbone"]["encoder"], old.params["encoder"])
  assert_equal(got["opt_state"][0]["mu"]["backbone"]["encoder"], old.opt_state[0].mu["encoder"])
  assert_equal(got["params"]["head"], new.params["head"])
  assert int(got["step"]) == 0


def test_cli_optimizer_reset_gin(adam_mlp, init_module, tmp_path):
  # An optimizer reset needs the new optimizer: the new model comes from code (SGD with momentum).
  old, ckpt = adam_mlp
  out = tmp_path / "out"
  args = ["--init", f"{init_module}:create_state", "--init-arg", "optimizer='sgd'"]
  run(ckpt, out, *args, "--gin_file", CONFIGS / "optimizer_reset.gin")
  got = restore(out)
  assert_equal(got["params"], old.params)
  assert not any(np.any(x) for x in jax.tree_util.tree_leaves(got["opt_state"][0]["trace"]))
  assert int(got["step"]) == 0


def test_cli_t5x_warm_start_gin(adam_mlp, init_module, tmp_path):
  # A T5X fine-tuning config as it is: T5X's own configurable (utils.RestoreCheckpointConfig) is skipped,
  # %INITIAL_CHECKPOINT_PATH is OLD.
  old, ckpt = adam_mlp
  out = tmp_path / "out"
  init = ["--init", f"{init_module}:create_state", "--init-arg", "encoder_name=backbone"]
  result = run(ckpt, out, *init, "--gin_file", CONFIGS / "t5x_warm_start.gin")
  assert result.stdout.startswith(f"Wrote {out}: 4 of 14 leaves from {ckpt}"), result.stdout
  got = restore(out)
  assert_equal(got["params"]["backbone"], old.params["encoder"])
  assert_equal(got["params"]["head"], old.params["head"])
