"""Settings as plain data (flax_warmstart/_src/serialize.py): to_dict / from_dict, JSON round trips, initializer specs.

Everything a `WarmStartSettings` holds (vocabularies, new-row initializers,
renames, policies) survives `to_dict` -> JSON -> `from_dict`; unknown fields
and initializer names are errors that name the closest valid choices; a
`ConfigDict`-like object reads like a dict.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_warmstart as fws
from flax_warmstart._src.serialize import initializer_from_spec, settings_from_dict, settings_to_dict


def _vocab_spec(backup):
  return {
    "new_vocab": ["<pad>", "a", "b", "z"],
    "new_vocab_size": 4,
    "num_oov_buckets": 1,
    "old_vocab": ["a", "b"],
    "backup_initializer": backup,
    "donor_tokens": {"<pad>": "a"},
    "token_vectors": {"z": [0.5, 0.25]},
  }


@pytest.mark.parametrize(
  "backup",
  [None, "zeros", "mean_of_old_rows", {"mean_covariance_of_old_rows": 1e-6}],
  ids=["none", "zeros", "mean", "mean_cov"],
)
def test_settings_round_trip(backup, tmp_path):
  vocab_file = tmp_path / "old.txt"
  vocab_file.write_text("a\nb\n")
  original = fws.WarmStartSettings(
    "/runs/old",
    vars_to_warm_start=["encoder/.*", "emb"],
    var_name_to_vocab_info={
      "emb": fws.VocabInfo(**{**_vocab_spec(None), "backup_initializer": initializer_from_spec(backup)}),
      "out": fws.VocabInfo(["a", "q"], 2, 0, os.fspath(vocab_file), axis=1),
    },
    var_name_to_prev_var_name={"encoder/kernel": "old_encoder/kernel"},
    skip_missing=True,
    ckpt_item="state",
    rename_rules=[(r"encoder/(.*)", r"enc/\1"), ("head/.*", None)],
    optimizer_state="reset",
    step="load",
  )
  data = original.to_dict()
  assert data == settings_to_dict(original)
  assert data["var_name_to_vocab_info"]["emb"]["backup_initializer"] == backup
  text = json.dumps(data)
  back = fws.WarmStartSettings.from_dict(json.loads(text))
  assert back == original
  assert back.to_dict() == data
  assert settings_from_dict(json.loads(text)) == original


def test_settings_round_trip_of_named_parametric_initializer():
  """`{"constant": 0.5}` read from plain data must survive to_dict -> JSON -> from_dict."""
  data = {"ckpt_to_initialize_from": "/runs/old", "var_name_to_vocab_info": {"emb": _vocab_spec({"constant": 0.5})}}
  settings = fws.WarmStartSettings.from_dict(data)
  init = settings.var_name_to_vocab_info["emb"].backup_initializer
  np.testing.assert_array_equal(np.asarray(init(jax.random.key(0), (2,), jnp.float32)), [0.5, 0.5])
  dumped = settings.to_dict()
  assert dumped["var_name_to_vocab_info"]["emb"]["backup_initializer"] == {"constant": 0.5}
  back = fws.WarmStartSettings.from_dict(json.loads(json.dumps(dumped)))
  assert back.to_dict() == dumped
  init = back.var_name_to_vocab_info["emb"].backup_initializer
  np.testing.assert_array_equal(np.asarray(init(jax.random.key(0), (2,), jnp.float32)), [0.5, 0.5])


def test_settings_defaults_round_trip():
  original = fws.WarmStartSettings("/runs/old")
  data = json.loads(json.dumps(original.to_dict()))
  assert fws.WarmStartSettings.from_dict(data) == original
  for vars_ in (None, "enc.*"):
    s = fws.WarmStartSettings("/runs/old", vars_to_warm_start=vars_)
    assert fws.WarmStartSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
  # A checkpoint given separately.
  assert fws.WarmStartSettings.from_dict({"step": "reset"}, ckpt_to_initialize_from="/x") == fws.WarmStartSettings(
    "/x", step="reset"
  )


def test_unknown_settings_field_suggests_the_closest():
  with pytest.raises(fws.WarmStartError, match="vars_to_warm_start") as err:
    fws.WarmStartSettings.from_dict({"ckpt_to_initialize_from": "/x", "vars_to_warmstart": ".*"})
  assert "'vars_to_warmstart'" in str(err.value)
  assert "Closest names: 'vars_to_warm_start'" in str(err.value)
  with pytest.raises(fws.WarmStartError, match="new_vocab_size"):
    fws.WarmStartSettings.from_dict(
      {"ckpt_to_initialize_from": "/x", "var_name_to_vocab_info": {"emb": {**_vocab_spec(None), "vocab_size": 3}}}
    )


def test_unknown_initializer_lists_known_names():
  with pytest.raises(fws.WarmStartError) as err:
    initializer_from_spec("glorot")
  message = str(err.value)
  assert "'glorot'" in message
  for known in ("zeros", "ones", "glorot_uniform", "lecun_normal", "mean_of_old_rows", "constant", "normal"):
    assert known in message, known
  assert "mean_covariance_of_old_rows" in message
  with pytest.raises(fws.WarmStartError, match="mean_of_old_rows"):
    fws.WarmStartSettings.from_dict(
      {"ckpt_to_initialize_from": "/x", "var_name_to_vocab_info": {"emb": _vocab_spec({"bogus": 1})}}
    )


def test_initializer_specs():
  assert initializer_from_spec(None) is None
  assert initializer_from_spec("mean_of_old_rows") == fws.MeanOfOldRows()
  assert initializer_from_spec({"mean_covariance_of_old_rows": 1e-6}) == fws.MeanCovarianceOfOldRows(1e-6)
  zeros = initializer_from_spec("zeros")
  np.testing.assert_array_equal(np.asarray(zeros(jax.random.key(0), (2,), jnp.float32)), [0.0, 0.0])
  assert zeros == initializer_from_spec("zeros")  # named initializers compare equal, so settings do
  init = initializer_from_spec({"constant": 0.5})
  np.testing.assert_array_equal(np.asarray(init(jax.random.key(0), (3,), jnp.float32)), [0.5] * 3)
  assert np.asarray(initializer_from_spec({"normal": 0.02})(jax.random.key(0), (4,), jnp.float32)).shape == (4,)


class _ConfigDict:
  """A stand-in for `ml_collections.ConfigDict`: attribute access and `to_dict()`."""

  def __init__(self, **fields):
    self._fields = fields

  def __getattr__(self, name):
    try:
      return self.__dict__["_fields"][name]
    except KeyError:
      raise AttributeError(name) from None

  def to_dict(self):
    return {k: v.to_dict() if isinstance(v, _ConfigDict) else v for k, v in self._fields.items()}


def test_settings_from_config_dict_like():
  config = _ConfigDict(
    ckpt_to_initialize_from="/runs/old",
    vars_to_warm_start=["encoder/.*"],
    var_name_to_vocab_info=_ConfigDict(emb=_ConfigDict(**_vocab_spec("mean_of_old_rows"))),
    step="reset",
  )
  settings = fws.WarmStartSettings.from_dict(config)
  assert settings.vars_to_warm_start == ("encoder/.*",)
  assert settings.step == "reset"
  info = settings.var_name_to_vocab_info["emb"]
  assert info.backup_initializer == fws.MeanOfOldRows()
  assert dict(info.donor_tokens) == {"<pad>": "a"}
  assert settings_from_dict(config) == settings
  with pytest.raises(fws.WarmStartError, match="mapping"):
    fws.WarmStartSettings.from_dict(["not", "a", "mapping"])
