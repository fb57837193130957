"""W1: vocabulary remap of a large embedding, against the baselines.

Builds (once, in --workdir) an Orbax checkpoint holding a 262,144 x 1,024
float32 embedding plus 64 MiB of dense layers, an old vocabulary of 262,144
tokens and a new one of 300,000 tokens of which 80 % exist in the old one
(shuffled; new rows are zero), and, when TensorFlow is installed, a TensorFlow
checkpoint of the same values. Then times, alternating methods in fresh
subprocesses (so each peak RSS is its own), with the page cache warmed by
reading the checkpoint files before each run:

  orbax      a plain Orbax restore of the old checkpoint (the floor: no remap)
  numpy      restore to numpy, fancy-index into a new table, jax.device_put
  fws        flax_warmstart.warm_start with a VocabInfo (old rows read straight
             into the new table's own buffer)
  fws_abstract  the same from an abstract state (jax.eval_shape): no live
             state is allocated before the call
  tf         tf.compat.v1.train.warm_start with a VocabInfo (if TF is installed)

Each run except fws_abstract starts from a live state that already exists (the
new model's fresh 1.2 GiB embedding and dense layers), as in a training
script. Prints per-run times and peak RSS, then medians and ratios against
`orbax`, `numpy` and `tf`; for the fws methods also the seconds the vocabulary
mapping (`build_mapping`, before any read) took within the call.

`--mapping` times the vocabulary mapping alone instead, in this process: the
W1 vocabularies and two of 1,000,000 tokens (80 % shared, shuffled, written to
--workdir), as read from their files, with the lookup `build_mapping` uses
(hashed token bytes) and with a dict of the old tokens, medians of --runs.

Example:
  python benchmarks/vocab_remap.py --runs 5
  python benchmarks/vocab_remap.py --mapping --runs 5
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
  vocab_info,
  warm_cache,
  write_vocabularies,
)

DENSE_BYTES = 64 * 2**20


def _dense_shapes() -> dict[str, tuple[int, int]]:
  # 64 MiB of float32 dense kernels.
  return {"dense_0": (2048, 4096), "dense_1": (2048, 4096)}


def build(workdir: str) -> None:
  """Writes the checkpoints and vocabularies once."""
  import numpy as np

  marker = os.path.join(workdir, "built.json")
  if os.path.exists(marker):
    return
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(0)
  write_vocabularies(workdir, OLD_ROWS, NEW_ROWS, OVERLAP, rng)
  emb = rng.standard_normal((OLD_ROWS, DIM), dtype=np.float32)
  dense = {k: rng.standard_normal(s, dtype=np.float32) for k, s in _dense_shapes().items()}

  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  tree = {
    "params": {"embedder": {"embedding": jnp.asarray(emb)}, **{k: {"kernel": jnp.asarray(v)} for k, v in dense.items()}}
  }
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(workdir, "orbax"), tree)
  del tree
  try:
    import tensorflow as tf
  except ImportError:
    tf = None
  if tf is not None:
    with tf.Graph().as_default():
      tf.compat.v1.get_variable("embedder/embedding", initializer=emb)
      for k, v in dense.items():
        tf.compat.v1.get_variable(f"{k}/kernel", initializer=v)
      saver = tf.compat.v1.train.Saver()
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        saver.save(sess, os.path.join(workdir, "tf", "model"))
  with open(marker, "w") as f:
    json.dump({"tf": tf is not None}, f)


def run_one(method: str, workdir: str) -> dict[str, float]:
  """One timed run in this (fresh) process."""
  import numpy as np

  if method == "tf":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    with tf.Graph().as_default():
      emb = tf.compat.v1.get_variable(
        "embedder/embedding", shape=(NEW_ROWS, DIM), initializer=tf.compat.v1.zeros_initializer()
      )
      dense = [tf.compat.v1.get_variable(f"{k}/kernel", shape=s) for k, s in _dense_shapes().items()]
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())  # the live state exists
        start = time.perf_counter()
        info = tf.compat.v1.train.VocabInfo(
          new_vocab=os.path.join(workdir, "new.txt"),
          new_vocab_size=NEW_ROWS,
          num_oov_buckets=0,
          old_vocab=os.path.join(workdir, "old.txt"),
        )
        tf.compat.v1.train.warm_start(
          os.path.join(workdir, "tf"),
          vars_to_warm_start=".*",
          var_name_to_vocab_info={"embedder/embedding": info},
        )
        sess.run(tf.compat.v1.global_variables_initializer())
        value = sess.run(emb[:2])
        seconds = time.perf_counter() - start
        del value, dense
    return {"seconds": seconds, "peak_gib": peak_rss_gib()}

  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  def init():
    return {
      "params": {
        "embedder": {"embedding": jnp.zeros((NEW_ROWS, DIM), jnp.float32)},
        **{k: {"kernel": jnp.zeros(s, jnp.float32) + 1} for k, s in _dense_shapes().items()},
      }
    }

  abstract_live = jax.eval_shape(init)
  live = jax.block_until_ready(init()) if method != "fws_abstract" else abstract_live
  path = os.path.join(workdir, "orbax")
  import flax_warmstart as fws  # imported before timing, like orbax above

  mapping = _time_mapping() if method in ("fws", "fws_abstract") else None

  start = time.perf_counter()
  if method == "orbax":
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {
      "params": {
        "embedder": {"embedding": jax.ShapeDtypeStruct((OLD_ROWS, DIM), jnp.float32, sharding=device)},
        **{k: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32, sharding=device)} for k, s in _dense_shapes().items()},
      }
    }
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, abstract)
  elif method == "numpy":
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(path).item_metadata.tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
      host = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    old_index = {t: i for i, t in enumerate(open(os.path.join(workdir, "old.txt")).read().split("\n"))}
    index = np.array([old_index.get(t, -1) for t in open(os.path.join(workdir, "new.txt")).read().split("\n")])
    old = host["params"]["embedder"]["embedding"]
    new = old[np.maximum(index, 0)]
    new[index < 0] = 0
    out = {
      "params": {
        "embedder": {"embedding": jax.device_put(new)},
        **{k: {"kernel": jax.device_put(host["params"][k]["kernel"])} for k in _dense_shapes()},
      }
    }
  elif method in ("fws", "fws_abstract"):
    info = vocab_info(workdir)
    settings = fws.WarmStartSettings(path, var_name_to_vocab_info={"embedder/embedding": info})
    out = fws.warm_start(live if method == "fws" else abstract_live, settings)
  else:
    raise ValueError(method)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "peak_gib": peak_rss_gib(), **({"mapping_s": mapping[0]} if mapping else {})}


def _time_mapping() -> list[float]:
  """Makes `build_mapping` add its seconds to the returned list (one entry, summed over calls)."""
  from flax_warmstart._src import vocab

  spent, build_mapping = [0.0], vocab.build_mapping

  def timed(**kwargs):
    start = time.perf_counter()
    try:
      return build_mapping(**kwargs)
    finally:
      spent[0] += time.perf_counter() - start

  vocab.build_mapping = timed
  return spent


def mapping_only(workdir: str, runs: int) -> None:
  """Times `build_mapping` on the W1 vocabularies and on two of 1,000,000 tokens: hashed lookup against a dict."""
  import numpy as np

  from flax_warmstart._src import vocab

  big = os.path.join(workdir, "vocab_1m")
  if not os.path.exists(os.path.join(big, "new.txt")):
    os.makedirs(big, exist_ok=True)
    write_vocabularies(big, 1_000_000, 1_000_000, OVERLAP, np.random.default_rng(1))
  threshold = vocab._HASH_MIN_TOKENS
  print(f"{'vocabularies':22s} {'lookup':7s} {'median s':>9s} {'cpu s':>7s}  (build_mapping; read_vocab not included)")
  for label, where in (("W1 (300,000/262,144)", workdir), ("1,000,000/1,000,000", big)):
    for lookup, minimum in (("hashed", threshold), ("dict", 1 << 62)):
      vocab._HASH_MIN_TOKENS = minimum
      wall, cpu = [], []
      for _ in range(runs):
        new = vocab.read_vocab(os.path.join(where, "new.txt"))  # fresh strings: their hashes are not cached
        old = vocab.read_vocab(os.path.join(where, "old.txt"))
        start, start_cpu = time.perf_counter(), time.process_time()
        vocab.build_mapping(
          new_tokens=new, old_tokens=old, num_rows=len(new), new_vocab_size=len(new), num_oov_buckets=0, where="w"
        )
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
      print(f"{label:22s} {lookup:7s} {statistics.median(wall):9.3f} {statistics.median(cpu):7.3f}", flush=True)
  vocab._HASH_MIN_TOKENS = threshold


def main() -> None:
  parser = bench_parser(__doc__, "/tmp/fws_bench_w1", "orbax,numpy,fws,fws_abstract,tf", runs=5)
  parser.add_argument("--mapping", action="store_true", help="time the vocabulary mapping alone (see above)")
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args.workdir)))
    return
  build(args.workdir)
  if args.mapping:
    mapping_only(args.workdir, args.runs)
    return
  has_tf = json.load(open(os.path.join(args.workdir, "built.json")))["tf"]
  methods = [m for m in args.methods.split(",") if m != "tf" or has_tf]
  results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  for run in range(args.runs):
    for method in methods:  # alternate methods so drift hits all alike
      warm_cache(args.workdir)
      time.sleep(args.pause)
      out = subprocess.run(
        [sys.executable, __file__, "--workdir", args.workdir, "--one", method],
        check=True,
        capture_output=True,
        text=True,
        env=env,
      )
      result = json.loads(out.stdout.strip().splitlines()[-1])
      results[method].append(result)
      extra = f"  mapping {result['mapping_s']:.2f} s" if "mapping_s" in result else ""
      print(f"run {run} {method:12s} {result['seconds']:7.2f} s  peak {result['peak_gib']:.2f} GiB{extra}", flush=True)
  print(
    f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
  )
  med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
  peak = {m: statistics.median(r["peak_gib"] for r in rs) for m, rs in results.items()}
  print(f"{'method':12s} {'median s':>9s} {'peak GiB':>9s} {'x orbax':>8s} {'x numpy':>8s} {'x tf':>8s}")
  nan = float("nan")
  for m in methods:
    print(
      f"{m:12s} {med[m]:9.2f} {peak[m]:9.2f} {med[m] / med.get('orbax', nan):8.2f}"
      f" {med[m] / med.get('numpy', nan):8.2f} {med[m] / med.get('tf', nan):8.2f}"
    )
  for m in methods:
    if "mapping_s" in results[m][0]:
      print(f"{m}: the vocabulary mapping took {statistics.median(r['mapping_s'] for r in results[m]):.3f} s (median)")


if __name__ == "__main__":
  main()
