"""The naming contract: a state (or a checkpoint's tree) as `{name: leaf}`.

* Parameters are named by their slash-joined path inside the params tree:
  `{"Dense_0": {"kernel": x}}` -> `Dense_0/kernel`.
* The params tree is `state.params` for an object with a `params` attribute
  (a Flax `TrainState`), `state["params"]` for a mapping with a `params` key (a
  Linen variables dict), the `nnx.Param` variables of a Flax NNX `State`, and
  otherwise the whole tree. The same rule finds the params of a checkpoint.
* A subtree outside the params whose every leaf sits at a parameter's path
  (optax's `mu`, `nu`, `trace`, an EMA copy of the params, ...) holds *slots*:
  each leaf is named `<param name>/<path of the subtree from the root>`, e.g.
  `Dense_0/kernel/opt_state/0/mu`. Where the leaf sits below the parameter's
  path (T5X's `state/param_states/<param>/v_row`), that suffix ends the name:
  `Dense_0/kernel/state/param_states/v_row`. A parameter's rename, selection
  prefix and vocabulary remap therefore carry its slots, as in TensorFlow.
* A T5X state dict (`{"target": params, "state": {...}}`) has its params
  under `target`.
* Everything else is named by its path from the root: `opt_state/0/count`,
  `batch_stats/BatchNorm_0/mean`, `step`.
* The `value` level of a Flax NNX `Variable` (or `nn.Partitioned` box) is not
  part of a name, in the live state and in checkpoints saved from NNX states.
* An NNX model with its optimizer is named like a `TrainState`, however the
  pair is held (`(model, optimizer)`, `{"model": m, "optimizer": o}`, their
  `nnx.state`, `nnx.split`, a checkpoint of any of these, `nnx.ModelAndOptimizer`):
  the pair's own keys are dropped, so parameters are `encoder/kernel`, slots
  `encoder/kernel/opt_state/0/mu`, and the step `step`. A pair is a root of
  two entries of which exactly one is an optimizer (`opt_state` and `step`,
  nothing else but perhaps its `model`).
* Every leaf is named, whatever it holds (`LeafKind`): arrays, Python and
  numpy scalars, typed PRNG keys (named and compared as their key data, as
  Orbax saves them), strings, other objects. `None` and optax's `MaskedNode`
  hold no leaf (in JAX and in Orbax checkpoints alike): they have no name and
  come back as they were.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_warmstart._src import state as state_lib
from flax_warmstart._src.errors import WarmStartError

Kind = Literal["param", "slot", "other"]


class LeafKind(enum.StrEnum):
  """What a leaf holds.

  * `ARRAY`: a numeric or boolean array (`jax.Array`, numpy, or abstract).
  * `SCALAR`: a Python or numpy scalar; it comes back as the same type.
  * `KEY`: a typed PRNG key array (`jax.random.key`, NNX's `RngKey`); named
    and compared as its key data (what Orbax saves), loaded back as a key of
    the live leaf's impl.
  * `STRING`: a `str`; loads only from a string.
  * `OBJECT`: any other Python object: kept, and cannot be loaded.

  Examples:
    >>> LeafKind.KEY == "key", str(LeafKind.STRING)
    (True, 'str')
  """

  ARRAY = "array"
  SCALAR = "scalar"
  KEY = "key"
  STRING = "str"
  OBJECT = "object"


@dataclasses.dataclass(frozen=True)
class Variable:
  """One named leaf of a state or a checkpoint.

  Attributes:
    name: The name under the naming contract.
    kind: `"param"`, `"slot"` (mirrors a parameter) or `"other"`.
    index: Position of the leaf in the flattened tree.
    param: For a slot, the name of its parameter; else None.
    slot: For a slot, the path of its subtree from the root (`opt_state/0/mu`).
    shape: The leaf's shape (for a PRNG key, its key data's).
    dtype: The leaf's dtype (for a PRNG key, its key data's; `object` for
      strings and other objects).
    leaf_kind: What the leaf holds (`LeafKind`).
    rng: Whether it is RNG stream state: a typed PRNG key, or NNX's
      `RngKey`/`RngCount`.
    key_impl: For a PRNG key, the name of its impl (`"threefry2x32"`).
    type_name: The Python type of a scalar or an object leaf.
  """

  name: str
  kind: Kind
  index: int
  param: str | None
  slot: str | None
  shape: tuple[int, ...]
  dtype: np.dtype
  leaf_kind: LeafKind = LeafKind.ARRAY
  rng: bool = False
  key_impl: str | None = None
  type_name: str = ""

  @property
  def label(self) -> str:
    """The leaf's kind in a plan: `array`, `scalar`, `key<threefry2x32>`, `str` or `object`."""
    if self.leaf_kind is LeafKind.KEY:
      return f"key<{self.key_impl}>"
    return str(self.leaf_kind)

  def describe(self) -> str:
    """The value in words, for messages: `a (2, 3) float32 array`, `a string`, `a threefry2x32 PRNG key`."""
    if self.leaf_kind is LeafKind.STRING:
      return "a string"
    if self.leaf_kind is LeafKind.OBJECT:
      return f"an object of type {self.type_name or 'unknown'}"
    if self.leaf_kind is LeafKind.KEY:
      return f"a {self.key_impl} PRNG key (key data {self.shape} {self.dtype})"
    what = f"{self.type_name} scalar" if self.leaf_kind is LeafKind.SCALAR and self.type_name else "array"
    return f"a {self.shape} {self.dtype} {what}"


def key_name(key: Any) -> str:
  """The name of one key of a `jax.tree_util` key path (the one place that branches on key types)."""
  return jax.tree_util.keystr((key,), simple=True, separator="/")


def name_paths(
  paths: Sequence[tuple[str, ...]],
  is_param: Sequence[bool],
  params_prefix: tuple[str, ...],
) -> list[tuple[str, Kind, str | None, str | None]]:
  """Names leaves from their key paths: the naming contract on plain strings.

  Args:
    paths: Each leaf's path from the root, as key names.
    is_param: Whether each leaf is a parameter.
    params_prefix: Path of the params tree; parameter names are relative to it.

  Returns:
    For each leaf, `(name, kind, param, slot)`.

  Raises:
    WarmStartError: If two leaves would get the same name.
  """
  n = len(params_prefix)
  params = {p[n:]: "/".join(p[n:]) for p, isp in zip(paths, is_param, strict=True) if isp}
  others = [p for p, isp in zip(paths, is_param, strict=True) if not isp]

  # A slot subtree: a prefix under which every leaf sits at `prefix + <a
  # parameter's path> + suffix` (the suffix is empty for optax's mu/nu/trace,
  # one key for T5X's state/param_states/<param>/{m,v,v_row,v_col}).
  def split(p: tuple[str, ...], k: int) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    for j in range(k + 1, len(p) + 1):
      if p[k:j] in params:
        return p[k:j], p[j:]
    return None

  under: collections.Counter[tuple[str, ...]] = collections.Counter()
  mirrored: collections.Counter[tuple[str, ...]] = collections.Counter()
  for p in others:
    for k in range(1, len(p)):
      under[p[:k]] += 1
      mirrored[p[:k]] += split(p, k) is not None
  out = []
  for p, isp in zip(paths, is_param, strict=True):
    if isp:
      out.append((params[p[n:]], "param", None, None))
      continue
    for k in range(1, len(p)):
      found = split(p, k) if under[p[:k]] == mirrored[p[:k]] else None
      if found is not None:
        param, suffix = params[found[0]], found[1]
        slot = "/".join(p[:k] + suffix)
        out.append((f"{param}/{slot}", "slot", param, slot))
        break
    else:
      out.append(("/".join(p), "other", None, None))
  seen: dict[str, int] = {}
  clashes = []
  for i, (name, *_) in enumerate(out):
    if name in seen:
      clashes.append(
        f"Two leaves are both named {name!r} (at {'/'.join(paths[seen[name]])!r} and"
        f" {'/'.join(paths[i])!r}); rename one of them so that names are unique."
      )
    seen.setdefault(name, i)
  if clashes:
    raise WarmStartError(clashes, header="Ambiguous variable names")
  return out


# Types seen not to be NNX Variables: `isinstance(x, nnx.Variable)` costs a metaclass call, and planning
# a state of thousands of leaves tests every node. Tracers are never cached (NNX checks their abstract type).
_NOT_VARIABLES: set[type] = {dict, list, tuple, np.ndarray}


def _is_nnx_leaf(x: Any) -> bool:
  if type(x) in _NOT_VARIABLES:
    return False
  if isinstance(x, nnx.Variable):
    return True
  if not isinstance(x, jax.core.Tracer):
    _NOT_VARIABLES.add(type(x))
  return False


def flatten_state(state: Any) -> tuple[list[Variable], list[Any], Any]:
  """Flattens a live training state under the naming contract.

  Args:
    state: The live state in any form (`flax_warmstart._src.state`): a
      `TrainState`, a Linen variables dict, a params tree, an NNX `State`, NNX
      objects (a Module, an Optimizer, a container of them) or an
      `nnx.split` pair.

  Returns:
    `(variables, leaves, treedef)`: the named leaves in flatten order, the raw
    leaves, and the treedef that `jax.tree_util.tree_unflatten` takes back (of
    the pytree `state_lib.recognise(state).tree`).

  Raises:
    WarmStartError: If `state` is not a state form, or two leaves would get
      the same name.
  """
  tree = state_lib.tree_of(state)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_nnx_leaf)
  paths, leaves, is_param, rng = [], [], [], []
  nnx_variables = False
  for path, leaf in flat:
    names = tuple(key_name(k) for k in path)
    if _is_nnx_leaf(leaf):
      nnx_variables = True
      param, stream = isinstance(leaf, nnx.Param), isinstance(leaf, nnx.RngState)
      for sub_path, sub_leaf in jax.tree_util.tree_flatten_with_path(leaf)[0]:
        paths.append(names + _strip_value(tuple(sub_path)))
        leaves.append(sub_leaf)
        is_param.append(param)
        rng.append(stream)
      continue
    # An `nn.Partitioned`-style box: drop its `value` attribute from the name.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
      names = names[:-1]
    paths.append(names)
    leaves.append(leaf)
    is_param.append(None)
    rng.append(False)
  paths, in_model = _unpair(paths)
  # NNX marks its parameters (nnx.Param); elsewhere they are the params tree.
  prefix = () if nnx_variables else _params_prefix([p for p, m in zip(paths, in_model, strict=True) if m])
  is_param = [
    p if p is not None else (m and path[: len(prefix)] == prefix)
    for p, m, path in zip(is_param, in_model, paths, strict=True)
  ]
  named = name_paths(paths, is_param, prefix)
  variables = []
  for i, ((name, kind, param, slot), leaf, stream) in enumerate(zip(named, leaves, rng, strict=True)):
    variables.append(leaf_info(leaf, name=name, kind=kind, index=i, param=param, slot=slot, rng=stream))
  treedef = jax.tree_util.tree_structure(tree)
  return variables, leaves, treedef


def _strip_value(sub_path: tuple[Any, ...]) -> tuple[str, ...]:
  names = tuple(key_name(k) for k in sub_path)
  return names[:-1] if names and names[-1] == "value" else names


# The keys of an NNX optimizer's state (`nnx.Optimizer`; `nnx.ModelAndOptimizer` adds `model`).
_OPTIMIZER_KEYS = frozenset({"opt_state", "step"})


def _unpair(paths: list[tuple[str, ...]]) -> tuple[list[tuple[str, ...]], list[bool]]:
  """Drops the keys of a model-and-optimizer pair, so that it is named like a `TrainState`.

  A pair is a root of exactly two entries, one of them an optimizer (its
  children are `opt_state` and `step`, and perhaps `model`), however held:
  `(model, optimizer)` -> `0/...`, `1/...`; `{"model": ..., "optimizer": ...}`.
  An `nnx.ModelAndOptimizer` (`model/...`, `opt_state/...`, `step` at the
  root) loses its `model` key.

  Returns:
    The paths, and for each whether it belongs to the model (all True for a
    state that is not a pair).

  Examples:
    >>> paths = [("0", "w"), ("1", "opt_state", "0", "mu", "w"), ("1", "step")]
    >>> _unpair(paths)
    ([('w',), ('opt_state', '0', 'mu', 'w'), ('step',)], [True, False, False])
  """
  tops = list(dict.fromkeys(p[0] for p in paths if p))
  if set(tops) == {"model", *_OPTIMIZER_KEYS} and all(len(p) > 1 for p in paths if p[0] == "model"):
    return [p[1:] if p[0] == "model" else p for p in paths], [p[0] == "model" for p in paths]
  if len(tops) != 2 or not all(len(p) > 1 for p in paths):
    return paths, [True] * len(paths)
  children = {top: {p[1] for p in paths if p[0] == top} for top in tops}
  optimizers = [top for top in tops if _OPTIMIZER_KEYS <= children[top] <= _OPTIMIZER_KEYS | {"model"}]
  if len(optimizers) != 1:
    return paths, [True] * len(paths)
  (optimizer,) = optimizers
  return [p[1:] for p in paths], [p[0] != optimizer for p in paths]


def _params_prefix(paths: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
  """Where the params tree is: `params` (a TrainState, a Linen variables dict), T5X's `target`, or the root."""
  tops = {p[0] for p in paths if p}
  if "params" in tops:
    return ("params",)
  # A T5X state dict: {"target": params, "state": {"param_states": ..., "step": ...}}.
  return ("target",) if {"target", "state"} <= tops else ()


def leaf_info(leaf: Any, **naming: Any) -> Variable:
  """A leaf as a `Variable`: its shape, dtype and `LeafKind`, from a live value or a checkpoint's metadata.

  Args:
    leaf: A live leaf (array, abstract array, scalar, PRNG key, string, any
      object), or a checkpoint's metadata leaf (Orbax's `ArrayMetadata`,
      `ScalarMetadata`, `StringMetadata`; a lazy array with `shape` and
      `dtype`).
    **naming: The `Variable`'s `name`, `kind`, `index`, `param`, `slot` and
      `rng` (a PRNG key is RNG state whatever is given); unnamed by default.

  Returns:
    The `Variable`.

  Examples:
    >>> import jax, numpy as np
    >>> [leaf_info(x).label for x in (np.zeros(2), 3, jax.random.key(0), "PCG64", object())]
    ['array', 'scalar', 'key<threefry2x32>', 'str', 'object']
    >>> leaf_info(jax.random.key(0)).shape, leaf_info(jax.random.key(0)).dtype
    ((2,), dtype('uint32'))
  """

  name, kind = naming.get("name", ""), naming.get("kind", "other")
  index, param, slot = naming.get("index", -1), naming.get("param"), naming.get("slot")
  rng = naming.get("rng", False)

  def info(shape: Any, dtype: Any, leaf_kind: LeafKind, **kwargs: Any) -> Variable:
    stream = rng or leaf_kind is LeafKind.KEY
    return Variable(name, kind, index, param, slot, tuple(shape), np.dtype(dtype), leaf_kind, stream, **kwargs)

  dtype = getattr(leaf, "dtype", None)
  # The common case first: an array (jax, numpy, abstract) of a numpy dtype.
  if (
    isinstance(dtype, np.dtype)
    and dtype.kind != "O"
    and isinstance(leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct)
  ):
    return info(leaf.shape, dtype, LeafKind.ARRAY)
  if isinstance(leaf, str | ocp.metadata.StringMetadata):
    return info((), object, LeafKind.STRING, type_name="str")
  if isinstance(leaf, ocp.metadata.Metadata):  # an Orbax value's metadata: an array, as far as it says
    dtype = getattr(leaf, "dtype", None)
    what = LeafKind.SCALAR if isinstance(leaf, ocp.metadata.ScalarMetadata) else LeafKind.ARRAY
    return info(getattr(leaf, "shape", None) or (), object if dtype is None else dtype, what)
  if isinstance(leaf, bool | int | float | complex | np.generic):
    return info((), np.asarray(leaf).dtype, LeafKind.SCALAR, type_name=type(leaf).__name__)
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    return info((), object, LeafKind.OBJECT, type_name=type(leaf).__name__)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(tuple(shape), dtype))
    return info(data.shape, data.dtype, LeafKind.KEY, key_impl=key_impl(leaf))
  if np.dtype(dtype) == np.dtype(object):
    return info(shape, object, LeafKind.OBJECT, type_name=type(leaf).__name__)
  return info(shape, dtype, LeafKind.ARRAY)


def key_impl(leaf: Any) -> str:
  """The impl name of a typed PRNG key array, concrete or abstract (`"threefry2x32"`, `"rbg"`).

  Examples:
    >>> import jax
    >>> key_impl(jax.ShapeDtypeStruct((), jax.random.key(0, impl="rbg").dtype))
    'rbg'
  """
  if isinstance(leaf, jax.Array):
    return str(jax.random.key_impl(leaf))
  found: list[str] = []
  jax.eval_shape(lambda k: found.append(str(jax.random.key_impl(k))), jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  return found[0]


def load_problem(live: Variable, saved: Variable) -> str | None:
  """Why a checkpoint value cannot be loaded into a live leaf, by their kinds; None if it can.

  Shapes are checked by the planner; this is the rest: a string loads only
  from a string and an array or scalar never from one, an object leaf never
  loads, a PRNG key loads from key data of its impl's shape and dtype.

  Args:
    live: The live leaf.
    saved: The checkpoint's tensor.

  Returns:
    The reason, as a clause (`"it is a string in the state, ..."`), or None.

  Examples:
    >>> import numpy as np
    >>> print(load_problem(leaf_info("PCG64"), leaf_info(np.zeros(()))))
    it is a string in the state, but the checkpoint holds a () float64 array
  """
  if live.leaf_kind is LeafKind.OBJECT:
    return (
      f"it holds {live.describe()}, which no checkpoint can load (arrays, scalars, PRNG keys and strings can);"
      " leave it out of the selection"
    )
  if (live.leaf_kind is LeafKind.STRING) != (saved.leaf_kind is LeafKind.STRING):
    return f"it is {live.describe()} in the state, but the checkpoint holds {saved.describe()}"
  if saved.leaf_kind is LeafKind.OBJECT:
    return f"the checkpoint holds {saved.describe()}, which cannot be read as {live.describe()}"
  if live.leaf_kind is LeafKind.KEY and (saved.shape, saved.dtype) != (live.shape, live.dtype):
    return (
      f"it is {live.describe()}, but the checkpoint holds {saved.describe()}: the key data of another"
      " impl, or not a key"
    )
  return None


def flatten_checkpoint_tree(tree: Any) -> list[tuple[Variable, tuple[Any, ...]]]:
  """Names the leaves of a checkpoint's metadata tree under the naming contract.

  Args:
    tree: The nested metadata tree of an Orbax PyTree checkpoint (leaves are
      Orbax value metadata with `shape` and `dtype`), or a state dict in
      memory.

  Returns:
    `(variable, key_path)` pairs: `key_path` addresses the leaf in `tree`.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [tuple(key_name(k) for k in path) for path, _ in flat]
  # A checkpoint of an NNX state stores each Variable as {"value": array}.
  if paths and all(len(p) > 1 and p[-1] == "value" for p in paths):
    paths = [p[:-1] for p in paths]
  paths, in_model = _unpair(paths)
  prefix = _params_prefix([p for p, m in zip(paths, in_model, strict=True) if m])
  is_param = [m and p[: len(prefix)] == prefix for p, m in zip(paths, in_model, strict=True)]
  named = name_paths(paths, is_param, prefix)
  out = []
  for i, ((name, kind, param, slot), (path, meta)) in enumerate(zip(named, flat, strict=True)):
    out.append((leaf_info(meta, name=name, kind=kind, index=i, param=param, slot=slot), tuple(path)))
  return out


def variable_names(state: Any) -> list[str]:
  """Lists the names of a state's leaves under the naming contract.

  These are the names that `WarmStartSettings` selects and renames, in the
  order of the state's leaves (of its `nnx.state` for NNX objects).

  Args:
    state: A `TrainState`, a Linen variables dict, a params tree, an NNX
      `State`, NNX objects (a Module, an Optimizer, `(model, optimizer)`), or
      an `nnx.split` pair.

  Returns:
    The names, one per leaf.

  Raises:
    WarmStartError: If `state` is not a state form (saying which forms work).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax.training import train_state
    >>> params = {"dense": {"kernel": jnp.ones((2, 2))}}
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9))
    >>> variable_names(state)
    ['step', 'dense/kernel', 'dense/kernel/opt_state/0/trace']

    An NNX model with its optimizer is named the same way:

    >>> from flax import nnx
    >>> model = nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    >>> variable_names((model, optimizer))
    ['kernel', 'kernel/opt_state/0/trace', 'step']
  """
  return [v.name for v in flatten_state(state)[0]]


def unwrap_split(state: Any) -> Any:
  """The pytree of a state that is named and merged: the `nnx.State` of NNX objects or an `nnx.split` pair, else the state."""
  return state_lib.tree_of(state)
