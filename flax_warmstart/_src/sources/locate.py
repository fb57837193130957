"""Where a checkpoint is: `file://` URLs, which step of a run directory, and what to say when nothing is there.

One rule picks the step everywhere: a run directory's entries named
`<prefix>_<step>` (`checkpoint_20`, `checkpoint_0.91`, a `CheckpointManager`'s
`20`) that hold a checkpoint, unfinished saves left out (their names carry a
temporary suffix), and of those the newest step, unless the caller asks for a
given step or for the best step by a saved metric (`"min:loss"`,
`"max:accuracy"`: Orbax's `CheckpointManager` saves each step's `metrics`, but
not its `best_fn` or `best_mode`, so the metric and direction are named).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from flax_warmstart._src.errors import WarmStartError

STEP_NAME = re.compile(r"^(?:.*_)?(\d+(?:\.\d+)?)$")
_BEST = re.compile(r"^(min|max):(.+)$")

Step = int | float | str | None

# Every layout `open_source` reads, for the message about a path it cannot read.
LAYOUTS = (
  "Orbax: a CheckpointManager root (newest step), a step directory, or a checkpoint directory (with _METADATA)",
  "Orbax 2023 / Flax save_checkpoint with Orbax: arrays inside the directory's msgpack `checkpoint` file",
  "Flax msgpack: a `checkpoint_<step>` file of flax.training.checkpoints, a directory of them (newest step),"
  " or Hugging Face's flax_model.msgpack",
  "T5X: a `checkpoint_<step>` directory with a msgpack `checkpoint` file and TensorStore arrays, or its parent",
  "TensorFlow: a directory with a `checkpoint` state file, a prefix (model.ckpt-500), or its .index file",
  "safetensors: model.safetensors, a *.safetensors.index.json of shards, or a directory with them",
  "npz: an .npz file of np.savez (big_vision)",
)


def local_path(location: str) -> str:
  """A `file://` URL as a local path; any other location as it is.

  Examples:
    >>> local_path("file:///ckpts/run%201")
    '/ckpts/run 1'
    >>> local_path("gs://bucket/run")
    'gs://bucket/run'
  """
  if not location.startswith("file://"):
    return location
  url = urllib.parse.urlparse(location)
  if url.netloc not in ("", "localhost"):
    raise WarmStartError(
      f"{location} names the host {url.netloc!r}; file:// URLs must name a local file (file:///path or"
      " file://localhost/path). Give the local path."
    )
  return urllib.parse.unquote(url.path)


def step_value(name: str) -> int | float | None:
  """The step a run directory's entry is named for (`checkpoint_20` -> 20, `checkpoint_0.91` -> 0.91), or None."""
  match = STEP_NAME.match(name)
  if match is None:
    return None
  text = match.group(1)
  return float(text) if "." in text else int(text)


def steps_in(path: str, holds_checkpoint: Callable[[str], bool]) -> list[tuple[int | float, str]]:
  """The `(step, entry)` pairs of a run directory whose entries hold a checkpoint, sorted by step."""
  out = []
  for name in os.listdir(path):
    step = step_value(name)
    entry = os.path.join(path, name)
    if step is not None and holds_checkpoint(entry):
      out.append((step, entry))
  return sorted(out)


def choose_step(path: str, steps: list[tuple[int | float, str]], step: Step) -> tuple[int | float, str]:
  """Picks a step of a run directory: the newest (`step=None`), a given one, or the best by a metric.

  Args:
    path: The run directory (for messages).
    steps: Its `(step, entry)` pairs (`steps_in`).
    step: None for the newest, a number for that step, or `"min:<metric>"` /
      `"max:<metric>"` for the step whose saved metric is lowest / highest.

  Returns:
    `(step, entry)`.

  Raises:
    WarmStartError: Listing the steps (or metrics) there are, if the asked
      one is not there.
  """
  listed = ", ".join(str(s) for s, _ in steps[-10:]) or "none"
  if not steps:
    raise WarmStartError(f"{path} holds no finished checkpoint step.")
  if step is None:
    return steps[-1]
  if isinstance(step, int | float) and not isinstance(step, bool):
    for s, entry in steps:
      if s == step:
        return s, entry
    raise WarmStartError(
      f"{path} has no step {step}; its steps are {listed}. Give one of them, or None for the newest."
    )
  match = _BEST.match(step) if isinstance(step, str) else None
  scored = {s: metrics(entry) for s, entry in steps}
  names = sorted({k for m in scored.values() for k in m})
  if match is None:
    raise WarmStartError(
      f"step={step!r} is not a step: give a number, None (the newest step), or the best step by a saved metric,"
      f" 'min:<metric>' or 'max:<metric>' (Orbax saves metrics but not how to rank them); metrics saved in {path}:"
      f" {names or 'none'}."
    )
  mode, metric = match.groups()
  ranked = [(value, s, entry) for s, entry in steps if _is_number(value := scored[s].get(metric))]
  if not ranked:
    raise WarmStartError(
      f"No step of {path} has a saved metric {metric!r} (metrics saved: {names or 'none'}). Save it with"
      " CheckpointManager.save(step, ..., metrics={...}), or give a step number."
    )
  best = (min if mode == "min" else max)(ranked, key=lambda r: (r[0], r[1] if mode == "max" else -r[1]))
  return best[1], best[2]


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def metrics(entry: str) -> dict[str, Any]:
  """The metrics saved with an Orbax step: its `metrics` item, or its `_CHECKPOINT_METADATA`'s `metrics` ({} if none)."""
  for candidate, key in (
    (os.path.join(entry, "metrics", "metrics"), None),
    (os.path.join(entry, "_CHECKPOINT_METADATA"), "metrics"),
  ):
    try:
      with open(candidate, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError):
      continue
    data = data.get(key) if key else data
    if isinstance(data, dict) and data:
      return data
  return {}


def unknown_layout(location: str, path: str) -> WarmStartError:
  """The error for a path that no format reads: what is there, and every layout that is read."""
  if not os.path.exists(path):
    found = "the path does not exist"
  elif os.path.isfile(path):
    with open(path, "rb") as f:
      head = f.read(16)
    found = f"a file of {os.path.getsize(path)} bytes starting with {head!r}"
  else:
    names = sorted(os.listdir(path))
    shown = ", ".join(n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names[:12])
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    found = f"a directory holding {shown}{more}" if names else "an empty directory"
  layouts = "".join(f"\n  - {layout}" for layout in LAYOUTS)
  return WarmStartError(
    f"No checkpoint found at {location}: {found}. These layouts are read:{layouts}\nGive the path of one of them."
  )
