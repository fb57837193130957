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
import os
from collections.abc import Mapping
from typing import Any

import jax

from flax_warmstart._src.errors import WarmStartError, did_you_mean
from flax_warmstart._src.settings import MeanCovarianceOfOldRows, MeanOfOldRows, VocabInfo, WarmStartSettings

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

  def __call__(self, key: Any, shape: Any, dtype: Any = None) -> Any:
    fn = _PLAIN[self.name] if self.arg is None else _PARAMETRIC[self.name](self.arg)
    return fn(key, shape, dtype) if dtype is not None else fn(key, shape)


def initializer_from_spec(spec: Any) -> Any:
  """A backup initializer from its name (see the module docstring).

  Args:
    spec: None, a name, or a one-entry mapping `{name: argument}`.

  Returns:
    The initializer (a JAX initializer, `MeanOfOldRows` or
    `MeanCovarianceOfOldRows`), or None.

  Raises:
    WarmStartError: For an unknown name, listing the known ones.

  Examples:
    >>> initializer_from_spec({"mean_covariance_of_old_rows": 1e-6})
    MeanCovarianceOfOldRows(scale=1e-06)
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
      return MeanCovarianceOfOldRows(float(arg))
    if name in _PARAMETRIC:
      return NamedInitializer(name, arg)
  known = sorted([*_PLAIN, "mean_of_old_rows"]) + [
    f"{{{n}: value}}" for n in sorted([*_PARAMETRIC, "mean_covariance_of_old_rows"])
  ]
  raise WarmStartError(f"Unknown backup_initializer {spec!r}; use one of {known}.")


def _initializer_to_spec(init: Any) -> Any:
  if init is None:
    return None
  if isinstance(init, MeanOfOldRows):
    return "mean_of_old_rows"
  if isinstance(init, MeanCovarianceOfOldRows):
    return {"mean_covariance_of_old_rows": init.scale}
  if isinstance(init, NamedInitializer):
    return init.name if init.arg is None else {init.name: init.arg}
  for name, value in _PLAIN.items():
    if init is value:
      return name
  return repr(init)  # A Python callable: recorded, not reloadable.


def _path(value: Any) -> Any:
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
        "new_vocab": _path(info.new_vocab),
        "old_vocab": _path(info.old_vocab),
        "backup_initializer": _initializer_to_spec(info.backup_initializer),
        "donor_tokens": dict(info.donor_tokens),
        "token_vectors": {k: list(v) if isinstance(v, tuple) else v for k, v in info.token_vectors.items()},
      }
      for name, info in settings.var_name_to_vocab_info.items()
    },
    "var_name_to_prev_var_name": dict(settings.var_name_to_prev_var_name),
    "skip_missing": settings.skip_missing,
    "ckpt_item": settings.ckpt_item,
    "rename_rules": [list(rule) for rule in settings.rename_rules],
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
  unknown = sorted(set(data) - fields)
  if unknown:
    raise WarmStartError(
      [f"Unknown WarmStartSettings field {k!r}.{did_you_mean(k, fields)}" for k in unknown], header="Invalid settings"
    )
  kwargs = dict(data)
  kwargs.setdefault("ckpt_to_initialize_from", ckpt_to_initialize_from)
  vocab_fields = {f.name for f in dataclasses.fields(VocabInfo)}
  vocab = {}
  vocab_specs = kwargs.get("var_name_to_vocab_info") or {}
  if not isinstance(vocab_specs, Mapping):
    raise WarmStartError(f"var_name_to_vocab_info must map variable names to VocabInfo fields, got {vocab_specs!r}.")
  for name, spec in vocab_specs.items():
    if isinstance(spec, VocabInfo):
      vocab[name] = spec
      continue
    if not isinstance(spec, Mapping):
      raise WarmStartError(f"var_name_to_vocab_info[{name!r}] must be a mapping of VocabInfo fields, got {spec!r}.")
    bad = sorted(set(spec) - vocab_fields)
    if bad:
      raise WarmStartError(f"Unknown VocabInfo field(s) {bad} for {name!r}; fields are {sorted(vocab_fields)}.")
    spec = dict(spec)
    spec["backup_initializer"] = initializer_from_spec(spec.get("backup_initializer"))
    try:
      vocab[name] = VocabInfo(**spec)
    except TypeError as err:
      raise WarmStartError(f"Invalid VocabInfo for {name!r}: {err}.") from None
  kwargs["var_name_to_vocab_info"] = vocab
  rules = kwargs.get("rename_rules")
  if rules:
    if not isinstance(rules, list | tuple | Mapping):
      raise WarmStartError(f"rename_rules must be a list of [new_name_regex, old_name_template] pairs, got {rules!r}.")
    if isinstance(rules, list | tuple):
      kwargs["rename_rules"] = [tuple(rule) if isinstance(rule, list) else rule for rule in rules]
  return WarmStartSettings(**kwargs)
