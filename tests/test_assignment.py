"""init_from_checkpoint / plan_init_from_checkpoint: TensorFlow's assignment maps.

Ports `checkpoint_utils_test.py::CheckpointsTest` (CU-1..CU-9 of
/work/shared/reference/tf_semantics.md, section 6 table B) and the edge cases
E-33..E-35 observed under TF 2.21, with TensorFlow's expected values. Where
flax_warmstart is deliberately stricter than TensorFlow, the test says what
TensorFlow does instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, assert_trees_equal, make_state, save_checkpoint
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws

# ---------------------------------------------------------------------------
# The checkpoint of CheckpointsTest: var1[1,10], var2[10,10], var3[100,100],
# useful_scope/var4[9,9], with values v1..v4.

_RNG = np.random.default_rng(0)
V1 = _RNG.standard_normal((1, 10)).astype(np.float32)
V2 = _RNG.standard_normal((10, 10)).astype(np.float32)
V3 = _RNG.standard_normal((100, 100)).astype(np.float32)
V4 = _RNG.standard_normal((9, 9)).astype(np.float32)


@pytest.fixture(scope="module")
def cu_ckpt(tmp_path_factory):
  tree = {
    "var1": jnp.asarray(V1),
    "var2": jnp.asarray(V2),
    "var3": jnp.asarray(V3),
    "useful_scope": {"var4": jnp.asarray(V4)},
  }
  return save_checkpoint(tmp_path_factory.mktemp("cu") / "ckpt", tree)


def zeros(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


def np_equal(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# CU-1


def test_cu1_list_variables_sorted_names_and_shapes(cu_ckpt):
  assert fws.list_variables(cu_ckpt) == [
    ("useful_scope/var4", (9, 9)),
    ("var1", (1, 10)),
    ("var2", (10, 10)),
    ("var3", (100, 100)),
  ]


# ---------------------------------------------------------------------------
# CU-3: a variable and a scope; then a list of pairs, one tensor into two variables.


def _cu3_state():
  return {
    "some_scope": {
      "my1": zeros(1, 10),
      "some_other_scope": {
        "my2": zeros(10, 10),
        "other_useful_scope": {"var4": zeros(9, 9)},
      },
    },
    "my3": zeros(100, 100),
    "my3b": zeros(100, 100),
  }


def test_cu3_init_from_checkpoint_dict_then_list(cu_ckpt):
  state = _cu3_state()
  state = fws.init_from_checkpoint(
    state,
    cu_ckpt,
    {"var1": "some_scope/my1", "useful_scope/": "some_scope/some_other_scope/other_useful_scope/"},
  )
  np_equal(state["some_scope"]["my1"], V1)
  np_equal(state["some_scope"]["some_other_scope"]["other_useful_scope"]["var4"], V4)
  # Not in the first map: unchanged.
  np_equal(state["some_scope"]["some_other_scope"]["my2"], np.zeros((10, 10)))
  np_equal(state["my3"], np.zeros((100, 100)))

  state = fws.init_from_checkpoint(
    state,
    cu_ckpt,
    [("var2", "some_scope/some_other_scope/my2"), ("var3", "my3"), ("var3", "my3b")],
  )
  np_equal(state["some_scope"]["my1"], V1)
  np_equal(state["some_scope"]["some_other_scope"]["my2"], V2)
  np_equal(state["my3"], V3)
  np_equal(state["my3b"], V3)  # one tensor into two variables
  np_equal(state["some_scope"]["some_other_scope"]["other_useful_scope"]["var4"], V4)


def test_plan_rows_show_copy_with_source_and_keep(cu_ckpt, no_reads):
  plan = fws.plan_init_from_checkpoint(
    _cu3_state(), cu_ckpt, [("var1", "some_scope/my1"), ("var3", "my3"), ("var3", "my3b")]
  )
  assert isinstance(plan, fws.WarmStartPlan)
  rows = {row.name: row for row in plan.leaves}
  assert set(rows) == {
    "some_scope/my1",
    "some_scope/some_other_scope/my2",
    "some_scope/some_other_scope/other_useful_scope/var4",
    "my3",
    "my3b",
  }
  assert (rows["some_scope/my1"].action, rows["some_scope/my1"].source) == ("load", "var1")
  assert (rows["my3"].action, rows["my3"].source) == ("load", "var3")
  assert (rows["my3b"].action, rows["my3b"].source) == ("load", "var3")
  assert rows["my3"].source_shape == (100, 100)
  for name in ("some_scope/some_other_scope/my2", "some_scope/some_other_scope/other_useful_scope/var4"):
    assert rows[name].action == "keep"
    assert rows[name].source is None
  assert {row.name for row in plan.loaded} == {"some_scope/my1", "my3", "my3b"}


def test_plan_of_a_scope_mapping_names_each_source(cu_ckpt, no_reads):
  state = {"new": {"var4": zeros(9, 9)}, "other": zeros(2)}
  plan = fws.plan_init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "new/"})
  assert [(row.name, row.action, row.source) for row in plan.leaves] == [
    ("new/var4", "load", "useful_scope/var4"),
    ("other", "keep", None),
  ]


# ---------------------------------------------------------------------------
# CU-4


def test_cu4_scope_does_not_capture_suffixes(cu_ckpt):
  var5 = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  state = {"useful_scope": {"var4": zeros(9, 9)}, "useful_scope_1": {"var5": var5}}
  out = fws.init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "useful_scope/"})
  np_equal(out["useful_scope"]["var4"], V4)
  # `useful_scope/` does not capture `useful_scope_1/`: var5 is unchanged (and
  # is not looked up as `useful_scope/_1/var5`, which would be an error).
  np_equal(out["useful_scope_1"]["var5"], [[1, 2], [3, 4]])


# ---------------------------------------------------------------------------
# CU-5, CU-6 and the other scope forms of section 4.


def test_cu5_init_from_root_checkpoint(cu_ckpt):
  state = {
    "some_scope": {
      "var1": zeros(1, 10),
      "var2": zeros(10, 10),
      "var3": zeros(100, 100),
      "useful_scope": {"var4": zeros(9, 9)},
    }
  }
  out = fws.init_from_checkpoint(state, cu_ckpt, {"/": "some_scope/"})
  np_equal(out["some_scope"]["var1"], V1)
  np_equal(out["some_scope"]["var2"], V2)
  np_equal(out["some_scope"]["var3"], V3)
  np_equal(out["some_scope"]["useful_scope"]["var4"], V4)


def test_cu6_init_to_root_checkpoint(cu_ckpt):
  state = {
    "var1": zeros(1, 10),
    "var2": zeros(10, 10),
    "var3": zeros(100, 100),
    "useful_scope": {"var4": zeros(9, 9)},
  }
  out = fws.init_from_checkpoint(state, cu_ckpt, {"/": "/"})
  np_equal(out["var1"], V1)
  np_equal(out["var2"], V2)
  np_equal(out["var3"], V3)
  np_equal(out["useful_scope"]["var4"], V4)


def test_scope_into_root_loads_every_variable(cu_ckpt):
  # {"old/": "/"}: every variable `<name>` <- `old/<name>`.
  out = fws.init_from_checkpoint({"var4": zeros(9, 9)}, cu_ckpt, {"useful_scope/": "/"})
  np_equal(out["var4"], V4)


def test_scope_mapping_is_recursive(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"old": {"sub": {"deep": {"v": jnp.full((2,), 3.0)}}, "w": jnp.ones(3)}})
  state = {"new": {"sub": {"deep": {"v": zeros(2)}}, "w": zeros(3)}}
  out = fws.init_from_checkpoint(state, path, {"old/": "new/"})
  np_equal(out["new"]["sub"]["deep"]["v"], [3.0, 3.0])
  np_equal(out["new"]["w"], [1.0, 1.0, 1.0])


def test_scope_into_an_existing_variable_is_a_one_to_one_mapping(cu_ckpt, no_reads):
  # TF: {"old/": "existing_var"} is a 1-to-1 mapping, so "Tensor old/ is not found".
  state = {"var4": zeros(9, 9)}
  with pytest.raises(fws.WarmStartError, match=r"Tensor 'useful_scope/' is not found"):
    fws.init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "var4"})


# ---------------------------------------------------------------------------
# CU-7: partitioned variables -> sharded arrays. The checkpoint is written with
# one sharding and read into arrays sharded differently; values line up and
# each result keeps its live sharding.


def test_cu7_partitioned_to_sharded(tmp_path, mesh):
  value = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
  saved = jax.device_put(value, NamedSharding(mesh, P("a", None)))
  path = save_checkpoint(tmp_path / "ckpt", {"scope": {"var1": saved}})

  shardings = {
    "my1": NamedSharding(mesh, P(None, "b")),
    "var1": NamedSharding(mesh, P("b", None)),
    "rep": NamedSharding(mesh, P()),
  }
  state = {
    "some_scope": {"my1": jax.device_put(np.zeros((100, 100), np.float32), shardings["my1"])},
    "some_other_scope": {"var1": jax.device_put(np.zeros((100, 100), np.float32), shardings["var1"])},
    "replicated": {"var1": jax.device_put(np.zeros((100, 100), np.float32), shardings["rep"])},
  }

  # A var mapping and a scope mapping (the dict of testInitFromPartitionVar).
  out = fws.init_from_checkpoint(state, path, {"scope/var1": "some_scope/my1", "scope/": "some_other_scope/"})
  np_equal(out["some_scope"]["my1"], value)
  np_equal(out["some_other_scope"]["var1"], value)
  assert out["some_scope"]["my1"].sharding == shardings["my1"]
  assert out["some_other_scope"]["var1"].sharding == shardings["var1"]
  np_equal(out["replicated"]["var1"], np.zeros((100, 100)))
  assert out["replicated"]["var1"].sharding == shardings["rep"]

  # Into a replicated array, by a scope mapping and a var mapping.
  out = fws.init_from_checkpoint(state, path, [("scope/", "replicated/"), ("scope/var1", "some_scope/my1")])
  np_equal(out["replicated"]["var1"], value)
  assert out["replicated"]["var1"].sharding == shardings["rep"]
  np_equal(out["some_scope"]["my1"], value)
  assert out["some_scope"]["my1"].sharding == shardings["my1"]
  np_equal(out["some_other_scope"]["var1"], np.zeros((100, 100)))
  assert out["some_other_scope"]["var1"].sharding == shardings["var1"]


# ---------------------------------------------------------------------------
# CU-8: errors, all WarmStartError (a ValueError), raised before any read.


def _cu8_state():
  # TF uses int64 for my2; JAX's default x32 mode makes it int32.
  return {"some_scope": {"my1": zeros(10, 10), "my2": zeros(1, 10, dtype=jnp.int32)}}


def test_cu8a_no_checkpoint(tmp_path, no_reads):
  missing = tmp_path / "no_dir"
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(_cu8_state(), missing, {"var1": "some_scope/my1"})
  assert isinstance(err.value, ValueError)
  assert "no_dir" in str(err.value)
  with pytest.raises(fws.WarmStartError):
    fws.plan_init_from_checkpoint(_cu8_state(), missing, {"var1": "some_scope/my1"})


def test_cu8b_missing_tensor(cu_ckpt, no_reads):
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(_cu8_state(), cu_ckpt, {"no_var": "some_scope/my1"})
  text = str(err.value)
  assert "'no_var'" in text and "not found" in text
  assert "Closest names:" in text and "'var1'" in text
  assert str(cu_ckpt) in text


def test_cu8c_target_is_neither_variable_nor_scope(cu_ckpt, no_reads):
  # TF: "Assignment map with scope only name some_scope should map to scope only var3."
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(_cu8_state(), cu_ckpt, {"var3": "some_scope/no_var"})
  text = str(err.value)
  assert "'some_scope/no_var'" in text
  assert "neither a variable" in text


def test_cu8d_shape_mismatch(cu_ckpt, no_reads):
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(_cu8_state(), cu_ckpt, {"var1": "some_scope/my1"})
  text = str(err.value)
  assert "'some_scope/my1'" in text and "'var1'" in text
  assert "(10, 10)" in text and "(1, 10)" in text


def test_cu8e_tensor_missing_under_scope(cu_ckpt, no_reads):
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(_cu8_state(), cu_ckpt, {"useful_scope/": "some_scope/"})
  text = str(err.value)
  # TF: "Tensor useful_scope/my1 (my1 in useful_scope/) is not found in <dir> checkpoint".
  assert "'useful_scope/my1'" in text and "'useful_scope/my2'" in text
  assert "not found" in text
  # Every problem is listed at once.
  assert len(err.value.problems) == 2


def test_cu8f_scope_target_needs_scope_source(cu_ckpt, no_reads):
  # TF: "Assignment map with scope only name some_scope should map to scope only useful_scope."
  with pytest.raises(fws.WarmStartError, match="scope only") as err:
    fws.init_from_checkpoint(_cu8_state(), cu_ckpt, {"useful_scope": "some_scope/"})
  assert "'useful_scope'" in str(err.value) and "'some_scope/'" in str(err.value)


def test_errors_are_collected_and_plan_raises_them_too(cu_ckpt, no_reads):
  amap = {"no_var": "some_scope/my1", "var1": "some_scope/my1", "var3": "some_scope/zz"}
  for fn in (fws.init_from_checkpoint, fws.plan_init_from_checkpoint):
    with pytest.raises(fws.WarmStartError) as err:
      fn(_cu8_state(), cu_ckpt, amap)
    assert len(err.value.problems) == 3, err.value.problems


@pytest.mark.parametrize("amap", ["var1", 3, [("var1",)], [("var1", 2)]])
def test_malformed_maps(cu_ckpt, no_reads, amap):
  with pytest.raises(fws.WarmStartError):
    fws.init_from_checkpoint(_cu8_state(), cu_ckpt, amap)


# ---------------------------------------------------------------------------
# CU-9


def test_cu9_initial_value_comes_from_checkpoint(cu_ckpt):
  state = {"some_scope": {"my1": zeros(1, 10)}}
  out = fws.init_from_checkpoint(state, cu_ckpt, {"var1": "some_scope/my1"})
  np_equal(out["some_scope"]["my1"], V1)
  assert out["some_scope"]["my1"].dtype == jnp.float32
  assert isinstance(out["some_scope"]["my1"], jax.Array)


# ---------------------------------------------------------------------------
# Inputs are not mutated.


def test_inputs_are_not_mutated(cu_ckpt):
  my1 = zeros(1, 10)
  state = {"some_scope": {"my1": my1}, "untouched": zeros(2)}
  amap = {"var1": "some_scope/my1"}
  pairs = [("var3", "x"), ("var1", "some_scope/my1")]
  pairs_before = list(pairs)
  out = fws.init_from_checkpoint(state, cu_ckpt, amap)
  assert state["some_scope"]["my1"] is my1
  assert set(state) == {"some_scope", "untouched"}
  np_equal(my1, np.zeros((1, 10)))
  assert amap == {"var1": "some_scope/my1"}
  np_equal(out["some_scope"]["my1"], V1)
  assert out is not state
  # A failing list is left as it was (it is sorted on a copy).
  with pytest.raises(fws.WarmStartError):
    fws.init_from_checkpoint(state, cu_ckpt, pairs)
  assert pairs == pairs_before


# ---------------------------------------------------------------------------
# E-33: processing is sorted by checkpoint name; the last assignment wins.


@pytest.fixture(scope="module")
def e33_ckpt(tmp_path_factory):
  tree = {"var1": jnp.full((2, 3), 1.0), "var2": jnp.full((2, 3), 2.0), "s": {"a": jnp.full((2, 3), 5.0)}}
  return save_checkpoint(tmp_path_factory.mktemp("e33") / "ckpt", tree)


@pytest.mark.parametrize("pairs", [[("var2", "n/a"), ("var1", "n/a")], [("var1", "n/a"), ("var2", "n/a")]])
def test_e33_greatest_checkpoint_key_wins(e33_ckpt, pairs):
  out = fws.init_from_checkpoint({"n": {"a": zeros(2, 3)}}, e33_ckpt, pairs)
  np_equal(out["n"]["a"], np.full((2, 3), 2.0))  # var2, whatever the list order
  plan = fws.plan_init_from_checkpoint({"n": {"a": zeros(2, 3)}}, e33_ckpt, pairs)
  assert [(row.name, row.source) for row in plan.leaves] == [("n/a", "var2")]


def test_e33_variable_pair_sorted_after_scope_pair_wins(e33_ckpt):
  # "s/" < "var1", so var1 is assigned last: n/a = var1 (not s/a).
  out = fws.init_from_checkpoint({"n": {"a": zeros(2, 3)}}, e33_ckpt, {"s/": "n/", "var1": "n/a"})
  np_equal(out["n"]["a"], np.full((2, 3), 1.0))
  out = fws.init_from_checkpoint({"n": {"a": zeros(2, 3)}}, e33_ckpt, {"var1": "n/a", "s/": "n/"})
  np_equal(out["n"]["a"], np.full((2, 3), 1.0))


# ---------------------------------------------------------------------------
# Deliberate strictness differences from TensorFlow.


def test_e34_empty_target_scope_is_an_error_unless_allowed(cu_ckpt, no_reads, monkeypatch):
  state = {"some_scope": {"my1": zeros(1, 10)}}
  # TF: {"old/": "nothing_here/"} silently does nothing. We raise, since a
  # typo in a scope would otherwise load nothing without a word.
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "nothing_here/"})
  assert "'nothing_here/'" in str(err.value) and "allow_empty_scopes" in str(err.value)

  # With allow_empty_scopes=True: TF's no-op.
  plan = fws.plan_init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "nothing_here/"}, allow_empty_scopes=True)
  assert [(row.name, row.action) for row in plan.leaves] == [("some_scope/my1", "keep")]
  monkeypatch.undo()  # reads are allowed again
  out = fws.init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "nothing_here/"}, allow_empty_scopes=True)
  np_equal(out["some_scope"]["my1"], np.zeros((1, 10)))
  # Other pairs of the same map still load.
  out = fws.init_from_checkpoint(
    state, cu_ckpt, {"useful_scope/": "nothing_here/", "var1": "some_scope/my1"}, allow_empty_scopes=True
  )
  np_equal(out["some_scope"]["my1"], V1)


def test_e35_target_without_slash_is_an_error(cu_ckpt, no_reads):
  state = {"some": {"other": {"var4": zeros(9, 9)}}}
  # TF: {"useful_scope/": "some/other/zzz"} silently uses scope `some/other`
  # (the trailing `zzz` is dropped) and loads some/other/var4 <- useful_scope/var4.
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "some/other/zzz"})
  text = str(err.value)
  assert "'some/other/zzz'" in text
  assert "'some/other/'" in text  # says what TF would have done


def test_scope_mapping_checks_shapes(cu_ckpt, no_reads):
  # TF: a scope mapping has no shape check; the variable silently takes the
  # checkpoint's value and shape ([2,1] became [1,1]). We raise.
  state = {"s": {"var4": zeros(3, 3)}}
  with pytest.raises(fws.WarmStartError) as err:
    fws.init_from_checkpoint(state, cu_ckpt, {"useful_scope/": "s/"})
  text = str(err.value)
  assert "'s/var4'" in text and "'useful_scope/var4'" in text
  assert "(3, 3)" in text and "(9, 9)" in text


# ---------------------------------------------------------------------------
# A real TrainState: maps reach optimizer slots and `step`.


@pytest.fixture(scope="module")
def old_train(adam_mlp):
  """The session's Adam MLP TrainState after 2 steps and its checkpoint (read-only)."""
  return adam_mlp


def test_root_to_root_restores_a_whole_train_state(old_train):
  old, path = old_train
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  out = fws.init_from_checkpoint(new, path, {"/": "/"})
  assert type(out) is type(new)
  assert_trees_equal(out.params, old.params)
  assert_trees_equal(out.opt_state, old.opt_state)  # Adam's count, mu and nu
  assert int(out.step) == int(old.step) == 2
  assert out.tx is new.tx and out.apply_fn is new.apply_fn
  plan = fws.plan_init_from_checkpoint(new, path, {"/": "/"})
  assert all(row.action == "load" and row.source == row.name for row in plan.leaves)
  names = {row.name for row in plan.leaves}
  assert {"step", "encoder/kernel/opt_state/0/mu", "encoder/kernel/opt_state/0/nu"} <= names


def test_scope_map_moves_a_parameters_slots(old_train):
  old, path = old_train
  new = make_state(MLP(encoder_name="backbone"), optax.adam(1e-2), seed=1, steps=0)
  plan = fws.plan_init_from_checkpoint(new, path, {"encoder/": "backbone/"})
  copied = {row.name: row.source for row in plan.loaded}
  assert copied == {
    f"backbone/{p}{s}": f"encoder/{p}{s}"
    for p in ("kernel", "bias")
    for s in ("", "/opt_state/0/mu", "/opt_state/0/nu")
  }
  out = fws.init_from_checkpoint(new, path, {"encoder/": "backbone/"})
  assert_trees_equal(out.params["backbone"], old.params["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])
  adam_old, adam_new, adam_out = old.opt_state[0], new.opt_state[0], out.opt_state[0]
  assert_trees_equal(adam_out.mu["backbone"], adam_old.mu["encoder"])
  assert_trees_equal(adam_out.nu["backbone"], adam_old.nu["encoder"])
  assert_trees_equal(adam_out.mu["head"], adam_new.mu["head"])
  assert_trees_equal(adam_out.count, adam_new.count)
  assert out.step == new.step == 0


def test_step_by_a_variable_mapping(old_train):
  old, path = old_train
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  out = fws.init_from_checkpoint(new, path, {"step": "step", "opt_state/0/count": "opt_state/0/count"})
  assert int(out.step) == 2
  np_equal(out.opt_state[0].count, old.opt_state[0].count)
  assert_trees_equal(out.params, new.params)


# ---------------------------------------------------------------------------
# Public API.


def test_exported_in_all():
  # Both are documented in the README as `fws.init_from_checkpoint` and
  # `fws.plan_init_from_checkpoint`: `from flax_warmstart import *` must export them.
  assert "init_from_checkpoint" in fws.__all__
  assert "plan_init_from_checkpoint" in fws.__all__
