"""Nothing lost, nothing silent (issue 13): the command line never harms a checkpoint, resume never loses
progress, damaged and unfinished checkpoints are refused with the path and what is wrong."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import save_checkpoint, save_manager_step

import flax_warmstart as fws
from flax_warmstart import cli


def _tree(value=1.0):
  return {"params": {"enc": {"w": jnp.full((2, 3), value)}, "head": {"b": jnp.full((2,), value)}}, "step": 3}


def _listing(path):
  """Every file under `path` with its size and modification time: proves nothing was written."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), path)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture
def ckpts(tmp_path):
  old = save_manager_step(tmp_path / "old", 7, _tree(1.0))
  new = save_checkpoint(tmp_path / "new", _tree(0.0))
  return tmp_path, old, new


# Kind 1: `run` never destroys OLD or NEW, never hangs, writes nothing when it would load nothing.


@pytest.mark.parametrize(
  "out", ["{old}", "{old}/.", "{old}/warm", "{old}/7", "{old}/7/default", "{new}", "{new}/x", "{root}"]
)
def test_run_refuses_an_out_equal_to_inside_or_around_a_checkpoint(ckpts, out, capsys):
  root, old, new = ckpts
  before = (_listing(old), _listing(new))
  rc = cli.main(["run", old, new, out.format(old=old, new=new, root=root), "--force"])
  err = capsys.readouterr().err
  assert rc == 1, err
  assert "Choose an OUT outside both checkpoints" in err and "Traceback" not in err
  assert (_listing(old), _listing(new)) == before


def test_run_into_a_path_under_a_file_fails_promptly_in_one_line(ckpts, capsys):
  root, old, new = ckpts
  (root / "afile").write_text("x")
  assert cli.main(["run", old, new, str(root / "afile" / "out")]) == 1
  err = capsys.readouterr().err
  assert "is a file, not a directory" in err and "Traceback" not in err and err.count("\n") == 1


def test_run_into_an_empty_out_is_refused(ckpts, capsys):
  _, old, new = ckpts
  assert cli.main(["run", old, new, ""]) == 1
  assert "OUT is empty" in capsys.readouterr().err


def test_run_that_loads_nothing_writes_nothing_unless_asked(ckpts, capsys):
  root, old, new = ckpts
  settings = root / "none.yaml"
  settings.write_text('vars_to_warm_start: ["zzz"]\n')
  out = root / "warm"
  assert cli.main(["run", old, new, str(out), "--settings", str(settings)]) == 1
  assert "load no leaf" in capsys.readouterr().err and not out.exists()
  assert cli.main(["run", old, new, str(out), "--settings", str(settings), "--allow-empty"]) == 0
  assert out.exists()


def test_settings_file_naming_another_checkpoint_warns(ckpts, capsys):
  root, old, new = ckpts
  settings = root / "s.yaml"
  settings.write_text(f"ckpt_to_initialize_from: {root / 'elsewhere'}\n")
  assert cli.main(["plan", old, new, "--settings", str(settings)]) == 0
  err = capsys.readouterr().err
  assert "WARNING" in err and "elsewhere" in err and "as the command line says" in err


# Kind 2: resuming never loses a run's progress.


def _damage_latest(root, step):
  os.remove(os.path.join(root, str(step), "default", "_METADATA"))


def test_resume_with_a_damaged_latest_step_raises_instead_of_warm_starting(tmp_path):
  old = save_checkpoint(tmp_path / "old", _tree(1.0))
  run = save_manager_step(tmp_path / "run", 10, _tree(5.0))
  save_manager_step(run, 20, _tree(6.0))
  _damage_latest(run, 20)
  state = _tree(0.0)
  with pytest.raises(fws.WarmStartError, match=r"latest step of .*run, 20, is damaged.*no older step is used.*run/10"):
    fws.warm_start_or_resume(state, run, old)
  with pytest.raises(fws.WarmStartError, match="damaged"):
    fws.has_checkpoint(run)
  # An older step only when the user says so.
  out = fws.warm_start_or_resume(state, run, old, resume_step=10)
  assert float(out["params"]["enc"]["w"][0, 0]) == 5.0
  with pytest.raises(fws.WarmStartError, match=r"has no step 15; its steps are \[10, 20\]"):
    fws.warm_start_or_resume(state, run, old, resume_step=15)


def test_a_manager_root_with_a_damaged_latest_step_is_never_read_as_an_older_one(tmp_path):
  run = save_manager_step(tmp_path / "run", 1, _tree(1.0))
  save_manager_step(run, 2, _tree(2.0))
  (tmp_path / "run" / "3").mkdir()  # a step directory with nothing in it
  with pytest.raises(fws.WarmStartError, match="3, is damaged: it holds no checkpoint"):
    fws.list_variables(run)


@pytest.mark.parametrize("run_dir", ["", 5, None])
def test_resume_run_dir_must_be_a_path(tmp_path, run_dir):
  old = save_checkpoint(tmp_path / "old", _tree(1.0))
  with pytest.raises(fws.WarmStartError, match="run_dir"):
    fws.warm_start_or_resume(_tree(0.0), run_dir, old)


def test_resume_run_dir_that_is_a_file_is_refused(tmp_path):
  old = save_checkpoint(tmp_path / "old", _tree(1.0))
  (tmp_path / "f").write_text("x")
  with pytest.raises(fws.WarmStartError, match="is a file"):
    fws.warm_start_or_resume(_tree(0.0), tmp_path / "f", old)


def test_resume_of_an_empty_or_missing_run_dir_warm_starts(tmp_path):
  old = save_checkpoint(tmp_path / "old", _tree(1.0))
  (tmp_path / "empty").mkdir()
  for run in (tmp_path / "missing", tmp_path / "empty"):
    assert not fws.has_checkpoint(run)
    out = fws.warm_start_or_resume(_tree(0.0), run, old)
    assert float(out["params"]["enc"]["w"][0, 0]) == 1.0


# Kind 3: unfinished and damaged checkpoints are refused, stale plans detected, ties are errors.


def test_a_directory_still_being_written_is_refused(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", _tree(1.0))
  tmp = tmp_path / "200.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(path, tmp)
  with pytest.raises(fws.WarmStartError, match="still writing, or whose save never finished"):
    fws.plan(_tree(0.0), str(tmp))


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbage"])
@pytest.mark.parametrize("file", ["default/_METADATA", "_CHECKPOINT_METADATA"])
def test_damaged_metadata_names_the_directory_and_the_file(tmp_path, damage, file, capsys):
  run = save_manager_step(tmp_path / "run", 4, _tree(1.0))
  path = tmp_path / "run" / "4" / file
  data = path.read_bytes()
  path.write_bytes({"truncated": data[: len(data) // 2], "zeroed": b"\0" * 64, "garbage": b"\xff\xfe\x00junk"}[damage])
  name = os.path.basename(file)
  with pytest.raises(fws.WarmStartError, match=f"damaged.*{name}") as err:
    fws.warm_start(_tree(0.0), run)
  assert str(tmp_path / "run") in str(err.value)
  assert cli.main(["inspect", run]) == 1
  out = capsys.readouterr().err
  assert "damaged" in out and "Traceback" not in out


def test_a_plan_made_before_the_checkpoint_was_rewritten_is_detected(tmp_path):
  path = str(tmp_path / "ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"emb": jnp.ones((6, 3)), "b": jnp.ones(2)})
  state = {"emb": jnp.zeros((6, 3)), "b": jnp.zeros(2)}
  plan = fws.plan(state, fws.WarmStartSettings(path, vars_to_warm_start=[".*"]))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"emb": jnp.ones((8, 3)), "b": jnp.ones(2)}, force=True)
  with pytest.raises(fws.WarmStartError, match="changed on disk after it was planned from"):
    fws.warm_start(state, plan=plan)
  np.testing.assert_array_equal(state["emb"], 0.0)  # the input is untouched


def test_items_that_match_equally_are_an_error_listing_them(tmp_path):
  step_dir = tmp_path / "run" / "5"
  save_checkpoint(step_dir / "default", {"w": jnp.ones(2)})
  save_checkpoint(step_dir / "ema", {"w": jnp.full(2, 3.0)})
  with pytest.raises(fws.WarmStartError, match=r"2 match the state equally well: 'default'.*'ema'.*ckpt_item"):
    fws.warm_start({"w": jnp.zeros(2)}, str(step_dir))
  out = fws.warm_start({"w": jnp.zeros(2)}, fws.WarmStartSettings(str(step_dir), ckpt_item="ema"))
  assert float(out["w"][0]) == 3.0
