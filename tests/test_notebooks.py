"""The notebooks in notebooks/: executed top to bottom, stored clean, in sync with their jupytext twins.

Executing needs nbclient, nbformat, ipykernel and matplotlib, the sync check
jupytext; without them those tests are skipped. Executing is marked `slow`
(`python -m pytest -m slow` runs it, as `.ci/run` does); the checks of the
stored files run by default.

The first code cell installs the package where the kernel cannot import it:
from the clone the notebook is in (`pip install -e` of the repository root),
else from the `SOURCE` the user sets in the cell, else it says what to do;
all three paths run here, with `%pip` recorded instead of run.

Each `notebooks/NAME.ipynb` is paired with `notebooks/NAME.py` (jupytext percent
format). After editing either, run `jupytext --sync notebooks/NAME.ipynb` and
clear the outputs (`jupyter nbconvert --clear-output --inplace` or your
editor's "Clear All Outputs") before committing.
"""

import json
import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"quickstart", "vocabulary_extension"}

# The Jupyter machinery, not our code, announces its own migrations (e.g.
# jupyter_core's move to platformdirs); keep them from failing the run.
pytestmark = [
  pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_client.*"),
  pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_core.*"),
  pytest.mark.filterwarnings("ignore::DeprecationWarning:nbclient.*"),
  pytest.mark.filterwarnings("ignore::DeprecationWarning:zmq.*"),
]


def _ids(paths):
  return [p.stem for p in paths]


def _read_json(path: pathlib.Path) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _source(cell: dict) -> str:
  source = cell["source"]
  return source if isinstance(source, str) else "".join(source)


def test_the_notebooks_are_there():
  assert EXPECTED <= {p.stem for p in NOTEBOOKS}
  for path in NOTEBOOKS:
    assert path.with_suffix(".py").is_file(), f"{path.name} has no jupytext twin {path.with_suffix('.py').name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_stored_without_outputs(path):
  nb = _read_json(path)
  dirty = [
    i
    for i, cell in enumerate(nb["cells"])
    if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
  ]
  assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear all outputs"
  assert nb["metadata"].get("jupytext", {}).get("formats") == "ipynb,py:percent", (
    f"{path.name} is not paired: jupytext --set-formats ipynb,py:percent {path.name}"
  )


def _install_cell(path: pathlib.Path) -> str:
  """The first code cell: it installs flax_warmstart where the kernel cannot import it."""
  code = [_source(c) for c in _read_json(path)["cells"] if c["cell_type"] == "code"]
  assert not any("pip install" in src for src in code[1:]), f"{path.name}: only the first code cell installs"
  return code[0]


def _run_install_cell(cell: str, cwd: pathlib.Path, monkeypatch, source: str | None = None) -> list[str]:
  """Runs the cell as IPython would, in `cwd`, with flax_warmstart not importable; returns the `%pip` args run.

  Each `%pip install ARGS` becomes a call that records ARGS (with IPython's `{expr}` expansion) and makes the
  package importable again, as the install would.
  """
  import flax_warmstart  # noqa: PLC0415 (what the pretended install makes importable)

  ran = []

  def pip(args: str) -> None:
    ran.append(args)
    monkeypatch.setitem(sys.modules, "flax_warmstart", flax_warmstart)

  code = re.sub(r"^( *)%pip install (.*)$", lambda m: f"{m[1]}_pip(f{m[2]!r})", cell, flags=re.M)
  if source is not None:
    code = code.replace("SOURCE = None", f"SOURCE = {source!r}", 1)
  monkeypatch.setitem(sys.modules, "flax_warmstart", None)  # `import flax_warmstart` raises ImportError
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  namespace = {"_pip": pip}
  exec(compile(code, "<install cell>", "exec"), namespace)
  assert namespace["fws"] is flax_warmstart
  return ran


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_installs_only_where_the_package_is_missing(path):
  cell = _install_cell(path)
  assert re.search(r"^try:\n  import flax_warmstart as fws\nexcept ImportError:\n  SOURCE = None\n", cell, re.M), cell
  pip = [line for line in cell.splitlines() if "%pip install" in line]
  # Real magics in the .ipynb (jupytext comments them out in the .py twin), inside the except branch.
  assert len(pip) == 2 and all(line.startswith("    %pip install ") for line in pip), cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_in_a_clone_installs_the_clone(path, monkeypatch):
  ran = _run_install_cell(_install_cell(path), NOTEBOOK_DIR, monkeypatch)
  assert ran == [f'-q -e "{ROOT}"']  # `pip install -e ..` from notebooks/
  assert sys.path[0] == str(ROOT)  # and this kernel imports the clone at once


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_elsewhere_installs_source(path, monkeypatch, tmp_path):
  ran = _run_install_cell(_install_cell(path), tmp_path, monkeypatch, source="/content/flax_warmstart")
  assert ran == ['-q "/content/flax_warmstart"']


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_elsewhere_says_what_to_do(path, monkeypatch, tmp_path):
  with pytest.raises(ImportError, match="not on PyPI") as err:
    _run_install_cell(_install_cell(path), tmp_path, monkeypatch)
  message = " ".join(str(err.value).split())
  assert str(tmp_path) in message and "set SOURCE in this cell" in message and "pip install -e" in message


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_jupytext_twin_in_sync(path):
  jupytext = pytest.importorskip("jupytext")
  nb = _read_json(path)
  twin = jupytext.read(path.with_suffix(".py"), fmt="py:percent")
  cells = [(c["cell_type"], _source(c)) for c in nb["cells"]]
  twin_cells = [(c.cell_type, c.source) for c in twin.cells]
  assert twin_cells == cells, f"{path.name} and its .py twin differ: run jupytext --sync {path.name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_executes_top_to_bottom(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")  # The kernel runs this Python: the notebooks plot with it.
  # The kernel imports this checkout's flax_warmstart, whatever is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
  client.execute()  # Raises CellExecutionError, with the cell and its traceback, on the first error.
  errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
  assert not errors
  assert list(tmp_path.iterdir()) == [], "the notebook left files in its working directory"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_linked_from_the_readmes(path):
  """README.md links each notebook on a line of its own (with what it shows), and so does notebooks/README.md."""
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert re.search(rf"^- \[`{re.escape(path.name)}`\]\(notebooks/{re.escape(path.name)}\): \S", readme, re.M), (
    f"README.md has no line `- [`{path.name}`](notebooks/{path.name}): what it shows` (in its notebook list)"
  )
  assert f"]({path.name})" in (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8"), (
    f"notebooks/README.md does not link {path.name} in its table"
  )
