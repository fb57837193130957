"""`WarmStartSettings` and `VocabInfo`: what to warm-start, and from where.

Both are frozen, validated on construction, with TensorFlow's field names and
defaults (`tf.estimator.WarmStartSettings`, `tf.estimator.VocabInfo`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, Literal

import numpy as np
from flax.core import FrozenDict

from flax_warmstart._src import surgery
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.tokenizer_vocab import is_tokenizer, tokenizer_hint

# What happens to the optimizer state and the step (see WarmStartSettings).
Policy = Literal["select", "load", "reset", "keep"]
POLICIES = ("select", "load", "reset", "keep")

# What `vars_to_warm_start` may be: a regex over parameter names, a list of
# regexes over every name, a predicate `(name, leaf) -> bool`, or None.
VarsToWarmStart = str | tuple[str, ...] | Callable[[str, Any], bool] | None


@dataclasses.dataclass(frozen=True)
class MeanOfOldRows:
  """New-row initializer: every new and OOV row is the mean of the old vocabulary rows.

  Use as `VocabInfo(backup_initializer=MeanOfOldRows())`.

  Examples:
    >>> import flax_warmstart as fws
    >>> info = fws.VocabInfo(["b", "z"], 2, 0, ["a", "b"], backup_initializer=fws.MeanOfOldRows())
    >>> info.backup_initializer
    MeanOfOldRows()
  """


@dataclasses.dataclass(frozen=True)
class MeanCovarianceOfOldRows:
  """New-row initializer: draws from a normal with the old rows' mean and covariance.

  Hugging Face's `resize_token_embeddings(mean_resizing=True)`: new rows are
  sampled from `N(mean, scale * covariance)` of the old vocabulary rows
  (Hugging Face uses `scale=1e-9`). Needs `rng` in `warm_start`.

  Attributes:
    scale: Multiplies the covariance.

  Examples:
    >>> import flax_warmstart as fws
    >>> fws.MeanCovarianceOfOldRows().scale
    1e-09
  """

  scale: float = 1e-9

  def __post_init__(self) -> None:
    scale = self.scale
    if not _is_real(scale) or not math.isfinite(scale) or scale < 0:
      raise WarmStartError(
        f"MeanCovarianceOfOldRows: `scale` must be a finite real number >= 0 (it multiplies the covariance),"
        f" got {_show(scale)}."
      )
    object.__setattr__(self, "scale", float(scale))


NEW_ROW_INITIALIZERS = (MeanOfOldRows, MeanCovarianceOfOldRows)


@dataclasses.dataclass(frozen=True)
class VocabInfo:
  """How to remap the vocabulary rows (or columns) of one variable.

  The first seven fields, their order and meaning are those of
  `tf.estimator.VocabInfo`, with TensorFlow's results wherever TensorFlow
  succeeds. Naming a parameter in `WarmStartSettings.var_name_to_vocab_info`
  gives it the `remap` action: row `i` of the new variable is the old row of
  token `new_vocab[i]`; new tokens and OOV rows come from the backup
  initializer. Its optimizer slots follow the same mapping (new rows zero).

  Attributes:
    new_vocab: The new vocabulary: a file path (local or any path etils opens,
      e.g. `gs://`) of a text file (one token per line), a SentencePiece model
      (`.model`: T5, Gemma, Llama 2) or a Hugging Face `tokenizer.json`; a
      sequence of tokens; or a loaded `sentencepiece.SentencePieceProcessor`,
      `tokenizers.Tokenizer` or transformers fast tokenizer. A tokenizer gives
      its tokens in id order (token `i` is id `i`'s piece; an id with no token
      is a placeholder that matches only the same id's placeholder) and needs
      the `sentencepiece` or `tokenizers` extra. An in-memory tokenizer cannot
      be written to a settings file: give its file's path there.
    new_vocab_size: How many leading tokens of `new_vocab` are rows.
    num_oov_buckets: Number of out-of-vocabulary rows after the vocabulary.
    old_vocab: The vocabulary the checkpoint was trained with (any form
      `new_vocab` takes).
    old_vocab_size: `-1` for all of `old_vocab`, else its first N tokens. As in
      TensorFlow, it is ignored for `axis=1`.
    backup_initializer: Fills new-token and OOV rows: a JAX initializer
      `(key, shape, dtype) -> Array` called as TensorFlow calls it (once with
      shape `[n_missing_cells, 1]` for the new tokens' cells in row-major
      order, then `[n_oov, ...]` for the OOV rows or columns), or
      `MeanOfOldRows()` / `MeanCovarianceOfOldRows()`. `None` means zeros.
      Random initializers draw from the `rng` given to `warm_start`.
    axis: 0 if rows are vocabulary entries (an embedding, an output bias), 1
      if columns are (a softmax kernel `[hidden, vocab]`).
    donor_tokens: New token -> old token whose old row it copies (for tokens
      absent from the old vocabulary), e.g. `{"K[Acetyl]": "K"}`.
    token_vectors: New token -> explicit row value (for tokens absent from the
      old vocabulary).

  Raises:
    WarmStartError: Listing every field of the wrong kind at once (a size that
      is not an int, a vocabulary that is bytes, a set or not str tokens, an
      axis other than 0 or 1, ...), each naming the field, the value and what
      is allowed. Ranges that depend on the variable (`new_vocab_size=0`,
      `num_oov_buckets < 0`, `old_vocab_size` beyond the file) and the files
      themselves are checked when the plan is made, as TensorFlow checks them
      when it warm-starts.

  Examples:
    >>> info = VocabInfo("new.txt", new_vocab_size=5, num_oov_buckets=1,
    ...                  old_vocab="old.txt")
    >>> info.axis, info.old_vocab_size
    (0, -1)
    >>> VocabInfo(["<pad>", "a", "b"], 3, 0, ["a", "b"], donor_tokens={"<pad>": "a"}).new_vocab
    ('<pad>', 'a', 'b')
  """

  new_vocab: str | os.PathLike | Sequence[str] | Any  # Any: an in-memory tokenizer
  new_vocab_size: int
  num_oov_buckets: int
  old_vocab: str | os.PathLike | Sequence[str] | Any
  old_vocab_size: int = -1
  backup_initializer: Callable[..., Any] | None = None
  axis: int = 0
  donor_tokens: Mapping[str, str] = dataclasses.field(default_factory=FrozenDict)
  token_vectors: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)

  def __post_init__(self) -> None:
    problems: list[str] = []
    for field in ("new_vocab", "old_vocab"):
      object.__setattr__(self, field, _vocab_source(field, getattr(self, field), problems))
    for field, allowed in _VOCAB_INTS.items():
      object.__setattr__(self, field, _int_field(field, getattr(self, field), allowed, problems))
    if not _is_int(self.axis):
      problems.append(
        f"`axis` must be the int 0 (rows are vocabulary entries) or 1 (columns are), got {_show(self.axis)}."
      )
    elif self.axis not in (0, 1):
      # TensorFlow's message, word for word.
      problems.append(f"The only supported values for the axis argument are 0 and 1.  Provided axis: {self.axis}")
    else:
      object.__setattr__(self, "axis", int(self.axis))
    donors = _str_mapping(
      "donor_tokens", self.donor_tokens, "{new token: old token whose row it copies}", problems, str_values=True
    )
    object.__setattr__(self, "donor_tokens", FrozenDict(donors))
    object.__setattr__(self, "token_vectors", FrozenDict(_token_vectors(self.token_vectors, problems)))
    both = sorted(set(self.donor_tokens) & set(self.token_vectors))
    if both:
      problems.append(
        f"{both} are in both donor_tokens and token_vectors: give each new token one source, a donor or a vector."
      )
    if problems:
      raise WarmStartError(problems, header="Invalid VocabInfo")


# VocabInfo's integer fields -> what they may be (for messages). Their ranges
# are checked when the plan is made, against the variable (as in TensorFlow:
# `old_vocab_size` is ignored for axis 1, `new_vocab_size=0` fails at use).
_VOCAB_INTS = {
  "new_vocab_size": "an int > 0: how many leading tokens of new_vocab are rows",
  "num_oov_buckets": "an int >= 0: the number of out-of-vocabulary rows after the vocabulary",
  "old_vocab_size": "an int: -1 for all of old_vocab, else its first N tokens",
}


def _show(value: Any) -> str:
  """`value` for a message: a short repr and its type."""
  return f"{reprlib.repr(value)} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
  """An integer (Python or numpy), not a bool: `2.0`, `"2"` and `True` are not."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
  """A real number (int or float, Python or numpy), not a bool or a string."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _int_field(field: str, value: Any, allowed: str, problems: list[str]) -> Any:
  if not _is_int(value):
    problems.append(f"`{field}` must be {allowed}; got {_show(value)}.")
    return value
  return int(value)


def _vocab_source(field: str, value: Any, problems: list[str]) -> Any:
  """A vocabulary path or tokenizer stays as given; a token sequence becomes a tuple of str."""
  if isinstance(value, str | os.PathLike) or is_tokenizer(value):
    return value
  if isinstance(value, np.ndarray) and value.ndim == 1:
    value = value.tolist()
  allowed = (
    "a vocabulary file path (str or os.PathLike), an ordered sequence of str tokens (a list or tuple), or a"
    " SentencePieceProcessor or tokenizers.Tokenizer"
  )
  if isinstance(value, bytes | bytearray):
    problems.append(f"`{field}` must be {allowed}; got {_show(value)}. Decode bytes first (value.decode()).")
    return value
  if isinstance(value, Set):
    problems.append(
      f"`{field}` must be {allowed}; got {_show(value)}. A set has no order, and a token's line gives its row."
    )
    return value
  if not isinstance(value, Sequence):
    problems.append(f"`{field}` must be {allowed}; got {_show(value)}.{tokenizer_hint(value)}")
    return value
  tokens = tuple(value)
  bad = [(i, t) for i, t in enumerate(tokens) if not isinstance(t, str)]
  if bad:
    shown = ", ".join(f"[{i}] = {_show(t)}" for i, t in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    problems.append(f"`{field}` tokens must all be str; found {shown}.")
    return tokens
  return tuple(str(t) for t in tokens)


def _str_mapping(field: str, value: Any, shape: str, problems: list[str], *, str_values: bool) -> dict[str, Any]:
  """`value` (None or a mapping) as a dict of its valid entries: str keys, and str values if `str_values`."""
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    problems.append(f"`{field}` must be a mapping {shape}; got {_show(value)}.")
    return {}
  valid = {k: v for k, v in value.items() if isinstance(k, str) and (isinstance(v, str) or not str_values)}
  bad = [k for k in value if k not in valid]
  if bad:
    shown = ", ".join(f"{k!r}: {value[k]!r}" for k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    kind = "str keys and values" if str_values else "str keys (new tokens)"
    problems.append(f"`{field}` must be a mapping {shape} with {kind}; found {shown}.")
  return valid


def _token_vectors(value: Any, problems: list[str]) -> dict[str, Any]:
  """`token_vectors` with each vector frozen to nested tuples (so settings hash)."""
  vectors = _str_mapping("token_vectors", value, "{new token: row vector}", problems, str_values=False)
  out = {}
  for tok, vector in vectors.items():
    try:
      array = np.asarray(vector)
    except ValueError:  # ragged nested lists
      array = None
    if array is None or array.dtype.kind not in "biuf":
      problems.append(f"token_vectors[{tok!r}] must be a vector of numbers; got {_show(vector)}.")
      continue
    out[tok] = _freeze(array.tolist())
  return out


def _freeze(value: Any) -> Any:
  return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class WarmStartSettings:
  """What to warm-start from which checkpoint: TensorFlow's WarmStartSettings.

  Names follow the naming contract of `flax_warmstart.variable_names`:
  parameters by their slash-joined path in the params tree
  (`encoder/dense/kernel`), optimizer slots after their parameter
  (`encoder/dense/kernel/opt_state/0/mu`), everything else by its path from the
  root of the state (`batch_stats/bn/mean`, `opt_state/0/count`, `step`).

  Attributes:
    ckpt_to_initialize_from: An Orbax `CheckpointManager` root (its latest step
      is used), a step directory, or a checkpoint directory.
    vars_to_warm_start: Which leaves of the live state to warm-start. As in
      TensorFlow, a regex is matched with `re.match` (anchored at the start,
      not at the end); a name is selected when the regex matches `name` or
      TensorFlow's tensor name `name + ":0"`, so TensorFlow regexes such as
      `"v2[^/]"` keep working. The forms:

      * `str` (default `".*"`): a regex over *parameter* names only (TF's
        TRAINABLE collection). Optimizer state, batch statistics and the step
        are not selected.
      * a list (or tuple) of `str`: regexes over *every* name, parameters,
        slots and the rest (TF's GLOBAL collection).
      * a callable `(name, leaf) -> bool` over every leaf.
      * `None` or `""`: only the variables in `var_name_to_vocab_info`.
    var_name_to_vocab_info: Name of a selected parameter -> `VocabInfo`.
    var_name_to_prev_var_name: Name in the live state -> name in the
      checkpoint. A parameter's rename carries its optimizer slots. It never
      changes what is selected; every key must name a selected variable.
    skip_missing: A bool. If True, selected variables absent from the checkpoint keep
      their current value and are reported (a WARNING log and the plan),
      instead of failing the whole request.
    ckpt_item: The item to read when a step directory holds several (e.g.
      `"state"` of a `CheckpointManager` with `item_names`). By default the
      only PyTree item, or the one whose names best match the live state.
    rename_rules: T5X-style regex renames, an ordered list of
      `(new_name_regex, old_name_template)`: the first regex that
      `re.fullmatch`es a selected name gives its checkpoint name by
      `match.expand(template)` (`\\1` group references); a template of `None`
      keeps the leaf at its current (fresh) value. A rule that matches no
      selected name is an error. `var_name_to_prev_var_name` takes precedence
      (an exact name beats a pattern); a parameter's rename carries its slots.
      In place of a template, a transform whose innermost argument is one
      (model surgery: `Take` one layer of a scanned stack, `Stack` unrolled
      layers, `Transpose`, `Reshape`, `Broadcast` into experts; they nest),
      or the same as data (`{"transpose": "wte/embedding"}`); a parameter's
      slots follow it through the same transform.
    optimizer_state: What happens to the optimizer state (leaves under
      `opt_state`): `"select"` (default) follows `vars_to_warm_start`, as in
      TensorFlow; `"load"` loads the slots of every loaded parameter and the
      optimizer's counters; `"reset"` sets it to the optimizer's fresh init
      (`state.tx.init(params)`, after params are loaded); `"keep"` keeps the
      live value whatever is selected. Changing the optimizer between runs
      works with `"keep"` (a fresh state) or `"reset"`.
    step: What happens to the root `step`: `"select"` (default), `"load"`
      (continue from the old step: learning-rate schedules continue),
      `"reset"` (start at 0: schedules restart), `"keep"` (the live value).
    ckpt_step: Which step of a directory of steps (a `CheckpointManager` root,
      a run directory of `checkpoint_<step>` checkpoints) to read: None (the
      default) for the newest, a step number, or `"min:<metric>"` /
      `"max:<metric>"` for the best step by a metric saved with it (Orbax
      saves a step's `metrics` when the manager has a `best_fn`; the metric
      and its direction are named here because Orbax does not record them).

  Raises:
    WarmStartError: Listing every invalid value at once (a `skip_missing`
      that is not a bool, a regex that does not compile, a rename template
      that refers to a group its regex does not have, an unordered set of
      rules, ...), each naming the field, the value and what is allowed.

  Examples:
    >>> s = WarmStartSettings("/runs/old", vars_to_warm_start=[".*encoder.*"],
    ...                       var_name_to_prev_var_name={"enc/k": "old/k"})
    >>> s.vars_to_warm_start, dict(s.var_name_to_prev_var_name)
    (('.*encoder.*',), {'enc/k': 'old/k'})
  """

  ckpt_to_initialize_from: str | os.PathLike
  vars_to_warm_start: VarsToWarmStart = ".*"
  var_name_to_vocab_info: Mapping[str, VocabInfo] = dataclasses.field(default_factory=FrozenDict)
  var_name_to_prev_var_name: Mapping[str, str] = dataclasses.field(default_factory=FrozenDict)
  skip_missing: bool = False
  ckpt_item: str | None = None
  rename_rules: Sequence[tuple[str, Any]] = ()
  optimizer_state: Policy = "select"
  step: Policy = "select"
  ckpt_step: int | str | None = None

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], **kwargs: Any) -> WarmStartSettings:
    """Builds settings from plain data: a JSON/YAML mapping or an `ml_collections.ConfigDict`.

    Args:
      data: Field name -> value (see `flax_warmstart.serialize`).
      **kwargs: Passed to `serialize.settings_from_dict`.

    Returns:
      The settings.

    Raises:
      WarmStartError: For unknown fields or invalid values.

    Examples:
      >>> WarmStartSettings.from_dict({"ckpt_to_initialize_from": "/runs/old", "step": "reset"}).step
      'reset'
    """
    from flax_warmstart._src.serialize import settings_from_dict  # noqa: PLC0415 (serialize imports this module)

    return settings_from_dict(data, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    """The settings as JSON-ready data (`from_dict` reads it back).

    Returns:
      A dict of plain values.

    Examples:
      >>> WarmStartSettings("/runs/old").to_dict()["vars_to_warm_start"]
      '.*'
    """
    from flax_warmstart._src.serialize import settings_to_dict  # noqa: PLC0415

    return settings_to_dict(self)

  def __post_init__(self) -> None:
    problems = []
    if not self.ckpt_to_initialize_from:
      problems.append(
        "`ckpt_to_initialize_from` MUST be set in WarmStartSettings: give the"
        " directory of the checkpoint to warm-start from."
      )
    elif not isinstance(self.ckpt_to_initialize_from, str | os.PathLike):
      problems.append(
        "`ckpt_to_initialize_from` must be a path (str or os.PathLike), got"
        f" {type(self.ckpt_to_initialize_from).__name__}."
      )
    object.__setattr__(self, "vars_to_warm_start", _normalize_vars(self.vars_to_warm_start, problems))
    vocab = _frozen_mapping(self.var_name_to_vocab_info, "var_name_to_vocab_info", problems)
    for key, info in vocab.items():
      if not isinstance(info, VocabInfo):
        problems.append(
          f"var_name_to_vocab_info[{key!r}] must be a flax_warmstart.VocabInfo, got {type(info).__name__}."
        )
    prev = _frozen_mapping(self.var_name_to_prev_var_name, "var_name_to_prev_var_name", problems)
    for key, value in prev.items():
      if not isinstance(value, str):
        problems.append(
          f"var_name_to_prev_var_name[{key!r}] must be a checkpoint name (str), got {type(value).__name__}."
        )
    object.__setattr__(self, "var_name_to_vocab_info", vocab)
    object.__setattr__(self, "var_name_to_prev_var_name", prev)
    if isinstance(self.skip_missing, bool | np.bool_):
      object.__setattr__(self, "skip_missing", bool(self.skip_missing))
    else:
      problems.append(f"`skip_missing` must be True or False (a bool), got {_show(self.skip_missing)}.")
    if self.ckpt_item is not None and not isinstance(self.ckpt_item, str):
      problems.append(f"`ckpt_item` must be an item name (str) or None, got {self.ckpt_item!r}.")
    step = self.ckpt_step
    if not (
      step is None
      or (isinstance(step, int | np.integer) and not isinstance(step, bool | np.bool_) and step >= 0)
      or (isinstance(step, str) and re.fullmatch(r"(min|max):.+", step))
    ):
      problems.append(
        "`ckpt_step` must be None (the newest step), a step number (int >= 0), or 'min:<metric>' /"
        f" 'max:<metric>' (the best step by a saved metric), got {_show(step)}."
      )
    object.__setattr__(self, "rename_rules", _normalize_rules(self.rename_rules, problems))
    for field in ("optimizer_state", "step"):
      if getattr(self, field) not in POLICIES:
        problems.append(f"`{field}` must be one of {list(POLICIES)}, got {getattr(self, field)!r}.")
    if problems:
      raise WarmStartError(problems, header="Invalid WarmStartSettings")


def _normalize_rules(rules: Any, problems: list[str]) -> tuple[tuple[str, str | None], ...]:
  """Validates `rename_rules`: an ordered list of (regex, template or None) pairs.

  Each regex must compile and each template must expand against it (its group
  references exist), so a bad rule fails here rather than when it first matches.
  """
  if rules is None:
    return ()
  if isinstance(rules, Mapping):
    rules = list(rules.items())
  elif isinstance(rules, str | bytes | Set) or not isinstance(rules, Sequence):
    order = " A set has no order, and the first rule that matches a name decides it." if isinstance(rules, Set) else ""
    problems.append(
      "`rename_rules` must be an ordered list of (new_name_regex, old_name_template or None) pairs (or a dict"
      f" regex -> template), got {_show(rules)}.{order}"
    )
    return ()
  out = []
  for k, rule in enumerate(rules):
    where = f"rename_rules[{k}]"
    if not (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)):
      problems.append(
        f"{where} must be a (new_name_regex, old_name_template, transform or None) pair, got {_show(rule)}."
      )
      continue
    pattern, template = rule
    if isinstance(template, Mapping):  # a transform written as data: {"transpose": "wte/embedding"}
      try:
        template = surgery.from_data(template, where)
      except WarmStartError as err:
        problems += err.problems
        continue
    if template is not None and not isinstance(template, str) and not surgery.is_transform(template):
      problems.append(
        f"{where}: the template for {pattern!r} must be a str, a transform (fws.Take, fws.Stack, fws.Transpose,"
        f" fws.Reshape, fws.Broadcast) or None, got {_show(template)}."
      )
      continue
    try:
      regex = re.compile(pattern)
    except re.error as err:
      problems.append(f"{where}: {pattern!r} is not a valid regex: {err}.")
      continue
    texts = [] if template is None else [template] if isinstance(template, str) else list(template.templates())
    for text in texts:
      try:
        regex.sub(text, "")  # Compiles the template against the regex's groups; matches nothing.
      except (re.error, IndexError) as err:
        groups = [f"\\{i}" for i in range(1, regex.groups + 1)] + [f"\\g<{n}>" for n in regex.groupindex]
        problems.append(
          f"{where}: template {text!r} does not fit regex {pattern!r}: {err}. The regex has"
          f" {regex.groups} group(s){': ' + ', '.join(groups) if groups else ''}."
        )
        break
    else:
      out.append((pattern, template))
  return tuple(out)


def _normalize_vars(value: Any, problems: list[str]) -> VarsToWarmStart:
  """Validates `vars_to_warm_start`; lists become tuples so settings hash; regexes must compile."""
  if value is None or callable(value):
    return value
  if isinstance(value, str):
    _check_regex("vars_to_warm_start", value, problems)
    return value
  if isinstance(value, list | tuple):
    bad = sorted({type(v).__name__ for v in value if not isinstance(v, str)})
    if bad:
      problems.append(
        "If `vars_to_warm_start` is a list, it must be all `str` (regexes);"
        f" found {', '.join(bad)}. To select arrays directly, pass a callable"
        " `(name, leaf) -> bool`."
      )
    for k, pattern in enumerate(value):
      if isinstance(pattern, str):
        _check_regex(f"vars_to_warm_start[{k}]", pattern, problems)
    return tuple(value)
  problems.append(
    "`vars_to_warm_start` must be a regex `str`, a `list` of regex `str`, a"
    f" callable `(name, leaf) -> bool` or None; given type is {type(value).__name__}."
  )
  return value


def _check_regex(field: str, pattern: str, problems: list[str]) -> None:
  try:
    re.compile(pattern)
  except re.error as err:
    problems.append(f"`{field}` {pattern!r} is not a valid regex: {err}.")


def _frozen_mapping(value: Any, field: str, problems: list[str]) -> FrozenDict:
  if value is None:
    return FrozenDict()
  if not isinstance(value, Mapping):
    problems.append(f"`{field}` must be a mapping of variable names, got {type(value).__name__}.")
    return FrozenDict()
  bad = [k for k in value if not isinstance(k, str)]
  if bad:
    problems.append(f"`{field}` keys must be variable names (str); got {bad!r}.")
  return FrozenDict(dict(value))
