"""`warm_start`: build a plan from settings, then execute it on the live state."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from flax_warmstart import checkpoint as checkpoint_lib
from flax_warmstart import remap as remap_lib
from flax_warmstart.assignment import AssignmentMap, build_assignment_plan
from flax_warmstart.errors import WarmStartError
from flax_warmstart.naming import flatten_state, is_nnx_split
from flax_warmstart.plan import LeafPlan, WarmStartPlan, build_plan, combine
from flax_warmstart.settings import WarmStartSettings

logger = logging.getLogger("flax_warmstart")

State = TypeVar("State")
CkptOrSettings = str | os.PathLike | WarmStartSettings


def _settings(ckpt_or_settings: CkptOrSettings | None, settings: WarmStartSettings | None) -> WarmStartSettings:
  """Reconciles the call forms `(ckpt)`, `(settings)` and `(ckpt, settings)`."""
  if isinstance(ckpt_or_settings, WarmStartSettings):
    if settings is not None:
      raise WarmStartError(
        "Pass WarmStartSettings once: warm_start(state, settings) or warm_start(state, ckpt_dir, settings)."
      )
    return ckpt_or_settings
  if settings is not None and not isinstance(settings, WarmStartSettings):
    raise WarmStartError(f"settings must be a flax_warmstart.WarmStartSettings, got {type(settings).__name__}.")
  if ckpt_or_settings is None:
    if settings is None:
      raise WarmStartError("No checkpoint given: pass a checkpoint directory or a WarmStartSettings.")
    return settings
  if not isinstance(ckpt_or_settings, str | os.PathLike):
    raise WarmStartError(
      "warm_start's second argument must be a checkpoint directory (str or os.PathLike)"
      f" or a WarmStartSettings, instead got {type(ckpt_or_settings).__name__}."
    )
  if settings is None:
    return WarmStartSettings(ckpt_to_initialize_from=ckpt_or_settings)
  if os.fspath(ckpt_or_settings) != os.fspath(settings.ckpt_to_initialize_from):
    logger.info(
      "Reading %s, given explicitly, instead of settings.ckpt_to_initialize_from=%s.",
      os.fspath(ckpt_or_settings),
      os.fspath(settings.ckpt_to_initialize_from),
    )
  return dataclasses.replace(settings, ckpt_to_initialize_from=ckpt_or_settings)


def plan(
  state: Any,
  ckpt_or_settings: CkptOrSettings | Sequence[WarmStartSettings] | None = None,
  settings: WarmStartSettings | None = None,
  *,
  overlap: str = "error",
) -> WarmStartPlan:
  """Decides what a warm start would do, reading checkpoint metadata only.

  Args:
    state: The live state (see `warm_start`).
    ckpt_or_settings: A checkpoint location, a `WarmStartSettings`, or a list
      of `WarmStartSettings` (several sources: e.g. an encoder from one run
      and a decoder from another).
    settings: The `WarmStartSettings`, when a location is given first.
    overlap: With several sources, what to do when two load the same leaf:
      `"error"` (default), `"first"` or `"last"` (that source wins).

  Returns:
    A `WarmStartPlan`: one action per leaf; `print(plan)` shows it as a table.

  Raises:
    WarmStartError: Listing every problem of the request.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"params": {"w": jnp.ones((2,)), "b": jnp.ones(())}})
    >>> p = plan({"params": {"w": jnp.zeros((2,)), "b": jnp.zeros(())}}, path,
    ...          WarmStartSettings(path, vars_to_warm_start="w"))
    >>> [(leaf.name, leaf.action) for leaf in p.leaves]
    [('b', 'keep'), ('w', 'copy')]
  """
  if isinstance(ckpt_or_settings, list | tuple):
    if settings is not None or not ckpt_or_settings:
      raise WarmStartError("Several sources are given as one non-empty list of WarmStartSettings, and nothing else.")
    sources = [_settings(s, None) for s in ckpt_or_settings]
  else:
    sources = [_settings(ckpt_or_settings, settings)]
  inner = state[1] if is_nnx_split(state) else state
  variables, leaves, _ = flatten_state(inner)
  names = [v.name for v in variables]
  cache: dict[tuple[str, str | None], checkpoint_lib.Checkpoint] = {}
  plans, errors = [], []
  for k, source in enumerate(sources):
    key = (_normalize(source.ckpt_to_initialize_from), source.ckpt_item)
    try:
      if key not in cache:  # each checkpoint's metadata is read once
        cache[key] = checkpoint_lib.load_checkpoint(key[0], item=key[1], prefer_names=names)
      plans.append(build_plan(variables, leaves, cache[key], source))
    except WarmStartError as err:
      errors.append((k, err))
  if len(sources) == 1 and errors:
    raise errors[0][1]
  if errors:
    problems = [f"source #{k} ({err.header or 'settings'}): {p}" for k, err in errors for p in err.problems]
    raise WarmStartError(problems, header="Cannot warm-start from several sources")
  result = combine(plans, overlap)
  if any(row.action == "reset" and row.name != "step" for row in result.leaves):
    _check_can_reset(inner)
  return result


def _normalize(location: str | os.PathLike) -> str:
  """One spelling per directory (`a`, `a/`, `./a`), so that each is read once."""
  path = os.fspath(location)
  return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _check_can_reset(state: Any) -> None:
  if not all(hasattr(state, attr) for attr in ("tx", "params", "opt_state", "replace")):
    raise WarmStartError(
      "optimizer_state='reset' needs a state that carries its optimizer (a flax TrainState with .tx,"
      f" .params and .opt_state); got {type(state).__name__}. A freshly created state already holds"
      " the optimizer's init: use optimizer_state='keep'."
    )


def execute(plan: WarmStartPlan, state: State, *, rng: jax.Array | None = None) -> State:
  """Carries out a plan: reads what it names and returns the merged state.

  Args:
    plan: From `flax_warmstart.plan`, for this state's structure.
    state: The live state; it is not modified.
    rng: PRNG key for random backup initializers of vocabulary remaps.

  Returns:
    A new state of the same type, structure, shapes, dtypes and shardings.

  Raises:
    WarmStartError: If the plan was built for a state of other names.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"w": jnp.ones((2,))})
    >>> state = {"w": jnp.zeros((2,))}
    >>> execute(plan(state, path), state)["w"].tolist()
    [1.0, 1.0]
  """
  if is_nnx_split(state):
    graphdef, inner = state
    return (graphdef, execute(plan, inner, rng=rng))  # type: ignore[return-value]
  variables, leaves, treedef = flatten_state(state)
  if [v.name for v in variables] != [leaf.name for leaf in plan.leaves]:
    raise WarmStartError(
      "This plan was built for a state with other variables; build it again with"
      " flax_warmstart.plan(state, ...) for this state."
    )
  keys = {i: None if rng is None else jax.random.fold_in(rng, i) for i in range(len(leaves))}
  # Fills that need no old table first: a bad backup initializer fails before any read.
  fills = {
    i: remap_lib.initial_fill(row.remap, row.shape, leaves[i].dtype, keys[i], row.name)
    for i, row in enumerate(plan.leaves)
    if row.action == "remap"
  }
  targets: dict[int, dict[str, jax.ShapeDtypeStruct | None]] = {id(c): {} for c in plan.checkpoints}
  for i, row in enumerate(plan.leaves):
    if row.action in ("copy", "remap") and row.source not in targets[id(row.checkpoint)]:
      targets[id(row.checkpoint)][row.source] = _restore_spec(leaves[i], row)
  # One read per checkpoint. Wait for the reads to land: Orbax's host staging
  # buffers are then freed before the gathers allocate their outputs (1 GiB
  # less peak for a 1 GiB table).
  restored = {id(c): jax.block_until_ready(checkpoint_lib.restore(c, targets[id(c)])) for c in plan.checkpoints}
  new_leaves = [np.array(x) if isinstance(x, np.ndarray) else x for x in leaves]
  for i, row in enumerate(plan.leaves):
    if row.action == "copy":
      new_leaves[i] = _conform(restored[id(row.checkpoint)][row.source], leaves[i])
    elif row.action == "remap":
      table = restored[id(row.checkpoint)][row.source]
      new_leaves[i] = _conform(remap_lib.apply_remap(row.remap, table, fills[i], leaves[i], keys[i]), leaves[i])
    elif row.action == "reset" and row.name == "step":
      new_leaves[i] = _conform(np.zeros(row.shape, row.dtype), leaves[i])
  if any(row.action == "reset" and row.name != "step" for row in plan.leaves):
    new_leaves = _reset_optimizer(plan, state, treedef, leaves, new_leaves)
  _log(plan)
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def _reset_optimizer(
  plan: WarmStartPlan, state: Any, treedef: Any, leaves: list[Any], new_leaves: list[Any]
) -> list[Any]:
  """The optimizer's fresh init for the reset leaves, from the warm-started params."""
  _check_can_reset(state)
  merged = jax.tree_util.tree_unflatten(treedef, new_leaves)
  fresh = merged.replace(opt_state=merged.tx.init(merged.params))
  fresh_leaves = flatten_state(fresh)[1]
  out = list(new_leaves)
  for i, row in enumerate(plan.leaves):
    if row.action == "reset" and row.name != "step":
      out[i] = _conform(fresh_leaves[i], leaves[i])
  return out


def _restore_spec(leaf: Any, row: LeafPlan) -> jax.ShapeDtypeStruct | None:
  """How to read a tensor for this live leaf: sharded like it (an old vocabulary
  table: sharded off its vocabulary axis, for a local gather), or to host."""
  if not isinstance(leaf, jax.Array):
    return None
  if row.remap is None:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  sharding = remap_lib.table_sharding(leaf.sharding, row.source_shape, row.remap.info.axis)
  return jax.ShapeDtypeStruct(row.source_shape, leaf.dtype, sharding=sharding)


def _conform(value: Any, live: Any) -> Any:
  """Gives a restored value the live leaf's type, dtype and sharding."""
  if isinstance(live, jax.Array):
    if not isinstance(value, jax.Array):
      return jax.device_put(np.asarray(value, dtype=live.dtype), live.sharding)
    if value.dtype != live.dtype:
      value = value.astype(live.dtype)
    if value.sharding != live.sharding:
      value = jax.device_put(value, live.sharding)
    return value
  host = np.asarray(value)
  if isinstance(live, np.ndarray):
    return np.array(host, dtype=live.dtype)
  if isinstance(live, np.generic):
    return host.astype(live.dtype)[()]
  if isinstance(live, bool | int | float | complex):
    return type(live)(host.item())
  return jnp.asarray(host)


def _kind(dtype: np.dtype) -> str:
  """float, int, bool, complex, or other: bfloat16 is a float, though numpy calls it kind 'V'."""
  for kind in (jnp.floating, jnp.integer, jnp.bool_, jnp.complexfloating):
    if jnp.issubdtype(dtype, kind):
      return kind.__name__
  return str(dtype)


def _log(plan: WarmStartPlan) -> None:
  logger.info("Warm-started %s.", plan.summary())
  for row in plan.leaves:
    if row.action != "keep":
      logger.debug(
        "Warm-starting variable: %s; prev_var_name: %s",
        row.name,
        row.source if row.source != row.name else "Unchanged",
      )
  for row in plan.loaded:
    if row.remap is not None and row.remap.follows is None:
      stats = ", ".join(f"{n} {k}" for k, n in row.remap.mapping.stats().items())
      logger.info("Remapped vocabulary of %r (axis %d) from %r: %s.", row.name, row.remap.info.axis, row.source, stats)
  factored = [row.name for row in plan.leaves if row.action == "keep" and row.reason.startswith("factored slot")]
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
  missing = [row.name for row in plan.leaves if row.action == "keep" and "skip_missing" in row.reason]
  if missing:
    logger.warning(
      "Kept the current value of %d selected leaves missing from the checkpoint (skip_missing=True): %s",
      len(missing),
      ", ".join(missing),
    )
  for row in plan.leaves:
    if row.name == "step" and row.action in ("copy", "reset"):
      how = f"loaded from {row.checkpoint.describe()}" if row.action == "copy" else "reset to 0"
      effect = "continue from the old step" if row.action == "copy" else "restart from step 0"
      logger.info("step %s: learning-rate schedules %s.", how, effect)
  resets = [row.name for row in plan.reset if row.name != "step"]
  if resets:
    logger.info("Reset %d optimizer-state leaves to the optimizer's fresh init.", len(resets))


def warm_start(
  state: State,
  ckpt_or_settings: CkptOrSettings | Sequence[WarmStartSettings] | None = None,
  settings: WarmStartSettings | None = None,
  *,
  rng: jax.Array | None = None,
  overlap: str = "error",
) -> State:
  """Warm-starts a training state from an Orbax checkpoint.

  The JAX counterpart of `tf.compat.v1.train.warm_start`: the selected leaves
  are read from the checkpoint (renamed by `var_name_to_prev_var_name`, cast to
  the live dtype, placed with the live sharding); the others keep their value.
  Nothing is read until the whole request is validated.

  Args:
    state: A Flax `TrainState` (or subclass, e.g. with `batch_stats`), a Linen
      variables dict, a params tree (dict or `FrozenDict`), a Flax NNX `State`,
      or the `(graphdef, state)` pair of `nnx.split`.
    ckpt_or_settings: A checkpoint location (a `CheckpointManager` root, a
      step directory or a checkpoint directory), or the `WarmStartSettings`.
      A location alone warm-starts every parameter (`vars_to_warm_start=".*"`).
      A list of `WarmStartSettings` builds one plan from several sources
      (each checkpoint read once).
    settings: The `WarmStartSettings`, when a location is given first; the
      location given here wins over `settings.ckpt_to_initialize_from`.
    rng: PRNG key for random `backup_initializer`s of vocabulary remaps
      (`jax.random.key(0)`); each leaf and call draws from its own fold of it,
      so results are reproducible.
    overlap: With several sources, what to do when two load the same leaf:
      `"error"` (default), `"first"` or `"last"` (that source wins).

  Returns:
    A new state of the same type, tree structure, shapes, dtypes and
    shardings as `state`; `state` itself is not modified.

  Raises:
    WarmStartError: (a `ValueError`) listing every problem of the request:
      no checkpoint at the location, unused `var_name_to_prev_var_name` or
      `var_name_to_vocab_info` keys, selected variables missing from the
      checkpoint (with the closest names), shape mismatches, bad vocabulary
      files (naming file, line and token), a random backup initializer
      without `rng`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"params": {"enc": {"kernel": jnp.ones((2, 2))}}})
    >>> new = {"params": {"encoder": {"kernel": jnp.zeros((2, 2))},
    ...                   "head": {"kernel": jnp.zeros((2, 1))}}}
    >>> settings = WarmStartSettings(
    ...     path, vars_to_warm_start="encoder",
    ...     var_name_to_prev_var_name={"encoder/kernel": "enc/kernel"})
    >>> out = warm_start(new, settings)
    >>> out["params"]["encoder"]["kernel"].sum().item(), out["params"]["head"]["kernel"].sum().item()
    (4.0, 0.0)
  """
  return execute(plan(state, ckpt_or_settings, settings, overlap=overlap), state, rng=rng)


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
  """Whether a directory holds a finalized Orbax checkpoint to resume from.

  Args:
    run_dir: A run's checkpoint directory (usually a `CheckpointManager` root).

  Returns:
    True if `run_dir` is, or holds, a readable checkpoint.

  Examples:
    >>> import tempfile
    >>> has_checkpoint(tempfile.mkdtemp())
    False
  """
  try:
    checkpoint_lib.locate(run_dir)
  except WarmStartError:
    return False
  return True


def warm_start_or_resume(
  state: State,
  run_dir: str | os.PathLike,
  ckpt_or_settings: CkptOrSettings | None = None,
  settings: WarmStartSettings | None = None,
) -> State:
  """Resumes from the run's own checkpoint if it has one, else warm-starts.

  TensorFlow's Estimator warm-starts only when its model directory holds no
  checkpoint yet, so a restarted job continues from its own progress instead
  of going back to the old run's weights. This gives a Flax loop the same
  guard: if `run_dir` holds a checkpoint, every leaf of `state` is restored
  from its latest step (strictly: all must be there, with the same shapes);
  otherwise `warm_start(state, ckpt_or_settings, settings)` runs.

  Args:
    state: The live state, freshly initialised.
    run_dir: This run's checkpoint directory (its `CheckpointManager` root).
    ckpt_or_settings: As for `warm_start`: where to warm-start from.
    settings: As for `warm_start`.

  Returns:
    The resumed or warm-started state.

  Raises:
    WarmStartError: As for `warm_start`, or if the run's own checkpoint does
      not hold every leaf of `state`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> old, run = tempfile.mkdtemp() + "/old", tempfile.mkdtemp()
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(old, {"w": jnp.ones(())})
    >>> state = warm_start_or_resume({"w": jnp.zeros(())}, run, old)  # run is empty
    >>> state["w"].item()
    1.0
  """
  if has_checkpoint(run_dir):
    logger.info("Resuming from %s, which already holds a checkpoint; not warm-starting.", os.fspath(run_dir))
    return warm_start(state, WarmStartSettings(run_dir, vars_to_warm_start=[".*"]))
  return warm_start(state, ckpt_or_settings, settings)


def plan_init_from_checkpoint(
  state: Any,
  ckpt_dir_or_file: str | os.PathLike,
  assignment_map: AssignmentMap,
  *,
  allow_empty_scopes: bool = False,
) -> WarmStartPlan:
  """The plan of `init_from_checkpoint`, from checkpoint metadata only.

  Args:
    state: The live state.
    ckpt_dir_or_file: A `CheckpointManager` root, step or checkpoint directory.
    assignment_map: As for `init_from_checkpoint`.
    allow_empty_scopes: As for `init_from_checkpoint`.

  Returns:
    A `WarmStartPlan`.

  Raises:
    WarmStartError: Listing every problem of the map.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"old": {"w": jnp.ones(2)}})
    >>> p = plan_init_from_checkpoint({"new": {"w": jnp.zeros(2)}}, path, {"old/": "new/"})
    >>> [(row.name, row.action, row.source) for row in p.leaves]
    [('new/w', 'copy', 'old/w')]
  """
  inner = state[1] if is_nnx_split(state) else state
  variables = flatten_state(inner)[0]
  checkpoint = checkpoint_lib.load_checkpoint(ckpt_dir_or_file, prefer_names=[v.name for v in variables])
  return build_assignment_plan(variables, checkpoint, assignment_map, allow_empty_scopes=allow_empty_scopes)


def init_from_checkpoint(
  state: State,
  ckpt_dir_or_file: str | os.PathLike,
  assignment_map: AssignmentMap,
  *,
  allow_empty_scopes: bool = False,
) -> State:
  """Loads variables or whole scopes by an assignment map, TensorFlow's way.

  The pure counterpart of `tf.compat.v1.train.init_from_checkpoint`: returns a
  new state whose mapped leaves come from the checkpoint (each restored with
  its live sharding and dtype); the others keep their value.

  * `{"old/var": "new/var"}`: one tensor into one variable.
  * `{"old_scope/": "new_scope/"}`: every variable under `new_scope/`, at any
    depth, from the same relative name under `old_scope/` (`new_scope/` does
    not capture `new_scope_1/`).
  * `{"/": "new_scope/"}` from the checkpoint's root, `{"old_scope/": "/"}`
    into every variable, `{"/": "/"}` every variable by its own name.
  * A list of `(ckpt_name, new_name)` pairs loads one tensor into several
    variables. Pairs are processed sorted by checkpoint name; when a variable
    is assigned twice, the last wins.

  Where TensorFlow is lax we are strict: a scope mapping checks shapes
  (TensorFlow silently takes the checkpoint's shape), a target scope with no
  variables is an error unless `allow_empty_scopes=True` (TensorFlow does
  nothing), and a target that is neither a variable nor ends in `/` is an
  error (TensorFlow silently drops its last segment).

  Args:
    state: The live state (any form `warm_start` takes).
    ckpt_dir_or_file: A `CheckpointManager` root (latest step), a step
      directory or a checkpoint directory.
    assignment_map: A dict, or a list of `(ckpt_name, new_name)` pairs.
    allow_empty_scopes: Skip scope mappings whose target scope is empty.

  Returns:
    The new state; `state` is not modified.

  Raises:
    WarmStartError: Listing every problem, each naming both sides: a
      checkpoint tensor that is not there (with the closest names), a shape
      mismatch, a malformed or empty scope mapping.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"encoder": {"w": jnp.ones(2)}})
    >>> state = {"backbone": {"encoder": {"w": jnp.zeros(2)}}, "head": {"w": jnp.zeros(1)}}
    >>> out = init_from_checkpoint(state, path, {"encoder/": "backbone/encoder/"})
    >>> out["backbone"]["encoder"]["w"].tolist(), out["head"]["w"].tolist()
    ([1.0, 1.0], [0.0])
  """
  p = plan_init_from_checkpoint(state, ckpt_dir_or_file, assignment_map, allow_empty_scopes=allow_empty_scopes)
  return execute(p, state)
