"""W6: model surgery: a scanned model's checkpoint into its unrolled twin, and back, against plain Orbax restores.

Builds (once, in --workdir, in a process of its own) two Orbax checkpoints
(StandardCheckpointer) of one trained-looking Flax TrainState with
optax.adam (params + mu + nu), about 1 GiB in all (params 0.33 GiB): a
24-layer transformer-like stack (LayerNorms, a fused 512 x 1,536 QKV kernel,
a 512 x 512 output kernel, a 512 x 2,560 MLP and back, with biases) plus a
final LayerNorm,

  scanned    under `nn.scan` (`layers/mlp_up/kernel` is f32[24, 512, 2560]:
             one leaf per kind of tensor, 12 per slot, each saved as one
             zarr chunk)
  unrolled   the same values as `layers_0` ... `layers_23` (288 params)

and times, alternating methods in fresh subprocesses (so each peak RSS is its
own), the page cache warmed by reading the checkpoints before each run:

  orbax_scanned    StandardCheckpointer().restore(scanned, eval_shape of the
                   scanned TrainState): the floor for reading that checkpoint
  fws_unstack      fws.warm_start(eval_shape of the unrolled TrainState,
                   rename_rules=[(r"layers_(\\d+)/(.*)", fws.Take(r"layers/\\2",
                   axis=0, index=r"\\1"))], vars_to_warm_start=[".*"],
                   init_fn=...): the scanned checkpoint into the unrolled model
  orbax_unrolled   StandardCheckpointer().restore(unrolled, eval_shape of the
                   unrolled TrainState)
  fws_stack        the unrolled checkpoint into the scanned model
                   (fws.Stack(r"layers_{i}/\\1", axis=0))

Every leaf loads (params, Adam slots through the same transforms, step), so
`init_fn` runs nothing; nothing is allocated before the call. Peak RSS is the
process's `VmHWM`; "added" is the peak minus the RSS just before the timed
call (imports, runtimes, the traced abstract state): what the call itself
held at its peak. Each run checks the values (layer i's kernel is the stacked
one's i-th, its Adam slots follow, the step is the old one). Prints per-run
times and peaks, then medians, each fws method's ratio to the Orbax restore
of the same checkpoint, and added / final state bytes (targets: 1.1 and 1.2).

--profile runs one fws method once under cProfile with the library's phases
timed (plan, open, reads, compute, conform) and prints the top of the profile.

Examples:
  python benchmarks/w6_surgery.py --runs 5
  python benchmarks/w6_surgery.py --small --runs 1          # 16x smaller widths: a quick check
  python benchmarks/w6_surgery.py --profile fws_unstack
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from _common import alternate, bench_parser, finish_build, machine, peak_rss_bytes, rss_bytes, start_build, warm_cache

GIB = 2**30
LAYERS, DIM, QKV, FFN = 24, 512, 1_536, 2_560
SMALL = 16  # --small divides DIM, QKV and FFN by 4 (state 16x smaller)
OLD_STEP = 1_000
OFFSET = 10.0  # params are off their init by OFFSET + the layer index: a value says which layer it came from
METHODS = "orbax_scanned,fws_unstack,orbax_unrolled,fws_stack"
BASELINE = {"fws_unstack": "orbax_scanned", "fws_stack": "orbax_unrolled"}
TIME_TARGET, MEMORY_TARGET = 1.1, 1.2
UNSTACK = (r"layers_(\d+)/(.*)", "layers/\\2")
STACK = (r"layers/(.*)", "layers_{i}/\\1")


def sizes(small: bool) -> dict:
  k = 4 if small else 1
  return {"layers": LAYERS, "dim": DIM // k, "qkv": QKV // k, "ffn": FFN // k, "offset": OFFSET, "step": OLD_STEP}


def init_fns(cfg: dict):
  """`{"scanned": init_fn, "unrolled": init_fn}`: zero-argument functions returning a fresh TrainState."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  dim, qkv, ffn, layers = cfg["dim"], cfg["qkv"], cfg["ffn"], cfg["layers"]

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
      h = nn.LayerNorm(name="ln_attn")(x)
      q, k, v = jnp.split(nn.Dense(qkv, name="qkv")(h), 3, axis=-1)
      att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / jnp.sqrt(q.shape[-1]), axis=-1)
      x = x + nn.Dense(dim, name="out")(att @ v)
      h = nn.gelu(nn.Dense(ffn, name="mlp_up")(nn.LayerNorm(name="ln_mlp")(x)))
      return x + nn.Dense(dim, name="mlp_down")(h), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
      return nn.LayerNorm(name="ln_final")(stack(name="layers")(x, None)[0])

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(layers):
        x = Block(name=f"layers_{i}")(x)[0]
      return nn.LayerNorm(name="ln_final")(x)

  x = jnp.zeros((1, 4, dim), jnp.float32)

  def make(model):
    def init_fn():
      params = model.init(jax.random.key(0), x)["params"]
      return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-4))

    return init_fn

  return {"scanned": make(Scanned()), "unrolled": make(Unrolled())}


def build(workdir: str, cfg: dict) -> None:
  """Writes both checkpoints once (again if the sizes changed)."""
  path = start_build(workdir, cfg)
  if path is None:
    return
  print(f"building {cfg} in {workdir} ...", flush=True)
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  scanned_init = init_fns(cfg)["scanned"]

  def trained():
    # Params off their init by OFFSET + their layer index; Adam slots that are not zeros (zeros compress to nothing).
    state = scanned_init()
    params = dict(state.params)
    params["layers"] = jax.tree.map(
      lambda p: p + OFFSET + jnp.arange(p.shape[0], dtype=p.dtype).reshape((-1,) + (1,) * (p.ndim - 1)),
      params["layers"],
    )
    params["ln_final"] = jax.tree.map(lambda p: p + OFFSET, params["ln_final"])
    adam = state.opt_state[0]._replace(
      mu=jax.tree.map(lambda p: 0.1 * p, params), nu=jax.tree.map(lambda p: p * p, params)
    )
    return state.replace(step=OLD_STEP, params=params, opt_state=(adam, *state.opt_state[1:]))

  state = jax.jit(trained)()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "scanned"), state)
  adam = state.opt_state[0]
  adam = adam._replace(mu=_unroll(adam.mu), nu=_unroll(adam.nu))
  unrolled = state.replace(params=_unroll(state.params), opt_state=(adam, *state.opt_state[1:]))
  del state
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "unrolled"), unrolled)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(unrolled))
  del unrolled, adam
  finish_build(workdir, cfg)
  print(f"built: {nbytes / GIB:.3f} GiB of state, builder peak RSS {peak_rss_bytes() / GIB:.2f} GiB", flush=True)


def _unroll(params: dict) -> dict:
  """`layers/...` (stacked on axis 0) as `layers_0/...` ... (slices of it)."""
  import jax

  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda p, i=i: p[i], params["layers"])
  return out


def _check(method: str, out, cfg: dict) -> None:
  """The values came from the right layers of the checkpoint, with their Adam slots and step."""
  import numpy as np

  if int(out.step) != OLD_STEP:
    raise RuntimeError(f"{method}: step {int(out.step)}, expected {OLD_STEP}")
  adam = out.opt_state[0]
  for i in (0, 7, cfg["layers"] - 1):
    if "layers" in out.params:
      kernel, mu = out.params["layers"]["mlp_up"]["kernel"][i], adam.mu["layers"]["mlp_up"]["kernel"][i]
    else:
      kernel, mu = out.params[f"layers_{i}"]["mlp_up"]["kernel"], adam.mu[f"layers_{i}"]["mlp_up"]["kernel"]
    kernel, mu = np.asarray(kernel)[:4, :8], np.asarray(mu)[:4, :8]
    if not np.all(np.abs(kernel - (OFFSET + i)) < 0.5):
      raise RuntimeError(f"{method}: layer {i}'s kernel came from elsewhere: {kernel[0, :4]}")
    if not np.allclose(mu, 0.1 * kernel):
      raise RuntimeError(f"{method}: layer {i}'s Adam slot does not follow its kernel")


def run_one(method: str, workdir: str, cfg: dict, profile: bool = False) -> dict:
  """One measured run in this (fresh) process."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  import flax_warmstart as fws  # imported before measuring, like orbax

  fns = init_fns(cfg)
  if method in ("orbax_scanned", "fws_stack"):
    target, ckpt = "scanned", "unrolled" if method == "fws_stack" else "scanned"
  else:
    target, ckpt = "unrolled", "scanned" if method == "fws_unstack" else "unrolled"
  path = os.path.join(workdir, "orbax", ckpt)
  init_fn = fns[target]
  abstract = jax.eval_shape(init_fn)  # traced before measuring: allocates no arrays
  if method.startswith("fws"):
    (regex, template) = UNSTACK if method == "fws_unstack" else STACK
    rule = fws.Take(template, axis=0, index=r"\1") if method == "fws_unstack" else fws.Stack(template, axis=0)
    settings = fws.WarmStartSettings(path, vars_to_warm_start=[".*"], rename_rules=[(regex, rule)])
  jax.device_put(np.zeros(1)).block_until_ready()  # the runtime is up for every method
  phases = _instrument() if profile else None
  profiler = None
  if profile:
    import cProfile

    profiler = cProfile.Profile()
  before = rss_bytes()
  start = time.perf_counter()
  if profiler:
    profiler.enable()
  if method.startswith("fws"):
    out = fws.warm_start(abstract, settings, init_fn=init_fn, show_progress=False)
  else:
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, abstract)
  jax.block_until_ready(out)
  if profiler:
    profiler.disable()
  seconds = time.perf_counter() - start
  peak = peak_rss_bytes()
  final = sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree.leaves(out))
  _check(method, out, cfg)
  result = {
    "seconds": seconds,
    "peak_gib": peak / GIB,
    "added_gib": (peak - before) / GIB,
    "final_gib": final / GIB,
    "leaves": len(jax.tree.leaves(out)),
  }
  if profile:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(35)
    result["phases"] = phases
    result["profile"] = text.getvalue()
  return result


def _instrument() -> list:
  """Times the library's phases (wall clock, RSS at the end of each) into the returned list."""
  import importlib

  marks: list = []
  mods = {m: importlib.import_module(f"flax_warmstart._src.{m}") for m in ("chain", "execute", "hostread", "transform")}

  def wrap(module, name: str, label: str) -> None:
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
      t = time.perf_counter()
      out = inner(*args, **kwargs)
      marks.append([label, time.perf_counter() - t, rss_bytes() / GIB])
      return out

    setattr(module, name, wrapped)

  wrap(mods["chain"], "run", "chain.run (reads + compute)")
  wrap(mods["hostread"], "run", "hostread.run (reads)")
  wrap(mods["transform"], "conform", "transform.conform")
  return marks


def summary(results: dict[str, list], runs: int) -> None:
  print(f"\n{machine()}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB, {_versions()}")
  print(f"load average {os.getloadavg()}; medians of {runs} runs")
  head = f"{'method':15s} {'median s':>9s} {'x orbax':>8s} {'peak GiB':>9s} {'added GiB':>10s}"
  print(f"{head} {'final GiB':>10s} {'added/final':>12s} {'peak/final':>11s}")
  med = {
    m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_gib", "added_gib", "final_gib")}
    for m, rs in results.items()
  }
  for m, row in med.items():
    base = med.get(BASELINE.get(m, m), {}).get("seconds", float("nan"))
    print(
      f"{m:15s} {row['seconds']:9.2f} {row['seconds'] / base:8.2f} {row['peak_gib']:9.2f} {row['added_gib']:10.2f}"
      f" {row['final_gib']:10.3f} {row['added_gib'] / row['final_gib']:12.2f} {row['peak_gib'] / row['final_gib']:11.2f}"
    )
  for m, rs in results.items():
    times = sorted(r["seconds"] for r in rs)
    print(f"single runs {m}: {times[0]:.2f}-{times[-1]:.2f} s")
  for m, b in BASELINE.items():
    if m in med and b in med:
      ratio, mem = med[m]["seconds"] / med[b]["seconds"], med[m]["added_gib"] / med[m]["final_gib"]
      t_ok, m_ok = ("met" if ratio <= TIME_TARGET else "NOT met"), ("met" if mem <= MEMORY_TARGET else "NOT met")
      print(f"{m}: {ratio:.2f}x {b} (target {TIME_TARGET}: {t_ok}), added/final {mem:.2f} ({MEMORY_TARGET}: {m_ok})")


def _versions() -> str:
  from importlib.metadata import version

  return ", ".join(f"{p} {version(p)}" for p in ("jax", "flax", "orbax-checkpoint", "tensorstore", "numpy"))


def main() -> None:
  parser = bench_parser(__doc__, "/tmp/fws_bench_w6", METHODS)
  parser.add_argument("--small", action="store_true", help="widths 4x smaller (state 16x smaller): a quick check")
  parser.add_argument("--profile", help="one profiled run of this fws method (cProfile and phases)")
  args = parser.parse_args()
  args.small = args.small or bool(os.environ.get("W6_SMALL"))  # `alternate` passes only --workdir and --one
  cfg = sizes(args.small)
  if args.small and args.workdir == "/tmp/fws_bench_w6":
    args.workdir += "_small"
  if args.one == "build":
    build(args.workdir, cfg)
    return
  if args.one:
    print(json.dumps(run_one(args.one, args.workdir, cfg, profile=bool(os.environ.get("W6_PROFILE")))))
    return
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  small = ["--small"] if args.small else []
  # Built in its own process: this one stays small.
  subprocess.run([sys.executable, __file__, "--workdir", args.workdir, *small, "--one", "build"], check=True, env=env)
  if args.profile:
    warm_cache(os.path.join(args.workdir, "orbax"))
    cmd = [sys.executable, __file__, "--workdir", args.workdir, *small, "--one", args.profile]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(env, W6_PROFILE="1"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
      f"{args.profile}: {result['seconds']:.2f} s, peak {result['peak_gib']:.2f} GiB, added {result['added_gib']:.2f}"
    )
    totals: dict[str, list] = {}
    for label, seconds, rss in result["phases"]:
      entry = totals.setdefault(label, [0, 0.0, 0.0])
      entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + seconds, max(entry[2], rss)
    for label, (calls, seconds, rss) in totals.items():
      print(f"  {label:32s} {calls:4d} calls {seconds:7.3f} s  max RSS after {rss:.2f} GiB")
    print(result["profile"])
    return
  if small:
    os.environ["W6_SMALL"] = "1"
  results = alternate(__file__, args.workdir, args.methods.split(","), args.runs, args.pause, args.workdir)
  summary(results, args.runs)


if __name__ == "__main__":
  main()
