"""Showing a plan (table, HTML, dict/JSON), and provenance across real Orbax checkpoints.

Covers flax_warmstart/_src/report.py, the presentation half of
flax_warmstart/_src/planning.py, provenance.py and `warm_start(..., plan=...)`.
Settings as plain data (serialize.py) are tested in test_serialize.py.
"""

import datetime
import html
import json
import os
from html.parser import HTMLParser

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import MLP, assert_trees_equal, make_state, save_checkpoint, save_manager_step
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_warmstart as fws
from flax_warmstart._src import report
from flax_warmstart._src.report import human_bytes

COLUMNS = ("name", "action", "source", "shape", "dtype", "read", "sharding", "reason")
OLD_VOCAB = ["a", "b", "c"]
# 4 vocabulary rows + 1 OOV row: "b" and "a" are copied, "z" and "d" are new, "c" is dropped.
NEW_VOCAB = ["b", "a", "z", "d"]
OLD_STEP = 7


# --------------------------------------------------------------------------------------------------
# Fixtures: real TrainStates, real Orbax checkpoints.


def _train_state(params, step=0):
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2))
  return state.replace(step=step)


@pytest.fixture(scope="module")
def rich_old():
  """The old run: an embedding over OLD_VOCAB, an encoder, a head under another scope name, a retired scope."""
  params = {
    "emb": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
    "enc": {"kernel": jnp.arange(32, dtype=jnp.float32).reshape(8, 4) / 8},
    "old_head": {"kernel": jnp.arange(8, dtype=jnp.float32).reshape(4, 2) + 100},
    "head": {"bias": jnp.full((2,), 9.0)},
    "retired": {"w": jnp.ones((3,))},
  }
  return _train_state(params, step=5)


@pytest.fixture(scope="module")
def rich_root(tmp_path_factory, rich_old):
  """A CheckpointManager root whose latest step is OLD_STEP."""
  return save_manager_step(tmp_path_factory.mktemp("rich") / "run", OLD_STEP, rich_old)


def _rich_new(mesh):
  """The new state: every action kind, a bf16 NamedSharding leaf, a numpy leaf, single-device leaves."""
  params = {
    "emb": jnp.zeros((5, 4)),
    "enc": {"kernel": jax.device_put(jnp.zeros((8, 4), jnp.bfloat16), NamedSharding(mesh, P("a", "b")))},
    "head": {"kernel": np.zeros((4, 2), np.float32), "bias": jnp.zeros((2,))},
    "fresh": {"w": jnp.zeros((3,))},
  }
  return _train_state(params, step=3)


def _rich_settings(root):
  return fws.WarmStartSettings(
    root,
    vars_to_warm_start="(emb|enc|head)",
    var_name_to_vocab_info={"emb": fws.VocabInfo(NEW_VOCAB, 4, 1, OLD_VOCAB)},
    var_name_to_prev_var_name={"head/kernel": "old_head/kernel"},
    rename_rules=[("head/bias", None)],
    optimizer_state="reset",
    step="reset",
  )


@pytest.fixture
def rich(rich_root, mesh):
  new = _rich_new(mesh)
  settings = _rich_settings(rich_root)
  return new, settings, fws.plan(new, settings)


@pytest.fixture(scope="module")
def old_mlp(adam_mlp):
  """The session's Adam MLP TrainState (read-only)."""
  return adam_mlp.state


@pytest.fixture(scope="module")
def mlp_root(tmp_path_factory, old_mlp):
  return save_manager_step(tmp_path_factory.mktemp("mlp") / "run", OLD_STEP, old_mlp)


def _scoped(scopes, per_scope=10, value=0.0, extra=()):
  """A params dict with `per_scope` scalar-vector leaves under each scope (`a/w0` ... ), plus `extra` names."""
  tree = {s: {f"w{i}": jnp.full((2,), value) for i in range(per_scope)} for s in scopes}
  for name in extra:
    scope, leaf = name.split("/")
    tree.setdefault(scope, {})[leaf] = jnp.full((2,), value)
  return tree


@pytest.fixture(scope="module")
def scoped_ckpt(tmp_path_factory):
  return save_checkpoint(tmp_path_factory.mktemp("scoped") / "ckpt", _scoped("abcde", value=1.0))


def _expected_cells(row):
  """A row's table cells, derived from the LeafPlan independently of report.py."""
  dtype = f"{row.source_dtype}->{row.dtype}" if row.cast else str(row.dtype)
  source = "" if row.source is None or row.source == row.name else row.source
  read = human_bytes(row.nbytes) if row.nbytes else ""
  return [row.name, row.action, source, str(row.shape), dtype, read, row.sharding, row.reason]


def _split_row(line, starts):
  """Splits a table line at the header's column starts."""
  bounds = [*starts[1:], None]
  return [line[s:e].strip() for s, e in zip(starts, bounds, strict=True)]


def _column_starts(header):
  assert header.split() == list(COLUMNS)
  starts, pos = [], 0
  for col in COLUMNS:
    pos = header.index(col, pos)
    starts.append(pos)
    pos += len(col)
  return starts


# --------------------------------------------------------------------------------------------------
# 1. One row per leaf, for each action kind.


def test_rows_for_every_action_kind(rich, rich_root, rich_old):
  new, _, p = rich
  rows = {row.name: row for row in p.leaves}
  assert [row.name for row in p.leaves] == fws.variable_names(new)

  # copy, renamed by var_name_to_prev_var_name, from a float32 tensor into a host numpy leaf.
  head = rows["head/kernel"]
  assert head.action == "load"
  assert head.source == "old_head/kernel"
  assert head.source_shape == (4, 2) and head.source_dtype == np.dtype("float32")
  assert head.nbytes == 4 * 2 * 4
  assert not head.cast
  assert head.checkpoint is p.checkpoints[0]
  assert head.sharding == "host"
  assert "renamed" in head.reason

  # copy with a dtype cast, onto a NamedSharding leaf.
  enc = rows["enc/kernel"]
  assert enc.action == "load" and enc.source == "enc/kernel"
  assert enc.cast is True
  assert enc.dtype == jnp.bfloat16 and enc.source_dtype == np.dtype("float32")
  assert enc.nbytes == 8 * 4 * 4  # bytes read: the checkpoint's float32
  assert enc.sharding == str(P("a", "b"))

  # remap: the vocabulary mapping and its statistics.
  emb = rows["emb"]
  assert emb.action == "load" and emb.remap is not None and emb.source == "emb"
  assert emb.source_shape == (3, 4) and emb.shape == (5, 4)
  assert emb.remap is not None and emb.remap.follows is None
  stats = emb.remap.mapping.stats()
  assert stats == {"copied": 2, "donated": 0, "explicit": 0, "new": 2, "oov": 1, "dropped": 1}
  assert emb.remap.index.tolist() == [1, 0, -1, -1, -1]
  assert "2 copied, 2 new, 1 OOV" in emb.reason
  assert emb.sharding == str(next(iter(new.params["emb"].sharding.device_set)))
  d = p.to_dict()
  emb_dict = next(leaf for leaf in d["leaves"] if leaf["name"] == "emb")
  assert emb_dict["vocab"]["copied"] == 2
  assert emb_dict["vocab"]["new"] == 2
  assert emb_dict["vocab"]["oov"] == 1
  assert emb_dict["vocab"]["axis"] == 0 and emb_dict["vocab"]["follows"] is None

  # keep: not selected, and kept by a rename rule with a None template.
  fresh = rows["fresh/w"]
  assert (fresh.action, fresh.reason, fresh.source, fresh.nbytes) == ("keep", "not selected", None, 0)
  bias = rows["head/bias"]
  assert bias.action == "keep" and bias.source is None and bias.nbytes == 0
  assert "rename_rules[0]" in bias.reason
  assert bias.sharding == str(next(iter(new.params["head"]["bias"].sharding.device_set)))

  # reset: the step and the whole optimizer state.
  assert rows["step"].action == "reset" and "step='reset'" in rows["step"].reason
  assert rows["step"].sharding == "host"  # a Python int
  opt = [name for name in rows if "opt_state" in name]
  assert len(opt) == 11  # adam: count + 5 mu + 5 nu
  for name in opt:
    assert rows[name].action == "reset", name
    assert "optimizer_state='reset'" in rows[name].reason
    assert rows[name].source is None
  assert {row.name for row in p.reset} == {"step", *opt}
  assert {row.name for row in p.loaded} == {"emb", "enc/kernel", "head/kernel"}
  assert p.nbytes == 3 * 4 * 4 + 8 * 4 * 4 + 4 * 2 * 4

  # The table shows the cast and the shardings.
  text = str(p)
  assert "float32->bfloat16" in text
  assert str(P("a", "b")) in text
  assert "host" in text

  # And the plan is what happens.
  out = fws.warm_start(new, plan=p)
  old_emb = np.asarray(rich_old.params["emb"])
  np.testing.assert_array_equal(np.asarray(out.params["emb"]), np.stack([old_emb[1], old_emb[0], *np.zeros((3, 4))]))
  assert out.params["enc"]["kernel"].dtype == jnp.bfloat16
  assert out.params["enc"]["kernel"].sharding == new.params["enc"]["kernel"].sharding
  np.testing.assert_array_equal(
    np.asarray(out.params["enc"]["kernel"], np.float32),
    np.asarray(rich_old.params["enc"]["kernel"].astype(jnp.bfloat16), np.float32),
  )
  assert isinstance(out.params["head"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(out.params["head"]["kernel"], np.asarray(rich_old.params["old_head"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(out.params["head"]["bias"]), np.zeros(2))
  assert out.step == 0


# --------------------------------------------------------------------------------------------------
# 2. Summary and the text table.


def test_summary_line(rich, rich_root):
  new, _, p = rich
  n = len(fws.variable_names(new))
  reset = 1 + 11
  nbytes = 3 * 4 * 4 + 8 * 4 * 4 + 4 * 2 * 4
  expected = (
    f"3 of {n} leaves from {rich_root}@step {OLD_STEP}, {nbytes} B to read;"
    f" {n - 3 - reset} kept at their current value, {reset} reset"
  )
  assert p.summary() == expected
  assert str(p).splitlines()[0] == expected
  assert report.human_bytes(nbytes) == f"{nbytes} B"


def test_summary_without_step_or_reset(tmp_path):
  path = save_checkpoint(tmp_path / "plain", {"w": jnp.ones((256,)), "b": jnp.ones(())})
  p = fws.plan({"w": jnp.zeros((256,)), "b": jnp.zeros(())}, fws.WarmStartSettings(path, vars_to_warm_start="w"))
  assert p.summary() == f"1 of 2 leaves from {path}, 1.0 KiB to read; 1 kept at their current value"


def test_table_columns_are_aligned(rich):
  _, _, p = rich
  lines = str(p).splitlines()
  assert lines[0] == p.summary()
  starts = _column_starts(lines[1])
  body = lines[2 : 2 + len(p.leaves)]
  assert not any(line.startswith("[") for line in lines)  # 17 rows: not grouped
  for line, row in zip(body, p.leaves, strict=True):
    # Every column is separated from the previous one by (at least) two spaces: nothing overflows.
    for s in starts[1:]:
      assert line[s - 2 : s] == "  ", (line, s)
    assert _split_row(line, starts) == _expected_cells(row)
  # The header is the widest of each column, padded to the same starts as the rows.
  for k, col in enumerate(COLUMNS[:-1]):
    width = max(len(c) for c in [col, *(_expected_cells(row)[k] for row in p.leaves)])
    assert starts[k + 1] == starts[k] + width + 2


def test_unused_tensors(rich, rich_root):
  _, _, p = rich
  where = f"{rich_root}@step {OLD_STEP}"
  names = [name for name, _ in fws.list_variables(rich_root)]
  unused = p.unused_tensors()
  assert list(unused) == [where]
  read = {"emb", "enc/kernel", "old_head/kernel"}
  assert sorted(unused[where]) == sorted(set(names) - read)
  assert {"retired/w", "head/bias", "step", "opt_state/0/count"} <= set(unused[where])
  assert len(unused[where]) == 14
  last = str(p).splitlines()[-1]
  assert last == f"Unused in {where}: " + ", ".join(unused[where][:10]) + " and 4 more"


def test_no_unused_line_when_everything_is_read(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones((2,))})
  p = fws.plan({"w": jnp.zeros((2,))}, path)
  assert p.unused_tensors() == {path: []}
  assert "Unused" not in str(p)


def test_long_tables_group_by_scope(scoped_ckpt):
  state = _scoped("abcde")
  p = fws.plan(state, fws.WarmStartSettings(scoped_ckpt, vars_to_warm_start=["a/", "b/", "c/w[0-4]$"]))
  assert len(p.leaves) == 50 > report.GROUP_ABOVE
  lines = str(p).splitlines()
  assert lines[0] == p.summary()
  assert p.summary().startswith("25 of 50 leaves")
  starts = _column_starts(lines[1])
  heads = [line for line in lines if line.startswith("[")]
  assert heads == [
    "[a] 10 leaves: 10 load",
    "[b] 10 leaves: 10 load",
    "[c] 10 leaves: 5 load, 5 keep",
    "[d] 10 leaves: 10 keep",
    "[e] 10 leaves: 10 keep",
  ]
  # Each scope header precedes exactly its rows.
  rows = iter(p.leaves)
  for k in range(5):
    at = lines.index(heads[k])
    for line in lines[at + 1 : at + 11]:
      row = next(rows)
      assert row.name.startswith("abcde"[k] + "/")
      assert _split_row(line, starts) == _expected_cells(row)
  assert lines[-1].startswith(f"Unused in {scoped_ckpt}: c/w5, c/w6")
  assert lines[-1].endswith(" and 15 more")


def test_forty_rows_do_not_group_and_forty_one_do(scoped_ckpt):
  p40 = fws.plan(_scoped("abcd"), scoped_ckpt)
  assert len(p40.leaves) == report.GROUP_ABOVE == 40
  assert not any(line.startswith("[") for line in str(p40).splitlines())
  assert 'class="scope"' not in p40._repr_html_()
  p41 = fws.plan(_scoped("abcd", extra=["e/w0"]), scoped_ckpt)
  assert len(p41.leaves) == 41
  heads = [line for line in str(p41).splitlines() if line.startswith("[")]
  assert heads == [f"[{s}] 10 leaves: 10 load" for s in "abcd"] + ["[e] 1 leaves: 1 load"]


def test_root_leaves_group_under_root(scoped_ckpt):
  state = {**_scoped("abcd"), "top": jnp.zeros((2,))}
  p = fws.plan(state, fws.WarmStartSettings(scoped_ckpt, vars_to_warm_start="[a-d]/"))
  assert len(p.leaves) == 41
  assert "[(root)] 1 leaves: 1 keep" in str(p).splitlines()


# --------------------------------------------------------------------------------------------------
# 3. The HTML repr.


class _TableParser(HTMLParser):
  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tables = 0
    self.captions = []
    self.rows = []  # (class, [(tag, text, attrs)])
    self._cell = None
    self._in_caption = False

  def handle_starttag(self, tag, attrs):
    if tag == "table":
      self.tables += 1
    elif tag == "caption":
      self._in_caption = True
      self.captions.append("")
    elif tag == "tr":
      self.rows.append((dict(attrs).get("class"), []))
    elif tag in ("td", "th"):
      self._cell = [tag, "", dict(attrs)]

  def handle_endtag(self, tag):
    if tag == "caption":
      self._in_caption = False
    elif tag in ("td", "th"):
      self.rows[-1][1].append(tuple(self._cell))
      self._cell = None

  def handle_data(self, data):
    if self._in_caption:
      self.captions[-1] += data
    elif self._cell is not None:
      self._cell[1] += data


def _parse(markup):
  parser = _TableParser()
  parser.feed(markup)
  parser.close()
  return parser


def test_html_repr_matches_the_rows(rich):
  _, _, p = rich
  parsed = _parse(p._repr_html_())
  assert parsed.tables == 1
  assert parsed.captions == [p.summary()]
  header, *body = parsed.rows
  assert [(tag, text) for tag, text, _ in header[1]] == [("th", c) for c in COLUMNS]
  assert len(body) == len(p.leaves)
  for (cls, cells), row in zip(body, p.leaves, strict=True):
    assert cls == row.action
    assert [tag for tag, _, _ in cells] == ["td"] * len(COLUMNS)
    assert [text for _, text, _ in cells] == _expected_cells(row)
  assert "float32-&gt;bfloat16" in p._repr_html_()


def test_html_repr_groups_long_tables(scoped_ckpt):
  p = fws.plan(_scoped("abcde"), fws.WarmStartSettings(scoped_ckpt, vars_to_warm_start=["a/", "b/", "c/w[0-4]$"]))
  parsed = _parse(p._repr_html_())
  assert parsed.tables == 1
  assert parsed.captions == [p.summary()]
  header, *body = parsed.rows
  assert [text for _, text, _ in header[1]] == list(COLUMNS)
  assert len(body) == len(p.leaves) + 5
  scope_rows = [cells for cls, cells in body if cls == "scope"]
  assert [[(tag, text, attrs.get("colspan")) for tag, text, attrs in cells] for cells in scope_rows] == [
    [("th", "a: 10 leaves, 10 load", str(len(COLUMNS)))],
    [("th", "b: 10 leaves, 10 load", str(len(COLUMNS)))],
    [("th", "c: 10 leaves, 5 load, 5 keep", str(len(COLUMNS)))],
    [("th", "d: 10 leaves, 10 keep", str(len(COLUMNS)))],
    [("th", "e: 10 leaves, 10 keep", str(len(COLUMNS)))],
  ]
  leaf_rows = [(cls, cells) for cls, cells in body if cls != "scope"]
  for (cls, cells), row in zip(leaf_rows, p.leaves, strict=True):
    assert cls == row.action
    assert [text for _, text, _ in cells] == _expected_cells(row)
  # A scope row comes right before its first leaf.
  assert body[0][0] == "scope" and body[11][0] == "scope"


def test_html_escapes_names(tmp_path):
  path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones((2,))})
  state = {"w": jnp.zeros((2,)), "a<b": jnp.zeros((3,)), "x&y": {"'q'": jnp.zeros((1,))}}
  p = fws.plan(state, fws.WarmStartSettings(path, vars_to_warm_start="w"))
  markup = p._repr_html_()
  assert "a&lt;b" in markup and "<td>a<b" not in markup
  assert "x&amp;y" in markup
  assert html.escape("x&y/'q'") in markup
  parsed = _parse(markup)
  assert parsed.tables == 1
  names = [cells[0][1] for _, cells in parsed.rows[1:]]
  assert sorted(names) == sorted(row.name for row in p.leaves)
  assert "a<b" in names and "x&y/'q'" in names
  for (_, cells), row in zip(parsed.rows[1:], p.leaves, strict=True):
    assert [text for _, text, _ in cells] == _expected_cells(row)


# --------------------------------------------------------------------------------------------------
# 4. to_dict / to_json.


def test_to_dict_and_to_json(rich, rich_root):
  _, settings, p = rich
  d = p.to_dict()
  assert json.loads(p.to_json()) == d
  assert json.loads(p.to_json(indent=None)) == d
  assert "\n" not in p.to_json(indent=None)
  assert set(d) == {"summary", "checkpoints", "sources", "bytes", "leaves", "unused", "warnings"}
  assert d["summary"] == p.summary()
  (ckpt,) = d["checkpoints"]
  assert ckpt["location"] == rich_root
  assert ckpt["step"] == OLD_STEP
  assert ckpt["path"] == str(p.checkpoints[0].path)
  assert ckpt["path"].startswith(os.path.join(os.path.abspath(rich_root), str(OLD_STEP)))
  assert d["sources"] == [settings.to_dict()]
  assert d["bytes"] == p.nbytes
  assert d["unused"] == p.unused_tensors()
  assert [leaf["name"] for leaf in d["leaves"]] == [row.name for row in p.leaves]
  for leaf, row in zip(d["leaves"], p.leaves, strict=True):
    assert leaf["action"] == row.action
    assert leaf["reason"] == row.reason
    assert leaf["source"] == row.source
    assert leaf["shape"] == list(row.shape)
    assert leaf["dtype"] == str(row.dtype)
    assert leaf["cast"] == row.cast
    assert leaf["sharding"] == row.sharding
    assert leaf["bytes"] == row.nbytes
    assert leaf["checkpoint"] == (0 if row.action == "load" else None)
    assert ("vocab" in leaf) == (row.remap is not None)
  enc = next(leaf for leaf in d["leaves"] if leaf["name"] == "enc/kernel")
  assert enc["source_dtype"] == "float32" and enc["dtype"] == "bfloat16" and enc["cast"] is True
  assert enc["source_shape"] == [8, 4]
  keep = next(leaf for leaf in d["leaves"] if leaf["name"] == "fresh/w")
  assert keep["source_shape"] is None and keep["source_dtype"] is None and keep["bytes"] == 0


def test_to_dict_of_several_sources(tmp_path, mlp_root, old_mlp):
  other = save_checkpoint(tmp_path / "other", make_state(MLP(), optax.adam(1e-2), seed=4))
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  sources = [fws.WarmStartSettings(mlp_root, "encoder"), fws.WarmStartSettings(other, "head")]
  p = fws.plan(new, sources)
  d = p.to_dict()
  assert json.loads(p.to_json()) == d
  assert [c["location"] for c in d["checkpoints"]] == [mlp_root, other]
  assert [c["step"] for c in d["checkpoints"]] == [OLD_STEP, None]
  assert d["sources"] == [s.to_dict() for s in sources]
  by_name = {leaf["name"]: leaf for leaf in d["leaves"]}
  assert by_name["encoder/kernel"]["checkpoint"] == 0
  assert by_name["head/kernel"]["checkpoint"] == 1
  assert by_name["step"]["checkpoint"] is None
  assert p.summary().startswith(f"4 of 14 leaves from {mlp_root}@step {OLD_STEP} and {other},")
  assert set(d["unused"]) == {f"{mlp_root}@step {OLD_STEP}", other}
  assert "head/kernel" in d["unused"][f"{mlp_root}@step {OLD_STEP}"]
  assert "encoder/kernel" in d["unused"][other]


def test_to_dict_of_assignment_maps(mlp_root):
  new = {"backbone": {"encoder": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}}, "head": {"w": jnp.zeros(2)}}
  p = fws.plan_init_from_checkpoint(new, mlp_root, {"encoder/": "backbone/encoder/"})
  d = p.to_dict()
  assert json.loads(p.to_json()) == d
  assert d["sources"] == [{"assignment_map": {"encoder/": "backbone/encoder/"}}]
  assert d["checkpoints"][0]["step"] == OLD_STEP
  rows = {leaf["name"]: leaf for leaf in d["leaves"]}
  assert rows["backbone/encoder/kernel"]["action"] == "load"
  assert rows["backbone/encoder/kernel"]["source"] == "encoder/kernel"
  assert rows["head/w"]["action"] == "keep"
  pairs = [("encoder/kernel", "backbone/encoder/kernel"), ("encoder/bias", "backbone/encoder/bias")]
  p2 = fws.plan_init_from_checkpoint(new, mlp_root, pairs)
  d2 = p2.to_dict()
  assert json.loads(p2.to_json()) == d2
  assert d2["sources"] == [{"assignment_map": [list(pair) for pair in pairs]}]


# --------------------------------------------------------------------------------------------------
# 5. A plan reads no array data.


def test_plan_reads_no_arrays(no_reads, tmp_path, mlp_root, rich_root, mesh):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  renamed = make_state(MLP(encoder_name="enc"), optax.adam(1e-2), seed=1, steps=0)
  other = tmp_path / "other"
  with ocp.StandardCheckpointer() as ckptr:  # written before any read is attempted
    ckptr.save(os.fspath(other), make_state(MLP(), optax.adam(1e-2), seed=4))
  plans = {
    "selection": fws.plan(new, fws.WarmStartSettings(mlp_root, [".*encoder.*"], step="load")),
    "rename rules": fws.plan(renamed, fws.WarmStartSettings(mlp_root, rename_rules=[(r"enc/(.*)", r"encoder/\1")])),
    "vocab": fws.plan(_rich_new(mesh), _rich_settings(rich_root)),
    "sources": fws.plan(
      new, [fws.WarmStartSettings(mlp_root, "encoder"), fws.WarmStartSettings(os.fspath(other), "head")]
    ),
    "assignment": fws.plan_init_from_checkpoint(new, mlp_root, {"encoder/": "encoder/"}),
  }
  assert {leaf.name for leaf in plans["selection"].loaded} >= {"encoder/kernel", "encoder/kernel/opt_state/0/mu"}
  assert {leaf.source for leaf in plans["rename rules"].loaded} == {
    "encoder/kernel",
    "encoder/bias",
    "head/kernel",
    "head/bias",
  }
  assert len(plans["sources"].checkpoints) == 2
  assert plans["vocab"].leaves and any(leaf.remap is not None for leaf in plans["vocab"].leaves)
  for what, p in plans.items():
    assert p.nbytes > 0, what
    str(p), p._repr_html_(), p.to_json()  # showing a plan reads nothing either
  # Only executing reads, and the reads are what is blocked.
  with pytest.raises(AssertionError, match="array was read"):
    fws.warm_start(new, plan=plans["selection"])


# --------------------------------------------------------------------------------------------------
# 6. warm_start(state, plan=...) executes exactly the plan.


def test_warm_start_with_plan_equals_execute(mlp_root, old_mlp):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  p = fws.plan(new, fws.WarmStartSettings(mlp_root, ["encoder/"], step="load"))
  out = fws.warm_start(new, plan=p)
  assert_trees_equal(out, fws.execute(p, new))
  assert_trees_equal(out.params["encoder"], old_mlp.params["encoder"])
  assert_trees_equal(out.params["head"], new.params["head"])
  assert out.step == old_mlp.step


def test_warm_start_plan_excludes_a_checkpoint(mlp_root):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  p = fws.plan(new, mlp_root)
  with pytest.raises(fws.WarmStartError, match="not both"):
    fws.warm_start(new, mlp_root, plan=p)
  with pytest.raises(fws.WarmStartError, match="not both"):
    fws.warm_start(new, fws.WarmStartSettings(mlp_root), plan=p)
  with pytest.raises(fws.WarmStartError, match="not both"):
    fws.warm_start(new, settings=fws.WarmStartSettings(mlp_root), plan=p)


def test_warm_start_plan_of_another_state(mlp_root):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  p = fws.plan(new, mlp_root)
  with pytest.raises(fws.WarmStartError, match="other variables"):
    fws.warm_start(new.params, plan=p)
  renamed = make_state(MLP(encoder_name="enc"), optax.adam(1e-2), seed=1, steps=0)
  with pytest.raises(fws.WarmStartError, match="other variables"):
    fws.warm_start(renamed, plan=p)


def test_warm_start_plan_of_a_state_with_other_shapes(mlp_root):
  """Same names, other shapes: the plan no longer describes the state, which must be said before reading."""
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  p = fws.plan(new, mlp_root)
  wider = make_state(MLP(features=8), optax.adam(1e-2), seed=1, steps=0)
  assert fws.variable_names(wider) == fws.variable_names(new)
  with pytest.raises(fws.WarmStartError):
    fws.warm_start(wider, plan=p)


# --------------------------------------------------------------------------------------------------
# 7. Provenance through real Orbax checkpoints.


def _check_record(record, settings, p):
  assert set(record) == {"format", "library_version", "created", "checkpoints", "settings", "leaves"}
  assert record["format"] == fws.PROVENANCE_KEY + "/1"
  assert record["library_version"] == fws.__version__
  created = datetime.datetime.fromisoformat(record["created"])
  assert created.tzinfo is not None
  assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 600
  assert record["checkpoints"] == p.to_dict()["checkpoints"]
  assert record["checkpoints"][0]["step"] == OLD_STEP
  assert record["settings"] == [settings.to_dict()]
  assert list(record["leaves"]) == [row.name for row in p.leaves]
  for row in p.leaves:
    entry = record["leaves"][row.name]
    assert entry["action"] == row.action
    assert entry.get("source") == row.source
    assert entry.get("checkpoint") == (0 if row.source is not None else None)
  json.dumps(record)


def test_provenance_round_trip_through_custom_metadata(tmp_path, mlp_root, old_mlp):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  settings = fws.WarmStartSettings(mlp_root, optimizer_state="reset", step="load")
  p = fws.plan(new, settings)
  state = fws.warm_start(new, plan=p)
  record = p.provenance()
  _check_record(record, settings, p)
  assert record["leaves"]["encoder/kernel"] == {"action": "load", "source": "encoder/kernel", "checkpoint": 0}
  assert record["leaves"]["opt_state/0/count"] == {"action": "reset"}
  assert record["leaves"]["step"] == {"action": "load", "source": "step", "checkpoint": 0}

  run_dir = os.fspath(tmp_path / "run")
  step = int(state.step)
  with ocp.CheckpointManager(run_dir) as mgr:
    mgr.save(step, args=ocp.args.StandardSave(state), custom_metadata={fws.PROVENANCE_KEY: record})
  expected = json.loads(json.dumps(record))
  assert fws.load_provenance(run_dir) == expected
  assert fws.load_provenance(os.path.join(run_dir, str(step))) == expected

  # Resume: the run's own checkpoint wins; the loaded record is saved again with the next step.
  fresh = make_state(MLP(), optax.adam(1e-2), seed=3, steps=0)
  resumed = fws.warm_start_or_resume(fresh, run_dir, mlp_root)
  assert_trees_equal(resumed.params, state.params)
  assert_trees_equal(resumed.opt_state, state.opt_state)
  assert resumed.step == state.step
  loaded = fws.load_provenance(run_dir)
  with ocp.CheckpointManager(run_dir) as mgr:
    mgr.save(step + 1, args=ocp.args.StandardSave(resumed), custom_metadata={fws.PROVENANCE_KEY: loaded})
  assert fws.load_provenance(run_dir) == expected
  assert fws.load_provenance(os.path.join(run_dir, str(step + 1))) == expected
  assert fws.load_provenance(os.path.join(run_dir, str(step))) == expected


def test_provenance_round_trip_as_a_json_item(tmp_path, mlp_root):
  new = make_state(MLP(), optax.adam(1e-2), seed=1, steps=0)
  settings = fws.WarmStartSettings(mlp_root, ["encoder/"])
  p = fws.plan(new, settings)
  state = fws.warm_start(new, plan=p)
  record = p.provenance()
  _check_record(record, settings, p)
  run_dir = os.fspath(tmp_path / "run")
  with ocp.CheckpointManager(run_dir, item_names=("state", fws.PROVENANCE_KEY)) as mgr:
    mgr.save(
      3,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), **{fws.PROVENANCE_KEY: ocp.args.JsonSave(record)}),
    )
  expected = json.loads(json.dumps(record))
  assert fws.load_provenance(run_dir) == expected
  assert fws.load_provenance(os.path.join(run_dir, "3")) == expected
  assert fws.load_provenance(os.path.join(run_dir, "3", "state")) == expected

  # Resume from the composite run, then save the record again as an item.
  resumed = fws.warm_start_or_resume(make_state(MLP(), optax.adam(1e-2), seed=3, steps=0), run_dir, mlp_root)
  assert_trees_equal(resumed.params, state.params)
  loaded = fws.load_provenance(run_dir)
  with ocp.CheckpointManager(run_dir, item_names=("state", fws.PROVENANCE_KEY)) as mgr:
    mgr.save(
      4,
      args=ocp.args.Composite(state=ocp.args.StandardSave(resumed), **{fws.PROVENANCE_KEY: ocp.args.JsonSave(loaded)}),
    )
  assert fws.load_provenance(run_dir) == expected
  assert fws.load_provenance(os.path.join(run_dir, "4")) == expected


def test_provenance_missing(tmp_path):
  root = save_manager_step(tmp_path / "plain", 1, {"w": jnp.ones(2)})
  with pytest.raises(fws.WarmStartError, match="custom_metadata"):
    fws.load_provenance(root)
  with pytest.raises(fws.WarmStartError, match="custom_metadata"):
    fws.load_provenance(os.path.join(root, "1"))
  other = save_manager_step(tmp_path / "other_meta", 2, {"w": jnp.ones(2)})
  with ocp.CheckpointManager(other) as mgr:
    mgr.save(3, args=ocp.args.StandardSave({"w": jnp.ones(2)}), custom_metadata={"something": "else"})
  with pytest.raises(fws.WarmStartError, match="custom_metadata"):
    fws.load_provenance(other)


def test_provenance_of_an_assignment_plan(mlp_root):
  new = {"encoder": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}, "extra": jnp.zeros(1)}
  p = fws.plan_init_from_checkpoint(new, mlp_root, {"encoder/": "encoder/"})
  record = p.provenance()
  assert record["settings"] == [{"assignment_map": {"encoder/": "encoder/"}}]
  assert record["leaves"]["extra"] == {"action": "keep"}
  assert record["leaves"]["encoder/kernel"] == {"action": "load", "source": "encoder/kernel", "checkpoint": 0}
  assert json.loads(json.dumps(record)) == record


def test_provenance_records_vocab(rich):
  _, _, p = rich
  record = p.provenance()
  assert record["leaves"]["emb"]["action"] == "load"
  assert record["leaves"]["emb"]["vocab"]["copied"] == 2
  assert record["leaves"]["emb"]["vocab"]["new"] == 2
  assert record["leaves"]["emb"]["vocab"]["oov"] == 1
  assert record["leaves"]["head/bias"] == {"action": "keep"}
  assert record["leaves"]["step"] == {"action": "reset"}
  assert json.loads(json.dumps(record)) == record
