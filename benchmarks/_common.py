"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `_common`)."""

from __future__ import annotations

import json
import os
import shutil


def warm_cache(path: str) -> None:
  """Reads every file under `path` once, so that each run starts from the page cache."""
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        while f.read(1 << 24):
          pass


def peak_rss_bytes() -> int:
  """This process's peak RSS since its exec: VmHWM.

  Not `ru_maxrss`: the kernel keeps the parent's peak at the fork in it across
  exec, so a child started by a script that built a checkpoint would report
  the builder's peak.
  """
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # kB


def peak_rss_gib() -> float:
  """`peak_rss_bytes` in GiB."""
  return peak_rss_bytes() / 2**30


MARKER = "built.json"


def is_built(workdir: str, wanted: dict) -> bool:
  """Whether `workdir` holds a finished build of exactly `wanted` (its `built.json`)."""
  marker = os.path.join(workdir, MARKER)
  if not os.path.exists(marker):
    return False
  with open(marker) as f:
    return json.load(f) == wanted


def start_build(workdir: str, wanted: dict) -> str | None:
  """The checkpoint path to (re)build for `wanted`, a stale one removed; None when it is already built."""
  if is_built(workdir, wanted):
    return None
  marker, ckpt = os.path.join(workdir, MARKER), os.path.join(workdir, "orbax")
  if os.path.exists(marker):
    os.remove(marker)
  if os.path.exists(ckpt):
    shutil.rmtree(ckpt)
  os.makedirs(workdir, exist_ok=True)
  return ckpt


def finish_build(workdir: str, wanted: dict) -> None:
  """Marks the build of `wanted` as finished (written last, so an interrupted build is redone)."""
  with open(os.path.join(workdir, MARKER), "w") as f:
    json.dump(wanted, f)


def write_vocabularies(workdir: str, old_rows: int, new_rows: int, overlap: float, rng) -> None:
  """`old.txt` (`old_rows` tokens) and `new.txt` (`new_rows` tokens, `overlap` of them old, shuffled) in `workdir`.

  The vocabularies of the remap benchmarks (W1, W5, W7): the same draws from
  the same `rng` give the same files.
  """
  old_tokens = [f"tok{i}" for i in range(old_rows)]
  n_keep = int(new_rows * overlap)
  kept = rng.choice(old_rows, size=n_keep, replace=False)
  new_tokens = [old_tokens[i] for i in kept] + [f"new{i}" for i in range(new_rows - n_keep)]
  rng.shuffle(new_tokens)
  with open(os.path.join(workdir, "old.txt"), "w") as f:
    f.write("\n".join(old_tokens))
  with open(os.path.join(workdir, "new.txt"), "w") as f:
    f.write("\n".join(new_tokens))


def alternate(script: str, workdir: str, methods: list[str], runs: int, pause: float, warm: str) -> dict[str, list]:
  """Runs `script --workdir W --one METHOD` in a fresh process per run, methods alternated, the page cache of `warm`
  warmed and a pause before each; prints each run and returns method -> the JSON results of its runs."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415

  results: dict[str, list] = {m: [] for m in methods}
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  for run in range(runs):
    for method in methods:  # alternated, so drift hits every method alike
      warm_cache(warm)
      time.sleep(pause)
      cmd = [sys.executable, script, "--workdir", workdir, "--one", method]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
      result = json.loads(out.stdout.strip().splitlines()[-1])
      results[method].append(result)
      extra = f"  added {result['added_gib']:.2f} GiB" if "added_gib" in result else ""
      print(f"run {run} {method:12s} {result['seconds']:7.2f} s  peak {result['peak_gib']:.2f} GiB{extra}", flush=True)
  return results


def machine() -> str:
  """The machine line every benchmark prints under its runs."""
  import platform  # noqa: PLC0415

  return (
    f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
  )


def print_added_summary(results: dict[str, list], final_bytes: int, baseline: str = "native") -> None:
  """Medians of time, peak and memory added by the call, with ratios to `baseline` and to the final state (W5)."""
  import statistics  # noqa: PLC0415

  final = final_bytes / 2**30
  print(f"\n{machine()}\nfinal state: {final:.2f} GiB")
  print(
    f"{'method':9s} {'median s':>9s} {'peak GiB':>9s} {'added GiB':>10s} {'x ' + baseline:>9s} {'added/final':>12s}"
  )
  base = statistics.median(r["seconds"] for r in results[baseline]) if baseline in results else float("nan")
  for m, rs in results.items():
    med = statistics.median(r["seconds"] for r in rs)
    peak = statistics.median(r["peak_gib"] for r in rs)
    added = statistics.median(r["added_gib"] for r in rs)
    print(f"{m:9s} {med:9.2f} {peak:9.2f} {added:10.2f} {med / base:9.2f} {added / final:12.2f}")


# The W1 workload, shared by W1 (vocab_remap.py), W5 (w5_*.py) and W7 (sharded_remap.py): a 262,144 x 1,024
# float32 embedding remapped into a new vocabulary of 300,000 tokens, 80 % of them old.
OLD_ROWS, DIM, NEW_ROWS, OVERLAP = 262_144, 1_024, 300_000, 0.8


def rss_bytes() -> int:
  """This process's resident memory now (VmRSS)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def bench_parser(doc: str, workdir: str | None, methods: str, runs: int = 3, pause: float = 3.0):
  """The arguments every alternating benchmark takes: --workdir, --runs, --methods, --pause (and the hidden --one)."""
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=workdir, help="where checkpoints are built (reused)")
  parser.add_argument("--runs", type=int, default=runs, help="runs per method")
  parser.add_argument("--methods", default=methods, help="comma-separated subset")
  parser.add_argument("--pause", type=float, default=pause, help="seconds between runs")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  return parser


def vocab_info(workdir: str, new_rows: int = NEW_ROWS):
  """The `VocabInfo` of the remap benchmarks: `workdir`'s `new.txt` over `old.txt` (see `write_vocabularies`)."""
  import flax_warmstart as fws  # noqa: PLC0415

  return fws.VocabInfo(
    new_vocab=os.path.join(workdir, "new.txt"),
    new_vocab_size=new_rows,
    num_oov_buckets=0,
    old_vocab=os.path.join(workdir, "old.txt"),
  )
