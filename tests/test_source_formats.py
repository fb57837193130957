"""Every non-Orbax format through the public API: list, plan, warm start with a vocabulary remap, init_from_checkpoint, CLI.

Each format's checkpoint is written by its real writer (safetensors'
`save_file`, Flax's `save_checkpoint` and `to_bytes`, `np.savez`, T5X's layout
via `fixtures/make_t5x_checkpoint.py`) from the same trained Flax model with a
6-token vocabulary, then read into a changed model (7 tokens) and checked
value by value. Format-specific behaviour is in `test_source_<format>.py`.
"""

import json
import os
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures.make_t5x_checkpoint import write_t5x_checkpoint
from flax import serialization
from flax.training import checkpoints, train_state

import flax_warmstart as fws
from flax_warmstart import cli
from flax_warmstart._src.sources import lazy, open_source

safetensors_numpy = pytest.importorskip("safetensors.numpy")

OLD_VOCAB = ["<pad>", "a", "b", "c", "d", "e"]
NEW_VOCAB = ["<pad>", "e", "x", "c", "a", "y", "b"]
KEPT = {0: 0, 1: 5, 3: 3, 4: 1, 6: 2}  # new row -> old row


class TextModel(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, 4, name="embedder")(ids)
    return nn.Dense(3, name="head")(x.mean(axis=1))


def make(vocab, seed):
  model = TextModel(vocab)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  return state.apply_gradients(grads=grads)


def flat_params(state, sep):
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  return {jax.tree_util.keystr(p, simple=True, separator=sep): np.asarray(v) for p, v in leaves}


def write_safetensors(root, old):
  safetensors_numpy.save_file(flat_params(old, "."), os.path.join(root, "model.safetensors"))
  return root


def write_safetensors_sharded(root, old):
  flat = flat_params(old, ".")
  names = sorted(flat)
  shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
  for file, keys in shards.items():
    safetensors_numpy.save_file({k: flat[k] for k in keys}, os.path.join(root, file))
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  return os.path.join(root, "model.safetensors.index.json")


def write_flax_msgpack_run(root, old):
  with flax_config(use_orbax=False):
    for step in (1, 2):
      checkpoints.save_checkpoint(root, old.replace(step=step), step=step, keep=5)
  return root


def write_flax_orbax_run(root, old):
  with flax_config(use_orbax=True):
    for step in (1, 2):
      checkpoints.save_checkpoint(root, old.replace(step=step), step=step, keep=5)
  return root


def write_hf_flax(root, old):
  with open(os.path.join(root, "flax_model.msgpack"), "wb") as f:
    f.write(serialization.to_bytes(old.params))
  return root


def write_npz(root, old):
  path = os.path.join(root, "params.npz")
  np.savez(path, **{f"params/{k}": v for k, v in flat_params(old, "/").items()}, step=np.array(2))
  return path


def write_npz_compressed(root, old):
  path = os.path.join(root, "params.npz")
  np.savez_compressed(path, **flat_params(old, "/"))
  return path


def write_t5x(root, old):
  params = jax.tree_util.tree_map(np.asarray, old.params)
  write_t5x_checkpoint(os.path.join(root, "checkpoint_2"), {"target": params, "state": {"step": np.int32(2)}})
  return root


class flax_config:
  """Flax's checkpoint backend for one block."""

  def __init__(self, use_orbax):
    self.use_orbax = use_orbax

  def __enter__(self):
    self.saved = flax.config.flax_use_orbax_checkpointing
    flax.config.update("flax_use_orbax_checkpointing", self.use_orbax)
    self.warnings = warnings.catch_warnings()
    self.warnings.__enter__()
    warnings.filterwarnings("ignore", "Flax Checkpointing will soon be deprecated", DeprecationWarning)

  def __exit__(self, *exc):
    self.warnings.__exit__(*exc)
    flax.config.update("flax_use_orbax_checkpointing", self.saved)


WRITERS = {
  "safetensors": (write_safetensors, "safetensors"),
  "safetensors-sharded": (write_safetensors_sharded, "safetensors"),
  "flax-msgpack-run": (write_flax_msgpack_run, "flax-msgpack"),
  "flax-orbax-run": (write_flax_orbax_run, "orbax"),
  "hf-flax": (write_hf_flax, "flax-msgpack"),
  "npz": (write_npz, "npz"),
  "npz-compressed": (write_npz_compressed, "npz"),
  "t5x": (write_t5x, "t5x"),
}


@pytest.fixture(scope="module")
def old():
  return make(len(OLD_VOCAB), seed=0)


@pytest.fixture(scope="module", params=sorted(WRITERS))
def written(request, old, tmp_path_factory):
  writer, fmt = WRITERS[request.param]
  root = str(tmp_path_factory.mktemp(request.param.replace("-", "_")))
  return writer(root, old), fmt, request.param


def test_list_variables_names_the_params_under_the_naming_contract(written, old):
  location, fmt, _ = written
  listed = dict(fws.list_variables(location))
  for name, value in flat_params(old, "/").items():
    assert listed[name] == value.shape
  assert open_source(location).format == fmt


def test_warm_start_with_vocab_remap_into_a_changed_model(written, old):
  location, _, _ = written
  new = make(len(NEW_VOCAB), seed=1)
  info = fws.VocabInfo(NEW_VOCAB, len(NEW_VOCAB), 0, OLD_VOCAB)
  settings = fws.WarmStartSettings(
    location, var_name_to_vocab_info={"embedder/embedding": info}, optimizer_state="reset"
  )
  plan = fws.plan(new, settings)
  assert {row.name for row in plan.leaves if row.action is fws.Action.LOAD} >= {"embedder/embedding", "head/kernel"}
  out = fws.warm_start(new, settings, show_progress=False)
  got, want = np.asarray(out.params["embedder"]["embedding"]), np.asarray(old.params["embedder"]["embedding"])
  for new_row, old_row in KEPT.items():
    np.testing.assert_array_equal(got[new_row], want[old_row])
  np.testing.assert_array_equal(got[[2, 5]], 0)
  np.testing.assert_array_equal(out.params["head"]["kernel"], old.params["head"]["kernel"])
  np.testing.assert_array_equal(out.params["head"]["bias"], old.params["head"]["bias"])


def test_init_from_checkpoint_maps_a_scope(written, old):
  location, _, _ = written
  live = {"decoder": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  out = fws.init_from_checkpoint(live, location, {"head/": "decoder/"})
  np.testing.assert_array_equal(out["decoder"]["kernel"], old.params["head"]["kernel"])


def test_only_the_selected_tensors_are_opened_and_read(written, old, monkeypatch):
  location, _, name = written
  opened, read = [], []
  original = lazy.TreeSource.open_arrays
  monkeypatch.setattr(lazy.TreeSource, "open_arrays", lambda self, names: opened.extend(names) or original(self, names))
  pread = lazy._pread
  monkeypatch.setattr(lazy, "_pread", lambda path, offset, out: read.append(out.nbytes) or pread(path, offset, out))
  new = make(len(NEW_VOCAB), seed=1)
  settings = fws.WarmStartSettings(location, vars_to_warm_start="head/kernel", optimizer_state="reset")
  out = fws.warm_start(new, settings, show_progress=False)
  np.testing.assert_array_equal(out.params["head"]["kernel"], old.params["head"]["kernel"])
  if name == "flax-orbax-run":  # read by today's Orbax source
    return
  assert opened == ["head/kernel"]
  if name not in ("t5x", "npz-compressed"):  # TensorStore / a compressed member: not FileArrays
    assert sum(read) == old.params["head"]["kernel"].nbytes


def test_cli_inspect_lists_the_tensors(written, capsys):
  location, _, _ = written
  assert cli.main(["inspect", location]) == 0
  out = capsys.readouterr().out
  assert "embedder/embedding" in out and "(6, 4)" in out


def test_file_url_reads_like_the_path(written):
  location, _, _ = written
  assert fws.list_variables("file://" + location) == fws.list_variables(location)


def test_a_path_no_format_reads_says_what_is_there_and_lists_every_layout(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "sub").mkdir()
  with pytest.raises(fws.WarmStartError) as err:
    fws.list_variables(str(tmp_path))
  message = str(err.value)
  assert "a directory holding notes.txt, sub/" in message
  for layout in ("Orbax", "Orbax 2023", "Flax msgpack", "T5X", "TensorFlow", "safetensors", "npz"):
    assert f"\n  - {layout}" in message
  assert cli.main(["inspect", str(tmp_path / "notes.txt")]) == 1
  assert "a file of 5 bytes starting with b'hello'" in capsys.readouterr().err
  assert cli.main(["inspect", "file://" + str(tmp_path / "missing")]) == 1
  assert "the path does not exist" in capsys.readouterr().err


def test_file_url_of_another_host_is_refused():
  with pytest.raises(fws.WarmStartError, match="names the host 'server'"):
    fws.list_variables("file://server/ckpt")


def test_orbax_manager_root_step_by_number_and_by_metric(tmp_path):
  import orbax.checkpoint as ocp

  # Orbax keeps metrics only with a best_fn, and records neither it nor best_mode: the step names both.
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
  with ocp.CheckpointManager(str(tmp_path), options=options) as manager:
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9)):
      manager.save(step, args=ocp.args.StandardSave({"w": np.full(2, float(step))}), metrics={"loss": loss})
  assert open_source(str(tmp_path)).step == 3
  for step, want in ((1, 1), ("min:loss", 2), ("max:loss", 3)):
    source = open_source(str(tmp_path), step=step)
    assert (source.format, source.step) == ("orbax", want)
    np.testing.assert_array_equal(source.restore({"w": None})["w"], [want, want])


def test_a_file_rewritten_after_planning_is_refused(old, tmp_path):
  location = write_safetensors(str(tmp_path), old)
  new = make(len(OLD_VOCAB), seed=1)
  plan = fws.plan(new, fws.WarmStartSettings(location, optimizer_state="reset"))
  safetensors_numpy.save_file(
    {"head.kernel": np.zeros((4, 3), np.float32)}, os.path.join(location, "model.safetensors")
  )
  with pytest.raises(fws.WarmStartError, match="model.safetensors changed on disk"):
    fws.execute(plan, new, show_progress=False)


def test_cli_diff_plan_and_run_across_formats(tmp_path, capsys):
  old = str(tmp_path / "old.npz")
  np.savez(old, **{"params/enc/kernel": np.full((2, 3), 7.0, np.float32), "params/head/bias": np.ones(2, np.float32)})
  new = tmp_path / "new"
  new.mkdir()
  safetensors_numpy.save_file(
    {"enc.kernel": np.zeros((2, 3), np.float32), "head.bias": np.zeros(2, np.float32)}, str(new / "model.safetensors")
  )
  assert cli.main(["diff", old, str(new)]) == 0
  assert "2 names match" in capsys.readouterr().out
  assert cli.main(["plan", old, str(new)]) == 0
  assert cli.main(["run", old, str(new), str(tmp_path / "out"), "--no-progress"]) == 0
  out = open_source(str(tmp_path / "out"))
  np.testing.assert_array_equal(out.restore({"enc/kernel": None})["enc/kernel"], np.full((2, 3), 7.0))
