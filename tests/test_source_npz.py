"""npz files (sources/npz.py): stored members read in place, compressed ones whole, damage named."""

import pathlib

import numpy as np
import pytest

import flax_warmstart as fws
from flax_warmstart._src.sources import lazy, npz, open_source

TABLE = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
FORTRAN = np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("npz")
  arrays = {"params/embed/table": TABLE, "params/f": FORTRAN, "step": np.array(7, np.int32), "opt/count": np.array(3)}
  np.savez(root / "stored.npz", **arrays)
  np.savez_compressed(root / "compressed.npz", **arrays)
  return root


@pytest.mark.parametrize("name", ["stored.npz", "compressed.npz"])
def test_values_match_np_load(saved, name):
  path = str(saved / name)
  source = open_source(path)
  assert sorted(source.variables) == ["embed/table", "f", "opt/count", "step"]
  got = source.restore(dict.fromkeys(source.variables))
  with np.load(path) as want:
    for key in want.files:
      name_ = key.removeprefix("params/")
      np.testing.assert_array_equal(got[name_], want[key])
      assert got[name_].dtype == want[key].dtype
  kind = lazy.FileArray if name == "stored.npz" else npz.ZipMember
  assert isinstance(source.open_arrays(["embed/table"])["embed/table"], kind)


def test_stored_members_read_only_the_rows_asked_for(saved, monkeypatch):
  reads = []
  pread = lazy._pread
  monkeypatch.setattr(lazy, "_pread", lambda path, offset, out: reads.append(out.nbytes) or pread(path, offset, out))
  table = open_source(str(saved / "stored.npz")).open_arrays(["embed/table"])["embed/table"]
  np.testing.assert_array_equal(table[np.array([39, 2])], TABLE[[39, 2]])
  assert sum(reads) == 2 * 6 * 4


def test_a_zip_of_npy_files_without_the_suffix_is_recognised(saved, tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes((saved / "stored.npz").read_bytes())
  assert open_source(str(path)).format == "npz"


def test_pickled_objects_are_refused(tmp_path):
  np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(fws.WarmStartError, match="a.npy in .*obj.npz holds Python objects"):
    fws.list_variables(str(tmp_path / "obj.npz"))


@pytest.mark.parametrize("cut", [10, 200, -100])
def test_truncated_file_names_it(saved, tmp_path, cut):
  path = tmp_path / "stored.npz"
  path.write_bytes(pathlib.Path(saved / "stored.npz").read_bytes()[:cut])
  with pytest.raises(fws.WarmStartError, match=r"stored.npz is not a readable npz file"):
    fws.list_variables(str(path))
