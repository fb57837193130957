"""A built-in end-to-end example: `python -m flax_warmstart.demo`.

Trains a tiny Flax model for a few steps, saves it with an Orbax
CheckpointManager in a temporary directory, then warm-starts a changed model
(the encoder renamed from `encoder` to `backbone`, a new 3-way head) from it,
prints the plan and checks that the carried-over encoder computes the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

import flax_warmstart as fws

SETTINGS_YAML = """\
# WarmStartSettings for the example: the encoder, renamed to backbone, with its Adam slots.
vars_to_warm_start: ["backbone/"]
var_name_to_prev_var_name:
  backbone/kernel: encoder/kernel
  backbone/bias: encoder/bias
"""


class Classifier(nn.Module):
  """A two-layer classifier whose encoder scope name and head size can change."""

  encoder_name: str = "encoder"
  num_classes: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(16, name=self.encoder_name)(x))
    return nn.Dense(self.num_classes, name="head")(x)


def new_state(rng: jax.Array | None = None) -> train_state.TrainState:
  """The changed model (encoder renamed `backbone`, a 3-way head), freshly initialised, with its Adam state.

  The new model as code for the command line: `flax-warmstart plan
  /tmp/fws_example/old_run --init flax_warmstart.demo:new_state` (which passes
  `rng=jax.random.key(--seed)`).
  """
  model = Classifier(encoder_name="backbone", num_classes=3)
  params = model.init(jax.random.key(1) if rng is None else rng, jnp.zeros((1, 8)))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


def _train(state: train_state.TrainState, x: jax.Array, y: jax.Array, steps: int) -> train_state.TrainState:
  @jax.jit
  def step(state):
    def loss(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for _ in range(steps):
    state = step(state)
  return state


def main(argv: list[str] | None = None) -> int:
  """Runs the example; returns 0 on success."""
  parser = argparse.ArgumentParser(
    prog="python -m flax_warmstart.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=20, help="training steps of the old model")
  parser.add_argument(
    "--keep",
    metavar="DIR",
    help="write the example's checkpoints (old_run/, new/) and settings.yaml to DIR, for the command line",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("flax_warmstart").setLevel(logging.INFO)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, size=64))
  tx = optax.adam(1e-2)

  old_model = Classifier()
  old = train_state.TrainState.create(
    apply_fn=old_model.apply, params=old_model.init(jax.random.key(0), x)["params"], tx=tx
  )
  old = _train(old, x, y, args.steps)

  with tempfile.TemporaryDirectory() as scratch:
    tmp = os.path.abspath(args.keep) if args.keep else scratch
    os.makedirs(tmp, exist_ok=True)
    with ocp.CheckpointManager(f"{tmp}/old_run") as mgr:
      for earlier in mgr.all_steps():  # a rerun with --keep replaces the run it wrote before
        mgr.delete(earlier)
      mgr.save(args.steps, args=ocp.args.StandardSave(old), force=True)
    print(f"Saved the old model after {args.steps} steps to {tmp}/old_run.")

    new = new_state(jax.random.key(1))
    settings = fws.WarmStartSettings(
      ckpt_to_initialize_from=f"{tmp}/old_run",
      # Parameters and their Adam slots of the encoder; the new head keeps its init.
      vars_to_warm_start=["backbone/"],
      var_name_to_prev_var_name={"backbone/kernel": "encoder/kernel", "backbone/bias": "encoder/bias"},
    )
    print("\nThe plan (read from checkpoint metadata only):")
    print(fws.plan(new, settings))
    warm = fws.warm_start(new, settings)
    if args.keep:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f"{tmp}/new", new, force=True)
      with open(f"{tmp}/settings.yaml", "w") as f:
        f.write(SETTINGS_YAML)
      print(f"Wrote {tmp}/new (the changed model, freshly initialised) and {tmp}/settings.yaml.")

  def features(params, name):
    return nn.relu(x @ params[name]["kernel"] + params[name]["bias"])

  same = np.array_equal(features(old.params, "encoder"), features(warm.params, "backbone"))
  head_kept = np.array_equal(warm.params["head"]["kernel"], new.params["head"]["kernel"])
  print(f"\nThe warm-started encoder computes the same features as the old one: {same}")
  print(f"The new 3-way head kept its fresh initialisation: {head_kept}")
  return 0 if same and head_kept else 1


if __name__ == "__main__":
  raise SystemExit(main())
