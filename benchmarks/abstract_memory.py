"""W4: abstract target: peak memory of a warm start from `jax.eval_shape`.

Builds (once, in --workdir) an Orbax checkpoint (StandardCheckpointer) of the
"old" Flax TrainState, and times warm starts of a "new" model that is the old
one plus a new classification head (with its slots, 3.1 % of the state's
bytes in `layers`, 1.4 % in `big`) that is not in the checkpoint. The
settings load everything else (`vars_to_warm_start=[r"(?!head/).*"]`: every
leaf, optimizer slots and step included, except the head's), so only the
head and its slots are computed fresh. Two scenarios, each printed on its own:

  layers     a transformer-like model, optax.adam (params + mu + nu): a
             16,384 x 768 embedding and 12 layers of 768-wide attention and
             3,072-wide MLP kernels (2.25 and 9 MiB each); 1.13 GiB of
             state in 449 leaves
  big        one big tensor: a 262,144 x 1,024 float32 embedding (1 GiB,
             saved from one device, so one zarr chunk) and 2 small layers,
             optax.sgd (no slots): the embedding is 90 % of the state

Methods, alternated, each run in a fresh subprocess, the checkpoint files
read once before each run to warm the page cache, a pause between runs:

  abstract   fws.warm_start(jax.eval_shape(init_fn), settings, init_fn=init_fn):
             loaded leaves are read straight into their own buffers, init_fn
             computes only the head
  concrete   state = jax.jit(init_fn)(); fws.warm_start(state, settings):
             the usual way (the fresh init is allocated, then overwritten;
             jitted, as large models are initialised: eager init took longer
             here)
  orbax      StandardCheckpointer().restore(path, jax.eval_shape(old_init_fn)):
             a plain restore of the old checkpoint (the baseline for what
             reading the same bytes costs)

Each run measures the wall time of the call (for `concrete` including the
jitted `init_fn()`, whose share is printed too), the final state's bytes (the
sum of its leaves' nbytes), the RSS just before the call (/proc/self/statm, taken
after imports, model and settings are built and the abstract state is
traced) and the peak RSS during the call (VmHWM of /proc/self/status, after
resetting the process's high-water mark with `echo 5 >
/proc/self/clear_refs`, so that nothing before the call counts; not
ru_maxrss, which a child inherits from its parent's peak at the fork and the
reset does not clear). On CPU the device memory is host memory: RSS covers
both. Reported: (peak - before) / final bytes, the issue's target being 1.2
for `abstract`, and (RSS after the call - before) / final bytes: what stays.
The builder runs in its own process, so the parent stays small.

--trace runs each method once with a thread sampling RSS every 2 ms and the
library's phases marked (init of the fresh leaves, direct reads into our own
buffers, Orbax restores), and prints the RSS at each phase boundary and where
the peak was: where the memory goes.

Examples:
  python benchmarks/abstract_memory.py --runs 5
  python benchmarks/abstract_memory.py --runs 1 --scale 0.05 --workdir /tmp/fws_bench_w4_small
  python benchmarks/abstract_memory.py --trace
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

from _common import finish_build, is_built, peak_rss_bytes, start_build, warm_cache

GIB = 2**30
TARGET = 1.2
HEAD_CLASSES = 4_096
# name -> (vocab, dim, layers, ffn, optimizer) at scale 1.
SCENARIOS = {
  "layers": (16_384, 768, 12, 3_072, "adam"),
  "big": (262_144, 1_024, 2, 4_096, "sgd"),
}
METHODS = ("abstract", "concrete", "orbax")
HEAD_EXCLUDED = (r"(?!head/).*",)  # every leaf (params, slots, step) but the new head's
OLD_STEP = 1_000
OFFSET = 10.0  # added to the old params: loaded values are > OFFSET / 2, fresh ones near 0


def sizes(scenario: str, scale: float) -> dict:
  """The scenario's sizes; `scale` shrinks the vocabulary and widths (for a quick check)."""
  vocab, dim, layers, ffn, optimizer = SCENARIOS[scenario]
  width = max(8, round(dim * scale**0.5 / 8) * 8)
  return {
    "scenario": scenario,
    "vocab": max(64, round(vocab * scale)),
    "dim": width,
    "layers": layers,
    "ffn": max(8, round(ffn * scale**0.5 / 8) * 8),
    "head": max(8, round(HEAD_CLASSES * scale**0.5 / 8) * 8),
    "optimizer": optimizer,
    "offset": OFFSET,
  }


def make_init_fns(cfg: dict):
  """`(old_init_fn, new_init_fn)`: zero-argument functions returning a fresh TrainState."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  class Block(nn.Module):
    dim: int
    ffn: int

    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm(name="ln_attn")(x)
      q, k, v = (nn.Dense(self.dim, use_bias=False, name=n)(h) for n in ("query", "key", "value"))
      att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / jnp.sqrt(self.dim), axis=-1)
      x = x + nn.Dense(self.dim, use_bias=False, name="out")(att @ v)
      h = nn.LayerNorm(name="ln_mlp")(x)
      h = nn.Dense(self.ffn, name="mlp_up")(h)
      return x + nn.Dense(self.dim, name="mlp_down")(nn.gelu(h))

  class Model(nn.Module):
    vocab: int
    dim: int
    layers: int
    ffn: int
    head: int  # 0: the old model, without the classification head

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(self.vocab, self.dim, name="embed")
      x = embed(tokens)
      for i in range(self.layers):
        x = Block(self.dim, self.ffn, name=f"layer_{i:02d}")(x)
      x = nn.LayerNorm(name="ln_final")(x)
      logits = embed.attend(x)
      if self.head:
        return logits, nn.Dense(self.head, name="head")(x.mean(axis=1))
      return logits

  tx = optax.adam(1e-4) if cfg["optimizer"] == "adam" else optax.sgd(1e-2)
  tokens = jnp.zeros((1, 4), jnp.int32)

  def init_fn_of(head: int):
    model = Model(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["ffn"], head)

    def init_fn():
      params = model.init(jax.random.key(0), tokens)["params"]
      return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    return init_fn

  return init_fn_of(0), init_fn_of(cfg["head"])


def build(workdir: str, cfg: dict) -> None:
  """Writes the old checkpoint once (again if the sizes changed)."""
  path = start_build(workdir, cfg)
  if path is None:
    return
  print(f"building {cfg} in {path} ...", flush=True)
  import jax
  import orbax.checkpoint as ocp

  old_init_fn, _ = make_init_fns(cfg)

  def trained():
    # A trained-looking state, made in one jitted call (one copy in memory):
    # params off their init by OFFSET (to tell loaded from fresh) and
    # optimizer slots that are not zeros (zeros would compress to nothing).
    state = old_init_fn()
    state = state.replace(params=jax.tree.map(lambda p: p + OFFSET, state.params))
    opt_state = state.opt_state
    if cfg["optimizer"] == "adam":
      adam = opt_state[0]
      adam = adam._replace(
        mu=jax.tree.map(lambda p: 0.1 * p, state.params), nu=jax.tree.map(lambda p: p * p, state.params)
      )
      opt_state = (adam, *opt_state[1:])
    return state.replace(step=OLD_STEP, opt_state=opt_state)

  state = jax.jit(trained)()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  del state
  finish_build(workdir, cfg)
  print(f"built: {nbytes / GIB:.3f} GiB of state, builder peak RSS {peak_rss_bytes() / GIB:.2f} GiB", flush=True)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


def _reset_peak() -> bool:
  """Resets this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return False
  return True


class Sampler:
  """RSS every `interval` s on a thread, with named marks (for --trace)."""

  def __init__(self, interval: float = 0.002):
    self.interval, self.samples, self.marks = interval, [], []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self) -> None:
    while not self._stop.is_set():
      self.samples.append((time.perf_counter(), _rss()))
      time.sleep(self.interval)

  def mark(self, name: str) -> None:
    self.marks.append((time.perf_counter(), name, _rss()))

  def __enter__(self) -> Sampler:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def _instrument(sampler: Sampler) -> None:
  """Marks the library's phases (reads, restores, fresh init, conversions) on the sampler."""
  import importlib

  # Modules by name: the package re-exports functions of the same names.
  checkpoint_lib, execute, hostread, warm_start = (
    importlib.import_module(f"flax_warmstart.{m}") for m in ("checkpoint", "execute", "hostread", "warm_start")
  )

  def wrap(module, name: str, label: str) -> None:
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
      sampler.mark(f"{label} start")
      out = inner(*args, **kwargs)
      sampler.mark(f"{label} end")
      return out

    setattr(module, name, wrapped)

  wrap(warm_start, "make_plan", "plan")
  wrap(execute, "_init_leaves", "init_fn (fresh leaves)")
  wrap(checkpoint_lib, "open_arrays", "open arrays")
  wrap(hostread, "run", "direct reads")
  wrap(checkpoint_lib, "restore", "orbax restore (rest)")


def run_one(method: str, workdir: str, cfg: dict, trace: bool = False) -> dict:
  """One measured run in this (fresh) process."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  import flax_warmstart as fws  # imported before measuring, like orbax

  old_init_fn, init_fn = make_init_fns(cfg)
  path = os.path.join(workdir, "orbax")
  settings = fws.WarmStartSettings(path, vars_to_warm_start=list(HEAD_EXCLUDED))
  # Abstract states are traced before measuring: jax.eval_shape allocates no arrays.
  abstract = jax.eval_shape(old_init_fn if method == "orbax" else init_fn)
  sampler = Sampler() if trace else None
  if sampler:
    _instrument(sampler)
    sampler.__enter__()
  result: dict = {}
  before = _rss()
  reset = _reset_peak()
  peak_before = peak_rss_bytes()
  start = time.perf_counter()
  if sampler:
    sampler.mark("call start")
  if method == "abstract":
    out = fws.warm_start(abstract, settings, init_fn=init_fn, show_progress=False)
  elif method == "concrete":
    state = jax.block_until_ready(jax.jit(init_fn)())
    result["init_seconds"] = time.perf_counter() - start
    if sampler:
      sampler.mark("jit(init_fn)() done")
    out = fws.warm_start(state, settings, show_progress=False)
  elif method == "orbax":
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, abstract)
  else:
    raise ValueError(method)
  jax.block_until_ready(out)
  result["seconds"] = time.perf_counter() - start
  peak = peak_rss_bytes()
  if sampler:
    sampler.mark("call end")
    sampler.__exit__()
  after = _rss()
  final = sum(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes for x in jax.tree.leaves(out))
  # Correctness: the step, params and slots came from the checkpoint.
  if int(out.step) != OLD_STEP:
    raise RuntimeError(f"{method}: step {int(out.step)}, expected {OLD_STEP}")
  kernel = np.asarray(out.params["layer_00"]["mlp_up"]["kernel"])[0, :4]
  embedding = np.asarray(out.params["embed"]["embedding"])[-1, :4]
  if not (np.all(kernel > OFFSET / 2) and np.all(embedding > OFFSET / 2)):
    raise RuntimeError(f"{method}: the params were not loaded")
  if cfg["optimizer"] == "adam":
    mu = np.asarray(out.opt_state[0].mu["layer_00"]["mlp_up"]["kernel"])[0, :4]
    if not np.allclose(mu, 0.1 * kernel):
      raise RuntimeError(f"{method}: the Adam slots were not loaded")
  if method != "orbax" and out.params["head"]["kernel"].shape != (cfg["dim"], cfg["head"]):
    raise RuntimeError(f"{method}: no new head")
  result.update(
    before_gib=before / GIB,
    peak_gib=peak / GIB,
    delta_gib=(peak - before) / GIB,
    final_gib=final / GIB,
    ratio=(peak - before) / final,
    end_ratio=(after - before) / final,  # what stays resident after the call
    # If the high-water mark could not be reset, it may hold an earlier, higher peak.
    reset=reset,
    prior_peak_gib=peak_before / GIB,
  )
  if sampler:
    result["trace"] = _trace_report(sampler, before, final)
  return result


def _trace_report(sampler: Sampler, before: int, final: int) -> list[str]:
  start = sampler.marks[0][0]
  lines = [f"  {'t s':>7s}  {'RSS-before GiB':>14s}  {'x final':>7s}  event"]
  events = [(t, name, rss) for t, name, rss in sampler.marks]
  t_peak, rss_peak = max(sampler.samples, key=lambda s: s[1])
  events.append((t_peak, "<- sampled peak", rss_peak))
  for t, name, rss in sorted(events):
    lines.append(f"  {t - start:7.3f}  {(rss - before) / GIB:14.3f}  {(rss - before) / final:7.2f}  {name}")
  return lines


def _child(args: list[str], env: dict[str, str]) -> dict:
  """Runs this script with `args` in a fresh process; its result, or its stderr and exit on failure."""
  out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
  if out.returncode:
    sys.exit(f"{' '.join(args)} failed:\n{out.stderr}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
  from importlib.metadata import version

  import flax
  import jax
  import orbax.checkpoint as ocp

  return (
    f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
    f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB, Python {platform.python_version()},"
    f" jax {jax.__version__}, flax {flax.__version__}, orbax-checkpoint {ocp.__version__},"
    f" tensorstore {version('tensorstore')}, load average {os.getloadavg()[0]:.2f}"
  )


def _summary(scenario: str, cfg: dict, methods: list[str], results: dict[str, list[dict]]) -> None:
  med = {
    m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "delta_gib", "final_gib", "ratio", "end_ratio")}
    for m, rs in results.items()
  }
  orbax = med.get("orbax", {})
  print(f"\n{scenario}: medians of {len(next(iter(results.values())))} runs ({cfg})")
  # peak/final is (peak - before) / final bytes, the median of the runs' ratios; end/final likewise after the call.
  head = f"{'method':9s} {'median s':>9s} {'peak-before GiB':>16s} {'final GiB':>10s} {'peak/final':>11s}"
  print(f"{head} {'end/final':>10s} {'s x orbax':>10s} {'mem x orbax':>12s}")
  for m in methods:
    row = med[m]
    print(
      f"{m:9s} {row['seconds']:9.2f} {row['delta_gib']:16.3f} {row['final_gib']:10.3f} {row['ratio']:11.2f}"
      f" {row['end_ratio']:10.2f} {row['seconds'] / orbax.get('seconds', float('nan')):10.2f}"
      f" {row['delta_gib'] / orbax.get('delta_gib', float('nan')):12.2f}"
    )
  if "concrete" in results:
    init = statistics.median(r["init_seconds"] for r in results["concrete"])
    print(f"concrete: of which jit(init_fn)() {init:.2f} s (median)")
  if "abstract" in med:
    verdict = "met" if med["abstract"]["ratio"] <= TARGET else "NOT met"
    print(f"abstract peak/final {med['abstract']['ratio']:.2f}: target <= {TARGET} {verdict}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/fws_bench_w4", help="where checkpoints are built (reused)")
  parser.add_argument("--runs", type=int, default=5, help="runs per method")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  parser.add_argument(
    "--scenarios", default="layers,big", help="comma-separated subset of layers,big (big: one big tensor)"
  )
  parser.add_argument("--one-big-tensor", action="store_true", help="only the `big` scenario")
  parser.add_argument("--scale", type=float, default=1.0, help="scales the state's bytes (0.05 for a quick check)")
  parser.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
  parser.add_argument("--trace", action="store_true", help="one traced run per method: RSS at each phase")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--scenario", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    cfg = sizes(args.scenario, args.scale)
    workdir = os.path.join(args.workdir, args.scenario)
    if args.one == "build":
      build(workdir, cfg)
      return
    print(json.dumps(run_one(args.one, workdir, cfg, trace=args.trace)))
    return
  scenarios = ["big"] if args.one_big_tensor else args.scenarios.split(",")
  methods = args.methods.split(",")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  print(_machine(), flush=True)
  for scenario in scenarios:
    cfg = sizes(scenario, args.scale)
    workdir = os.path.join(args.workdir, scenario)
    common = ["--workdir", args.workdir, "--scenario", scenario, "--scale", str(args.scale)]
    if not is_built(workdir, cfg):  # in its own process: this one stays small, its peak its own
      subprocess.run([sys.executable, __file__, *common, "--one", "build"], check=True, env=env)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for run in range(1 if args.trace else args.runs):
      for method in methods:  # alternate methods so drift hits all alike
        warm_cache(os.path.join(workdir, "orbax"))
        time.sleep(args.pause)
        r = _child([*common, "--one", method, *(["--trace"] if args.trace else [])], env)
        results[method].append(r)
        note = "" if r["reset"] or r["prior_peak_gib"] <= r["before_gib"] + 0.05 else " (prior peak higher!)"
        extra = f" (init_fn {r['init_seconds']:.2f} s)" if "init_seconds" in r else ""
        print(
          f"{scenario} run {run} {method:8s} {r['seconds']:6.2f} s{extra}  before {r['before_gib']:.2f}"
          f" peak {r['peak_gib']:.2f} GiB  peak-before {r['delta_gib']:.3f} GiB  final {r['final_gib']:.3f} GiB"
          f"  ratio {r['ratio']:.2f} (end {r['end_ratio']:.2f}){note}",
          flush=True,
        )
        for line in r.get("trace", []):
          print(line)
    _summary(scenario, cfg, methods, results)
  print("\n" + _machine())


if __name__ == "__main__":
  main()
