"""A state that is not recognised is an error that says what was given and which forms work (issue 13, kind 6).

`None`, `()` and `{}` once came back silently; an `int`, `object()`, a `set`,
`bytes` or a `str` got `'': no tensor ''`; an `nnx.split` pair with another
model's graphdef came back mismatched; `[graphdef, state]` as a list was named
`1/...`. Every public function that takes a state now refuses each of these,
before anything is read.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_checkpoint
from flax import nnx

import flax_warmstart as fws


class Encoder(nnx.Module):
  def __init__(self, rngs):
    self.encoder = nnx.Linear(3, 4, rngs=rngs)


class Head(nnx.Module):
  def __init__(self, rngs):
    self.head = nnx.Linear(3, 4, rngs=rngs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return save_checkpoint(
    tmp_path_factory.mktemp("forms") / "ckpt", {"encoder": {"kernel": np.ones((3, 4), np.float32)}}
  )


GRAPHDEF, STATE = nnx.split(Encoder(nnx.Rngs(0)))
OTHER_GRAPHDEF, _ = nnx.split(Head(nnx.Rngs(0)))

# The state given, and what the message must say it was.
BAD = {
  "None": (None, "The state is None"),
  "()": ((), "an empty tuple"),
  "{}": ({}, "an empty dict"),
  "[]": ([], "an empty list"),
  "empty nnx.State": (nnx.State({}), "an empty State"),
  "int": (5, "a single value (int 5)"),
  "float": (0.5, "a single value (float 0.5)"),
  "object()": (object(), "a single value (an instance of object)"),
  "set": ({1, 2}, "a single value (a set of 2)"),
  "bytes": (b"ckpt", "a single value (bytes b'ckpt')"),
  "str": ("/runs/old", "a single value (str '/runs/old')"),
  "array": (jnp.ones(2), "a single value (a (2,) float32 array)"),
  "another model's graphdef": ((OTHER_GRAPHDEF, STATE), "pair does not belong together"),
  "[graphdef, state]": ([GRAPHDEF, STATE], "a list of 2 starting with an nnx.GraphDef"),
  "(graphdef, state, state)": ((GRAPHDEF, STATE, STATE), "a tuple of 3 starting with an nnx.GraphDef"),
  "graphdef alone": ((GRAPHDEF,), "holds an nnx.GraphDef outside nnx.split's (graphdef, state) pair"),
}

CALLS = {
  "variable_names": lambda state, ckpt: fws.variable_names(state),
  "plan": lambda state, ckpt: fws.plan(state, ckpt),
  "warm_start": lambda state, ckpt: fws.warm_start(state, ckpt),
  "init_from_checkpoint": lambda state, ckpt: fws.init_from_checkpoint(state, ckpt, {"/": "/"}),
  "warm_start_or_resume": lambda state, ckpt: fws.warm_start_or_resume(state, ckpt + "_no_run", ckpt),
  "execute": lambda state, ckpt: fws.execute(fws.plan({"encoder": {"kernel": jnp.zeros((3, 4))}}, ckpt), state),
}


@pytest.mark.parametrize("given", BAD)
@pytest.mark.parametrize("call", CALLS)
def test_unrecognised_state_is_an_error_naming_it_and_the_forms(ckpt, no_reads, call, given):
  state, said = BAD[given]
  with pytest.raises(fws.WarmStartError) as err:
    CALLS[call](state, ckpt)
  message = str(err.value)
  assert said in message, message
  # Which forms work (or, for a pair, how to give it).
  assert "nnx.split" in message, message
  if "pair does not belong" not in message:
    assert "TrainState" in message and "nnx.Optimizer" in message, message


def test_a_matching_pair_and_a_tuple_of_modules_are_accepted(ckpt):
  assert fws.variable_names((GRAPHDEF, STATE)) == ["encoder/bias", "encoder/kernel"]
  out = fws.warm_start((GRAPHDEF, STATE), ckpt, fws.WarmStartSettings(ckpt, vars_to_warm_start="encoder/kernel"))
  assert out[0] is GRAPHDEF and float(out[1]["encoder"]["kernel"][...].sum()) == 12.0
  # Two modules are no model-and-optimizer pair: named by their position.
  assert fws.variable_names((Encoder(nnx.Rngs(0)), Head(nnx.Rngs(0))))[:2] == ["0/encoder/bias", "0/encoder/kernel"]
