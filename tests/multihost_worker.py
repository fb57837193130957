"""One process of the multi-process warm start in test_multihost.py (not a test module itself).

Run as `python tests/multihost_worker.py --process-id I --num-processes 2 --port P --workdir DIR`:
the processes join through `jax.distributed` on 127.0.0.1 (CPU collectives over gloo), 4 CPU
devices each, and on the global (2, 4) mesh they write the old model's checkpoint collectively,
warm-start the new model from it (a vocabulary remap and a renamed scope, the same arguments in
every process), and dump every addressable shard of the result to DIR/process_I.pkl.

test_multihost.py imports the model, the values, the shardings and the settings from here, so
its single-process reference is built exactly as the workers build theirs.
"""

from __future__ import annotations

import os
import re

if __name__ == "__main__":
  # Before jax is imported: 4 CPU devices per process, whatever the parent's flags said.
  _flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=4".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.pop("JAX_NUM_CPU_DEVICES", None)  # it would override the flag

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flax_warmstart as fws  # noqa: E402

MESH_SHAPE = (2, 4)
DEVICES_PER_PROCESS = 4
MESH_AXES = ("data", "model")
FEATURES = 8
OLD_VOCAB = ["<pad>", "a", "b", "c", "d", "e", "f", "g"]
# Reordered and bigger: 7 tokens copied, 8 new ones, "e" dropped, plus one OOV row: 16 rows.
NEW_VOCAB = ["<pad>", "g", "b", "z", "a", "y", "c", "x", "d", "w", "f", "v", "u", "t", "s"]
NUM_OOV = 1
NEW_ROWS = len(NEW_VOCAB) + NUM_OOV
HEAD_FILL = 0.5  # the head kernel's backup_initializer: constant(HEAD_FILL)
RNG_SEED = 0  # warm_start(..., rng=jax.random.key(RNG_SEED))
# Parameter (last two path components) -> its layout; its optimizer slots share it.
SPECS = {
  "embedder/embedding": P("data", "model"),  # [vocab, features]: over both mesh axes
  "hidden/kernel": P(None, "model"),
  "hidden/bias": P("model"),
  "head/kernel": P(None, ("data", "model")),  # [features, vocab]: vocabulary on axis 1
  "head/bias": P(("data", "model")),
}


class TextModel(nn.Module):
  """An embedding, a hidden Dense layer (renamed between the runs) and a vocabulary-sized head."""

  vocab: int
  hidden_name: str

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, FEATURES, name="embedder")(ids)
    x = nn.relu(nn.Dense(FEATURES, name=self.hidden_name)(x))
    return nn.Dense(self.vocab, name="head")(x)


def leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def spec_for(name: str, ndim: int) -> P:
  """The layout of a leaf: its parameter's (matched on the last two path components), or replicated."""
  if ndim == 0:
    return P()
  module, param = name.split("/")[-2:]
  if module in ("encoder", "backbone"):
    module = "hidden"
  return SPECS[f"{module}/{param}"]


def host_values(abstract, seed: int) -> dict[str, np.ndarray]:
  """Leaf name -> a deterministic numpy value (the same in every process): normal floats, counters 3 + 4 * seed."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = leaf_name(path)
    if np.issubdtype(leaf.dtype, np.integer):
      out[name] = np.full(leaf.shape, 3 + 4 * seed, leaf.dtype)
    else:
      rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
      out[name] = rng.normal(size=leaf.shape).astype(leaf.dtype)
  return out


def create_fn(vocab: int, hidden_name: str):
  """A function of no arguments that initialises TextModel's TrainState (Adam)."""
  model = TextModel(vocab, hidden_name)

  def create():
    params = model.init(jax.random.key(0), np.zeros((1, 2), np.int32))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))

  return create


def abstract_state(vocab: int, hidden_name: str):
  """The TrainState (Adam) of TextModel as shapes and dtypes: nothing is computed."""
  return jax.eval_shape(create_fn(vocab, hidden_name))


def placed_abstract_state(vocab: int, hidden_name: str, mesh: Mesh):
  """The abstract state with each leaf's sharding on `mesh` (as `sharded_state` places it)."""

  def place(path, leaf):
    sharding = NamedSharding(mesh, spec_for(leaf_name(path), leaf.ndim))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(place, abstract_state(vocab, hidden_name))


def make_mesh(devices) -> Mesh:
  return Mesh(np.asarray(devices).reshape(MESH_SHAPE), MESH_AXES)


def sharded_state(abstract, values: dict[str, np.ndarray], mesh: Mesh):
  """The state with each leaf a global jax.Array on `mesh`, built from the (identical) host values."""

  def place(path, leaf):
    name = leaf_name(path)
    host = values[name]
    sharding = NamedSharding(mesh, spec_for(name, host.ndim))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map_with_path(place, abstract)


def old_state(mesh: Mesh):
  abstract = abstract_state(len(OLD_VOCAB), "encoder")
  return sharded_state(abstract, host_values(abstract, seed=0), mesh)


def new_state(mesh: Mesh):
  abstract = abstract_state(NEW_ROWS, "backbone")
  return sharded_state(abstract, host_values(abstract, seed=1), mesh)


def settings(ckpt: str) -> fws.WarmStartSettings:
  """Everything (slots and step too), the hidden layer renamed, three vocabulary remaps."""

  def info(init, axis=0):
    return fws.VocabInfo(NEW_VOCAB, len(NEW_VOCAB), NUM_OOV, OLD_VOCAB, backup_initializer=init, axis=axis)

  return fws.WarmStartSettings(
    ckpt,
    vars_to_warm_start=[".*"],
    var_name_to_prev_var_name={"backbone/kernel": "encoder/kernel", "backbone/bias": "encoder/bias"},
    var_name_to_vocab_info={
      "embedder/embedding": info(jax.nn.initializers.normal(0.02)),
      "head/kernel": info(jax.nn.initializers.constant(HEAD_FILL), axis=1),
      "head/bias": info(fws.MeanOfOldRows()),
    },
  )


def abstract_settings(ckpt: str) -> fws.WarmStartSettings:
  """For the abstract warm start: everything but the head (init_fn computes it and its slots), the embedding remapped."""
  return fws.WarmStartSettings(
    ckpt,
    vars_to_warm_start=[r"(?!head/).*"],
    var_name_to_prev_var_name={"backbone/kernel": "encoder/kernel", "backbone/bias": "encoder/bias"},
    var_name_to_vocab_info={
      "embedder/embedding": fws.VocabInfo(
        NEW_VOCAB, len(NEW_VOCAB), NUM_OOV, OLD_VOCAB, backup_initializer=jax.nn.initializers.normal(0.02)
      )
    },
  )


def abstract_warm_start(mesh: Mesh, ckpt: str):
  """A warm start from the abstract new state on `mesh`, with init_fn for the head (never initialised whole)."""
  abstract = placed_abstract_state(NEW_ROWS, "backbone", mesh)
  init_fn = create_fn(NEW_ROWS, "backbone")
  return fws.warm_start(abstract, abstract_settings(ckpt), init_fn=init_fn, rng=jax.random.key(RNG_SEED))


# The bytes each process reads (issue 17): two fully sharded f32 tensors of 8 MiB each, saved and loaded as
# P("data", "model") (chunks of 1024 x 256 = 1 MiB), one loaded as it is and one through a vocabulary remap whose new
# rows of each mesh row come from the same half of the old table (tokens shuffled within each half, a tenth new).
BIG_ROWS, BIG_COLS = 2048, 1024
BIG_SPEC = P("data", "model")
BIG_OLD_VOCAB = [f"t{i}" for i in range(BIG_ROWS)]


def big_new_vocab() -> list[str]:
  """The old tokens shuffled within each half of the table, every tenth replaced by a new token."""
  rng = np.random.default_rng(17)
  half = BIG_ROWS // MESH_SHAPE[0]
  order = np.concatenate([h * half + rng.permutation(half) for h in range(MESH_SHAPE[0])])
  return [f"n{i}" if i % 10 == 0 else BIG_OLD_VOCAB[j] for i, j in enumerate(order)]


def big_state(mesh: Mesh):
  """The two big tensors, sharded as BIG_SPEC (the same values in every process)."""
  values = {
    name: np.random.default_rng(seed).normal(size=(BIG_ROWS, BIG_COLS)).astype(np.float32)
    for seed, name in enumerate(("plain", "embed"))
  }
  sharding = NamedSharding(mesh, BIG_SPEC)
  return {name: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]) for name, v in values.items()}


def rchar() -> int:
  """Bytes this process has read through read() and pread() (`rchar` of /proc/self/io)."""
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def bytes_read(mesh: Mesh, workdir: str) -> dict[str, int]:
  """Saves the big tensors collectively, then warm-starts them from the abstract state; what this process read."""
  ckpt = os.path.join(workdir, "ckpt_big")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, big_state(mesh))
  sharding = NamedSharding(mesh, BIG_SPEC)
  abstract = {
    name: jax.ShapeDtypeStruct((BIG_ROWS, BIG_COLS), np.float32, sharding=sharding) for name in ("plain", "embed")
  }
  info = fws.VocabInfo(big_new_vocab(), BIG_ROWS, 0, BIG_OLD_VOCAB)
  settings = fws.WarmStartSettings(ckpt, vars_to_warm_start=[".*"], var_name_to_vocab_info={"embed": info})
  # The fingerprint of the checkpoint, imports, and the like come first: read before the measured call.
  fws.plan(abstract, settings)
  before = rchar()
  out = jax.block_until_ready(fws.warm_start(abstract, settings))
  read = rchar() - before
  local = sum(shard.data.nbytes for leaf in out.values() for shard in leaf.addressable_shards)
  return {"read": read, "share": local, "total": sum(leaf.nbytes for leaf in out.values())}


def shard_records(tree) -> dict[str, dict]:
  """Leaf name -> its global shape, dtype, spec and addressable shards `(index, device id, data)`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shards = []
    for shard in leaf.addressable_shards:
      index = tuple(s.indices(n)[:2] for s, n in zip(shard.index, leaf.shape, strict=True))
      shards.append((index, shard.device.id, np.asarray(shard.data)))
    out[leaf_name(path)] = {
      "shape": leaf.shape,
      "dtype": str(leaf.dtype),
      "spec": str(leaf.sharding.spec),
      "shards": shards,
    }
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--timeout", type=int, default=150, help="dump every thread's stack and exit after this")
  args = parser.parse_args(argv)
  # A hung collective shows where it hangs in the log: on SIGUSR1 from the parent, and on our own timeout.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  faulthandler.dump_traceback_later(args.timeout, exit=True)

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{args.port}",
    coordinator_bind_address=f"127.0.0.1:{args.port}",  # loopback only (the default is every interface)
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=60,
    shutdown_timeout_seconds=30,
  )
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices", flush=True)
  if (jax.process_count(), jax.local_device_count()) != (args.num_processes, DEVICES_PER_PROCESS):
    raise SystemExit(
      f"expected {args.num_processes} processes of {DEVICES_PER_PROCESS} devices, got {jax.process_count()}"
      f" of {jax.local_device_count()} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
    )
  mesh = make_mesh(jax.devices())  # row p of the mesh: process p's devices

  ckpt = os.path.join(os.path.abspath(args.workdir), "ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, old_state(mesh))
  print("saved", ckpt, flush=True)

  out = fws.warm_start(new_state(mesh), settings(ckpt), rng=jax.random.key(RNG_SEED))
  records = shard_records(jax.block_until_ready(out))
  abstract_records = shard_records(jax.block_until_ready(abstract_warm_start(mesh, ckpt)))
  read = bytes_read(mesh, os.path.abspath(args.workdir))
  print(
    f"process {jax.process_index()} read {read['read']} bytes for its {read['share']} of {read['total']}", flush=True
  )
  path = os.path.join(args.workdir, f"process_{args.process_id}.pkl")
  with open(path + ".tmp", "wb") as f:
    record = {"process_index": jax.process_index(), "leaves": records, "abstract": abstract_records, "bytes": read}
    pickle.dump(record, f)
  os.replace(path + ".tmp", path)
  print("wrote", path, flush=True)
  jax.distributed.shutdown()
  faulthandler.cancel_dump_traceback_later()
  return 0


if __name__ == "__main__":
  sys.exit(main())
