"""Provenance: where a run's weights came from, saved with its checkpoints.

After a warm start, `plan.provenance()` is a small JSON record (sources and
steps, settings, each leaf's action and source) to save with the run's next
checkpoint, as Orbax custom metadata:

    mgr.save(step, args=..., custom_metadata={fws.PROVENANCE_KEY: plan.provenance()})

or as a JSON item named `PROVENANCE_KEY`; `load_provenance(ckpt_dir)` reads
either back, so a run knows where its weights came from across resumes.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import TYPE_CHECKING, Any

from etils import epath

from flax_warmstart._src import report
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.sources import orbax as orbax_source

if TYPE_CHECKING:
  from flax_warmstart._src.rows import WarmStartPlan

PROVENANCE_KEY = "flax_warmstart_provenance"


def provenance(plan: WarmStartPlan) -> dict[str, Any]:
  """A small record of where each leaf came from (see the module docstring)."""
  from flax_warmstart import __version__  # noqa: PLC0415 (the package imports this module)

  full = report.to_dict(plan)
  return {
    "format": PROVENANCE_KEY + "/1",
    "library_version": __version__,
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "checkpoints": full["checkpoints"],
    "settings": full["sources"],
    "leaves": {
      row["name"]: {k: row[k] for k in ("action", "source", "checkpoint") if row[k] is not None}
      | ({"vocab": row["vocab"]} if "vocab" in row else {})
      | ({"inputs": row["inputs"], "chain": row["chain"]} if len(row["inputs"]) > 1 or " -> " in row["chain"] else {})
      for row in full["leaves"]
    },
  }


def load_provenance(location: str | os.PathLike) -> dict[str, Any]:
  """Reads the provenance record saved with a checkpoint.

  Looks in the step's Orbax custom metadata (`custom_metadata=
  {PROVENANCE_KEY: record}` in `CheckpointManager.save`), then for a JSON item
  named `PROVENANCE_KEY`.

  Args:
    location: A `CheckpointManager` root (latest step) or a step directory.

  Returns:
    The record.

  Raises:
    WarmStartError: If the checkpoint holds no provenance record.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> root = tempfile.mkdtemp()
    >>> with ocp.CheckpointManager(root) as mgr:
    ...   _ = mgr.save(1, args=ocp.args.StandardSave({"w": jnp.ones(1)}),
    ...                custom_metadata={PROVENANCE_KEY: {"leaves": {"w": {"action": "load"}}}})
    >>> load_provenance(root)["leaves"]
    {'w': {'action': 'load'}}
  """
  path, _ = orbax_source.locate(location)
  for candidate in (path, path.parent):  # a step directory, or an item inside one
    custom = orbax_source.custom_metadata(epath.Path(candidate))
    if PROVENANCE_KEY in custom:
      return custom[PROVENANCE_KEY]
    item = epath.Path(candidate) / PROVENANCE_KEY
    if item.is_dir():
      files = [f for f in item.iterdir() if f.is_file() and f.name not in ("commit_success.txt",)]
      for f in files:
        try:
          return json.loads(f.read_text())
        except ValueError:
          continue
  raise WarmStartError(
    f"No flax_warmstart provenance in {os.fspath(location)}: save it with"
    f" CheckpointManager.save(..., custom_metadata={{{PROVENANCE_KEY!r}: plan.provenance()}})."
  )
