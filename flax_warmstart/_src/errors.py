"""The error type of the library and helpers that make its messages useful."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class WarmStartError(ValueError):
  """A warm-start request that cannot be carried out as asked.

  Raised before any array is read from the checkpoint. It lists every problem
  of the request at once (one per line), each naming the variable, the
  checkpoint, what was expected and what was found, and how to fix it.

  Attributes:
    problems: One message per problem, in the order they were found.

  Examples:
    >>> err = WarmStartError(["'dense/kernel' is missing"], header="Cannot warm-start")
    >>> isinstance(err, ValueError), err.problems
    (True, ("'dense/kernel' is missing",))
  """

  def __init__(self, problems: Sequence[str] | str, *, header: str = "") -> None:
    if isinstance(problems, str):
      problems = [problems]
    self.problems = tuple(problems)
    self.header = header
    if len(self.problems) == 1 and not header:
      message = self.problems[0]
    else:
      count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
      lines = [f"{header}: {count}" if header else count]
      lines += [f"  - {p}" for p in self.problems]
      message = "\n".join(lines)
    super().__init__(message)


def closest_names(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
  """Returns up to `n` candidates that look most like `name`.

  Names with the same path below their top-level scope come first (a renamed
  scope: `backbone/kernel` -> `encoder/kernel`), then the closest by difflib,
  then names with the same last component.

  Examples:
    >>> closest_names("encoder/kernal", ["encoder/kernel", "head/b"])
    ['encoder/kernel']
    >>> closest_names("backbone/kernel", ["encoder/kernel", "head/kernel", "head/bias"])
    ['encoder/kernel', 'head/kernel']
  """
  candidates = list(candidates)
  tail = name.split("/", 1)[1] if "/" in name else None
  found = [c for c in candidates if tail is not None and "/" in c and c.split("/", 1)[1] == tail]
  found += difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
  if len(found) < n:
    leaf = name.rsplit("/", 1)[-1]
    found += [c for c in candidates if c.rsplit("/", 1)[-1] == leaf]
  return list(dict.fromkeys(found))[:n]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """A ' Closest names: ...' suffix for an error message, or ''."""
  found = closest_names(name, candidates)
  if not found:
    return ""
  return " Closest names: " + ", ".join(repr(f) for f in found) + "."


# What to check when a checkpoint that was planned from cannot be read.
DAMAGED_HINT = (
  "The checkpoint's files may be incomplete or damaged; check that the save finished (a CheckpointManager"
  " step is final once its directory has no .orbax-checkpoint-tmp suffix)."
)


def install_extra(extra: str, package: str) -> str:
  """How to install an optional package, for the messages of a missing one.

  The project is installed from a clone (it is not on PyPI), so the extra is
  named for `pip install -e`, and the package for installing it alone.

  Examples:
    >>> install_extra("gin", "gin-config")
    "pip install gin-config (the `gin` extra; in a clone of flax_warmstart: pip install -e '.[gin]')"
  """
  return f"pip install {package} (the `{extra}` extra; in a clone of flax_warmstart: pip install -e '.[{extra}]')"
