"""The naming contract (flax_warmstart/naming.py) on live states and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, make_state, save_checkpoint
from flax import nnx

import flax_warmstart as fws
from flax_warmstart._src import naming
from flax_warmstart._src.sources.orbax import open_orbax


def test_params_tree_names_are_slash_joined_paths():
  tree = {"encoder": {"layer_0": {"attention": {"query": {"kernel": jnp.ones((2, 2))}}}}, "bias": jnp.ones(2)}
  assert fws.variable_names(tree) == ["bias", "encoder/layer_0/attention/query/kernel"]


def test_linen_variables_dict_finds_params_key():
  tree = {"params": {"dense": {"kernel": jnp.ones(2)}}, "batch_stats": {"bn": {"mean": jnp.ones(2)}}}
  variables, _, _ = naming.flatten_state(tree)
  assert {v.name: v.kind for v in variables} == {"batch_stats/bn/mean": "other", "dense/kernel": "param"}


def test_adam_slots_are_named_after_their_parameter():
  state = make_state(MLP(), optax.adam(1e-2))
  variables, _, _ = naming.flatten_state(state)
  by_name = {v.name: v for v in variables}
  slot = by_name["encoder/kernel/opt_state/0/mu"]
  assert (slot.kind, slot.param, slot.slot) == ("slot", "encoder/kernel", "opt_state/0/mu")
  assert by_name["opt_state/0/count"].kind == "other"
  assert by_name["step"].kind == "other"
  assert by_name["head/bias"].kind == "param"


def test_chain_and_masked_slots():
  labels = {"encoder": {"kernel": "a", "bias": "a"}, "head": {"kernel": "b", "bias": "b"}}
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.multi_transform({"a": optax.adam(1e-3), "b": optax.sgd(1e-2, momentum=0.9)}, labels),
  )
  names = fws.variable_names(make_state(MLP(), tx))
  assert "encoder/kernel/opt_state/1/inner_states/a/inner_state/0/mu" in names
  assert "head/kernel/opt_state/1/inner_states/b/inner_state/0/trace" in names
  # Masked-out parameters have no slot in the other transform.
  assert "head/kernel/opt_state/1/inner_states/a/inner_state/0/mu" not in names


def test_checkpoint_names_match_live_names(tmp_path):
  labels = {"encoder": {"kernel": "a", "bias": "a"}, "head": {"kernel": "b", "bias": "b"}}
  tx = optax.multi_transform({"a": optax.adam(1e-3), "b": optax.sgd(1e-2, momentum=0.9)}, labels)
  state = make_state(MLP(), tx)
  path = save_checkpoint(tmp_path / "ckpt", state)
  assert sorted(open_orbax(path).variables) == sorted(fws.variable_names(state))


def test_nnx_value_level_is_not_in_names(tmp_path):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.encoder = nnx.Linear(3, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)

  state = nnx.state(Model(nnx.Rngs(0)))
  variables, _, _ = naming.flatten_state(state)
  kinds = {v.name: v.kind for v in variables}
  assert kinds["encoder/kernel"] == "param"
  assert kinds["bn/mean"] == "other"
  path = save_checkpoint(tmp_path / "nnx", state)
  assert sorted(open_orbax(path).variables) == sorted(kinds)


def test_name_clash_is_an_error():
  # A parameter literally named like another leaf's root path.
  with pytest.raises(fws.WarmStartError, match="both named 'step'"):
    naming.name_paths([("step",), ("params", "step")], [False, True], ("params",))


def test_name_paths_slot_rule_needs_every_leaf_to_mirror():
  paths = [("params", "w"), ("params", "b"), ("opt", "mu", "w"), ("opt", "mu", "b"), ("opt", "count")]
  out = naming.name_paths(paths, [True, True, False, False, False], ("params",))
  assert [o[0] for o in out] == ["w", "b", "w/opt/mu", "b/opt/mu", "opt/count"]


def test_model_and_optimizer_pairs_drop_their_keys_in_any_layout():
  # Checkpoint trees (no NNX types): a pair of a model and an optimizer (opt_state and step), in a tuple or a dict.
  w, mu = {"value": jnp.ones(2)}, {"value": jnp.zeros(2)}
  optimizer = {"opt_state": {"0": {"mu": {"w": mu}, "count": {"value": 1}}}, "step": {"value": 3}}
  want = {"w": "param", "w/opt_state/0/mu": "slot", "opt_state/0/count": "other", "step": "other"}
  for tree in ({"0": {"w": w}, "1": optimizer}, {"model": {"w": w}, "optimizer": optimizer}):
    named = {v.name: v.kind for v, _ in naming.flatten_checkpoint_tree(tree)}
    assert named == want
  # nnx.ModelAndOptimizer: the model inside the optimizer.
  named = {v.name: v.kind for v, _ in naming.flatten_checkpoint_tree({"model": {"w": w}, **optimizer})}
  assert named == want
  # A Linen variables dict as the model of a pair: its params tree is found inside.
  tree = {"model": {"params": {"w": w}}, "optimizer": optimizer}
  assert {v.name: v.kind for v, _ in naming.flatten_checkpoint_tree(tree)} == want
  # Two models, or a root of other entries, keep their keys.
  assert fws.variable_names({"a": {"w": jnp.ones(2)}, "b": {"opt_state": jnp.ones(2)}}) == ["a/w", "b/opt_state"]


def test_leaf_kinds_are_named_with_their_storage_shape_and_dtype():
  state = {
    "k": jax.random.key(0),
    "r": jax.random.key(0, impl="rbg"),
    "s": "PCG64",
    "n": 3,
    "f": np.float32(1),
    "o": object(),
  }
  variables = {v.name: v for v in naming.flatten_state(state)[0]}
  assert {n: v.label for n, v in variables.items()} == {
    "k": "key<threefry2x32>",
    "r": "key<rbg>",
    "s": "str",
    "n": "scalar",
    "f": "scalar",
    "o": "object",
  }
  assert (variables["k"].shape, variables["k"].dtype, variables["k"].rng) == ((2,), np.dtype("uint32"), True)
  assert variables["r"].shape == (4,)
  assert (variables["s"].dtype, variables["o"].type_name, variables["f"].type_name) == (
    np.dtype("O"),
    "object",
    "float32",
  )
  abstract = naming.flatten_state(jax.eval_shape(lambda: {"k": jax.random.key(0, impl="rbg")}))[0][0]
  assert (abstract.label, abstract.shape) == ("key<rbg>", (4,))
