"""Selection (`vars_to_warm_start`, as in TensorFlow) and the `optimizer_state` / `step` policies."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.naming import Variable
from flax_warmstart._src.rows import Reset, is_optimizer, is_step
from flax_warmstart._src.settings import WarmStartSettings


def _leading_exclusions(pattern: str) -> list[str]:
  """The bodies of the negative lookaheads a pattern starts with: `(?!step$).*` -> `["step$"]`."""
  out, i = [], 1 if pattern.startswith("^") else 0
  while pattern.startswith("(?!", i):
    depth, j, in_class = 0, i, False
    while j < len(pattern):
      c = pattern[j]
      if c == "\\":
        j += 2
        continue
      if in_class:
        in_class = c != "]"
      elif c == "[":
        in_class = True
      elif c == "(":
        depth += 1
      elif c == ")":
        depth -= 1
        if depth == 0:
          break
      j += 1
    if depth:
      break
    out.append(pattern[i + 3 : j])
    i = j + 1
  return out


def matcher(pattern: str, problems: list[str]) -> Callable[[str], bool]:
  """TensorFlow's matching: `re.match` on `name` or on its tensor name `name:0`; exclusions still exclude.

  TensorFlow tests a variable's tensor name (`v2:0`), so a regex such as
  `v2[^/]` selects `v2` but not `v2/Momentum`; testing `name:0` as well keeps
  such regexes working. A pattern that starts with a negative lookahead
  (`(?!step$).*`) excludes what the lookahead names: the alias `step:0` would
  slip past `step$`, so a name the lookahead rejects is never selected.

  Examples:
    >>> problems = []
    >>> [n for n in ["v2", "v2/Momentum", "step"] if matcher("v2[^/]", problems)(n)]
    ['v2']
    >>> [n for n in ["w", "step"] if matcher("(?!step$).*", problems)(n)]
    ['w']
  """
  try:
    regex = re.compile(pattern)
    excluded = [re.compile(body) for body in _leading_exclusions(pattern)]
  except re.error as e:
    problems.append(f"vars_to_warm_start regex {pattern!r} is not a valid regex: {e}.")
    return lambda name: False

  def match(name: str) -> bool:
    if any(x.match(name) for x in excluded):
      return False
    return bool(regex.match(name) or regex.match(name + ":0"))

  return match


def select(
  variables: Sequence[Variable], leaves: Sequence[Any], settings: WarmStartSettings
) -> tuple[set[str], set[str], list[str]]:
  """Applies `vars_to_warm_start`.

  Returns:
    `(warm, grouped, problems)`: the names to warm-start; the names that
    `var_name_to_prev_var_name` and `var_name_to_vocab_info` may refer to
    (TensorFlow's grouped variables); and the problems found.
  """
  problems: list[str] = []
  spec = settings.vars_to_warm_start
  params = {v.name for v in variables if v.kind == "param"}
  if spec is None or spec == "":
    # As in TensorFlow: all parameters are grouped, only vocab ones are loaded.
    return set(settings.var_name_to_vocab_info) & params, params, problems
  if isinstance(spec, str):
    match = matcher(spec, problems)
    grouped = {name for name in params if match(name)}
  elif isinstance(spec, tuple):
    matchers = [matcher(p, problems) for p in spec]
    grouped = {v.name for v in variables if any(m(v.name) for m in matchers)}
  else:
    grouped = set()
    for v, leaf in zip(variables, leaves, strict=True):
      try:
        chosen = spec(v.name, leaf)
      except Exception as err:
        raise WarmStartError(
          f"The vars_to_warm_start callable ({getattr(spec, '__qualname__', type(spec).__name__)}) failed on"
          f" {v.name!r}: {type(err).__name__}: {err}. It is called as fn(name, leaf) -> bool for every leaf."
        ) from err
      if chosen:
        grouped.add(v.name)
  return set(grouped), grouped, problems


def apply_policies(
  variables: Sequence[Variable], warm: set[str], settings: WarmStartSettings
) -> tuple[set[str], dict[str, Reset], set[str]]:
  """Applies `optimizer_state` and `step`.

  Returns:
    `(warm, reset, held)`: the new warm set; name -> what is reset, for the
    leaves to reset; the selected names that a `"keep"` policy holds back.
  """
  warm = set(warm)
  reset: dict[str, Reset] = {}
  held: set[str] = set()
  for policy, members, what in (
    (settings.optimizer_state, [v for v in variables if is_optimizer(v)], Reset.OPTIMIZER),
    (settings.step, [v for v in variables if is_step(v)], Reset.STEP),
  ):
    names = {v.name for v in members}
    if policy == "keep":
      held |= warm & names
      warm -= names
    elif policy == "reset":
      warm -= names
      reset.update(dict.fromkeys(names, what))
    elif policy == "load":
      warm |= {v.name for v in members if v.kind != "slot" or v.param in warm}
  return warm, reset, held
