"""A plan's rows as data: `Action`, `Reset`, `Reason`, `LeafPlan`, `WarmStartPlan`, and which leaf is the step.

Everything the executor and the log decide from is a field of a row (an
action, what is reset, a reason code, the chain of transforms); a row's
`reason` text is for people only. `planning.py` builds plans of these rows.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from flax_warmstart._src import report
from flax_warmstart._src.naming import Variable
from flax_warmstart._src.sources import Source
from flax_warmstart._src.surgery import Node
from flax_warmstart._src.transform import Cast, Take, Transform
from flax_warmstart._src.vocab import Remap

logger = logging.getLogger("flax_warmstart")


def is_optimizer(v: Variable) -> bool:
  """Optimizer state: leaves under `opt_state` (TrainState, nnx.Optimizer) or T5X's `state/param_states`."""
  path = v.slot or v.name
  return v.kind != "param" and (path.split("/")[0] == "opt_state" or path.startswith("state/param_states"))


STEP_NAMES = ("step", "state/step")


def is_step(v: Variable) -> bool:
  """The one rule for which leaf is the training step: `step` (TrainState, NNX) or T5X's `state/step`."""
  return v.kind == "other" and v.name in STEP_NAMES


class Action(enum.StrEnum):
  """What happens to a leaf.

  * `KEEP`: its current value stays.
  * `LOAD`: read from a checkpoint tensor (`LeafPlan.source`) through the
    row's chain of transforms.
  * `INIT`: computed fresh by `init_fn` (a leaf of an abstract state that is
    not loaded).
  * `RESET`: set fresh, as `LeafPlan.reset` says: the optimizer's init from
    the loaded parameters, or step 0.

  A `str` enum: rows compare equal to their value and print as it.

  Examples:
    >>> Action.LOAD == "load", str(Action.INIT)
    (True, 'init')
  """

  KEEP = "keep"
  LOAD = "load"
  INIT = "init"
  RESET = "reset"


class Reset(enum.StrEnum):
  """What a `RESET` row resets: optimizer state (`tx.init(params)`) or the step (0).

  Examples:
    >>> str(Reset.OPTIMIZER), Reset.STEP == "step"
    ('optimizer_state', True)
  """

  OPTIMIZER = "optimizer_state"
  STEP = "step"


class Reason(enum.StrEnum):
  """Which setting decided a row's action (the code; `LeafPlan.reason` is the text).

  Examples:
    >>> Reason("missing_skipped") is Reason.MISSING_SKIPPED
    True
  """

  SELECTED = "selected"  # vars_to_warm_start (or a policy's "load") selects it
  ASSIGNED = "assigned"  # an init_from_checkpoint assignment map names it
  NOT_SELECTED = "not_selected"
  NOT_ASSIGNED = "not_assigned"
  RULE_KEEPS = "rule_keeps"  # a rename rule with template None
  MISSING_SKIPPED = "missing_skipped"  # skip_missing=True and no such tensor
  RNG_NOT_IN_CHECKPOINT = "rng_not_in_checkpoint"  # RNG stream state the checkpoint does not hold keeps its own
  FACTORED_SLOT = "factored_slot"  # a factored slot cannot follow its parameter's vocabulary remap or transform
  POLICY_KEEP = "policy_keep"  # optimizer_state='keep' or step='keep' overrides the selection
  POLICY_RESET = "policy_reset"  # optimizer_state='reset' or step='reset'


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """What happens to one leaf of the live state.

  Attributes:
    name: The leaf's name under the naming contract.
    action: The `Action`.
    reason: Which setting decided the action, in words (for people).
    code: The same as a `Reason` code (for code).
    source: For `LOAD`, the checkpoint tensor read.
    shape: Shape of the live leaf.
    dtype: Dtype of the live leaf.
    source_shape: Shape of the checkpoint tensor, or None.
    source_dtype: Dtype of the checkpoint tensor.
    transforms: For `LOAD`, the chain from the checkpoint tensor to the leaf:
      a `Take` (vocabulary gather) and a final `Cast` where the dtypes differ.
    expr: For a `LOAD` through a rule's transform (`Take`, `Stack`,
      `Transpose`, `Reshape`, `Broadcast`): the resolved tree, with the
      checkpoint tensors it reads and the shape after every step
      (`flax_warmstart._src.surgery.Node`); `transforms` then holds only the
      final `Cast`.
    checkpoint: For `LOAD`, the source read (`flax_warmstart._src.sources.Source`).
    reset: For `RESET`, what is reset.
    renamed_by: For `LOAD`, the setting that renamed it (`"rename_rules[0]"`,
      `"var_name_to_prev_var_name"`), or None.
    step_leaf: Whether the leaf is the training step (`is_step`).
    sharding: The live leaf's (target) sharding, in words.
    kind: What the leaf holds (`Variable.label`): `array`, `scalar`,
      `key<threefry2x32>` (shape and dtype are its key data's), `str`,
      `object`.

  Examples:
    >>> import numpy as np
    >>> row = LeafPlan("dense/kernel", Action.LOAD, "selected", Reason.SELECTED, source="dense/kernel",
    ...                shape=(2, 2), dtype=np.dtype("float32"),
    ...                source_shape=(2, 2), source_dtype=np.dtype("float32"))
    >>> row.action == "load", row.cast, row.nbytes
    (True, False, 16)
  """

  name: str
  action: Action
  reason: str
  code: Reason = Reason.NOT_SELECTED
  source: str | None = None
  shape: tuple[int, ...] = ()
  dtype: np.dtype | None = None
  source_shape: tuple[int, ...] | None = None
  source_dtype: np.dtype | None = None
  transforms: tuple[Transform, ...] = ()
  checkpoint: Source | None = None
  reset: Reset | None = None
  renamed_by: str | None = None
  step_leaf: bool = False
  sharding: str = ""
  kind: str = "array"
  expr: Node | None = None

  @property
  def cast(self) -> bool:
    """Whether the checkpoint's dtype differs from the live leaf's (the chain ends in a `Cast`)."""
    return self.source_dtype is not None and self.dtype is not None and self.source_dtype != self.dtype

  @property
  def take(self) -> Take | None:
    """The chain's vocabulary gather, if any."""
    return next((t for t in self.transforms if isinstance(t, Take)), None)

  @property
  def remap(self) -> Remap | None:
    """The vocabulary remap of the chain's gather (its `VocabInfo`, mapping, statistics), if any."""
    take = self.take
    return None if take is None else take.remap

  @property
  def inputs(self) -> tuple[str, ...]:
    """The checkpoint tensors the leaf is computed from."""
    if self.expr is not None:
      return self.expr.inputs()
    return () if self.source is None else (self.source,)

  @property
  def reads(self) -> tuple[tuple[str, Any, int], ...]:
    """`(tensor, region, bytes)` read for this leaf: a whole tensor (region None), or one slice or rows of it."""
    if self.action is not Action.LOAD:
      return ()
    if self.expr is not None:
      return tuple(self.expr.reads())
    return ((self.source, None, self.nbytes),) if self.source is not None else ()

  def chain(self) -> str:
    """The way from the checkpoint to the leaf, with the shapes: `wte/embedding (50, 8) -> transpose (8, 50)`."""
    if self.expr is None:
      if self.source is None:
        return ""
      steps = [f"{self.source} {tuple(self.source_shape or ())}"] + [t.describe() for t in self.transforms]
    else:
      steps = [self.expr.describe()] + [t.describe() for t in self.transforms]
    return " -> ".join(steps)

  @classmethod
  def unloaded(cls, v: Variable, action: Action, reason: str, code: Reason, reset: Reset | None = None) -> LeafPlan:
    """A `KEEP` or `RESET` row for a live leaf."""
    return cls(
      v.name, action, reason, code, shape=v.shape, dtype=v.dtype, reset=reset, step_leaf=is_step(v), kind=v.label
    )

  @classmethod
  def loaded_from(
    cls,
    v: Variable,
    checkpoint: Source,
    source: Variable,
    reason: str,
    code: Reason,
    *,
    remap: Remap | None = None,
    renamed_by: str | None = None,
  ) -> LeafPlan:
    """A `LOAD` row: live leaf `v` from checkpoint tensor `source`, through a gather (with `remap`) and a cast."""
    chain: list[Transform] = [] if remap is None else [Take(remap=remap)]
    if source.dtype != v.dtype:
      chain.append(Cast(v.dtype))
    return cls(
      v.name,
      Action.LOAD,
      reason,
      code,
      source=source.name,
      shape=v.shape,
      dtype=v.dtype,
      source_shape=source.shape,
      source_dtype=source.dtype,
      transforms=tuple(chain),
      checkpoint=checkpoint,
      renamed_by=renamed_by,
      step_leaf=is_step(v),
      kind=v.label,
    )

  @classmethod
  def transformed(
    cls, v: Variable, checkpoint: Source, expr: Node, reason: str, code: Reason, *, renamed_by: str | None = None
  ) -> LeafPlan:
    """A `LOAD` row: live leaf `v` computed from checkpoint tensors by a rule's transform tree, then a cast."""
    inputs = expr.inputs()
    first = checkpoint.variables[inputs[0]] if inputs else None
    return cls(
      v.name,
      Action.LOAD,
      reason,
      code,
      source=inputs[0] if inputs else None,
      shape=v.shape,
      dtype=v.dtype,
      source_shape=None if first is None else first.shape,
      source_dtype=expr.dtype,
      transforms=(Cast(v.dtype),) if expr.dtype != v.dtype else (),
      checkpoint=checkpoint,
      renamed_by=renamed_by,
      step_leaf=is_step(v),
      kind=v.label,
      expr=expr,
    )

  @property
  def nbytes(self) -> int:
    """Bytes read from the checkpoint for this leaf (0 unless `LOAD`; a transform's reads only what it uses)."""
    if self.action is not Action.LOAD:
      return 0
    if self.expr is not None:
      return sum(n for _, _, n in self.expr.reads())
    if self.source_shape is None or self.source_dtype is None:
      return 0
    return int(np.prod(self.source_shape, dtype=np.int64)) * self.source_dtype.itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class WarmStartPlan:
  """A validated warm start: one `LeafPlan` per leaf, in the state's order.

  Attributes:
    checkpoints: The sources the plan reads from (metadata only), each read
      once.
    leaves: One `LeafPlan` per leaf of the live state.
    sources: What the plan was built from: `WarmStartSettings` or an
      assignment map, one per checkpoint source.
    warnings: What looks wrong but is carried out as asked (TensorFlow does
      the same silently): a selection that loads nothing, a vocabulary that
      matches no old token. Logged at WARNING when the plan is built, and
      shown by `print(plan)`, `to_dict()` and the command line.

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

  checkpoints: tuple[Source, ...]
  leaves: tuple[LeafPlan, ...]
  sources: tuple[Any, ...]
  warnings: tuple[str, ...] = ()

  @property
  def loaded(self) -> tuple[LeafPlan, ...]:
    """The leaves whose value comes from a checkpoint."""
    return tuple(leaf for leaf in self.leaves if leaf.action is Action.LOAD)

  @property
  def reset(self) -> tuple[LeafPlan, ...]:
    """The leaves set fresh (the optimizer's init, or step 0)."""
    return tuple(leaf for leaf in self.leaves if leaf.action is Action.RESET)

  @property
  def initialized(self) -> tuple[LeafPlan, ...]:
    """The leaves of an abstract state computed by `init_fn`."""
    return tuple(leaf for leaf in self.leaves if leaf.action is Action.INIT)

  @property
  def nbytes(self) -> int:
    """Total bytes read from the checkpoint."""
    # A tensor (or a slice of one) feeding several leaves is read once.
    return sum(
      {(id(leaf.checkpoint), name, region): n for leaf in self.loaded for name, region, n in leaf.reads}.values()
    )

  def summary(self) -> str:
    """One line: how many leaves come from where, and the bytes read."""
    kept = sum(leaf.action is Action.KEEP for leaf in self.leaves)
    where = " and ".join(c.describe() for c in self.checkpoints) or "no checkpoint"
    init = f", {len(self.initialized)} computed by init_fn" if self.initialized else ""
    reset = f", {len(self.reset)} reset" if self.reset else ""
    return (
      f"{len(self.loaded)} of {len(self.leaves)} leaves from {where},"
      f" {report.human_bytes(self.nbytes)} to read; {kept} kept at their current value{init}{reset}"
    )

  def unused_tensors(self) -> dict[str, list[str]]:
    """Per checkpoint (by `describe()`), the tensors that nothing reads."""
    used = {(id(row.checkpoint), name) for row in self.loaded for name in row.inputs}
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
    from flax_warmstart._src import provenance  # noqa: PLC0415 (provenance imports this module's types)

    return provenance.provenance(self)

  def _repr_html_(self) -> str:
    return report.to_html(self)

  def __str__(self) -> str:
    return report.table(self)


def log_warnings(warnings: Sequence[str]) -> tuple[str, ...]:
  """Logs each warning of a plan being built at WARNING, once; returns them for the plan."""
  out = tuple(dict.fromkeys(warnings))
  for warning in out:
    logger.warning("%s", warning)
  return out
