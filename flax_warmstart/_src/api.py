"""The public entry points: plan from settings or an assignment map, then execute on the live state."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from flax_warmstart._src.assignment import AssignmentMap, build_assignment_plan
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.execute import execute
from flax_warmstart._src.naming import flatten_state, unwrap_split
from flax_warmstart._src.planning import (
  bind_leaves,
  build_plan,
  check_can_reset,
  combine,
  gc_paused,
  resets_optimizer,
)
from flax_warmstart._src.rows import WarmStartPlan
from flax_warmstart._src.settings import WarmStartSettings
from flax_warmstart._src.sources import Source, open_source
from flax_warmstart._src.sources import orbax as orbax_source
from flax_warmstart._src.typing import PathLike, State

logger = logging.getLogger("flax_warmstart")

CkptOrSettings = PathLike | WarmStartSettings


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
    >>> [(leaf.name, str(leaf.action)) for leaf in p.leaves]
    [('b', 'keep'), ('w', 'load')]
  """
  with gc_paused():
    return _build_plan(state, ckpt_or_settings, settings, overlap)


def _build_plan(
  state: Any,
  ckpt_or_settings: CkptOrSettings | Sequence[WarmStartSettings] | None,
  settings: WarmStartSettings | None,
  overlap: str,
) -> WarmStartPlan:
  if isinstance(ckpt_or_settings, list | tuple):
    if settings is not None or not ckpt_or_settings:
      raise WarmStartError("Several sources are given as one non-empty list of WarmStartSettings, and nothing else.")
    sources = [_settings(s, None) for s in ckpt_or_settings]
  else:
    sources = [_settings(ckpt_or_settings, settings)]
  inner = unwrap_split(state)
  variables, leaves, _ = flatten_state(inner)
  names = [v.name for v in variables]
  cache: dict[tuple[str, str | None, int | str | None], Source] = {}
  plans, errors = [], []
  for k, source in enumerate(sources):
    key = (_normalize(source.ckpt_to_initialize_from), source.ckpt_item, source.ckpt_step)
    try:
      if key not in cache:  # each checkpoint's metadata is read once
        cache[key] = open_source(key[0], item=key[1], prefer_names=names, step=key[2])
      plans.append(build_plan(variables, leaves, cache[key], source))
    except WarmStartError as err:
      errors.append((k, err))
  if len(sources) == 1 and errors:
    raise errors[0][1]
  if errors:
    problems = [f"source #{k} ({err.header or 'settings'}): {p}" for k, err in errors for p in err.problems]
    raise WarmStartError(problems, header="Cannot warm-start from several sources")
  result = combine(plans, overlap)
  if resets_optimizer(result):
    check_can_reset(inner)
  return bind_leaves(result, leaves)


def _normalize(location: str | os.PathLike) -> str:
  """One spelling per directory (`a`, `a/`, `./a`), so that each is read once."""
  path = os.fspath(location)
  return path.rstrip("/") if "://" in path else os.path.abspath(path)


def warm_start(
  state: State,
  ckpt_or_settings: CkptOrSettings | Sequence[WarmStartSettings] | None = None,
  settings: WarmStartSettings | None = None,
  *,
  rng: jax.Array | None = None,
  init_fn: Callable[[], State] | None = None,
  overlap: str = "error",
  plan: WarmStartPlan | None = None,
  show_progress: bool = True,
) -> State:
  """Warm-starts a training state from an Orbax checkpoint.

  The JAX counterpart of `tf.compat.v1.train.warm_start`: the selected leaves
  are read from the checkpoint (renamed by `var_name_to_prev_var_name`, cast to
  the live dtype, placed with the live sharding); the others keep their value.
  Nothing is read until the whole request is validated.

  Args:
    state: A Flax `TrainState` (or subclass, e.g. with `batch_stats`), a Linen
      variables dict, a params tree (dict or `FrozenDict`), a Flax NNX `State`,
      or the `(graphdef, state)` pair of `nnx.split`. Or the same abstractly,
      with `jax.ShapeDtypeStruct` leaves (as `jax.eval_shape` of the init
      function gives; with a `sharding` each, or on the default device), so
      that a large model is never initialised just to be overwritten: the
      loaded leaves are read straight into their own memory and `init_fn`
      computes the others.
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
    init_fn: For an abstract `state`: a function of no arguments that returns
      the state freshly initialised (e.g. `functools.partial(create_state,
      jax.random.key(0))`). It is jitted with only the abstract leaves that
      are not loaded as outputs, so XLA computes and allocates nothing else,
      and each comes out with its leaf's sharding. Leaves of a concrete state
      keep their value.
    overlap: With several sources, what to do when two load the same leaf:
      `"error"` (default), `"first"` or `"last"` (that source wins).
    plan: A plan already built (and shown) with `flax_warmstart.plan` for this
      state: executed as it is, so what was shown is what happens. Then pass
      no checkpoint or settings.
    show_progress: Show the phase (reading N tensors, remapping) on a
      terminal; nothing is shown when stderr is not a terminal.

  Returns:
    A new state of the same type, tree structure, shapes, dtypes and
    shardings as `state`; `state` itself is not modified.

  Raises:
    WarmStartError: (a `ValueError`) listing every problem of the request:
      no checkpoint at the location, unused `var_name_to_prev_var_name` or
      `var_name_to_vocab_info` keys, selected variables missing from the
      checkpoint (with the closest names), shape mismatches, bad vocabulary
      files (naming file, line and token), a random backup initializer
      without `rng`, an abstract leaf that is not loaded and no `init_fn`.

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

    From an abstract state: only the head is initialised, by `init_fn`.

    >>> import jax
    >>> init = lambda: {"params": {"encoder": {"kernel": jnp.zeros((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}}}
    >>> out = warm_start(jax.eval_shape(init), settings, init_fn=init)
    >>> out["params"]["encoder"]["kernel"].sum().item(), out["params"]["head"]["kernel"].sum().item()
    (4.0, 2.0)
  """
  if plan is not None:
    if ckpt_or_settings is not None or settings is not None:
      raise WarmStartError("Pass either a plan or a checkpoint/settings to warm_start, not both.")
    return execute(plan, state, rng=rng, init_fn=init_fn, show_progress=show_progress)
  with gc_paused():
    built = _build_plan(state, ckpt_or_settings, settings, overlap)
  return execute(built, state, rng=rng, init_fn=init_fn, show_progress=show_progress)


def _run_dir(run_dir: Any) -> str:
  """Validates a run directory argument: a non-empty path that is not a file."""
  if not isinstance(run_dir, str | os.PathLike):
    raise WarmStartError(
      f"run_dir must be this run's checkpoint directory (str or os.PathLike), got {type(run_dir).__name__} {run_dir!r}."
    )
  path = os.fspath(run_dir)
  if not path:
    raise WarmStartError("run_dir is empty: give this run's checkpoint directory (its CheckpointManager root).")
  if "://" not in path and os.path.isfile(path):
    raise WarmStartError(
      f"run_dir {path} is a file: give this run's checkpoint directory (its CheckpointManager root)."
    )
  return path


def has_checkpoint(run_dir: PathLike) -> bool:
  """Whether a run directory holds a checkpoint to resume from.

  False only when there is nothing to resume: the directory does not exist,
  is empty, or holds no step directory (a save still in progress or never
  finished does not count). A directory whose latest step is damaged is not
  "no checkpoint": that raises, so that a restarted run never falls back to
  warm-starting over its own progress.

  Args:
    run_dir: A run's checkpoint directory (usually a `CheckpointManager` root).

  Returns:
    True if `run_dir` is, or holds, a readable checkpoint.

  Raises:
    WarmStartError: If `run_dir` is not a directory path, or its latest step
      (or the checkpoint it is) is damaged, naming it and what is wrong.

  Examples:
    >>> import tempfile
    >>> has_checkpoint(tempfile.mkdtemp())
    False
  """
  path = _run_dir(run_dir)
  try:
    orbax_source.locate(path)
  except WarmStartError:
    if orbax_source.holds_steps(path):
      raise  # something is there, and it cannot be read: say so
    return False
  return True


def warm_start_or_resume(
  state: State,
  run_dir: PathLike,
  ckpt_or_settings: CkptOrSettings | None = None,
  settings: WarmStartSettings | None = None,
  *,
  rng: jax.Array | None = None,
  init_fn: Callable[[], State] | None = None,
  resume_step: int | None = None,
) -> State:
  """Resumes from the run's own checkpoint if it has one, else warm-starts.

  TensorFlow's Estimator warm-starts only when its model directory holds no
  checkpoint yet, so a restarted job continues from its own progress instead
  of going back to the old run's weights. This gives a Flax loop the same
  guard: if `run_dir` holds a checkpoint, every leaf of `state` is restored
  from its latest step (strictly: all must be there, with the same shapes);
  otherwise `warm_start(state, ckpt_or_settings, settings)` runs.

  Resuming never falls back: if the run's latest step cannot be read, this
  raises (naming the step and what is wrong) instead of warm-starting from
  the old run or using an older step; pass `resume_step` to resume from an
  older step on purpose.

  Args:
    state: The live state, freshly initialised, or abstract (see `warm_start`).
    run_dir: This run's checkpoint directory (its `CheckpointManager` root).
    ckpt_or_settings: As for `warm_start`: where to warm-start from.
    settings: As for `warm_start`.
    rng: As for `warm_start`.
    init_fn: As for `warm_start`: computes the leaves of an abstract state
      that the warm start does not load (a resume loads every leaf).
    resume_step: Resume from this step of `run_dir` (its directory must be
      there and readable) instead of the latest.

  Returns:
    The resumed or warm-started state.

  Raises:
    WarmStartError: As for `warm_start`; if `run_dir` is not a directory
      path; if the run's checkpoint is damaged; or if it does not hold every
      leaf of `state`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> old, run = tempfile.mkdtemp() + "/old", tempfile.mkdtemp()
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(old, {"w": jnp.ones(())})
    >>> state = warm_start_or_resume({"w": jnp.zeros(())}, run, old)  # run is empty
    >>> state["w"].item()
    1.0
  """
  path = _run_dir(run_dir)
  if resume_step is not None:
    if not isinstance(resume_step, int) or isinstance(resume_step, bool):
      raise WarmStartError(f"resume_step must be a step number (int), got {resume_step!r}.")
    step_dir = orbax_source.step_directory(path, resume_step)
    logger.warning("Resuming from step %d of %s, as asked (resume_step), not from its latest step.", resume_step, path)
    return warm_start(state, WarmStartSettings(step_dir, vars_to_warm_start=[".*"]))
  if has_checkpoint(path):
    logger.info("Resuming from %s, which already holds a checkpoint; not warm-starting.", path)
    return warm_start(state, WarmStartSettings(path, vars_to_warm_start=[".*"]))
  return warm_start(state, ckpt_or_settings, settings, rng=rng, init_fn=init_fn)


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
    >>> [(row.name, str(row.action), row.source) for row in p.leaves]
    [('new/w', 'load', 'old/w')]
  """
  with gc_paused():
    inner = unwrap_split(state)
    variables, leaves, _ = flatten_state(inner)
    checkpoint = open_source(ckpt_dir_or_file, prefer_names=[v.name for v in variables])
    result = build_assignment_plan(variables, checkpoint, assignment_map, allow_empty_scopes=allow_empty_scopes)
  return bind_leaves(result, leaves)


def init_from_checkpoint(
  state: State,
  ckpt_dir_or_file: str | os.PathLike,
  assignment_map: AssignmentMap,
  *,
  allow_empty_scopes: bool = False,
  init_fn: Callable[[], State] | None = None,
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
    init_fn: For an abstract state, computes the leaves the map does not
      load (see `warm_start`).

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
  return execute(p, state, init_fn=init_fn)


def list_variables(location: PathLike, *, item: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
  """Lists a checkpoint's names and shapes, like `tf.train.list_variables`.

  Names follow the naming contract (see `flax_warmstart.variable_names`), so
  they are the names that `WarmStartSettings` refers to. Reads metadata only.

  Args:
    location: A checkpoint location (for Orbax: a `CheckpointManager` root,
      whose latest step is used, a step directory or a checkpoint directory).
    item: The item to list in a step directory with several items.

  Returns:
    Sorted `(name, shape)` pairs.

  Raises:
    WarmStartError: If no checkpoint is found at `location`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...   ckptr.save(path, {"params": {"w": jnp.ones((2, 3))}})
    >>> list_variables(path)
    [('w', (2, 3))]
  """
  source = open_source(location, item=item)
  return sorted((v.name, v.shape) for v in source.variables.values())
