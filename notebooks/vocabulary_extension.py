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
# # Growing a language model's vocabulary with flax_warmstart
#
# A tiny next-word model is trained on a toy corpus. Then the language grows:
# new words appear, the vocabulary is re-sorted, and an out-of-vocabulary (OOV)
# bucket catches every word still unknown. With `fws.VocabInfo` for the
# embedding and for the output layer, the warm-started model
#
# * gives text made of old words **exactly** the old model's loss, and
# * learns the new words from a sensible start (the mean of the old rows),
#
# so, given only a little text of the new language, it stays ahead of a model
# trained from scratch. Everything runs on a CPU in a few seconds; the corpus
# is generated here (no downloads).

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
import matplotlib.pyplot as plt
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

print("flax_warmstart", fws.__version__, "| jax", jax.__version__, "| backend", jax.default_backend())

# %% [markdown]
# ## A toy language
#
# Sentences such as `the cat sat on a mat .` from a small grammar: each noun has
# its verbs, each verb its prepositions, each preposition its places. The
# second version of the language adds the nouns `bird` and `fox`, the verb
# `flew` and the place `tree`, and sometimes puts an adjective (`big`, `small`,
# `old`) before the noun; the adjectives are not in the new vocabulary either,
# they are read as the OOV token.

# %%
OLD_GRAMMAR = {
  "verbs": {
    "cat": ["sat", "slept", "hid"],
    "dog": ["ran", "slept", "ate"],
    "cow": ["ate", "walked"],
    "horse": ["ran", "walked"],
    "mouse": ["hid", "ran"],
    "duck": ["swam", "walked"],
  },
  "preps": {
    "sat": ["on", "by"],
    "slept": ["on", "in"],
    "ran": ["to", "in"],
    "walked": ["to", "by"],
    "ate": ["in", "by"],
    "swam": ["in"],
    "hid": ["under", "in"],
  },
  "places": {
    "on": ["mat", "bed"],
    "in": ["park", "box", "barn", "pond"],
    "by": ["door", "pond"],
    "to": ["park", "barn", "house"],
    "under": ["bed", "table"],
  },
  "adjectives": [],
}
NEW_GRAMMAR = {
  "verbs": {**OLD_GRAMMAR["verbs"], "bird": ["flew", "sat", "hid"], "fox": ["ran", "hid"]},
  "preps": {**OLD_GRAMMAR["preps"], "flew": ["to", "in"]},
  "places": {
    **OLD_GRAMMAR["places"],
    "in": ["park", "box", "barn", "pond", "tree"],
    "to": ["park", "barn", "house", "tree"],
  },
  "adjectives": ["big", "small", "old"],
}


def corpus(grammar: dict, sentences: int, seed: int) -> list[str]:
  """Words of `sentences` random sentences of `grammar`, one after the other."""
  rng = np.random.default_rng(seed)
  words = []
  for _ in range(sentences):
    noun = rng.choice(list(grammar["verbs"]))
    verb = rng.choice(grammar["verbs"][noun])
    prep = rng.choice(grammar["preps"][verb])
    adjective = [rng.choice(grammar["adjectives"])] if grammar["adjectives"] and rng.random() < 0.3 else []
    place = rng.choice(grammar["places"][prep])
    words += [rng.choice(["the", "a"]), *adjective, noun, verb, prep, rng.choice(["the", "a"]), place, "."]
  return [str(w) for w in words]


# The vocabulary the old model is trained with.
OLD_VOCAB = [".", "the", "a", "cat", "dog", "cow", "horse", "mouse", "duck", "sat", "slept", "ran", "walked", "ate"]
OLD_VOCAB += ["swam", "hid", "on", "in", "by", "to", "under", "mat", "bed", "park", "box", "barn", "pond", "door"]
OLD_VOCAB += ["house", "table"]
NEW_WORDS = ["bird", "fox", "flew", "tree"]
NEW_VOCAB = sorted(OLD_VOCAB + NEW_WORDS)  # Re-sorted: most old words move.
NUM_OOV = 1
print("old:", OLD_VOCAB)
print("new:", NEW_VOCAB, f"+ {NUM_OOV} OOV bucket")
print(" ".join(corpus(NEW_GRAMMAR, 4, seed=0)))

# %% [markdown]
# ## The model
#
# The embeddings of the previous 3 words are concatenated, go through one
# hidden layer, and a softmax over the vocabulary (OOV bucket included)
# predicts the next word. The output layer's kernel is `[hidden, vocab]`: its
# *columns* are tokens.

# %%
CONTEXT = 3


class TinyLM(nn.Module):
  """Previous CONTEXT words -> logits of the next word."""

  vocab_size: int  # Rows of the embedding and columns of the output: tokens + OOV buckets.

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, 16, name="embed")(context)
    x = nn.tanh(nn.Dense(32, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.vocab_size, name="out")(x)


def examples(words: list[str], vocab: list[str], num_oov: int = 0) -> tuple[jax.Array, jax.Array]:
  """Token ids (unknown words -> the OOV bucket), cut into (context, next word) pairs."""
  index = {w: i for i, w in enumerate(vocab)}
  if num_oov == 0:
    ids = np.array([index[w] for w in words])  # Every word must be known.
  else:
    ids = np.array([index.get(w, len(vocab)) for w in words])  # One bucket: every unknown word shares it.
  contexts = np.stack([ids[i : len(ids) - CONTEXT + i] for i in range(CONTEXT)], axis=1)
  return jnp.asarray(contexts), jnp.asarray(ids[CONTEXT:])


def loss_fn(params, apply_fn, contexts, targets):
  logits = apply_fn({"params": params}, contexts)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@jax.jit
def train_step(state, contexts, targets):
  loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, contexts, targets)
  return state.apply_gradients(grads=grads), loss


def new_state(vocab_size: int, seed: int, learning_rate: float) -> train_state.TrainState:
  """A freshly initialised model with a fresh Adam state."""
  model = TinyLM(vocab_size)
  params = model.init(jax.random.key(seed), jnp.zeros((1, CONTEXT), jnp.int32))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(learning_rate))


# %% [markdown]
# ## Train the old model and save it

# %%
old_x, old_y = examples(corpus(OLD_GRAMMAR, 1000, seed=1), OLD_VOCAB)
old = new_state(len(OLD_VOCAB), seed=0, learning_rate=1e-2)
for _ in range(300):
  old, loss = train_step(old, old_x, old_y)
print(f"old model after {int(old.step)} steps: training loss {float(loss):.4f}")

workdir = tempfile.mkdtemp(prefix="fws_vocab_")
old_run = os.path.join(workdir, "old_run")
with ocp.CheckpointManager(old_run) as mgr:
  mgr.save(int(old.step), args=ocp.args.StandardSave(old))

# %% [markdown]
# ## Warm-start the model with the new vocabulary
#
# Three variables depend on the vocabulary, each gets a `VocabInfo` with the
# old and new token lists (files work too, one token per line):
#
# | variable | shape | vocabulary axis |
# |---|---|---|
# | `embed/embedding` | `[vocab, 16]` | rows: `axis=0` |
# | `out/kernel` | `[32, vocab]` | columns: `axis=1` |
# | `out/bias` | `[vocab]` | `axis=0` |
#
# Rows (or columns) are matched by token, so the re-sorting is handled; the new
# words and the OOV bucket start at the mean of the old rows
# (`fws.MeanOfOldRows()`): a new word's embedding is an "average word", and its
# output column gives it an average word's score. The hidden layer does not
# depend on the vocabulary and is copied as it is.


# %%
def vocab_info(axis: int = 0, backup_initializer=None) -> fws.VocabInfo:
  return fws.VocabInfo(
    new_vocab=NEW_VOCAB,
    new_vocab_size=len(NEW_VOCAB),
    num_oov_buckets=NUM_OOV,
    old_vocab=OLD_VOCAB,
    backup_initializer=backup_initializer,
    axis=axis,
  )


NEW_ROWS = len(NEW_VOCAB) + NUM_OOV
settings = fws.WarmStartSettings(
  ckpt_to_initialize_from=old_run,
  var_name_to_vocab_info={
    "embed/embedding": vocab_info(axis=0, backup_initializer=fws.MeanOfOldRows()),
    "out/kernel": vocab_info(axis=1, backup_initializer=fws.MeanOfOldRows()),
    "out/bias": vocab_info(axis=0, backup_initializer=fws.MeanOfOldRows()),
  },
)
FINE_TUNE_LR = 3e-3
fresh = new_state(NEW_ROWS, seed=1, learning_rate=FINE_TUNE_LR)
plan = fws.plan(fresh.params, settings)
print(plan)
warm = fresh.replace(params=fws.warm_start(fresh.params, plan=plan))  # A fresh optimizer state.
for row in plan.leaves:
  if row.remap is not None:
    print(f"{row.name:16} {row.remap.mapping.stats()}")

# %% [markdown]
# ## Old text: exactly the old model's loss
#
# Every old token's embedding row, output column and bias moved to its new
# position, so on text made of old words the warm-started model computes the
# old model's logits, only in the new column order.
#
# **The softmax normalisation.** The loss also normalises over the new columns
# (the new words and the OOV bucket), which the old model did not have. Any
# probability given to them is taken away from the old words, so *no*
# initialisation that lets new words be predicted at all can keep the
# full-vocabulary loss unchanged. We choose to keep the useful initialisation
# (new columns = mean of the old ones) and compare the loss **restricted to the
# old tokens' logits** (a softmax over the old words' columns only): it equals
# the old loss exactly, and the full-vocabulary loss is that plus
# `-log P(some old word)`, the price of giving the new words a chance, which
# training on new text adjusts.
#
# The alternative, setting the new columns' kernel to zero and their bias to a
# huge negative number, keeps even the full-vocabulary loss unchanged (shown
# below), but then the new words start at probability 0: their loss is
# astronomical and Adam needs many steps to raise such a bias.

# %%
test_x, test_y = examples(corpus(OLD_GRAMMAR, 100, seed=2), OLD_VOCAB)  # Old words only, old ids.
old_loss = loss_fn(old.params, old.apply_fn, test_x, test_y)

# The same text in the new vocabulary's ids.
to_new = np.array([NEW_VOCAB.index(w) for w in OLD_VOCAB])
new_x, new_y = jnp.asarray(to_new[np.asarray(test_x)]), jnp.asarray(to_new[np.asarray(test_y)])

warm_logits = warm.apply_fn({"params": warm.params}, new_x)
old_logits = old.apply_fn({"params": old.params}, test_x)
np.testing.assert_allclose(warm_logits[:, to_new], old_logits, rtol=1e-5, atol=1e-5)  # Summation order differs.

restricted_loss = optax.softmax_cross_entropy_with_integer_labels(warm_logits[:, to_new], test_y).mean()
full_loss = loss_fn(warm.params, warm.apply_fn, new_x, new_y)
np.testing.assert_allclose(restricted_loss, old_loss, rtol=1e-6)
print(f"old model: {float(old_loss):.6f}   warm-started, over old tokens: {float(restricted_loss):.6f}")

# The full-vocabulary loss adds -log P(old word), averaged over the text.
p_old = jnp.exp(jax.nn.logsumexp(warm_logits[:, to_new], axis=1) - jax.nn.logsumexp(warm_logits, axis=1))
np.testing.assert_allclose(full_loss, restricted_loss - jnp.log(p_old).mean(), rtol=1e-5)
print(
  f"warm-started, over the whole new vocabulary: {float(full_loss):.6f} (mean P(old word) = {float(p_old.mean()):.5f})"
)

# %% [markdown]
# The alternative: zero output columns (no `backup_initializer` means zeros)
# and a bias of `-1e4` for the new words and the OOV bucket. `exp(-1e4)` is
# exactly 0 in float32, so the full-vocabulary loss is the old loss, and the
# new words cannot be predicted at all at first.

# %%
silent = fws.WarmStartSettings(
  ckpt_to_initialize_from=old_run,
  var_name_to_vocab_info={
    "embed/embedding": vocab_info(axis=0, backup_initializer=fws.MeanOfOldRows()),
    "out/kernel": vocab_info(axis=1),
    "out/bias": vocab_info(axis=0, backup_initializer=jax.nn.initializers.constant(-1e4)),
  },
)
silent_params = fws.warm_start(fresh.params, silent)
silent_loss = loss_fn(silent_params, warm.apply_fn, new_x, new_y)
np.testing.assert_allclose(silent_loss, old_loss, rtol=1e-6)
print(f"zero columns, bias -1e4, whole vocabulary: {float(silent_loss):.6f}")

# %% [markdown]
# ## New text: warm start against training from scratch
#
# Both models have the new architecture and a fresh Adam state; one starts
# from the warm-started weights, the other from its random initialisation.
# We train both on text of the new language (new words, unknown adjectives in
# the OOV bucket) and follow the loss on held-out text of the new language.

# %%
train_x, train_y = examples(corpus(NEW_GRAMMAR, 100, seed=3), NEW_VOCAB, NUM_OOV)  # A little new text.
eval_x, eval_y = examples(corpus(NEW_GRAMMAR, 200, seed=4), NEW_VOCAB, NUM_OOV)
STEPS = 100

# The new words' rows start at the mean of the old rows.
new_ids = [NEW_VOCAB.index(w) for w in NEW_WORDS] + [len(NEW_VOCAB)]
old_mean = old.params["embed"]["embedding"].mean(axis=0)
np.testing.assert_allclose(
  warm.params["embed"]["embedding"][np.array(new_ids)], np.tile(old_mean, (len(new_ids), 1)), rtol=1e-6
)

curves = {}
trained = {}
for name, state in [("warm start", warm), ("from scratch", new_state(NEW_ROWS, seed=1, learning_rate=FINE_TUNE_LR))]:
  losses = [float(loss_fn(state.params, state.apply_fn, eval_x, eval_y))]
  for _ in range(STEPS):
    state, _ = train_step(state, train_x, train_y)
    losses.append(float(loss_fn(state.params, state.apply_fn, eval_x, eval_y)))
  curves[name], trained[name] = losses, state
  print(f"{name:13} held-out loss: {losses[0]:.3f} at step 0, {losses[-1]:.3f} after {STEPS} steps")

# The alternative start that keeps even the full-vocabulary loss of old text: hopeless on new text.
print(
  f"zero columns, bias -1e4: held-out loss {float(loss_fn(silent_params, warm.apply_fn, eval_x, eval_y)):.0f} at step 0"
)

# The new words were trained from their initial rows, and the warm start is ahead.
assert not np.allclose(trained["warm start"].params["embed"]["embedding"][np.array(new_ids)], old_mean)
assert curves["warm start"][-1] < curves["from scratch"][-1]

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, losses in curves.items():
  ax.plot(losses, label=name)
ax.set_xlabel("training step on the new text")
ax.set_ylabel("held-out loss (nats per word)")
ax.set_title("Growing the vocabulary: warm start vs. from scratch")
ax.legend()
plt.show()

# %%
shutil.rmtree(workdir)
