"""Type aliases shared across the library (as flax's `typing.py`, optax's `_src/base.py`)."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import numpy as np

# A training state in any form the library takes: a TrainState, a Linen
# variables dict, a params tree, an NNX State or `nnx.split` pair, or any of
# these abstractly (`jax.ShapeDtypeStruct` leaves).
State = TypeVar("State")
# A checkpoint location: a local path or a URL that etils opens (`gs://...`).
PathLike = str | os.PathLike
Shape = tuple[int, ...]
DType = np.dtype
# A live leaf: a `jax.Array`, a `jax.ShapeDtypeStruct`, a numpy array or scalar.
Leaf = Any
