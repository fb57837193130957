"""Gin bindings (flax_warmstart/gin.py): configurables, settings from .gin files, the CLI."""

import json
import sys

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


# Gin as T5X users type it: several files, bindings, %INITIAL_CHECKPOINT, other libraries' configurables.

T5X_CONFIG = """
from __gin__ import dynamic_registration
import flax_warmstart.gin
import t5x_is_not_installed.utils

utils.RestoreCheckpointConfig.mode = "specific"
utils.RestoreCheckpointConfig.state_transformation_fns = [@flax_warmstart.t5x.state_transformation()]
flax_warmstart.t5x.state_transformation.settings = @flax_warmstart.WarmStartSettings()
flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT_PATH
flax_warmstart.WarmStartSettings.vars_to_warm_start = "encoder/"
"""


def test_files_then_bindings_in_order_and_macros_from_the_checkpoint(tmp_path):
  (tmp_path / "a.gin").write_text(
    "flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT\n"
    'flax_warmstart.WarmStartSettings.vars_to_warm_start = "a"\n'
    'flax_warmstart.WarmStartSettings.step = "reset"\n'
  )
  (tmp_path / "b.gin").write_text('flax_warmstart.WarmStartSettings.vars_to_warm_start = "b"\n')
  bindings = ['flax_warmstart.WarmStartSettings.step = "keep"']
  settings = fws_gin.settings_from_gin([tmp_path / "a.gin", tmp_path / "b.gin"], "/runs/old", bindings=bindings)
  assert settings.vars_to_warm_start == "b" and settings.step == "keep"
  assert settings.ckpt_to_initialize_from == "/runs/old"
  assert gin.query_parameter("INITIAL_CHECKPOINT_PATH/gin.macro.value") == "/runs/old"


def test_a_macro_the_config_binds_keeps_its_value_with_a_warning(tmp_path, caplog):
  (tmp_path / "a.gin").write_text('INITIAL_CHECKPOINT = "/runs/elsewhere"\n')
  settings = fws_gin.settings_from_gin(tmp_path / "a.gin", "/runs/old")
  assert settings.ckpt_to_initialize_from == "/runs/old"
  assert gin.query_parameter("INITIAL_CHECKPOINT/gin.macro.value") == "/runs/elsewhere"
  assert "INITIAL_CHECKPOINT = '/runs/elsewhere'" in caplog.text, caplog.text
  gin.clear_config()
  alone = fws_gin.settings_from_gin(
    None,
    bindings=[
      'INITIAL_CHECKPOINT = "/a"',
      "flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT",
    ],
  )
  assert alone.ckpt_to_initialize_from == "/a"


def test_a_t5x_config_is_read_as_it_is(tmp_path):
  (tmp_path / "finetune.gin").write_text(T5X_CONFIG)
  settings = fws_gin.settings_from_gin(tmp_path / "finetune.gin", "/runs/old")
  assert settings.vars_to_warm_start == "encoder/" and settings.ckpt_to_initialize_from == "/runs/old"


@pytest.mark.parametrize(
  "binding",
  ["flax_warmstart.WarmStartSetings.step = 'reset'", "WarmStartSetings.step = 'reset'", "VocabInf.new_vocab = []"],
)
def test_a_typo_in_our_names_is_an_error_not_skipped(tmp_path, binding):
  (tmp_path / "typo.gin").write_text(T5X_CONFIG + binding + "\n")
  with pytest.raises(fws.WarmStartError, match=binding.split(".")[-2].split(".")[-1].split()[0]):
    fws_gin.settings_from_gin(tmp_path / "typo.gin", "/runs/old")


def test_search_paths_find_files_and_includes(tmp_path):
  (tmp_path / "base.gin").write_text('flax_warmstart.WarmStartSettings.step = "reset"\n')
  (tmp_path / "top.gin").write_text('include "base.gin"\nflax_warmstart.WarmStartSettings.vars_to_warm_start = "x"\n')
  settings = fws_gin.settings_from_gin("top.gin", "/runs/old", search_paths=[tmp_path])
  assert settings.step == "reset" and settings.vars_to_warm_start == "x"
  with pytest.raises(fws.WarmStartError, match="nope.gin does not exist"):
    fws_gin.settings_from_gin("nope.gin", "/runs/old", search_paths=[tmp_path])


# The command line's --gin_file, --gin_bindings, --gin_search_paths.


@pytest.fixture
def renamed(tmp_path):
  old = save_checkpoint(tmp_path / "old", {"params": {"enc": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(3)}}})
  new = save_checkpoint(tmp_path / "new", {"params": {"backbone": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(3)}}})
  (tmp_path / "rename.gin").write_text(
    "import flax_warmstart.gin\n"
    "flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT\n"
    'flax_warmstart.WarmStartSettings.var_name_to_prev_var_name = {"backbone/w": "enc/w"}\n'
    'flax_warmstart.WarmStartSettings.vars_to_warm_start = "backbone/"\n'
  )
  return old, new, tmp_path


def plan_rows(result):
  assert result.returncode == 0, result.stderr
  return {leaf["name"]: leaf["action"] for leaf in json.loads(result.stdout)["leaves"]}


def test_cli_gin_file_and_bindings(renamed):
  old, new, root = renamed
  only_rename = plan_rows(run_cli("plan", old, new, "--gin_file", root / "rename.gin", "--json"))
  assert only_rename == {"backbone/w": "load", "head/w": "keep"}
  everything = ["--gin_bindings", "flax_warmstart.WarmStartSettings.vars_to_warm_start = '.*'"]
  assert plan_rows(run_cli("plan", old, new, "--gin_file", root / "rename.gin", *everything, "--json")) == {
    "backbone/w": "load",
    "head/w": "load",
  }
  # T5X's spellings: --gin_file=, a search path, a .gin --settings before the files.
  found = run_cli("plan", old, new, "--gin_search_paths", f"/nowhere,{root}", "--gin_file=rename.gin", "--json")
  assert plan_rows(found) == only_rename
  both = run_cli("plan", old, new, "--settings", root / "rename.gin", *everything, "--json")
  assert plan_rows(both)["head/w"] == "load"


def test_cli_unbound_macro_names_the_binding_to_add(renamed, tmp_path):
  old, new, _ = renamed
  (tmp_path / "vocab.gin").write_text(
    "import flax_warmstart.gin\nflax_warmstart.WarmStartSettings.vars_to_warm_start = %SELECT\n"
  )
  result = run_cli("plan", old, new, "--gin_file", tmp_path / "vocab.gin")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result
  assert "The macro %SELECT is used but not bound: bind it, e.g. --gin_bindings 'SELECT = ...'" in result.stderr
  bound = run_cli(
    "plan", old, new, "--gin_file", tmp_path / "vocab.gin", "--gin_bindings", "SELECT = 'head/'", "--json"
  )
  assert plan_rows(bound) == {"backbone/w": "keep", "head/w": "load"}


def test_cli_without_gin_config_says_how_to_install_it(renamed, monkeypatch):
  old, new, root = renamed
  monkeypatch.setitem(sys.modules, "gin", None)  # `import gin` raises ImportError, as without the extra
  result = run_cli("plan", old, new, "--gin_file", root / "rename.gin")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result
  assert "need gin-config, which is not installed: pip install gin-config (the `gin` extra" in result.stderr


def test_cli_gin_config_is_fresh_for_each_command(renamed):
  old, new, root = renamed
  everything = ["--gin_bindings", "flax_warmstart.WarmStartSettings.vars_to_warm_start = '.*'"]
  assert (
    plan_rows(run_cli("plan", old, new, "--gin_file", root / "rename.gin", *everything, "--json"))["head/w"] == "load"
  )
  assert plan_rows(run_cli("plan", old, new, "--gin_file", root / "rename.gin", "--json"))["head/w"] == "keep"


@pytest.mark.parametrize(
  "args, fragments",
  [
    (["--gin_file", "missing.gin"], ["missing.gin does not exist"]),
    (["--gin_bindings", "flax_warmstart.WarmStartSettings.nope = 1"], ["Gin bindings", "nope"]),
    (["--gin_bindings", "this is not gin"], ["Gin bindings"]),
  ],
)
def test_cli_gin_errors_are_one_line(renamed, args, fragments):
  old, new, _ = renamed
  result = run_cli("plan", old, new, *args)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result
  assert result.stderr.startswith("flax-warmstart: error:"), result.stderr
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr)


GIN_MODEL = """
import gin
import jax.numpy as jnp


@gin.configurable
def fws_gin_cli_params(width=2):
  return {"params": {"enc": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(width)}}}
"""


def test_cli_init_function_configured_by_gin(renamed):
  # A @gin.configurable init function takes its arguments from --gin_bindings (imported before Gin parses).
  old, _, root = renamed
  (root / "gin_model.py").write_text(GIN_MODEL)
  args = ["plan", old, "--init", f"{root / 'gin_model.py'}:fws_gin_cli_params", "--json"]
  default = run_cli(*args)  # width 2: OLD's head/w has 3 rows
  assert default.returncode == 1 and "head/w" in default.stderr, default.stderr
  assert plan_rows(run_cli(*args, "--gin_bindings", "fws_gin_cli_params.width = 3")) == {
    "enc/w": "load",
    "head/w": "load",
  }
