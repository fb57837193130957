# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # flax_warmstart quickstart
#
# Warm-start a **changed** Flax model from an Orbax checkpoint of an older one,
# the JAX counterpart of TensorFlow's `tf.estimator.WarmStartSettings`.
#
# In this notebook we
#
# 1. train a tiny Flax Linen text classifier (`embed` → mean → `encoder` → `head`)
#    for a few steps on synthetic data and save it with an Orbax `CheckpointManager`;
# 2. change the model: the `encoder` module is renamed to `backbone`, the head
#    predicts 3 classes instead of 2, and the vocabulary grows by two words and
#    an out-of-vocabulary (OOV) bucket;
# 3. look at the warm-start **plan** (decided from checkpoint metadata alone,
#    before anything is read), execute it, and check that the carried-over part
#    of the model computes exactly what the old model computed;
# 4. warm-start a Flax NNX model and its optimizer (with Dropout) from the same
#    Linen checkpoint, with no rules, and a Linen `TrainState` back from the
#    NNX checkpoint.
#
# It runs on a CPU in a few seconds, locally or on Colab.

# %%
# Installs flax_warmstart where this kernel cannot import it (it is not on PyPI):
# * in a clone of its repository (this notebook in its notebooks/ folder), from the clone,
#   `pip install -e ..`: nothing to set;
# * anywhere else (Colab, a notebook downloaded on its own), from your copy of the repository:
#   set SOURCE below to its path (e.g. "/content/flax_warmstart" after uploading or cloning it),
#   or to anything else `pip install` takes (a wheel built with `pip wheel .` in the repository).
try:
  import flax_warmstart as fws
except ImportError:
  SOURCE = None
  import importlib
  import pathlib
  import sys

  here = pathlib.Path.cwd().resolve()
  roots = [d for d in (here, *here.parents) if (d / "pyproject.toml").is_file()]
  clone = next((d for d in roots if (d / "flax_warmstart/__init__.py").is_file()), None)
  if SOURCE:
    # %pip install -q "{SOURCE}"
    print("Installed flax_warmstart from", SOURCE)
  elif clone:
    # %pip install -q -e "{clone}"
    sys.path.insert(0, str(clone))  # the editable install is seen by kernels started from now on; this one needs this
  else:
    raise ImportError(
      "flax_warmstart is not installed, and this notebook does not run inside a clone of its repository (no"
      f" pyproject.toml beside a flax_warmstart/ package in {here} or above). It is not on PyPI: get a copy of"
      " the repository (upload or clone it), then set SOURCE in this cell to its path and run the cell again;"
      " or run `pip install -e /path/to/the/repository` in a terminal and restart the kernel."
    ) from None
  importlib.invalidate_caches()
  import flax_warmstart as fws

# %%
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state
from IPython.display import display

print("flax_warmstart", fws.__version__, "| jax", jax.__version__, "| backend", jax.default_backend())

# %% [markdown]
# ## 1. The old model
#
# Sentences are sequences of 6 words from an 8-word vocabulary; a word's id is
# its position in `OLD_VOCAB`. The (made-up) label says whether a sentence has
# more colours than animals.


# %%
class TextClassifier(nn.Module):
  """Embeds tokens, averages them, encodes the average and classifies it."""

  vocab_size: int
  num_classes: int
  encoder_name: str = "encoder"

  @nn.compact
  def __call__(self, tokens: jax.Array, features_only: bool = False) -> jax.Array:
    x = nn.Embed(self.vocab_size, 8, name="embed")(tokens).mean(axis=1)
    x = nn.relu(nn.Dense(16, name=self.encoder_name)(x))
    if features_only:  # The encoder's features, before the head.
      return x
    return nn.Dense(self.num_classes, name="head")(x)


OLD_VOCAB = ["red", "green", "blue", "cat", "dog", "fish", "big", "small"]
COLOURS, ANIMALS = {0, 1, 2}, {3, 4, 5}

rng = np.random.default_rng(0)
tokens = rng.integers(0, len(OLD_VOCAB), size=(256, 6))
labels = np.array([sum(t in COLOURS for t in s) > sum(t in ANIMALS for t in s) for s in tokens], np.int32)
tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)


def train(state: train_state.TrainState, x: jax.Array, y: jax.Array, steps: int) -> train_state.TrainState:
  """A few full-batch Adam steps on the cross-entropy."""

  @jax.jit
  def step(state):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  for _ in range(steps):
    state, loss = step(state)
  print(f"after step {int(state.step)}: loss {float(loss):.4f}")
  return state


old_model = TextClassifier(vocab_size=len(OLD_VOCAB), num_classes=2)
old_state = train_state.TrainState.create(
  apply_fn=old_model.apply, params=old_model.init(jax.random.key(0), tokens)["params"], tx=optax.adam(1e-2)
)
old_state = train(old_state, tokens, labels, steps=50)

# %% [markdown]
# Save it with an Orbax `CheckpointManager` (in a temporary directory), as a
# training loop would.

# %%
workdir = tempfile.mkdtemp(prefix="fws_quickstart_")
old_run = os.path.join(workdir, "old_run")
with ocp.CheckpointManager(old_run) as mgr:  # Leaving the block waits for the save.
  mgr.save(int(old_state.step), args=ocp.args.StandardSave(old_state))

# The checkpoint's names, from its metadata (`tf.train.list_variables`):
for name, shape in fws.list_variables(old_run):
  print(f"{name:32} {shape}")

# %% [markdown]
# ## 2. The changed model
#
# * `encoder` is now called `backbone`;
# * the head predicts 3 classes (its shape changed, so it starts fresh);
# * the vocabulary has two new words, `yellow` and `bird`, and one OOV bucket
#   for any other word: the embedding has `8 + 2 + 1 = 11` rows. The old words
#   keep their ids here, but they need not: rows are matched by token.

# %%
NEW_VOCAB = OLD_VOCAB + ["yellow", "bird"]
NUM_OOV = 1

new_model = TextClassifier(vocab_size=len(NEW_VOCAB) + NUM_OOV, num_classes=3, encoder_name="backbone")
new_state = train_state.TrainState.create(
  apply_fn=new_model.apply, params=new_model.init(jax.random.key(1), tokens)["params"], tx=optax.adam(1e-2)
)
print(fws.variable_names(new_state.params))

# %% [markdown]
# ## 3. The warm start
#
# `WarmStartSettings` takes TensorFlow's argument names:
#
# * `vars_to_warm_start`: a regex over the *parameter* names (a list of regexes
#   would also select optimizer slots and the step, as in TensorFlow). The head
#   is left out, so it keeps its fresh initialisation.
# * `rename_rules`: `backbone/...` reads `encoder/...` from the checkpoint
#   (`var_name_to_prev_var_name={"backbone/kernel": "encoder/kernel", ...}`
#   does the same with exact names).
# * `var_name_to_vocab_info`: the embedding's rows are remapped by token, with
#   in-memory token lists; the new words and the OOV row start at the mean of
#   the old rows.

# %%
settings = fws.WarmStartSettings(
  ckpt_to_initialize_from=old_run,  # A manager root: its latest step.
  vars_to_warm_start="embed/|backbone/",
  rename_rules=[(r"backbone/(.*)", r"encoder/\1")],
  var_name_to_vocab_info={
    "embed/embedding": fws.VocabInfo(
      new_vocab=NEW_VOCAB,
      new_vocab_size=len(NEW_VOCAB),
      num_oov_buckets=NUM_OOV,
      old_vocab=OLD_VOCAB,
      backup_initializer=fws.MeanOfOldRows(),
    )
  },
)
plan = fws.plan(new_state, settings)  # Metadata only: nothing is read yet.
print(plan)

# %% [markdown]
# In a notebook the plan also renders as an HTML table:

# %%
display(plan)

# %% [markdown]
# Executing the plan gives a new `TrainState` of the same structure; the input
# state is not modified.

# %%
warm_state = fws.warm_start(new_state, plan=plan)
stats = {row.name: row.remap.mapping.stats() for row in plan.leaves if row.remap is not None}
print(stats)

# %% [markdown]
# ## 4. Checks
#
# The carried-over encoder computes exactly the old encoder's features for
# sentences made of old words, the head kept its fresh initialisation, and the
# new words' rows are the mean of the old rows.

# %%
old_features = old_model.apply({"params": old_state.params}, tokens, features_only=True)
warm_features = new_model.apply({"params": warm_state.params}, tokens, features_only=True)
np.testing.assert_array_equal(warm_features, old_features)

np.testing.assert_array_equal(warm_state.params["head"]["kernel"], new_state.params["head"]["kernel"])
assert warm_state.params["head"]["kernel"].shape == (16, 3)

old_table = old_state.params["embed"]["embedding"]
new_table = warm_state.params["embed"]["embedding"]
np.testing.assert_array_equal(new_table[: len(OLD_VOCAB)], old_table)
np.testing.assert_allclose(new_table[len(OLD_VOCAB) :], np.broadcast_to(old_table.mean(axis=0), (3, 8)), rtol=1e-6)
print("The warm-started encoder computes the old features; the head and the new rows are as planned.")

# %% [markdown]
# The new model takes sentences with new words (and an unknown word, in the OOV
# bucket) and predicts 3 classes. From here, train it as usual.

# %%
word_id = {w: i for i, w in enumerate(NEW_VOCAB)}
oov_id = len(NEW_VOCAB)
sentence = ["yellow", "bird", "and", "big", "red", "cat"]  # "and" is out of vocabulary.
ids = jnp.asarray([[word_id.get(w, oov_id) for w in sentence]])
print(ids, jax.nn.softmax(new_model.apply({"params": warm_state.params}, ids)))

# %% [markdown]
# ## 5. Flax NNX: a Linen checkpoint into an NNX model and optimizer, and back
#
# The same library takes Flax NNX objects: a Module, an `nnx.Optimizer`, a
# tuple or dict of them, their `nnx.state`, or `nnx.split`'s pair; the result
# is the same kind, as new objects. A model with its optimizer is named like a
# Linen `TrainState` (`encoder/kernel`, `encoder/kernel/opt_state/0/mu`,
# `opt_state/0/count`, `step`), so with `vars_to_warm_start=[".*"]` and no
# rules the old Linen run's parameters, Adam moments and step carry over. The
# NNX twin of the old classifier has a `Dropout`, which keeps an RNG stream of
# its own: the Linen checkpoint has none, so the plan keeps it.


# %%
class NNXTextClassifier(nnx.Module):
  """The NNX twin of the old `TextClassifier` (same names and shapes), with Dropout before the head."""

  def __init__(self, vocab_size: int, num_classes: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, 8, rngs=rngs)
    self.encoder = nnx.Linear(8, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nnx.relu(self.encoder(self.embed(tokens).mean(axis=1)))
    return self.head(self.drop(x))


nnx_model = NNXTextClassifier(len(OLD_VOCAB), 2, nnx.Rngs(1))
nnx_optimizer = nnx.Optimizer(nnx_model, optax.adam(1e-2), wrt=nnx.Param)
everything = fws.WarmStartSettings(old_run, vars_to_warm_start=[".*"])
print(fws.plan((nnx_model, nnx_optimizer), everything))
warm_model, warm_optimizer = fws.warm_start((nnx_model, nnx_optimizer), everything)

# %% [markdown]
# The warm NNX model computes the old Linen model's logits (Dropout off in
# eval mode), and the optimizer continues from the old step with the old Adam
# moments. `nnx_model` itself is unchanged; to warm-start the objects you hold
# in place, `nnx.update` them with the result's state.

# %%
warm_model.eval()
np.testing.assert_allclose(warm_model(tokens), old_model.apply({"params": old_state.params}, tokens), rtol=1e-6)
assert int(warm_optimizer.step[...]) == int(old_state.step)
np.testing.assert_array_equal(
  warm_optimizer.opt_state[0].mu["head"]["kernel"][...], old_state.opt_state[0].mu["head"]["kernel"]
)

nnx.update((nnx_model, nnx_optimizer), nnx.state((warm_model, warm_optimizer)))  # in place, if you prefer
print("NNX model warm-started from the Linen checkpoint, at step", int(nnx_optimizer.step[...]))

# %% [markdown]
# And back: a checkpoint of `nnx.state((model, optimizer))` (or of
# `{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}`) warm-starts
# a Linen `TrainState` the same way.

# %%
nnx_run = os.path.join(workdir, "nnx_run")
with ocp.StandardCheckpointer() as ckptr:
  ckptr.save(nnx_run, nnx.state((warm_model, warm_optimizer)))
fresh = train_state.TrainState.create(
  apply_fn=old_model.apply, params=old_model.init(jax.random.key(2), tokens)["params"], tx=optax.adam(1e-2)
)
back = fws.warm_start(fresh, nnx_run, fws.WarmStartSettings(nnx_run, vars_to_warm_start=[".*"]))
np.testing.assert_allclose(back.apply_fn({"params": back.params}, tokens), warm_model(tokens), rtol=1e-6)
print("Linen TrainState warm-started from the NNX checkpoint, at step", back.step)

# %% [markdown]
# `plan.provenance()` is a small JSON record of where each leaf came from, to
# save with the next checkpoint (see the README). Clean up:

# %%
shutil.rmtree(workdir)
