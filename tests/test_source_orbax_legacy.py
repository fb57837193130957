"""2023 Orbax checkpoints (sources/orbax_legacy.py), from fixtures written by Orbax 0.3.5 and 0.4.8 themselves.

`fixtures/make_legacy_fixtures.py` wrote them (see its docstring for the
virtual environments), packed as `fixtures/legacy_orbax.tar.gz` (13 KB) and
unpacked into a temporary directory here; `expected_state(step)` gives the
values saved.
"""

import os
import shutil
import tarfile

import jax
import numpy as np
import optax
import pytest
from conftest import MLP, make_state
from fixtures.make_legacy_fixtures import expected_state

import flax_warmstart as fws
from flax_warmstart import cli
from flax_warmstart._src.sources import open_source

ARCHIVE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_orbax.tar.gz")
VERSIONS = ("orbax-0.3.5", "orbax-0.4.8")
ROOT = ""  # set by the `unpacked` fixture, for every test of this module


@pytest.fixture(scope="module", autouse=True)
def unpacked(tmp_path_factory):
  """The fixture checkpoints, unpacked into a temporary directory (never read or written in the source tree)."""
  global ROOT
  target = tmp_path_factory.mktemp("legacy")
  with tarfile.open(ARCHIVE) as archive:
    archive.extractall(target, filter="data")
  ROOT = os.path.join(target, "legacy_orbax")
  return ROOT


def expected_names(step):
  """Checkpoint name -> value of `expected_state(step)` under the naming contract."""
  state = expected_state(step)
  out = {
    "step": state["step"],
    "opt_state/0/count": state["opt_state"]["0"]["count"],
    "extra/half": state["extra"]["half"],
  }
  for scope, leaves in state["params"].items():
    for leaf, value in leaves.items():
      out[f"{scope}/{leaf}"] = value
      for slot in ("mu", "nu"):
        out[f"{scope}/{leaf}/opt_state/0/{slot}"] = state["opt_state"]["0"][slot][scope][leaf]
  return out


def check_values(source, step):
  want = expected_names(step)
  assert {n: v.shape for n, v in source.variables.items()} == {n: np.shape(v) for n, v in want.items()}
  got = source.restore(dict.fromkeys(source.variables))
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert np.asarray(got[name]).dtype == np.asarray(value).dtype or name == "step", name


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("layout", ["aggregate", "pytree", "mixed"])
def test_every_layout_reads_its_values(version, layout):
  source = open_source(os.path.join(ROOT, version, layout))
  # Orbax 0.4.8's all-TensorStore checkpoint has a _METADATA today's reader understands.
  assert source.format == ("orbax" if (version, layout) == ("orbax-0.4.8", "pytree") else "orbax-legacy")
  check_values(source, 10)


@pytest.mark.parametrize("version", VERSIONS)
def test_flax_run_directory_warm_starts_a_train_state(version):
  run = os.path.join(ROOT, version, "flax_run")
  source = open_source(run)
  assert (source.format, source.step) == ("orbax-legacy", 20)
  check_values(source, 20)
  live = make_state(MLP(), optax.adam(1e-2), seed=4)
  out = fws.warm_start(live, fws.WarmStartSettings(run, vars_to_warm_start=[".*"]), show_progress=False)
  want = expected_state(20)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out.params, want["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, out.opt_state[0].mu, want["opt_state"]["0"]["mu"])


@pytest.mark.parametrize("version", VERSIONS)
def test_manager_root_newest_given_and_best_steps(version):
  root = os.path.join(ROOT, version, "manager")
  assert open_source(root).step == 3
  check_values(open_source(root, step=1), 1)
  assert open_source(root, step="min:loss").step == 2  # losses 3.0, 1.0, 2.0
  assert open_source(root, step="max:loss").step == 1
  with pytest.raises(fws.WarmStartError, match=r"'min:<metric>' or 'max:<metric>'.*\['loss'\]"):
    open_source(root, step="best")
  with pytest.raises(fws.WarmStartError, match=r"has a saved metric 'accuracy' \(metrics saved: \['loss'\]\)"):
    open_source(root, step="max:accuracy")


def test_inspect_shows_shapes_not_objects(capsys):
  assert cli.main(["inspect", os.path.join(ROOT, "orbax-0.4.8", "aggregate")]) == 0
  out = capsys.readouterr().out
  assert "encoder/kernel" in out and "(3, 4)" in out and "object" not in out


def test_truncated_msgpack_file_names_it(tmp_path):
  copy = tmp_path / "aggregate"
  shutil.copytree(os.path.join(ROOT, "orbax-0.3.5", "aggregate"), copy)
  data = (copy / "checkpoint").read_bytes()
  (copy / "checkpoint").write_bytes(data[: len(data) // 2])
  with pytest.raises(fws.WarmStartError, match=r"aggregate/checkpoint is not a readable msgpack checkpoint"):
    fws.list_variables(str(copy))


def test_missing_tensorstore_array_names_it(tmp_path):
  copy = tmp_path / "pytree"
  shutil.copytree(os.path.join(ROOT, "orbax-0.3.5", "pytree"), copy)
  shutil.rmtree(copy / "params.encoder.kernel")
  with pytest.raises(fws.WarmStartError, match=r"'params.encoder.kernel' .*pytree/params.encoder.kernel"):
    fws.list_variables(str(copy))
