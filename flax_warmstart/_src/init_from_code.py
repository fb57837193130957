"""The new model from code: `--init module:function` (or `path/to/file.py:function`) of the command line.

The command line plans and runs a warm start against the new model's state;
instead of a checkpoint of its fresh init (NEW), the user may name the
function that makes it, as `uvicorn app:main` names an app. `load_init`
imports it and binds its arguments; `new_model` calls it abstractly
(`jax.eval_shape`) where it traces, so only the leaves not loaded are ever
computed (`warm_start(..., init_fn=)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from flax_warmstart._src.errors import WarmStartError, closest_names
from flax_warmstart._src.state import tree_of

logger = logging.getLogger("flax_warmstart")


@dataclasses.dataclass(frozen=True)
class NewModel:
  """The new model given by --init: its state (concrete, or abstract with `init_fn` to compute it)."""

  spec: str
  state: Any
  init_fn: Callable[[], Any] | None

  @property
  def abstract(self) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree_of(self.state)))


def _import_target(spec: str, target: str) -> Any:
  """The module of `--init TARGET:function`: a module name (from the current directory or PYTHONPATH) or a file."""
  if target.endswith(".py") or "/" in target or os.sep in target:
    path = os.path.abspath(target)
    if not os.path.isfile(path):
      raise WarmStartError(f"--init {spec}: {target} is not a file. Give path/to/file.py:function or module:function.")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "_flax_warmstart_init_" + re.sub(r"\W", "_", stem)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == path:
      return loaded  # imported once per process, as a module name is (Gin configurables register once)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
      raise WarmStartError(f"--init {spec}: cannot load {target} as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look their module up while it executes
    if os.path.dirname(path) not in sys.path:
      sys.path.insert(0, os.path.dirname(path))  # its own sibling imports
    try:
      module_spec.loader.exec_module(module)
    except Exception:
      del sys.modules[name]
      raise
    return module
  try:
    return importlib.import_module(target)
  except ModuleNotFoundError as err:
    if err.name and (target == err.name or target.startswith(err.name + ".")):
      raise WarmStartError(
        f"--init {spec}: no module named {err.name!r} here ({os.getcwd()}) or on PYTHONPATH. Run from the directory"
        " that holds it, add that directory to PYTHONPATH, or give the file: --init path/to/file.py:function."
      ) from None
    raise


def load_init(spec: str, init_args: Sequence[tuple[str, Any]] = (), seed: int = 0) -> Callable[[], Any]:
  """The function of `--init module:function` with its arguments bound: call it for the new state.

  Args:
    spec: `module:function` or `path/to/file.py:function` (`function` may be
      dotted: `Class.create`).
    init_args: `(name, value)` keyword arguments (`--init-arg`).
    seed: A parameter named `rng` or `key` gets `jax.random.key(seed)`, one
      named `seed` the seed, unless given in `init_args`.

  Returns:
    A function of no arguments.

  Raises:
    WarmStartError: If the module or function cannot be found or imported,
      or the arguments do not fit the function.

  Examples:
    >>> fn = load_init("numpy:zeros", [("shape", (2,))])
    >>> fn().tolist()
    [0.0, 0.0]
  """
  target, sep, attr = spec.rpartition(":")
  if not sep or not target or not attr:
    raise WarmStartError(
      f"--init {spec!r} is not MODULE:FUNCTION: give e.g. --init my_model:create_state or --init"
      " path/to/my_model.py:create_state."
    )
  try:
    module = _import_target(spec, target)
  except WarmStartError:
    raise
  except Exception as err:  # noqa: BLE001 (the user's module failed to import: one line, the traceback with -v)
    logger.debug("Importing %s failed:\n%s", target, traceback.format_exc())
    raise WarmStartError(
      f"--init {spec}: importing {target} failed: {type(err).__name__}: {err} (-v shows the traceback)."
    ) from None
  fn: Any = module
  for i, part in enumerate(attr.split(".")):
    if not hasattr(fn, part):
      owner = ".".join([target, *attr.split(".")[:i]])
      public = [n for n in dir(fn) if not n.startswith("_")]
      near = closest_names(part, public)
      hint = f" Did you mean {', '.join(near)}?" if near else f" It has: {', '.join(public[:10]) or 'nothing public'}."
      raise WarmStartError(f"--init {spec}: {owner} has no {part!r}.{hint}")
    fn = getattr(fn, part)
  if not callable(fn):
    raise WarmStartError(f"--init {spec}: {attr} is a {type(fn).__name__}, not a function returning the new state.")
  kwargs = dict(init_args)
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # a builtin without a signature: call it as given
    return functools.partial(fn, **kwargs)
  for name, value in (("rng", None), ("key", None), ("seed", seed)):
    if name in signature.parameters and name not in kwargs:
      kwargs[name] = jax.random.key(seed) if value is None else value
  try:
    signature.bind(**kwargs)
  except TypeError as err:
    params = ", ".join(str(p) for p in signature.parameters.values()) or "none"
    raise WarmStartError(
      f"--init {spec}: {err} (its parameters: {params}). Pass each with --init-arg NAME=VALUE; rng, key and seed"
      " come from --seed."
    ) from None
  return functools.partial(fn, **kwargs)


def _call_init(spec: str, init_fn: Callable[[], Any], verbose: bool) -> Any:
  try:
    return init_fn()
  except WarmStartError:
    raise
  except Exception as err:  # noqa: BLE001 (the user's code failed: one line, the traceback with -v)
    if verbose:
      traceback.print_exc()
    raise WarmStartError(
      f"--init {spec} failed: {type(err).__name__}: {err}{'' if verbose else ' (-v shows the traceback)'}."
    ) from None


def new_model(spec: str, init_fn: Callable[[], Any], verbose: bool = False) -> NewModel:
  """The new state of `--init`: abstract (`jax.eval_shape`) when the function traces, else computed."""
  returns_abstract = False

  def traced() -> Any:
    nonlocal returns_abstract
    made = init_fn()
    returns_abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(made))
    return made

  try:
    abstract = jax.eval_shape(traced)
  except Exception as err:  # noqa: BLE001 (not traceable, or NNX objects: call it as it is)
    logger.debug("--init %s: jax.eval_shape failed (%s: %s); calling it.", spec, type(err).__name__, err)
  else:
    return NewModel(spec, abstract, None if returns_abstract else init_fn)
  return NewModel(spec, _call_init(spec, init_fn, verbose), None)


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
  """`--init module:function` imports from the current directory, as `python -m` does; sys.path is restored after."""
  saved = sys.path[:]
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    yield
  finally:
    sys.path[:] = saved
