"""W5 (TensorFlow half): warm start with a vocabulary remap from a TensorFlow Saver checkpoint.

Builds (once, in --workdir; needs TensorFlow, the `tf` extra) the W1 table as a
`tf.compat.v1.train.Saver` checkpoint: a 262,144 x 1,024 float32 embedding
plus 64 MiB of dense kernels, an old vocabulary of 262,144 tokens and a new
one of 300,000 tokens of which 80 % exist in the old one (shuffled; new rows
are zero). Then times, alternating methods in fresh subprocesses (so each
peak RSS is its own), with the page cache warmed by reading the checkpoint
files before each run:

  native     tf.train.load_checkpoint + get_tensor of every tensor, the numpy
             remap (fancy-index into a new table, zero the new rows) and
             jax.device_put: the format's own reader
  fws        flax_warmstart.warm_start with a VocabInfo from an abstract state
             (jax.eval_shape: nothing allocated before the call), reading the
             TensorFlow checkpoint without TensorFlow
  fws_live   the same into a live state that already exists (the new model's
             fresh 1.2 GiB), as in a training script

Neither `native` nor `fws` holds a state before the call, so both end with
the same final state. Peak RSS is the process's `VmHWM`; "added" is the peak
minus the RSS just before the timed call (the imports and runtimes), i.e.
what the warm start itself held at its peak. Prints per-run times and peaks,
then medians and ratios against `native`, and the final state's bytes.

Example:
  python benchmarks/w5_tensorflow.py --runs 3
"""

from __future__ import annotations

import json
import os
import time

from _common import (
  DIM,
  NEW_ROWS,
  OLD_ROWS,
  OVERLAP,
  alternate,
  bench_parser,
  finish_build,
  is_built,
  peak_rss_bytes,
  print_added_summary,
  rss_bytes,
  vocab_info,
  write_vocabularies,
)

DENSE = {"dense_0/kernel": (2048, 4096), "dense_1/kernel": (2048, 4096)}  # 64 MiB of float32
EMB = "embedder/embedding"
FINAL_BYTES = (NEW_ROWS * DIM + sum(a * b for a, b in DENSE.values())) * 4
WANTED = {"old_rows": OLD_ROWS, "dim": DIM, "new_rows": NEW_ROWS, "overlap": OVERLAP, "format": "tf-saver"}


def build(workdir: str) -> None:
  """Writes the TensorFlow checkpoint and the vocabularies once."""
  if is_built(workdir, WANTED):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import numpy as np
  import tensorflow as tf

  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(0)
  write_vocabularies(workdir, OLD_ROWS, NEW_ROWS, OVERLAP, rng)
  v1 = tf.compat.v1
  with tf.Graph().as_default():
    values = {EMB: rng.standard_normal((OLD_ROWS, DIM), dtype=np.float32)}
    values.update({k: rng.standard_normal(s, dtype=np.float32) for k, s in DENSE.items()})
    variables = {k: v1.get_variable(k, shape=v.shape, initializer=v1.zeros_initializer()) for k, v in values.items()}
    feeds = {k: v1.placeholder(tf.float32, v.shape) for k, v in values.items()}
    assign = [variables[k].assign(feeds[k]) for k in values]
    with v1.Session() as sess:
      sess.run(assign, {feeds[k]: v for k, v in values.items()})
      v1.train.Saver().save(sess, os.path.join(workdir, "tf", "model.ckpt"), global_step=500, write_meta_graph=False)
  finish_build(workdir, WANTED)


def run_one(method: str, workdir: str) -> dict[str, float]:
  """One timed run in this (fresh) process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  ckpt = os.path.join(workdir, "tf")

  def init():
    return {
      "params": {
        "embedder": {"embedding": jnp.zeros((NEW_ROWS, DIM), jnp.float32)},
        **{k.split("/")[0]: {"kernel": jnp.ones(s, jnp.float32)} for k, s in DENSE.items()},
      }
    }

  if method == "native":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf  # imported before timing, like flax_warmstart below

    jax.device_put(np.zeros(1)).block_until_ready()  # the runtime is up, as for fws
    before = rss_bytes()
    start = time.perf_counter()
    reader = tf.train.load_checkpoint(ckpt)
    old_index = {t: i for i, t in enumerate(open(os.path.join(workdir, "old.txt")).read().split("\n"))}
    index = np.array([old_index.get(t, -1) for t in open(os.path.join(workdir, "new.txt")).read().split("\n")])
    old = reader.get_tensor(EMB)
    new = old[np.maximum(index, 0)]
    new[index < 0] = 0
    del old
    out = {
      "params": {
        "embedder": {"embedding": jax.device_put(new)},
        **{k.split("/")[0]: {"kernel": jax.device_put(reader.get_tensor(k))} for k in DENSE},
      }
    }
  elif method in ("fws", "fws_live"):
    import flax_warmstart as fws

    live = jax.eval_shape(init) if method == "fws" else jax.block_until_ready(init())
    jax.device_put(np.zeros(1)).block_until_ready()
    before = rss_bytes()
    start = time.perf_counter()
    info = vocab_info(workdir)
    settings = fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMB: info})
    out = fws.warm_start(live, settings)
  else:
    raise ValueError(method)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - start
  peak = peak_rss_bytes()
  return {"seconds": seconds, "peak_gib": peak / 2**30, "added_gib": (peak - before) / 2**30}


def main() -> None:
  parser = bench_parser(__doc__, "/tmp/fws_bench_w5", "native,fws,fws_live")
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args.workdir)))
    return
  build(args.workdir)
  results = alternate(
    __file__, args.workdir, args.methods.split(","), args.runs, args.pause, os.path.join(args.workdir, "tf")
  )
  print_added_summary(results, FINAL_BYTES)


if __name__ == "__main__":
  main()
