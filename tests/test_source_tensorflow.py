"""Tests of the TensorFlow source (`sources/tensorflow.py`, `sources/tensorflow_bundle.py`, `crc32c.py`).

Fast tests read the small checkpoints checked in under tests/fixtures/tf/
(written by tests/fixtures/make_tf_fixtures.py with TensorFlow, with every
tensor's value as `tf.train.load_checkpoint` reads it and TensorFlow's own
`warm_start` result in expected.npz), and bundles written here by a minimal
writer (large tensors, snappy blocks, big-endian data), through the public
API. Slow tests write real checkpoints with TensorFlow (the `tf` extra;
skipped without it) and compare every tensor with `tf.train.load_checkpoint`
and a vocabulary warm start with TensorFlow's `warm_start`.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import flax_warmstart as fws
from flax_warmstart import cli
from flax_warmstart._src import crc32c, hostread
from flax_warmstart._src.sources import open_source
from flax_warmstart._src.sources import tensorflow as tf_source
from flax_warmstart._src.sources import tensorflow_bundle as bundle

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
OLD_VOCAB = ["apple", "banana", "cherry", "date", "elder", "fig"]
NEW_VOCAB = ["fig", "kiwi", "apple", "date", "lime"]  # + 1 OOV row, as in make_tf_fixtures.py
SAVER_NAMES = [
  ("beta1_power", ()),
  ("beta2_power", ()),
  ("dense/bias", (4,)),
  ("dense/bias/opt_state/0/mu", (4,)),
  ("dense/bias/opt_state/0/nu", (4,)),
  ("dense/kernel", (3, 4)),
  ("dense/kernel/opt_state/0/mu", (3, 4)),
  ("dense/kernel/opt_state/0/nu", (3, 4)),
  ("emb/embeddings", (6, 3)),
  ("emb/embeddings/opt_state/0/mu", (6, 3)),
  ("emb/embeddings/opt_state/0/nu", (6, 3)),
  ("extra/bf16", (3,)),
  ("extra/f16", (1, 2)),
  ("extra/flags", (3,)),
  ("extra/i32", (3,)),
  ("extra/i64", (2,)),
  ("extra/names", (3,)),
  ("extra/title", ()),
  ("global_step", ()),
  ("head/w", (2, 2)),
  ("head/w/opt_state/0/trace", (2, 2)),
]


@pytest.fixture(scope="module")
def expected():
  with np.load(FIXTURES / "expected.npz") as data:
    return dict(data)


@pytest.fixture
def saver_copy(tmp_path):
  """A copy of the Saver fixture that a test may damage."""
  return Path(shutil.copytree(FIXTURES / "saver", tmp_path / "saver"))


def _values(source):
  return source.restore(dict.fromkeys(source.variables))


def _check_all(source, expected, tag):
  values = _values(source)
  stored = {k.split(":", 1)[1] for k in expected if k.startswith(tag + ":")}
  assert {t.key for t in source.tensors.values()} == stored - {"save_counter/.ATTRIBUTES/VARIABLE_VALUE"}
  for name, tensor in source.tensors.items():
    want = expected[f"{tag}:{tensor.key}"]
    got = np.asarray(values[name])
    assert got.shape == want.shape, name
    if got.dtype.kind == "O":
      np.testing.assert_array_equal(got.astype(np.bytes_), want, err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=name)


# --- CRC32C -------------------------------------------------------------------


def _crc_reference(data: bytes, crc: int = 0) -> int:
  table = crc32c._byte_table()
  crc ^= 0xFFFFFFFF
  for b in data:
    crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
  return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 7, 511, 512, 1000, 8193, 40_000, 600_001])
def test_crc32c_matches_a_bytewise_reference(n):
  data = np.random.default_rng(n).integers(0, 256, n + 1, dtype=np.uint8)[1:]  # unaligned
  assert crc32c.value(data) == _crc_reference(data.tobytes())
  assert crc32c.value(data.tobytes(), crc=0x1234) == _crc_reference(data.tobytes(), 0x1234)
  half = n // 2
  combined = crc32c.combine(crc32c.raw(data[:half]), crc32c.raw(data[half:]), n - half)
  assert crc32c.finish(combined, n) == crc32c.value(data)


# --- locations, names, values ---------------------------------------------------


@pytest.mark.parametrize(
  "location",
  ["saver", "saver/model.ckpt-20", "saver/model.ckpt-20.index", "saver/model.ckpt-20.data-00000-of-00001"],
)
def test_locations_resolve_like_tensorflow(location):
  # The state file records another machine's absolute paths: the same file name is used here.
  source = open_source(str(FIXTURES / location))
  assert (source.format, source.path, source.step) == ("tensorflow", str(FIXTURES / "saver" / "model.ckpt-20"), 20)
  assert source.describe() == f"{FIXTURES / location}@step 20"


def test_object_based_directory_and_file_url():
  source = open_source(f"file://{FIXTURES / 'object'}")
  assert (source.path, source.step) == (str(FIXTURES / "object" / "ckpt-2"), 2)


def test_list_variables_names_slots_like_this_library():
  assert fws.list_variables(FIXTURES / "saver") == SAVER_NAMES
  assert fws.list_variables(FIXTURES / "object") == [
    ("model/dense/bias", (3,)),
    ("model/dense/bias/opt_state/0/mu", (3,)),
    ("model/dense/bias/opt_state/0/nu", (3,)),
    ("model/dense/kernel", (2, 3)),
    ("model/dense/kernel/opt_state/0/mu", (2, 3)),
    ("model/dense/kernel/opt_state/0/nu", (2, 3)),
    ("model/label", ()),
    ("optimizer/beta1_power", ()),
    ("optimizer/beta2_power", ()),
  ]
  variables = open_source(FIXTURES / "saver").variables
  assert {n: (v.kind, v.param, v.slot) for n, v in variables.items() if v.kind != "param"} == {
    "beta1_power": ("other", None, None),
    "beta2_power": ("other", None, None),
    "dense/bias/opt_state/0/mu": ("slot", "dense/bias", "opt_state/0/mu"),
    "dense/bias/opt_state/0/nu": ("slot", "dense/bias", "opt_state/0/nu"),
    "dense/kernel/opt_state/0/mu": ("slot", "dense/kernel", "opt_state/0/mu"),
    "dense/kernel/opt_state/0/nu": ("slot", "dense/kernel", "opt_state/0/nu"),
    "emb/embeddings/opt_state/0/mu": ("slot", "emb/embeddings", "opt_state/0/mu"),
    "emb/embeddings/opt_state/0/nu": ("slot", "emb/embeddings", "opt_state/0/nu"),
    "extra/flags": ("other", None, None),
    "extra/i32": ("other", None, None),
    "extra/i64": ("other", None, None),
    "extra/names": ("other", None, None),
    "extra/title": ("other", None, None),
    "global_step": ("other", None, None),
    "head/w/opt_state/0/trace": ("slot", "head/w", "opt_state/0/trace"),
  }


@pytest.mark.parametrize(
  ("location", "tag"), [("saver", "saver-20"), ("saver/model.ckpt-10", "saver-10"), ("object", "object-2")]
)
def test_every_tensor_reads_as_tensorflow_reads_it(location, tag, expected):
  # Partitioned (emb/embeddings in two slices), bfloat16, float16, int32, int64, bool, strings, global_step.
  source = open_source(FIXTURES / location)
  _check_all(source, expected, tag)
  if tag.startswith("saver"):
    assert len(source.tensors["emb/embeddings"].parts) == 2
    assert source.restore({"global_step": None})["global_step"].dtype == np.int64
    assert source.restore({"extra/title": None})["extra/title"][()] == b"a scalar string"


def test_contract_names_keep_tensorflow_names_where_slots_are_ambiguous():
  names = tf_source.contract_names(
    [
      "a",
      "a/Adam",
      "a/Adam_1",
      "a/Momentum",  # two optimizer families for `a`
      "b",
      "b/Adam_1",  # no b/Adam
      "c",
      "c/Adam",
      "c/Adam_1",
      "c/Adam_2",
      "c/Adam_3",  # a second Adam
      "d/Adam",  # no variable d
      "e/.ATTRIBUTES/VARIABLE_VALUE",
      "e/.OPTIMIZER_SLOT/opt1/m/.ATTRIBUTES/VARIABLE_VALUE",
      "e/.OPTIMIZER_SLOT/opt2/m/.ATTRIBUTES/VARIABLE_VALUE",  # two optimizers
      "f/.ATTRIBUTES/VARIABLE_VALUE",
      "f/.OPTIMIZER_SLOT/opt/accumulator/.ATTRIBUTES/VARIABLE_VALUE",  # Adagrad: no optax twin here
      "g/.ATTRIBUTES/OBJECT_CONFIG_JSON",
    ]
  )
  assert {k: v[0] for k, v in names.items()} == {
    "a": "a",
    "a/Adam": "a/Adam",
    "a/Adam_1": "a/Adam_1",
    "a/Momentum": "a/Momentum",
    "b": "b",
    "b/Adam_1": "b/Adam_1",
    "c": "c",
    "c/Adam": "c/opt_state/0/mu",
    "c/Adam_1": "c/opt_state/0/nu",
    "c/Adam_2": "c/Adam_2",
    "c/Adam_3": "c/Adam_3",
    "d/Adam": "d/Adam",
    "e/.ATTRIBUTES/VARIABLE_VALUE": "e",
    "e/.OPTIMIZER_SLOT/opt1/m/.ATTRIBUTES/VARIABLE_VALUE": "e/.OPTIMIZER_SLOT/opt1/m",
    "e/.OPTIMIZER_SLOT/opt2/m/.ATTRIBUTES/VARIABLE_VALUE": "e/.OPTIMIZER_SLOT/opt2/m",
    "f/.ATTRIBUTES/VARIABLE_VALUE": "f",
    "f/.OPTIMIZER_SLOT/opt/accumulator/.ATTRIBUTES/VARIABLE_VALUE": "f/.OPTIMIZER_SLOT/opt/accumulator",
    "g/.ATTRIBUTES/OBJECT_CONFIG_JSON": "g/.ATTRIBUTES/OBJECT_CONFIG_JSON",
  }


def test_directory_without_state_file(tmp_path, saver_copy):
  os.remove(saver_copy / "checkpoint")
  assert open_source(saver_copy).step == 20  # the highest -N
  assert open_source(saver_copy / "model.ckpt-10").step == 10
  assert tf_source.open_tensorflow(saver_copy, step=10).path == str(saver_copy / "model.ckpt-10")
  with pytest.raises(fws.WarmStartError, match=r"step 30 .* its steps are \[10, 20\]"):
    tf_source.open_tensorflow(saver_copy, step=30)
  for name in os.listdir(saver_copy):  # two checkpoints without step numbers
    os.rename(saver_copy / name, saver_copy / name.replace("model.ckpt-10", "a").replace("model.ckpt-20", "b"))
  with pytest.raises(fws.WarmStartError, match=r"several checkpoints without step numbers \(\['a', 'b'\]\)"):
    open_source(saver_copy)
  assert open_source(saver_copy / "b").step == 20  # no -N suffix: global_step


def test_saved_model_directory_and_foreign_index_files(tmp_path):
  variables = tmp_path / "saved" / "variables"
  variables.mkdir(parents=True)
  for suffix in (".index", ".data-00000-of-00001"):
    shutil.copy(FIXTURES / "saver" / f"model.ckpt-20{suffix}", variables / f"variables{suffix}")
  source = open_source(tmp_path / "saved")  # as TF's estimator resolves a SavedModel: its variables/variables
  assert (source.path, source.step) == (str(variables / "variables"), 20)  # no -N suffix: global_step
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "faiss.index").write_bytes(b"not a table")  # an .index without data files
  assert not tf_source.is_tensorflow(str(tmp_path / "other"))
  assert not tf_source.is_tensorflow(str(tmp_path / "nothing"))


# --- the public API -------------------------------------------------------------


def _adam_state():
  params = {
    "dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
    "emb": {"embeddings": jnp.full((len(NEW_VOCAB) + 1, 3), -1.0)},
  }
  return train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.1))


def _vocab_settings(location, **kwargs):
  info = fws.VocabInfo(NEW_VOCAB, len(NEW_VOCAB), 1, str(FIXTURES / "old_vocab.txt"))
  return fws.WarmStartSettings(str(location), var_name_to_vocab_info={"emb/embeddings": info}, **kwargs)


def test_plan_reads_metadata_only(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("a tensor was read while planning")

  monkeypatch.setattr(tf_source._PartArray, "_open", fail)
  monkeypatch.setattr(tf_source, "_read_strings", fail)
  plan = fws.plan(_adam_state(), _vocab_settings(FIXTURES / "saver", vars_to_warm_start=["dense/.*", "emb/.*"]))
  actions = {row.name: (str(row.action), row.source, row.remap is not None) for row in plan.leaves}
  assert actions["emb/embeddings"] == ("load", "emb/embeddings", True)
  assert actions["emb/embeddings/opt_state/0/mu"] == ("load", "emb/embeddings/opt_state/0/mu", True)
  assert actions["dense/kernel/opt_state/0/nu"] == ("load", "dense/kernel/opt_state/0/nu", False)
  assert actions["opt_state/0/count"][0] == "keep"
  assert [c.format for c in plan.checkpoints] == ["tensorflow"]


def test_warm_start_with_vocabulary_matches_tensorflow_warm_start(expected):
  state = fws.warm_start(_adam_state(), _vocab_settings(FIXTURES / "saver", vars_to_warm_start=["dense/.*", "emb/.*"]))
  # TensorFlow's own tf.compat.v1.train.warm_start on the same checkpoint and vocabularies.
  np.testing.assert_array_equal(state.params["emb"]["embeddings"], expected["warm_start:emb/embeddings"])
  np.testing.assert_array_equal(state.params["dense"]["kernel"], expected["saver-20:dense/kernel"])
  adam = state.opt_state[0]
  np.testing.assert_array_equal(adam.mu["dense"]["kernel"], expected["saver-20:dense/kernel/Adam"])
  np.testing.assert_array_equal(adam.nu["dense"]["bias"], expected["saver-20:dense/bias/Adam_1"])
  old_rows = [OLD_VOCAB.index(t) if t in OLD_VOCAB else -1 for t in NEW_VOCAB] + [-1]
  old_mu = expected["saver-20:emb/embeddings/Adam"]
  want_mu = np.stack([old_mu[i] if i >= 0 else np.zeros(3, np.float32) for i in old_rows])
  np.testing.assert_array_equal(adam.mu["emb"]["embeddings"], want_mu)  # the slot follows the remap
  assert int(adam.count) == 0 and int(state.step) == 0  # not selected


def test_warm_start_list_regex_selects_slots_as_in_tensorflow(expected):
  # TF: vars_to_warm_start=["head/w"] selects head/w and head/w/Momentum.
  params = {"head": {"w": jnp.zeros((2, 2))}}
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9))
  state = fws.warm_start(state, fws.WarmStartSettings(str(FIXTURES / "saver"), vars_to_warm_start=["head/w"]))
  np.testing.assert_array_equal(state.params["head"]["w"], expected["saver-20:head/w"])
  np.testing.assert_array_equal(state.opt_state[0].trace["head"]["w"], expected["saver-20:head/w/Momentum"])


def test_warm_start_casts_bfloat16_and_reads_the_step(expected):
  state = {"params": {"extra": {"bf16": jnp.zeros(3, jnp.float32)}}, "step": jnp.zeros((), jnp.int32)}
  settings = fws.WarmStartSettings(
    str(FIXTURES / "saver" / "model.ckpt-10.index"),
    vars_to_warm_start=["extra/.*", "step"],
    var_name_to_prev_var_name={"step": "global_step"},
  )
  out = fws.warm_start(state, settings)
  np.testing.assert_array_equal(out["params"]["extra"]["bf16"], expected["saver-10:extra/bf16"])
  assert int(out["step"]) == 10


def test_init_from_checkpoint_object_based(expected):
  params = {"dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.ones(3)}}
  out = fws.init_from_checkpoint(params, FIXTURES / "object", {"model/dense/": "dense/"})
  tag = "object-2:model/dense/{}/.ATTRIBUTES/VARIABLE_VALUE"
  np.testing.assert_array_equal(out["dense"]["kernel"], expected[tag.format("kernel")])
  np.testing.assert_array_equal(out["dense"]["bias"], expected[tag.format("bias")])


def test_cli_inspect_lists_the_names(capsys):
  assert cli.main(["inspect", str(FIXTURES / "saver")]) == 0
  out = capsys.readouterr().out
  assert "@step 20" in out
  for name, _ in SAVER_NAMES:
    assert name in out


def test_open_arrays_reads_only_the_slices_an_index_touches(expected):
  source = open_source(FIXTURES / "saver")
  table = source.open_arrays(["emb/embeddings"])["emb/embeddings"]
  want = expected["saver-20:emb/embeddings"]
  np.testing.assert_array_equal(table[np.array([5, 4]), 1:], want[[5, 4], 1:])
  assert table.parts[0]._view is None  # rows 0-2 (the first slice) were not read
  np.testing.assert_array_equal(table[(Ellipsis, 2)], want[..., 2])
  np.testing.assert_array_equal(table[-1], want[-1])
  np.testing.assert_array_equal(table[::2], want[::2])  # a stepped slice: assembled, then indexed
  np.testing.assert_array_equal(np.asarray(table), want)


def test_restore_to_a_sharding(expected):
  # The read stage's path for sharded and accelerator leaves: each shard read from the slices it touches.
  devices = np.array(jax.devices()[:2])
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("rows",)), jax.sharding.PartitionSpec("rows"))
  spec = jax.ShapeDtypeStruct((6, 3), jnp.float32, sharding=sharding)
  value = open_source(FIXTURES / "saver").restore({"emb/embeddings": spec})["emb/embeddings"]
  assert value.sharding == sharding
  np.testing.assert_array_equal(jax.device_get(value), expected["saver-20:emb/embeddings"])


# --- damaged checkpoints --------------------------------------------------------


def test_truncated_index(saver_copy):
  index = saver_copy / "model.ckpt-20.index"
  index.write_bytes(index.read_bytes()[:-20])
  with pytest.raises(fws.WarmStartError, match=r"model\.ckpt-20\.index cannot be read: .*magic number"):
    fws.list_variables(saver_copy)


def test_flipped_byte_in_index_fails_the_block_checksum(saver_copy):
  index = saver_copy / "model.ckpt-20.index"
  data = bytearray(index.read_bytes())
  data[40] ^= 0x01
  index.write_bytes(bytes(data))
  with pytest.raises(fws.WarmStartError, match=r"model\.ckpt-20\.index cannot be read: .*CRC32C"):
    open_source(saver_copy)


def test_flipped_byte_in_data_fails_the_tensor_checksum(saver_copy):
  source = open_source(saver_copy)
  part = source.tensors["dense/kernel"].parts[0]
  data = bytearray(Path(part.file).read_bytes())
  data[part.offset + 5] ^= 0x10
  Path(part.file).write_bytes(bytes(data))
  state = _adam_state()
  with pytest.raises(
    fws.WarmStartError, match=r"'dense/kernel' at offset \d+ of .*model\.ckpt-20\.data-00000-of-00001 fail"
  ):
    fws.warm_start(state, fws.WarmStartSettings(str(saver_copy), vars_to_warm_start="dense/kernel"))
  # Other tensors still read.
  fws.warm_start(state, fws.WarmStartSettings(str(saver_copy), vars_to_warm_start="dense/bias"))


def test_flipped_byte_in_a_string_tensor(saver_copy):
  source = open_source(saver_copy)
  part = source.tensors["extra/names"].parts[0]
  data = bytearray(Path(part.file).read_bytes())
  data[part.offset + part.size - 1] ^= 0x01  # in the string bytes
  Path(part.file).write_bytes(bytes(data))
  with pytest.raises(fws.WarmStartError, match=r"'extra/names' .* fail their CRC32C check"):
    source.restore({"extra/names": None})


def test_missing_data_shard(saver_copy):
  os.remove(saver_copy / "model.ckpt-20.data-00000-of-00001")
  with pytest.raises(fws.WarmStartError, match=r"its data file .*model\.ckpt-20\.data-00000-of-00001 is missing"):
    open_source(saver_copy)


def test_truncated_data_file(saver_copy):
  data = saver_copy / "model.ckpt-20.data-00000-of-00001"
  data.write_bytes(data.read_bytes()[:100])
  with pytest.raises(fws.WarmStartError, match=r"which has 100 bytes \(cut short\)"):
    open_source(saver_copy)


def test_state_file_naming_a_missing_checkpoint(saver_copy):
  (saver_copy / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt-30"\n')
  with pytest.raises(
    fws.WarmStartError, match=r"names '/elsewhere/model\.ckpt-30'.*\['model\.ckpt-10', 'model\.ckpt-20'\]"
  ):
    open_source(saver_copy)


def test_missing_index(saver_copy):
  os.remove(saver_copy / "model.ckpt-20.index")
  with pytest.raises(fws.WarmStartError, match=r"model\.ckpt-20\.index does not exist \(found \['model\.ckpt-20\.data"):
    open_source(saver_copy / "model.ckpt-20")


# --- bundles written here: large tensors, snappy blocks, big-endian data ---------------------


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
  if isinstance(value, bytes):
    return _varint(number << 3 | 2) + _varint(len(value)) + value
  return _varint(number << 3) + _varint(value)


def _snappy_literals(data: bytes) -> bytes:
  out = _varint(len(data))
  for start in range(0, len(data), 256):
    chunk = data[start : start + 256]
    out += bytes([60 << 2, len(chunk) - 1]) + chunk
  return out


def _block(entries: list[tuple[bytes, bytes]], snappy: bool) -> bytes:
  body, previous = b"", b""
  for key, value in entries:  # prefix-compressed, one restart point
    shared = len(os.path.commonprefix([previous, key]))
    body += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
    previous = key
  body += struct.pack("<II", 0, 1)
  if snappy:
    body = _snappy_literals(body)
  kind = b"\x01" if snappy else b"\x00"
  return body + kind + struct.pack("<I", crc32c.mask(crc32c.value(body + kind)))


def _write_bundle(prefix: Path, tensors: dict[str, np.ndarray], *, snappy=False, big_endian=False, per_block=2):
  enums = {np.dtype(v): k for k, v in bundle.DTYPES.items() if k not in (11, 12, 13, 15, 16)}
  data, entries = b"", []
  for name in sorted(tensors):
    value = np.ascontiguousarray(tensors[name])
    raw = value.astype(value.dtype.newbyteorder(">")).tobytes() if big_endian else value.tobytes()
    shape = b"".join(_field(2, _field(1, d)) for d in value.shape)
    entry = _field(1, enums[value.dtype]) + _field(2, shape) + _field(4, len(data)) + _field(5, len(raw))
    entry += _varint(6 << 3 | 5) + struct.pack("<I", crc32c.mask(crc32c.value(raw)))
    entries.append((name.encode(), entry))
    data += raw
  header = _field(1, 1) + _field(2, int(big_endian)) + _field(3, _field(1, 1))
  entries.insert(0, (b"", header))
  table, index = b"", []
  for start in range(0, len(entries), per_block):
    block = entries[start : start + per_block]
    encoded = _block(block, snappy)
    index.append((block[-1][0], _varint(len(table)) + _varint(len(encoded) - 5)))
    table += encoded
  meta_offset, meta = len(table), _block([], False)
  table += meta
  index_offset, index_block = len(table), _block(index, snappy)
  table += index_block
  footer = _varint(meta_offset) + _varint(len(meta) - 5) + _varint(index_offset) + _varint(len(index_block) - 5)
  table += footer.ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
  Path(f"{prefix}.index").write_bytes(table)
  Path(f"{prefix}.data-00000-of-00001").write_bytes(data)


@pytest.mark.parametrize(("snappy", "big_endian"), [(False, False), (True, False), (False, True)])
def test_written_bundles_with_snappy_blocks_and_big_endian_data(tmp_path, snappy, big_endian):
  tensors = {
    "a/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
    "a/bias": np.array([1, -2], np.int64),
    "b": np.array([True, False]),
    "c/half": np.array([0.5, 2.0], np.float16),
    **{f"layer_{i:02d}/w": np.full((2,), i, np.int32) for i in range(7)},  # several data blocks
  }
  _write_bundle(tmp_path / "model-3", tensors, snappy=snappy, big_endian=big_endian)
  source = open_source(tmp_path)
  assert source.step == 3
  values = source.restore(dict.fromkeys(tensors))
  for name, want in tensors.items():
    np.testing.assert_array_equal(values[name], want)
    assert values[name].dtype.newbyteorder("=") == want.dtype.newbyteorder("=")


def test_large_tensor_rows_read_in_pieces_and_checked(tmp_path):
  # 20 MiB: CRC32C in two pieces, host copies in blocks; a remap reads rows in file order.
  table = np.random.default_rng(0).standard_normal((5120, 1024), dtype=np.float32)
  _write_bundle(tmp_path / "big", {"table": table})
  source = open_source(tmp_path / "big")
  index = np.random.default_rng(1).permutation(6000) - 500  # new row -> old row, or < 0 for a new token
  index[index >= 5120] = -1
  index[index < 0] = -1
  read = hostread.rows(source.open_arrays(["table"])["table"], index, (6000, 1024), np.float32, axis=0)
  hostread.run([read], max_bytes_in_flight=1 << 26)
  kept = index >= 0
  np.testing.assert_array_equal(read.out[kept], table[index[kept]])
  whole = hostread.whole(source.open_arrays(["table"])["table"], np.float32)
  hostread.run([whole], max_bytes_in_flight=1 << 26)
  np.testing.assert_array_equal(whole.out, table)
  data = tmp_path / "big.data-00000-of-00001"
  with open(data, "r+b") as f:  # in the second 16 MiB piece
    f.seek(18 << 20)
    byte = f.read(1)
    f.seek(18 << 20)
    f.write(bytes([byte[0] ^ 0xFF]))
  bad = hostread.whole(open_source(tmp_path / "big").open_arrays(["table"])["table"], np.float32)
  with pytest.raises(fws.WarmStartError, match=r"'table' at offset 0 of .*big\.data-00000-of-00001 fail"):
    hostread.run([bad], max_bytes_in_flight=1 << 26)


# --- TensorFlow as the oracle (slow; needs the `tf` extra) ----------------------------------


def _tensorflow():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return pytest.importorskip("tensorflow")


def _compare_with_tensorflow(tf, prefix):
  reader = tf.train.load_checkpoint(str(prefix))
  source = open_source(prefix)
  keys = {t.key: name for name, t in source.tensors.items()}
  assert set(keys) == set(reader.get_variable_to_shape_map()) - {
    "_CHECKPOINTABLE_OBJECT_GRAPH",
    "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
  }
  values = source.restore(dict.fromkeys(keys.values()))
  for key, name in keys.items():
    want = np.asarray(reader.get_tensor(key))
    got = np.asarray(values[name])
    assert got.shape == want.shape, key
    if want.dtype.kind == "O":
      assert got.tolist() == want.tolist(), key
    else:
      assert got.dtype == want.dtype, key
      np.testing.assert_array_equal(got, want, err_msg=key)
  return source


@pytest.mark.slow
def test_saver_checkpoints_read_as_tensorflow_reads_them(tmp_path):
  tf = _tensorflow()
  v1 = tf.compat.v1
  rng = np.random.default_rng(0)
  with tf.Graph().as_default():
    step = v1.train.get_or_create_global_step()
    rows = v1.get_variable("emb/rows", shape=[10, 4], partitioner=v1.fixed_size_partitioner(3))
    cols = v1.get_variable("emb/cols", shape=[3, 10], partitioner=lambda shape, dtype: [1, 4])
    with tf.device("/cpu:1"):  # a sharded save writes one data file per device
      dense = v1.get_variable("dense/kernel", initializer=rng.standard_normal((5, 3)).astype(np.float32))
    values = {
      "bf16": rng.standard_normal(7).astype(tf.bfloat16.as_numpy_dtype),
      "f16": rng.standard_normal((2, 3)).astype(np.float16),
      "f64": rng.standard_normal(3),
      "c64": (rng.standard_normal(2) + 1j).astype(np.complex64),
      "i8": np.array([-128, 5, 127], np.int8),
      "u8": np.array([0, 255], np.uint8),
      "i16": np.array([-3, 300], np.int16),
      "u16": np.array([65535], np.uint16),
      "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
      "i64": np.array([2**62, -(2**40)], np.int64),
      "flags": np.array([[True, False], [False, True]]),
      "words": np.array([b"", b"x" * 300, "\u00e9".encode()] * 50),
      "empty": np.zeros((0, 3), np.float32),
      "scalar": np.float32(3.5),
    }
    for name, value in values.items():
      v1.get_variable(f"extra/{name}", initializer=value, trainable=False)
    loss = tf.reduce_sum(rows.as_tensor()) + tf.reduce_sum(cols.as_tensor()) + tf.reduce_sum(dense)
    train = v1.train.AdamOptimizer(0.1).minimize(loss, global_step=step, var_list=[*rows, *cols, dense])
    saver = v1.train.Saver(sharded=True)
    config = v1.ConfigProto(device_count={"CPU": 2})
    with v1.Session(config=config) as sess:
      sess.run(v1.global_variables_initializer())
      sess.run(train)
      prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=step, write_meta_graph=False)
  source = _compare_with_tensorflow(tf, prefix)
  assert sorted(os.listdir(tmp_path))[1:3] == ["model.ckpt-1.data-00000-of-00002", "model.ckpt-1.data-00001-of-00002"]
  assert source.step == 1 and len(source.tensors["emb/rows"].parts) == 3 and len(source.tensors["emb/cols"].parts) == 4
  assert "emb/cols/opt_state/0/nu" in source.variables
  table = source.open_arrays(["emb/cols"])["emb/cols"]
  np.testing.assert_array_equal(table[1:, np.array([9, 0, 4])], np.asarray(table)[1:, [9, 0, 4]])


@pytest.mark.slow
def test_object_based_checkpoints_read_as_tensorflow_reads_them(tmp_path):
  tf = _tensorflow()
  model = tf.Module()
  model.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(3, 2))
  model.h = tf.Variable(np.ones(3, np.float16))
  model.n = tf.Variable(np.array([3, 4], np.int64))
  model.s = tf.Variable([b"one", b"two"])
  optimizer = tf.compat.v1.train.MomentumOptimizer(0.1, 0.9)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model.w**2)
  optimizer.apply_gradients([(tape.gradient(loss, model.w), model.w)])
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), str(tmp_path), 3)
  manager.save()
  manager.save()
  source = _compare_with_tensorflow(tf, tmp_path)
  assert source.path == str(tmp_path / "ckpt-2")
  assert sorted(source.variables) == ["model/h", "model/n", "model/s", "model/w", "model/w/opt_state/0/trace"]


@pytest.mark.slow
def test_vocabulary_warm_start_matches_tensorflow_on_partitioned_checkpoints(tmp_path):
  tf = _tensorflow()
  v1 = tf.compat.v1
  rng = np.random.default_rng(3)
  old_vocab = [f"t{i}" for i in range(40)]
  new_vocab = [f"t{i}" for i in rng.permutation(60)[:45]]
  (tmp_path / "old.txt").write_text("\n".join(old_vocab) + "\n")
  (tmp_path / "new.txt").write_text("\n".join(new_vocab) + "\n")
  table = rng.standard_normal((40, 8)).astype(np.float32)
  with tf.Graph().as_default():
    v1.get_variable(
      "emb",
      shape=[40, 8],
      initializer=lambda shape, dtype=None, partition_info=None: tf.constant(
        table[partition_info.single_offset(shape) : partition_info.single_offset(shape) + shape[0]]
      ),
      partitioner=v1.fixed_size_partitioner(3),
    )
    with v1.Session() as sess:
      sess.run(v1.global_variables_initializer())
      v1.train.Saver().save(sess, str(tmp_path / "ckpt" / "model"), write_meta_graph=False)
  info = dict(
    new_vocab=str(tmp_path / "new.txt"), new_vocab_size=45, num_oov_buckets=2, old_vocab=str(tmp_path / "old.txt")
  )
  with tf.Graph().as_default():
    emb = v1.get_variable(
      "emb", shape=[47, 8], initializer=v1.zeros_initializer(), partitioner=v1.fixed_size_partitioner(2)
    )
    v1.train.warm_start(str(tmp_path / "ckpt"), var_name_to_vocab_info={"emb": v1.train.VocabInfo(**info)})
    with v1.Session() as sess:
      sess.run(v1.global_variables_initializer())
      want = sess.run(emb.as_tensor())
  state = {"params": {"emb": jnp.ones((47, 8))}}
  settings = fws.WarmStartSettings(str(tmp_path / "ckpt"), var_name_to_vocab_info={"emb": fws.VocabInfo(**info)})
  out = fws.warm_start(state, settings)
  np.testing.assert_array_equal(jax.device_get(out["params"]["emb"]), want)
