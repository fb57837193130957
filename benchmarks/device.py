"""W1 and W7 on an accelerator: restore time, warm-start time, their ratio, peak device memory, gather bandwidth.

Runs, each in a fresh process, the page cache warmed before each:

  W1  the 262,144 x 1,024 float32 embedding (saved from one device: one chunk)
      and 64 MiB of dense kernels, remapped to 300,000 tokens (80 % old),
      onto the first device;
  W7  the same table saved from a (2, 4) mesh (8 chunks), with dense kernels
      and biases, onto a mesh of every device (2 x n/2, or 1 x 1 on one);

for each a plain Orbax restore of the old checkpoint into the same placement
(`orbax`) and `flax_warmstart.warm_start` from the abstract state with
`init_fn` (`fws`); then `gather`: the library's device gather
(`transform.take_device`, the jitted `remap_rows` that runs on devices when a
gather needs the whole old table) on the W1 table already on the device, its
achieved bandwidth (old rows read + new table written, per second) against a
device copy's and, for known devices, the nominal peak.

Peak device memory is the device's `peak_bytes_in_use` (`memory_stats`); where
a platform has none (CPU), the process's peak RSS. Without a GPU or TPU the
script says so and runs everything on the CPU (W7 on 8 forced CPU devices),
which checks the script, not an accelerator. Nothing here needs a GPU.

Example (about 3 minutes on a GPU machine, checkpoints built once in --workdir):
  bash benchmarks/device.sh                 # = python benchmarks/device.py
  python benchmarks/device.py --small       # every size 16x smaller: a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import NEW_ROWS, OLD_ROWS, peak_rss_gib, vocab_info, warm_cache

HERE = os.path.dirname(os.path.abspath(__file__))
# Nominal memory bandwidth (GB/s) by device kind, for the ratio of the gather's achieved bandwidth.
NOMINAL_GBPS = {
  "H200": 4800,
  "H100 80GB HBM3": 3350,
  "H100 PCIe": 2000,
  "H100": 3350,
  "A100-SXM4-80GB": 2039,
  "A100-SXM4-40GB": 1555,
  "A100": 1555,
  "L4": 300,
  "TPU v4": 1200,
  "TPU v5 lite": 819,
  "TPU v5e": 819,
  "TPU v5p": 2765,
}


def _nominal(kind: str) -> float | None:
  for name, gbps in NOMINAL_GBPS.items():  # the most specific names first
    if name.lower() in kind.lower():
      return gbps
  return None


def _probe(env: dict[str, str]) -> dict:
  code = "import jax, json; d = jax.devices(); print(json.dumps([jax.default_backend(), len(d), d[0].device_kind]))"
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
  backend, count, kind = json.loads(out.stdout.strip().splitlines()[-1])
  return {"backend": backend, "count": count, "kind": kind}


def _env(workload: str, accelerator: bool) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
  if not accelerator:
    env["JAX_PLATFORMS"] = "cpu"
    if workload == "W7":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  return env


def _peak_device_bytes(devices) -> int | None:
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return None if any(p is None for p in peaks) else max(peaks)


def _mesh():
  import jax

  n = jax.device_count()
  a = 2 if n % 2 == 0 else 1
  return jax.make_mesh((a, n // a), ("data", "model"))


def run_one(workload: str, method: str, workdir: str, small: bool) -> dict:
  """One timed run in this fresh process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, SingleDeviceSharding
  from jax.sharding import PartitionSpec as P

  import flax_warmstart as fws

  scale = 16 if small else 1
  old_rows, new_rows = OLD_ROWS // scale, NEW_ROWS // scale
  path = os.path.join(workdir, "orbax")
  if workload == "W1":
    dense = {k: (2048 // scale, 4096) for k in ("dense_0", "dense_1")}  # as `build` writes it
    place = SingleDeviceSharding(jax.devices()[0])
    shardings = {
      "params": {"embedder": {"embedding": place}, **{k: {"kernel": place} for k in dense}},
    }
    shapes = lambda rows: {  # noqa: E731
      "params": {
        "embedder": {"embedding": (rows, 1024)},
        **{k: {"kernel": s} for k, s in dense.items()},
      }
    }
  else:  # as sharded_remap.py builds it
    dense = {k: (2048 // (4 if small else 1), 4096 // (4 if small else 1)) for k in ("dense_0", "dense_1")}
    mesh = _mesh()
    both, model = NamedSharding(mesh, P("data", "model")), NamedSharding(mesh, P("model"))
    shardings = {
      "params": {"embedder": {"embedding": both}, **{k: {"kernel": both, "bias": model} for k in dense}},
    }
    shapes = lambda rows: {  # noqa: E731
      "params": {
        "embedder": {"embedding": (rows, 1024)},
        **{k: {"kernel": s, "bias": (s[1],)} for k, s in dense.items()},
      }
    }
  is_shape = lambda x: isinstance(x, tuple)  # noqa: E731

  def abstract(rows):
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh), shapes(rows), shardings, is_leaf=is_shape
    )

  def init():
    return jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), shapes(new_rows), is_leaf=is_shape)

  devices = jax.devices()
  out: dict = {}
  if method == "gather":  # the device gather on the old table, already on the first device
    from flax_warmstart._src import transform

    with ocp.StandardCheckpointer() as ckptr:
      table = ckptr.restore(path, abstract(old_rows))["params"]["embedder"]["embedding"]
    rng = np.random.default_rng(0)
    index = np.where(rng.random(new_rows) < 0.8, rng.integers(0, old_rows, new_rows), -1).astype(np.int32)
    fill_index = np.zeros(new_rows, np.int32)
    copy = jax.jit(lambda x: x + 0)
    jax.block_until_ready(transform.take_device(table, index, None, fill_index, axis=0))  # compiled
    jax.block_until_ready(copy(table))
    row = table.shape[1] * table.dtype.itemsize
    moved = {"gather": int((index >= 0).sum()) * row + new_rows * row, "copy": 2 * table.size * table.dtype.itemsize}
    runs = {
      "gather": lambda: transform.take_device(table, index, None, fill_index, axis=0),
      "copy": lambda: copy(table),
    }
    for name, fn in runs.items():
      times = []
      for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
      out[f"{name}_gbps"] = moved[name] / statistics.median(times) / 1e9
    out["seconds"] = 0.0
  else:
    start = time.perf_counter()
    if method == "orbax":
      with ocp.StandardCheckpointer() as ckptr:
        result = ckptr.restore(path, abstract(old_rows))
    else:
      settings = fws.WarmStartSettings(
        path, var_name_to_vocab_info={"embedder/embedding": vocab_info(workdir, new_rows)}
      )
      result = fws.warm_start(abstract(new_rows), settings, init_fn=init, show_progress=False)
    jax.block_until_ready(result)
    out["seconds"] = time.perf_counter() - start
    out["state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(result))
  peak = _peak_device_bytes(devices)
  out["peak_device_gib"] = None if peak is None else peak / 2**30
  out["peak_rss_gib"] = peak_rss_gib()
  return out


def build(workload: str, workdir: str, small: bool) -> None:
  """Writes a workload's checkpoint and vocabularies once (W1 from one CPU device, W7 from 8: run in a fresh process)."""
  if workload == "W7":
    import sharded_remap  # sets 8 forced CPU devices before jax is imported

    sharded_remap.build(workdir, small)
    return
  import numpy as np
  from _common import OVERLAP, write_vocabularies

  if os.path.exists(os.path.join(workdir, "built.json")):
    return
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  scale = 16 if small else 1
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(0)
  write_vocabularies(workdir, OLD_ROWS // scale, NEW_ROWS // scale, OVERLAP, rng)
  tree = {
    "params": {"embedder": {"embedding": jnp.asarray(rng.standard_normal((OLD_ROWS // scale, 1024), np.float32))}}
  }
  for k in ("dense_0", "dense_1"):
    tree["params"][k] = {"kernel": jnp.asarray(rng.standard_normal((2048 // scale, 4096), np.float32))}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(workdir, "orbax"), tree)
  with open(os.path.join(workdir, "built.json"), "w") as f:
    json.dump({"small": small}, f)


def _child(args: list[str], env: dict[str, str]) -> dict | None:
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, env=env)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  lines = proc.stdout.strip().splitlines()
  return json.loads(lines[-1]) if lines else None


def _median(runs: list[dict], key: str) -> float | None:
  values = [r[key] for r in runs if r.get(key) is not None]
  return statistics.median(values) if values else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/fws_bench_device", help="where checkpoints are built (reused)")
  parser.add_argument("--runs", type=int, default=1, help="runs per method")
  parser.add_argument("--small", action="store_true", help="every size 16x smaller")
  parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
  parser.add_argument("--build", metavar="WORKLOAD", help=argparse.SUPPRESS)
  args = parser.parse_args()
  workdir = args.workdir + ("_small" if args.small else "")
  if args.build:
    build(args.build, os.path.join(workdir, args.build), args.small)
    return
  if args.one:
    workload, method = args.one
    print(json.dumps(run_one(workload, method, os.path.join(workdir, workload), args.small)))
    return
  probe_env = dict(os.environ)
  probe_env.pop("JAX_PLATFORMS", None)
  probe = _probe(probe_env)
  accelerator = probe["backend"] in ("gpu", "cuda", "rocm", "tpu")
  if accelerator:
    print(f"device: {probe['count']} x {probe['kind']} ({probe['backend']})", flush=True)
  else:
    print(
      f"No GPU or TPU found (jax backend {probe['backend']!r}): running on the CPU instead, W7 on 8 forced CPU"
      " devices. These are not accelerator figures; peak memory is the process's peak RSS.",
      flush=True,
    )
  small = ["--small"] if args.small else []
  results: dict[tuple[str, str], list[dict]] = {}
  for workload, methods in (("W1", ("orbax", "fws", "gather")), ("W7", ("orbax", "fws"))):
    start = time.perf_counter()
    _child(["--workdir", args.workdir, "--build", workload, *small], _env(workload, accelerator=False))
    print(f"{workload}: checkpoint ready in {workdir}/{workload} ({time.perf_counter() - start:.0f} s)", flush=True)
    for run in range(args.runs):
      for method in methods:
        warm_cache(os.path.join(workdir, workload))
        r = _child(["--workdir", args.workdir, "--one", workload, method, *small], _env(workload, accelerator))
        results.setdefault((workload, method), []).append(r)
        print(f"run {run} {workload} {method:7s} {json.dumps(r)}", flush=True)
  device_memory = _median(results[("W1", "fws")], "peak_device_gib") is not None
  key = "peak_device_gib" if device_memory else "peak_rss_gib"
  print(f"\nmedians of {args.runs}; peak memory: {'the device' if device_memory else 'the process (RSS)'}'s, GiB")
  print(f"{'workload':8s} {'restore s':>9s} {'fws s':>7s} {'x restore':>9s} {'peak restore':>12s} {'peak fws':>9s}")
  for w in ("W1", "W7"):
    restore, fws = _median(results[(w, "orbax")], "seconds"), _median(results[(w, "fws")], "seconds")
    peaks = _median(results[(w, "orbax")], key), _median(results[(w, "fws")], key)
    print(f"{w:8s} {restore:9.2f} {fws:7.2f} {fws / restore:9.2f} {peaks[0]:12.2f} {peaks[1]:9.2f}")
  gather = _median(results[("W1", "gather")], "gather_gbps")
  copy = _median(results[("W1", "gather")], "copy_gbps")
  line = (
    f"\ndevice gather (take_device, W1 table): {gather:.1f} GB/s, {gather / copy:.2f}x a device copy ({copy:.1f} GB/s)"
  )
  nominal = _nominal(probe["kind"]) if accelerator else None
  if nominal:
    line += f", {gather / nominal:.2f}x the nominal {nominal} GB/s of the {probe['kind']}"
  print(line)


if __name__ == "__main__":
  main()
