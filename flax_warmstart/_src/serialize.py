"""Settings as plain data: for JSON/YAML files, the command line and provenance.

`settings_from_dict` builds `WarmStartSettings` from the kind of mapping a
JSON or YAML file (or an `ml_collections.ConfigDict`) holds;
`settings_to_dict` goes back. Backup initializers are named:

* `None` or `"zeros"`, `"ones"`, `"glorot_uniform"`, `"lecun_normal"`;
* `{"constant": 0.42}`, `{"normal": 0.02}`, `{"truncated_normal": 0.02}`,
  `{"uniform": 0.1}`;
* `"mean_of_old_rows"`, `{"mean_covariance_of_old_rows": 1e-9}`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from flax_warmstart._src import surgery
from flax_warmstart._src.errors import WarmStartError, did_you_mean
from flax_warmstart._src.settings import (
  MeanCovarianceOfOldRows,
  MeanOfOldRows,
  VocabInfo,
  WarmStartSettings,
  _is_real,
  _show,
)
from flax_warmstart._src.tokenizer_vocab import is_tokenizer, tokens_from_tokenizer

_PLAIN = {
  "zeros": jax.nn.initializers.zeros,
  "ones": jax.nn.initializers.ones,
  "glorot_uniform": jax.nn.initializers.glorot_uniform(),
  "lecun_normal": jax.nn.initializers.lecun_normal(),
}
_PARAMETRIC = {
  "constant": jax.nn.initializers.constant,
  "normal": jax.nn.initializers.normal,
  "truncated_normal": jax.nn.initializers.truncated_normal,
  "uniform": jax.nn.initializers.uniform,
}
# What each parametric initializer's argument is, for messages.
_ARGUMENTS = {
  "constant": "the value: a number or a list of numbers",
  "normal": "the standard deviation: a number >= 0",
  "truncated_normal": "the standard deviation: a number >= 0",
  "uniform": "the scale (values in [0, scale)): a number >= 0",
}


@dataclasses.dataclass(frozen=True)
class NamedInitializer:
  """A JAX initializer built from its name and argument, which it remembers.

  So that settings read from a file compare equal and write back the same
  (`{"constant": 0.5}` stays `{"constant": 0.5}`).

  Attributes:
    name: The initializer's name (`"constant"`, `"normal"`, ...).
    arg: Its argument, or None for one that takes none.

  Examples:
    >>> import jax.numpy as jnp
    >>> init = NamedInitializer("constant", 0.5)
    >>> init(None, (2,), jnp.float32).tolist(), init == NamedInitializer("constant", 0.5)
    ([0.5, 0.5], True)
  """

  name: str
  arg: Any = None

  def __post_init__(self) -> None:
    if self.arg is None and self.name in _PLAIN:
      return
    if self.name not in _PARAMETRIC:
      raise WarmStartError(f"Unknown backup_initializer {self.name!r}; use one of {_known()}.")
    problem = _argument_problem(self.name, self.arg)
    if problem:
      raise WarmStartError(problem)
    if isinstance(self.arg, list | tuple):  # A hashable value, so settings hash.
      object.__setattr__(self, "arg", _tuples(np.asarray(self.arg).tolist()))

  def __call__(self, key: Any, shape: Any, dtype: Any = None) -> Any:
    arg = np.asarray(self.arg) if isinstance(self.arg, tuple) else self.arg  # jnp.full takes no lists
    fn = _PLAIN[self.name] if arg is None else _PARAMETRIC[self.name](arg)
    return fn(key, shape, dtype) if dtype is not None else fn(key, shape)


def initializer_from_spec(spec: Any) -> Any:
  """A backup initializer from its name (see the module docstring).

  Args:
    spec: None, a name, or a one-entry mapping `{name: argument}`.

  Returns:
    The initializer (a JAX initializer, `MeanOfOldRows` or
    `MeanCovarianceOfOldRows`), or None.

  Raises:
    WarmStartError: For an unknown name, listing the known ones, or an
      argument of the wrong kind, saying what it must be.

  Examples:
    >>> initializer_from_spec({"mean_covariance_of_old_rows": 1e-6})
    MeanCovarianceOfOldRows(scale=1e-06)
    >>> initializer_from_spec({"normal": "abc"})
    Traceback (most recent call last):
    ...
    flax_warmstart._src.errors.WarmStartError: backup_initializer {normal: ...} takes the standard deviation: a number >= 0; got 'abc' (str).
  """
  if spec is None or callable(spec) or isinstance(spec, MeanOfOldRows | MeanCovarianceOfOldRows):
    return spec
  if spec == "mean_of_old_rows":
    return MeanOfOldRows()
  if isinstance(spec, str) and spec in _PLAIN:
    return NamedInitializer(spec)
  if isinstance(spec, Mapping) and len(spec) == 1:
    ((name, arg),) = spec.items()
    if name == "mean_covariance_of_old_rows":
      if not _is_real(arg):
        raise WarmStartError(
          f"backup_initializer {{{name}: ...}} takes the covariance scale: a number >= 0; got {_show(arg)}."
        )
      return MeanCovarianceOfOldRows(arg)
    if name in _PARAMETRIC:
      return NamedInitializer(name, arg)
  raise WarmStartError(f"Unknown backup_initializer {spec!r}; use one of {_known()}.")


def _known() -> list[str]:
  return sorted([*_PLAIN, "mean_of_old_rows"]) + [
    f"{{{n}: value}}" for n in sorted([*_PARAMETRIC, "mean_covariance_of_old_rows"])
  ]


def _argument_problem(name: str, arg: Any) -> str | None:
  """Why `arg` cannot be the argument of the parametric initializer `name`, or None."""
  bad = f"backup_initializer {{{name}: ...}} takes {_ARGUMENTS[name]}; got {_show(arg)}."
  if name == "constant" and isinstance(arg, list | tuple):
    try:
      array = np.asarray(arg)
    except ValueError:  # ragged
      return bad
    return None if array.dtype.kind in "iuf" and np.isfinite(array).all() else bad
  if not _is_real(arg) or not math.isfinite(arg):
    return bad
  return bad if name != "constant" and arg < 0 else None


def _tuples(value: Any) -> Any:
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _initializer_to_spec(init: Any) -> Any:
  if init is None:
    return None
  if isinstance(init, MeanOfOldRows):
    return "mean_of_old_rows"
  if isinstance(init, MeanCovarianceOfOldRows):
    return {"mean_covariance_of_old_rows": init.scale}
  if isinstance(init, NamedInitializer):
    arg = np.asarray(init.arg).tolist() if isinstance(init.arg, tuple) else init.arg
    return init.name if arg is None else {init.name: arg}
  for name, value in _PLAIN.items():
    if init is value:
      return name
  return repr(init)  # A Python callable: recorded, not reloadable.


def _path(value: Any, where: str) -> Any:
  """A vocabulary as plain data: its path, or its tokens (an in-memory tokenizer's in id order, as it maps rows)."""
  if is_tokenizer(value):
    return tokens_from_tokenizer(value, field=where)
  return os.fspath(value) if isinstance(value, str | os.PathLike) else list(value)


def settings_to_dict(settings: WarmStartSettings) -> dict[str, Any]:
  """`WarmStartSettings` as JSON-ready data (callables are recorded by repr).

  Args:
    settings: The settings.

  Returns:
    A dict of plain values that `settings_from_dict` reads back.

  Examples:
    >>> settings_to_dict(WarmStartSettings("/runs/old", ["enc/.*"]))["vars_to_warm_start"]
    ['enc/.*']
  """
  vars_ = settings.vars_to_warm_start
  return {
    "ckpt_to_initialize_from": os.fspath(settings.ckpt_to_initialize_from),
    "vars_to_warm_start": list(vars_)
    if isinstance(vars_, tuple)
    else vars_
    if vars_ is None or isinstance(vars_, str)
    else repr(vars_),
    "var_name_to_vocab_info": {
      name: {
        **{f.name: getattr(info, f.name) for f in dataclasses.fields(info)},
        "new_vocab": _path(info.new_vocab, f"var_name_to_vocab_info[{name!r}].new_vocab"),
        "old_vocab": _path(info.old_vocab, f"var_name_to_vocab_info[{name!r}].old_vocab"),
        "backup_initializer": _initializer_to_spec(info.backup_initializer),
        "donor_tokens": dict(info.donor_tokens),
        "token_vectors": {k: list(v) if isinstance(v, tuple) else v for k, v in info.token_vectors.items()},
      }
      for name, info in settings.var_name_to_vocab_info.items()
    },
    "var_name_to_prev_var_name": dict(settings.var_name_to_prev_var_name),
    "skip_missing": settings.skip_missing,
    "ckpt_item": settings.ckpt_item,
    "ckpt_step": settings.ckpt_step if not hasattr(settings.ckpt_step, "item") else settings.ckpt_step.item(),
    "rename_rules": [[pattern, surgery.to_data(template)] for pattern, template in settings.rename_rules],
    "optimizer_state": settings.optimizer_state,
    "step": settings.step,
  }


def settings_from_dict(data: Mapping[str, Any], *, ckpt_to_initialize_from: str | None = None) -> WarmStartSettings:
  """Builds `WarmStartSettings` from plain data (a JSON/YAML mapping, a ConfigDict).

  Args:
    data: Field name -> value; `var_name_to_vocab_info` values are mappings of
      `VocabInfo` fields, with `backup_initializer` given by name.
    ckpt_to_initialize_from: Used when `data` does not name the checkpoint.

  Returns:
    The settings.

  Raises:
    WarmStartError: For unknown fields (with the closest names) or invalid values.

  Examples:
    >>> s = settings_from_dict({"ckpt_to_initialize_from": "/runs/old",
    ...                         "var_name_to_vocab_info": {"emb": {"new_vocab": "new.txt",
    ...                             "new_vocab_size": 5, "num_oov_buckets": 1, "old_vocab": "old.txt",
    ...                             "backup_initializer": {"constant": 0.5}}}})
    >>> s.var_name_to_vocab_info["emb"].num_oov_buckets
    1
  """
  if hasattr(data, "to_dict"):  # ml_collections.ConfigDict
    data = data.to_dict()
  if not isinstance(data, Mapping):
    raise WarmStartError(f"Settings must be a mapping of WarmStartSettings fields, got {type(data).__name__}.")
  fields = {f.name for f in dataclasses.fields(WarmStartSettings)}
  problems = [f"Unknown WarmStartSettings field {k!r}.{did_you_mean(k, fields)}" for k in sorted(set(data) - fields)]
  kwargs = {k: v for k, v in data.items() if k in fields}
  kwargs.setdefault("ckpt_to_initialize_from", ckpt_to_initialize_from)
  specs = kwargs.get("var_name_to_vocab_info")
  if isinstance(specs, Mapping):
    kwargs["var_name_to_vocab_info"] = _vocab_infos(specs, problems)
  rules = kwargs.get("rename_rules")
  if isinstance(rules, list | tuple):  # JSON/YAML pairs are lists.
    kwargs["rename_rules"] = [tuple(rule) if isinstance(rule, list) else rule for rule in rules]
  try:
    settings = WarmStartSettings(**kwargs)
  except WarmStartError as err:
    problems += err.problems
  if problems:
    raise WarmStartError(problems, header="Invalid settings")
  return settings


def _vocab_infos(specs: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
  """`var_name_to_vocab_info` from plain data; the problems of every entry go to `problems`."""
  fields = [f.name for f in dataclasses.fields(VocabInfo)]
  required = [f.name for f in dataclasses.fields(VocabInfo) if f.default is f.default_factory is dataclasses.MISSING]
  out = {}
  for name, spec in specs.items():
    where = f"var_name_to_vocab_info[{name!r}]"
    if isinstance(spec, VocabInfo):
      out[name] = spec
      continue
    if not isinstance(spec, Mapping):
      problems.append(f"{where} must be a mapping of VocabInfo fields ({', '.join(fields)}), got {_show(spec)}.")
      continue
    found = [f"{where}: unknown VocabInfo field {k!r}.{did_you_mean(k, fields)}" for k in spec if k not in fields]
    missing = [k for k in required if k not in spec]
    found += [f"{where}: VocabInfo field {k!r} is required." for k in missing]
    known = {k: v for k, v in spec.items() if k in fields}
    try:
      known["backup_initializer"] = initializer_from_spec(known.get("backup_initializer"))
    except WarmStartError as err:
      found += [f"{where}: {p}" for p in err.problems]
      known["backup_initializer"] = None
    if not missing:
      try:
        info = VocabInfo(**known)
      except WarmStartError as err:
        found += [f"{where}: {p}" for p in err.problems]
      else:
        if not found:
          out[name] = info
    problems += found
  return out
