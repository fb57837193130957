"""T5X integration: warm-start settings as a `state_transformation_fns` entry.

T5X restores through `utils.RestoreCheckpointConfig(state_transformation_fns=
[...])`; each function takes `(ckpt_state_dict, target_state_dict, *,
is_resuming)` and returns the state dict to restore, shaped like
`{"target": params, "state": {"param_states": ..., "step": ...}}`.
`state_transformation(settings)` returns such a function: it applies the
settings' selection, renames, rename rules and vocabulary remaps to the
checkpoint's state dict, on top of the target's freshly initialised values,
and returns the checkpoint state unchanged when T5X is resuming the run's own
checkpoint. In a T5X `.gin` file (see `flax_warmstart/configs/t5x_warm_start.gin`):

    import flax_warmstart.gin
    import flax_warmstart.t5x
    utils.RestoreCheckpointConfig.state_transformation_fns = [@flax_warmstart.t5x.state_transformation()]
    flax_warmstart.t5x.state_transformation.settings = @flax_warmstart.WarmStartSettings()
    flax_warmstart.WarmStartSettings.ckpt_to_initialize_from = %INITIAL_CHECKPOINT_PATH

Names follow the naming contract: params under `target` are named by their
path (`encoder/layers_0/attention/query/kernel`), their optimizer slots
`<param>/state/param_states/<slot>` (e.g. `.../kernel/state/param_states/v_row`),
and the step `state/step`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from flax_warmstart._src.execute import execute_leaves
from flax_warmstart._src.naming import flatten_state
from flax_warmstart._src.planning import build_plan, check_can_reset, resets_optimizer
from flax_warmstart._src.settings import WarmStartSettings
from flax_warmstart._src.sources import in_memory_source

StateDict = Mapping[str, Any]


def state_transformation(settings: WarmStartSettings) -> Callable[..., StateDict]:
  """A T5X state transformation function that warm-starts by `settings`.

  Args:
    settings: What to warm-start; `ckpt_to_initialize_from` names the
      checkpoint T5X restores from (used in messages), T5X reads it.

  Returns:
    `fn(ckpt_state_dict, target_state_dict, *, is_resuming=False) -> state
    dict`: the target's structure, with the selected leaves taken (renamed,
    remapped) from the checkpoint's state dict and the rest from the target.
    When `is_resuming`, the checkpoint's state dict is returned unchanged.

  Raises:
    WarmStartError: (from the returned function) listing every problem, as
      `warm_start` does.

  Examples:
    >>> import numpy as np
    >>> fn = state_transformation(WarmStartSettings("gs://bucket/old", var_name_to_prev_var_name={"dec/w": "enc/w"}))
    >>> ckpt = {"target": {"enc": {"w": np.ones(2)}}, "state": {"step": np.array(7)}}
    >>> target = {"target": {"dec": {"w": np.zeros(2)}}, "state": {"step": np.array(0)}}
    >>> out = fn(ckpt, target, is_resuming=False)
    >>> out["target"]["dec"]["w"].tolist(), int(out["state"]["step"])
    ([1.0, 1.0], 0)
  """

  def transform(ckpt_state_dict: StateDict, target_state_dict: StateDict, *, is_resuming: bool = False) -> StateDict:
    if is_resuming:
      return ckpt_state_dict
    checkpoint = in_memory_source(ckpt_state_dict, f"T5X checkpoint {settings.ckpt_to_initialize_from}")
    variables, leaves, treedef = flatten_state(target_state_dict)
    plan = build_plan(variables, leaves, checkpoint, settings)
    if resets_optimizer(plan):
      check_can_reset(target_state_dict)
    return jax.tree_util.tree_unflatten(treedef, execute_leaves(plan, leaves))

  return transform
