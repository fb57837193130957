"""Importing Orbax without configuring the user's root logger.

The library logs to the logger named "flax_warmstart" (casts, vocabulary remap
statistics, what was loaded: INFO; what TensorFlow would do silently: WARNING)
and never configures logging itself. Orbax, however, does on import:
`orbax.checkpoint` builds its type handlers at import time, their constructor
calls `absl.logging.vlog`, and absl calls `logging.basicConfig()` whenever the
root logger has no handler. The root logger then has a stderr handler and stays
at WARNING, so a program's own `logging.basicConfig(level=logging.INFO)`
afterwards does nothing, and the library's INFO lines are never shown.

`flax_warmstart._src/__init__.py` imports this module first, and it imports
Orbax with a stand-in handler on an unconfigured root logger for the duration of
the import, so that absl sees a configured root and leaves it alone. The stand-in
does what logging does when there is no handler at all (records at WARNING and
above go to `logging.lastResort`) and is removed afterwards: importing
flax_warmstart leaves the root logger as it found it. A root logger that already
has handlers (the program's own, or absl's from an earlier import of Orbax) is
not touched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _AsIfNoHandler(logging.Handler):
  """What logging does for a record that finds no handler: `logging.lastResort` for WARNING and above."""

  def emit(self, record: logging.LogRecord) -> None:
    last = logging.lastResort
    if last is not None and record.levelno >= last.level:
      last.handle(record)


@contextlib.contextmanager
def root_logger_left_alone() -> Iterator[None]:
  """Keeps an unconfigured root logger unconfigured while the body runs (absl's implicit `basicConfig()`).

  Examples:
    >>> import logging
    >>> root = logging.getLogger()
    >>> saved, root.handlers[:] = root.handlers[:], []
    >>> with root_logger_left_alone():
    ...   import absl.logging
    ...   absl.logging.log(absl.logging.DEBUG, "absl would call logging.basicConfig() here")
    >>> root.handlers
    []
    >>> root.handlers[:] = saved
  """
  root = logging.getLogger()
  if root.handlers:  # configured already (by the program, or by absl earlier): not ours to change
    yield
    return
  stand_in = _AsIfNoHandler()
  root.addHandler(stand_in)
  try:
    yield
  finally:
    root.removeHandler(stand_in)


with root_logger_left_alone():
  import orbax.checkpoint  # noqa: F401 (imported here first, so that its import configures no logging)
