"""W6 on a device mesh: a scanned stack saved from the mesh, unstacked into sharded unrolled layers.

8 forced CPU devices, mesh (2, 4) `("data", "model")`. 24 layers of a
transformer-like block's kernels (a fused 512 x 1,536 QKV, a 512 x 512 output,
a 512 x 2,560 MLP and back), saved by Orbax's `StandardCheckpointer` as
`layers/<name>` f32[24, ...] sharded `P(None, "data", "model")`: each stored
chunk holds one shard of every layer. Methods, each in a fresh process, the
page cache warmed:

  orbax        StandardCheckpointer().restore of the stacked arrays into the
               same shardings (the baseline);
  fws_unstack  `warm_start` of the unrolled model (`layers_{i}/<name>`, each
               `P("data", "model")`) from its abstract state, with
               `(r"layers_(\\d+)/(.*)", fws.Take(r"layers/\\2", index=r"\\1"))`.

Prints time, peak RSS (VmHWM), memory added by the call and bytes read
(`rchar`). Each stored chunk holds parts of 24 layers: read layer by layer and
shard by shard, TensorStore would decode it 24 times.

  python benchmarks/w6_mesh.py --runs 5
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from _common import alternate, bench_parser, finish_build, machine, peak_rss_gib, rss_bytes, start_build  # noqa: E402

LAYERS = 24
KERNELS = {"qkv": (512, 1536), "out": (512, 512), "up": (512, 2560), "down": (2560, 512)}


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _setup():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  mesh = jax.make_mesh((2, 4), ("data", "model"))
  stacked = NamedSharding(mesh, P(None, "data", "model"))
  layer = NamedSharding(mesh, P("data", "model"))
  abstract_stacked = {
    "layers": {k: jax.ShapeDtypeStruct((LAYERS, *s), jnp.float32, sharding=stacked) for k, s in KERNELS.items()}
  }
  abstract_unrolled = {
    f"layers_{i}": {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=layer) for k, s in KERNELS.items()}
    for i in range(LAYERS)
  }
  return jax, abstract_stacked, abstract_unrolled


def build(workdir: str) -> None:
  wanted = {"layers": LAYERS, "kernels": {k: list(s) for k, s in KERNELS.items()}}
  ckpt = start_build(workdir, wanted)
  if ckpt is None:
    return
  import numpy as np  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  jax, abstract, _ = _setup()
  rng = np.random.default_rng(0)
  tree = {
    "layers": {
      k: jax.device_put(rng.normal(size=a.shape).astype(np.float32), a.sharding) for k, a in abstract["layers"].items()
    }
  }
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, tree)
  finish_build(workdir, wanted)


def run_one(method: str, workdir: str) -> dict:
  import orbax.checkpoint as ocp  # noqa: PLC0415

  import flax_warmstart as fws  # noqa: PLC0415

  jax, abstract_stacked, abstract_unrolled = _setup()
  path = os.path.join(workdir, "orbax")
  base, before = rss_bytes(), _rchar()
  start = time.perf_counter()
  if method == "orbax":
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, abstract_stacked)
  else:
    rules = [(r"layers_(\d+)/(.*)", fws.Take(r"layers/\2", index=r"\1"))]
    out = fws.warm_start(abstract_unrolled, fws.WarmStartSettings(path, ".*", rename_rules=rules), show_progress=False)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - start
  read, peak = _rchar() - before, peak_rss_gib()  # before the check below restores the stack again
  if method != "orbax":  # layer i is layer i of the stack, on each shard
    with ocp.StandardCheckpointer() as ckptr:
      stacked = ckptr.restore(path, abstract_stacked)
    for i in (0, LAYERS - 1):
      for k in KERNELS:
        assert out[f"layers_{i}"][k].sharding == abstract_unrolled[f"layers_{i}"][k].sharding
        assert (jax.device_get(out[f"layers_{i}"][k]) == jax.device_get(stacked["layers"][k][i])).all(), (i, k)
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_stacked))
  return {
    "seconds": seconds,
    "peak_gib": peak,
    "added_gib": peak - base / 2**30,
    "read_gib": read / 2**30,
    "state_gib": state / 2**30,
  }


def main() -> None:
  parser = bench_parser(__doc__, "/tmp/fws_bench_w6_mesh", "orbax,fws_unstack", runs=3, pause=1.0)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args.workdir)))
    return
  build(args.workdir)
  methods = args.methods.split(",")
  results = alternate(os.path.abspath(__file__), args.workdir, methods, args.runs, args.pause, args.workdir)
  print(f"\n{machine()}\nfinal state: {results[methods[0]][0]['state_gib']:.3f} GiB; medians of {args.runs}")
  print(f"{'method':12s} {'median s':>9s} {'x orbax':>8s} {'peak GiB':>9s} {'added GiB':>10s} {'read GiB':>9s}")
  med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
  for m, rs in results.items():
    print(
      f"{m:12s} {med[m]:9.2f} {med[m] / med.get('orbax', float('nan')):8.2f}"
      f" {statistics.median(r['peak_gib'] for r in rs):9.2f} {statistics.median(r['added_gib'] for r in rs):10.2f}"
      f" {statistics.median(r['read_gib'] for r in rs):9.2f}"
    )


if __name__ == "__main__":
  main()
