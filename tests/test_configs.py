"""The sample Gin configs shipped in flax_warmstart/configs: each parses and runs end to end."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, assert_trees_equal, make_state, save_checkpoint
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
