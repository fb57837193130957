"""Memory over many calls: RSS growth per call of `warm_start` and `plan` (issue 13, kind 8).

Three workloads, each in its own fresh process (so one cannot hide another's
growth), each warmed up first (JAX compiles, caches fill), then called
`--calls` times; the RSS is sampled every tenth of the calls and the growth
per call is the slope of a least-squares line through the samples after the
warm-up, in KiB per call (so a single late allocation does not dominate):

* `small`: `warm_start` of a 3-leaf state from an Orbax checkpoint;
* `many`: `warm_start` of a 400-leaf state (the host read path, one TensorStore per array);
* `numpy_plan`: `plan()` on a checkpoint whose leaves were saved as numpy arrays and Python scalars.

Usage: python benchmarks/memory_growth.py --calls 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import rss_bytes


def _one(workload: str, calls: int, workdir: str) -> dict:
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp

  import flax_warmstart as fws

  path = os.path.join(workdir, workload)
  if workload == "small":
    tree = {"params": {"a": jnp.ones((4, 4)), "b": jnp.ones(4)}, "step": jnp.array(3)}
    state = {"params": {"a": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, "step": jnp.array(0)}
  elif workload == "many":
    tree = {"params": {f"layer_{i}": {"w": jnp.full((16, 16), float(i))} for i in range(400)}}
    state = {"params": {f"layer_{i}": {"w": jnp.zeros((16, 16))} for i in range(400)}}
  else:
    tree = {"params": {f"p{i}": np.full((8,), i, np.float32) for i in range(50)}, "count": 7, "rate": 0.5}
    state = {"params": {f"p{i}": np.zeros((8,), np.float32) for i in range(50)}, "count": 0, "rate": 0.0}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"])

  def call() -> None:
    if workload == "numpy_plan":
      fws.plan(state, settings)
    else:
      fws.warm_start(state, settings, show_progress=False)

  for _ in range(max(20, calls // 10)):  # warm-up
    call()
  samples = []
  for i in range(calls):
    call()
    if i % max(1, calls // 10) == 0 or i == calls - 1:
      samples.append((i, rss_bytes()))
  xs = np.array([s[0] for s in samples], float)
  ys = np.array([s[1] for s in samples], float)
  slope = float(np.polyfit(xs, ys, 1)[0])
  return {"workload": workload, "calls": calls, "kib_per_call": slope / 1024, "rss_mib_end": ys[-1] / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--calls", type=int, default=1000)
  parser.add_argument("--workloads", nargs="*", default=["small", "many", "numpy_plan"])
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    with tempfile.TemporaryDirectory() as workdir:
      print(json.dumps(_one(args.child, args.calls, workdir)))
    return
  for workload in args.workloads:
    cmd = [sys.executable, __file__, "--child", workload, "--calls", str(args.calls)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    print(
      f"{workload:11s} {result['calls']} calls: {result['kib_per_call']:+.2f} KiB/call, end RSS {result['rss_mib_end']:.0f} MiB"
    )


if __name__ == "__main__":
  main()
