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
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx

from flax_warmstart._src.errors import WarmStartError

Kind = Literal["param", "slot", "other"]


@dataclasses.dataclass(frozen=True)
class Variable:
  """One named leaf of a state or a checkpoint.

  Attributes:
    name: The name under the naming contract.
    kind: `"param"`, `"slot"` (mirrors a parameter) or `"other"`.
    index: Position of the leaf in the flattened tree.
    param: For a slot, the name of its parameter; else None.
    slot: For a slot, the path of its subtree from the root (`opt_state/0/mu`).
    shape: The leaf's shape.
    dtype: The leaf's dtype.
  """

  name: str
  kind: Kind
  index: int
  param: str | None
  slot: str | None
  shape: tuple[int, ...]
  dtype: np.dtype


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


def _is_nnx_leaf(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def flatten_state(state: Any) -> tuple[list[Variable], list[Any], Any]:
  """Flattens a live training state under the naming contract.

  Args:
    state: A `TrainState` (or any object with `params`), a Linen variables
      dict, a params tree, or a Flax NNX `State`.

  Returns:
    `(variables, leaves, treedef)`: the named leaves in flatten order, the raw
    leaves, and the treedef that `jax.tree_util.tree_unflatten` takes back.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_nnx_leaf)
  paths, leaves, is_param = [], [], []
  nnx_state = isinstance(state, nnx.State)
  for path, leaf in flat:
    names = tuple(key_name(k) for k in path)
    if isinstance(leaf, nnx.Variable):
      param = isinstance(leaf, nnx.Param)
      for sub_path, sub_leaf in jax.tree_util.tree_flatten_with_path(leaf)[0]:
        paths.append(names + _strip_value(tuple(sub_path)))
        leaves.append(sub_leaf)
        is_param.append(param)
      continue
    # An `nn.Partitioned`-style box: drop its `value` attribute from the name.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
      names = names[:-1]
    paths.append(names)
    leaves.append(leaf)
    is_param.append(None)
  prefix = () if nnx_state else _params_prefix(state)
  is_param = [
    p if p is not None else (not nnx_state and path[: len(prefix)] == prefix)
    for p, path in zip(is_param, paths, strict=True)
  ]
  named = name_paths(paths, is_param, prefix)
  variables = [
    Variable(name, kind, i, param, slot, *_shape_dtype(leaf))
    for i, ((name, kind, param, slot), leaf) in enumerate(zip(named, leaves, strict=True))
  ]
  treedef = jax.tree_util.tree_structure(state)
  return variables, leaves, treedef


def _strip_value(sub_path: tuple[Any, ...]) -> tuple[str, ...]:
  names = tuple(key_name(k) for k in sub_path)
  return names[:-1] if names and names[-1] == "value" else names


def _params_prefix(tree: Any) -> tuple[str, ...]:
  if isinstance(tree, Mapping):
    if "params" in tree:
      return ("params",)
    # A T5X state dict: {"target": params, "state": {"param_states": ..., "step": ...}}.
    return ("target",) if "target" in tree and "state" in tree else ()
  return ("params",) if hasattr(tree, "params") else ()


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), np.dtype(leaf.dtype)
  return tuple(np.shape(leaf)), np.asarray(leaf).dtype


def flatten_checkpoint_tree(tree: Any) -> list[tuple[Variable, tuple[Any, ...]]]:
  """Names the leaves of a checkpoint's metadata tree under the naming contract.

  Args:
    tree: The nested metadata tree of an Orbax PyTree checkpoint (leaves are
      Orbax value metadata with `shape` and `dtype`).

  Returns:
    `(variable, key_path)` pairs: `key_path` addresses the leaf in `tree`.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [tuple(key_name(k) for k in path) for path, _ in flat]
  # A checkpoint of an NNX state stores each Variable as {"value": array}.
  if paths and all(len(p) > 1 and p[-1] == "value" for p in paths):
    paths = [p[:-1] for p in paths]
  prefix = _params_prefix(tree)
  is_param = [p[: len(prefix)] == prefix for p in paths]
  named = name_paths(paths, is_param, prefix)
  out = []
  for i, ((name, kind, param, slot), (path, meta)) in enumerate(zip(named, flat, strict=True)):
    shape = tuple(getattr(meta, "shape", None) or ())
    dtype = getattr(meta, "dtype", None)
    dtype = np.dtype(dtype) if dtype is not None else np.dtype("O")
    out.append((Variable(name, kind, i, param, slot, shape, dtype), tuple(path)))
  return out


def variable_names(state: Any) -> list[str]:
  """Lists the names of a state's leaves under the naming contract.

  These are the names that `WarmStartSettings` selects and renames, in the
  order of the state's leaves.

  Args:
    state: A `TrainState`, a Linen variables dict, a params tree or an NNX
      `State`.

  Returns:
    The names, one per leaf.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax.training import train_state
    >>> params = {"dense": {"kernel": jnp.ones((2, 2))}}
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9))
    >>> variable_names(state)
    ['step', 'dense/kernel', 'dense/kernel/opt_state/0/trace']
  """
  return [v.name for v in flatten_state(unwrap_split(state))[0]]


def unwrap_split(state: Any) -> Any:
  """The state inside an `nnx.split` pair `(graphdef, state)`; any other state as it is."""
  return state[1] if is_nnx_split(state) else state


def is_nnx_split(state: Any) -> bool:
  """Whether `state` is the `(graphdef, state)` pair of `nnx.split`."""
  return (
    isinstance(state, tuple)
    and len(state) == 2
    and isinstance(state[0], nnx.GraphDef)
    and isinstance(state[1], nnx.State)
  )
