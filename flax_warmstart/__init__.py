"""flax_warmstart: warm-start JAX/Flax training state from an earlier checkpoint.

The JAX counterpart of TensorFlow's `tf.estimator.WarmStartSettings` and
`tf.compat.v1.train.warm_start`:

>>> import flax_warmstart as fws
>>> settings = fws.WarmStartSettings("/runs/old", vars_to_warm_start=".*encoder.*")
>>> # state = fws.warm_start(state, settings)

This module is the public API; `flax_warmstart.cli`, `flax_warmstart.gin`
and `flax_warmstart.t5x` are the public integrations. Everything under
`flax_warmstart._src` is private.
"""

from flax_warmstart._src.api import has_checkpoint as has_checkpoint
from flax_warmstart._src.api import init_from_checkpoint as init_from_checkpoint
from flax_warmstart._src.api import list_variables as list_variables
from flax_warmstart._src.api import plan as plan
from flax_warmstart._src.api import plan_init_from_checkpoint as plan_init_from_checkpoint
from flax_warmstart._src.api import warm_start as warm_start
from flax_warmstart._src.api import warm_start_or_resume as warm_start_or_resume
from flax_warmstart._src.errors import WarmStartError as WarmStartError
from flax_warmstart._src.execute import execute as execute
from flax_warmstart._src.naming import variable_names as variable_names
from flax_warmstart._src.provenance import PROVENANCE_KEY as PROVENANCE_KEY
from flax_warmstart._src.provenance import load_provenance as load_provenance
from flax_warmstart._src.rows import Action as Action
from flax_warmstart._src.rows import LeafPlan as LeafPlan
from flax_warmstart._src.rows import Reason as Reason
from flax_warmstart._src.rows import Reset as Reset
from flax_warmstart._src.rows import WarmStartPlan as WarmStartPlan
from flax_warmstart._src.settings import MeanCovarianceOfOldRows as MeanCovarianceOfOldRows
from flax_warmstart._src.settings import MeanOfOldRows as MeanOfOldRows
from flax_warmstart._src.settings import VocabInfo as VocabInfo
from flax_warmstart._src.settings import WarmStartSettings as WarmStartSettings
from flax_warmstart._src.surgery import Broadcast as Broadcast
from flax_warmstart._src.surgery import Reshape as Reshape
from flax_warmstart._src.surgery import Stack as Stack
from flax_warmstart._src.surgery import Take as Take
from flax_warmstart._src.surgery import Transpose as Transpose
from flax_warmstart._src.transform import Cast as Cast

__version__ = "0.1.0"

__all__ = (
  "Action",
  "Broadcast",
  "Cast",
  "LeafPlan",
  "MeanCovarianceOfOldRows",
  "MeanOfOldRows",
  "PROVENANCE_KEY",
  "Reason",
  "Reset",
  "Reshape",
  "Stack",
  "Take",
  "Transpose",
  "VocabInfo",
  "WarmStartError",
  "WarmStartPlan",
  "WarmStartSettings",
  "execute",
  "has_checkpoint",
  "init_from_checkpoint",
  "list_variables",
  "load_provenance",
  "plan",
  "plan_init_from_checkpoint",
  "variable_names",
  "warm_start",
  "warm_start_or_resume",
)
