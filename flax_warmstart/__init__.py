"""flax_warmstart: warm-start JAX/Flax training state from an Orbax checkpoint.

The JAX counterpart of TensorFlow's `tf.estimator.WarmStartSettings` and
`tf.compat.v1.train.warm_start`:

>>> import flax_warmstart as fws
>>> settings = fws.WarmStartSettings("/runs/old", vars_to_warm_start=".*encoder.*")
>>> # state = fws.warm_start(state, settings)
"""

from flax_warmstart.checkpoint import list_variables as list_variables
from flax_warmstart.errors import WarmStartError as WarmStartError
from flax_warmstart.execute import execute as execute
from flax_warmstart.naming import variable_names as variable_names
from flax_warmstart.plan import LeafPlan as LeafPlan
from flax_warmstart.plan import WarmStartPlan as WarmStartPlan
from flax_warmstart.report import PROVENANCE_KEY as PROVENANCE_KEY
from flax_warmstart.report import load_provenance as load_provenance
from flax_warmstart.settings import MeanCovarianceOfOldRows as MeanCovarianceOfOldRows
from flax_warmstart.settings import MeanOfOldRows as MeanOfOldRows
from flax_warmstart.settings import VocabInfo as VocabInfo
from flax_warmstart.settings import WarmStartSettings as WarmStartSettings
from flax_warmstart.warm_start import has_checkpoint as has_checkpoint
from flax_warmstart.warm_start import init_from_checkpoint as init_from_checkpoint
from flax_warmstart.warm_start import plan as plan
from flax_warmstart.warm_start import plan_init_from_checkpoint as plan_init_from_checkpoint
from flax_warmstart.warm_start import warm_start as warm_start
from flax_warmstart.warm_start import warm_start_or_resume as warm_start_or_resume

__version__ = "0.1.0"

__all__ = (
  "LeafPlan",
  "MeanCovarianceOfOldRows",
  "MeanOfOldRows",
  "PROVENANCE_KEY",
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
