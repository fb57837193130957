"""Vocabulary remapping (`VocabInfo`), ported from TensorFlow's tests.

Numbered as in `/work/shared/reference/tf_semantics.md` section 6:

* table A, WS-5..WS-13 (`testWarmStartVarWith*Vocab*`), WS-22 and the
  vocabulary parts of WS-24..WS-29;
* table C, CO-3 (its column remap) and CO-6..CO-8 (`_load_embedding_initializer`);
* table E, E-1..E-29 (edge cases observed under TF 2.21).

A TF variable `fruit_weights` is a leaf of a bare params dict. TF "partitioned"
variables are arrays sharded over the 8-device CPU mesh: the whole value must
equal the concatenation of TF's parts, each shard must hold its part, and the
result keeps the live sharding. TF's backup initializers are JAX initializers
`(key, shape, dtype) -> array`; `random_uniform(0.42, 0.42)` is
`jax.nn.initializers.constant(0.42)`.

Where the library deliberately differs from TF (E-7, E-22, non-float32 dtypes,
errors raised at plan time as `WarmStartError` instead of op errors at
initialization time), the test says what TF does.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nest, save_checkpoint
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws

FW = np.array([[0.5], [1.0], [1.5], [2.0]], np.float32)
OLDV = ["apple", "banana", "guava", "orange"]
NEWV = ["orange", "guava", "banana", "apple", "raspberry"]
OL = np.array([[0.5, 0.3], [1.0, 0.8], [1.5, 1.2], [2.0, 2.3]], np.float32)
# old [apple, orange] -> new [orange, apple, banana], axis 1.
WS6 = [[0.3, 0.5, 0.0], [0.8, 1.0, 0.0], [1.2, 1.5, 0.0], [2.3, 2.0, 0.0]]
WS5 = [[2.0], [1.5], [1.0], [0.5], [0.0]]
# checkpoint_ops_test.py: `some_scope/embeddings`, w(i, j) = 16 i + j.
CO_W = np.arange(80, dtype=np.float32).reshape(5, 16)
E29_W = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32)
SC_VOCAB = "linear_model/sc_vocab/weights"
SC_KEYS = "linear_model/sc_keys/weights"
SC_HASH = "linear_model/sc_hash/weights"
K = np.array([[0.25], [0.75], [1.25], [1.75]], np.float32)
SC_HASH_W = np.random.default_rng(1).standard_normal((15, 1)).astype(np.float32)
EMB = np.array([[0.5, 0.4], [1.0, 1.1], [2.0, 2.2], [3.0, 3.3]], np.float32)
CONST42 = jax.nn.initializers.constant(0.42)


# --------------------------------------------------------------------------- helpers


def get(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def vocab(path, tokens):
  """Writes a vocabulary file as TF's `_write_vocab` does: `"\\n".join(tokens)`, no final newline.

  A `str` is written as-is (for files with empty lines, CRLF, trailing newlines).
  """
  text = tokens if isinstance(tokens, str) else "\n".join(tokens)
  path.write_bytes(text.encode())
  return str(path)


def put(x, mesh, spec):
  return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))


def check(out, expected, live):
  """`out` equals `expected` (TF's concatenated parts) in the live dtype, shape and sharding."""
  assert out.shape == live.shape
  assert out.dtype == live.dtype
  want = np.asarray(jnp.asarray(np.asarray(expected, np.float32), live.dtype)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(out).astype(np.float32), want)
  if isinstance(live, jax.Array) and isinstance(live.sharding, NamedSharding):
    assert out.sharding == live.sharding
    # Each shard holds its slice of the TF result (a TF part, for row sharding).
    for shard in out.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data).astype(np.float32), want[shard.index])


def warm(ckpt, name, live, info, **kwargs):
  """Warm-starts the params tree `{name: live}` with `info` for `name`; returns the new leaf."""
  settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={name: info}, **kwargs)
  return get(fws.warm_start(nest({name: live}), settings), name)


def cases(argnames, rows):
  """`pytest.mark.parametrize` over rows whose first value is the test id."""
  return pytest.mark.parametrize(argnames, rows, ids=[row[0] for row in rows])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, mesh):
  """One checkpoint holding every TF checkpoint tensor used below (only selected ones are read)."""
  flat = {
    "fruit_weights": jnp.asarray(FW),
    # WS-8 / WS-12: the checkpoint variable partitioned in 2.
    "fruit_weights_ckpt_sharded": put(FW, mesh, P("a", None)),
    # E-20: a checkpoint tensor with more rows than the old vocabulary.
    "fruit_weights_5rows": jnp.asarray(np.concatenate([FW, [[9.0]]]).astype(np.float32)),
    # E-22: rank 1.
    "fruit_bias": jnp.asarray(FW.ravel()),
    "fruit_output_layer": jnp.asarray(OL),
    "fruit_output_layer_ckpt_sharded": put(OL, mesh, P("a", None)),
    "e29": jnp.asarray(E29_W),
    "some_scope/embeddings": jnp.asarray(CO_W),
    # WS-22, WS-24..WS-29.
    "linear_model/sc_int/weights": jnp.ones((10, 1)),
    "linear_model/bias_weights": jnp.asarray([0.75]),
    "linear_model/sc_vocab_ws22/weights": jnp.ones((2, 1)),
    "linear_model/sc_vocab_ws24/weights": jnp.asarray(FW),
    SC_HASH: jnp.asarray(SC_HASH_W),
    "some_other_name": jnp.asarray(K),
    SC_VOCAB: jnp.asarray([[0.5], [1.0], [2.0], [3.0]]),
    "input_layer/sc_vocab_embedding/embedding_weights": jnp.asarray(EMB),
    "linear_model/sc_vocab_embedding/embedding_weights": jnp.asarray(EMB),
    "linear_model/sc_vocab_embedding/weights": jnp.asarray([[0.69], [0.71]]),
  }
  return save_checkpoint(tmp_path_factory.mktemp("vocab") / "ckpt", nest(flat))


class Counting:
  """E-29's TF initializer: its k-th call returns `100 k + [1, 2, ...]` in the shape asked for."""

  def __init__(self):
    self.calls = []

  def __call__(self, key, shape, dtype=jnp.float32):
    self.calls.append(tuple(shape))
    n = int(np.prod(shape))
    return jnp.asarray(100 * len(self.calls) + np.arange(1, n + 1), dtype).reshape(shape)


# --------------------------------------------------------------------------- WS-5..WS-13


@pytest.mark.parametrize("form", ["files", "lists", "new_list_old_file"])
def test_ws5_row_vocab(tmp_path, ckpt, form):
  # testWarmStartVarWithVocab; also the in-memory token-list form of new_vocab / old_vocab.
  new = NEWV if form != "files" else vocab(tmp_path / "new", NEWV)
  old = OLDV if form == "lists" else vocab(tmp_path / "old", OLDV)
  live = jnp.zeros((5, 1))
  out = warm(ckpt, "fruit_weights", live, fws.VocabInfo(new, 5, 0, old))
  check(out, WS5, live)


@pytest.mark.parametrize("form", ["files", "lists"])
def test_ws7_constrained_old_vocab_size(tmp_path, ckpt, form):
  # testWarmStartVarWithVocabConstrainedOldVocabSize: old becomes [apple, banana].
  new = NEWV if form == "lists" else vocab(tmp_path / "new", NEWV)
  old = OLDV if form == "lists" else vocab(tmp_path / "old", OLDV)
  live = jnp.zeros((5, 1))
  out = warm(ckpt, "fruit_weights", live, fws.VocabInfo(new, 5, 0, old, old_vocab_size=2))
  check(out, [[0.0], [0.0], [1.0], [0.5], [0.0]], live)


@cases(
  "tf_test, source, new_tokens, size, oov, rows, live_spec, expected",
  [
    # testWarmStartVarWithVocabPrevVarPartitioned
    ("ws8", "fruit_weights_ckpt_sharded", NEWV, 5, 0, 5, None, WS5),
    # testWarmStartVarWithVocabCurrentVarPartitioned: parts [[2],[1.5],[1]] + [[0.5],[0],[0]], last row OOV.
    ("ws10", "fruit_weights", NEWV, 5, 1, 6, P("a", None), [[2.0], [1.5], [1.0], [0.5], [0.0], [0.0]]),
    # testWarmStartVarWithVocabBothVarsPartitioned
    ("ws12", "fruit_weights_ckpt_sharded", [*NEWV, "blueberry"], 6, 0, 6, P("a", None), WS5 + [[0.0]]),
  ],
)
def test_ws8_ws10_ws12_partitioned_row_vocab(
  tmp_path, ckpt, mesh, tf_test, source, new_tokens, size, oov, rows, live_spec, expected
):
  info = fws.VocabInfo(vocab(tmp_path / "new", new_tokens), size, oov, vocab(tmp_path / "old", OLDV))
  live = jnp.zeros((rows, 1)) if live_spec is None else put(jnp.zeros((rows, 1)), mesh, live_spec)
  out = warm(ckpt, "fruit_weights", live, info, var_name_to_prev_var_name={"fruit_weights": source})
  check(out, expected, live)


@cases(
  "tf_test, source, live_spec",
  [
    ("ws6", "fruit_output_layer", None),  # testWarmStartVarWithColumnVocab
    ("ws9", "fruit_output_layer_ckpt_sharded", None),  # ...PrevVarPartitioned
    ("ws11", "fruit_output_layer", P("a", None)),  # ...CurrentVarPartitioned: [4,3] in 2 parts of rows
    ("ws13", "fruit_output_layer_ckpt_sharded", P("a", None)),  # ...BothVarsPartitioned
    ("ws11_replicated", "fruit_output_layer", P()),  # a replicated NamedSharding is kept too
  ],
)
def test_ws6_ws9_ws11_ws13_column_vocab(tmp_path, ckpt, mesh, tf_test, source, live_spec):
  info = fws.VocabInfo(
    vocab(tmp_path / "new", ["orange", "apple", "banana"]), 3, 0, vocab(tmp_path / "old", ["apple", "orange"]), axis=1
  )
  live = jnp.zeros((4, 3)) if live_spec is None else put(jnp.zeros((4, 3)), mesh, live_spec)
  out = warm(ckpt, "fruit_output_layer", live, info, var_name_to_prev_var_name={"fruit_output_layer": source})
  check(out, WS6, live)


# --------------------------------------------------------------------------- WS-22, WS-24..WS-29


def test_ws22_constrained_old_and_new_vocab_sizes(tmp_path, ckpt):
  # testWarmStart_SparseColumnVocabularyConstrainedVocabSizes: banana is not among the first 2 old entries.
  name = "linear_model/sc_vocab_ws22/weights"
  info = fws.VocabInfo(
    vocab(tmp_path / "new", ["apple", "banana", "guava", "orange"]),
    2,
    0,
    vocab(tmp_path / "old", ["apple", "guava", "banana"]),
    old_vocab_size=2,
  )
  live = jnp.zeros((2, 1))
  out = warm(ckpt, name, live, info, vars_to_warm_start=".*sc_vocab.*")
  check(out, [[1.0], [0.0]], live)


def test_ws24_multiple_cols_identity_vocab_and_plain_copies(tmp_path, ckpt):
  # testWarmStart_MultipleCols: default vars_to_warm_start, VocabInfo with old == new vocab file.
  path = vocab(tmp_path / "vocab", OLDV)
  name = "linear_model/sc_vocab_ws24/weights"
  live = nest(
    {
      name: jnp.zeros((4, 1)),
      "linear_model/sc_int/weights": jnp.zeros((10, 1)),
      "linear_model/bias_weights": jnp.zeros((1,)),
    }
  )
  settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={name: fws.VocabInfo(path, 4, 0, path)})
  out = fws.warm_start(live, settings)
  check(get(out, name), FW, get(live, name))
  check(get(out, "linear_model/sc_int/weights"), np.ones((10, 1)), get(live, "linear_model/sc_int/weights"))
  check(get(out, "linear_model/bias_weights"), [0.75], get(live, "linear_model/bias_weights"))


def _more_settings(tmp_path, mesh, sharded):
  info = fws.VocabInfo(vocab(tmp_path / "new", [*NEWV, "blueberry"]), 6, 0, vocab(tmp_path / "old", OLDV))
  keys, hashed, vocab_var = jnp.zeros((4, 1)), jnp.zeros((15, 1)), jnp.zeros((6, 1))
  if sharded:
    keys, vocab_var = put(keys, mesh, P("a", None)), put(vocab_var, mesh, P("a", None))
    hashed = put(hashed, mesh, P())  # 15 rows: TF's 8 + 7 split has no even analogue.
  return nest({SC_KEYS: keys, SC_HASH: hashed, SC_VOCAB: vocab_var}), info


SC_VOCAB_EXPECTED = [[3.0], [2.0], [1.0], [0.5], [0.0], [0.0]]


@pytest.mark.parametrize("sharded", [True, False], ids=["ws25_sharded", "ws26_unsharded"])
def test_ws25_ws26_more_settings_vocab_part(tmp_path, ckpt, mesh, sharded):
  # testWarmStartMoreSettings(NoPartitioning): sc_vocab parts [[3],[2],[1]] + [[0.5],[0],[0]].
  live, info = _more_settings(tmp_path, mesh, sharded)
  settings = fws.WarmStartSettings(
    ckpt,
    vars_to_warm_start=".*(sc_keys|sc_vocab).*",
    var_name_to_vocab_info={SC_VOCAB: info},
    var_name_to_prev_var_name={SC_KEYS: "some_other_name"},
  )
  out = fws.warm_start(live, settings)
  check(get(out, SC_VOCAB), SC_VOCAB_EXPECTED, get(live, SC_VOCAB))
  check(get(out, SC_KEYS), K, get(live, SC_KEYS))
  check(get(out, SC_HASH), np.zeros((15, 1)), get(live, SC_HASH))


@pytest.mark.parametrize("spec", [None, ""], ids=["none", "empty_str"])
def test_ws27_vars_to_warm_start_none_still_remaps_vocab_vars(tmp_path, ckpt, mesh, spec):
  # testWarmStartVarsToWarmstartIsNone: only the vocab variable is warm-started; the renamed
  # non-vocab variable counts as used (no error) but keeps its value. `""` behaves like None (1.1).
  live, info = _more_settings(tmp_path, mesh, sharded=True)
  settings = fws.WarmStartSettings(
    ckpt,
    vars_to_warm_start=spec,
    var_name_to_vocab_info={SC_VOCAB: info},
    var_name_to_prev_var_name={SC_KEYS: "some_other_name"},
  )
  out = fws.warm_start(live, settings)
  check(get(out, SC_VOCAB), SC_VOCAB_EXPECTED, get(live, SC_VOCAB))
  check(get(out, SC_KEYS), np.zeros((4, 1)), get(live, SC_KEYS))
  check(get(out, SC_HASH), np.zeros((15, 1)), get(live, SC_HASH))


EMB_EXPECTED = [[3, 3.3], [2, 2.2], [1, 1.1], [0.5, 0.4], [0.42, 0.42], [0.42, 0.42]]


def test_ws28_embedding_column_constant_backup(tmp_path, ckpt, mesh):
  # testWarmStartEmbeddingColumn: parts [[3,3.3],[2,2.2],[1,1.1]] + [[0.5,0.4],[0.42,0.42],[0.42,0.42]].
  name = "input_layer/sc_vocab_embedding/embedding_weights"
  info = fws.VocabInfo(
    vocab(tmp_path / "new", [*NEWV, "blueberry"]), 6, 0, vocab(tmp_path / "old", OLDV), backup_initializer=CONST42
  )
  live = put(jnp.zeros((6, 2)), mesh, P("a", None))
  check(warm(ckpt, name, live, info), EMB_EXPECTED, live)


def test_ws29_embedding_column_linear_model(tmp_path, ckpt, mesh):
  # testWarmStartEmbeddingColumnLinearModel: the embedding remapped, its plain `weights` copied.
  emb, weights = "linear_model/sc_vocab_embedding/embedding_weights", "linear_model/sc_vocab_embedding/weights"
  info = fws.VocabInfo(
    vocab(tmp_path / "new", [*NEWV, "blueberry"]), 6, 0, vocab(tmp_path / "old", OLDV), backup_initializer=CONST42
  )
  live = nest(
    {
      emb: put(jnp.zeros((6, 2)), mesh, P("a", None)),
      weights: put(jnp.zeros((2, 1)), mesh, P("a", None)),
      "linear_model/bias_weights": jnp.zeros((1,)),  # not selected
    }
  )
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=".*sc_vocab.*", var_name_to_vocab_info={emb: info})
  out = fws.warm_start(live, settings)
  check(get(out, emb), EMB_EXPECTED, get(live, emb))
  check(get(out, weights), [[0.69], [0.71]], get(live, weights))  # parts [[0.69]], [[0.71]]
  check(get(out, "linear_model/bias_weights"), [0.0], get(live, "linear_model/bias_weights"))


# --------------------------------------------------------------------------- section 2.7: selection


def test_vocab_info_for_unselected_variable_raises(tmp_path, ckpt, no_reads):
  info = fws.VocabInfo(vocab(tmp_path / "new", NEWV), 5, 0, vocab(tmp_path / "old", OLDV))
  live = {"fruit_weights": jnp.zeros((5, 1)), "other": jnp.zeros((2,))}
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start="other", var_name_to_vocab_info={"fruit_weights": info})
  with pytest.raises(fws.WarmStartError, match="var_name_to_vocab_info") as err:
    fws.warm_start(live, settings)
  assert "fruit_weights" in str(err.value)
  assert "not used" in str(err.value)


def test_non_trainable_vocab_variable_needs_a_list_regex(tmp_path, mesh):
  # Section 2.7: a non-trainable vocab variable with ".*" leaves the entry unused (ValueError);
  # with [".*"] it works. Here: a `batch_stats` leaf of a Linen variables dict.
  ckpt = save_checkpoint(tmp_path / "ckpt", {"params": {"w": jnp.ones((2,))}, "batch_stats": {"counts": FW}})
  live = {"params": {"w": jnp.zeros((2,))}, "batch_stats": {"counts": jnp.zeros((5, 1))}}
  info = fws.VocabInfo(NEWV, 5, 0, OLDV)
  with pytest.raises(fws.WarmStartError, match="not used"):
    fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"batch_stats/counts": info}))
  out = fws.warm_start(
    live, fws.WarmStartSettings(ckpt, vars_to_warm_start=[".*"], var_name_to_vocab_info={"batch_stats/counts": info})
  )
  check(out["batch_stats"]["counts"], WS5, live["batch_stats"]["counts"])
  check(out["params"]["w"], np.ones(2), live["params"]["w"])


# --------------------------------------------------------------------------- CO-3, CO-6..CO-8

# CO-1 (test_load_and_remap_matrix), CO-2 (..._output_layer_weight_initializer_linear), CO-4
# (test_initializer_with_oov_only_partition) and CO-5 (..._linear_multiclass_initializer_default_init)
# remap rows and columns of one matrix at once; a VocabInfo remaps one axis, so they are not ported.
# (CO-4's row part is E-28 / CO-7 below: an OOV-only part.)

CO_NEW_FEATURE = ["zero", "one", "two", "three", "four"]
CO_OLD_FEATURE = ["zero", "one", "two", "three"]
CONST42_CO = jax.nn.initializers.constant(42.0)


def co_vocab(path, tokens):
  """checkpoint_ops_test.py writes its vocab files with a trailing newline."""
  return vocab(path, "\n".join(tokens) + "\n")


def test_co3_column_remap_dnn_output(tmp_path, ckpt):
  # test_load_and_remap_output_layer_weight_initializer_dnn_output: no row vocab, 5 of the
  # checkpoint's rows; column remap new [MISSING, knitting, flask, eminem] -> old [2, 0, -1, 1],
  # 1 OOV column. The old column vocab has 3 tokens, the tensor 16 columns.
  info = fws.VocabInfo(
    co_vocab(tmp_path / "new_class", ["MISSING", "knitting", "flask", "eminem"]),
    4,
    1,
    co_vocab(tmp_path / "old_class", ["knitting", "eminem", "MISSING"]),
    backup_initializer=CONST42_CO,
    axis=1,
  )
  live = jnp.zeros((5, 5))
  out = warm(ckpt, "dnn_output", live, info, var_name_to_prev_var_name={"dnn_output": "some_scope/embeddings"})
  expected = [[16 * i + 2, 16 * i, 42, 16 * i + 1, 42] for i in range(5)]
  check(out, expected, live)


@cases(
  "tf_test, new_tokens, old_tokens, size, oov, old_vocab_size, rows, live_spec, expected_rows",
  [
    # test_load_embedding_initializer: var [6,16] in 2 parts; rows 0-3 = w rows 0-3, rows 4-5 = 42.
    ("co6", CO_NEW_FEATURE, CO_OLD_FEATURE, 5, 1, -1, 6, P("a", "b"), [0, 1, 2, 3, None, None]),
    # test_load_embedding_initializer_large_oov: var [9,16] (TF parts 5+4, the second OOV-only);
    # 9 rows do not divide, so the columns are sharded.
    ("co7", ["one", "zero", "two", "four"], ["zero", "one"], 4, 5, -1, 9, P(None, "b"), [1, 0] + [None] * 7),
    # test_load_embedding_initializer_old_row_vocab: old_vocab_size=3.
    ("co8", CO_NEW_FEATURE, CO_OLD_FEATURE, 5, 1, 3, 6, P("a", "b"), [0, 1, 2, None, None, None]),
  ],
)
def test_co6_co7_co8_embedding(
  tmp_path, ckpt, mesh, tf_test, new_tokens, old_tokens, size, oov, old_vocab_size, rows, live_spec, expected_rows
):
  info = fws.VocabInfo(
    co_vocab(tmp_path / "new_feature", new_tokens),
    size,
    oov,
    co_vocab(tmp_path / "old_feature", old_tokens),
    old_vocab_size=old_vocab_size,
    backup_initializer=CONST42_CO,
  )
  live = put(jnp.zeros((rows, 16)), mesh, live_spec)
  out = warm(ckpt, "embedding", live, info, var_name_to_prev_var_name={"embedding": "some_scope/embeddings"})
  expected = [CO_W[r] if r is not None else np.full(16, 42.0) for r in expected_rows]
  check(out, expected, live)


# --------------------------------------------------------------------------- table E: results


# fmt: off
E_ROW_CASES = [
  ("e1_oov_row_unpartitioned", NEWV, OLDV, 6, 5, 1, {}, WS5 + [[0.0]]),
  ("e2_old_vocab_size_equals_lines", NEWV, OLDV, 5, 5, 0, {"old_vocab_size": 4}, WS5),
  # The duplicate old token is outside the old_vocab_size window.
  ("e6_dup_old_outside_window", NEWV, ["apple", "banana", "guava", "apple"], 5, 5, 0, {"old_vocab_size": 3},
   [[0.0], [1.5], [1.0], [0.5], [0.0]]),
  # A duplicate new token absent from the old vocab: both rows get the backup.
  ("e8_dup_new_absent", ["orange", "kiwi", "banana", "kiwi", "apple"], OLDV, 5, 5, 0, {},
   [[2.0], [0.0], [1.0], [0.0], [0.5]]),
  # The empty line of the old file is after old_vocab_size lines.
  ("e11_empty_old_line_outside_window", NEWV, "apple\nbanana\n\norange", 5, 5, 0, {"old_vocab_size": 2},
   [[0.0], [0.0], [1.0], [0.5], [0.0]]),
  # CRLF old file with a final CRLF; new file with a final newline.
  ("e13_crlf", "\n".join(NEWV) + "\n", "\r\n".join(OLDV) + "\r\n", 5, 5, 0, {}, WS5),
  # No whitespace is stripped: "apple " and " guava" are other tokens.
  ("e14_whitespace_kept", NEWV, "apple \nbanana\n guava\norange", 5, 5, 0, {}, [[2.0], [0.0], [1.0], [0.0], [0.0]]),
  # new_vocab_size 3: the lines after the first 3 are ignored.
  ("e16_lines_after_size_ignored", NEWV, OLDV, 3, 3, 0, {}, [[2.0], [1.5], [1.0]]),
  # Fewer rows than new_vocab_size: only the first 4 new tokens, no OOV rows.
  ("e17_fewer_rows_than_size", NEWV, OLDV, 4, 5, 0, {}, [[2.0], [1.5], [1.0], [0.5]]),
  # Extra checkpoint rows beyond the old vocab are ignored.
  ("e20_ckpt_has_more_rows", NEWV, OLDV, 5, 5, 0, {"prev": "fruit_weights_5rows"}, WS5),
]
# fmt: on


@cases("case, new, old, rows, size, oov, kwargs, expected", E_ROW_CASES)
def test_table_e_row_vocab_results(tmp_path, ckpt, case, new, old, rows, size, oov, kwargs, expected):
  kwargs = dict(kwargs)
  prev = kwargs.pop("prev", "fruit_weights")
  info = fws.VocabInfo(vocab(tmp_path / "new", new), size, oov, vocab(tmp_path / "old", old), **kwargs)
  live = jnp.zeros((rows, 1))
  out = warm(ckpt, "fruit_weights", live, info, var_name_to_prev_var_name={"fruit_weights": prev})
  check(out, expected, live)


def test_e7_duplicate_new_token_present_in_old_vocab_gets_the_row_twice(tmp_path, ckpt):
  # Deliberate difference. TF: `Unimplemented: Old ID 0 is mapped to both new ID 1 and 3, which is
  # not supported.` Here both rows of `apple` get its old row.
  info = fws.VocabInfo(
    vocab(tmp_path / "new", ["orange", "apple", "banana", "apple", "kiwi"]), 5, 0, vocab(tmp_path / "old", OLDV)
  )
  live = jnp.zeros((5, 1))
  check(warm(ckpt, "fruit_weights", live, info), [[2.0], [0.5], [1.0], [0.5], [0.0]], live)


def test_e9_duplicate_new_token_split_across_parts(tmp_path, ckpt, mesh):
  # TF: allowed because the copies fall in different parts: [[0.5],[1],[1.5]] + [[0.5],[0],[2]].
  info = fws.VocabInfo(
    vocab(tmp_path / "new", ["apple", "banana", "guava", "apple", "kiwi", "orange"]),
    6,
    0,
    vocab(tmp_path / "old", OLDV),
  )
  live = put(jnp.zeros((6, 1)), mesh, P("a", None))
  check(warm(ckpt, "fruit_weights", live, info), [[0.5], [1.0], [1.5], [0.5], [0.0], [2.0]], live)


def test_e22_rank1_variable_axis0(tmp_path, ckpt):
  # Deliberate difference. TF: `IndexError` (it reads v_shape[1]). Here a rank-1 vocabulary
  # variable (an output bias) is remapped along its only axis.
  info = fws.VocabInfo(vocab(tmp_path / "new", NEWV), 5, 0, vocab(tmp_path / "old", OLDV))
  live = jnp.zeros((5,))
  check(warm(ckpt, "fruit_bias", live, info), [2.0, 1.5, 1.0, 0.5, 0.0], live)


E24 = [[0.3, 0.5, 0.42, 0.42], [0.8, 1.0, 0.42, 0.42], [1.2, 1.5, 0.42, 0.42], [2.3, 2.0, 0.42, 0.42]]
# fmt: off
E_COLUMN_CASES = [
  # old_vocab_size is ignored with axis 1.
  ("e23_old_vocab_size_ignored_axis1", 4, 3, 0, {"old_vocab_size": 1}, WS6, None),
  # An OOV column from the backup, with the vocabulary columns sharded over "b".
  ("e24_axis1_oov_column_backup", 4, 4, 1, {"backup_initializer": CONST42}, E24, P(None, "b")),
  # Fewer rows than the checkpoint: the leading rows.
  ("e26_axis1_fewer_rows", 2, 3, 0, {}, [[0.3, 0.5, 0.0], [0.8, 1.0, 0.0]], None),
]
# fmt: on


@cases("case, rows, cols, oov, kwargs, expected, live_spec", E_COLUMN_CASES)
def test_table_e_column_vocab_results(tmp_path, ckpt, mesh, case, rows, cols, oov, kwargs, expected, live_spec):
  # E-24 shards the vocabulary columns over "b": TF fails for a variable partitioned on dim 1
  # (section 2.5); here a sharding is only a layout.
  info = fws.VocabInfo(
    vocab(tmp_path / "new", ["orange", "apple", "banana"]),
    3,
    oov,
    vocab(tmp_path / "old", ["apple", "orange"]),
    axis=1,
    **kwargs,
  )
  live = jnp.zeros((rows, cols)) if live_spec is None else put(jnp.zeros((rows, cols)), mesh, live_spec)
  check(warm(ckpt, "fruit_output_layer", live, info), expected, live)


def test_e28_oov_only_parts_constant_backup(tmp_path, ckpt):
  # var [6,1] in 3 parts: [[2],[1.5]], [[0.42],[0.42]], [[0.42],[0.42]] (the last two OOV-only).
  mesh3 = Mesh(np.array(jax.devices()[:3]), ("p",))
  info = fws.VocabInfo(
    vocab(tmp_path / "new", ["orange", "guava"]), 2, 4, vocab(tmp_path / "old", OLDV), backup_initializer=CONST42
  )
  live = put(jnp.zeros((6, 1)), mesh3, P("p", None))
  check(warm(ckpt, "fruit_weights", live, info), [[2.0], [1.5], [0.42], [0.42], [0.42], [0.42]], live)


def test_e29_backup_initializer_calls_missing_cells_then_oov_block(tmp_path, ckpt):
  # TF calls the backup once as [n_missing_cells, 1] (filled row-major), then [n_oov, cols].
  init = Counting()
  info = fws.VocabInfo(["b", "x", "a", "y"], 4, 2, ["a", "b", "c", "d"], backup_initializer=init)
  live = jnp.zeros((6, 2))
  out = warm(ckpt, "e29", live, info)
  check(out, [[3, 4], [101, 102], [1, 2], [103, 104], [201, 202], [203, 204]], live)
  assert init.calls == [(4, 1), (2, 2)]


# --------------------------------------------------------------------------- any float dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_float_dtypes_other_than_float32(tmp_path, ckpt, mesh, dtype, sharded):
  # Deliberate difference. TF: `TypeError: Currently, only float32 is supported.` Here the float32
  # checkpoint is cast to the live dtype, and the backup is asked for in the live dtype (E-1 + 0.42).
  seen = []

  def backup(key, shape, dtype):
    seen.append(dtype)
    return jnp.full(shape, 0.42, dtype)

  info = fws.VocabInfo(vocab(tmp_path / "new", NEWV), 5, 1, vocab(tmp_path / "old", OLDV), backup_initializer=backup)
  live = jnp.zeros((6, 1), dtype)
  if sharded:
    live = put(live, mesh, P("a", None))
  out = warm(ckpt, "fruit_weights", live, info)
  check(out, [[2.0], [1.5], [1.0], [0.5], [0.42], [0.42]], live)
  assert seen and all(jnp.dtype(d) == jnp.dtype(dtype) for d in seen)


# --------------------------------------------------------------------------- errors, before any read


# Each case: (id, new vocab, old vocab, live shape, checkpoint tensor, VocabInfo kwargs, patterns).
# A vocab given as a list is written with "\n".join, a str as-is, None means a missing file.
# Patterns are regexes searched in the message; "{new}" / "{old}" are the files' paths.
# fmt: off
ERROR_CASES = [
  # TF: InvalidArgument `Invalid vocab_size in <file>: expected 5 but got 4`.
  ("e3_old_vocab_size_beyond_file", NEWV, OLDV, (5, 1), "fruit_weights", {"old_vocab_size": 5},
   ["{old}", r"expected 5\b", r"\b4\b"]),
  # TF: OutOfRange `Finished reading 0 of lines from <file>`.
  ("e4_old_vocab_size_zero", NEWV, OLDV, (5, 1), "fruit_weights", {"old_vocab_size": 0},
   ["{old}", "old_vocab_size"]),
  # TF: op attribute error (minimum -1).
  ("old_vocab_size_below_minus_one", NEWV, OLDV, (5, 1), "fruit_weights", {"old_vocab_size": -2},
   ["{old}", "-2"]),
  # TF: FailedPrecondition `HashTable has different value for same key. Key apple has 0 and trying to add value 2`.
  ("e5_duplicate_old_token", NEWV, ["apple", "banana", "apple", "orange"], (5, 1), "fruit_weights", {},
   ["{old}", "'apple'", r"\b1\b.*\b3\b"]),
  # TF: InvalidArgument `Invalid content in <file>: empty line found at position 7.`
  ("e10_empty_old_line", NEWV, "apple\n\nguava\norange", (5, 1), "fruit_weights", {},
   ["{old}", "empty line", r"line 2\b"]),
  # TF: the new file is read whole, so an empty line after the used lines is an error too.
  ("e12_empty_new_line_after_used_lines", "orange\nguava\nbanana\n\nx", OLDV, (3, 1), "fruit_weights",
   {"new_vocab_size": 3}, ["{new}", "empty line", r"line 4\b"]),
  # TF: InvalidArgument `lookup table size must be larger than last new vocab entry's line`.
  ("e15_new_vocab_too_short", ["orange", "guava", "banana"], OLDV, (5, 1), "fruit_weights", {},
   ["{new}", r"\b3\b", r"\b5\b"]),
  # TF: ValueError `Trying to initialize 6 additional rows ... new_row_vocab_size (5) + num_row_oov_buckets (0) = 5.`
  ("e18_too_many_rows", NEWV, OLDV, (6, 1), "fruit_weights", {},
   [r"\b6\b", r"new_vocab_size \(5\)", r"num_oov_buckets \(0\)"]),
  # TF: InvalidArgument `... size of its 2nd dimension is 1 instead of being equal to num_cols=2`.
  ("e19_width_mismatch_axis0", NEWV, OLDV, (5, 2), "fruit_weights", {},
   [r"[(\[]4, 1[)\]]", r"[(\[]5, 2[)\]]"]),
  # TF: InternalError `Extent in dimension 0 out of bounds` (raspberry names row 4 of 4 rows).
  ("e21_old_token_beyond_ckpt_rows", NEWV, [*OLDV, "raspberry"], (5, 1), "fruit_weights", {},
   ["{old}", "'raspberry'", r"line 5\b"]),
  # TF: ValueError `Expected 2nd dim of shape to be new_col_vocab_size (3) + num_col_oov_buckets (0) = 3,
  # but received shape: [4, 4]`.
  ("e25_axis1_width", ["orange", "apple", "banana"], ["apple", "orange"], (4, 4), "fruit_output_layer",
   {"new_vocab_size": 3, "axis": 1}, [r"new_vocab_size \(3\)", r"num_oov_buckets \(0\)", r"[(\[]4, 4[)\]]"]),
  # TF: ValueError `Expected 2-dim shape` (rank-1 variable, axis 1).
  ("rank1_axis1", NEWV, OLDV, (5,), "fruit_bias", {"axis": 1}, ["axis"]),
  # TF: ValueError `Invalid args: Must provide all of [current_vocab_path, current_vocab_size, ...`.
  ("new_vocab_size_zero", NEWV, OLDV, (5, 1), "fruit_weights", {"new_vocab_size": 0}, ["new_vocab_size"]),
  # TF lets a negative count slip through with axis 0 and a 4-row variable of size 5 (section 2.1).
  ("negative_num_oov_buckets", NEWV, OLDV, (4, 1), "fruit_weights", {"num_oov_buckets": -1},
   ["num_oov_buckets", "-1"]),
  # TF: TypeError `initializer must be callable, instead of being 0.42 of type float`.
  ("non_callable_backup", NEWV, OLDV, (5, 1), "fruit_weights", {"backup_initializer": 0.42},
   ["backup_initializer", "callable", "0.42"]),
  ("missing_new_vocab_file", None, OLDV, (5, 1), "fruit_weights", {}, ["{new}", "not exist"]),
  ("missing_old_vocab_file", NEWV, None, (5, 1), "fruit_weights", {}, ["{old}", "not exist"]),
]
# fmt: on


@cases("case, new, old, shape, source, kwargs, patterns", ERROR_CASES)
def test_errors_before_any_read(tmp_path, ckpt, no_reads, case, new, old, shape, source, kwargs, patterns):
  new_path, old_path = str(tmp_path / "new.txt"), str(tmp_path / "old.txt")
  if new is not None:
    vocab(tmp_path / "new.txt", new)
  if old is not None:
    vocab(tmp_path / "old.txt", old)
  args = {"new_vocab_size": 5, "num_oov_buckets": 0, **kwargs}
  info = fws.VocabInfo(new_vocab=new_path, old_vocab=old_path, **args)
  settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"v": info}, var_name_to_prev_var_name={"v": source})

  with pytest.raises(fws.WarmStartError) as err:
    fws.warm_start({"v": jnp.zeros(shape)}, settings)

  assert isinstance(err.value, ValueError)
  message = str(err.value)
  assert "'v'" in message  # the variable
  for pattern in patterns:
    pattern = pattern.replace("{new}", re.escape(new_path)).replace("{old}", re.escape(old_path))
    assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


def test_e27_axis_2_rejected_at_construction():
  with pytest.raises(fws.WarmStartError, match=re.escape("Provided axis: 2")):
    fws.VocabInfo("new", 5, 0, "old", axis=2)


def test_errors_in_memory_vocab_name_the_token(tmp_path, ckpt, no_reads):
  # E-5 and E-10 with token lists: the message names the token / line of the list.
  live = {"fruit_weights": jnp.zeros((5, 1))}
  dup = fws.VocabInfo(NEWV, 5, 0, ["apple", "banana", "apple", "orange"])
  with pytest.raises(fws.WarmStartError, match="'apple'"):
    fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"fruit_weights": dup}))
  empty = fws.VocabInfo(NEWV, 5, 0, ["apple", "", "guava", "orange"])
  with pytest.raises(fws.WarmStartError, match=r"line 2\b"):
    fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"fruit_weights": empty}))


def test_backup_initializer_not_called_when_the_request_is_invalid(tmp_path, ckpt, no_reads):
  # Every problem of the request is found before the backup initializer runs or anything is read.
  init = Counting()
  good = fws.VocabInfo(NEWV, 5, 1, OLDV, backup_initializer=init)
  bad = fws.VocabInfo(NEWV, 5, 0, [*OLDV, "raspberry"])  # E-21
  live = {"fruit_weights": jnp.zeros((6, 1)), "fruit_bias": jnp.zeros((5, 1))}
  settings = fws.WarmStartSettings(
    ckpt,
    var_name_to_vocab_info={"fruit_weights": good, "fruit_bias": bad},
    var_name_to_prev_var_name={"fruit_bias": "fruit_weights"},
  )
  with pytest.raises(fws.WarmStartError, match="raspberry"):
    fws.warm_start(live, settings)
  assert init.calls == []
