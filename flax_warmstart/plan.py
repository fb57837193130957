"""The warm-start plan: one decided action per leaf of the live state.

A plan is built from names and metadata only, validated as a whole (every
problem of the request is reported at once, before any array is read), and
then executed by `flax_warmstart.warm_start`. `WarmStartSettings` and, later,
assignment maps are two ways to build the same kind of plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np

from flax_warmstart import report
from flax_warmstart.checkpoint import Checkpoint
from flax_warmstart.errors import WarmStartError, did_you_mean
from flax_warmstart.naming import Variable
from flax_warmstart.rename import PREV, Renamer
from flax_warmstart.settings import WarmStartSettings
from flax_warmstart.vocab import Remap, plan_remap

logger = logging.getLogger("flax_warmstart")

Action = Literal["copy", "remap", "keep", "reset"]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """What happens to one leaf of the live state.

  Attributes:
    name: The leaf's name under the naming contract.
    action: `"copy"` (from checkpoint tensor `source`), `"remap"` (from
      `source` through a vocabulary remap), `"keep"` (the current value
      stays) or `"reset"` (the optimizer's fresh init, or step 0).
    reason: Which setting decided the action, in words.
    source: The checkpoint name read, or None for `keep`.
    shape: Shape of the live leaf.
    dtype: Dtype of the live leaf.
    source_shape: Shape of the checkpoint tensor, or None.
    source_dtype: Dtype of the checkpoint tensor (cast to `dtype` if different).
    remap: For `remap`, the vocabulary remap (its `VocabInfo`, row mapping and
      statistics).
    checkpoint: For `copy` and `remap`, the checkpoint read.
    sharding: The live leaf's (target) sharding, in words.

  Examples:
    >>> import numpy as np
    >>> row = LeafPlan("dense/kernel", "copy", "selected", source="dense/kernel",
    ...                shape=(2, 2), dtype=np.dtype("float32"),
    ...                source_shape=(2, 2), source_dtype=np.dtype("float32"))
    >>> row.cast, row.nbytes
    (False, 16)
  """

  name: str
  action: Action
  reason: str
  source: str | None = None
  shape: tuple[int, ...] = ()
  dtype: np.dtype | None = None
  source_shape: tuple[int, ...] | None = None
  source_dtype: np.dtype | None = None
  remap: Remap | None = None
  checkpoint: Checkpoint | None = None
  sharding: str = ""

  @property
  def cast(self) -> bool:
    """Whether the checkpoint's dtype differs from the live leaf's."""
    return self.source_dtype is not None and self.source_dtype != self.dtype

  @classmethod
  def unloaded(cls, v: Variable, action: Action, reason: str) -> LeafPlan:
    """A `keep` or `reset` row for a live leaf."""
    return cls(v.name, action, reason, shape=v.shape, dtype=v.dtype)

  @classmethod
  def loaded_from(
    cls, v: Variable, checkpoint: Checkpoint, source: Variable, reason: str, remap: Remap | None = None
  ) -> LeafPlan:
    """A `copy` (or, with `remap`, a `remap`) row: live leaf `v` from checkpoint tensor `source`."""
    return cls(
      v.name,
      "copy" if remap is None else "remap",
      reason,
      source=source.name,
      shape=v.shape,
      dtype=v.dtype,
      source_shape=source.shape,
      source_dtype=source.dtype,
      remap=remap,
      checkpoint=checkpoint,
    )

  @property
  def nbytes(self) -> int:
    """Bytes read from the checkpoint for this leaf (0 for `keep`)."""
    if self.action == "keep" or self.source_shape is None or self.source_dtype is None:
      return 0
    return int(np.prod(self.source_shape, dtype=np.int64)) * self.source_dtype.itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class WarmStartPlan:
  """A validated warm start: one `LeafPlan` per leaf, in the state's order.

  Attributes:
    checkpoints: The checkpoints the plan reads from (metadata only), each
      read once.
    leaves: One `LeafPlan` per leaf of the live state.
    sources: What the plan was built from: `WarmStartSettings` or an
      assignment map, one per checkpoint source.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> import flax_warmstart as fws
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"w": jnp.ones((4,)), "b": jnp.ones(())})
    >>> p = fws.plan({"w": jnp.zeros((4,)), "b": jnp.zeros(())}, path,
    ...              fws.WarmStartSettings(path, vars_to_warm_start="w"))
    >>> [leaf.name for leaf in p.loaded], p.nbytes
    (['w'], 16)
    >>> print(p.summary())  # doctest: +ELLIPSIS
    1 of 2 leaves from .../ckpt, 16 B to read; 1 kept at their current value
  """

  checkpoints: tuple[Checkpoint, ...]
  leaves: tuple[LeafPlan, ...]
  sources: tuple[Any, ...]

  @property
  def loaded(self) -> tuple[LeafPlan, ...]:
    """The leaves whose value comes from a checkpoint."""
    return tuple(leaf for leaf in self.leaves if leaf.action in ("copy", "remap"))

  @property
  def reset(self) -> tuple[LeafPlan, ...]:
    """The leaves set to the optimizer's fresh init (or step 0)."""
    return tuple(leaf for leaf in self.leaves if leaf.action == "reset")

  @property
  def nbytes(self) -> int:
    """Total bytes read from the checkpoint."""
    # A tensor feeding several leaves is read once.
    return sum({(id(leaf.checkpoint), leaf.source): leaf.nbytes for leaf in self.loaded}.values())

  def summary(self) -> str:
    """One line: how many leaves come from where, and the bytes read."""
    kept = len(self.leaves) - len(self.loaded) - len(self.reset)
    where = " and ".join(c.describe() for c in self.checkpoints) or "no checkpoint"
    reset = f", {len(self.reset)} reset" if self.reset else ""
    return (
      f"{len(self.loaded)} of {len(self.leaves)} leaves from {where},"
      f" {report.human_bytes(self.nbytes)} to read; {kept} kept at their current value{reset}"
    )

  def unused_tensors(self) -> dict[str, list[str]]:
    """Per checkpoint (by `describe()`), the tensors that nothing reads."""
    used = {(id(row.checkpoint), row.source) for row in self.loaded}
    return {c.describe(): [n for n in c.variables if (id(c), n) not in used] for c in self.checkpoints}

  def to_dict(self) -> dict[str, Any]:
    """The plan as JSON-ready data: summary, checkpoints, sources, one dict per leaf, unused tensors."""
    return report.to_dict(self)

  def to_json(self, indent: int | None = 2) -> str:
    """`to_dict()` as JSON text."""
    return json.dumps(self.to_dict(), indent=indent)

  def provenance(self) -> dict[str, Any]:
    """A small JSON record of where each leaf came from, to save with the next checkpoint.

    See `flax_warmstart.load_provenance`.
    """
    return report.provenance(self)

  def _repr_html_(self) -> str:
    return report.to_html(self)

  def __str__(self) -> str:
    return report.table(self)


def _matcher(pattern: str, problems: list[str]) -> Callable[[str], bool]:
  """TensorFlow's matching: `re.match` on `name` or on the tensor name `name:0`."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    problems.append(f"vars_to_warm_start regex {pattern!r} is not a valid regex: {e}.")
    return lambda name: False
  return lambda name: bool(regex.match(name) or regex.match(name + ":0"))


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
    match = _matcher(spec, problems)
    grouped = {name for name in params if match(name)}
  elif isinstance(spec, tuple):
    matchers = [_matcher(p, problems) for p in spec]
    grouped = {v.name for v in variables if any(m(v.name) for m in matchers)}
  else:
    grouped = {v.name for v, leaf in zip(variables, leaves, strict=True) if spec(v.name, leaf)}
  return set(grouped), grouped, problems


def _is_optimizer(v: Variable) -> bool:
  """Optimizer state: leaves under `opt_state` (TrainState, nnx.Optimizer) or T5X's `state/param_states`."""
  path = v.slot or v.name
  return v.kind != "param" and (path.split("/")[0] == "opt_state" or path.startswith("state/param_states"))


def _is_step(v: Variable) -> bool:
  return v.kind == "other" and v.name in ("step", "state/step")


def apply_policies(
  variables: Sequence[Variable], warm: set[str], settings: WarmStartSettings
) -> tuple[set[str], dict[str, str]]:
  """Applies `optimizer_state` and `step`: returns the new warm set and `{name: reason}` of leaves to reset."""
  warm = set(warm)
  reset: dict[str, str] = {}
  for policy, members, what in (
    (settings.optimizer_state, [v for v in variables if _is_optimizer(v)], "optimizer_state"),
    (settings.step, [v for v in variables if _is_step(v)], "step"),
  ):
    names = {v.name for v in members}
    if policy == "keep":
      warm -= names
    elif policy == "reset":
      warm -= names
      reset.update(dict.fromkeys(names, f"{what}='reset'"))
    elif policy == "load":
      warm |= {v.name for v in members if v.kind != "slot" or v.param in warm}
  return warm, reset


def build_plan(
  variables: Sequence[Variable],
  leaves: Sequence[Any],
  checkpoint: Checkpoint,
  settings: WarmStartSettings,
) -> WarmStartPlan:
  """Decides one action per leaf and validates the whole request.

  Args:
    variables: The live state's named leaves (`naming.flatten_state`).
    leaves: The live state's leaves, in the same order.
    checkpoint: The checkpoint's metadata.
    settings: What to warm-start.

  Returns:
    The plan.

  Raises:
    WarmStartError: Listing every problem: unused `var_name_to_prev_var_name`,
      `var_name_to_vocab_info` or `rename_rules` entries, selected variables
      missing from the checkpoint, shape mismatches, vocabulary problems.
  """
  warm, grouped, problems = select(variables, leaves, settings)
  warm, reset = apply_policies(variables, warm, settings)
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
      rows.append(LeafPlan.unloaded(v, "reset", reset[v.name]))
      continue
    if v.name not in warm:
      rows.append(LeafPlan.unloaded(v, "keep", "not selected"))
      continue
    source, how = renamer.source(v)
    if source is None:
      rows.append(LeafPlan.unloaded(v, "keep", f"{how} keeps it"))
      continue
    via = f" (renamed from {v.name!r} by {how})" if how else ""
    found = ckpt.get(source)
    if found is None:
      if settings.skip_missing:
        reason = f"missing from checkpoint as {source!r} (skip_missing)"
        rows.append(LeafPlan.unloaded(v, "keep", reason))
        continue
      hint = " or optimizer_state='reset'/'keep' if the optimizer changed," if _is_optimizer(v) else ""
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
        rows.append(LeafPlan.unloaded(v, "keep", reason))
        continue
      remap = remap_for(v.param, source, v.shape, found.shape)
      if remap is None:
        continue
      remap = Remap(remap.info, remap.mapping, follows=v.param)
      reason += f", follows the vocabulary remap of {v.param!r}"
    elif found.shape != v.shape:
      problems.append(
        f"{v.name!r}: shape {v.shape} in the state, but the checkpoint tensor"
        f" {source!r}{via} has shape {found.shape}. Leave it out of"
        " vars_to_warm_start, or give it a VocabInfo if its rows are a vocabulary."
      )
      continue
    rows.append(LeafPlan.loaded_from(v, checkpoint, found, reason, remap))
  problems += renamer.unused_rules([v.name for v in variables], warm)
  if problems:
    raise WarmStartError(problems, header=f"Cannot warm-start from {where}")
  return WarmStartPlan(checkpoints=(checkpoint,), leaves=tuple(rows), sources=(settings,))


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
    claims = [(k, row) for k, row in enumerate(leaf_rows) if row.action != "keep"]
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
  return WarmStartPlan(checkpoints=checkpoints, leaves=tuple(rows), sources=tuple(s for p in plans for s in p.sources))


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


def with_shardings(plan: WarmStartPlan, leaves: Sequence[Any]) -> WarmStartPlan:
  """The plan with each row's target sharding filled in from the live leaves."""
  rows = tuple(
    dataclasses.replace(row, sharding=describe_sharding(leaf)) for row, leaf in zip(plan.leaves, leaves, strict=True)
  )
  return dataclasses.replace(plan, leaves=rows)


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
