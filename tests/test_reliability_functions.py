"""A user's own function fails with context (issue 13, kind 5): a WarmStartError naming the leaf and the setting,
chained to the original exception."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import make_state, save_checkpoint
from flax.training import train_state

import flax_warmstart as fws

OLD = ["a", "b", "c"]
NEW = ["b", "new", "a", "c"]


@pytest.fixture
def vocab_ckpt(tmp_path):
  return save_checkpoint(
    tmp_path / "ckpt",
    {"params": {"emb": jnp.arange(6.0).reshape(3, 2), "ids": jnp.arange(6, dtype=jnp.int32).reshape(3, 2)}},
  )


def _settings(path, init, name="emb"):
  info = fws.VocabInfo(NEW, 4, 0, OLD, backup_initializer=init)
  return fws.WarmStartSettings(path, vars_to_warm_start=name, var_name_to_vocab_info={name: info})


def _state():
  return {"params": {"emb": jnp.zeros((4, 2)), "ids": jnp.zeros((4, 2), jnp.int32)}}


def _boom(key, shape, dtype=None):
  raise RuntimeError("boom")


@pytest.mark.parametrize(
  "init, match, cause",
  [
    (_boom, r"backup_initializer \(_boom\) failed .*RuntimeError: boom", RuntimeError),
    (lambda key: key, r"failed .*TypeError.*called as init\(key, shape, dtype\)", TypeError),
    (fws.MeanOfOldRows, r"is the class MeanOfOldRows; pass an instance: MeanOfOldRows\(\)", None),
    (jax.nn.initializers.normal, r"initializer factory must be called first.*normal\(0.02\)", TypeError),
    (lambda key, shape, dtype: jax.nn.initializers.normal, r"returned a function, not an array", None),
  ],
)
def test_a_failing_backup_initializer_names_the_leaf_and_setting(vocab_ckpt, init, match, cause):
  with pytest.raises(fws.WarmStartError, match=match) as err:
    fws.warm_start(_state(), _settings(vocab_ckpt, init), rng=jax.random.key(0))
  assert "var_name_to_vocab_info['emb']" in str(err.value)
  if cause is not None:
    assert isinstance(err.value.__cause__, cause)


def test_a_float_initializer_into_an_int_table_says_so(vocab_ckpt):
  with pytest.raises(fws.WarmStartError, match=r"var_name_to_vocab_info\['ids'\].*int32") as err:
    fws.warm_start(_state(), _settings(vocab_ckpt, jax.nn.initializers.normal(0.02), "ids"), rng=jax.random.key(0))
  assert err.value.__cause__ is not None


def test_a_failing_selection_callable_names_the_leaf(vocab_ckpt):
  def pick(name, leaf):
    raise KeyError(name)

  with pytest.raises(fws.WarmStartError, match=r"vars_to_warm_start callable \(.*pick\) failed on 'emb'") as err:
    fws.plan(_state(), fws.WarmStartSettings(vocab_ckpt, vars_to_warm_start=pick))
  assert isinstance(err.value.__cause__, KeyError)


@pytest.mark.parametrize(
  "init_fn, match",
  [
    (5, r"init_fn must be a function of no arguments.*int 5"),
    (lambda needed: needed, r"init_fn \(.*\) failed: TypeError.*functools.partial"),
    (functools.partial(_boom, None, None), r"init_fn \(.*\) failed: RuntimeError: boom"),
  ],
)
def test_a_bad_init_fn_says_what_is_wrong(tmp_path, init_fn, match):
  def fresh():
    return {"params": {"a": jnp.zeros(2), "b": jnp.zeros(2)}}

  path = save_checkpoint(tmp_path / "ckpt", {"params": {"a": jnp.ones(2), "b": jnp.ones(2)}})
  with pytest.raises(fws.WarmStartError, match=match):
    fws.warm_start(jax.eval_shape(fresh), fws.WarmStartSettings(path, vars_to_warm_start="a"), init_fn=init_fn)


def test_optimizer_reset_with_tx_none_says_the_optimizer_is_missing(tmp_path):
  state = make_state()
  path = save_checkpoint(tmp_path / "ckpt", state)
  no_tx = train_state.TrainState(step=0, apply_fn=None, params=state.params, tx=None, opt_state=state.opt_state)
  with pytest.raises(fws.WarmStartError, match="state.tx is None"):
    fws.warm_start(no_tx, fws.WarmStartSettings(path, optimizer_state="reset"))
  # With an optimizer it works, and the reset is the optimizer's fresh init.
  out = fws.warm_start(state.replace(tx=optax.adam(1e-2)), fws.WarmStartSettings(path, optimizer_state="reset"))
  assert int(out.opt_state[0].count) == 0


def test_warm_start_under_jit_is_refused(vocab_ckpt):
  @jax.jit
  def inside(state):
    return fws.warm_start(state, fws.WarmStartSettings(vocab_ckpt, vars_to_warm_start="ids"))

  with pytest.raises(
    fws.WarmStartError, match="tracer: warm_start reads checkpoint files and cannot run inside jax.jit"
  ):
    inside({"params": {"ids": jnp.zeros((3, 2), jnp.int32)}})
