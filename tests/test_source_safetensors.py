"""safetensors files (flax_warmstart/_src/sources/safetensors.py): names, dtypes, shards, partial reads, damage.

Files are written by the `safetensors` package (`save_file`) and every value
is compared with what its own reader (`safe_open`) returns.
"""

import importlib
import json
import os
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws
from flax_warmstart import cli
from flax_warmstart._src.sources import lazy, open_source

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

RNG = np.random.default_rng(0)
TENSORS = {
  "model.embed_tokens.weight": RNG.standard_normal((64, 8)).astype(np.float32),
  "model.layers.0.mlp.up_proj.weight": RNG.standard_normal((8, 16)).astype(ml_dtypes.bfloat16),
  "model.layers.0.mlp.up_proj.bias": RNG.standard_normal(16).astype(np.float16),
  "model.layers.1.ids": np.arange(5, dtype=np.int8),
  "model.layers.1.mask": np.array([True, False, True]),
  "model.layers.1.big": np.arange(3, dtype=np.uint64) * (2**40),
  "model.layers.1.f8": np.linspace(-1, 1, 4).astype(ml_dtypes.float8_e4m3fn),
  "model.scale": np.array(2.5, np.float64),
  "model.empty": np.zeros((0, 3), np.float32),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("st") / "model.safetensors")
  save_file(TENSORS, path, metadata={"format": "np"})
  return path


def test_dotted_names_become_slash_names_and_values_match_safe_open(single):
  source = open_source(single)
  names = {k: k.replace(".", "/") for k in TENSORS}
  assert set(source.variables) == set(names.values())
  restored = source.restore(dict.fromkeys(source.variables))
  with safetensors.safe_open(single, framework="numpy") as f:
    for key, name in names.items():
      # safe_open's numpy reader has no float8 (it looks for np.float8_e4m3fn): compare with what was saved.
      want = TENSORS[key] if key.endswith("f8") else f.get_tensor(key)
      assert source.variables[name].shape == want.shape and source.variables[name].dtype == want.dtype
      assert restored[name].dtype == want.dtype
      np.testing.assert_array_equal(restored[name].reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))


def test_slices_read_like_numpy(single):
  arrays = open_source(single).open_arrays(["model/embed_tokens/weight", "model/scale"])
  table = arrays["model/embed_tokens/weight"]
  want = TENSORS["model.embed_tokens.weight"]
  rows = np.array([63, 0, 7, 7, 30])
  np.testing.assert_array_equal(table[rows], want[rows])
  np.testing.assert_array_equal(table[2:9, 3:5], want[2:9, 3:5])
  np.testing.assert_array_equal(table[5], want[5])
  np.testing.assert_array_equal(table[:, np.array([7, 1])], want[:, [7, 1]])
  np.testing.assert_array_equal(np.asarray(arrays["model/scale"]), 2.5)


def test_vocab_remap_reads_only_the_kept_rows(single, monkeypatch):
  reads = []
  pread = lazy._pread
  monkeypatch.setattr(
    lazy, "_pread", lambda path, offset, out: reads.append((offset, out.nbytes)) or pread(path, offset, out)
  )
  old_vocab = [f"t{i}" for i in range(64)]
  new_vocab = ["t5", "new", "t40", "t6"]
  live = {"model": {"embed_tokens": {"weight": jax.numpy.zeros((4, 8))}}}
  info = fws.VocabInfo(new_vocab, 4, 0, old_vocab)
  settings = fws.WarmStartSettings(single, var_name_to_vocab_info={"model/embed_tokens/weight": info})
  out = fws.warm_start(live, settings, show_progress=False)
  want = TENSORS["model.embed_tokens.weight"]
  got = np.asarray(out["model"]["embed_tokens"]["weight"])
  np.testing.assert_array_equal(got[[0, 2, 3]], want[[5, 40, 6]])
  np.testing.assert_array_equal(got[1], 0)
  assert sum(n for _, n in reads) == 3 * 8 * 4  # three rows of 8 float32, nothing else


def test_sharded_restore_matches(single):
  mesh = jax.make_mesh((8,), ("x",))
  sharding = NamedSharding(mesh, P("x"))
  source = open_source(single)
  out = source.restore({"model/embed_tokens/weight": jax.ShapeDtypeStruct((64, 8), np.float32, sharding=sharding)})
  value = out["model/embed_tokens/weight"]
  assert value.sharding == sharding
  np.testing.assert_array_equal(np.asarray(value), TENSORS["model.embed_tokens.weight"])


def test_slash_names_stay_as_they_are(tmp_path):
  path = str(tmp_path / "jax.safetensors")
  save_file({"params/enc.v2/kernel": np.ones((2, 2), np.float32)}, path)
  assert fws.list_variables(path) == [("enc.v2/kernel", (2, 2))]


def write_shards(root):
  names = sorted(TENSORS)
  shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
  for file, keys in shards.items():
    save_file({k: TENSORS[k] for k in keys}, os.path.join(root, file))
  with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}, f)
  return shards


def test_sharded_files_read_through_their_index(tmp_path):
  shards = write_shards(tmp_path)
  source = open_source(str(tmp_path))
  assert source.location.endswith("model.safetensors.index.json")
  restored = source.restore(dict.fromkeys(source.variables))
  for key, value in TENSORS.items():
    np.testing.assert_array_equal(
      restored[key.replace(".", "/")].reshape(-1).view(np.uint8), value.reshape(-1).view(np.uint8)
    )
  assert {os.path.basename(leaf.path) for leaf in source.leaves} == set(shards)


def test_missing_shard_names_it(tmp_path):
  write_shards(tmp_path)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(fws.WarmStartError, match="model-00002-of-00002.safetensors is missing"):
    fws.list_variables(str(tmp_path))


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
  write_shards(tmp_path)
  index = tmp_path / "model.safetensors.index.json"
  data = json.loads(index.read_text())
  data["weight_map"]["model.ghost"] = "model-00001-of-00002.safetensors"
  index.write_text(json.dumps(data))
  with pytest.raises(fws.WarmStartError, match="'model.ghost' is listed"):
    fws.list_variables(str(index))


@pytest.mark.parametrize("keep", [4, 100, 2000])
def test_truncated_file_names_it(single, tmp_path, keep):
  path = tmp_path / "model.safetensors"
  path.write_bytes(pathlib.Path(single).read_bytes()[:keep])
  with pytest.raises(fws.WarmStartError, match="model.safetensors is not a readable safetensors file"):
    fws.list_variables(str(path))
  assert cli.main(["inspect", str(path)]) == 1


def test_several_files_without_index_is_ambiguous(tmp_path):
  for name in ("a.safetensors", "b.safetensors"):
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / name))
  with pytest.raises(fws.WarmStartError, match=r"several safetensors checkpoints \(a.safetensors, b.safetensors\)"):
    fws.list_variables(str(tmp_path))


def test_flax_model_msgpack_is_preferred_in_a_hugging_face_directory(tmp_path):
  save_file({"encoder.weight": np.ones((2, 3), np.float32)}, str(tmp_path / "model.safetensors"))
  (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes({"encoder": {"kernel": np.ones((3, 2))}}))
  assert open_source(str(tmp_path)).format == "flax-msgpack"
  assert open_source(str(tmp_path / "model.safetensors")).format == "safetensors"


def test_missing_package_names_the_extra(single, monkeypatch):
  real = importlib.import_module

  def fake(name, *args):
    if name == "safetensors":
      raise ImportError("No module named 'safetensors'")
    return real(name, *args)

  monkeypatch.setattr(importlib, "import_module", fake)
  with pytest.raises(
    ImportError,
    match=r"pip install safetensors \(the `safetensors` extra; in a clone of flax_warmstart: pip install -e '\.\[safetensors\]'\)",
  ) as err:
    fws.list_variables(single)
  assert isinstance(err.value, fws.WarmStartError)
