"""Executing a plan: read what it names, run each row's transforms, merge into a new state.

The steps after the plan, shared by `warm_start`, `init_from_checkpoint`,
the command line and the T5X hook: the read stage (`read.py`), each loaded
row's chain of transforms (`transform.py`), `init_fn` for the abstract leaves
not loaded, resets, and the merge back into a state of the input's type,
structure, shapes, dtypes and shardings. Every decision here is taken from a
row's fields (`Action`, `Reset`, `Reason`, the chain), never from its text.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from flax_warmstart._src import chain as chain_lib
from flax_warmstart._src import read as read_lib
from flax_warmstart._src import state as state_lib
from flax_warmstart._src import transform as transform_lib
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.naming import LeafKind, flatten_state, unwrap_split
from flax_warmstart._src.planning import bind_leaves, check_can_reset
from flax_warmstart._src.rows import Action, Reason, Reset, WarmStartPlan

logger = logging.getLogger("flax_warmstart")

State = TypeVar("State")


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str], None]]:
  """Yields `update(message)`: a status line on a terminal (rich), nothing when piped or disabled.

  Args:
    enabled: False to show nothing even on a terminal.

  Yields:
    A function that shows the current phase.

  Examples:
    >>> with progress(False) as update:
    ...   update("reading")
  """
  if not (enabled and sys.stderr.isatty()):
    yield lambda message: None
    return
  from rich.console import Console  # noqa: PLC0415 (only on a terminal)

  with Console(stderr=True).status("flax_warmstart") as status:
    yield status.update


def execute(
  plan: WarmStartPlan,
  state: State,
  *,
  rng: jax.Array | None = None,
  init_fn: Callable[[], Any] | None = None,
  show_progress: bool = True,
) -> State:
  """Carries out a plan: reads what it names and returns the merged state.

  Args:
    plan: From `flax_warmstart.plan`, for this state's structure.
    state: The live state in any form `warm_start` takes (NNX objects and
      `nnx.split` pairs too), or an abstract one; it is not modified.
    rng: PRNG key for random backup initializers of vocabulary remaps.
    init_fn: For an abstract state: a function of no arguments returning the
      state freshly initialised; only its leaves that are not loaded are
      computed (see `warm_start`).
    show_progress: Show the phase (reading, remapping) on a terminal.

  Returns:
    A new state of the same type, structure, shapes, dtypes and shardings:
    NNX objects come back as new objects (`nnx.merge`), PRNG keys as keys of
    their impl, strings and scalars as their type.

  Raises:
    WarmStartError: If `state` is not a state form, the plan was built for a
      state of other names, or an abstract leaf that is not loaded has no
      `init_fn` to compute it.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"w": jnp.ones((2,))})
    >>> import flax_warmstart as fws
    >>> state = {"w": jnp.zeros((2,))}
    >>> execute(fws.plan(state, path), state)["w"].tolist()
    [1.0, 1.0]
  """
  form = state_lib.recognise(state)
  variables, leaves, treedef = flatten_state(form.tree)
  if [v.name for v in variables] != [leaf.name for leaf in plan.leaves]:
    raise WarmStartError(
      "This plan was built for a state with other variables; build it again with"
      " flax_warmstart.plan(state, ...) for this state."
    )
  changed = [
    f"{v.name!r}: {v.shape} {v.dtype} in the state, {row.shape} {row.dtype} in the plan"
    for v, row in zip(variables, plan.leaves, strict=True)
    if (v.shape, v.dtype) != (row.shape, row.dtype)
  ]
  if changed:
    raise WarmStartError(
      changed, header="This plan was built for a state of other shapes or dtypes; build it again for this state"
    )
  # A PRNG key goes through the read and merge as its key data (what a checkpoint holds), and comes back a key.
  keys = [i for i, v in enumerate(variables) if v.leaf_kind is LeafKind.KEY]
  stored = list(leaves)
  for i in keys:
    stored[i] = _key_data(leaves[i])
  with progress(show_progress) as update:
    new_leaves = execute_leaves(plan, stored, rng=rng, init_fn=init_fn, state=form.tree, treedef=treedef, update=update)
  for i in keys:
    new_leaves[i] = _as_key(new_leaves[i], leaves[i], plan.leaves[i].action, variables[i].key_impl)
  # NNX objects come back as new objects (nnx.merge), a split pair as (graphdef, new state).
  return form.rebuild(jax.tree_util.tree_unflatten(treedef, new_leaves))


def _key_data(key: Any) -> Any:
  """A typed PRNG key leaf as its key data: an array, or abstractly with the key's sharding."""
  if isinstance(key, jax.ShapeDtypeStruct):
    data = jax.eval_shape(jax.random.key_data, key)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=key.sharding)
  return jax.random.key_data(key)


def _as_key(value: Any, live: Any, action: Action, impl: str | None) -> Any:
  """A key leaf after execution: kept as it was, computed by `init_fn` (a key already), or loaded key data wrapped."""
  if action is Action.KEEP:
    return live
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    return value
  return jax.random.wrap_key_data(value, impl=impl)


def execute_leaves(
  plan: WarmStartPlan,
  leaves: list[Any],
  *,
  rng: jax.Array | None = None,
  init_fn: Callable[[], Any] | None = None,
  state: Any = None,
  treedef: Any = None,
  update: Callable[[str], None] = lambda message: None,
) -> list[Any]:
  """`execute` on the flat leaves of a state, in the plan's order (new leaves, inputs untouched).

  Args:
    plan: The plan; its rows are the leaves' names, in order.
    leaves: The live leaves (`jax.ShapeDtypeStruct`s for an abstract state).
    rng: PRNG key for random backup initializers.
    init_fn: Computes the abstract leaves that are not loaded (see `execute`).
    state: The live state, needed only for `optimizer_state='reset'`.
    treedef: Its treedef, likewise.
    update: Called with the current phase, for a progress display.

  Returns:
    The new leaves.
  """
  traced = next((i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)), None)
  if traced is not None:
    raise WarmStartError(
      f"The state's leaf {plan.leaves[traced].name!r} is a tracer: warm_start reads checkpoint files and cannot"
      " run inside jax.jit (or vmap, grad). Call it once, outside any transformation, before training."
    )
  live = [_placed(x) for x in leaves]
  plan = bind_leaves(plan, leaves, abstract_is_init=True)
  keys = {i: None if rng is None else jax.random.fold_in(rng, i) for i in range(len(leaves))}
  # Everything that can fail comes before any read: the fills of new vocabulary
  # rows (a bad backup initializer), then the init of abstract leaves.
  fills = {
    i: transform_lib.initial_fill(row.remap, row.shape, live[i].dtype, keys[i], row.name)
    for i, row in enumerate(plan.leaves)
    if row.take is not None
  }
  new_leaves = [np.array(x) if isinstance(x, np.ndarray) else x for x in leaves]
  fresh = [i for i, row in enumerate(plan.leaves) if row.action is Action.INIT]
  if fresh:
    update(f"Initialising {len(fresh)} leaves that are not loaded")
    for i, value in zip(fresh, _init_leaves(init_fn, fresh, plan, live), strict=True):
      new_leaves[i] = value
  chain_lib.check_keys(plan, rng)
  fetched = read_lib.read_inputs(plan, live, update, fills)
  surgery = [i for i, row in enumerate(plan.leaves) if row.action is Action.LOAD and row.expr is not None]
  if surgery:
    update(f"Reading and transforming {len(surgery)} leaves")
    nbytes = sum(plan.leaves[i].nbytes for i in surgery)
    computed = chain_lib.run(
      plan, surgery, keys, max_bytes_in_flight=max(read_lib.MIN_BYTES_IN_FLIGHT, nbytes // 10), live=live
    )
  for i, row in enumerate(plan.leaves):
    if row.action is Action.LOAD and row.expr is not None:
      new_leaves[i] = transform_lib.conform(computed.pop(i), live[i])
    elif row.action is Action.LOAD:
      got = fetched.pop(i)
      value, take = got.value, row.take
      if take is not None and got.filled:
        pass
      elif take is not None and got.taken:
        index = take.index
        transform_lib.fill_missing(value, index, fills[i], transform_lib.fill_index_of(take.remap), axis=take.axis)
      elif take is not None:
        update(f"Remapping the vocabulary of {row.name}")
        value = transform_lib.apply_take(take, value, fills[i], live[i], keys[i])
      new_leaves[i] = transform_lib.conform(value, live[i])
    elif row.reset is Reset.STEP:
      new_leaves[i] = transform_lib.conform(np.zeros(row.shape, row.dtype), live[i])
  if any(row.reset is Reset.OPTIMIZER for row in plan.leaves):
    new_leaves = _reset_optimizer(plan, state, treedef, live, new_leaves)
  _log(plan)
  return new_leaves


def _placed(leaf: Any) -> Any:
  """An abstract leaf without a sharding is placed on the default device, like a fresh array."""
  if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
    # This process's first device (jax.devices()[0] is process 0's, which the others cannot address).
    device = jax.local_devices()[0]
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
  return leaf


def _init_leaves(init_fn: Callable[[], Any] | None, indices: list[int], plan: WarmStartPlan, live: list[Any]) -> list:
  """The abstract leaves that are not loaded, computed by `init_fn` under `jit` with only them as outputs.

  XLA drops the computations of every other leaf, so the loaded ones are never
  initialised, and each output is made directly with its leaf's sharding.
  """
  names = [plan.leaves[i].name for i in indices]
  if init_fn is not None and not callable(init_fn):
    raise WarmStartError(
      f"init_fn must be a function of no arguments returning the freshly initialised state, got"
      f" {type(init_fn).__name__} {init_fn!r}."
    )
  if init_fn is None:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise WarmStartError(
      f"The state is abstract (jax.ShapeDtypeStruct leaves) and {len(names)} of its leaves are not loaded from"
      f" the checkpoint: {shown}. Pass init_fn= (a function of no arguments returning the freshly initialised"
      " state, e.g. functools.partial(create_train_state, jax.random.key(0))) to compute them, or load them."
    )

  def fresh() -> list[Any]:
    try:
      made = init_fn()
    except WarmStartError:
      raise
    except Exception as err:
      raise WarmStartError(
        f"init_fn ({getattr(init_fn, '__qualname__', type(init_fn).__name__)}) failed: {type(err).__name__}:"
        f" {err}. It is called with no arguments (bind them with functools.partial) and must return the freshly"
        f" initialised state; it computes the {len(names)} leaves not loaded, e.g. {names[0]!r}."
      ) from err
    variables, values, _ = flatten_state(unwrap_split(made))
    if [v.name for v in variables] != [row.name for row in plan.leaves]:
      theirs, ours = {v.name for v in variables}, {row.name for row in plan.leaves}
      raise WarmStartError(
        "init_fn returns a state with other variables than the abstract state's:"
        f" only in init_fn's: {sorted(theirs - ours)[:5]}; only in the state: {sorted(ours - theirs)[:5]}."
      )
    # Compared as jit returns them: a Python int step comes out as int32 without x64.
    wrong = [
      f"{variables[i].name!r}: init_fn gives {variables[i].shape} {variables[i].dtype}, the state has"
      f" {plan.leaves[i].shape} {plan.leaves[i].dtype}"
      for i in indices
      if variables[i].shape != plan.leaves[i].shape
      or jax.dtypes.canonicalize_dtype(variables[i].dtype) != jax.dtypes.canonicalize_dtype(plan.leaves[i].dtype)
    ]
    if wrong:
      raise WarmStartError(wrong, header="init_fn returns leaves of other shapes or dtypes than the abstract state's")
    return [values[i] for i in indices]

  return jax.jit(fresh, out_shardings=[live[i].sharding for i in indices])()


def _reset_optimizer(
  plan: WarmStartPlan, state: Any, treedef: Any, live: list[Any], new_leaves: list[Any]
) -> list[Any]:
  """The optimizer's fresh init for the reset leaves, from the warm-started params."""
  check_can_reset(state)
  merged = jax.tree_util.tree_unflatten(treedef, new_leaves)
  fresh = merged.replace(opt_state=merged.tx.init(merged.params))
  fresh_leaves = flatten_state(fresh)[1]
  out = list(new_leaves)
  for i, row in enumerate(plan.leaves):
    if row.reset is Reset.OPTIMIZER:
      out[i] = transform_lib.conform(fresh_leaves[i], live[i])
  return out


def _kind(dtype: np.dtype) -> str:
  """float, int, bool, complex, or other: bfloat16 is a float, though numpy calls it kind 'V'."""
  for kind in (jnp.floating, jnp.integer, jnp.bool_, jnp.complexfloating):
    if jnp.issubdtype(dtype, kind):
      return kind.__name__
  return str(dtype)


def _log(plan: WarmStartPlan) -> None:
  logger.info("Warm-started %s.", plan.summary())
  for row in plan.loaded:  # TF's DEBUG line for each variable warm-started (not those initialised or reset)
    logger.debug(
      "Warm-starting variable: %s; prev_var_name: %s", row.name, row.source if row.source != row.name else "Unchanged"
    )
  for row in plan.loaded:
    if row.remap is not None and row.remap.follows is None:
      stats = ", ".join(f"{n} {k}" for k, n in row.remap.mapping.stats().items())
      logger.info("Remapped vocabulary of %r (axis %d) from %r: %s.", row.name, row.remap.info.axis, row.source, stats)
  factored = [row.name for row in plan.leaves if row.code is Reason.FACTORED_SLOT]
  if factored:
    logger.warning("Kept at their init value, as they cannot follow a vocabulary remap: %s", ", ".join(factored))
  casts = [row for row in plan.loaded if row.cast]
  if casts:
    shown = ", ".join(f"{row.name} ({row.source_dtype}->{row.dtype})" for row in casts[:5])
    more = f" and {len(casts) - 5} more" if len(casts) > 5 else ""
    logger.info("Cast %d leaves to the state's dtype: %s%s.", len(casts), shown, more)
    for row in casts:
      if _kind(row.source_dtype) != _kind(row.dtype):
        logger.warning(
          "Warm-starting %r casts %s to %s, a change of kind that can lose information.",
          row.name,
          row.source_dtype,
          row.dtype,
        )
  missing = [row.name for row in plan.leaves if row.code is Reason.MISSING_SKIPPED]
  if missing:
    logger.warning(
      "Kept the current value of %d selected leaves missing from the checkpoint (skip_missing=True): %s",
      len(missing),
      ", ".join(missing),
    )
  for row in plan.leaves:
    step_loaded = row.action is Action.LOAD and row.step_leaf
    if step_loaded or row.reset is Reset.STEP:
      how = f"loaded from {row.checkpoint.describe()}" if step_loaded else "reset to 0"
      effect = "continue from the old step" if step_loaded else "restart from step 0"
      logger.info("%s %s: learning-rate schedules %s.", row.name, how, effect)
  resets = [row.name for row in plan.reset if row.reset is Reset.OPTIMIZER]
  if resets:
    logger.info("Reset %d optimizer-state leaves to the optimizer's fresh init.", len(resets))
