"""T5X's native layout (sources/t5x.py), written as T5X writes it by `fixtures/make_t5x_checkpoint.py`."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.make_t5x_checkpoint import example_state, write_t5x_checkpoint

import flax_warmstart as fws
from flax_warmstart import cli
from flax_warmstart._src.sources import in_memory_source, lazy, open_source

EMBED = "token_embedder/embedding"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5x_model")
  write_t5x_checkpoint(str(root / "checkpoint_100"), example_state(step=100))
  write_t5x_checkpoint(str(root / "checkpoint_200"), example_state(step=200))
  return str(root)


def test_names_are_those_of_the_t5x_hook(model_dir):
  source = open_source(model_dir)
  assert (source.format, source.step) == ("t5x", 200)
  hook = in_memory_source(example_state(step=200), "T5X state dict")
  assert {n: v.shape for n, v in source.variables.items()} == {n: v.shape for n, v in hook.variables.items()}
  assert {EMBED, f"{EMBED}/state/param_states/v_row", "state/step"} <= set(source.variables)


def test_values_match_what_was_written(model_dir):
  source = open_source(os.path.join(model_dir, "checkpoint_100"))
  assert source.step == 100
  got = source.restore(dict.fromkeys(source.variables))
  want = in_memory_source(example_state(step=100), "")
  for name, variable in want.variables.items():
    np.testing.assert_array_equal(got[name], want.restore({name: None})[name], err_msg=name)
    assert got[name].dtype == variable.dtype


def test_tensorstore_specs_of_the_first_releases_read_too(tmp_path):
  write_t5x_checkpoint(str(tmp_path / "checkpoint_5"), example_state(step=5), legacy_path=True)
  got = open_source(str(tmp_path)).restore({EMBED: None})[EMBED]
  np.testing.assert_array_equal(got, example_state(step=5)["target"]["token_embedder"]["embedding"])


def test_warm_start_with_vocab_remap_opens_only_what_it_reads(model_dir, monkeypatch):
  opened = []
  original = lazy.StoreArray.open
  monkeypatch.setattr(lazy.StoreArray, "open", lambda self: opened.append(self.where) or original(self))
  live = {"token_embedder": {"embedding": jnp.zeros((3, 4))}, "decoder": {"kernel": jnp.zeros((4, 6))}}
  info = fws.VocabInfo(["t7", "new", "t0"], 3, 0, [f"t{i}" for i in range(8)])
  settings = fws.WarmStartSettings(
    model_dir,
    vars_to_warm_start="token_embedder/.*",
    var_name_to_vocab_info={EMBED: info},
  )
  out = fws.warm_start(live, settings, show_progress=False)
  table = example_state(step=200)["target"]["token_embedder"]["embedding"]
  got = np.asarray(out["token_embedder"]["embedding"])
  np.testing.assert_array_equal(got[[0, 2]], table[[7, 0]])
  np.testing.assert_array_equal(got[1], 0)
  assert [os.path.basename(w.rstrip("/")) for w in opened] == ["target.token_embedder.embedding"]


def test_cli_inspect(model_dir, capsys):
  assert cli.main(["inspect", model_dir]) == 0
  assert "state/step" in capsys.readouterr().out


def test_missing_array_names_it(model_dir, tmp_path):
  copy = tmp_path / "checkpoint_100"
  shutil.copytree(os.path.join(model_dir, "checkpoint_100"), copy)
  shutil.rmtree(copy / "target.token_embedder.embedding")
  with pytest.raises(fws.WarmStartError, match=r"target.token_embedder.embedding"):
    fws.warm_start({"token_embedder": {"embedding": jnp.zeros((8, 4))}}, str(copy), show_progress=False)


def test_truncated_msgpack_file_names_it(model_dir, tmp_path):
  copy = tmp_path / "checkpoint_100"
  shutil.copytree(os.path.join(model_dir, "checkpoint_100"), copy)
  data = (copy / "checkpoint").read_bytes()
  (copy / "checkpoint").write_bytes(data[:-20])
  with pytest.raises(fws.WarmStartError, match=r"checkpoint_100/checkpoint is not a readable msgpack checkpoint"):
    fws.list_variables(str(copy))
