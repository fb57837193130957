"""Issue 13, kinds 4 and 7: vocabulary files that TensorFlow reads but are most likely mistakes.

TensorFlow 2.21 reads vocabularies with `TextFileLineIterator` over
`InputBuffer::ReadLine` (tensorflow/core/kernels/lookup_util.cc,
third_party/xla/xla/tsl/lib/io/inputbuffer.cc): it splits on `\\n`, drops one
`\\r` before it, and keeps every other byte. So a UTF-8 byte-order mark stays
part of the first token, and a CR-only file is one line. The results here are
TensorFlow's; what looks wrong is a WARNING, logged on the `flax_warmstart`
logger when the mapping is built and kept in `VocabMapping.warnings`.

`GenerateVocabRemapping` needs only `min(rows, new_vocab_size)` new lines
(`new_vocab_offset + num_new_vocab <= lines`), so a `new_vocab_size` larger
than the file is an error only when the variable has more rows than the file
has lines (TF's E-15); otherwise TensorFlow's result and a warning.
"""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_checkpoint

import flax_warmstart as fws
from flax_warmstart._src.vocab import build_mapping, plan_remap, read_vocab

OLDV = ["apple", "banana", "guava", "orange"]
NEWV = ["orange", "guava", "banana", "apple", "raspberry"]
WS5_INDEX = [3, 2, 1, 0, -1]  # TF's WS-5: [[2.], [1.5], [1.], [0.5], [0.]]


def write(path, data):
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return str(path)


def remap(info, rows=5, old_rows=4, axis=0):
  """`plan_remap` of a `[rows, 1]` variable (or `[1, rows]` for axis 1) from an `[old_rows, 1]` tensor."""
  shape, old_shape = ((rows, 1), (old_rows, 1)) if axis == 0 else ((1, rows), (1, old_rows))
  return plan_remap("w", "w", shape, old_shape, info)


def warned(caplog):
  return [r.getMessage() for r in caplog.records if r.name == "flax_warmstart" and r.levelno == logging.WARNING]


@pytest.fixture
def old_file(tmp_path):
  return write(tmp_path / "old.txt", "\n".join(OLDV))


# --------------------------------------------------------------------------- kind 7: silent no-ops


def test_bom_in_new_vocab_keeps_tfs_result_and_warns(tmp_path, old_file, caplog):
  new = write(tmp_path / "new.txt", "\ufeff" + "\n".join(NEWV))
  result, problems = remap(fws.VocabInfo(new, 5, 0, old_file))
  assert problems == []
  assert result.mapping.index.tolist() == [-1, *WS5_INDEX[1:]]  # '\ufefforange' is a new token, as in TF
  (warning,) = result.mapping.warnings
  assert "'w'" in warning and new in warning and "byte-order mark" in warning and "'\\ufefforange'" in warning
  assert warned(caplog) == [warning]


def test_bom_in_old_vocab_keeps_tfs_result_and_warns(tmp_path, caplog):
  new = write(tmp_path / "new.txt", "\n".join(NEWV))
  old = write(tmp_path / "old.txt", "\ufeff" + "\n".join(OLDV) + "\n")
  result, _ = remap(fws.VocabInfo(new, 5, 0, old))
  assert result.mapping.index.tolist() == [3, 2, 1, -1, -1]  # apple's row is unreachable
  assert any("old vocabulary" in w and old in w and "BOM" in w for w in result.mapping.warnings)
  assert warned(caplog) == list(result.mapping.warnings)


def test_bom_in_a_token_list_warns_too():
  result, _ = remap(fws.VocabInfo(NEWV, 5, 0, ["\ufeffapple", *OLDV[1:]]))
  assert result.mapping.index.tolist() == [3, 2, 1, -1, -1]
  assert any("<4 in-memory tokens>" in w and "BOM" in w for w in result.mapping.warnings)


def test_cr_only_old_vocab_is_one_line_as_in_tf(tmp_path, caplog):
  new = write(tmp_path / "new.txt", "\n".join(NEWV))
  old = write(tmp_path / "old.txt", "\r".join(OLDV) + "\r")
  assert read_vocab(old) == ["apple\rbanana\rguava\rorange"]  # one line; its final \r is dropped
  result, problems = remap(fws.VocabInfo(new, 5, 0, old))
  assert problems == []
  assert result.mapping.index.tolist() == [-1] * 5
  cr, nothing = result.mapping.warnings
  assert old in cr and "CR-only" in cr and "the whole file is one line" in cr and "line 1" in cr
  assert "none of the 5 new vocabulary tokens" in nothing and "no row is copied" in nothing
  assert warned(caplog) == [cr, nothing]


def test_cr_only_new_vocab_fails_as_in_tf_with_a_hint(tmp_path, old_file):
  new = write(tmp_path / "new.txt", "\r".join(NEWV))
  result, problems = remap(fws.VocabInfo(new, 5, 0, old_file))
  assert result is None
  (problem,) = problems
  assert new in problem and "has 1 lines but 5 vocabulary rows" in problem and "CR-only" in problem


def test_cr_only_old_vocab_with_old_vocab_size_gets_the_hint(tmp_path):
  old = write(tmp_path / "old.txt", "\r".join(OLDV))
  _, problems = remap(fws.VocabInfo(NEWV, 5, 0, old, old_vocab_size=2))
  assert any("expected 2 lines" in p and "CR-only" in p for p in problems), problems


def test_stray_cr_inside_a_line_is_named(tmp_path, old_file):
  new = write(tmp_path / "new.txt", "orange\r\nguava\r\nban\rana\r\napple\r\nraspberry\r\n")
  result, _ = remap(fws.VocabInfo(new, 5, 0, old_file))
  assert result.mapping.index.tolist() == [3, 2, -1, 0, -1]
  (warning,) = result.mapping.warnings
  assert "line 3" in warning and "'ban\\rana'" in warning and "it has 5 lines" in warning


def test_crlf_and_final_newlines_are_quiet(tmp_path, caplog):
  new = write(tmp_path / "new.txt", "\r\n".join(NEWV) + "\r\n")
  old = write(tmp_path / "old.txt", "\r\n".join(OLDV) + "\r\n")
  result, _ = remap(fws.VocabInfo(new, 5, 0, old))
  assert result.mapping.index.tolist() == WS5_INDEX
  assert result.mapping.warnings == ()
  assert warned(caplog) == []


def test_vocabulary_that_matches_no_old_token_warns(caplog):
  result, _ = remap(fws.VocabInfo(["x", "y", "z", "q", "r"], 5, 0, OLDV))
  assert result.mapping.index.tolist() == [-1] * 5
  (warning,) = result.mapping.warnings
  assert "'w'" in warning and "none of the 5 new vocabulary tokens" in warning and "<4 in-memory tokens>" in warning
  assert warned(caplog) == [warning]


def test_old_vocab_size_window_that_matches_nothing_warns():
  result, _ = remap(fws.VocabInfo(["guava", "orange"], 2, 0, OLDV, old_vocab_size=2), rows=2)
  assert result.mapping.index.tolist() == [-1, -1]
  assert any("2 tokens considered" in w for w in result.mapping.warnings)


def test_donors_or_a_partial_match_are_not_no_match():
  donated, _ = remap(fws.VocabInfo(["x", "y"], 2, 0, OLDV, donor_tokens={"x": "apple"}), rows=2)
  assert donated.mapping.index.tolist() == [0, -1] and donated.mapping.warnings == ()
  partial, _ = remap(fws.VocabInfo(["x", "apple"], 2, 0, OLDV), rows=2)
  assert partial.mapping.warnings == ()


def test_tokens_that_differ_only_by_surrounding_whitespace_warn(tmp_path):
  # TF's E-14: old "apple \nbanana\n guava\norange" -> whitespace is kept, so apple and guava are new.
  old = write(tmp_path / "old.txt", "apple \nbanana\n guava\norange")
  result, _ = remap(fws.VocabInfo(NEWV, 5, 0, old))
  assert result.mapping.index.tolist() == [3, -1, 1, -1, -1]
  (warning,) = result.mapping.warnings
  assert "2 token(s)" in warning and "'guava' ~ ' guava'" in warning and "'apple' ~ 'apple '" in warning


def test_many_mapped_tokens_stay_quiet():
  # One linear pass: no warning, and no per-token work, when nothing looks wrong.
  old = [f"t{i}" for i in range(10_000)]
  mapping = build_mapping(
    new_tokens=old[::-1], old_tokens=old, num_rows=10_000, new_vocab_size=10_000, num_oov_buckets=0, where="big"
  )
  assert mapping.warnings == () and mapping.copied == 10_000


# --------------------------------------------------------------------------- new_vocab_size beyond the file


def test_new_vocab_size_beyond_the_file_follows_tfs_rule(tmp_path, old_file, caplog):
  new = write(tmp_path / "new.txt", "\n".join(NEWV))  # 5 lines
  # Rows <= lines: TF's GenerateVocabRemapping needs only min(rows, new_vocab_size) lines, so it succeeds.
  for rows in (4, 5):
    caplog.clear()
    result, problems = remap(fws.VocabInfo(new, 8, 0, old_file), rows=rows)
    assert problems == []
    assert result.mapping.index.tolist() == WS5_INDEX[:rows]
    (warning,) = result.mapping.warnings
    assert "new_vocab_size (8)" in warning and "(5 lines)" in warning and "set new_vocab_size=5" in warning
    assert warned(caplog) == [warning]
  # Rows > lines (here with OOV buckets too): TF fails, "lookup table size must be larger than ...".
  for oov in (0, 2):
    result, problems = remap(fws.VocabInfo(new, 8, oov, old_file), rows=6)
    assert result is None
    assert any("5 lines but 6 vocabulary rows" in p for p in problems), problems


def test_new_vocab_size_beyond_the_file_with_axis_1_fails_as_in_tf(tmp_path, old_file):
  # Axis 1 remaps all new_vocab_size columns (GenerateVocabRemapping with num_new_vocab=new_vocab_size).
  new = write(tmp_path / "new.txt", "\n".join(NEWV))
  result, problems = remap(fws.VocabInfo(new, 8, 0, old_file, axis=1), rows=8, axis=1)
  assert result is None
  assert any("5 lines but 8 vocabulary rows" in p for p in problems), problems


def test_warnings_are_on_the_plan(tmp_path, caplog):
  ckpt = save_checkpoint(tmp_path / "ckpt", {"w": np.array([[0.5], [1.0], [1.5], [2.0]], np.float32)})
  new = write(tmp_path / "new.txt", "\ufeff" + "\n".join(NEWV))
  settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"w": fws.VocabInfo(new, 5, 0, OLDV)})
  plan = fws.plan({"w": jnp.zeros((5, 1))}, settings)
  (row,) = [leaf for leaf in plan.leaves if leaf.name == "w"]
  assert any("BOM" in w for w in row.remap.mapping.warnings)
  assert any("BOM" in w for w in warned(caplog))
  out = fws.execute(plan, {"w": jnp.zeros((5, 1))})
  assert np.asarray(out["w"]).ravel().tolist() == [0.0, 1.5, 1.0, 0.5, 0.0]


# --------------------------------------------------------------------------- kind 4: paths that are not files


def test_vocabulary_paths_that_are_directories_are_errors(tmp_path):
  result, problems = remap(fws.VocabInfo(str(tmp_path), 5, 0, tmp_path))
  assert result is None
  assert len(problems) == 2, problems  # new and old, both at once
  for problem in problems:
    assert "'w'" in problem and str(tmp_path) in problem and "is a directory" in problem


def test_unreadable_vocabulary_file_is_an_error(tmp_path, monkeypatch):
  from etils import epath  # noqa: PLC0415

  path = write(tmp_path / "new.txt", "\n".join(NEWV))

  def fail(self):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(type(epath.Path(path)), "read_bytes", fail)
  with pytest.raises(fws.WarmStartError, match="Cannot read vocabulary file .*new.txt: .*Permission denied"):
    read_vocab(path)
