"""rename_rules (flax_warmstart/_src/rename.py), through real plans and warm starts.

Every test uses the session's Orbax checkpoint of a real Flax TrainState trained
with optax Adam (`conftest.adam_mlp`, read only) and live states made with
`conftest.make_state`.

`rename_rules` follow T5X's assignment map: `re.fullmatch`, the first matching
rule wins, `\\1` group references, `None` keeps the fresh value, a rule that
matches no selected name is an error; a rule on a parameter renames its
optimizer slots too, and `var_name_to_prev_var_name` beats a matching rule.
"""

import optax
import pytest
from conftest import MLP, adam_slots, assert_trees_equal, make_state, rows

import flax_warmstart as fws

ADAM = optax.adam(1e-2)


@pytest.fixture(scope="module")
def old(adam_mlp):
  """An Adam TrainState of `MLP()` (scope `encoder`) after 2 steps, and its checkpoint: the session's, read-only."""
  return adam_mlp


@pytest.fixture(scope="module")
def renamed_new():
  """A fresh-ish Adam TrainState whose encoder scope is called `backbone`."""
  return make_state(MLP(encoder_name="backbone"), ADAM, seed=1, steps=1)


@pytest.fixture(scope="module")
def new():
  """A live Adam TrainState of `MLP()` after 3 steps: trained slots, step 3."""
  return make_state(MLP(), ADAM, seed=1, steps=3)


# ----------------------------------------------------------------------------
# 1. rename_rules


def test_group_reference_loads_renamed_scope_with_its_slots(old, renamed_new):
  old_state, path = old
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], rename_rules=[(r"backbone/(.*)", r"encoder/\1")])
  by_name = rows(fws.plan(renamed_new, settings))
  assert by_name["backbone/kernel"].action == "load"
  assert by_name["backbone/kernel"].source == "encoder/kernel"
  assert "rename_rules[0]" in by_name["backbone/kernel"].reason
  assert by_name["backbone/bias/opt_state/0/mu"].source == "encoder/bias/opt_state/0/mu"
  assert by_name["head/kernel"].source == "head/kernel"
  out = fws.warm_start(renamed_new, settings)
  assert_trees_equal(out.params["backbone"], old_state.params["encoder"])
  assert_trees_equal(out.params["head"], old_state.params["head"])
  for got, want in zip(adam_slots(out, "backbone"), adam_slots(old_state, "encoder"), strict=True):
    assert_trees_equal(got, want)
  assert int(out.opt_state[0].count) == int(old_state.opt_state[0].count) == 2
  assert out.step == old_state.step == 2


def test_rule_matching_only_the_parameter_renames_its_slots(old, renamed_new):
  old_state, path = old
  settings = fws.WarmStartSettings(
    path, vars_to_warm_start=[".*"], rename_rules=[(r"backbone/(kernel|bias)", r"encoder/\1")]
  )
  by_name = rows(fws.plan(renamed_new, settings))
  slot = by_name["backbone/kernel/opt_state/0/nu"]
  assert (slot.action, slot.source) == ("load", "encoder/kernel/opt_state/0/nu")
  assert "rename_rules[0] of its parameter" in slot.reason
  out = fws.warm_start(renamed_new, settings)
  assert_trees_equal(out.params["backbone"], old_state.params["encoder"])
  for got, want in zip(adam_slots(out, "backbone"), adam_slots(old_state, "encoder"), strict=True):
    assert_trees_equal(got, want)


def test_none_rule_keeps_the_live_value_and_the_plan_says_which_rule(old, new):
  old_state, path = old
  settings = fws.WarmStartSettings(path, rename_rules=[(r"head/.*", None)])
  by_name = rows(fws.plan(new, settings))
  for name in ("head/kernel", "head/bias"):
    assert by_name[name].action == "keep"
    assert by_name[name].source is None
    assert "rename_rules[0]" in by_name[name].reason
  out = fws.warm_start(new, settings)
  assert_trees_equal(out.params["encoder"], old_state.params["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])

  # With slots selected, a None rule on the parameter keeps its slots too.
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], rename_rules=[(r"head/(kernel|bias)", None)])
  by_name = rows(fws.plan(new, settings))
  assert by_name["head/kernel/opt_state/0/mu"].action == "keep"
  assert "rename_rules[0]" in by_name["head/kernel/opt_state/0/mu"].reason
  out = fws.warm_start(new, settings)
  assert_trees_equal(out.params["head"], new.params["head"])
  assert_trees_equal(adam_slots(out, "head"), adam_slots(new, "head"))
  assert_trees_equal(adam_slots(out, "encoder"), adam_slots(old_state, "encoder"))


def test_first_matching_rule_wins(old, renamed_new):
  old_state, path = old
  settings = fws.WarmStartSettings(
    path, rename_rules=[(r"backbone/kernel", None), (r"backbone/(.*)", r"encoder/\1"), (r"head/(.*)", r"head/\1")]
  )
  by_name = rows(fws.plan(renamed_new, settings))
  assert by_name["backbone/kernel"].action == "keep"
  assert "rename_rules[0]" in by_name["backbone/kernel"].reason
  assert by_name["backbone/bias"].source == "encoder/bias"
  assert "rename_rules[1]" in by_name["backbone/bias"].reason
  out = fws.warm_start(renamed_new, settings)
  assert_trees_equal(out.params["backbone"]["kernel"], renamed_new.params["backbone"]["kernel"])
  assert_trees_equal(out.params["backbone"]["bias"], old_state.params["encoder"]["bias"])
  assert_trees_equal(out.params["head"], old_state.params["head"])


def test_rule_shadowed_by_an_earlier_rule_is_unused(old, renamed_new):
  _, path = old
  # The earlier rule decides every name the later one matches: the later one is
  # never used, which T5X (require_all_rules_match) reports as an error.
  settings = fws.WarmStartSettings(path, rename_rules=[(r"backbone/(.*)", r"encoder/\1"), (r"backbone/kernel", None)])
  with pytest.raises(fws.WarmStartError, match=r"rename_rules\[1\]") as info:
    fws.plan(renamed_new, settings)
  (problem,) = info.value.problems
  assert "backbone/kernel" in problem
  # 'backbone/kernel' *is* selected (rename_rules[0] decided it): the message
  # must not tell the user to select it.
  assert "unselected" not in problem, problem


def test_rule_matching_no_selected_name_is_an_error(old, new):
  _, path = old
  with pytest.raises(fws.WarmStartError, match=r"rename_rules\[1\] \('decoder/\(\.\*\)'") as info:
    fws.plan(new, fws.WarmStartSettings(path, rename_rules=[(r"head/.*", None), (r"decoder/(.*)", r"dec/\1")]))
  assert "matched no selected variable" in str(info.value)
  assert "rename_rules[0]" not in str(info.value)
  # Rules are matched with re.fullmatch: a bare prefix matches nothing.
  with pytest.raises(fws.WarmStartError, match=r"rename_rules\[0\] \('head'"):
    fws.plan(new, fws.WarmStartSettings(path, rename_rules=[(r"head", None)]))


def test_rule_matching_only_unselected_names_says_so(old, new):
  _, path = old
  settings = fws.WarmStartSettings(path, vars_to_warm_start="encoder", rename_rules=[(r"head/(.*)", r"head/\1")])
  with pytest.raises(fws.WarmStartError, match=r"rename_rules\[0\]") as info:
    fws.plan(new, settings)
  message = str(info.value)
  assert "unselected" in message
  assert "'head/" in message
  # A str regex selects parameters only: a rule on the optimizer's count is unused.
  settings = fws.WarmStartSettings(path, rename_rules=[(r"opt_state/0/count", None)])
  with pytest.raises(fws.WarmStartError, match=r"unselected names \(e\.g\. 'opt_state/0/count'\)"):
    fws.plan(new, settings)


def test_var_name_to_prev_var_name_beats_a_matching_rule(old, renamed_new):
  old_state, path = old
  settings = fws.WarmStartSettings(
    path,
    var_name_to_prev_var_name={"backbone/kernel": "encoder/kernel"},
    rename_rules=[(r"backbone/.*", None)],
  )
  by_name = rows(fws.plan(renamed_new, settings))
  assert by_name["backbone/kernel"].action == "load"
  assert by_name["backbone/kernel"].source == "encoder/kernel"
  assert "var_name_to_prev_var_name" in by_name["backbone/kernel"].reason
  assert "rename_rules" not in by_name["backbone/kernel"].reason
  assert by_name["backbone/bias"].action == "keep"
  out = fws.warm_start(renamed_new, settings)
  assert_trees_equal(out.params["backbone"]["kernel"], old_state.params["encoder"]["kernel"])
  assert_trees_equal(out.params["backbone"]["bias"], renamed_new.params["backbone"]["bias"])
  assert_trees_equal(out.params["head"], old_state.params["head"])


def test_rename_to_a_missing_tensor_names_the_rule(old, renamed_new):
  _, path = old
  settings = fws.WarmStartSettings(path, rename_rules=[(r"backbone/(.*)", r"enc/\1")])
  with pytest.raises(
    fws.WarmStartError, match=r"no tensor 'enc/kernel' \(renamed from 'backbone/kernel' by rename_rules"
  ):
    fws.plan(renamed_new, settings)


@pytest.mark.parametrize(
  ("rules", "message"),
  [
    ([(r"enc(oder/.*", None)], "not a valid regex"),
    ([(r"encoder/.*", 3)], "must be a str, a transform"),
    ([(r"encoder/.*",)], "pair"),
  ],
)
def test_invalid_rules_fail_at_construction(rules, message):
  with pytest.raises(fws.WarmStartError, match=message):
    fws.WarmStartSettings("/runs/old", rename_rules=rules)


def test_rules_given_as_a_dict(old, renamed_new):
  old_state, path = old
  settings = fws.WarmStartSettings(path, rename_rules={r"backbone/(.*)": r"encoder/\1", r"head/bias": None})
  assert settings.rename_rules == ((r"backbone/(.*)", r"encoder/\1"), (r"head/bias", None))
  out = fws.warm_start(renamed_new, settings)
  assert_trees_equal(out.params["backbone"], old_state.params["encoder"])
  assert_trees_equal(out.params["head"]["kernel"], old_state.params["head"]["kernel"])
  assert_trees_equal(out.params["head"]["bias"], renamed_new.params["head"]["bias"])
