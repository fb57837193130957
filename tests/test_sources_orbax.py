"""The Orbax source (flax_warmstart/_src/sources/orbax.py, orbax_metadata.py): finding checkpoints, their metadata, reading only what the plan needs."""

import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import save_checkpoint, save_manager_step

import flax_warmstart as fws
from flax_warmstart._src.sources.orbax import locate, open_orbax


def _tree(value):
  return {"params": {"encoder": {"kernel": jnp.full((2, 3), value)}, "head": {"bias": jnp.full((2,), value)}}}


def _live():
  return _tree(0.0)


def test_checkpoint_directory(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", _tree(1.0))
  out = fws.warm_start(_live(), path)
  assert np.all(out["params"]["encoder"]["kernel"] == 1.0)
  assert open_orbax(path).step is None


def test_manager_root_uses_latest_step(tmp_path):
  root = tmp_path / "run"
  for step in (1, 20, 3):
    save_manager_step(root, step, _tree(float(step)))
  ckpt = open_orbax(root)
  assert ckpt.step == 20
  out = fws.warm_start(_live(), root)
  assert np.all(out["params"]["head"]["bias"] == 20.0)


def test_manager_root_ignores_unfinished_steps(tmp_path):
  root = tmp_path / "run"
  save_manager_step(root, 5, _tree(5.0))
  # An interrupted save leaves an Orbax temporary directory behind.
  shutil.copytree(root / "5", root / "9.orbax-checkpoint-tmp-123")
  assert open_orbax(root).step == 5


def test_a_save_still_in_progress_says_so(tmp_path):
  root = tmp_path / "run"
  save_manager_step(tmp_path / "done", 5, _tree(5.0))
  root.mkdir()
  shutil.copytree(tmp_path / "done" / "5", root / "3.orbax-checkpoint-tmp-123")
  with pytest.raises(fws.WarmStartError, match=r"save is still in progress.*wait_until_finished"):
    locate(root)


def test_manager_root_with_step_prefix(tmp_path):
  root = tmp_path / "run"
  options = ocp.CheckpointManagerOptions(step_prefix="ckpt")
  with ocp.CheckpointManager(root, options=options) as mgr:
    mgr.save(7, args=ocp.args.StandardSave(_tree(7.0)))
  assert open_orbax(root).step == 7
  assert np.all(fws.warm_start(_live(), root)["params"]["head"]["bias"] == 7.0)


def test_step_directory(tmp_path):
  root = save_manager_step(tmp_path / "run", 4, _tree(4.0))
  ckpt = open_orbax(f"{root}/4")
  assert (ckpt.step, ckpt.path.name) == (4, "default")


def test_step_directory_with_several_items(tmp_path):
  root = save_manager_step(tmp_path / "run", 2, _tree(2.0), extra={"note": "json item, not a pytree"})
  # The only PyTree item is picked; the JSON item has no tree metadata.
  assert open_orbax(root).path.name == "state"
  assert np.all(fws.warm_start(_live(), root)["params"]["head"]["bias"] == 2.0)


def test_several_pytree_items_pick_the_one_matching_the_state(tmp_path):
  step_dir = tmp_path / "run" / "3"
  save_checkpoint(step_dir / "ema", {"ema": {"w": jnp.ones(2)}})
  save_checkpoint(step_dir / "model", _tree(3.0))
  ckpt = open_orbax(step_dir, prefer_names=fws.variable_names(_live()))
  assert ckpt.path.name == "model" and ckpt.step == 3
  # The user can name the item instead.
  settings = fws.WarmStartSettings(step_dir, vars_to_warm_start=["ema/.*"], ckpt_item="ema")
  out = fws.warm_start({"ema": {"w": jnp.zeros(2)}}, settings)
  assert np.all(out["ema"]["w"] == 1.0)


def test_unknown_item_is_an_error(tmp_path):
  root = save_manager_step(tmp_path / "run", 1, _tree(1.0))
  with pytest.raises(fws.WarmStartError, match=r"No item 'nope'.*\['default'\]"):
    fws.warm_start(_live(), fws.WarmStartSettings(root, ckpt_item="nope"))


def test_missing_path_says_what_was_looked_for(tmp_path):
  with pytest.raises(fws.WarmStartError, match="does not exist"):
    fws.warm_start(_live(), tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(fws.WarmStartError, match="CheckpointManager root") as err:
    fws.warm_start(_live(), tmp_path / "empty")
  assert "empty directory" in str(err.value)
  (tmp_path / "file").write_text("x")
  with pytest.raises(fws.WarmStartError, match="is a file"):
    locate(tmp_path / "file")


def test_list_variables_like_tf(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", _tree(1.0))
  assert fws.list_variables(path) == [("encoder/kernel", (2, 3)), ("head/bias", (2,))]


def test_only_selected_tensors_are_read(tmp_path):
  # Without OCDBT every tensor has its own directory; delete the data of one
  # that is not selected, keeping its metadata (.zarray). A full-tree read
  # would fail on it.
  path = tmp_path / "ckpt"
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(path, _tree(1.0))
  chunks = [p for p in (path / "params.head.bias").iterdir() if p.name != ".zarray"]
  assert chunks
  for chunk in chunks:
    chunk.unlink()
  out = fws.warm_start(_live(), path, fws.WarmStartSettings(path, vars_to_warm_start="encoder"))
  assert np.all(out["params"]["encoder"]["kernel"] == 1.0)
  assert np.all(out["params"]["head"]["bias"] == 0.0)


def test_only_manager_steps_have_a_step(tmp_path):
  # pytest's tmp_path ends in _0: a standalone checkpoint inside it, or named like a step, has no step.
  assert open_orbax(save_checkpoint(tmp_path / "ckpt", _tree(1.0))).step is None
  assert open_orbax(save_checkpoint(tmp_path / "ckpt_3", _tree(1.0))).step is None
  root = save_manager_step(tmp_path / "run", 5, _tree(5.0))
  assert open_orbax(root).step == 5
  assert open_orbax(f"{root}/5").step == 5
  assert open_orbax(f"{root}/5/default").step == 5


def _orbax_metadata_tree(path):
  from etils import epath

  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_batched_metadata_equals_orbax_metadata(tmp_path, use_ocdbt):
  import jax
  import ml_dtypes
  import optax
  from conftest import make_state

  from flax_warmstart._src.sources import orbax_metadata

  state = make_state(tx=optax.chain(optax.clip(1.0), optax.adamw(1e-3)), steps=2)
  tree = {
    "state": state,
    "bf16": jnp.ones((3, 2), ml_dtypes.bfloat16),
    "host": np.arange(5, dtype=np.int16),
    "count": 7,
    "rate": 0.5,
    "empty": {},
  }
  path = str(tmp_path / "ckpt")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(tree))
  from etils import epath

  fast, use_zarr3 = orbax_metadata._fast_metadata_tree(epath.Path(path))
  orbax = _orbax_metadata_tree(path)
  assert not use_zarr3
  assert jax.tree.structure(fast) == jax.tree.structure(orbax)
  for ours, theirs in zip(jax.tree.leaves(fast), jax.tree.leaves(orbax), strict=True):
    assert type(ours) is type(theirs)
    assert (ours.name, ours.shape, ours.dtype) == (theirs.name, theirs.shape, theirs.dtype)
  ckpt = open_orbax(path)
  assert ckpt.variables["bf16"].dtype == ml_dtypes.bfloat16 and ckpt.variables["host"].shape == (5,)
  restored = fws.warm_start(
    {"bf16": jnp.zeros((3, 2), ml_dtypes.bfloat16), "count": 0},
    path,
    fws.WarmStartSettings(path, vars_to_warm_start=[".*"]),
  )
  assert restored["count"] == 7 and float(restored["bf16"].sum()) == 6.0


def test_metadata_falls_back_to_orbax_once_with_a_warning(tmp_path, monkeypatch, caplog):
  import logging

  from etils import epath

  from flax_warmstart._src.sources import orbax_metadata

  path = save_checkpoint(tmp_path / "ckpt", _tree(2.0))
  monkeypatch.setattr(orbax_metadata, "_warned", False)
  monkeypatch.setattr(orbax_metadata.ts.KvStore, "read", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
  with caplog.at_level(logging.DEBUG, logger="flax_warmstart"):
    assert orbax_metadata._fast_metadata_tree(epath.Path(path)) is None
    # The fallback gives the same names and shapes, through Orbax's public metadata.
    assert open_orbax(path).variables["encoder/kernel"].shape == (2, 3)
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings  # logged once, however often the fallback is taken
  assert "slower public path" in warnings[0].getMessage() and "OSError: boom" in warnings[0].getMessage()
  monkeypatch.undo()
  assert open_orbax(path).variables["encoder/kernel"].shape == (2, 3)


def test_checkpoint_rewritten_at_the_same_path_in_one_process(tmp_path):
  """An OCDBT context caches a database's manifest by path: each opened checkpoint gets its own context."""
  path = tmp_path / "ckpt"
  for value in (1.0, 2.0):
    shutil.rmtree(path, ignore_errors=True)
    save_checkpoint(path, {"w": jnp.full((4,), value)})
    out = fws.warm_start({"w": jnp.zeros(4)}, fws.WarmStartSettings(path))
    np.testing.assert_array_equal(out["w"], np.full(4, value))
