"""Gin bindings (flax_warmstart/gin.py): configurables, settings from .gin files, the CLI."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli, save_checkpoint

gin = pytest.importorskip("gin")
import flax_warmstart as fws  # noqa: E402
from flax_warmstart import gin as fws_gin  # noqa: E402


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_settings_with_vocab_info_and_initializers_from_gin(tmp_path):
  path = tmp_path / "ws.gin"
  path.write_text(
    """
flax_warmstart.WarmStartSettings.vars_to_warm_start = [".*"]
flax_warmstart.WarmStartSettings.optimizer_state = "reset"
flax_warmstart.WarmStartSettings.var_name_to_vocab_info = {"emb": @flax_warmstart.VocabInfo()}
flax_warmstart.VocabInfo.new_vocab = ["b", "z", "a"]
flax_warmstart.VocabInfo.new_vocab_size = 3
flax_warmstart.VocabInfo.num_oov_buckets = 1
flax_warmstart.VocabInfo.old_vocab = ["a", "b"]
flax_warmstart.VocabInfo.backup_initializer = @flax_warmstart.initializers.constant()
flax_warmstart.initializers.constant.value = 0.5
"""
  )
  settings = fws_gin.settings_from_gin(path, "/runs/old")
  assert isinstance(settings, fws.WarmStartSettings)
  assert settings.ckpt_to_initialize_from == "/runs/old"
  assert settings.vars_to_warm_start == (".*",) and settings.optimizer_state == "reset"
  info = settings.var_name_to_vocab_info["emb"]
  assert info.new_vocab == ("b", "z", "a") and info.num_oov_buckets == 1
  assert np.all(np.asarray(info.backup_initializer(None, (2,), jnp.float32)) == 0.5)


def test_gin_settings_drive_a_real_warm_start(tmp_path):
  ckpt = save_checkpoint(tmp_path / "ckpt", {"emb": jnp.array([[1.0], [2.0]])})
  path = tmp_path / "ws.gin"
  path.write_text(
    """
flax_warmstart.WarmStartSettings.var_name_to_vocab_info = {"emb": @flax_warmstart.VocabInfo()}
flax_warmstart.VocabInfo.new_vocab = ["b", "z", "a"]
flax_warmstart.VocabInfo.new_vocab_size = 3
flax_warmstart.VocabInfo.num_oov_buckets = 0
flax_warmstart.VocabInfo.old_vocab = ["a", "b"]
flax_warmstart.VocabInfo.backup_initializer = @flax_warmstart.MeanOfOldRows()
"""
  )
  out = fws.warm_start({"emb": jnp.zeros((3, 1))}, fws_gin.settings_from_gin(path, ckpt))
  assert out["emb"].ravel().tolist() == [2.0, 1.5, 1.0]


def test_bad_gin_files_are_clear_errors(tmp_path):
  with pytest.raises(fws.WarmStartError, match="does not exist"):
    fws_gin.settings_from_gin(tmp_path / "nope.gin")
  path = tmp_path / "bad.gin"
  path.write_text("flax_warmstart.WarmStartSettings.no_such_field = 1\n")
  with pytest.raises(fws.WarmStartError, match="no_such_field"):
    fws_gin.settings_from_gin(path, "/runs/old")


def test_cli_reads_gin_settings(tmp_path):
  save_checkpoint(tmp_path / "old", {"params": {"enc": {"w": jnp.ones(2)}}})
  save_checkpoint(tmp_path / "new", {"params": {"backbone": {"w": jnp.zeros(2)}}})
  path = tmp_path / "ws.gin"
  path.write_text('flax_warmstart.WarmStartSettings.var_name_to_prev_var_name = {"backbone/w": "enc/w"}\n')
  out = run_cli("plan", tmp_path / "old", tmp_path / "new", "--settings", path)
  assert out.returncode == 0, out.stderr
  assert "backbone/w" in out.stdout and "enc/w" in out.stdout and "load" in out.stdout
