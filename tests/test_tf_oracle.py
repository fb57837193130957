"""Differential tests: `flax_warmstart` against TensorFlow's own `warm_start`.

TensorFlow (the optional `tf` extra, `tensorflow-cpu`) is the oracle; its tests
skip where it is not installed. They are marked `slow` (`python -m pytest -m
slow` runs them, as `.ci/run` does), and TensorFlow is imported only when one
of them runs, so that collecting this file costs nothing in the default run. Each case runs TF 1.x graph mode in a
fresh `tf.Graph()`: the old variables are created with `get_variable` and saved
with `tf.compat.v1.train.Saver`; in a new graph the new variables are created
and `tf.compat.v1.train.warm_start(...)` is called, then the init op runs. The
same old values are saved as an Orbax checkpoint (TF's name `a/b/c` becomes the
nested dict `{"a": {"b": {"c": ...}}}`), and `fws.warm_start` with the same
arguments must give bit-identical values.

Backup initializers are deterministic so that results compare bit for bit: TF's
`random_uniform_initializer(c, c)` (TF cannot use `constant_initializer` as a
backup: the shape it gets is symbolic) against `jax.nn.initializers.constant(c)`,
and zeros (`None`) against `None`; plus a counting initializer that returns
`100 * k + (1, 2, ...)` on its k-th call, which checks the order and shapes in
which the backup initializer is called.

Cases: a random sweep of axis-0 remaps, a random sweep of axis-1 remaps,
partitioned TF variables against sharded arrays, non-vocabulary selection and
renames, the counting initializer, error parity (TF raises, so must we), and
the documented places where `flax_warmstart` deliberately differs.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nest, save_checkpoint
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

pytestmark = pytest.mark.slow


class _Imported:
  """`tensorflow` (or `tensorflow.compat.v1`), imported on first use; the test using it skips where it is missing."""

  def __init__(self, *path):
    self._path = path

  def __getattr__(self, name):
    module = pytest.importorskip("tensorflow")
    for part in self._path:
      module = getattr(module, part)
    return getattr(module, name)


tf = _Imported()
tf1 = _Imported("compat", "v1")


def tf_errors():
  """Errors TensorFlow raises for a bad warm start: in Python while building the graph, or as an op error when the init op runs."""
  return (ValueError, TypeError, IndexError, tf.errors.OpError)


POOL = (
  "apple banana guava orange raspberry blueberry kiwi mango papaya lemon"
  " lime cherry grape melon peach pear plum fig date apricot"
).split()

FW = np.array([[0.5], [1.0], [1.5], [2.0]], np.float32)
OLDV = ["apple", "banana", "guava", "orange"]
NEWV = ["orange", "guava", "banana", "apple", "raspberry"]


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class VocabCase:
  """One vocabulary-remapped variable, described once for both libraries.

  Attributes:
    table: The checkpoint tensor.
    shape: The live variable's shape.
    new_vocab, new_vocab_size, num_oov_buckets, old_vocab, old_vocab_size, axis:
      As in `VocabInfo` (vocabularies as token lists; written to files).
    backup: None (zeros), a float c (a constant), or "counter".
    ending: Appended to the `"\\n".join(...)` of each vocabulary file.
    name: The variable's name.
  """

  table: np.ndarray
  shape: tuple[int, ...]
  new_vocab: tuple[str, ...]
  new_vocab_size: int
  num_oov_buckets: int
  old_vocab: tuple[str, ...]
  old_vocab_size: int = -1
  axis: int = 0
  backup: float | str | None = None
  ending: str = ""
  name: str = "linear_model/sc_vocab/weights"

  def __repr__(self):
    return (
      f"VocabCase(name={self.name!r}, axis={self.axis}, shape={self.shape}, table={self.table.tolist()},"
      f" new_vocab={list(self.new_vocab)}, new_vocab_size={self.new_vocab_size},"
      f" num_oov_buckets={self.num_oov_buckets}, old_vocab={list(self.old_vocab)},"
      f" old_vocab_size={self.old_vocab_size}, backup={self.backup!r}, ending={self.ending!r})"
    )


def _tokens(rng, n):
  return tuple(str(t) for t in rng.choice(POOL, size=n, replace=False))


def _new_tokens(rng, old):
  """Some old tokens (reordered) and some fresh ones, shuffled, no duplicates, 1 to 12 in all."""
  kept = [str(t) for t in rng.choice(old, size=int(rng.integers(0, len(old) + 1)), replace=False)]
  fresh = [t for t in POOL if t not in old]
  n_fresh = int(rng.integers(0 if kept else 1, 5))
  tokens = kept + [str(t) for t in rng.choice(fresh, size=n_fresh, replace=False)]
  rng.shuffle(tokens)
  return tuple(tokens[:12])


def _backup(rng):
  return None if rng.random() < 0.4 else float(np.float32(np.round(rng.uniform(-2, 2), 3)))


def axis0_case(seed, even_rows=False):
  """A random axis-0 remap (embedding / linear weights) that TensorFlow accepts."""
  rng = np.random.default_rng(seed)
  old = _tokens(rng, int(rng.integers(3, 13)))
  new = _new_tokens(rng, old)
  size = int(rng.integers(1, len(new) + 1))
  oov = int(rng.integers(0, 4))
  if even_rows and size + oov < 2:
    oov = 2 - size
  old_size = -1 if rng.random() < 0.5 else int(rng.integers(1, len(old) + 1))
  if even_rows:
    rows = 2 * int(rng.integers(1, (size + oov) // 2 + 1))
  else:
    rows = int(rng.integers(1, size + oov + 1))
  dim = int(rng.integers(1, 5))
  extra = int(rng.integers(0, 3)) if rng.random() < 0.3 else 0
  table = np.round(rng.standard_normal((len(old) + extra, dim)), 4).astype(np.float32)
  ending = str(rng.choice(["", "", "\n", "\r\n"]))
  return VocabCase(table, (rows, dim), new, size, oov, old, old_size, 0, _backup(rng), ending)


def axis1_case(seed, even_rows=False):
  """A random axis-1 remap (softmax kernel `[hidden, vocab]`) that TensorFlow accepts."""
  rng = np.random.default_rng(1000 + seed)
  old = _tokens(rng, int(rng.integers(3, 13)))
  new = _new_tokens(rng, old)
  size = int(rng.integers(1, len(new) + 1))
  oov = int(rng.integers(0, 4))
  rows = 2 * int(rng.integers(1, 3)) if even_rows else int(rng.integers(1, 5))
  old_rows = rows + (int(rng.integers(0, 3)) if rng.random() < 0.5 else 0)
  # TF ignores old_vocab_size for axis 1; so must we.
  old_size = -1 if rng.random() < 0.5 else int(rng.integers(1, len(old) + 1))
  extra = int(rng.integers(0, 2)) if rng.random() < 0.3 else 0
  table = np.round(rng.standard_normal((old_rows, len(old) + extra)), 4).astype(np.float32)
  return VocabCase(
    table, (rows, size + oov), new, size, oov, old, old_size, 1, _backup(rng), "", name="dnn/logits/kernel"
  )


# --------------------------------------------------------------------------- helpers


def write_vocab(path, tokens, ending=""):
  with open(path, "w", newline="") as f:
    f.write("\n".join(tokens).replace("\n", "\r\n" if ending == "\r\n" else "\n") + ending)
  return str(path)


def tf_counter():
  """TF backup initializer: `100 * k + (1, 2, ...)` on its k-th call (at graph construction)."""
  calls = [0]

  def init(shape, dtype=None, partition_info=None):
    calls[0] += 1
    n = tf.reduce_prod(shape)
    values = tf.cast(tf.range(1, n + 1), tf.float32) + 100.0 * calls[0]
    return tf.reshape(values, shape)

  return init


def jax_counter():
  """The JAX twin of `tf_counter`."""
  calls = [0]

  def init(key, shape, dtype=jnp.float32):
    calls[0] += 1
    return (100.0 * calls[0] + jnp.arange(1, math.prod(shape) + 1, dtype=jnp.float32)).reshape(shape).astype(dtype)

  return init


def vocab_infos(case, directory):
  """The case as a TF `VocabInfo` and a `fws.VocabInfo`, over the same vocabulary files."""
  os.makedirs(directory, exist_ok=True)
  new_path = write_vocab(os.path.join(directory, "new_vocab.txt"), case.new_vocab, case.ending)
  old_path = write_vocab(os.path.join(directory, "old_vocab.txt"), case.old_vocab, case.ending)
  if case.backup is None:
    tf_init, jax_init = None, None
  elif case.backup == "counter":
    tf_init, jax_init = tf_counter(), jax_counter()
  else:
    tf_init = tf1.random_uniform_initializer(case.backup, case.backup)
    jax_init = jax.nn.initializers.constant(case.backup)
  args = (new_path, case.new_vocab_size, case.num_oov_buckets, old_path, case.old_vocab_size)
  tf_info = tf1.train.VocabInfo(*args, backup_initializer=tf_init, axis=case.axis)
  our_info = fws.VocabInfo(*args, backup_initializer=jax_init, axis=case.axis)
  return tf_info, our_info


def _value_initializer(value):
  """A TF initializer giving `value` (the rows of a partition, for partitioned variables)."""

  def init(shape, dtype=None, partition_info=None):
    offset = 0 if partition_info is None else partition_info.single_offset(shape)
    return tf.constant(value[offset : offset + shape[0]])

  return init


def tf_save(ckpt_dir, old):
  """Saves `{name: value}` as a TF name-based checkpoint in `ckpt_dir`."""
  with tf.Graph().as_default():
    for name, value in old.items():
      tf1.get_variable(name, initializer=value)
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      tf1.train.Saver().save(sess, os.path.join(ckpt_dir, "model"))
  return str(ckpt_dir)


def tf_warm_start(ckpt_dir, new, *, vars_to_warm_start=".*", vocab=None, prev=None, partitioned=()):
  """Creates `new` (`{name: initial value}`) in a fresh graph, warm-starts it, returns its values."""
  with tf.Graph().as_default():
    variables = {}
    for name, value in new.items():
      value = np.asarray(value)
      variables[name] = tf1.get_variable(
        name,
        shape=value.shape,
        dtype=tf.as_dtype(value.dtype),
        initializer=_value_initializer(value),
        partitioner=(lambda shape, dtype: [2] + [1] * (len(shape) - 1)) if name in partitioned else None,
      )
    tf1.train.warm_start(
      ckpt_dir,
      vars_to_warm_start=vars_to_warm_start,
      var_name_to_vocab_info=vocab,
      var_name_to_prev_var_name=prev,
    )
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      out = {}
      for name, v in variables.items():
        if name in partitioned:
          out[name] = np.concatenate(sess.run(list(v)), axis=0)
        else:
          out[name] = sess.run(v)
  return out


def ours_warm_start(path, new, *, vars_to_warm_start=".*", vocab=None, prev=None, sharding=None):
  """`fws.warm_start` of the params tree `new` (`{name: initial value}`); returns `{name: leaf}`."""
  place = (lambda x: jax.device_put(jnp.asarray(x), sharding)) if sharding is not None else jnp.asarray
  state = nest({name: place(value) for name, value in new.items()})
  settings = fws.WarmStartSettings(
    path,
    vars_to_warm_start=vars_to_warm_start,
    var_name_to_vocab_info=vocab or {},
    var_name_to_prev_var_name=prev or {},
  )
  out = fws.warm_start(state, settings)
  return dict(zip(fws.variable_names(out), jax.tree_util.tree_leaves(out), strict=True))


def both(tmp_path, old, new, **kwargs):
  """Runs TF and `flax_warmstart` on the same request; returns `(tf_values, our_values)`."""
  tf_dir = tf_save(tmp_path / "tf_ckpt", old)
  path = save_checkpoint(tmp_path / "orbax", nest(old))
  return tf_warm_start(tf_dir, new, **kwargs), ours_warm_start(path, new, **kwargs)


def run_vocab_case(tmp_path, case, *, partitioned=False, sharding=None):
  """Both libraries on one `VocabCase`; returns `(tf_value, our_leaf)`."""
  tf_info, our_info = vocab_infos(case, tmp_path / "vocab")
  old = {case.name: case.table}
  new = {case.name: np.zeros(case.shape, np.float32)}
  tf_dir = tf_save(tmp_path / "tf_ckpt", old)
  path = save_checkpoint(tmp_path / "orbax", nest(old))
  tf_out = tf_warm_start(tf_dir, new, vocab={case.name: tf_info}, partitioned=(case.name,) if partitioned else ())
  ours = ours_warm_start(path, new, vocab={case.name: our_info}, sharding=sharding)
  return tf_out[case.name], ours[case.name]


def assert_same(ours, expected, case=None):
  ours = np.asarray(ours)
  assert ours.shape == np.shape(expected) and ours.dtype == np.asarray(expected).dtype, (ours, expected)
  np.testing.assert_array_equal(ours, expected, err_msg=repr(case) if case is not None else "")


# --------------------------------------------------------------------------- 1, 2: random sweeps


@pytest.mark.parametrize("seed", range(30))
def test_axis0_vocab_sweep(tmp_path, seed):
  case = axis0_case(seed)
  expected, ours = run_vocab_case(tmp_path, case)
  assert_same(ours, expected, case)


@pytest.mark.parametrize("seed", range(15))
def test_axis1_vocab_sweep(tmp_path, seed):
  case = axis1_case(seed)
  expected, ours = run_vocab_case(tmp_path, case)
  assert_same(ours, expected, case)


def test_sweeps_cover_the_interesting_regions():
  """The random cases reach OOV rows, truncated old vocabularies, short variables, extra old rows."""
  cases = [axis0_case(s) for s in range(30)]
  assert any(c.shape[0] > c.new_vocab_size for c in cases)  # OOV rows
  assert any(c.shape[0] < c.new_vocab_size for c in cases)  # fewer rows than vocabulary
  assert any(0 < c.old_vocab_size < len(c.old_vocab) for c in cases)
  assert any(c.table.shape[0] > len(c.old_vocab) for c in cases)
  assert any(c.backup is None for c in cases) and any(isinstance(c.backup, float) for c in cases)
  assert {c.ending for c in cases} == {"", "\n", "\r\n"}
  cols = [axis1_case(s) for s in range(15)]
  assert any(c.num_oov_buckets for c in cols) and any(c.table.shape[0] > c.shape[0] for c in cols)
  assert any(c.old_vocab_size != -1 for c in cols)


ALL_COPIED = {
  # Every new token has an old row and there are no OOV rows/columns, so the backup
  # initializer fills nothing (TF still calls it once, for 0 cells).
  "axis0-constant": VocabCase(FW, (2, 1), ("orange", "apple"), 2, 0, tuple(OLDV), backup=0.5),
  "axis0-oov-buckets-unused": VocabCase(FW, (4, 1), tuple(NEWV[:4]), 4, 2, tuple(OLDV), backup=0.5),
  "axis0-zeros": VocabCase(FW, (2, 1), ("orange", "apple"), 2, 0, tuple(OLDV)),
  "axis1-constant": VocabCase(
    np.array([[0.5, 0.3], [1.0, 0.8]], np.float32),
    (2, 2),
    ("orange", "apple"),
    2,
    0,
    ("apple", "orange"),
    axis=1,
    backup=0.5,
    name="dnn/logits/kernel",
  ),
}


@pytest.mark.parametrize("key", list(ALL_COPIED))
def test_every_row_copied_with_a_backup_initializer(tmp_path, key):
  case = ALL_COPIED[key]
  expected, ours = run_vocab_case(tmp_path, case)
  assert_same(ours, expected, case)


# --------------------------------------------------------------------------- 3: partitioned vs sharded


PARTITIONED = [
  *(("axis0", s) for s in range(6)),
  *(("axis1", s) for s in range(2)),
]


@pytest.mark.parametrize(("kind", "seed"), PARTITIONED)
def test_partitioned_tf_variable_vs_sharded_array(tmp_path, mesh, kind, seed):
  case = axis0_case(100 + seed, even_rows=True) if kind == "axis0" else axis1_case(100 + seed, even_rows=True)
  assert case.shape[0] % 2 == 0
  sharding = NamedSharding(mesh, P("a", None))
  expected, ours = run_vocab_case(tmp_path, case, partitioned=True, sharding=sharding)
  assert_same(ours, expected, case)
  assert ours.sharding == sharding


def test_partitioned_oov_only_part(tmp_path, mesh):
  """E-28 / CO-4: the second part starts after the vocabulary (TF's OOV-only partition path)."""
  case = VocabCase(FW, (6, 1), ("orange", "guava"), 2, 4, tuple(OLDV), backup=0.42)
  sharding = NamedSharding(mesh, P("a", None))
  expected, ours = run_vocab_case(tmp_path, case, partitioned=True, sharding=sharding)
  np.testing.assert_array_equal(expected, np.array([[2.0], [1.5], [0.42], [0.42], [0.42], [0.42]], np.float32))
  assert_same(ours, expected, case)
  assert ours.sharding == sharding


# --------------------------------------------------------------------------- 4: non-vocabulary selection


def _selection_vars():
  """Checkpoint and live values (all different) of a few plain variables."""
  rng = np.random.default_rng(7)
  shapes = {
    "linear_model/sc_vocab/weights": (4, 1),
    "linear_model/sc_hash/weights": (3, 1),
    "linear_model/sc_int/weights": (2, 2),
    "linear_model/sc_keys/weights": (4, 1),
    "v1": (3, 1),
    "v2": (3, 1),
    "v20": (3, 1),
    "v2_b": (1, 2),
  }
  old = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
  old["some_other_name"] = rng.standard_normal((4, 1)).astype(np.float32)
  new = {n: rng.standard_normal(s).astype(np.float32) + 10 for n, s in shapes.items()}
  return old, new


SELECTIONS = [
  (".*", None),
  (".*sc_vocab.*", None),
  (".*(sc_vocab|sc_hash).*", None),
  ("linear_model", None),
  ("linear_model/sc_", None),
  ("v2", None),
  ("v2[^/]", None),
  ("v1:0$", None),
  ("v1|v20", None),
  (["v1", "v2[^/]"], None),
  (["v1", "v2"], None),
  ([".*sc_int.*", "v2_"], None),
  ([], None),
  ("", None),
  (None, None),
  (".*(sc_keys|sc_vocab).*", {"linear_model/sc_keys/weights": "some_other_name"}),
  (["v1", "v2"], {"v2": "v1"}),  # WS-16: two variables from one checkpoint tensor
  (["v1", "v2:", "v20"], {"v2": "v20", "v20": "v2"}),  # a swap ("v2:" avoids selecting v20 twice)
  (None, {"linear_model/sc_keys/weights": "some_other_name"}),  # WS-27: prev entry "used", nothing loaded
]


@pytest.mark.parametrize(("vars_to_warm_start", "prev"), SELECTIONS, ids=[repr(s) for s in SELECTIONS])
def test_selection_and_renames(tmp_path, vars_to_warm_start, prev):
  old, new = _selection_vars()
  expected, ours = both(tmp_path, old, new, vars_to_warm_start=vars_to_warm_start, prev=prev)
  assert set(ours) == set(expected)
  for name in expected:
    assert_same(ours[name], expected[name], name)


@pytest.mark.parametrize("vars_to_warm_start", [".*(sc_keys|sc_vocab).*", None, [".*"]])
def test_selection_with_vocab_and_rename(tmp_path, vars_to_warm_start):
  """WS-25..WS-27 unpartitioned: a vocabulary variable next to plain ones, with a rename."""
  old, new = _selection_vars()
  old["linear_model/sc_vocab/weights"] = np.array([[0.5], [1.0], [2.0], [3.0]], np.float32)
  new["linear_model/sc_vocab/weights"] = np.zeros((6, 1), np.float32)
  case = VocabCase(old["linear_model/sc_vocab/weights"], (6, 1), (*NEWV, "blueberry"), 6, 0, tuple(OLDV))
  tf_info, our_info = vocab_infos(case, tmp_path / "vocab")
  prev = {"linear_model/sc_keys/weights": "some_other_name"}
  tf_dir = tf_save(tmp_path / "tf_ckpt", old)
  path = save_checkpoint(tmp_path / "orbax", nest(old))
  name = "linear_model/sc_vocab/weights"
  expected = tf_warm_start(tf_dir, new, vars_to_warm_start=vars_to_warm_start, vocab={name: tf_info}, prev=prev)
  ours = ours_warm_start(path, new, vars_to_warm_start=vars_to_warm_start, vocab={name: our_info}, prev=prev)
  np.testing.assert_array_equal(expected[name], [[3.0], [2.0], [1.0], [0.5], [0.0], [0.0]])
  for n in expected:
    assert_same(ours[n], expected[n], n)


# --------------------------------------------------------------------------- 5: counting backup initializer


COUNTER_CASES = {
  # E-29: missing cells row-major from call 1, OOV rows from call 2 shaped [2, 2].
  "E-29": VocabCase(
    np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32),
    (6, 2),
    ("b", "x", "a", "y"),
    4,
    2,
    ("a", "b", "c", "d"),
    backup="counter",
  ),
  # Nothing missing: TF still makes its first call (for 0 cells); OOV rows come from call 2.
  "no-missing": VocabCase(FW, (6, 1), ("orange", "guava"), 2, 4, tuple(OLDV), backup="counter"),
  # Every token present, no OOV rows: one call, for 0 cells.
  "all-present": VocabCase(FW, (3, 1), ("orange", "apple", "banana"), 3, 0, tuple(OLDV), backup="counter"),
  # No OOV rows: one call only.
  "no-oov": VocabCase(
    np.arange(12, dtype=np.float32).reshape(4, 3),
    (3, 3),
    ("kiwi", "apple", "lime"),
    3,
    2,
    tuple(OLDV),
    backup="counter",
  ),
  # Axis 1: missing cells row-major over [rows, missing columns], then the OOV columns [rows, oov].
  "axis1": VocabCase(
    np.array([[0.5, 0.3], [1.0, 0.8], [1.5, 1.2], [2.0, 2.3]], np.float32),
    (3, 5),
    ("orange", "kiwi", "apple", "banana"),
    4,
    1,
    ("apple", "orange"),
    axis=1,
    backup="counter",
    name="dnn/logits/kernel",
  ),
}


@pytest.mark.parametrize("key", list(COUNTER_CASES))
def test_counting_backup_initializer(tmp_path, key):
  case = COUNTER_CASES[key]
  expected, ours = run_vocab_case(tmp_path, case)
  if key == "E-29":
    np.testing.assert_array_equal(expected, [[3, 4], [101, 102], [1, 2], [103, 104], [201, 202], [203, 204]])
  assert_same(ours, expected, case)


# --------------------------------------------------------------------------- errors: TF raises, so must we


def _vocab_error_cases():
  fw = VocabCase(FW, (5, 1), tuple(NEWV), 5, 0, tuple(OLDV))
  ol = VocabCase(
    np.array([[0.5, 0.3], [1.0, 0.8], [1.5, 1.2], [2.0, 2.3]], np.float32),
    (4, 3),
    ("orange", "apple", "banana"),
    3,
    0,
    ("apple", "orange"),
    axis=1,
    name="dnn/logits/kernel",
  )
  return {
    "E-3 old_vocab_size > lines": dataclasses.replace(fw, old_vocab_size=5),
    "E-5 duplicate old token": dataclasses.replace(fw, old_vocab=("apple", "banana", "apple", "orange")),
    "E-10 empty old line": dataclasses.replace(fw, old_vocab=("apple", "", "guava", "orange")),
    "E-12 empty new line after the used ones": dataclasses.replace(
      fw, shape=(3, 1), new_vocab=("orange", "guava", "banana", "", "x"), new_vocab_size=3
    ),
    "E-15 new vocab too short": dataclasses.replace(fw, new_vocab=("orange", "guava", "banana")),
    "E-18 more rows than vocab + oov": dataclasses.replace(fw, shape=(6, 1)),
    "E-19 embedding width differs": dataclasses.replace(fw, shape=(5, 2)),
    "E-21 old vocab beyond the table": dataclasses.replace(fw, old_vocab=(*OLDV, "raspberry")),
    "E-25 axis 1 columns != vocab + oov": dataclasses.replace(ol, shape=(4, 4)),
    "axis 1 more rows than the table": dataclasses.replace(ol, shape=(5, 3)),
  }


VOCAB_ERRORS = _vocab_error_cases()


@pytest.mark.parametrize("key", list(VOCAB_ERRORS))
def test_vocab_errors_match_tf(tmp_path, key):
  case = VOCAB_ERRORS[key]
  with pytest.raises(tf_errors()):
    run_vocab_case(tmp_path / "tf", case)
  tf_info, our_info = vocab_infos(case, tmp_path / "vocab")
  path = save_checkpoint(tmp_path / "orbax", nest({case.name: case.table}))
  with pytest.raises(fws.WarmStartError):
    ours_warm_start(path, {case.name: np.zeros(case.shape, np.float32)}, vocab={case.name: our_info})


def test_vocab_info_axis_2_raises_in_both():
  with pytest.raises(ValueError, match="Provided axis: 2"):
    tf1.train.VocabInfo("n", 1, 0, "o", axis=2)
  with pytest.raises(fws.WarmStartError, match="Provided axis: 2"):
    fws.VocabInfo("n", 1, 0, "o", axis=2)


SELECTION_ERRORS = {
  "shape mismatch": dict(old={"a": np.ones((1, 2), np.float32)}, new={"a": np.zeros((2, 1), np.float32)}),
  "missing tensor": dict(old={"a": np.ones((2, 1), np.float32)}, new={"b": np.zeros((2, 1), np.float32)}),
  "prev to a missing tensor": dict(
    old={"a": np.ones((2, 1), np.float32)}, new={"a": np.zeros((2, 1), np.float32)}, prev={"a": "nope"}
  ),
  "prev key with :0": dict(
    old={"v1": np.ones((2, 1), np.float32)}, new={"v1": np.zeros((2, 1), np.float32)}, prev={"v1:0": "v1"}
  ),
  "prev key not selected": dict(
    old={"v1": np.ones((2, 1), np.float32), "v2": np.ones((2, 1), np.float32)},
    new={"v1": np.zeros((2, 1), np.float32), "v2": np.zeros((2, 1), np.float32)},
    vars_to_warm_start="v1",
    prev={"v2": "v1"},
  ),
  "prev to empty name": dict(
    old={"v1": np.ones((2, 1), np.float32)}, new={"v1": np.zeros((2, 1), np.float32)}, prev={"v1": ""}
  ),
}


@pytest.mark.parametrize("key", list(SELECTION_ERRORS))
def test_selection_errors_match_tf(tmp_path, key):
  spec = dict(SELECTION_ERRORS[key])
  old, new = spec.pop("old"), spec.pop("new")
  tf_dir = tf_save(tmp_path / "tf_ckpt", old)
  with pytest.raises(tf_errors()):
    tf_warm_start(tf_dir, new, **spec)
  path = save_checkpoint(tmp_path / "orbax", nest(old))
  with pytest.raises(fws.WarmStartError):
    ours_warm_start(path, new, **spec)


def test_unused_vocab_entry_raises_in_both(tmp_path):
  """WS-30 (b): a `VocabInfo` for a variable that does not exist."""
  old = {"x": np.ones((4, 1), np.float32)}
  new = {"x": np.zeros((4, 1), np.float32)}
  case = VocabCase(FW, (4, 1), tuple(OLDV), 4, 0, tuple(OLDV))
  tf_info, our_info = vocab_infos(case, tmp_path / "vocab")
  tf_dir = tf_save(tmp_path / "tf_ckpt", old)
  with pytest.raises(ValueError, match="var_name_to_vocab_info that were not used"):
    tf_warm_start(tf_dir, new, vocab={"y": tf_info})
  path = save_checkpoint(tmp_path / "orbax", nest(old))
  with pytest.raises(fws.WarmStartError, match="y"):
    ours_warm_start(path, new, vocab={"y": our_info})


# --------------------------------------------------------------------------- documented improvements


def test_duplicate_new_tokens_match_tf_across_partitions(tmp_path):
  """E-7 / E-9: TF rejects a duplicate new token within one part but accepts it across parts;
  we accept it anywhere, with TF's across-parts values."""
  case = VocabCase(FW, (6, 1), ("apple", "banana", "guava", "apple", "kiwi", "orange"), 6, 0, tuple(OLDV))
  with pytest.raises(tf.errors.UnimplementedError):
    run_vocab_case(tmp_path / "unpartitioned", case)
  expected, ours = run_vocab_case(tmp_path / "partitioned", case, partitioned=True)
  np.testing.assert_array_equal(expected, [[0.5], [1.0], [1.5], [0.5], [0.0], [2.0]])
  assert_same(ours, expected, case)


def test_rank1_variable_matches_tf_column(tmp_path):
  """E-22: TF raises IndexError for a rank-1 variable; we remap it like TF remaps the `[R, 1]` column."""
  case = VocabCase(FW, (6, 1), tuple(NEWV), 5, 1, tuple(OLDV), backup=0.25)
  expected, _ = run_vocab_case(tmp_path / "column", case)
  tf_info, our_info = vocab_infos(case, tmp_path / "vocab")
  tf_dir = tf_save(tmp_path / "tf_rank1", {case.name: FW[:, 0]})
  with pytest.raises(IndexError):
    tf_warm_start(tf_dir, {case.name: np.zeros(6, np.float32)}, vocab={case.name: tf_info})
  path = save_checkpoint(tmp_path / "orbax_rank1", nest({case.name: FW[:, 0]}))
  ours = ours_warm_start(path, {case.name: np.zeros(6, np.float32)}, vocab={case.name: our_info})
  assert_same(ours[case.name], expected[:, 0], case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_non_float32_variable_matches_tf_float32(tmp_path, dtype):
  """TF only remaps float32 variables; ours equals TF's float32 result cast to the live dtype."""
  case = VocabCase(FW, (6, 1), tuple(NEWV), 5, 1, tuple(OLDV), backup=0.25)
  expected, _ = run_vocab_case(tmp_path / "f32", case)
  tf_info, our_info = vocab_infos(case, tmp_path / "vocab")
  if dtype == np.float16:
    tf_dir = tf_save(tmp_path / "tf_f16", {case.name: FW})
    # TF remaps in float32 and then fails to assign the result to the float16 variable.
    with pytest.raises(ValueError, match="float16"):
      tf_warm_start(tf_dir, {case.name: np.zeros((6, 1), np.float16)}, vocab={case.name: tf_info})
  path = save_checkpoint(tmp_path / "orbax", nest({case.name: FW}))
  ours = ours_warm_start(path, {case.name: np.zeros((6, 1), dtype)}, vocab={case.name: our_info})
  assert_same(ours[case.name], expected.astype(dtype), case)


def test_documented_selection_differences(tmp_path):
  """README "Differences from TensorFlow": `"v1$"` selects v1 (TF: nothing, names end in `:0`);
  overlapping list regexes select a leaf once (TF raises)."""
  old = {"v1": np.ones((2, 1), np.float32), "v2": np.ones((2, 1), np.float32)}
  new = {"v1": np.zeros((2, 1), np.float32), "v2": np.zeros((2, 1), np.float32)}
  tf_dir = tf_save(tmp_path / "tf_ckpt", old)
  path = save_checkpoint(tmp_path / "orbax", nest(old))
  expected = tf_warm_start(tf_dir, new, vars_to_warm_start="v1$")
  np.testing.assert_array_equal(expected["v1"], new["v1"])
  ours = ours_warm_start(path, new, vars_to_warm_start="v1$")
  assert_same(ours["v1"], old["v1"])
  assert_same(ours["v2"], new["v2"])
  with pytest.raises(ValueError, match="At least two variables have the same name"):
    tf_warm_start(tf_dir, new, vars_to_warm_start=["v1", "v1"])
  ours = ours_warm_start(path, new, vars_to_warm_start=["v1", "v1"])
  assert_same(ours["v1"], old["v1"])
  assert_same(ours["v2"], new["v2"])
