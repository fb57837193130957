"""TensorFlow's warm-start scenarios, ported to `flax_warmstart` (no vocabularies).

Ports the non-vocabulary tests of TF's
`tensorflow/python/training/warm_starting_util_test.py` (`WarmStartingUtilTest`),
numbered as in `/work/shared/reference/tf_semantics.md` section 6 table A:

* WS-1..WS-4 (`testWarmStartVar*`, partitioned variables become sharded arrays),
* WS-14..WS-17 (list of variables -> callable, list of strings, two variables
  from one previous variable, list of regexes with optimizer slots),
* WS-18..WS-21, WS-23 (sparse / bucketized column scopes, explicit checkpoint),
* WS-24 (`testWarmStart_MultipleCols`), WS-25..WS-27 without their vocabulary
  variable (`testWarmStartMoreSettings*`, `testWarmStartVarsToWarmstartIsNone`),
* WS-30 (b) and (c) (`testErrorConditions`: unused map entries),

plus the edge cases E-30..E-32 of table E, the regex-matching table of section
1.2, the shape-mismatch and missing-tensor errors of section 5, and the
unused-entry errors of section 3. TF variables are parameters of a Linen
variables dict or a `TrainState`; TF's `v/Momentum` slots are the optax
`trace` slots `v/opt_state/0/trace` of `optax.sgd(..., momentum=0.9)`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import nest, save_checkpoint, save_manager_step
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws

# `fruit_weights` of the TF tests.
FW = np.array([[0.5], [1.0], [1.5], [2.0]], np.float32)


# --------------------------------------------------------------------------- helpers


def linen(**flat):
  """A Linen variables dict `{"params": {name: array}}` of top-level parameters."""
  return {"params": dict(flat)}


def linen_named(flat):
  """A Linen variables dict from `{slash/joined/name: array}`."""
  return {"params": nest(flat)}


def get(tree, name):
  """The leaf of parameter `name` in a Linen dict or a TrainState."""
  node = tree.params if hasattr(tree, "params") else tree["params"]
  for part in name.split("/"):
    node = node[part]
  return node


def sgd_state(params):
  """A TrainState with SGD momentum: each parameter `p` has the slot `p/opt_state/0/trace`."""
  return train_state.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9))


def filled(state, value, step):
  """`state` with every parameter and slot set to `value` and the step set to `step`."""
  return state.replace(
    step=jnp.asarray(step),
    params=jax.tree.map(lambda x: jnp.full_like(x, value), state.params),
    opt_state=jax.tree.map(lambda x: jnp.full_like(x, value), state.opt_state),
  )


def trace(state, name):
  """The momentum slot of parameter `name` (TF's `name/Momentum`)."""
  node = state.opt_state[0].trace
  for part in name.split("/"):
    node = node[part]
  return node


def changed_names(before, after):
  """Names (naming contract) of the leaves whose value differs between two states."""
  names = fws.variable_names(before)
  old, new = jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)
  assert len(names) == len(old) == len(new)
  return {n for n, a, b in zip(names, old, new, strict=True) if not np.array_equal(np.asarray(a), np.asarray(b))}


def assert_value(x, expected):
  np.testing.assert_array_equal(np.asarray(x), np.asarray(expected))


def mentions_shape(message, shape):
  """Whether `message` shows `shape` as a tuple or a list."""
  return str(tuple(shape)) in message or str(list(shape)) in message


def rng_weights(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- WS-1..WS-4


@pytest.mark.parametrize(
  "ckpt_spec, live_spec",
  [
    (None, None),  # WS-1 testWarmStartVar
    (P("a", None), None),  # WS-2 testWarmStartVarPrevVarPartitioned
    (None, P("a", None)),  # WS-3 testWarmStartVarCurrentVarPartitioned
  ],
  ids=["ws1_plain", "ws2_ckpt_sharded", "ws3_live_sharded"],
)
def test_ws1_to_ws3_plain_copy(tmp_path, mesh, ckpt_spec, live_spec):
  saved = jnp.asarray(FW) if ckpt_spec is None else jax.device_put(FW, NamedSharding(mesh, ckpt_spec))
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(fruit_weights=saved))
  live = jnp.zeros((4, 1))
  if live_spec is not None:
    live = jax.device_put(live, NamedSharding(mesh, live_spec))

  out = fws.warm_start(linen(fruit_weights=live), ckpt)

  assert_value(out["params"]["fruit_weights"], FW)
  assert out["params"]["fruit_weights"].sharding == live.sharding
  if live_spec is not None:
    # The TF parts [[0.5], [1.]] and [[1.5], [2.]] are the two row shards.
    rows = sorted({tuple(np.asarray(s.data).ravel()) for s in out["params"]["fruit_weights"].addressable_shards})
    assert rows == [(0.5, 1.0), (1.5, 2.0)]


def test_ws4_rename_both_sides_sharded_keeps_live_sharding(tmp_path, mesh):
  ckpt_sharding = NamedSharding(mesh, P("a", None))
  live_sharding = NamedSharding(mesh, P("b", None))
  ckpt = save_checkpoint(tmp_path / "ckpt", linen_named({"old_scope/fruit_weights": jax.device_put(FW, ckpt_sharding)}))
  live = linen_named(
    {"new_scope/fruit_weights": jax.device_put(jnp.zeros((4, 1)), live_sharding), "other": jnp.zeros((3,))}
  )
  settings = fws.WarmStartSettings(
    ckpt,
    vars_to_warm_start="new_scope",
    var_name_to_prev_var_name={"new_scope/fruit_weights": "old_scope/fruit_weights"},
  )

  out = fws.warm_start(live, settings)

  got = get(out, "new_scope/fruit_weights")
  assert_value(got, FW)
  assert got.sharding == live_sharding
  assert {s.data.shape for s in got.addressable_shards} == {(1, 1)}
  assert_value(get(out, "other"), np.zeros(3))


# --------------------------------------------------------------------------- WS-14..WS-17


def test_ws14_callable_selects_exact_arrays(tmp_path):
  # TF passes a list of Variable objects; here a callable `(name, leaf) -> bool` selects arrays.
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(v1=jnp.ones((10, 1)), v2=jnp.ones((10, 1))))
  live = linen(v1=jnp.zeros((10, 1)), v2=jnp.zeros((10, 1)))
  chosen = live["params"]["v1"]

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=lambda name, leaf: leaf is chosen))

  assert_value(out["params"]["v1"], np.ones((10, 1)))
  assert_value(out["params"]["v2"], np.zeros((10, 1)))


def test_ws14_callable_sees_every_leaf_including_slots(tmp_path):
  live = sgd_state({"v1": jnp.zeros((10, 1)), "v2": jnp.zeros((10, 1))})
  ckpt = save_checkpoint(tmp_path / "ckpt", filled(live, 1.0, step=3))
  seen = []

  def select(name, leaf):
    seen.append(name)
    return name.startswith("v1")

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=select))

  assert set(seen) >= {"step", "v1", "v2", "v1/opt_state/0/trace", "v2/opt_state/0/trace"}
  assert changed_names(live, out) == {"v1", "v1/opt_state/0/trace"}


def test_ws15_list_of_strings(tmp_path):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(v1=jnp.ones((10, 1)), v2=jnp.ones((10, 1))))
  live = linen(v1=jnp.zeros((10, 1)), v2=jnp.zeros((10, 1)))

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=["v1"]))

  assert_value(out["params"]["v1"], np.ones((10, 1)))
  assert_value(out["params"]["v2"], np.zeros((10, 1)))


def test_ws16_two_vars_from_the_same_prev_var(tmp_path):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(v1=jnp.ones((10, 1))))
  live = linen(v1=jnp.zeros((10, 1)), v2=jnp.zeros((10, 1)))
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=["v1", "v2"], var_name_to_prev_var_name={"v2": "v1"})

  out = fws.warm_start(live, settings)

  assert_value(out["params"]["v1"], np.ones((10, 1)))
  assert_value(out["params"]["v2"], np.ones((10, 1)))
  assert {(leaf.name, leaf.source) for leaf in fws.plan(live, settings).loaded} == {("v1", "v1"), ("v2", "v1")}


def _ws17_states(tmp_path):
  live = sgd_state({"v1": jnp.zeros((10, 1)), "v2": jnp.zeros((10, 1))})
  ckpt = save_checkpoint(tmp_path / "ckpt", filled(live, 1.0, step=7))
  return live, ckpt


def _assert_ws17(live, out):
  assert_value(out.params["v1"], np.ones((10, 1)))
  assert_value(trace(out, "v1"), np.ones((10, 1)))
  assert_value(out.params["v2"], np.ones((10, 1)))
  assert_value(trace(out, "v2"), np.zeros((10, 1)))
  assert int(out.step) == 0
  assert changed_names(live, out) == {"v1", "v1/opt_state/0/trace", "v2"}


def test_ws17_list_of_regexes_with_slots(tmp_path):
  live, ckpt = _ws17_states(tmp_path)
  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=["v1", "v2[^/]"]))
  _assert_ws17(live, out)


def test_tuple_of_regexes_is_accepted_like_a_list(tmp_path):
  # TF raises ValueError("vars_to_warm_start must be a `list` or `str`") for a tuple.
  live, ckpt = _ws17_states(tmp_path)
  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=("v1", "v2[^/]")))
  _assert_ws17(live, out)


def test_e31_overlapping_list_regexes_select_a_leaf_once(tmp_path):
  # TF raises "At least two variables have the same name: v1/Momentum" for ["v1", "v1/Momentum"].
  live, ckpt = _ws17_states(tmp_path)
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=["v1", "v1/opt_state/0/trace"])

  out = fws.warm_start(live, settings)

  assert changed_names(live, out) == {"v1", "v1/opt_state/0/trace"}
  plan = fws.plan(live, settings)
  assert len(plan.leaves) == len(jax.tree_util.tree_leaves(live))
  assert sorted(leaf.name for leaf in plan.loaded) == ["v1", "v1/opt_state/0/trace"]


# --------------------------------------------------------------------------- section 1.2 regex table


REGEX_PARAMS = ("v1", "v10", "v2", "v20", "v2_b")


def _slots(*names):
  return {f"{n}/opt_state/0/trace" for n in names}


@pytest.mark.parametrize(
  "spec, expected",
  [
    (["v1"], {"v1", "v10"} | _slots("v1", "v10")),
    (["v2[^/]"], {"v2", "v20", "v2_b"} | _slots("v20", "v2_b")),
    (["v2"], {"v2", "v20", "v2_b"} | _slots("v2", "v20", "v2_b")),
    (["v1:0$"], {"v1"}),
    (["trace"], set()),  # re.match, not re.search: like TF's "Momentum".
    ([".*trace"], _slots(*REGEX_PARAMS)),
    (".*", set(REGEX_PARAMS)),  # A str selects parameters only (TF TRAINABLE).
    ("v2", {"v2", "v20", "v2_b"}),
    ([".*"], set(REGEX_PARAMS) | _slots(*REGEX_PARAMS) | {"step"}),  # A list selects every leaf (TF GLOBAL).
  ],
)
def test_regex_matching_is_tf_re_match_on_name_and_tensor_name(tmp_path, spec, expected):
  live = sgd_state({n: jnp.zeros((3,)) for n in REGEX_PARAMS})
  ckpt = save_checkpoint(tmp_path / "ckpt", filled(live, 1.0, step=5))

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=spec))

  assert changed_names(live, out) == expected


def test_dollar_anchored_regex_selects_the_bare_name(tmp_path):
  # TF selects nothing for "v1$" because TF names end in ":0"; here the bare name matches.
  live = sgd_state({"v1": jnp.zeros((3,)), "v10": jnp.zeros((3,))})
  ckpt = save_checkpoint(tmp_path / "ckpt", filled(live, 1.0, step=5))

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start="v1$"))
  assert changed_names(live, out) == {"v1"}

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=["v1$"]))
  assert changed_names(live, out) == {"v1"}


# --------------------------------------------------------------------------- WS-18..WS-24


COLUMNS = {
  "sc_int": (10, 1),
  "sc_hash": (15, 1),
  "sc_keys": (4, 1),
  "sc_vocab": (4, 1),
  "real_bucketized": (5, 1),
  "sc_keys_X_sc_vocab": (20, 1),
}


def _column_values():
  values = {f"linear_model/{c}/weights": rng_weights(i, shape) for i, (c, shape) in enumerate(COLUMNS.items())}
  values["linear_model/bias_weights"] = rng_weights(99, (1,))
  return values


@pytest.mark.parametrize(
  "regex, column",
  [
    (".*sc_int.*", "sc_int"),  # WS-18 testWarmStart_SparseColumnIntegerized
    (".*sc_hash.*", "sc_hash"),  # WS-19 testWarmStart_SparseColumnHashed
    (".*sc_vocab.*", "sc_vocab"),  # WS-20 testWarmStart_SparseColumnVocabulary (no VocabInfo: plain copy)
    (".*real_bucketized.*", "real_bucketized"),  # WS-23 testWarmStart_BucketizedColumn
  ],
  ids=["ws18_sc_int", "ws19_sc_hash", "ws20_sc_vocab", "ws23_real_bucketized"],
)
def test_ws18_to_ws23_str_regex_selects_one_column_scope(tmp_path, regex, column):
  values = _column_values()
  ckpt = save_checkpoint(tmp_path / "ckpt", linen_named({k: jnp.asarray(v) for k, v in values.items()}))
  live = linen_named({k: jnp.zeros(v.shape) for k, v in values.items()})

  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, vars_to_warm_start=regex))

  name = f"linear_model/{column}/weights"
  assert_value(get(out, name), values[name])
  # ".*sc_vocab.*" also matches linear_model/sc_keys_X_sc_vocab/weights, as it would in TF.
  expected = {n for n in values if re.match(regex, n)}
  assert name in expected and len(expected) == (2 if column == "sc_vocab" else 1)
  assert changed_names(live, out) == expected
  for n in expected:
    assert_value(get(out, n), values[n])


def test_ws21_explicit_checkpoint_dir(tmp_path):
  name = "linear_model/sc_vocab/weights"
  root = tmp_path / "model"
  save_manager_step(root, 0, linen_named({name: jnp.ones((4, 1))}))
  save_manager_step(root, 1, linen_named({name: jnp.full((4, 1), 2.0)}))
  live = linen_named({name: jnp.zeros((4, 1))})

  # A run directory means its latest checkpoint (TF: latest_checkpoint(dir)).
  latest = fws.warm_start(live, fws.WarmStartSettings(root, vars_to_warm_start=".*sc_vocab.*"))
  assert_value(get(latest, name), np.full((4, 1), 2.0))

  # An explicit checkpoint (TF: "<dir>/model-0") is read as given.
  explicit = fws.warm_start(live, fws.WarmStartSettings(root / "0", vars_to_warm_start=".*sc_vocab.*"))
  assert_value(get(explicit, name), np.ones((4, 1)))

  # A StandardCheckpointer directory named like TF's checkpoint prefix.
  plain = save_checkpoint(tmp_path / "model-0", linen_named({name: jnp.full((4, 1), 3.0)}))
  out = fws.warm_start(live, fws.WarmStartSettings(plain, vars_to_warm_start=".*sc_vocab.*"))
  assert_value(get(out, name), np.full((4, 1), 3.0))


def test_ws24_default_settings_copy_every_param_including_rank1_bias(tmp_path):
  values = _column_values()
  ckpt = save_checkpoint(tmp_path / "ckpt", linen_named({k: jnp.asarray(v) for k, v in values.items()}))
  live = linen_named({k: jnp.zeros(v.shape) for k, v in values.items()})

  out = fws.warm_start(live, ckpt)  # A path alone means vars_to_warm_start=".*".

  assert len(values) == 7
  for name, value in values.items():
    assert_value(get(out, name), value)
  assert get(out, "linear_model/bias_weights").shape == (1,)


def test_ws24_default_str_regex_leaves_slots_and_step(tmp_path):
  # TF's default ".*" searches TRAINABLE variables only: Momentum slots and global_step are kept.
  live = sgd_state({"linear_model": {"sc_int": {"weights": jnp.zeros((10, 1))}, "bias_weights": jnp.zeros((1,))}})
  ckpt = save_checkpoint(tmp_path / "ckpt", filled(live, 1.0, step=9))

  out = fws.warm_start(live, ckpt)

  assert changed_names(live, out) == {"linear_model/sc_int/weights", "linear_model/bias_weights"}
  assert int(out.step) == 0


# --------------------------------------------------------------------------- WS-25..WS-27, E-30


K = np.array([[0.25], [0.75], [1.25], [1.75]], np.float32)
SC_KEYS = "linear_model/sc_keys/weights"
SC_HASH = "linear_model/sc_hash/weights"


def _more_settings_ckpt(tmp_path):
  # The vocabulary variable linear_model/sc_vocab/weights is in the checkpoint but not in the
  # live state: its VocabInfo remap is not ported here.
  return save_checkpoint(
    tmp_path / "ckpt",
    linen_named(
      {
        SC_HASH: jnp.asarray(rng_weights(1, (15, 1))),
        "some_other_name": jnp.asarray(K),
        "linear_model/sc_vocab/weights": jnp.asarray([[0.5], [1.0], [2.0], [3.0]]),
      }
    ),
  )


@pytest.mark.parametrize("sharded", [True, False], ids=["ws25_sharded", "ws26_unsharded"])
def test_ws25_ws26_more_settings_rename_and_unselected_scope(tmp_path, mesh, sharded):
  ckpt = _more_settings_ckpt(tmp_path)
  keys, hashed = jnp.zeros((4, 1)), jnp.zeros((15, 1))
  if sharded:
    keys = jax.device_put(keys, NamedSharding(mesh, P("a", None)))
    hashed = jax.device_put(hashed, NamedSharding(mesh, P()))  # 15 rows: TF's 8 + 7 split has no even analogue.
  live = linen_named({SC_KEYS: keys, SC_HASH: hashed})
  settings = fws.WarmStartSettings(
    ckpt, vars_to_warm_start=".*(sc_keys|sc_vocab).*", var_name_to_prev_var_name={SC_KEYS: "some_other_name"}
  )

  out = fws.warm_start(live, settings)

  assert_value(get(out, SC_KEYS), K)
  assert_value(get(out, SC_HASH), np.zeros((15, 1)))
  assert get(out, SC_KEYS).sharding == keys.sharding
  if sharded:
    rows = sorted(tuple(np.asarray(s.data).ravel()) for s in get(out, SC_KEYS).addressable_shards)
    assert set(rows) == {(0.25, 0.75), (1.25, 1.75)}


def test_ws27_vars_to_warm_start_none_skips_renamed_var_without_unused_error(tmp_path):
  ckpt = _more_settings_ckpt(tmp_path)
  live = linen_named({SC_KEYS: jnp.zeros((4, 1)), SC_HASH: jnp.zeros((15, 1))})
  settings = fws.WarmStartSettings(
    ckpt, vars_to_warm_start=None, var_name_to_prev_var_name={SC_KEYS: "some_other_name"}
  )

  out = fws.warm_start(live, settings)  # No "not used" error: the entry names a grouped parameter.

  assert_value(get(out, SC_KEYS), np.zeros((4, 1)))
  assert_value(get(out, SC_HASH), np.zeros((15, 1)))
  assert fws.plan(live, settings).loaded == ()


@pytest.mark.parametrize("spec", ["", None], ids=["empty_str", "none"])
def test_e30_empty_or_none_without_vocab_loads_nothing(tmp_path, spec):
  live = sgd_state({"v1": jnp.zeros((10, 1)), "v2": jnp.zeros((10, 1))})
  ckpt = save_checkpoint(tmp_path / "ckpt", filled(live, 1.0, step=5))
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=spec)

  out = fws.warm_start(live, settings)

  assert changed_names(live, out) == set()
  assert fws.plan(live, settings).loaded == ()


# --------------------------------------------------------------------------- prev renames carry slots


def test_prev_rename_of_a_param_carries_its_optimizer_slots(tmp_path):
  old = filled(sgd_state({"old": {"w": jnp.zeros((3, 2))}}), 0.0, step=7)
  old = old.replace(
    params={"old": {"w": jnp.ones((3, 2))}},
    opt_state=jax.tree.map(lambda x: jnp.full_like(x, 2.0), old.opt_state),
  )
  ckpt = save_checkpoint(tmp_path / "ckpt", old)
  live = sgd_state({"new": {"w": jnp.zeros((3, 2))}})
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=[".*"], var_name_to_prev_var_name={"new/w": "old/w"})

  out = fws.warm_start(live, settings)

  assert_value(out.params["new"]["w"], np.ones((3, 2)))
  assert_value(trace(out, "new/w"), np.full((3, 2), 2.0))
  assert int(out.step) == 7
  sources = {leaf.name: leaf.source for leaf in fws.plan(live, settings).loaded}
  assert sources == {"step": "step", "new/w": "old/w", "new/w/opt_state/0/trace": "old/w/opt_state/0/trace"}


# --------------------------------------------------------------------------- errors: unused entries


@pytest.mark.parametrize(
  "prev, key", [({"v1": ""}, "v1"), ({"v1:0": "v2"}, "v1:0")], ids=["empty_value", "tensor_name_key"]
)
def test_e32_unusable_prev_entries_raise(tmp_path, no_reads, prev, key):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(v1=jnp.ones((10, 1)), v2=jnp.ones((10, 1))))
  live = linen(v1=jnp.zeros((10, 1)))

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_prev_var_name=prev))

  assert isinstance(info.value, ValueError)
  assert len(info.value.problems) == 1
  assert repr(key) in info.value.problems[0]


def test_ws30c_prev_entry_for_unknown_var_raises(tmp_path, no_reads):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(x=jnp.ones((4, 1))))
  live = linen(x=jnp.zeros((4, 1)))

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_prev_var_name={"y": "y2"}))

  assert len(info.value.problems) == 1
  assert "'y'" in info.value.problems[0]


def test_ws30b_vocab_entry_for_unknown_var_raises_before_touching_vocab_files(tmp_path, monkeypatch, no_reads):
  monkeypatch.chdir(tmp_path)  # new.txt and old.txt do not exist: reading them would fail differently.
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(x=jnp.ones((4, 1))))
  live = linen(x=jnp.zeros((4, 1)))
  settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"y": fws.VocabInfo("new.txt", 1, 0, "old.txt")})

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, settings)

  assert len(info.value.problems) == 1
  assert "'y'" in info.value.problems[0]


def test_vocab_entry_for_unselected_var_raises(tmp_path, monkeypatch, no_reads):
  monkeypatch.chdir(tmp_path)
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(x=jnp.ones((4, 1)), z=jnp.ones((4, 1))))
  live = linen(x=jnp.zeros((4, 1)), z=jnp.zeros((4, 1)))
  settings = fws.WarmStartSettings(
    ckpt, vars_to_warm_start="x", var_name_to_vocab_info={"z": fws.VocabInfo("new.txt", 1, 0, "old.txt")}
  )

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, settings)

  assert len(info.value.problems) == 1
  assert "'z'" in info.value.problems[0]


# --------------------------------------------------------------------------- errors: section 5


def test_shape_mismatch_names_both_shapes_and_both_names(tmp_path, no_reads):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen_named({"old/a": jnp.ones((1, 2))}))
  live = linen_named({"new/a": jnp.zeros((2, 1))})

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_prev_var_name={"new/a": "old/a"}))

  message = str(info.value)
  assert "new/a" in message and "old/a" in message
  assert mentions_shape(message, (2, 1)) and mentions_shape(message, (1, 2))


def test_shape_mismatch_of_rank_with_same_name_raises(tmp_path, no_reads):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(a=jnp.ones((1, 2))))

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(linen(a=jnp.zeros((2,))), ckpt)

  assert "'a'" in str(info.value)
  assert mentions_shape(str(info.value), (2,))
  assert mentions_shape(str(info.value), (1, 2))


@pytest.mark.parametrize("renamed", [False, True], ids=["own_name", "prev_name"])
def test_missing_tensor_names_it_and_suggests_closest(tmp_path, no_reads, renamed):
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(fruit_weights=jnp.asarray(FW), bias=jnp.zeros((1,))))
  if renamed:
    live = linen_named({"fruit/w": jnp.zeros((4, 1))})
    settings = fws.WarmStartSettings(ckpt, var_name_to_prev_var_name={"fruit/w": "fruit_weigths"})
  else:
    live = linen(fruit_weigths=jnp.zeros((4, 1)))
    settings = fws.WarmStartSettings(ckpt)

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, settings)

  assert len(info.value.problems) == 1
  problem = info.value.problems[0]
  assert "'fruit_weigths'" in problem
  assert "'fruit_weights'" in problem


def test_several_problems_are_reported_together(tmp_path, monkeypatch, no_reads):
  monkeypatch.chdir(tmp_path)
  ckpt = save_checkpoint(tmp_path / "ckpt", linen(a=jnp.ones((1, 2)), fruit_weights=jnp.asarray(FW)))
  live = linen(a=jnp.zeros((2, 1)), fruit_weigths=jnp.zeros((4, 1)))
  settings = fws.WarmStartSettings(
    ckpt,
    var_name_to_prev_var_name={"y": "y2"},
    var_name_to_vocab_info={"zz": fws.VocabInfo("new.txt", 1, 0, "old.txt")},
  )

  with pytest.raises(fws.WarmStartError) as info:
    fws.warm_start(live, settings)

  problems = info.value.problems
  assert len(problems) == 4
  for needle in ("'y'", "'zz'", "'fruit_weigths'", "'a'"):
    assert any(needle in p for p in problems), (needle, problems)
    assert needle in str(info.value)
