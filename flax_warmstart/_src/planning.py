"""The warm-start plan: one decided action per leaf of the live state (rows in `rows.py`, selection in `selection.py`).

A plan is built from names and metadata only, validated as a whole (every
problem of the request is reported at once, before any array is read), and
then executed by `flax_warmstart._src.execute`. `WarmStartSettings` and
assignment maps (`assignment.py`) are two ways to build the same kind of
plan. A row is data: an `Action`, a `Reason` code, what is reset, the input
tensor and the chain of transforms; its `reason` text is for people only,
and no code decides anything from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from flax_warmstart._src import surgery
from flax_warmstart._src.errors import WarmStartError, did_you_mean
from flax_warmstart._src.naming import Variable, load_problem
from flax_warmstart._src.rename import PREV, Renamer
from flax_warmstart._src.rows import Action, LeafPlan, Reason, Reset, WarmStartPlan, is_optimizer, is_step, log_warnings
from flax_warmstart._src.selection import apply_policies, select
from flax_warmstart._src.settings import WarmStartSettings
from flax_warmstart._src.sources import Source
from flax_warmstart._src.vocab import Remap, plan_remap

logger = logging.getLogger("flax_warmstart")


def check_can_reset(state: Any) -> None:
  """The one check that `optimizer_state='reset'` can be carried out for `state`.

  Args:
    state: The live state (its params and optimizer are needed), or None where
      no live state exists (the command line plans from checkpoints).

  Raises:
    WarmStartError: Unless `state` carries its optimizer (`tx`, `params`,
      `opt_state`, `replace`: a Flax `TrainState`).
  """
  if state is None:
    raise WarmStartError(
      "optimizer_state='reset' needs the live optimizer (state.tx), which a checkpoint does not hold;"
      " NEW's optimizer state already is its fresh init, so use optimizer_state='keep'."
    )
  if all(hasattr(state, attr) for attr in ("tx", "params", "opt_state", "replace")) and state.tx is None:
    raise WarmStartError(
      "optimizer_state='reset' needs the state's optimizer, but state.tx is None. Create the TrainState with its"
      " optimizer (TrainState.create(..., tx=optax.adam(...))), or use optimizer_state='keep'."
    )
  if not all(hasattr(state, attr) for attr in ("tx", "params", "opt_state", "replace")):
    raise WarmStartError(
      "optimizer_state='reset' needs a state that carries its optimizer (a flax TrainState with .tx,"
      f" .params and .opt_state); got {type(state).__name__}. A freshly created state already holds"
      " the optimizer's init: use optimizer_state='keep'."
    )


def resets_optimizer(plan: WarmStartPlan) -> bool:
  """Whether a plan resets optimizer state (and so needs `check_can_reset`)."""
  return any(row.reset is Reset.OPTIMIZER for row in plan.leaves)


def build_plan(
  variables: Sequence[Variable],
  leaves: Sequence[Any],
  checkpoint: Source,
  settings: WarmStartSettings,
) -> WarmStartPlan:
  """Decides one action per leaf and validates the whole request.

  Args:
    variables: The live state's named leaves (`naming.flatten_state`).
    leaves: The live state's leaves, in the same order.
    checkpoint: The source (its metadata).
    settings: What to warm-start.

  Returns:
    The plan.

  Raises:
    WarmStartError: Listing every problem: unused `var_name_to_prev_var_name`,
      `var_name_to_vocab_info` or `rename_rules` entries, selected variables
      missing from the checkpoint, shape mismatches, vocabulary problems.
  """
  warm, grouped, problems = select(variables, leaves, settings)
  warm, reset, held = apply_policies(variables, warm, settings)
  grouped |= warm
  prev = settings.var_name_to_prev_var_name
  vocab = settings.var_name_to_vocab_info
  slot_params = {v.param for v in variables if v.kind == "slot" and v.name in grouped}
  shapes = {v.name: v.shape for v in variables}

  for key, old in prev.items():
    if old and (key in grouped or key in slot_params):
      continue
    problems.append(_unused(PREV, key, old, grouped, variables, settings))
  for key in vocab:
    if key not in grouped:
      problems.append(_unused("var_name_to_vocab_info", key, None, grouped, variables, settings))

  ckpt = checkpoint.variables
  where = checkpoint.describe()
  renamer = Renamer(prev, settings.rename_rules)
  # One mapping per (parameter, shapes): a parameter's slots reuse it, and
  # vocabulary files are read once.
  remaps: dict[tuple[str, tuple[int, ...], tuple[int, ...]], Remap | None] = {}

  def remap_for(param: str, source: str, shape: tuple[int, ...], old_shape: tuple[int, ...]) -> Remap | None:
    key = (param, shape, old_shape)
    if key not in remaps:
      remaps[key], found_problems = plan_remap(param, source, shape, old_shape, vocab[param])
      problems.extend(found_problems)
    return remaps[key]

  rows = []
  for v in variables:
    if v.name in reset:
      what = reset[v.name]
      rows.append(LeafPlan.unloaded(v, Action.RESET, f"{what}='reset'", Reason.POLICY_RESET, reset=what))
      continue
    if v.name in held:
      policy = "step" if is_step(v) else "optimizer_state"
      rows.append(LeafPlan.unloaded(v, Action.KEEP, f"{policy}='keep'", Reason.POLICY_KEEP))
      continue
    if v.name not in warm:
      rows.append(LeafPlan.unloaded(v, Action.KEEP, "not selected", Reason.NOT_SELECTED))
      continue
    source, how = renamer.source(v)
    if source is None:
      rows.append(LeafPlan.unloaded(v, Action.KEEP, f"{how} keeps it", Reason.RULE_KEEPS))
      continue
    if surgery.is_transform(source):
      row = _surgery_row(v, source, how, checkpoint, shapes, v.name in vocab or v.param in vocab, problems)
      if row is not None:
        rows.append(row)
      continue
    via = f" (renamed from {v.name!r} by {how})" if how else ""
    found = ckpt.get(source)
    if found is None and v.rng:
      reason = f"RNG stream state, not in the checkpoint as {source!r}: keeps its own"
      rows.append(LeafPlan.unloaded(v, Action.KEEP, reason, Reason.RNG_NOT_IN_CHECKPOINT))
      continue
    if found is not None and (why := load_problem(v, found)) is not None:
      problems.append(f"{v.name!r} cannot load from checkpoint tensor {source!r}{via}: {why}.")
      continue
    if found is None:
      if settings.skip_missing:
        reason = f"missing from checkpoint as {source!r} (skip_missing)"
        rows.append(LeafPlan.unloaded(v, Action.KEEP, reason, Reason.MISSING_SKIPPED))
        continue
      hint = " or optimizer_state='reset'/'keep' if the optimizer changed," if is_optimizer(v) else ""
      problems.append(
        f"{v.name!r}: no tensor {source!r}{via} in checkpoint {where}."
        f"{did_you_mean(source, ckpt)} Map it with var_name_to_prev_var_name or rename_rules,"
        f" leave it out of vars_to_warm_start,{hint} or set skip_missing=True to keep its"
        " current value."
      )
      continue
    reason = "selected" + (f", renamed by {how}" if how else "")
    remap = None
    if v.name in vocab:
      remap = remap_for(v.name, source, v.shape, found.shape)
      if remap is None:
        continue
      stats = remap.mapping.stats()
      reason += f", vocabulary remap ({stats['copied']} copied, {stats['new']} new, {stats['oov']} OOV)"
    elif v.kind == "slot" and v.param in vocab:
      if v.shape != shapes.get(v.param):
        reason = f"factored slot of remapped {v.param!r}: cannot follow its rows, kept at its current (init) value"
        rows.append(LeafPlan.unloaded(v, Action.KEEP, reason, Reason.FACTORED_SLOT))
        continue
      remap = remap_for(v.param, source, v.shape, found.shape)
      if remap is None:
        continue
      remap = Remap(remap.info, remap.mapping, follows=v.param)
      reason += f", follows the vocabulary remap of {v.param!r}"
    elif found.shape != v.shape:
      problems.append(
        f"{v.name!r}: shape {v.shape} in the state, but the checkpoint tensor"
        f" {source!r}{via} has shape {found.shape}.{surgery.shape_hint(v.shape, found.shape, source)}"
      )
      continue
    rows.append(LeafPlan.loaded_from(v, checkpoint, found, reason, Reason.SELECTED, remap=remap, renamed_by=how))
  problems += renamer.unused_rules([v.name for v in variables], warm)
  if problems:
    raise WarmStartError(problems, header=f"Cannot warm-start from {where}")
  own = []
  if not any(row.action in (Action.LOAD, Action.RESET) for row in rows):
    chosen = "selects no variable" if not warm else f"selects {len(warm)} variables, none of which is loaded"
    own.append(
      f"vars_to_warm_start={settings.vars_to_warm_start!r} {chosen}: nothing is loaded from {where}"
      " (TensorFlow would do the same silently). Check the regexes against flax_warmstart.variable_names(state)."
    )
  # The vocabulary mapping logged its own warnings when it was built.
  vocab_warnings = [w for remap in remaps.values() if remap is not None for w in remap.mapping.warnings]
  warnings = log_warnings(own) + tuple(dict.fromkeys(vocab_warnings))
  return WarmStartPlan(checkpoints=(checkpoint,), leaves=tuple(rows), sources=(settings,), warnings=warnings)


def _surgery_row(
  v: Variable,
  spec: Any,
  how: str | None,
  checkpoint: Source,
  shapes: dict[str, Any],
  remapped: bool,
  problems: list[str],
) -> LeafPlan | None:
  """A `LOAD` row through a rule's transform, resolved against the checkpoint's metadata (None after a problem)."""
  where = f"{how} for {v.name!r}"
  if remapped:
    problems.append(
      f"{where}: a leaf with a VocabInfo (or a slot of one) cannot also load through {spec.describe()};"
      " remap its vocabulary or transform it, not both."
    )
    return None
  if v.kind == "slot" and v.shape != shapes.get(v.param):
    reason = f"factored slot of {v.param!r}: cannot follow its {spec.describe()}, kept at its current (init) value"
    return LeafPlan.unloaded(v, Action.KEEP, reason, Reason.FACTORED_SLOT)
  if v.shape is None or v.dtype is None or v.label not in ("array", "scalar"):
    problems.append(f"{where}: {spec.describe()} gives an array, but the leaf holds {v.label}.")
    return None
  node = surgery.resolve(
    spec, checkpoint.variables, expected=tuple(v.shape), slot=v.kind == "slot", where=where, problems=problems
  )
  if node is None:
    return None
  if node.shape != tuple(v.shape):
    problems.append(
      f"{where}: {node.describe()} gives shape {node.shape}, but {v.name!r} has shape {tuple(v.shape)}"
      f" in the state.{_rule_hint(v, node, checkpoint)}"
    )
    return None
  return LeafPlan.transformed(v, checkpoint, node, f"selected, transformed by {how}", Reason.SELECTED, renamed_by=how)


def _rule_hint(v: Variable, node: surgery.Node, checkpoint: Source) -> str:
  """For a transform that gives the wrong shape: what would fit the one tensor it reads, if one."""
  inputs = node.inputs()
  if len(inputs) != 1:
    return ""
  return surgery.shape_hint(tuple(v.shape), tuple(checkpoint.variables[inputs[0]].shape), inputs[0])


def combine(plans: Sequence[WarmStartPlan], overlap: str = "error") -> WarmStartPlan:
  """Merges the plans of several sources for one state into one plan.

  Args:
    plans: One plan per source, all for the same state.
    overlap: What to do when several sources load (or reset) the same leaf:
      `"error"`, `"first"` (the earliest source wins) or `"last"`.

  Returns:
    One plan; each distinct checkpoint appears once.

  Raises:
    WarmStartError: Listing the leaves claimed by several sources, with
      `overlap="error"`.
  """
  if overlap not in ("error", "first", "last"):
    raise WarmStartError(f"overlap must be 'error', 'first' or 'last', got {overlap!r}.")
  if len(plans) == 1:
    return plans[0]
  problems = []
  rows = []
  for leaf_rows in zip(*(p.leaves for p in plans), strict=True):
    claims = [(k, row) for k, row in enumerate(leaf_rows) if row.action is not Action.KEEP]
    if len(claims) > 1 and overlap == "error":
      who = " and ".join(f"source #{k} ({_describe_source(plans[k])})" for k, _ in claims)
      problems.append(
        f"{leaf_rows[0].name!r} is claimed by {who}. Narrow their selections, or pass overlap='first' or"
        " 'last' to say which source wins."
      )
    if not claims:
      rows.append(leaf_rows[0])
    else:
      rows.append((claims[0] if overlap != "last" else claims[-1])[1])
  if problems:
    raise WarmStartError(problems, header="Several sources load the same variables")
  checkpoints = tuple({id(c): c for p in plans for c in p.checkpoints}.values())
  return WarmStartPlan(
    checkpoints=checkpoints,
    leaves=tuple(rows),
    sources=tuple(s for p in plans for s in p.sources),
    warnings=tuple(w for p in plans for w in p.warnings),
  )


def describe_sharding(leaf: Any) -> str:
  """A live leaf's sharding in words: `P('data', None)`, `cpu:0`, `host`.

  Examples:
    >>> import numpy as np
    >>> describe_sharding(np.zeros(2))
    'host'
  """
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    return "default device" if isinstance(leaf, jax.ShapeDtypeStruct) else "host"
  spec = getattr(sharding, "spec", None)
  if spec is not None:
    return str(spec)
  devices = sharding.device_set
  return str(next(iter(devices))) if len(devices) == 1 else f"replicated on {len(devices)} devices"


def bind_leaves(plan: WarmStartPlan, leaves: Sequence[Any], *, abstract_is_init: bool = True) -> WarmStartPlan:
  """The plan for these live leaves: each row's target sharding, and `INIT` for abstract leaves not loaded.

  Args:
    plan: The plan, built for leaves of these names.
    leaves: The live leaves, in the plan's order.
    abstract_is_init: Whether an abstract leaf (`jax.ShapeDtypeStruct`) that
      the plan keeps is computed by `init_fn` (`INIT`). The command line
      plans over NEW's metadata, whose values it has, and passes False.

  Returns:
    The plan with `sharding` filled in and, for an abstract state, `KEEP`
    rows turned into `INIT`.
  """
  rows = []
  for row, leaf in zip(plan.leaves, leaves, strict=True):
    changes: dict[str, Any] = {"sharding": describe_sharding(leaf)}
    abstract = isinstance(leaf, jax.ShapeDtypeStruct)
    if abstract_is_init and row.action is Action.KEEP and abstract:
      changes["action"] = Action.INIT
    elif row.action is Action.INIT and not (abstract_is_init and abstract):
      changes["action"] = Action.KEEP
    rows.append(dataclasses.replace(row, **changes))
  return dataclasses.replace(plan, leaves=tuple(rows))


def _describe_source(plan: WarmStartPlan) -> str:
  return ", ".join(c.describe() for c in plan.checkpoints)


def _unused(
  field: str, key: str, old: str | None, grouped: set[str], variables: Sequence[Variable], settings: WarmStartSettings
) -> str:
  """The message for a `var_name_to_*` key that names no selected variable."""
  if field == "var_name_to_prev_var_name" and key in grouped and not old:
    return f"{field}[{key!r}] is empty: give the checkpoint name to load {key!r} from, or drop the entry."
  kinds = {v.name: v.kind for v in variables}
  if key in kinds:
    why = f"it is in the state but not selected by vars_to_warm_start={settings.vars_to_warm_start!r}"
    if isinstance(settings.vars_to_warm_start, str) and kinds[key] != "param":
      why += " (a str regex selects parameters only; use a list of regexes for other leaves)"
    return f"{field} key {key!r} was not used: {why}. Select it, or drop the entry."
  return (
    f"{field} key {key!r} was not used: no variable of the state has that name."
    f"{did_you_mean(key, kinds)} Perhaps you misspelled it? Names are listed by"
    " flax_warmstart.variable_names(state)."
  )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
  """Pauses Python's cyclic garbage collector while a plan is built.

  Planning allocates a few small objects per leaf while the process holds a
  large live state; the collections that this triggers walk every tracked
  object, and for 4,000 leaves took more than half of a plan's 0.65 s on this
  project's machine (0.28 s without). Nothing built here is cyclic garbage.

  Examples:
    >>> with gc_paused():
    ...   gc.isenabled()
    False
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()
