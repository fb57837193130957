"""W3: selective read: time and bytes read must follow the selection, not the checkpoint.

Builds (once, in --workdir) a 4 GiB Orbax checkpoint of 40 scopes of about
100 MiB each (`layer_00` ... `layer_39`, each with four float32 kernels of
6,554 x 1,024: `attn_qkv`, `attn_out`, `mlp_in`, `mlp_out`). Then times,
alternating methods in fresh subprocesses, with the page cache warmed by
reading the checkpoint files before each run:

  orbax      a plain Orbax StandardCheckpointer restore of the whole
             checkpoint into the live tree's shapes and shardings (the baseline)
  orbax_sel  a plain Orbax partial restore (`partial_restore=True`) of the 4
             selected scopes only (the floor for a selective read)
  fws_sel    flax_warmstart.warm_start with vars_to_warm_start a regex that
             selects 4 of the 40 scopes (10 %): `layer_(00|01|02|03)/`
  fws_all    flax_warmstart.warm_start of every parameter (100 %)

Each run starts from a live state that already exists (the model's 4 GiB of
fresh leaves), as in a training script. Bytes read are the deltas of
/proc/self/io around the timed call in that process: `rchar` (bytes returned
by read()/pread(), from the page cache included) and `read_bytes` (bytes
fetched from storage; near 0 with a warm cache). The bytes the plan says it
reads (`plan.nbytes`) are printed too. Prints every run, then medians and the
ratios against the full restore; the target is fws_sel under 0.2x of orbax.

Examples:
  python benchmarks/selective_read.py --runs 5
  python benchmarks/selective_read.py --runs 1 --rows 64 --workdir /tmp/fws_bench_w3_small
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

SCOPES, SELECTED, ROWS, COLS = 40, 4, 6_554, 1_024
KERNELS = ("attn_qkv", "attn_out", "mlp_in", "mlp_out")
TARGET_RATIO = 0.2


def scope_names(scopes: int) -> list[str]:
  width = len(str(scopes - 1))
  return [f"layer_{i:0{width}d}" for i in range(scopes)]


def selection_regex(scopes: int, selected: int) -> str:
  """A `vars_to_warm_start` regex selecting the first `selected` scopes."""
  return f"({'|'.join(scope_names(scopes)[:selected])})/"


def _tree(scopes: int, make) -> dict:
  """`{"params": {scope: {kernel: {"kernel": make()}}}}`."""
  return {"params": {s: {k: {"kernel": make()} for k in KERNELS} for s in scope_names(scopes)}}


def build(workdir: str, scopes: int, rows: int, cols: int) -> None:
  """Writes the checkpoint once (again if the sizes asked for changed)."""
  wanted = {"scopes": scopes, "kernels": list(KERNELS), "rows": rows, "cols": cols, "dtype": "float32"}
  ckpt = start_build(workdir, wanted)
  if ckpt is None:
    return
  gib = scopes * len(KERNELS) * rows * cols * 4 / 2**30
  print(f"building {scopes} scopes x {len(KERNELS)} kernels of {rows} x {cols} float32 ({gib:.2f} GiB) ...", flush=True)
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  rng = np.random.default_rng(0)
  # Random values: zstd cannot shrink them, so the files are as big as the tensors.
  tree = _tree(scopes, lambda: jax.device_put(rng.standard_normal((rows, cols), dtype=np.float32)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, tree)
  del tree
  finish_build(workdir, wanted)


def _io() -> dict[str, int]:
  """This process's I/O counters (all threads): rchar, read_bytes, ..."""
  with open("/proc/self/io") as f:
    return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def run_one(method: str, workdir: str, scopes: int, selected: int, rows: int, cols: int) -> dict[str, float]:
  """One timed run in this (fresh) process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp

  import flax_warmstart as fws  # imported before timing, like orbax

  live = jax.block_until_ready(_tree(scopes, lambda: jnp.zeros((rows, cols), jnp.float32)))
  path = os.path.join(workdir, "orbax")
  names = scope_names(scopes)
  chosen = names[:selected] if method.endswith("_sel") else names
  regex = selection_regex(scopes, selected) if method == "fws_sel" else ".*"
  settings = fws.WarmStartSettings(path, vars_to_warm_start=regex)

  def abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

  before, start = _io(), time.perf_counter()
  if method == "orbax":
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, jax.tree.map(abstract, live))
  elif method == "orbax_sel":
    item = {"params": {s: jax.tree.map(abstract, live["params"][s]) for s in chosen}}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), item)
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  elif method in ("fws_sel", "fws_all"):
    out = fws.warm_start(live, settings, show_progress=False)
  else:
    raise ValueError(method)
  jax.block_until_ready(out)
  seconds, after = time.perf_counter() - start, _io()
  # Correctness: chosen scopes restored (the live leaves are zeros), the others not read.
  for s in names:
    restored = np.any(np.asarray(out["params"][s]["mlp_out"]["kernel"][:1])) if s in out["params"] else False
    if restored != (s in chosen):
      raise RuntimeError(f"{method}: {s} {'not ' if s in chosen else ''}restored")
  plan_bytes = len(chosen) * len(KERNELS) * rows * cols * 4
  if method.startswith("fws"):
    plan = fws.plan(live, settings)
    if plan.nbytes != plan_bytes:
      raise RuntimeError(f"{method}: plan reads {plan.nbytes} bytes, expected {plan_bytes}: {plan.summary()}")
  return {
    "seconds": seconds,
    "rchar": after["rchar"] - before["rchar"],
    "read_bytes": after["read_bytes"] - before["read_bytes"],
    "selected_bytes": plan_bytes,
    "peak_gib": peak_rss_gib(),
  }


def _child(args: list[str], env: dict[str, str]) -> str:
  """Runs this script with `args` in a fresh process; its stdout, or its stderr and exit on failure."""
  out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
  if out.returncode:
    sys.exit(f"{' '.join(args)} failed:\n{out.stderr}")
  return out.stdout


def _files(path: str) -> list[str]:
  return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/fws_bench_w3", help="where the checkpoint is built (reused)")
  parser.add_argument("--runs", type=int, default=5, help="runs per method")
  parser.add_argument("--methods", default="orbax,orbax_sel,fws_sel,fws_all", help="comma-separated subset")
  parser.add_argument("--scopes", type=int, default=SCOPES, help="number of scopes (4 kernels each)")
  parser.add_argument("--selected", type=int, default=SELECTED, help="scopes the regex selects")
  parser.add_argument("--rows", type=int, default=ROWS, help="rows of each float32 kernel")
  parser.add_argument("--cols", type=int, default=COLS, help="columns of each float32 kernel")
  parser.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one == "build":
    build(args.workdir, args.scopes, args.rows, args.cols)
    return
  if args.one:
    print(json.dumps(run_one(args.one, args.workdir, args.scopes, args.selected, args.rows, args.cols)))
    return
  methods = args.methods.split(",")
  results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  size_args = ["--workdir", args.workdir, "--scopes", str(args.scopes), "--selected", str(args.selected)]
  size_args += ["--rows", str(args.rows), "--cols", str(args.cols)]
  # Built in a child: this process stays small while the runs need the memory.
  print(_child([*size_args, "--one", "build"], env), end="", flush=True)
  ckpt = os.path.join(args.workdir, "orbax")
  on_disk = sum(os.path.getsize(name) for name in _files(ckpt))
  print(
    f"checkpoint {ckpt}: {args.scopes} scopes, {on_disk / 2**30:.2f} GiB on disk;"
    f" selection {selection_regex(args.scopes, args.selected)!r} ({args.selected} scopes)",
    flush=True,
  )
  for run in range(args.runs):
    for method in methods:  # alternate methods so drift hits all alike
      warm_cache(ckpt)
      time.sleep(args.pause)
      result = json.loads(_child([*size_args, "--one", method], env).strip().splitlines()[-1])
      results[method].append(result)
      print(
        f"run {run} {method:9s} {result['seconds']:7.2f} s  rchar {result['rchar'] / 2**30:6.3f} GiB"
        f"  read_bytes {result['read_bytes'] / 2**30:6.3f} GiB  selected {result['selected_bytes'] / 2**30:6.3f} GiB"
        f"  peak {result['peak_gib']:.2f} GiB",
        flush=True,
      )
  import jax
  import orbax.checkpoint as ocp

  print(
    f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
    f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB,"
    f" Python {platform.python_version()}, jax {jax.__version__}, orbax-checkpoint {ocp.__version__}"
  )

  def med(m: str, key: str) -> float:
    return statistics.median(r[key] for r in results[m])

  full_s = med("orbax", "seconds") if "orbax" in results else float("nan")
  full_b = med("orbax", "rchar") if "orbax" in results else float("nan")
  print(
    f"{'method':10s} {'median s':>9s} {'rchar GiB':>10s} {'read_bytes GiB':>15s} {'selected GiB':>13s}"
    f" {'peak GiB':>9s} {'s x orbax':>10s} {'rchar x orbax':>14s}"
  )
  for m in methods:
    print(
      f"{m:10s} {med(m, 'seconds'):9.2f} {med(m, 'rchar') / 2**30:10.3f} {med(m, 'read_bytes') / 2**30:15.3f}"
      f" {med(m, 'selected_bytes') / 2**30:13.3f} {med(m, 'peak_gib'):9.2f} {med(m, 'seconds') / full_s:10.3f}"
      f" {med(m, 'rchar') / full_b:14.3f}"
    )
  if "fws_sel" in results and "orbax" in results:
    ratio = med("fws_sel", "seconds") / full_s
    verdict = "met" if ratio < TARGET_RATIO else "NOT met"
    print(f"fws_sel / full restore: time {ratio:.3f}, rchar {med('fws_sel', 'rchar') / full_b:.3f};", end=" ")
    print(f"target time < {TARGET_RATIO}x {verdict}")


if __name__ == "__main__":
  main()
