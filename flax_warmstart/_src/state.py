"""State forms: which kind of training state was given, the pytree that is named, and the same kind back.

Every public function takes the live state in any form a Flax user holds:

* a pytree: a Flax `TrainState` (or subclass), a Linen variables dict, a
  params tree (dict or `FrozenDict`), an NNX `State` (`nnx.state(model)`,
  `nnx.state((model, optimizer))`), or a tuple, list or dict of these;
* the `(graphdef, state)` pair of `nnx.split`;
* NNX objects: an `nnx.Module`, an `nnx.Optimizer`, or a tuple, list or dict
  of them (`(model, optimizer)`, `{"model": m, "optimizer": o}`);

and any of these abstractly (`jax.ShapeDtypeStruct` leaves, as
`jax.eval_shape` or `nnx.eval_shape` give). `recognise` finds the form and the
pytree the naming contract names (for NNX objects, their `nnx.split` state);
`StateForm.rebuild` turns that pytree, with new leaves, back into the input's
kind: NNX objects come back as new objects (`nnx.merge`), the input is never
modified. Anything else is refused here, saying what was given and which
forms work, before a name is made.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection
from typing import Any

import jax
from flax import nnx

from flax_warmstart._src.errors import WarmStartError

STATE_FORMS = (
  "a flax TrainState (or subclass), a Linen variables dict ({'params': ...}), a params tree (dict or FrozenDict),"
  " an NNX Module or nnx.Optimizer, a tuple, list or dict of them such as (model, optimizer), their"
  " nnx.state(...), or the (graphdef, state) tuple of nnx.split; each also abstractly (jax.ShapeDtypeStruct"
  " leaves, from jax.eval_shape or nnx.eval_shape)"
)


class Form(enum.StrEnum):
  """How a state is held.

  * `PYTREE`: a JAX pytree, named and rebuilt as it is.
  * `NNX_SPLIT`: the `(graphdef, state)` pair of `nnx.split`.
  * `NNX_OBJECTS`: NNX objects (a Module, an Optimizer, or a container of
    them), named through their `nnx.split` state and rebuilt by `nnx.merge`.

  Examples:
    >>> str(Form.NNX_SPLIT)
    'nnx_split'
  """

  PYTREE = "pytree"
  NNX_SPLIT = "nnx_split"
  NNX_OBJECTS = "nnx_objects"


@dataclasses.dataclass(frozen=True)
class StateForm:
  """A recognised state: its form, the pytree that is named, and how to give the same kind back.

  Attributes:
    form: The `Form`.
    tree: The pytree named under the naming contract and merged into: the
      state itself, or for NNX objects and split pairs their `nnx.State`.
    graphdef: For `NNX_SPLIT` and `NNX_OBJECTS`, the `nnx.GraphDef`.

  Examples:
    >>> import jax.numpy as jnp
    >>> form = recognise({"w": jnp.zeros(2)})
    >>> form.form, form.rebuild({"w": jnp.ones(2)})["w"].tolist()
    (<Form.PYTREE: 'pytree'>, [1.0, 1.0])
  """

  form: Form
  tree: Any
  graphdef: Any = None

  def rebuild(self, tree: Any) -> Any:
    """The state of the input's kind holding `tree` (of `self.tree`'s structure): new objects, input untouched."""
    if self.form is Form.NNX_SPLIT:
      return (self.graphdef, tree)
    if self.form is Form.NNX_OBJECTS:
      return nnx.merge(self.graphdef, tree)
    return tree


def recognise(state: Any) -> StateForm:
  """Recognises the form of a live state (see the module docstring).

  Args:
    state: The live state, in any form the library takes.

  Returns:
    Its `StateForm`.

  Raises:
    WarmStartError: If `state` is none of the forms (None, an empty
      container, a single value, a graphdef that is not nnx.split's pair, or a
      pair whose graphdef belongs to another model), saying what was given
      and which forms work.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> form = recognise(model)
    >>> form.form, sorted(form.tree.keys())
    (<Form.NNX_OBJECTS: 'nnx_objects'>, ['bias', 'kernel'])
    >>> recognise(None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    flax_warmstart._src.errors.WarmStartError: The state is None...
  """
  if _is_split_pair(state):
    graphdef, tree = state
    _check_pair(graphdef, tree)
    form = StateForm(Form.NNX_SPLIT, tree, graphdef)
  elif _holds_graph_nodes(state):
    try:
      graphdef, tree = nnx.split(state)
    except Exception as err:
      raise WarmStartError(
        f"The state holds NNX objects, but nnx.split cannot split it ({type(err).__name__}: {err}). Pass {STATE_FORMS}."
      ) from err
    form = StateForm(Form.NNX_OBJECTS, tree, graphdef)
  else:
    _check_pytree(state)
    form = StateForm(Form.PYTREE, state)
  if not jax.tree_util.tree_leaves(form.tree):
    raise WarmStartError(
      f"The state ({_describe(state)}) holds no leaves (no arrays): there is nothing to warm-start. Pass the"
      f" training state itself: {STATE_FORMS}."
    )
  return form


def tree_of(state: Any) -> Any:
  """The pytree of a state that the naming contract names (`recognise(state).tree`)."""
  return recognise(state).tree


def _is_split_pair(state: Any) -> bool:
  return (
    type(state) is tuple and len(state) == 2 and isinstance(state[0], nnx.GraphDef) and isinstance(state[1], nnx.State)
  )


def _check_pair(graphdef: Any, tree: Any) -> None:
  """The pair's graphdef must be the one its state was split with: merged and split again, both come back."""
  try:
    again, tree_again = nnx.split(nnx.merge(graphdef, tree))
    same = again == graphdef and jax.tree_util.tree_structure(tree_again) == jax.tree_util.tree_structure(tree)
  except Exception:  # noqa: BLE001 (any failure to merge is a mismatch, reported below)
    same = False
  if not same:
    raise WarmStartError(
      "The (graphdef, state) pair does not belong together: nnx.merge(graphdef, state) does not give back this"
      " graphdef and this state's structure (the graphdef is another model's, or the state was filtered). Pass"
      " the pair exactly as nnx.split(model) returns it, or the model itself."
    )


def _holds_graph_nodes(state: Any) -> bool:
  """Whether `state` is an NNX object, or a tuple, list or dict with NNX objects among its values."""
  if nnx.graph.is_graph_node(state):
    return True
  if type(state) in (tuple, list) or type(state) is dict:
    values = state.values() if isinstance(state, dict) else state
    return any(nnx.graph.is_graph_node(v) for v in values)
  return False


def _contains_graphdef(state: Any, depth: int = 2) -> bool:
  if isinstance(state, nnx.GraphDef):
    return True
  if depth and isinstance(state, tuple | list | dict):
    values = state.values() if isinstance(state, dict) else state
    return any(_contains_graphdef(v, depth - 1) for v in values)
  return False


def _check_pytree(state: Any) -> None:
  if state is None:
    raise WarmStartError(f"The state is None. Pass the training state to warm-start: {STATE_FORMS}.")
  if _contains_graphdef(state):
    if isinstance(state, list | tuple) and len(state) >= 2 and isinstance(state[0], nnx.GraphDef):
      what = (
        f"a {type(state).__name__} of {len(state)} starting with an nnx.GraphDef"
        if type(state) is not tuple or len(state) != 2
        else f"a tuple (graphdef, {type(state[1]).__name__})"
      )
      raise WarmStartError(
        f"The state is {what}; nnx.split's pair is the tuple (graphdef, state) with one nnx.State, exactly"
        " as nnx.split(model) returns it (for nnx.split(model, filter, ...), merge the states first with"
        f" nnx.merge_state, or pass the model). Or pass {STATE_FORMS}."
      )
    raise WarmStartError(
      f"The state ({_describe(state)}) holds an nnx.GraphDef outside nnx.split's (graphdef, state) pair."
      f" Pass {STATE_FORMS}."
    )
  if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(state)) and jax.tree_util.tree_leaves(state):
    raise WarmStartError(
      f"The state is a single value ({_describe(state)}), not a tree of named arrays: a warm start matches"
      f" leaves by their names in the tree. Pass {STATE_FORMS}."
    )


def _describe(state: Any) -> str:
  """What was given, in a few words: `int 5`, `an empty dict`, `a set of 2`, `a (2,) float32 array`."""
  kind = type(state).__name__
  if isinstance(state, str | bytes | int | float | complex | bool):
    shown = repr(state)
    return f"{kind} {shown[:40]}{'...' if len(shown) > 40 else ''}"
  if isinstance(state, Collection) and not hasattr(state, "shape"):
    return f"a {kind} of {len(state)}" if len(state) else f"an empty {kind}"
  if hasattr(state, "shape") and hasattr(state, "dtype"):
    return f"a {tuple(state.shape)} {state.dtype} array"
  return f"an instance of {kind}"
