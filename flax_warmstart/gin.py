"""Gin bindings: `import flax_warmstart.gin` registers the public API as configurables.

Needs the `gin` extra (`pip install -e ".[gin]"` in a clone, or `pip install gin-config`). Names are stable,
under the module `flax_warmstart`, so a `.gin` file can say::

    import flax_warmstart.gin
    flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT
    flax_warmstart.WarmStartSettings.vars_to_warm_start = [".*"]
    flax_warmstart.WarmStartSettings.var_name_to_vocab_info = {"embedder/embedding": @flax_warmstart.VocabInfo()}
    flax_warmstart.VocabInfo.new_vocab = "gs://bucket/new.vocab"
    flax_warmstart.VocabInfo.backup_initializer = @flax_warmstart.initializers.normal()
    flax_warmstart.initializers.normal.stddev = 0.02

Registered: `WarmStartSettings`, `VocabInfo`, `warm_start`,
`init_from_checkpoint`, `MeanOfOldRows`, `MeanCovarianceOfOldRows`, the
transforms of rename rules `Take`, `Stack`, `Transpose`, `Reshape`,
`Broadcast` (scoped, one per rule: `@head/flax_warmstart.Transpose()` with
`head/flax_warmstart.Transpose.source = "wte/embedding"`),
`t5x.state_transformation` (see `flax_warmstart.t5x`), and the
JAX initializers `flax_warmstart.initializers.{zeros, ones, constant, normal,
truncated_normal, uniform, glorot_uniform, lecun_normal}`.

`settings_from_gin(files, ckpt, bindings=...)` reads settings as T5X's
launcher takes `--gin_file` and `--gin_bindings` (the command line's flags of
the same names): `%INITIAL_CHECKPOINT` and `%INITIAL_CHECKPOINT_PATH` are bound
to the checkpoint unless the config binds them, and other libraries'
configurables that are not registered (T5X's) are skipped.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

try:
  import gin
except ImportError as err:  # pragma: no cover - exercised without the extra
  from flax_warmstart._src.errors import install_extra

  raise ImportError(f"flax_warmstart.gin needs gin-config: {install_extra('gin', 'gin-config')}.") from err

import jax

import flax_warmstart as fws
from flax_warmstart._src.errors import WarmStartError

MODULE = "flax_warmstart"
logger = logging.getLogger("flax_warmstart")


# The public names registered as `flax_warmstart.<name>`.
_REGISTERED_NAMES = (
  "WarmStartSettings",
  "VocabInfo",
  "MeanOfOldRows",
  "MeanCovarianceOfOldRows",
  "warm_start",
  "init_from_checkpoint",
  # Model surgery in rename rules (rules may also hold them as dicts: {"transpose": "wte/embedding"}).
  "Take",
  "Stack",
  "Transpose",
  "Reshape",
  "Broadcast",
)


def _register() -> dict[str, Any]:
  registered = {}
  for name in _REGISTERED_NAMES:
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


MACROS = ("INITIAL_CHECKPOINT", "INITIAL_CHECKPOINT_PATH")


class _SkipOthersUnknown(set):
  """Gin's `skip_unknown` that skips the unknown configurables of other libraries (T5X's `utils.*`, ...).

  An unknown name under `flax_warmstart.`, or one close to a registered name
  (`WarmStartSetings`), is still an error: a typo must not vanish. Unknown
  imports are skipped too (a T5X config's `import t5x.utils` without T5X).
  """

  def __contains__(self, selector: object) -> bool:
    name = str(selector).rsplit("/", 1)[-1]
    ours = name.startswith(MODULE + ".") or difflib.get_close_matches(name.rsplit(".", 1)[-1], _SHORT_NAMES, cutoff=0.8)
    return not ours

  def __bool__(self) -> bool:
    return True


_SHORT_NAMES = sorted({name.rsplit(".", 1)[-1] for name in (*_REGISTERED_NAMES, "state_transformation")})


def _bind_macros(ckpt: str) -> None:
  """Binds `%INITIAL_CHECKPOINT` and `%INITIAL_CHECKPOINT_PATH` to `ckpt` where the config did not."""
  for macro in MACROS:
    try:
      given = gin.query_parameter(f"{macro}/gin.macro.value")
    except ValueError:
      gin.bind_parameter(f"{macro}/gin.macro.value", ckpt)
    else:
      if given != ckpt:
        logger.warning(
          "The Gin config binds %s = %r; WarmStartSettings reads %s as given, and the macro keeps its value.",
          macro,
          given,
          ckpt,
        )


def settings_from_gin(
  path: str | os.PathLike | Sequence[str | os.PathLike] | None,
  ckpt_to_initialize_from: str | None = None,
  *,
  bindings: Sequence[str] = (),
  search_paths: Sequence[str | os.PathLike] = (),
) -> fws.WarmStartSettings:
  """Parses Gin files and bindings and returns the `flax_warmstart.WarmStartSettings` they configure.

  As T5X's launcher takes `--gin_file` and `--gin_bindings`: the files in
  order, then the bindings. Configurables of other libraries that are not
  registered (a T5X fine-tuning config's `utils.RestoreCheckpointConfig`) are
  skipped, so such a config is read as it is; an unknown `flax_warmstart.*`
  name is an error. Bindings add to Gin's global config.

  Args:
    path: A Gin file, a list of them, or None (bindings only).
    ckpt_to_initialize_from: The checkpoint, overriding the config's
      binding; `%INITIAL_CHECKPOINT` and `%INITIAL_CHECKPOINT_PATH` are bound
      to it unless the config binds them.
    bindings: Gin bindings applied after the files, e.g.
      `'NEW_VOCAB = "/data/new.vocab"'`.
    search_paths: Directories where Gin looks up the files and their includes.

  Returns:
    The settings.

  Raises:
    WarmStartError: If a file is missing or the config is invalid.

  Examples:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "ws.gin"
    >>> _ = path.write_text('flax_warmstart.WarmStartSettings.step = "reset"')
    >>> settings_from_gin(path, "/runs/old").step
    'reset'
    >>> settings = settings_from_gin(
    ...     None, "/runs/old", bindings=["flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT"])
    >>> settings.ckpt_to_initialize_from
    '/runs/old'
    >>> gin.clear_config()  # bindings are global: drop them when done
  """
  if path is None:
    paths = []
  elif isinstance(path, (str, os.PathLike)):
    paths = [os.fspath(path)]
  else:
    paths = [os.fspath(p) for p in path]
  search_paths = [os.fspath(d) for d in search_paths]
  for directory in search_paths:
    gin.add_config_file_search_path(directory)
  missing = [p for p in paths if not any(os.path.isfile(os.path.join(d, p)) for d in ("", *search_paths))]
  if missing:
    where = f" (nor under {', '.join(search_paths)})" if search_paths else ""
    raise WarmStartError(f"Gin file {', '.join(missing)} does not exist{where}.")
  source = ", ".join(paths) or "--gin_bindings"
  try:
    with gin.unlock_config():
      for p in paths:
        gin.parse_config_file(p, skip_unknown=_SkipOthersUnknown())
      if bindings:
        try:
          gin.parse_config(list(bindings), skip_unknown=_SkipOthersUnknown())
        except Exception as err:  # noqa: BLE001 (as below)
          raise WarmStartError(f"Gin bindings {list(bindings)}: {type(err).__name__}: {err}") from None
      if ckpt_to_initialize_from is not None:
        _bind_macros(os.fspath(ckpt_to_initialize_from))
    configurable = gin.get_configurable(f"{MODULE}.WarmStartSettings")
    kwargs = {} if ckpt_to_initialize_from is None else {"ckpt_to_initialize_from": ckpt_to_initialize_from}
    return configurable(**kwargs)
  except WarmStartError:
    raise
  except Exception as err:  # noqa: BLE001 (Gin reports a bad config as many types: one message naming the file)
    raise WarmStartError(f"Gin file {source}: {type(err).__name__}: {err}{_unbound_macro_hint(err)}") from None


def _unbound_macro_hint(err: Exception) -> str:
  """For Gin's error on a macro the config uses but never binds: which binding to add."""
  found = re.search(r"configurable 'macro' .* in scope '([^']+)'", str(err))
  if not isinstance(err, TypeError) or found is None:
    return ""
  name = found.group(1)
  return (
    f"\nThe macro %{name} is used but not bound: bind it, e.g. --gin_bindings '{name} = ...' on the command line"
    f" (bindings=['{name} = ...'] in Python), or in a Gin file given after this one."
  )
