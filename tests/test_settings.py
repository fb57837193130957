"""WarmStartSettings and VocabInfo validation (flax_warmstart/settings.py)."""

import pytest

import flax_warmstart as fws


def test_defaults_are_tensorflows():
  s = fws.WarmStartSettings("/runs/old")
  assert s.vars_to_warm_start == ".*"
  assert dict(s.var_name_to_vocab_info) == {} and dict(s.var_name_to_prev_var_name) == {}
  assert s.skip_missing is False and s.ckpt_item is None


def test_settings_are_frozen_and_hashable():
  s = fws.WarmStartSettings("/runs/old", vars_to_warm_start=["a", "b"], var_name_to_prev_var_name={"a": "x"})
  assert s.vars_to_warm_start == ("a", "b")
  assert hash(s) == hash(fws.WarmStartSettings("/runs/old", ["a", "b"], var_name_to_prev_var_name={"a": "x"}))
  with pytest.raises(AttributeError):
    s.skip_missing = True  # type: ignore[misc]


def test_inputs_are_copied():
  prev = {"a": "x"}
  s = fws.WarmStartSettings("/runs/old", var_name_to_prev_var_name=prev)
  prev["a"] = "changed"
  assert s.var_name_to_prev_var_name["a"] == "x"


def test_ckpt_to_initialize_from_must_be_set():
  with pytest.raises(fws.WarmStartError, match="MUST be set"):
    fws.WarmStartSettings("")
  with pytest.raises(ValueError, match="must be a path"):
    fws.WarmStartSettings(3)  # type: ignore[arg-type]


def test_bad_vars_to_warm_start_forms():
  with pytest.raises(fws.WarmStartError, match="given type is int"):
    fws.WarmStartSettings("/x", vars_to_warm_start=3)  # type: ignore[arg-type]
  with pytest.raises(fws.WarmStartError, match="must be all `str`"):
    fws.WarmStartSettings("/x", vars_to_warm_start=["a", 3])  # type: ignore[list-item]


def test_every_problem_is_reported_at_once():
  with pytest.raises(fws.WarmStartError) as err:
    fws.WarmStartSettings(
      "",
      vars_to_warm_start=3,  # type: ignore[arg-type]
      var_name_to_vocab_info={"emb": "not a VocabInfo"},  # type: ignore[dict-item]
      var_name_to_prev_var_name={"a": 1},  # type: ignore[dict-item]
    )
  assert len(err.value.problems) == 4
  assert "Invalid WarmStartSettings: 4 problems" in str(err.value)


def test_vocab_info_axis():
  assert fws.VocabInfo("", 1, 0, "").axis == 0  # like TF, nothing else is checked here
  with pytest.raises(ValueError, match=r"only supported values for the axis argument are 0 and 1.  Provided axis: 2"):
    fws.VocabInfo("new", 5, 0, "old", axis=2)
