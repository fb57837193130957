"""T5X state transformation (flax_warmstart/t5x.py) on state dicts of T5X's exact shape."""

import pathlib

import numpy as np
import pytest

import flax_warmstart as fws
from flax_warmstart import t5x


class LazyArray:
  """A stand-in for T5X's lazily loaded arrays: shape, dtype and get(); counts reads."""

  reads: list = []

  def __init__(self, value):
    self.value = np.asarray(value)
    self.shape, self.dtype = self.value.shape, self.value.dtype

  def get(self):
    LazyArray.reads.append(self)
    return self.value


def adafactor_states(params):
  """T5X Adafactor param_states: factored v_row/v_col for matrices, v for vectors, m unused."""

  def slot(p):
    if p.ndim == 2:
      return {
        "m": None,
        "v": None,
        "v_col": np.full(p.shape[1], 0.5, np.float32),
        "v_row": np.full(p.shape[0], 0.5, np.float32),
      }
    return {"m": None, "v": np.full(p.shape, 0.25, np.float32), "v_col": None, "v_row": None}

  return {k: (adafactor_states(v) if isinstance(v, dict) else slot(v)) for k, v in params.items()}


def t5x_state(params, step):
  return {"target": params, "state": {"param_states": adafactor_states(params), "step": np.asarray(step, np.int32)}}


def old_state():
  rng = np.random.default_rng(0)
  params = {
    "encoder": {"layers_0": {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": np.ones(3, np.float32)}},
    "token_embedder": {"embedding": np.arange(8, dtype=np.float32).reshape(4, 2)},
  }
  return t5x_state(params, step=100)


def new_state(encoder="encoder", vocab=4):
  params = {
    encoder: {"layers_0": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)}},
    "token_embedder": {"embedding": np.zeros((vocab, 2), np.float32)},
  }
  return t5x_state(params, step=0)


def lazy(tree):
  if isinstance(tree, dict):
    return {k: lazy(v) for k, v in tree.items()}
  return None if tree is None else LazyArray(tree)


def test_names_follow_the_contract_for_t5x_state_dicts():
  names = fws.variable_names(new_state())
  assert "encoder/layers_0/kernel" in names and "token_embedder/embedding" in names
  assert "encoder/layers_0/kernel/state/param_states/v_row" in names
  assert "encoder/layers_0/bias/state/param_states/v" in names
  assert "state/step" in names


def test_resuming_returns_the_checkpoint_unchanged():
  ckpt = old_state()
  fn = t5x.state_transformation(fws.WarmStartSettings("gs://b/old"))
  assert fn(ckpt, new_state(), is_resuming=True) is ckpt


def test_default_settings_load_params_only_and_read_only_those():
  ckpt, target = lazy(old_state()), new_state()
  LazyArray.reads.clear()
  out = t5x.state_transformation(fws.WarmStartSettings("gs://b/old"))(ckpt, target, is_resuming=False)
  np.testing.assert_array_equal(
    out["target"]["encoder"]["layers_0"]["kernel"], old_state()["target"]["encoder"]["layers_0"]["kernel"]
  )
  np.testing.assert_array_equal(out["target"]["token_embedder"]["embedding"], np.arange(8).reshape(4, 2))
  # Optimizer state and step stay the target's (fresh).
  assert int(out["state"]["step"]) == 0
  np.testing.assert_array_equal(
    out["state"]["param_states"]["encoder"]["layers_0"]["bias"]["v"],
    target["state"]["param_states"]["encoder"]["layers_0"]["bias"]["v"],
  )
  assert len(LazyArray.reads) == 3  # only the three parameters were read
  assert set(out) == {"target", "state"} and out["state"]["param_states"]["encoder"]["layers_0"]["kernel"]["m"] is None


def test_list_selection_loads_slots_and_step():
  settings = fws.WarmStartSettings("gs://b/old", vars_to_warm_start=[".*"])
  out = t5x.state_transformation(settings)(old_state(), new_state(), is_resuming=False)
  assert int(out["state"]["step"]) == 100
  np.testing.assert_array_equal(out["state"]["param_states"]["encoder"]["layers_0"]["kernel"]["v_row"], np.full(4, 0.5))


def test_rename_rules_move_a_scope_with_its_slots():
  settings = fws.WarmStartSettings(
    "gs://b/old", vars_to_warm_start=[".*"], rename_rules=[(r"backbone/(.*)", r"encoder/\1")]
  )
  out = t5x.state_transformation(settings)(old_state(), new_state(encoder="backbone"), is_resuming=False)
  np.testing.assert_array_equal(
    out["target"]["backbone"]["layers_0"]["kernel"], old_state()["target"]["encoder"]["layers_0"]["kernel"]
  )
  np.testing.assert_array_equal(out["state"]["param_states"]["backbone"]["layers_0"]["bias"]["v"], np.full(3, 0.25))


def test_vocabulary_remap_keeps_factored_slots_at_init():
  info = fws.VocabInfo(["d", "a", "z", "b", "c"], 5, 1, ["a", "b", "c", "d"])
  settings = fws.WarmStartSettings(
    "gs://b/old",
    vars_to_warm_start=[".*encoder.*", ".*token_embedder.*"],
    var_name_to_vocab_info={"token_embedder/embedding": info},
  )
  target = new_state(vocab=6)
  target["state"]["param_states"]["token_embedder"]["embedding"]["v_row"] = np.full(6, 9.0, np.float32)
  out = t5x.state_transformation(settings)(old_state(), target, is_resuming=False)
  np.testing.assert_array_equal(
    out["target"]["token_embedder"]["embedding"], [[6, 7], [0, 1], [0, 0], [2, 3], [4, 5], [0, 0]]
  )
  # v_row [vocab] and v_col [dim] cannot follow the rows: kept at the target's values.
  np.testing.assert_array_equal(out["state"]["param_states"]["token_embedder"]["embedding"]["v_row"], np.full(6, 9.0))


def test_problems_are_reported_like_warm_start():
  fn = t5x.state_transformation(fws.WarmStartSettings("gs://b/old"))
  with pytest.raises(fws.WarmStartError, match="backbone/layers_0/kernel"):
    fn(old_state(), new_state(encoder="backbone"), is_resuming=False)


def test_sample_t5x_gin_config_binds_the_function():
  gin = pytest.importorskip("gin")
  import flax_warmstart.gin  # noqa: F401

  gin.clear_config()

  @gin.configurable("utils.RestoreCheckpointConfig")
  def restore_checkpoint_config(state_transformation_fns=()):
    return list(state_transformation_fns)

  try:
    config = pathlib.Path(fws.__file__).parent / "configs" / "t5x_warm_start.gin"
    gin.parse_config_files_and_bindings([str(config)], ["INITIAL_CHECKPOINT_PATH = 'gs://b/old'"])
    (fn,) = restore_checkpoint_config()
    out = fn(old_state(), new_state(encoder="backbone"), is_resuming=False)
    np.testing.assert_array_equal(
      out["target"]["backbone"]["layers_0"]["kernel"], old_state()["target"]["encoder"]["layers_0"]["kernel"]
    )
  finally:
    gin.clear_config()
    if "utils.RestoreCheckpointConfig" in gin.config._REGISTRY:  # noqa: SLF001
      gin.config._REGISTRY.pop("utils.RestoreCheckpointConfig")  # noqa: SLF001


def test_step_reset_on_a_t5x_state_dict_zeroes_state_step(tmp_path):
  """`state/step` is the step (one rule, planning.is_step): step='reset' zeroes it, through both entry points."""
  old, new = old_state(), new_state()
  settings = fws.WarmStartSettings("gs://bucket/old", vars_to_warm_start=[".*"], step="reset")
  out = t5x.state_transformation(settings)(old, new, is_resuming=False)
  assert int(out["state"]["step"]) == 0
  np.testing.assert_array_equal(
    out["target"]["encoder"]["layers_0"]["kernel"], old["target"]["encoder"]["layers_0"]["kernel"]
  )
  np.testing.assert_array_equal(
    out["state"]["param_states"]["encoder"]["layers_0"]["kernel"]["v_row"],
    old["state"]["param_states"]["encoder"]["layers_0"]["kernel"]["v_row"],
  )
  # The same state dict saved with Orbax, warm-started through fws.warm_start.
  from conftest import save_checkpoint

  path = save_checkpoint(tmp_path / "t5x", old)
  plan = fws.plan(new, fws.WarmStartSettings(path, vars_to_warm_start=[".*"], step="reset"))
  row = {r.name: r for r in plan.leaves}["state/step"]
  assert (row.action, row.reset, row.code) == (fws.Action.RESET, fws.Reset.STEP, fws.Reason.POLICY_RESET)
  out = fws.warm_start(new, fws.WarmStartSettings(path, vars_to_warm_start=[".*"], step="reset"))
  assert int(out["state"]["step"]) == 0
  np.testing.assert_array_equal(
    out["target"]["encoder"]["layers_0"]["bias"], old["target"]["encoder"]["layers_0"]["bias"]
  )


def test_optimizer_reset_on_a_t5x_state_dict_says_it_needs_the_optimizer():
  settings = fws.WarmStartSettings("gs://bucket/old", vars_to_warm_start=[".*"], optimizer_state="reset")
  with pytest.raises(fws.WarmStartError, match="needs a state that carries its optimizer"):
    t5x.state_transformation(settings)(old_state(), new_state(), is_resuming=False)
