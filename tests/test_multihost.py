"""A warm start on a global mesh across processes (issue 7, item 1).

Two local processes with 4 CPU devices each join through `jax.distributed` (gloo collectives on
127.0.0.1) and run tests/multihost_worker.py: they write the old model's checkpoint with a
(2, 4) global mesh and warm-start a changed model (a bigger, reordered vocabulary and a renamed
scope) from it. Every shard each process holds must equal the same slice of the single-process
result, computed here on a (2, 4) mesh of this process's 8 devices with the same shardings.

Marked `slow` (it starts processes): `python -m pytest -m slow` runs it, as `.ci/run` does.
"""

import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import time

import jax
import multihost_worker as mw
import numpy as np
import pytest

import flax_warmstart as fws

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(mw.__file__).resolve()
NUM_PROCESSES = 2
DEADLINE_S = 180  # for both workers together; a healthy run takes well under 30 s


def gloo_missing() -> str | None:
  """Why this jax cannot run CPU processes with gloo collectives, or None if it can."""
  if not hasattr(jax, "distributed") or not hasattr(jax.distributed, "initialize"):
    return "this jax has no jax.distributed.initialize"
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    return "this jax has no jax_cpu_collectives_implementation option"
  try:
    from jax._src.lib import _jax  # noqa: PLC0415
  except ImportError as err:
    return f"cannot import jaxlib's extension to look for gloo ({err})"
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib is built without gloo CPU collectives (no make_gloo_tcp_collectives)"
  return None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def bounds(index, shape) -> tuple[tuple[int, int], ...]:
  """A shard's index (a tuple of slices) as `(start, stop)` pairs, as the workers record it."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def logs(paths) -> str:
  return "\n".join(f"----- {p.name} -----\n{p.read_text(errors='replace')[-6000:]}" for p in paths)


def launch(workdir: pathlib.Path, port: int) -> str | None:
  """Runs the workers once, within DEADLINE_S: None on success, else what went wrong with their logs.

  Whatever happens (a failure, a timeout, an exception here), no worker outlives this call.
  """
  env = dict(os.environ)
  # The library the workers import is the one this process tests.
  root = str(pathlib.Path(fws.__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  log_paths = [workdir / f"worker_{i}.log" for i in range(NUM_PROCESSES)]
  procs = []
  try:
    for i, log_path in enumerate(log_paths):
      with open(log_path, "wb") as log:
        command = [sys.executable, str(WORKER), "--process-id", str(i), "--num-processes", str(NUM_PROCESSES)]
        command += ["--port", str(port), "--workdir", str(workdir), "--timeout", str(DEADLINE_S - 30)]
        procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    deadline = time.monotonic() + DEADLINE_S
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed:  # the other one would only wait for its peer until its own timeouts
        return f"worker {failed[0]} exited with {procs[failed[0]].returncode}\n{logs(log_paths)}"
      if time.monotonic() > deadline:
        for p in procs:  # each dumps its threads' stacks to its log (faulthandler), then is killed below
          if p.poll() is None:
            p.send_signal(signal.SIGUSR1)
        time.sleep(1)
        return f"workers still running after {DEADLINE_S} s\n{logs(log_paths)}"
      time.sleep(0.1)
    codes = [p.returncode for p in procs]
    return None if codes == [0] * NUM_PROCESSES else f"workers exited with {codes}\n{logs(log_paths)}"
  finally:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)  # start_new_session: the group is the worker and its children
        except ProcessLookupError:
          pass
        p.wait()


def run_workers(workdir: pathlib.Path) -> pathlib.Path:
  """Runs the workers; a new port (and directory) if another program took the port meanwhile."""
  for attempt in range(3):
    attempt_dir = workdir / f"attempt_{attempt}"
    attempt_dir.mkdir()
    error = launch(attempt_dir, free_port())
    if error is None:
      return attempt_dir
    if "Failed to start RPC server" not in error:  # the coordinator could not bind its port
      break
  pytest.fail(error)


def old_index() -> np.ndarray:
  """The old row of each new row, or -1 (new tokens and OOV rows)."""
  old = {tok: i for i, tok in enumerate(mw.OLD_VOCAB)}
  return np.array([old.get(tok, -1) for tok in mw.NEW_VOCAB] + [-1] * mw.NUM_OOV)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """(per-process shard records, single-process reference leaves, the reference mesh)."""
  reason = gloo_missing()
  if reason:
    pytest.skip(f"multi-process CPU test needs jax.distributed with gloo: {reason}")
  workdir = run_workers(tmp_path_factory.mktemp("multihost"))
  records = []
  for i in range(NUM_PROCESSES):
    with open(workdir / f"process_{i}.pkl", "rb") as f:
      records.append(pickle.load(f))
  # The reference: one process, same mesh shape and shardings, the checkpoint the workers wrote.
  assert jax.device_count() == 8
  mesh = mw.make_mesh(jax.devices())
  out = fws.warm_start(mw.new_state(mesh), mw.settings(str(workdir / "ckpt")), rng=jax.random.key(mw.RNG_SEED))
  reference = {mw.leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]}
  abstract = mw.abstract_warm_start(mesh, str(workdir / "ckpt"))
  abstract_reference = {mw.leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  return records, reference, mesh, abstract_reference


def test_every_shard_matches_the_single_process_result(results):
  records, reference, mesh, _ = results
  assert [r["process_index"] for r in records] == list(range(NUM_PROCESSES))
  check_shards([r["leaves"] for r in records], reference, mesh)


def test_abstract_state_shards_match_the_single_process_result(results):
  records, _, mesh, reference = results
  check_shards([r["abstract"] for r in records], reference, mesh)
  out = {name: np.asarray(leaf) for name, leaf in reference.items()}
  old = mw.host_values(mw.abstract_state(len(mw.OLD_VOCAB), "encoder"), seed=0)
  fresh = jax.jit(mw.create_fn(mw.NEW_ROWS, "backbone"))()
  # The head and its slots are init_fn's; the renamed layer and the kept embedding rows the checkpoint's.
  np.testing.assert_array_equal(out["params/head/kernel"], fresh.params["head"]["kernel"])
  np.testing.assert_array_equal(out["opt_state/0/mu/head/bias"], 0)
  np.testing.assert_array_equal(out["params/backbone/kernel"], old["params/encoder/kernel"])
  index = old_index()
  np.testing.assert_array_equal(
    out["params/embedder/embedding"][index >= 0], old["params/embedder/embedding"][index[index >= 0]]
  )


def check_shards(records: list[dict], reference: dict, mesh) -> None:
  """Every process's shards of every leaf equal the reference's slices, and together cover it."""
  for name, ref in reference.items():
    full = np.asarray(ref)
    # Which slice each mesh position holds: the same layout must hold it in the workers.
    by_position = ref.sharding.devices_indices_map(ref.shape)
    covered = np.zeros(ref.shape, np.int64)
    for p, record in enumerate(records):
      leaf = record[name]
      assert (leaf["shape"], leaf["dtype"], leaf["spec"]) == (ref.shape, str(ref.dtype), str(ref.sharding.spec)), name
      expected = sorted(bounds(by_position[d], ref.shape) for d in mesh.devices[p])
      assert sorted(index for index, _, _ in leaf["shards"]) == expected, (name, p)
      assert len({device for _, device, _ in leaf["shards"]}) == mesh.devices.shape[1], (name, p)
      for index, _, data in leaf["shards"]:
        where = tuple(slice(start, stop) for start, stop in index)
        np.testing.assert_array_equal(data, full[where], err_msg=f"{name} process {p} shard {index}")
        covered[where] += 1
    # Both processes together hold every element (once per replica).
    replicas = mesh.size // len({bounds(index, ref.shape) for index in by_position.values()})
    np.testing.assert_array_equal(covered, np.full(ref.shape, replicas), err_msg=f"{name}: coverage")


# Metadata a process reads beside its shards' data: the OCDBT manifest and b-tree nodes, the array metadata.
METADATA_SLACK = 1 << 20


def test_each_process_reads_only_its_shards(results):
  """Fully sharded tensors (one plain, one remapped within each mesh row's half): each process reads its shards'
  share of the bytes plus metadata, not the whole tensors (`rchar` of /proc/self/io around the call)."""
  records, _, _, _ = results
  for record in records:
    got = record["bytes"]
    print(
      f"process {record['process_index']}: read {got['read'] / 2**20:.2f} MiB for its shards' {got['share'] / 2**20:.2f}"
      f" MiB of {got['total'] / 2**20:.2f} MiB"
    )
    assert got["share"] * NUM_PROCESSES == got["total"]
    # The data are random floats (zstd keeps them near their size): at least most of the share, at most all of it.
    assert 0.5 * got["share"] < got["read"] <= got["share"] + METADATA_SLACK, got


def test_the_warm_start_did_its_work(results):
  _, reference, _, _ = results
  out = {name: np.asarray(leaf) for name, leaf in reference.items()}
  old = mw.host_values(mw.abstract_state(len(mw.OLD_VOCAB), "encoder"), seed=0)
  fresh = mw.host_values(mw.abstract_state(mw.NEW_ROWS, "backbone"), seed=1)
  index = old_index()
  copied, missing = index >= 0, index < 0
  assert copied.sum() == 7 and missing.sum() == 9
  for prefix in ("params/", "opt_state/0/mu/", "opt_state/0/nu/"):
    # The renamed scope, its slots with it.
    for param in ("kernel", "bias"):
      np.testing.assert_array_equal(out[f"{prefix}backbone/{param}"], old[f"{prefix}encoder/{param}"])
    # Rows (the head kernel's columns) follow their tokens.
    emb, old_emb = out[f"{prefix}embedder/embedding"], old[f"{prefix}embedder/embedding"]
    np.testing.assert_array_equal(emb[copied], old_emb[index[copied]])
    head, old_head = out[f"{prefix}head/kernel"], old[f"{prefix}head/kernel"]
    np.testing.assert_array_equal(head[:, copied], old_head[:, index[copied]])
    bias, old_bias = out[f"{prefix}head/bias"], old[f"{prefix}head/bias"]
    np.testing.assert_array_equal(bias[copied], old_bias[index[copied]])
    if prefix != "params/":  # slots: new rows start at zero
      for value, axis in ((emb, 0), (head, 1), (bias, 0)):
        np.testing.assert_array_equal(np.compress(missing, value, axis=axis), 0)
  # New rows from each backup initializer.
  np.testing.assert_array_equal(out["params/head/kernel"][:, missing], mw.HEAD_FILL)
  np.testing.assert_allclose(out["params/head/bias"][missing], old["params/head/bias"].mean(), rtol=1e-6)
  new_rows = out["params/embedder/embedding"][missing]
  assert np.all(np.abs(new_rows) < 0.2) and len(np.unique(new_rows)) == new_rows.size  # normal(0.02) draws
  assert not np.any(new_rows == fresh["params/embedder/embedding"][missing])
  # The step and Adam's count come from the old run (3), not the fresh state (7).
  assert out["step"] == 3 and out["opt_state/0/count"] == 3
  assert fresh["step"] == 7
