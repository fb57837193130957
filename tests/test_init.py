"""The public API: every exported name imports and is documented with an example."""

import inspect

import flax_warmstart as fws


def test_all_names_import():
  for name in fws.__all__:
    assert getattr(fws, name) is not None, name
  assert fws.__version__


def test_public_names_have_docstrings_with_examples():
  for name in fws.__all__:
    if not callable(getattr(fws, name)):  # constants such as PROVENANCE_KEY
      continue
    doc = inspect.getdoc(getattr(fws, name)) or ""
    assert "Examples:" in doc, f"{name} has no example in its docstring"
    obj = getattr(fws, name)
    if inspect.isfunction(obj):
      assert "Args:" in doc and "Returns:" in doc and "Examples:" in doc, name


def test_every_reexport_is_in_all():
  import re
  from pathlib import Path

  source = Path(fws.__file__).read_text()
  assert sorted(re.findall(r"import (\w+) as \1", source)) == sorted(fws.__all__)
