"""The notebooks in notebooks/: executed top to bottom, stored clean, in sync with their jupytext twins.

Executing needs nbclient, nbformat, ipykernel and matplotlib, the sync check
jupytext; without them those tests are skipped. Executing is marked `slow`
(`python -m pytest -m slow` runs it, as `.ci/run` does); the checks of the
stored files run by default.

Each `notebooks/NAME.ipynb` is paired with `notebooks/NAME.py` (jupytext percent
format). After editing either, run `jupytext --sync notebooks/NAME.ipynb` and
clear the outputs (`jupyter nbconvert --clear-output --inplace` or your
editor's "Clear All Outputs") before committing.
"""

import json
import os
import pathlib
import re

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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_installs_only_where_the_package_is_missing(path):
  """The first code cell is Colab's install cell: `%pip` runs only when the import fails."""
  code = [_source(c) for c in _read_json(path)["cells"] if c["cell_type"] == "code"]
  first = code[0]
  assert re.match(r"try:\n  import flax_warmstart( as fws)?\nexcept ImportError:", first), first
  pip = [line for line in first.splitlines() if "pip install" in line]
  # A real magic in the .ipynb (jupytext comments it out in the .py twin), inside the except branch.
  assert pip and all(line.startswith("  %pip install ") for line in pip), first
  assert not any("pip install" in src for src in code[1:])


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
