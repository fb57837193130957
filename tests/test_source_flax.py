"""Flax msgpack checkpoints and run directories (sources/flax_msgpack.py, msgpack_tree.py, rundir.py, locate.py).

Written by `flax.training.checkpoints.save_checkpoint` (msgpack and Orbax
backends) and `flax.serialization`; `msgpack_restore` is the reference reader.
"""

import os
import pathlib
import warnings

import flax
import jax
import numpy as np
import optax
import pytest
from conftest import MLP, make_state
from flax import serialization
from flax.training import checkpoints

import flax_warmstart as fws
from flax_warmstart._src.sources import open_source
from flax_warmstart._src.sources.msgpack_tree import read_tree


def save(run, state, step, use_orbax=False):
  saved = flax.config.flax_use_orbax_checkpointing
  flax.config.update("flax_use_orbax_checkpointing", use_orbax)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Flax Checkpointing will soon be deprecated", DeprecationWarning)
      return checkpoints.save_checkpoint(str(run), state, step=step, keep=10)
  finally:
    flax.config.update("flax_use_orbax_checkpointing", saved)


@pytest.fixture(scope="module")
def states():
  return {step: make_state(MLP(), optax.adam(1e-2), seed=step, steps=2) for step in (10, 20)}


@pytest.fixture(scope="module")
def run(states, tmp_path_factory):
  run = tmp_path_factory.mktemp("run")
  for step, state in states.items():
    save(run, state.replace(step=step), step)
  return str(run)


def test_newest_step_wins_and_the_step_is_reported(run, states):
  source = open_source(run)
  assert (source.format, source.step, source.describe()) == ("flax-msgpack", 20, f"{run}@step 20")
  settings = fws.WarmStartSettings(run, vars_to_warm_start=[".*"])  # a list: slots too, as in TensorFlow
  out = fws.warm_start(make_state(MLP(), optax.adam(1e-2), seed=3), settings, show_progress=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out.params, states[20].params)
  for slot in ("mu", "nu"):  # the Adam slots come too
    jax.tree_util.tree_map(
      np.testing.assert_array_equal, getattr(out.opt_state[0], slot), getattr(states[20].opt_state[0], slot)
    )


def test_a_step_can_be_asked_for(run, states):
  source = open_source(run, step=10)
  assert source.step == 10
  np.testing.assert_array_equal(
    source.restore({"encoder/kernel": None})["encoder/kernel"], states[10].params["encoder"]["kernel"]
  )
  with pytest.raises(fws.WarmStartError, match="has no step 15; its steps are 10, 20"):
    open_source(run, step=15)
  with pytest.raises(fws.WarmStartError, match="no step 3 was asked|is not a directory of checkpoint steps"):
    open_source(os.path.join(run, "checkpoint_10"), step=3)


def test_float_steps(tmp_path):
  for step in (0.1, 0.5, 0.91):
    save(tmp_path, {"w": np.full(2, step)}, step)
  source = open_source(str(tmp_path))
  assert source.step == 0.91
  np.testing.assert_array_equal(source.restore({"w": None})["w"], [0.91, 0.91])


def test_values_match_msgpack_restore(run):
  path = os.path.join(run, "checkpoint_20")
  with open(path, "rb") as f:
    want = serialization.msgpack_restore(f.read())
  source = open_source(path)
  got = source.restore(dict.fromkeys(source.variables))
  assert got["encoder/kernel/opt_state/0/mu"].tolist() == want["opt_state"]["0"]["mu"]["encoder"]["kernel"].tolist()
  assert got["step"] == want["step"] == 20
  assert len(got) == len(jax.tree_util.tree_leaves(want))


def test_chunked_arrays_read_like_msgpack_restore(tmp_path, monkeypatch):
  monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)  # flax splits arrays over this into flat pieces
  table = np.arange(60 * 7, dtype=np.float32).reshape(60, 7)
  (tmp_path / "checkpoint_1").write_bytes(serialization.to_bytes({"params": {"embed": table}}))
  want = serialization.msgpack_restore((tmp_path / "checkpoint_1").read_bytes())["params"]["embed"]
  np.testing.assert_array_equal(want, table)
  array = open_source(str(tmp_path)).open_arrays(["embed"])["embed"]
  assert array.shape == (60, 7) and len(array.pieces) > 1
  rows = np.array([59, 3, 4, 30])
  np.testing.assert_array_equal(array[rows], table[rows])
  np.testing.assert_array_equal(array[...], table)


def test_orbax_backend_run_directory_reads_the_newest_step(tmp_path, states):
  for step, state in states.items():
    save(tmp_path, state.replace(step=step), step, use_orbax=True)
  source = open_source(str(tmp_path))
  assert (source.format, source.step) == ("orbax", 20)
  np.testing.assert_array_equal(source.restore({"head/bias": None})["head/bias"], states[20].params["head"]["bias"])


def test_hugging_face_flax_model_msgpack(tmp_path):
  params = {"bert": {"embeddings": {"word_embeddings": {"embedding": np.ones((5, 2), np.float32)}}}}
  (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
  assert fws.list_variables(str(tmp_path)) == [("bert/embeddings/word_embeddings/embedding", (5, 2))]


@pytest.mark.parametrize("keep", [1, 50, -3])
def test_truncated_file_names_it(run, tmp_path, keep):
  data = pathlib.Path(run, "checkpoint_20").read_bytes()
  (tmp_path / "checkpoint_20").write_bytes(data[:keep])
  with pytest.raises(fws.WarmStartError, match="checkpoint_20 is not a readable msgpack checkpoint"):
    fws.list_variables(str(tmp_path / "checkpoint_20"))


def test_read_tree_locates_without_reading(run):
  tree = read_tree(os.path.join(run, "checkpoint_10"))
  kernel = tree["params"]["encoder"]["kernel"]
  assert kernel.shape == (3, 4) and kernel.offset > 0
