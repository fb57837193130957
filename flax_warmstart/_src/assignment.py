"""`init_from_checkpoint`: TensorFlow's assignment maps, as a warm-start plan.

`tf.compat.v1.train.init_from_checkpoint(ckpt_dir_or_file, assignment_map)`
maps checkpoint names (left) to variables or scopes of the live state (right):

* `{"old/var": "new/var"}`: one tensor into one variable.
* `{"old_scope/": "new_scope/"}`: every variable under `new_scope/` (at any
  depth; `new_scope/` does not capture `new_scope_1/`) loads the tensor of the
  same relative name under `old_scope/`.
* `{"/": "new_scope/"}`: from the checkpoint's root; `{"old_scope/": "/"}`:
  into every variable; `{"/": "/"}`: every variable by its own name.
* A list of `(ckpt_name, new_name)` pairs loads one tensor into several
  variables. Pairs are processed sorted by checkpoint name (stable), and when
  a variable is assigned twice the last one wins.
* On the checkpoint side, a transform (`fws.Transpose("wte/embedding")`,
  `fws.Take("layers/kernel", axis=0, index=3)`, ...; see `surgery.py`) in
  place of a name, mapped to one variable: `{fws.Transpose("wte/embedding"):
  "lm_head/kernel"}`.

Variables are every leaf of the state under the naming contract (parameters,
optimizer slots, statistics, `step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax_warmstart._src import surgery
from flax_warmstart._src.errors import WarmStartError, did_you_mean
from flax_warmstart._src.naming import Variable, load_problem
from flax_warmstart._src.rows import Action, LeafPlan, Reason, WarmStartPlan, log_warnings
from flax_warmstart._src.sources import Source

AssignmentMap = Mapping[Any, str] | Sequence[tuple[Any, str]]


def _ckpt_key(pair: tuple[Any, str]) -> str:
  return pair[0].inner() if surgery.is_transform(pair[0]) else pair[0]


def _pairs(assignment_map: AssignmentMap) -> list[tuple[Any, str]]:
  if isinstance(assignment_map, Mapping):
    pairs = list(assignment_map.items())
  elif isinstance(assignment_map, Sequence) and not isinstance(assignment_map, str):
    pairs = list(assignment_map)
  else:
    raise WarmStartError(
      f"assignment_map must be a dict or a list of (ckpt_name, new_name) pairs, got {type(assignment_map).__name__}."
    )

  def ok(p: Any) -> bool:
    pair = isinstance(p, tuple | list) and len(p) == 2 and isinstance(p[1], str)
    return pair and (isinstance(p[0], str) or surgery.is_transform(p[0]))

  bad = [p for p in pairs if not ok(p)]
  if bad:
    raise WarmStartError(
      "assignment_map entries must be (ckpt_name: str or a transform such as fws.Transpose(...), new_name: str)"
      f" pairs; got {bad[0]!r}."
    )
  return sorted(((a, str(b)) for a, b in pairs), key=_ckpt_key)


def build_assignment_plan(
  variables: Sequence[Variable],
  checkpoint: Source,
  assignment_map: AssignmentMap,
  *,
  allow_empty_scopes: bool = False,
) -> WarmStartPlan:
  """Builds the plan of `init_from_checkpoint`.

  Args:
    variables: The live state's named leaves.
    checkpoint: The checkpoint's metadata.
    assignment_map: Checkpoint name or scope -> variable name or scope.
    allow_empty_scopes: If True, a scope mapping whose target scope holds no
      variable is skipped (TensorFlow's behaviour) instead of an error.

  Returns:
    The plan.

  Raises:
    WarmStartError: Listing every problem: missing tensors, malformed pairs,
      shape mismatches, empty target scopes.
  """
  by_name = {v.name: v for v in variables}
  names = sorted(by_name)
  ckpt = checkpoint.variables
  where = checkpoint.describe()
  problems: list[str] = []
  assigned: dict[str, tuple[Any, str]] = {}  # variable -> (checkpoint name or resolved transform, pair that set it)

  def assign(var: str, tensor: str, pair: str) -> None:
    v, found = by_name[var], ckpt[tensor]
    why = load_problem(v, found)
    if why is not None:
      problems.append(
        f"Variable {var!r} cannot load tensor {tensor!r} from checkpoint {where} (assignment {pair}): {why}."
      )
      return
    if found.shape != v.shape:
      problems.append(
        f"Shape of variable {var!r} ({v.shape}) doesn't match with shape of tensor {tensor!r} ({found.shape})"
        f" from checkpoint {where} (assignment {pair}).{surgery.shape_hint(v.shape, found.shape, tensor)}"
      )
      return
    assigned[var] = (tensor, pair)

  for ckpt_name, target in _pairs(assignment_map):
    pair = f"{ckpt_name!r}: {target!r}"
    if surgery.is_transform(ckpt_name):  # a transform into one variable
      if target not in by_name:
        problems.append(
          f"Assignment {pair}: a transform assigns one variable, and {target!r} is not a variable of the state."
          f"{did_you_mean(target, names)}"
        )
        continue
      v = by_name[target]
      node = surgery.resolve(
        ckpt_name, ckpt, expected=tuple(v.shape or ()), slot=False, where=f"Assignment {pair}", problems=problems
      )
      if node is not None and node.shape != tuple(v.shape or ()):
        problems.append(
          f"Assignment {pair}: {node.describe()} gives shape {node.shape}, but variable {target!r} has shape"
          f" {v.shape}.{surgery.shape_hint(tuple(v.shape or ()), node.shape, ckpt_name.inner())}"
        )
      elif node is not None:
        assigned[target] = (node, pair)
      continue
    if target in by_name:  # One tensor into one variable.
      if ckpt_name not in ckpt:
        problems.append(
          f"Tensor {ckpt_name!r} is not found in {where} checkpoint (assignment {pair}).{did_you_mean(ckpt_name, ckpt)}"
        )
      else:
        assign(target, ckpt_name, pair)
      continue
    if not target.endswith("/"):
      scope = target.rsplit("/", 1)[0] + "/" if "/" in target else ""
      problems.append(
        f"Assignment {pair}: {target!r} is neither a variable of the state nor a scope ending in '/'"
        f" (TensorFlow would silently use scope {scope!r})."
        f"{did_you_mean(target, names)} Write 'scope/' for a scope."
      )
      continue
    if not ckpt_name.endswith("/"):
      problems.append(
        f"Assignment map with scope only name {target!r} should map to scope only {ckpt_name!r}."
        f" Should be 'scope/': 'other_scope/' (assignment {pair})."
      )
      continue
    scope = "" if target == "/" else target
    members = [n for n in names if n.startswith(scope)]
    if not members:
      if not allow_empty_scopes:
        problems.append(
          f"Assignment {pair}: no variable of the state is under scope {target!r}"
          f" (TensorFlow would do nothing).{did_you_mean(target, names)} Fix the scope, or pass"
          " allow_empty_scopes=True to skip it."
        )
      continue
    for var in members:
      tensor = var[len(scope) :] if ckpt_name == "/" else ckpt_name + var[len(scope) :]
      if tensor not in ckpt:
        problems.append(
          f"Tensor {tensor!r} ({var[len(scope) :]!r} in {ckpt_name!r}) is not found in {where} checkpoint"
          f" (for variable {var!r}, assignment {pair}).{did_you_mean(tensor, ckpt)}"
        )
        continue
      assign(var, tensor, pair)
  if problems:
    raise WarmStartError(problems, header=f"Cannot init_from_checkpoint {where}")
  rows = []
  for v in variables:
    if v.name in assigned:
      tensor, pair = assigned[v.name]
      if isinstance(tensor, surgery.Node):
        rows.append(LeafPlan.transformed(v, checkpoint, tensor, f"assignment {pair}", Reason.ASSIGNED, renamed_by=pair))
      else:
        rows.append(LeafPlan.loaded_from(v, checkpoint, ckpt[tensor], f"assignment {pair}", Reason.ASSIGNED))
    else:
      rows.append(LeafPlan.unloaded(v, Action.KEEP, "not in assignment_map", Reason.NOT_ASSIGNED))
  warnings = []
  if not assigned:
    warnings.append(
      f"The assignment_map {'is empty' if not _pairs(assignment_map) else 'assigns no variable'}: nothing is"
      f" loaded from {where} (TensorFlow would do the same silently)."
    )
  return WarmStartPlan(
    checkpoints=(checkpoint,), leaves=tuple(rows), sources=(assignment_map,), warnings=log_warnings(warnings)
  )
