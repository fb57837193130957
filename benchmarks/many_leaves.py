"""W2: many leaves: the per-leaf overhead of planning and warm-starting.

Builds (once, in --workdir) an Orbax checkpoint of a params tree of 4,000
float32 leaves of 256 KiB each (64 x 1,024), nested in scopes as a deep model
names them: `layer_000/dense_0/kernel` ... `layer_999/dense_3/kernel`. Then
times, alternating methods in fresh subprocesses, with the page cache warmed
by reading the checkpoint files before each run:

  orbax      a plain Orbax StandardCheckpointer restore into the same target
             tree (the baseline: no names, no plan)
  plan       flax_warmstart.plan(state, settings) alone (metadata only; the
             target is under 0.5 s for 4,000 leaves); a second call in the
             same process is printed too (one-off costs excluded)
  fws        flax_warmstart.warm_start(state, settings): plan and read, total

Each run starts from a live state that already exists (the model's fresh
leaves), as in a training script. Prints every run, then medians, the ratio
fws / orbax and the per-leaf overhead (fws - orbax) / leaves. When the plan's
median is over the target (or with --profile), profiles one plan call with
cProfile and prints the top 25 functions by cumulative time.

Examples:
  python benchmarks/many_leaves.py --runs 5
  python benchmarks/many_leaves.py --runs 1 --leaves 200 --workdir /tmp/fws_bench_w2_small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from _common import finish_build, peak_rss_gib, start_build, warm_cache

LEAVES, ROWS, COLS = 4_000, 64, 1_024
DENSE_PER_LAYER = 4
PLAN_TARGET_S = 0.5


def leaf_names(n_leaves: int) -> list[tuple[str, str]]:
  """`(layer scope, dense scope)` of each leaf: `("layer_123", "dense_4")`."""
  n_layers = -(-n_leaves // DENSE_PER_LAYER)
  width = len(str(n_layers - 1))
  return [(f"layer_{k // DENSE_PER_LAYER:0{width}d}", f"dense_{k % DENSE_PER_LAYER}") for k in range(n_leaves)]


def _tree(n_leaves: int, make) -> dict:
  """`{"params": {layer: {dense: {"kernel": make(k)}}}}`."""
  params: dict = {}
  for k, (layer, dense) in enumerate(leaf_names(n_leaves)):
    params.setdefault(layer, {})[dense] = {"kernel": make(k)}
  return {"params": params}


def build(workdir: str, leaves: int, rows: int, cols: int) -> None:
  """Writes the checkpoint once (again if the sizes asked for changed)."""
  wanted = {"leaves": leaves, "rows": rows, "cols": cols, "dtype": "float32"}
  ckpt = start_build(workdir, wanted)
  if ckpt is None:
    return
  print(f"building {leaves} leaves of {rows} x {cols} float32 in {ckpt} ...", flush=True)
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  rng = np.random.default_rng(0)
  tree = _tree(leaves, lambda k: jax.device_put(rng.standard_normal((rows, cols), dtype=np.float32)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, tree)
  finish_build(workdir, wanted)


def _live_state(leaves: int, rows: int, cols: int) -> dict:
  import jax
  import jax.numpy as jnp

  live = _tree(leaves, lambda k: jnp.zeros((rows, cols), jnp.float32))
  return jax.block_until_ready(live)


def run_one(method: str, workdir: str, leaves: int, rows: int, cols: int) -> dict[str, float]:
  """One timed run in this (fresh) process."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  import flax_warmstart as fws  # imported before timing, like orbax

  live = _live_state(leaves, rows, cols)
  path = os.path.join(workdir, "orbax")
  settings = fws.WarmStartSettings(path)  # every parameter
  result: dict[str, float] = {}
  start = time.perf_counter()
  if method == "orbax":
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), live)
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, abstract)
  elif method == "plan":
    out = fws.plan(live, settings)
    result["seconds"] = time.perf_counter() - start
    again = time.perf_counter()
    out = fws.plan(live, settings)
    result["second_call"] = time.perf_counter() - again
    if len(out.loaded) != leaves:
      raise RuntimeError(f"plan loads {len(out.loaded)} leaves, expected {leaves}: {out.summary()}")
  elif method == "fws":
    out = fws.warm_start(live, settings, show_progress=False)
  else:
    raise ValueError(method)
  if method != "plan":
    jax.block_until_ready(out)
    result["seconds"] = time.perf_counter() - start
    # Correctness: the last leaf was restored (the live one is zeros).
    layer, dense = leaf_names(leaves)[-1]
    if not np.any(np.asarray(out["params"][layer][dense]["kernel"])):
      raise RuntimeError(f"{method}: {layer}/{dense}/kernel was not restored")
  result["peak_gib"] = peak_rss_gib()
  return result


def profile_plan(workdir: str, leaves: int, rows: int, cols: int, top: int = 25) -> None:
  """Prints cProfile's top functions (cumulative) of one plan call in this fresh process."""
  import cProfile
  import pstats

  import flax_warmstart as fws

  live = _live_state(leaves, rows, cols)
  settings = fws.WarmStartSettings(os.path.join(workdir, "orbax"))
  profiler = cProfile.Profile()
  start = time.perf_counter()
  profiler.enable()
  fws.plan(live, settings)
  profiler.disable()
  print(f"plan() under cProfile: {time.perf_counter() - start:.3f} s for {leaves} leaves")
  stats = pstats.Stats(profiler, stream=sys.stdout)
  stats.sort_stats("cumulative").print_stats(top)
  stats.sort_stats("tottime").print_stats(15)


def _child(args: list[str], env: dict[str, str]) -> str:
  """Runs this script with `args` in a fresh process; its stdout, or its stderr and exit on failure."""
  out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
  if out.returncode:
    sys.exit(f"{' '.join(args)} failed:\n{out.stderr}")
  return out.stdout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/fws_bench_w2", help="where the checkpoint is built (reused)")
  parser.add_argument("--runs", type=int, default=5, help="runs per method")
  parser.add_argument("--methods", default="orbax,plan,fws", help="comma-separated subset")
  parser.add_argument("--leaves", type=int, default=LEAVES, help="number of leaves")
  parser.add_argument("--rows", type=int, default=ROWS, help="rows of each float32 leaf")
  parser.add_argument("--cols", type=int, default=COLS, help="columns of each float32 leaf")
  parser.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
  parser.add_argument("--profile", action="store_true", help="profile plan() even if it meets the target")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  sizes = (args.workdir, args.leaves, args.rows, args.cols)
  if args.one == "profile":
    profile_plan(*sizes)
    return
  if args.one == "build":
    build(*sizes)
    return
  if args.one:
    print(json.dumps(run_one(args.one, *sizes)))
    return
  methods = args.methods.split(",")
  results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  size_args = ["--workdir", args.workdir, "--leaves", str(args.leaves), "--rows", str(args.rows)]
  size_args += ["--cols", str(args.cols)]
  # Built in a child: this process stays small while the runs need the memory.
  print(_child([*size_args, "--one", "build"], env), end="", flush=True)
  leaf_kib = args.rows * args.cols * 4 / 1024
  print(f"{args.leaves} leaves of {args.rows} x {args.cols} float32 ({leaf_kib:g} KiB each)", flush=True)
  for run in range(args.runs):
    for method in methods:  # alternate methods so drift hits all alike
      warm_cache(os.path.join(args.workdir, "orbax"))
      time.sleep(args.pause)
      result = json.loads(_child([*size_args, "--one", method], env).strip().splitlines()[-1])
      results[method].append(result)
      extra = f"  (second call {result['second_call']:.3f} s)" if "second_call" in result else ""
      print(f"run {run} {method:6s} {result['seconds']:7.3f} s  peak {result['peak_gib']:.2f} GiB{extra}", flush=True)
  import jax
  import orbax.checkpoint as ocp

  print(
    f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
    f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB,"
    f" Python {platform.python_version()}, jax {jax.__version__}, orbax-checkpoint {ocp.__version__}"
  )
  med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
  peak = {m: statistics.median(r["peak_gib"] for r in rs) for m, rs in results.items()}
  orbax = med.get("orbax", float("nan"))
  print(f"{'method':8s} {'median s':>9s} {'peak GiB':>9s} {'x orbax':>8s}")
  for m in methods:
    print(f"{m:8s} {med[m]:9.3f} {peak[m]:9.2f} {med[m] / orbax:8.2f}")
  if "plan" in med:
    second = statistics.median(r["second_call"] for r in results["plan"])
    verdict = "met" if med["plan"] < PLAN_TARGET_S else "NOT met"
    print(
      f"plan: {med['plan']:.3f} s (second call in the same process {second:.3f} s); target < {PLAN_TARGET_S} s {verdict}"
    )
    print(f"plan per leaf: {med['plan'] / args.leaves * 1e6:.1f} us")
  if "fws" in med and "orbax" in med:
    print(f"fws / orbax: {med['fws'] / orbax:.2f}")
    print(f"per-leaf overhead (fws - orbax) / leaves: {(med['fws'] - orbax) / args.leaves * 1e6:.1f} us")
  if args.profile or med.get("plan", 0.0) >= PLAN_TARGET_S:
    print("\nProfile of one plan() call (fresh process):", flush=True)
    warm_cache(os.path.join(args.workdir, "orbax"))
    print(_child([*size_args, "--one", "profile"], env))


if __name__ == "__main__":
  main()
