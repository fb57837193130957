"""Gin bindings: `import flax_warmstart.gin` registers the public API as configurables.

Needs the `gin` extra (`pip install "flax_warmstart[gin]"`). Names are stable,
under the module `flax_warmstart`, so a `.gin` file can say::

    import flax_warmstart.gin
    flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT
    flax_warmstart.WarmStartSettings.vars_to_warm_start = [".*"]
    flax_warmstart.WarmStartSettings.var_name_to_vocab_info = {"embedder/embedding": @flax_warmstart.VocabInfo()}
    flax_warmstart.VocabInfo.new_vocab = "gs://bucket/new.vocab"
    flax_warmstart.VocabInfo.backup_initializer = @flax_warmstart.initializers.normal()
    flax_warmstart.initializers.normal.stddev = 0.02

Registered: `WarmStartSettings`, `VocabInfo`, `warm_start`,
`init_from_checkpoint`, `MeanOfOldRows`, `MeanCovarianceOfOldRows`,
`t5x.state_transformation` (see `flax_warmstart.t5x`), and the
JAX initializers `flax_warmstart.initializers.{zeros, ones, constant, normal,
truncated_normal, uniform, glorot_uniform, lecun_normal}`.
"""

from __future__ import annotations

import os
from typing import Any

try:
  import gin
except ImportError as err:  # pragma: no cover - exercised without the extra
  raise ImportError(
    "flax_warmstart.gin needs gin-config: install the gin extra, pip install 'flax_warmstart[gin]'."
  ) from err

import jax

import flax_warmstart as fws
from flax_warmstart._src.errors import WarmStartError

MODULE = "flax_warmstart"


def _register() -> dict[str, Any]:
  registered = {}
  for name in (
    "WarmStartSettings",
    "VocabInfo",
    "MeanOfOldRows",
    "MeanCovarianceOfOldRows",
    "warm_start",
    "init_from_checkpoint",
  ):
    registered[name] = gin.external_configurable(getattr(fws, name), name=name, module=MODULE)
  from flax_warmstart import t5x  # noqa: PLC0415

  registered["t5x.state_transformation"] = gin.external_configurable(
    t5x.state_transformation, name="state_transformation", module=f"{MODULE}.t5x"
  )
  init = jax.nn.initializers
  for name, fn in {
    "zeros": lambda: init.zeros,
    "ones": lambda: init.ones,
    "constant": init.constant,
    "normal": init.normal,
    "truncated_normal": init.truncated_normal,
    "uniform": init.uniform,
    "glorot_uniform": init.glorot_uniform,
    "lecun_normal": init.lecun_normal,
  }.items():
    registered[name] = gin.external_configurable(fn, name=name, module=f"{MODULE}.initializers")
  return registered


def _registered() -> bool:
  """Whether the configurables exist already (a re-import, e.g. `importlib.reload`): registering twice fails."""
  try:
    gin.get_configurable(f"{MODULE}.WarmStartSettings")
  except ValueError:
    return False
  return True


if not _registered():
  _REGISTERED = _register()


def settings_from_gin(path: str | os.PathLike, ckpt_to_initialize_from: str | None = None) -> fws.WarmStartSettings:
  """Parses a `.gin` file and returns the `flax_warmstart.WarmStartSettings` it configures.

  Args:
    path: The Gin file.
    ckpt_to_initialize_from: The checkpoint, overriding the file's binding.

  Returns:
    The settings.

  Raises:
    WarmStartError: If the file is missing or invalid.

  Examples:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "ws.gin"
    >>> _ = path.write_text('flax_warmstart.WarmStartSettings.step = "reset"')
    >>> settings_from_gin(path, "/runs/old").step
    'reset'
    >>> gin.clear_config()  # bindings are global: drop them when done
  """
  if not os.path.isfile(path):
    raise WarmStartError(f"Gin file {os.fspath(path)} does not exist.")
  try:
    with gin.unlock_config():
      gin.parse_config_file(os.fspath(path), skip_unknown=False)
    configurable = gin.get_configurable(f"{MODULE}.WarmStartSettings")
    kwargs = {} if ckpt_to_initialize_from is None else {"ckpt_to_initialize_from": ckpt_to_initialize_from}
    return configurable(**kwargs)
  except (ValueError, TypeError, SyntaxError) as err:
    raise WarmStartError(f"Gin file {os.fspath(path)}: {err}") from None
