"""The library's INFO log is seen with ordinary logging configuration (`flax_warmstart/_src/logs.py`).

Importing Orbax makes absl call `logging.basicConfig()` (its type handlers log
through `absl.logging.vlog` at import time), after which a program's own
`logging.basicConfig(level=logging.INFO)` does nothing. The library imports
Orbax with the root logger left alone; these tests pin the cause, the guard, and
the whole story in a fresh process with a real warm start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import absl.logging

from flax_warmstart._src import logs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def bare_root():
  """The root logger with no handlers, as in a fresh program, for the block (pytest's own are back after)."""
  root = logging.getLogger()
  saved = root.handlers[:], root.level
  root.handlers[:] = []
  try:
    yield root
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_absl_configures_a_bare_root_logger():
  """The cause: one absl log call, at any level, gives a bare root logger a handler (so basicConfig is a no-op)."""
  with bare_root() as root:
    absl.logging.vlog(1, "below every level: not shown, yet the root logger is configured")
    assert len(root.handlers) == 1
    logging.basicConfig(level=logging.INFO)
    assert root.level == logging.WARNING, "basicConfig was not a no-op: absl's behaviour changed"


def test_guard_leaves_a_bare_root_logger_bare():
  with bare_root() as root:
    with logs.root_logger_left_alone():
      absl.logging.vlog(1, "absl finds a handler and calls no basicConfig")
      assert len(root.handlers) == 1  # the stand-in
    assert root.handlers == []
    logging.basicConfig(level=logging.INFO)  # now the program's own call works
    assert root.level == logging.INFO and len(root.handlers) == 1


def test_guard_behaves_as_no_handler(capsys):
  """While the stand-in is there, records go where they would go with no handler: WARNING and up to stderr."""
  with bare_root(), logs.root_logger_left_alone():
    logging.getLogger("someone").warning("a warning during the import")
    logging.getLogger("someone").info("an info during the import")
  captured = capsys.readouterr()
  assert captured.err == "a warning during the import\n"  # logging.lastResort's format: the message alone
  assert captured.out == ""


def test_guard_leaves_a_configured_root_logger_alone():
  root = logging.getLogger()
  handler = logging.NullHandler()
  root.addHandler(handler)
  try:
    before = root.handlers[:]
    with logs.root_logger_left_alone():
      assert root.handlers == before  # no stand-in added
    assert root.handlers == before
  finally:
    root.removeHandler(handler)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh Python with this checkout first on the path; stderr is where logging writes."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env, timeout=300
  )


def test_basic_config_after_importing_orbax_shows_what_was_loaded(tmp_path):
  """A fresh program: import the library (and Orbax), `basicConfig(level=INFO)`, warm-start: the INFO lines show."""
  proc = _python(
    """
    import logging, sys

    import flax_warmstart as fws
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    assert logging.getLogger().handlers == [], logging.getLogger().handlers  # importing configured nothing
    logging.basicConfig(level=logging.INFO)

    ckpt = sys.argv[1]
    old = {"embed": np.arange(8, dtype=np.float32).reshape(4, 2), "dense": np.ones((2, 3), np.float32)}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(ckpt, old)
    new = {"embed": jnp.zeros((5, 2), jnp.bfloat16), "dense": jnp.zeros((2, 3), jnp.bfloat16)}
    info = fws.VocabInfo(["a", "b", "new", "c", "d"], new_vocab_size=5, num_oov_buckets=0, old_vocab=["a", "b", "c", "d"])
    fws.warm_start(new, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={"embed": info}))
    """,
    str(tmp_path / "ckpt"),
  )
  assert proc.returncode == 0, proc.stderr
  ours = [line for line in proc.stderr.splitlines() if line.startswith("INFO:flax_warmstart:")]
  assert any(
    line.startswith(f"INFO:flax_warmstart:Warm-started 2 of 2 leaves from {tmp_path / 'ckpt'}") for line in ours
  ), proc.stderr
  assert any(line.startswith("INFO:flax_warmstart:Remapped vocabulary of 'embed'") for line in ours), proc.stderr
  assert any(line.startswith("INFO:flax_warmstart:Cast 2 leaves to the state's dtype") for line in ours), proc.stderr
