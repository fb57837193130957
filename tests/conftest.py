"""Shared fixtures: 8 CPU devices, tiny real Flax models, real Orbax checkpoints.

Session-scoped fixtures (`adam_mlp`, `adam_mlp_run`, `mesh`) are built once for
the whole run and shared by every test file: read them, never change them (no
test may write into their directories or mutate their states; the library
never mutates its inputs). A test that damages or rewrites a checkpoint writes
its own under `tmp_path`.
"""

import contextlib
import io
import os
from typing import Any, NamedTuple

# Must happen before jax is imported anywhere: gives the tests an 8-device CPU
# mesh to shard over.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _import_flax_io_without_tensorflow() -> None:
  """`flax.io` as on a machine without the `tf` extra: its default (os/glob) backend for local files.

  `flax.io` (imported by `flax.training.checkpoints`, a writer the tests use)
  imports TensorFlow for `tf.io.gfile` whenever TensorFlow is installed: 7 s of
  a default test run on the 2-core machine, for gfile features (remote paths)
  no test uses. The TensorFlow oracle tests (marked slow) import TensorFlow
  themselves.
  """
  import importlib.util  # noqa: PLC0415

  find_spec = importlib.util.find_spec
  importlib.util.find_spec = lambda name, *args: None if name == "tensorflow" else find_spec(name, *args)
  try:
    import flax.io  # noqa: F401, PLC0415
  finally:
    importlib.util.find_spec = find_spec


_import_flax_io_without_tensorflow()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from flax.training import train_state  # noqa: E402


def save_checkpoint(path, tree):
  """Writes `tree` as a real Orbax checkpoint (StandardCheckpointer) and waits for it."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.fspath(path), tree)
  return os.fspath(path)


def save_manager_step(root, step, tree, **items):
  """Writes `tree` as step `step` of a CheckpointManager at `root` (plus extra JSON items)."""
  names = ("state", *items) if items else None
  with ocp.CheckpointManager(os.fspath(root), item_names=names) as mgr:
    if items:
      args = {"state": ocp.args.StandardSave(tree)}
      args.update({k: ocp.args.JsonSave(v) for k, v in items.items()})
      mgr.save(step, args=ocp.args.Composite(**args))
    else:
      mgr.save(step, args=ocp.args.StandardSave(tree))
  return os.fspath(root)


class MLP(nn.Module):
  """encoder (Dense) -> head (Dense): the smallest model with a renameable scope."""

  features: int = 4
  outputs: int = 2
  encoder_name: str = "encoder"

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.features, name=self.encoder_name)(x))
    return nn.Dense(self.outputs, name="head")(x)


class BNMLP(nn.Module):
  """A Dense + BatchNorm model, for `batch_stats`."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(4, name="encoder")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(2, name="head")(x)


class BatchStatsState(train_state.TrainState):
  batch_stats: dict


def make_state(model=None, tx=None, seed=0, steps=1):
  """A TrainState of `model` after `steps` real optimizer updates (so slots are non-zero)."""
  model = model or MLP()
  tx = tx or optax.adam(1e-2)
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(seed), x)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def loss(p):
    return jnp.mean(state.apply_fn({"params": p}, x) ** 2)

  for _ in range(steps):
    state = state.apply_gradients(grads=jax.grad(loss)(state.params))
  return state


def assert_trees_equal(a, b):
  """Same structure and bit-identical leaves."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert jnp.shape(x) == jnp.shape(y)
    assert jnp.array_equal(jnp.asarray(x), jnp.asarray(y)), (x, y)


def rows(plan):
  """`{name: LeafPlan}` of a plan."""
  return {row.name: row for row in plan.leaves}


def adam_slots(state, param_scope):
  """The Adam `mu` and `nu` of one parameter scope of a TrainState."""
  return state.opt_state[0].mu[param_scope], state.opt_state[0].nu[param_scope]


def nest(flat):
  """`{"a/b": x}` -> `{"a": {"b": x}}`: a tree whose names are the keys of `flat`."""
  out = {}
  for name, value in flat.items():
    *scopes, leaf = name.split("/")
    node = out
    for s in scopes:
      node = node.setdefault(s, {})
    node[leaf] = value
  return out


class Saved(NamedTuple):
  """A state and the path of its checkpoint; unpacks as `state, path = saved`."""

  state: Any
  path: str


class CliResult(NamedTuple):
  """What `run_cli` returns: the exit code and what the command printed."""

  returncode: int
  stdout: str
  stderr: str


def run_cli(*args, cwd=None):
  """Runs `flax-warmstart ARGS` in this process (`cli.main`), capturing stdout and stderr.

  Usage errors and `--help` leave argparse through `SystemExit`: their code is
  the exit code. `cwd` is the working directory for the command's duration.
  """
  from flax_warmstart import cli

  out, err = io.StringIO(), io.StringIO()
  with contextlib.ExitStack() as stack:
    if cwd is not None:
      stack.enter_context(contextlib.chdir(cwd))
    stack.enter_context(contextlib.redirect_stdout(out))
    stack.enter_context(contextlib.redirect_stderr(err))
    try:
      code = cli.main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    except SystemExit as exit_:
      code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
  return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def adam_mlp(tmp_path_factory):
  """`make_state(MLP(), optax.adam(1e-2), seed=0, steps=2)` and its Orbax checkpoint (StandardCheckpointer).

  Session-wide and read-only: `state, path = adam_mlp`.
  """
  state = make_state(MLP(), optax.adam(1e-2), seed=0, steps=2)
  return Saved(state, save_checkpoint(tmp_path_factory.mktemp("adam_mlp") / "ckpt", state))


@pytest.fixture(scope="session")
def adam_mlp_run(tmp_path_factory, adam_mlp):
  """`adam_mlp`'s state as step 2 of a CheckpointManager root: `state, root = adam_mlp_run`. Read-only."""
  return Saved(adam_mlp.state, save_manager_step(tmp_path_factory.mktemp("adam_mlp_run") / "run", 2, adam_mlp.state))


@pytest.fixture(scope="session")
def mesh():
  """The (2, 4) mesh of the 8 CPU devices, axes ("a", "b")."""
  assert jax.device_count() == 8
  return jax.make_mesh((2, 4), ("a", "b"))


@pytest.fixture
def ckpt_dir(tmp_path):
  return tmp_path / "ckpt"


@pytest.fixture
def no_reads(monkeypatch):
  """Makes any read of checkpoint arrays fail: errors must come from metadata alone."""
  from flax_warmstart._src import hostread
  from flax_warmstart._src.sources import orbax as checkpoint_lib

  def fail(*args, **kwargs):
    raise AssertionError("a checkpoint array was read before the request was validated")

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", fail)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", fail)
  monkeypatch.setattr(checkpoint_lib, "restore", fail)
  monkeypatch.setattr(hostread.Read, "start", fail)


# The new model as code, for `--init module:function`: a module written to a directory of its own.
INIT_MODULE = "fws_cli_model"
INIT_MODULE_SOURCE = '''"""A tiny Flax model for `flax-warmstart --init fws_cli_model:FUNCTION` (written by tests/conftest.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class MLP(nn.Module):
  features: int = 4
  outputs: int = 2
  encoder_name: str = "encoder"

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.features, name=self.encoder_name)(x))
    return nn.Dense(self.outputs, name="head")(x)


def create_state(rng, encoder_name="encoder", outputs=2, optimizer="adam"):
  """A fresh TrainState, as conftest.make_state(..., steps=0) builds it (inputs of 3 features)."""
  model = MLP(encoder_name=encoder_name, outputs=outputs)
  params = model.init(rng, jnp.ones((2, 3)))["params"]
  tx = optax.adam(1e-2) if optimizer == "adam" else optax.sgd(0.1, momentum=0.9)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def create_variables(seed, encoder_name="encoder", outputs=2):
  """Linen variables ({"params": ...}), from an integer seed."""
  return MLP(encoder_name=encoder_name, outputs=outputs).init(jax.random.key(seed), jnp.ones((2, 3)))


def abstract_state(encoder_name="encoder", outputs=2):
  """The TrainState's abstract form only (jax.ShapeDtypeStruct leaves)."""
  return jax.eval_shape(lambda: create_state(jax.random.key(0), encoder_name, outputs))


def fails():
  raise RuntimeError("the dataset is not mounted")


NOT_A_FUNCTION = 3
'''


@pytest.fixture(scope="session")
def init_module(tmp_path_factory):
  """A directory holding `fws_cli_model.py` (INIT_MODULE_SOURCE): `--init fws_cli_model:create_state` from there.

  Returns the module file's path; its directory is the `cwd` for `module:function`.
  """
  path = tmp_path_factory.mktemp("init_module") / f"{INIT_MODULE}.py"
  path.write_text(INIT_MODULE_SOURCE)
  return path
