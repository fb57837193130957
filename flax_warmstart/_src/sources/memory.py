"""The in-memory source: a state dict already loaded (T5X hands one to its state transformations)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from flax_warmstart._src.naming import Variable, flatten_checkpoint_tree
from flax_warmstart._src.sources.base import Source


@dataclasses.dataclass(frozen=True, eq=False)
class MemorySource(Source):
  """A state dict in memory, read as a checkpoint: leaves are arrays or lazy arrays with `shape` and `dtype`.

  Attributes:
    requested: How to name it in messages.
    step: Its step, if known.
    variables: Name -> `Variable`, under the naming contract.
    tree: The state dict.
  """

  format: ClassVar[str] = "in-memory"
  requested: str
  step: int | None
  variables: Mapping[str, Variable]
  tree: Any

  @functools.cached_property
  def _leaves(self) -> list[Any]:
    return jax.tree_util.tree_leaves(self.tree)

  def restore(self, targets: Mapping[str, jax.ShapeDtypeStruct | None]) -> dict[str, Any]:
    return {name: _materialize(self._leaves[self.variables[name].index], spec) for name, spec in targets.items()}


def in_memory_source(tree: Any, description: str, step: int | None = None) -> MemorySource:
  """A source over a state dict already in memory.

  Args:
    tree: The state dict; leaves are arrays or lazy arrays with `shape` and `dtype`.
    description: How to name it in messages.
    step: Its step, if known.

  Returns:
    The source; its `restore` returns values from `tree`.

  Examples:
    >>> import numpy as np
    >>> source = in_memory_source({"w": np.ones(2)}, "<in memory>")
    >>> source.restore({"w": None})["w"].tolist()
    [1.0, 1.0]
  """
  variables = {v.name: v for v, _ in flatten_checkpoint_tree(tree)}
  return MemorySource(requested=description, step=step, variables=variables, tree=tree)


def _materialize(value: Any, spec: jax.ShapeDtypeStruct | None) -> Any:
  """An in-memory value as an array: T5X's lazy arrays are read with `.get()`."""
  if hasattr(value, "get") and not isinstance(value, np.ndarray | jax.Array):
    value = value.get()
  if spec is None:
    return np.asarray(value)
  if spec.sharding is None:
    return np.asarray(value, dtype=spec.dtype)
  return jax.device_put(np.asarray(value, dtype=spec.dtype), spec.sharding)
