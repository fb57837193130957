"""W7: the W1 vocabulary remap on a device mesh, against a plain Orbax restore into the same shardings.

Builds (once, in --workdir) an Orbax checkpoint saved from a (2, 4) mesh of 8
CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), axes
`data` and `model`: `embedder/embedding` f32[262,144, 1,024] as
`P("data", "model")` (8 chunks), two dense kernels (64 MiB) as
`P("data", "model")` and their biases as `P("model")`; an old vocabulary of
262,144 tokens and a new one of 300,000 of which 80 % exist in the old one
(shuffled; new rows are zero). Then times, alternating methods in fresh
subprocesses, the page cache warmed before each run:

  orbax         a plain Orbax restore of the old checkpoint into the same
                shardings (the floor: no remap)
  fws           flax_warmstart.warm_start with a VocabInfo into a live state
                sharded the same way (the new model's fresh 1.2 GiB exists)
  fws_abstract  the same from the abstract state (jax.eval_shape) with init_fn:
                no live state is allocated before the call

Reports seconds, CPU seconds of the process during the call (less sensitive to
other jobs on a shared machine than wall time), peak RSS (VmHWM), the peak
minus the RSS just before the call ("added"), and bytes read through read()
calls (`rchar` of /proc/self/io), medians over --runs and ratios against
`orbax`, and the final state's bytes. `--small` scales every size down 16x (a quick
check).

Example:
  python benchmarks/sharded_remap.py --runs 3
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from _common import (
  DIM,
  NEW_ROWS,
  OLD_ROWS,
  OVERLAP,
  bench_parser,
  peak_rss_gib,
  rss_bytes,
  vocab_info,
  warm_cache,
  write_vocabularies,
)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DENSE = {"dense_0": (2048, 4096), "dense_1": (2048, 4096)}


def _sizes(small: bool) -> tuple[int, int, int, dict[str, tuple[int, int]]]:
  if not small:
    return OLD_ROWS, DIM, NEW_ROWS, DENSE
  return OLD_ROWS // 16, DIM, NEW_ROWS // 16, {k: (a // 4, b // 4) for k, (a, b) in DENSE.items()}


def _mesh():
  import jax

  return jax.make_mesh((2, 4), ("data", "model"))


def _shardings(mesh, dense):
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  out = {"embedder": {"embedding": NamedSharding(mesh, P("data", "model"))}}
  for k in dense:
    out[k] = {"kernel": NamedSharding(mesh, P("data", "model")), "bias": NamedSharding(mesh, P("model"))}
  return {"params": out}


def rchar() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def build(workdir: str, small: bool) -> None:
  import numpy as np

  marker = os.path.join(workdir, "built.json")
  if os.path.exists(marker):
    return
  import jax
  import orbax.checkpoint as ocp

  old_rows, dim, new_rows, dense = _sizes(small)
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(0)
  write_vocabularies(workdir, old_rows, new_rows, OVERLAP, rng)
  shardings = _shardings(_mesh(), dense)
  tree = {
    "params": {
      "embedder": {"embedding": rng.standard_normal((old_rows, dim), dtype=np.float32)},
      **{
        k: {"kernel": rng.standard_normal(s, dtype=np.float32), "bias": np.ones(s[1], np.float32)}
        for k, s in dense.items()
      },
    }
  }
  tree = jax.tree.map(jax.device_put, tree, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(workdir, "orbax"), tree)
  with open(marker, "w") as f:
    json.dump({"small": small}, f)


def run_one(method: str, workdir: str, small: bool) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  import flax_warmstart as fws

  old_rows, dim, new_rows, dense = _sizes(small)
  mesh = _mesh()
  shardings = _shardings(mesh, dense)

  def init():
    return {
      "params": {
        "embedder": {"embedding": jnp.zeros((new_rows, dim), jnp.float32)},
        **{k: {"kernel": jnp.ones(s, jnp.float32), "bias": jnp.zeros(s[1], jnp.float32)} for k, s in dense.items()},
      }
    }

  init_sharded = jax.jit(init, out_shardings=shardings)
  abstract = jax.eval_shape(init_sharded)
  live = jax.block_until_ready(init_sharded()) if method == "fws" else None
  path = os.path.join(workdir, "orbax")
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  base = rss_bytes()
  before = rchar()
  cpu = time.process_time()
  start = time.perf_counter()
  if method == "orbax":
    target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      {
        "params": {
          "embedder": {"embedding": jax.ShapeDtypeStruct((old_rows, dim), jnp.float32)},
          **{
            k: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32), "bias": jax.ShapeDtypeStruct((s[1],), jnp.float32)}
            for k, s in dense.items()
          },
        }
      },
      shardings,
    )
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, target)
  else:
    info = vocab_info(workdir, new_rows)
    settings = fws.WarmStartSettings(path, var_name_to_vocab_info={"embedder/embedding": info})
    if method == "fws":
      out = fws.warm_start(live, settings, show_progress=False)
    else:
      out = fws.warm_start(abstract, settings, init_fn=init, show_progress=False)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - start
  return {
    "seconds": seconds,
    "cpu_s": time.process_time() - cpu,
    "peak_gib": peak_rss_gib(),
    "base_gib": base / 2**30,
    "read_gib": (rchar() - before) / 2**30,
    "state_gib": state_bytes / 2**30,
  }


def main() -> None:
  parser = bench_parser(__doc__, None, "orbax,fws,fws_abstract", pause=2.0)
  parser.add_argument("--small", action="store_true", help="every size 16x smaller")
  args = parser.parse_args()
  workdir = args.workdir or ("/tmp/fws_bench_w7_small" if args.small else "/tmp/fws_bench_w7")
  if args.one:
    print(json.dumps(run_one(args.one, workdir, args.small)))
    return
  build(workdir, args.small)
  methods = args.methods.split(",")
  results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
  for run in range(args.runs):
    for method in methods:
      warm_cache(workdir)
      time.sleep(args.pause)
      cmd = [sys.executable, __file__, "--workdir", workdir, "--one", method] + (["--small"] if args.small else [])
      out = subprocess.run(cmd, check=True, capture_output=True, text=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      results[method].append(r)
      print(
        f"run {run} {method:12s} {r['seconds']:7.2f} s  cpu {r['cpu_s']:5.2f} s  peak {r['peak_gib']:.2f} GiB"
        f"  read {r['read_gib']:.2f} GiB",
        flush=True,
      )
  print(
    f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
  )
  state = results[methods[-1]][0]["state_gib"]
  print(f"final state: {state:.2f} GiB")
  med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
  peak = {m: statistics.median(r["peak_gib"] for r in rs) for m, rs in results.items()}
  read = {m: statistics.median(r["read_gib"] for r in rs) for m, rs in results.items()}
  cpu = {m: statistics.median(r["cpu_s"] for r in rs) for m, rs in results.items()}
  added = {m: statistics.median(r["peak_gib"] - r["base_gib"] for r in rs) for m, rs in results.items()}
  print(
    f"{'method':12s} {'median s':>9s} {'x orbax':>8s} {'cpu s':>7s} {'x orbax':>8s} {'peak GiB':>9s} {'x state':>8s}"
    f" {'added GiB':>10s} {'read GiB':>9s}"
  )
  nan = float("nan")
  for m in methods:
    print(
      f"{m:12s} {med[m]:9.2f} {med[m] / med.get('orbax', nan):8.2f} {cpu[m]:7.2f} {cpu[m] / cpu.get('orbax', nan):8.2f}"
      f" {peak[m]:9.2f} {peak[m] / state:8.2f} {added[m]:10.2f} {read[m]:9.2f}"
    )


if __name__ == "__main__":
  main()
