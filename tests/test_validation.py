"""Issue 13, kind 4: every value of the settings is validated on construction.

`VocabInfo`, `WarmStartSettings`, `MeanCovarianceOfOldRows` and the named
initializers of settings files check the type of each value when they are
built, collect every problem into one `WarmStartError`, and name the field,
the value and what is allowed. The same errors reach users of settings files
(`cli.load_settings` -> `serialize.settings_from_dict`) and of `.gin` files.

Ranges that TensorFlow checks against the variable (`new_vocab_size=0`,
`num_oov_buckets=-1`, `old_vocab_size=0`, a non-callable backup initializer)
stay errors of the plan, naming the variable: see `test_vocab_tf.py`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_warmstart as fws
from flax_warmstart import cli
from flax_warmstart._src.serialize import NamedInitializer, initializer_from_spec, settings_from_dict

VOCAB = {"new_vocab": ["b", "z", "a"], "new_vocab_size": 3, "num_oov_buckets": 1, "old_vocab": ["a", "b"]}


def problems_of(fn):
  with pytest.raises(fws.WarmStartError) as err:
    fn()
  return err.value.problems, str(err.value)


# --------------------------------------------------------------------------- VocabInfo

# field value -> fragments the message must hold (the field, the value, what is allowed).
# fmt: off
BAD_VOCAB_VALUES = {
  "size_str": ({"new_vocab_size": "8"}, ["`new_vocab_size`", "'8' (str)", "an int"]),
  "size_float": ({"new_vocab_size": 8.0}, ["`new_vocab_size`", "8.0 (float)", "an int"]),
  "size_bool": ({"new_vocab_size": True}, ["`new_vocab_size`", "True (bool)"]),
  "size_none": ({"new_vocab_size": None}, ["`new_vocab_size`", "None (NoneType)"]),
  "oov_float": ({"num_oov_buckets": 1.5}, ["`num_oov_buckets`", "1.5 (float)", "an int >= 0"]),
  "old_size_str": ({"old_vocab_size": "-1"}, ["`old_vocab_size`", "'-1' (str)", "-1 for all"]),
  "axis_float": ({"axis": 1.0}, ["`axis`", "1.0 (float)", "0", "1"]),
  "axis_str": ({"axis": "1"}, ["`axis`", "'1' (str)"]),
  "axis_bool": ({"axis": True}, ["`axis`", "True (bool)"]),
  "new_vocab_int": ({"new_vocab": 5}, ["`new_vocab`", "5 (int)", "file path", "sequence of str"]),
  "new_vocab_bytes": ({"new_vocab": b"new.txt"}, ["`new_vocab`", "b'new.txt' (bytes)", "decode"]),
  "old_vocab_bytearray": ({"old_vocab": bytearray(b"ab")}, ["`old_vocab`", "bytearray"]),
  "new_vocab_set": ({"new_vocab": {"a", "b"}}, ["`new_vocab`", "(set)", "no order"]),
  "old_vocab_frozenset": ({"old_vocab": frozenset({"a"})}, ["`old_vocab`", "(frozenset)", "no order"]),
  "new_vocab_dict": ({"new_vocab": {"a": 0}}, ["`new_vocab`", "(dict)"]),
  "new_vocab_generator": ({"new_vocab": (t for t in "ab")}, ["`new_vocab`", "(generator)"]),
  "token_not_str": ({"old_vocab": ["a", 3, None]}, ["`old_vocab`", "[1] = 3 (int)", "[2] = None", "must all be str"]),
  "token_bytes": ({"new_vocab": [b"a", "b", "c"]}, ["`new_vocab`", "[0] = b'a' (bytes)"]),
  "donors_list": ({"donor_tokens": ["a"]}, ["`donor_tokens`", "['a'] (list)", "mapping", "new token: old token"]),
  "donors_str": ({"donor_tokens": "z:a"}, ["`donor_tokens`", "'z:a' (str)"]),
  "donor_not_str": ({"donor_tokens": {"z": 1}}, ["`donor_tokens`", "'z': 1", "str keys and values"]),
  "donor_key_not_str": ({"donor_tokens": {1: "a"}}, ["`donor_tokens`", "1: 'a'"]),
  "vectors_list": ({"token_vectors": [[1.0]]}, ["`token_vectors`", "(list)", "new token: row vector"]),
  "vector_str": ({"token_vectors": {"z": "abc"}}, ["token_vectors['z']", "'abc' (str)", "vector of numbers"]),
  "vector_ragged": ({"token_vectors": {"z": [[1.0], [1.0, 2.0]]}}, ["token_vectors['z']", "vector of numbers"]),
  "vector_key_not_str": ({"token_vectors": {3: [1.0]}}, ["`token_vectors`", "3: [1.0]", "str keys"]),
  "donor_and_vector": ({"donor_tokens": {"z": "a"}, "token_vectors": {"z": [1.0]}},
                       ["['z']", "both donor_tokens and token_vectors"]),
}
# fmt: on


@pytest.mark.parametrize("case", list(BAD_VOCAB_VALUES))
def test_bad_vocab_info_values_are_named(case):
  change, fragments = BAD_VOCAB_VALUES[case]
  problems, message = problems_of(lambda: fws.VocabInfo(**{**VOCAB, **change}))
  assert len(problems) == 1, message
  assert message.startswith("Invalid VocabInfo: 1 problem")
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_every_vocab_info_problem_at_once():
  problems, message = problems_of(
    lambda: fws.VocabInfo(5, "8", 1.5, b"old", old_vocab_size=None, axis=1.0, donor_tokens=["a"], token_vectors=3)
  )
  fields = ["new_vocab", "old_vocab", "new_vocab_size", "num_oov_buckets", "old_vocab_size", "axis"]
  fields += ["donor_tokens", "token_vectors"]
  assert len(problems) == len(fields), message
  for field, problem in zip(fields, problems, strict=True):
    assert f"`{field}`" in problem


def test_axis_keeps_tensorflows_message():
  _, message = problems_of(lambda: fws.VocabInfo(**VOCAB, axis=2))
  assert "The only supported values for the axis argument are 0 and 1.  Provided axis: 2" in message


def test_valid_vocab_info_values_are_normalized():
  info = fws.VocabInfo(
    np.array(["b", "z", "a"]),
    np.int64(3),
    np.int32(1),
    ("a", "b"),
    old_vocab_size=np.int64(-1),
    axis=np.int64(0),
    donor_tokens={"z": "a"},
  )
  assert info.new_vocab == ("b", "z", "a") and all(type(t) is str for t in info.new_vocab)
  assert (info.new_vocab_size, info.num_oov_buckets, info.old_vocab_size, info.axis) == (3, 1, -1, 0)
  assert all(type(v) is int for v in (info.new_vocab_size, info.num_oov_buckets, info.old_vocab_size, info.axis))
  assert hash(info) == hash(fws.VocabInfo(["b", "z", "a"], 3, 1, ["a", "b"], donor_tokens={"z": "a"}))
  # Paths stay paths; TensorFlow's lax construction (checked when planned) still constructs.
  assert fws.VocabInfo("new.txt", 3, 0, "old.txt").new_vocab == "new.txt"
  assert fws.VocabInfo("", 1, 0, "").new_vocab == ""
  assert fws.VocabInfo(**VOCAB, token_vectors={"z": np.array([1, 2])}).token_vectors["z"] == (1, 2)


def test_mean_covariance_scale_is_a_number():
  for scale in ("abc", -1.0, float("nan"), True, None):
    _, message = problems_of(lambda scale=scale: fws.MeanCovarianceOfOldRows(scale))
    assert "`scale`" in message and repr(scale) in message and ">= 0" in message
  assert fws.MeanCovarianceOfOldRows(np.float32(0.5)).scale == 0.5


# --------------------------------------------------------------------------- WarmStartSettings


@pytest.mark.parametrize("value", ["no", "False", "", 2, 1, 0, [True], None], ids=repr)
def test_skip_missing_must_be_a_bool(value):
  _, message = problems_of(lambda: fws.WarmStartSettings("/x", skip_missing=value))
  assert "`skip_missing`" in message and repr(value) in message and "True or False" in message


def test_skip_missing_accepts_numpy_bools():
  s = fws.WarmStartSettings("/x", skip_missing=np.bool_(True))
  assert s.skip_missing is True
  assert hash(s) == hash(fws.WarmStartSettings("/x", skip_missing=True))


# fmt: off
BAD_RULES = {
  "int": (5, ["`rename_rules`", "5 (int)", "ordered list"]),
  "str": ("enc/(.*)", ["`rename_rules`", "(str)"]),
  "set": ({("enc/(.*)", r"old/\1")}, ["`rename_rules`", "(set)", "no order"]),
  "not_a_pair": ([("a", "b", "c")], ["rename_rules[0]", "('a', 'b', 'c')", "pair"]),
  "regex_not_str": ([(5, "x")], ["rename_rules[0]", "(5, 'x')"]),
  "template_not_str": ([("a", 5)], ["rename_rules[0]", "5 (int)", "a transform (fws.Take"]),
  "bad_regex": ([("enc/(", "x")], ["rename_rules[0]", "'enc/('", "not a valid regex"]),
  "missing_group": ([("enc/(.*)", r"old/\2")], ["rename_rules[0]", r"'old/\\2'", "invalid group reference 2",
                                                "1 group(s)", "\\1"]),
  "no_groups": ([("enc/k", r"old/\1")], ["rename_rules[0]", "0 group(s)"]),
  "missing_name": ([("(?P<rest>.*)", r"old/\g<tail>")], ["rename_rules[0]", "'tail'", "\\g<rest>"]),
  "bad_escape": ([("a", r"old\q")], ["rename_rules[0]", "bad escape"]),
  "second_rule": ([("a", "b"), ("(c)", r"\3")], ["rename_rules[1]", "invalid group reference 3"]),
}
# fmt: on


@pytest.mark.parametrize("case", list(BAD_RULES))
def test_bad_rename_rules_are_named(case):
  rules, fragments = BAD_RULES[case]
  problems, message = problems_of(lambda: fws.WarmStartSettings("/x", rename_rules=rules))
  assert len(problems) == 1, message
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_valid_rename_rules_keep_their_order():
  rules = [(r"enc/(?P<rest>.*)", r"old/\g<rest>"), (r"(a)/(b)", r"\2/\1"), ("head/.*", None), ("x", r"y\n")]
  assert fws.WarmStartSettings("/x", rename_rules=rules).rename_rules == tuple(rules)
  assert fws.WarmStartSettings("/x", rename_rules={"a/(.*)": r"b/\1"}).rename_rules == (("a/(.*)", r"b/\1"),)
  assert fws.WarmStartSettings("/x", rename_rules=None).rename_rules == ()


def test_vars_to_warm_start_regexes_must_compile():
  _, message = problems_of(lambda: fws.WarmStartSettings("/x", vars_to_warm_start="enc/("))
  assert "`vars_to_warm_start`" in message and "'enc/('" in message and "not a valid regex" in message
  _, message = problems_of(lambda: fws.WarmStartSettings("/x", vars_to_warm_start=["ok", "[z"]))
  assert "`vars_to_warm_start[1]`" in message and "'[z'" in message


def test_every_settings_problem_at_once():
  problems, message = problems_of(
    lambda: fws.WarmStartSettings("/x", vars_to_warm_start="(", skip_missing="no", rename_rules=5, step="often")
  )
  assert len(problems) == 4, message
  assert message.startswith("Invalid WarmStartSettings: 4 problems")


# --------------------------------------------------------------------------- settings as plain data


@pytest.mark.parametrize(
  "spec, fragments",
  [
    ({"normal": "abc"}, ["{normal: ...}", "'abc' (str)", "standard deviation"]),
    ({"normal": -0.02}, ["{normal: ...}", "-0.02", ">= 0"]),
    ({"truncated_normal": None}, ["{truncated_normal: ...}", "None"]),
    ({"uniform": True}, ["{uniform: ...}", "True (bool)"]),
    ({"constant": "x"}, ["{constant: ...}", "'x' (str)", "a number or a list of numbers"]),
    ({"constant": [1.0, "a"]}, ["{constant: ...}", "[1.0, 'a']"]),
    ({"constant": float("inf")}, ["{constant: ...}", "inf"]),
    ({"mean_covariance_of_old_rows": "x"}, ["{mean_covariance_of_old_rows: ...}", "'x' (str)"]),
    ({"mean_covariance_of_old_rows": -1}, ["`scale`", "-1"]),
    ("glorot", ["Unknown backup_initializer 'glorot'", "mean_of_old_rows"]),
  ],
  ids=str,
)
def test_bad_initializer_specs_are_named(spec, fragments):
  _, message = problems_of(lambda: initializer_from_spec(spec))
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_named_initializers_validate_when_built_directly():
  with pytest.raises(fws.WarmStartError, match="Unknown backup_initializer 'bogus'"):
    NamedInitializer("bogus")
  with pytest.raises(fws.WarmStartError, match="standard deviation"):
    NamedInitializer("normal", "abc")
  init = initializer_from_spec({"constant": [0.5, 0.25]})  # a list argument: hashable, and round-trips
  assert hash(init) == hash(initializer_from_spec({"constant": (0.5, 0.25)}))
  np.testing.assert_array_equal(init(jax.random.key(0), (2,), jnp.float32), [0.5, 0.25])
  settings = fws.WarmStartSettings(
    "/x", var_name_to_vocab_info={"emb": fws.VocabInfo(**VOCAB, backup_initializer=init)}
  )
  data = json.loads(json.dumps(settings.to_dict()))
  assert data["var_name_to_vocab_info"]["emb"]["backup_initializer"] == {"constant": [0.5, 0.25]}
  assert settings_from_dict(data) == settings


def test_settings_from_dict_collects_every_problem():
  data = {
    "ckpt_to_initialize_from": "/x",
    "skip_missing": "no",
    "rename_rules": [["enc/(.*)", "old/\\2"]],
    "vars_to_warmstart": ".*",
    "var_name_to_vocab_info": {
      "emb": {**VOCAB, "new_vocab_size": "eight", "backup_initializer": {"normal": "abc"}, "vocab_size": 3},
      "out": {"new_vocab": "new.txt"},
      "head": 5,
    },
  }
  problems, message = problems_of(lambda: settings_from_dict(data))
  assert message.startswith(f"Invalid settings: {len(problems)} problems")
  expected = [
    "Unknown WarmStartSettings field 'vars_to_warmstart'",
    "var_name_to_vocab_info['emb']: unknown VocabInfo field 'vocab_size'",
    "var_name_to_vocab_info['emb']: backup_initializer {normal: ...}",
    "var_name_to_vocab_info['emb']: `new_vocab_size` must be",
    "var_name_to_vocab_info['out']: VocabInfo field 'new_vocab_size' is required",
    "var_name_to_vocab_info['out']: VocabInfo field 'num_oov_buckets' is required",
    "var_name_to_vocab_info['out']: VocabInfo field 'old_vocab' is required",
    "var_name_to_vocab_info['head'] must be a mapping of VocabInfo fields",
    "`skip_missing` must be True or False",
    "rename_rules[0]: template 'old/\\\\2' does not fit",
  ]
  assert len(problems) == len(expected), message
  for fragment in expected:
    assert any(fragment in p for p in problems), f"{fragment!r} not in:\n{message}"


def test_settings_file_route(tmp_path):
  """A YAML settings file (the CLI's `--settings`) gives the same errors as the constructors."""
  path = tmp_path / "ws.yaml"
  path.write_text(
    "skip_missing: 'no'\n"
    "rename_rules: [['enc/(.*)', 'old/\\2']]\n"
    "var_name_to_vocab_info:\n"
    "  emb: {new_vocab: [b, z, a], new_vocab_size: eight, num_oov_buckets: 0, old_vocab: [a, b],\n"
    "        backup_initializer: {normal: abc}, donor_tokens: [a]}\n"
  )
  problems, message = problems_of(lambda: cli.load_settings(str(path), "/runs/old"))
  assert len(problems) == 5, message
  for fragment in [
    "`skip_missing`",
    "'no' (str)",
    "rename_rules[0]",
    "invalid group reference 2",
    "var_name_to_vocab_info['emb']: `new_vocab_size`",
    "'eight' (str)",
    "{normal: ...}",
    "'abc' (str)",
    "var_name_to_vocab_info['emb']: `donor_tokens`",
    "['a'] (list)",
  ]:
    assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_gin_route(tmp_path):
  """A `.gin` file builds VocabInfo and WarmStartSettings through gin: the same errors come out."""
  gin = pytest.importorskip("gin")
  from flax_warmstart import gin as fws_gin  # noqa: PLC0415 (optional extra)

  path = tmp_path / "ws.gin"
  gin.clear_config()
  try:
    path.write_text(
      "flax_warmstart.WarmStartSettings.var_name_to_vocab_info = {'emb': @flax_warmstart.VocabInfo()}\n"
      "flax_warmstart.VocabInfo.new_vocab = ['b', 'z', 'a']\n"
      "flax_warmstart.VocabInfo.new_vocab_size = '8'\n"
      "flax_warmstart.VocabInfo.num_oov_buckets = 1.5\n"
      "flax_warmstart.VocabInfo.old_vocab = ['a', 'b']\n"
    )
    _, message = problems_of(lambda: fws_gin.settings_from_gin(path, "/runs/old"))
    for fragment in ["`new_vocab_size`", "'8' (str)", "`num_oov_buckets`", "1.5 (float)"]:
      assert fragment in message, f"{fragment!r} not in:\n{message}"
    gin.clear_config()
    path.write_text("flax_warmstart.WarmStartSettings.skip_missing = 'no'\n")
    _, message = problems_of(lambda: fws_gin.settings_from_gin(path, "/runs/old"))
    assert "`skip_missing`" in message and "'no' (str)" in message
  finally:
    gin.clear_config()
