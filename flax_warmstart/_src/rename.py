"""Where a selected leaf comes from in the checkpoint.

In order of precedence: its own `var_name_to_prev_var_name` entry (an exact
name), the first `rename_rules` regex that fully matches its name (T5X's
assignment-map rules), its parameter's rename plus its slot path (for an
optimizer slot), else its own name. A rule's right side may be a transform
(`surgery.py`) instead of a template: it comes back with its templates
expanded, and a slot gets its parameter's transform over its own tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax_warmstart._src import surgery
from flax_warmstart._src.naming import Variable

PREV = "var_name_to_prev_var_name"


class Renamer:
  """Resolves checkpoint names; remembers which rules were used.

  Args:
    prev: `var_name_to_prev_var_name`.
    rules: `rename_rules`, `(regex, template, transform or None)` pairs.

  Examples:
    >>> r = Renamer({}, [(r"encoder/(.*)", r"old_encoder/\\1"), (r"head/.*", None)])
    >>> r.source(Variable("encoder/kernel", "param", 0, None, None, (), None))
    ('old_encoder/kernel', 'rename_rules[0]')
    >>> r.source(Variable("head/bias", "param", 1, None, None, (), None))
    (None, 'rename_rules[1]')
  """

  def __init__(self, prev: Mapping[str, str], rules: Sequence[tuple[str, Any]]) -> None:
    self.prev = prev
    self.rules = [(re.compile(pattern), template) for pattern, template in rules]
    self.used = [False] * len(self.rules)

  def _rule(self, name: str) -> tuple[Any, str] | None:
    for k, (regex, template) in enumerate(self.rules):
      match = regex.fullmatch(name)
      if match:
        self.used[k] = True
        if surgery.is_transform(template):
          return surgery.expand(template, match), f"rename_rules[{k}]"
        return (None if template is None else match.expand(template)), f"rename_rules[{k}]"
    return None

  def _name(self, name: str) -> tuple[Any, str] | None:
    if self.prev.get(name):
      return self.prev[name], PREV
    return self._rule(name)

  def source(self, v: Variable) -> tuple[Any, str | None]:
    """`(checkpoint name or transform, how)`: None when a rule keeps the leaf; `how` is None when not renamed."""
    found = self._name(v.name)
    if found is None and v.kind == "slot":
      found = self._name(v.param)
      if found is not None:
        old, how = found
        if surgery.is_transform(old):
          old = old.map_templates(lambda t: f"{t}/{v.slot}")
        elif old is not None:
          old = f"{old}/{v.slot}"
        found = old, f"{how} of its parameter"
    return found if found is not None else (v.name, None)

  def unused_rules(self, names: Sequence[str], selected: set[str]) -> list[str]:
    """Messages for rules that decided no selected name.

    Args:
      names: Every name of the state.
      selected: The selected names.

    Returns:
      One message per unused rule, saying why it was unused.
    """
    out = []
    for k, ((regex, template), used) in enumerate(zip(self.rules, self.used, strict=True)):
      if used:
        continue
      matches = [n for n in names if regex.fullmatch(n)]
      shadowed = [n for n in matches if n in selected]
      if shadowed:
        hint = (
          f" It matches {shadowed[0]!r}, but an earlier rule or var_name_to_prev_var_name decides it"
          " first: reorder or drop the rules."
        )
      elif matches:
        hint = f" It matches {len(matches)} unselected names (e.g. {matches[0]!r}): select them in vars_to_warm_start."
      else:
        hint = " Names are matched with re.fullmatch against flax_warmstart.variable_names(state)."
      out.append(f"rename_rules[{k}] ({regex.pattern!r} -> {template!r}) matched no selected variable.{hint}")
    return out
