"""Model surgery in rename rules: `Take`, `Stack`, `Transpose`, `Reshape`, `Broadcast`.

Where a rename rule (or an `init_from_checkpoint` assignment) names the
checkpoint tensor a leaf loads from, it may instead give a transform whose
innermost argument is that name's template; transforms nest
(DESIGN.md, "Transforms"). Each is a small frozen value, named and
parameterised as its numpy counterpart (`numpy.take`, `numpy.stack`,
`numpy.transpose`, `numpy.reshape`, `numpy.broadcast_to`):

    rename_rules=[
      (r"layers_(\\d+)/(.*)", fws.Take(r"layers/\\2", axis=0, index=r"\\1")),   # one layer of a scanned stack
      (r"layers/(.*)", fws.Stack(r"layers_{i}/\\1", axis=0)),                # unrolled -> scanned
      (r"blocks/(.*)", fws.Take(r"blocks/\\1", axis=0, index=[0, 0, 1, 1])),  # depth growth
      (r"lm_head/kernel", fws.Transpose("wte/embedding")),                    # tied -> untied head
      (r"attn/query/kernel", fws.Reshape("attn/q_proj/kernel")),              # to the live shape
      (r"moe/experts/(.*)", fws.Broadcast(r"mlp/\\1", axis=0, noise=0.0)),     # dense -> experts
    ]

The plan resolves a transform against the checkpoint's metadata into a tree
of `Node`s with every shape known (`resolve`): a missing tensor, an index past
the stack, a result that is not the live leaf's shape is an error before any
read, naming the rule and both shapes. An optimizer slot follows its
parameter through the same tree; the copies a `Broadcast` or a repeated
`Take` index makes are new entries, which start at zero in a slot unless the
transform says `slots="copy"`. `flax_warmstart._src.chain` executes the tree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from flax_warmstart._src.errors import WarmStartError, did_you_mean

if TYPE_CHECKING:
  from flax_warmstart._src.naming import Variable
  from flax_warmstart._src.vocab import Remap

Shape = tuple[int, ...]
SLOTS = ("zeros", "copy")


class _Transform:
  """Shared behaviour: equality and hash by fields, the templates inside, `describe`."""

  source: Any

  def _key(self) -> tuple[Any, ...]:
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare)  # type: ignore[arg-type]

  def __eq__(self, other: object) -> bool:
    return type(self) is type(other) and self._key() == other._key()  # type: ignore[attr-defined]

  def __hash__(self) -> int:
    return hash((type(self).__name__, self._key()))

  def templates(self) -> Iterator[str]:
    """Every name template inside (the innermost sources, and `Take`'s index template)."""
    if isinstance(self.source, _Transform):
      yield from self.source.templates()
    elif isinstance(self.source, str):
      yield self.source

  def map_templates(self, fn: Callable[[str], str]) -> Any:
    """The same transform with `fn` applied to every name template inside."""
    source = self.source.map_templates(fn) if isinstance(self.source, _Transform) else fn(self.source)
    return dataclasses.replace(self, source=source)  # type: ignore[type-var]

  def inner(self) -> str:
    """The innermost template."""
    return self.source.inner() if isinstance(self.source, _Transform) else self.source

  def _check_source(self, problems: list[str]) -> None:
    if not isinstance(self.source, str | _Transform):
      problems.append(
        f"{type(self).__name__}.source must be a checkpoint name template (str) or another transform,"
        f" got {type(self.source).__name__} {self.source!r}."
      )

  def _raise(self, problems: list[str]) -> None:
    if problems:
      raise WarmStartError(problems, header=f"Invalid {type(self).__name__}")


def _axis_ok(axis: Any, problems: list[str], name: str) -> None:
  if not isinstance(axis, int) or isinstance(axis, bool):
    problems.append(f"{name}.axis must be an int, got {axis!r}.")


def _slots_ok(slots: Any, problems: list[str], name: str) -> None:
  if slots not in SLOTS:
    problems.append(
      f"{name}.slots must be one of {list(SLOTS)} (what new copies of an optimizer slot hold), got {slots!r}."
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Take(_Transform):
  """Entries along `axis` by index, as `numpy.take(source, index, axis)`.

  * An int index (or a template expanding to one, `r"\\1"`) takes one entry
    and drops the axis: one layer of a scanned stack (`nn.scan`,
    `nnx.scan`, MaxText's `scan_layers`; `axis=1` for `param_scan_axis=1`).
    Only that layer's slice of the stored tensor is read.
  * A list keeps the axis: new entry `k` is old entry `index[k]`, e.g.
    `[0, 0, 1, 1, 2, 2]` doubles a 3-layer stack (depth growth, as in
    progressive stacking, Gong et al., 2019). In an optimizer slot, an entry
    that repeats an earlier one is new and starts at zero unless
    `slots="copy"`.

  A vocabulary remap (`VocabInfo`) is a `Take` too, planned from the two
  vocabularies: its index has -1 for new rows, which are filled (`remap`).

  Attributes:
    source: The checkpoint name template (`re.Match.expand` syntax, and
      `{i}` inside a `Stack`), or another transform.
    axis: The axis taken along.
    index: An int, a template expanding to an int, or a sequence of ints.
    slots: What repeated entries of an optimizer slot hold: `"zeros"` or
      `"copy"`.
    remap: For a vocabulary gather only (set by the plan): its `VocabInfo`
      and row mapping; `index` is then the mapping's `int [new rows]` array.

  Raises:
    WarmStartError: For a bad source, axis, index or slots.

  Examples:
    >>> Take("layers/mlp/kernel", axis=0, index=3).describe()
    'take(axis=0, index=3)'
    >>> Take(r"layers/\\1", index=[0, 0, 1]) == Take(r"layers/\\1", index=(0, 0, 1))
    True
  """

  source: Any = None
  axis: int = 0
  index: Any = 0
  slots: str = "zeros"
  remap: Remap | None = dataclasses.field(default=None, kw_only=True, compare=False, repr=False)

  def __post_init__(self) -> None:
    if self.remap is not None:
      object.__setattr__(self, "index", self.remap.index)
      object.__setattr__(self, "axis", self.remap.info.axis)
      return
    problems: list[str] = []
    self._check_source(problems)
    _axis_ok(self.axis, problems, "Take")
    _slots_ok(self.slots, problems, "Take")
    index = self.index
    if isinstance(index, np.ndarray):
      index = index.tolist()
    if isinstance(index, Sequence) and not isinstance(index, str):
      if not index or not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in index):
        problems.append(
          f"Take.index must be an int, a template such as r'\\1', or a non-empty list of ints; got {self.index!r}."
        )
      else:
        object.__setattr__(self, "index", tuple(int(i) for i in index))
    elif isinstance(index, np.integer):
      object.__setattr__(self, "index", int(index))
    elif not isinstance(index, int | str) or isinstance(index, bool):
      problems.append(f"Take.index must be an int, a template such as r'\\1', or a list of ints; got {self.index!r}.")
    self._raise(problems)

  def _key(self) -> tuple[Any, ...]:
    if self.remap is not None:
      return (id(self.remap),)
    return (self.source, self.axis, self.index, self.slots)

  def templates(self) -> Iterator[str]:
    yield from super().templates()
    if isinstance(self.index, str):
      yield self.index

  def describe(self) -> str:
    if self.remap is not None:
      stats = self.remap.mapping.stats()
      return f"take(axis={self.axis}, {stats['copied']} copied, {stats['new']} new, {stats['oov']} OOV)"
    return f"take(axis={self.axis}, index={_short(self.index)})"


@dataclasses.dataclass(frozen=True, eq=False)
class Stack(_Transform):
  """Tensors stacked along a new axis, as `numpy.stack`: unrolled layers into a scanned stack.

  `source` is resolved once per position `i` of the new axis, `{i}` standing
  for it: `Stack(r"layers_{i}/\\1")` stacks `layers_0/...`, `layers_1/...`.
  Each layer is read straight into its slot of the output.

  Attributes:
    source: A template with `{i}`, or a transform whose templates have it.
    axis: Where the new axis goes.
    num: How many; by default the live leaf's size along `axis`.

  Raises:
    WarmStartError: For a bad source, axis or num, or a source without `{i}`.

  Examples:
    >>> Stack(r"layers_{i}/\\1", axis=0).describe()
    'stack(axis=0)'
  """

  source: Any = None
  axis: int = 0
  num: int | None = None

  def __post_init__(self) -> None:
    problems: list[str] = []
    self._check_source(problems)
    _axis_ok(self.axis, problems, "Stack")
    if self.num is not None and (not isinstance(self.num, int) or isinstance(self.num, bool) or self.num < 1):
      problems.append(f"Stack.num must be a positive int or None (the live leaf's size), got {self.num!r}.")
    if not problems and not any("{i}" in t for t in self.templates()):
      problems.append(
        f"Stack({self.inner()!r}) has no '{{i}}' in its template: write where the layer number goes,"
        " e.g. Stack(r'layers_{i}/\\1')."
      )
    self._raise(problems)

  def describe(self) -> str:
    return f"stack(axis={self.axis}{'' if self.num is None else f', num={self.num}'})"


@dataclasses.dataclass(frozen=True, eq=False)
class Transpose(_Transform):
  """Axes permuted, as `numpy.transpose(source, axes)`: a tied embedding `(V, H)` into a head kernel `(H, V)`.

  Also a PyTorch `[out, in]` weight into a Flax `[in, out]` kernel.

  Attributes:
    source: A template or a transform.
    axes: A permutation of the axes; None reverses them.

  Raises:
    WarmStartError: For a bad source or axes.

  Examples:
    >>> Transpose("wte/embedding").describe(), Transpose("x", axes=[0, 2, 1]).describe()
    ('transpose', 'transpose(axes=(0, 2, 1))')
  """

  source: Any = None
  axes: Sequence[int] | None = None

  def __post_init__(self) -> None:
    problems: list[str] = []
    self._check_source(problems)
    if self.axes is not None:
      if not isinstance(self.axes, Sequence) or not all(isinstance(a, int) for a in self.axes):
        problems.append(f"Transpose.axes must be a list of ints (a permutation) or None, got {self.axes!r}.")
      elif sorted(self.axes) != list(range(len(self.axes))):
        problems.append(f"Transpose.axes must be a permutation of 0..{len(self.axes) - 1}, got {list(self.axes)}.")
      else:
        object.__setattr__(self, "axes", tuple(self.axes))
    self._raise(problems)

  def describe(self) -> str:
    return "transpose" if self.axes is None else f"transpose(axes={tuple(self.axes)})"


@dataclasses.dataclass(frozen=True, eq=False)
class Reshape(_Transform):
  """The same entries in another shape, as `numpy.reshape` (C order): attention heads `[H, n*d]` <-> `[H, n, d]`.

  Attributes:
    source: A template or a transform.
    shape: The shape (one entry may be -1); by default the live leaf's.

  Raises:
    WarmStartError: For a bad source or shape.

  Examples:
    >>> Reshape("attn/q_proj/kernel").describe(), Reshape("x", shape=[4, -1]).describe()
    ('reshape', 'reshape(shape=(4, -1))')
  """

  source: Any = None
  shape: Sequence[int] | None = None

  def __post_init__(self) -> None:
    problems: list[str] = []
    self._check_source(problems)
    if self.shape is not None:
      ok = isinstance(self.shape, Sequence) and all(isinstance(d, int) and (d >= 0 or d == -1) for d in self.shape)
      if not ok or list(self.shape).count(-1) > 1:
        problems.append(f"Reshape.shape must be a list of sizes (at most one -1) or None, got {self.shape!r}.")
      else:
        object.__setattr__(self, "shape", tuple(self.shape))
    self._raise(problems)

  def describe(self) -> str:
    return "reshape" if self.shape is None else f"reshape(shape={tuple(self.shape)})"


@dataclasses.dataclass(frozen=True, eq=False)
class Broadcast(_Transform):
  """Copies along a new axis: a dense MLP into `num` experts (sparse upcycling, Komatsuzaki et al., 2022).

  Every expert is a copy of the dense tensor (as T5X's `UpcycleCheckpointer`
  does), optionally with relative Gaussian noise: expert `e` is
  `x * (1 + noise * N(0, 1))`, drawn independently per expert from the
  `rng` passed to `warm_start`. The dense tensor is read once. In an
  optimizer slot the experts are new: zeros, unless `slots="copy"` (copies,
  without noise).

  Attributes:
    source: A template or a transform.
    axis: Where the experts' axis goes.
    num: How many; by default the live leaf's size along `axis`.
    noise: The relative noise's standard deviation (0: exact copies).
    slots: `"zeros"` or `"copy"`.

  Raises:
    WarmStartError: For a bad source, axis, num, noise or slots.

  Examples:
    >>> Broadcast(r"mlp/\\1", axis=0, noise=0.01).describe()
    'broadcast(axis=0, noise=0.01)'
  """

  source: Any = None
  axis: int = 0
  num: int | None = None
  noise: float = 0.0
  slots: str = "zeros"

  def __post_init__(self) -> None:
    problems: list[str] = []
    self._check_source(problems)
    _axis_ok(self.axis, problems, "Broadcast")
    _slots_ok(self.slots, problems, "Broadcast")
    if self.num is not None and (not isinstance(self.num, int) or isinstance(self.num, bool) or self.num < 1):
      problems.append(f"Broadcast.num must be a positive int or None (the live leaf's size), got {self.num!r}.")
    if not isinstance(self.noise, int | float) or isinstance(self.noise, bool) or not self.noise >= 0:
      problems.append(f"Broadcast.noise must be a number >= 0 (a relative standard deviation), got {self.noise!r}.")
    self._raise(problems)

  def describe(self) -> str:
    num = "" if self.num is None else f", num={self.num}"
    noise = f", noise={self.noise}" if self.noise else ""
    return f"broadcast(axis={self.axis}{num}{noise})"


SPECS: dict[str, type[_Transform]] = {
  "take": Take,
  "stack": Stack,
  "transpose": Transpose,
  "reshape": Reshape,
  "broadcast": Broadcast,
}


def is_transform(value: Any) -> bool:
  """Whether a rule's right side is a transform (rather than a template or None)."""
  return isinstance(value, _Transform)


def _short(index: Any) -> str:
  if isinstance(index, tuple) and len(index) > 8:
    return f"[{', '.join(map(str, index[:6]))}, ... {len(index)} entries]"
  return repr(list(index)) if isinstance(index, tuple) else repr(index)


# -- plain data (JSON, YAML, Gin dicts) ---------------------------------------------------------------------------------


def to_data(spec: Any) -> Any:
  """A transform as plain data: `{"transpose": {"source": "wte/embedding"}}`; templates and None pass through.

  Examples:
    >>> to_data(Transpose(Take("layers/k", axis=0, index=2)))
    {'transpose': {'source': {'take': {'source': 'layers/k', 'index': 2}}}}
  """
  if not isinstance(spec, _Transform):
    return spec
  if isinstance(spec, Take) and spec.remap is not None:
    raise WarmStartError("A vocabulary Take is planned from a VocabInfo and is not written as a setting.")
  name = next(k for k, cls in SPECS.items() if type(spec) is cls)
  body: dict[str, Any] = {"source": to_data(spec.source)}
  for field in dataclasses.fields(spec):
    if field.name == "source" or not field.compare:
      continue
    value = getattr(spec, field.name)
    if value != field.default:
      body[field.name] = list(value) if isinstance(value, tuple) else value
  return {name: body}


def from_data(data: Any, where: str = "rename_rules") -> Any:
  """`to_data`'s inverse; also takes the short form `{"transpose": "wte/embedding"}`.

  Raises:
    WarmStartError: For an unknown transform or field, naming `where`.

  Examples:
    >>> from_data({"take": {"source": r"layers/\\1", "index": r"\\2"}})
    Take(source='layers/\\\\1', axis=0, index='\\\\2', slots='zeros')
    >>> from_data({"transpose": "wte/embedding"})
    Transpose(source='wte/embedding', axes=None)
  """
  if not isinstance(data, Mapping):
    return data
  if len(data) != 1:
    raise WarmStartError(
      f"{where}: a transform is written as one key, its name ({', '.join(SPECS)}), e.g."
      f" {{'transpose': {{'source': 'wte/embedding'}}}}; got {dict(data)!r}."
    )
  ((name, body),) = data.items()
  cls = SPECS.get(name)
  if cls is None:
    raise WarmStartError(
      f"{where}: unknown transform {name!r}.{did_you_mean(str(name), SPECS)} Known: {', '.join(SPECS)}."
    )
  if not isinstance(body, Mapping):
    body = {"source": body}
  fields = [f.name for f in dataclasses.fields(cls) if f.compare]
  unknown = [k for k in body if k not in fields]
  if unknown:
    raise WarmStartError(
      f"{where}: unknown {cls.__name__} field {unknown[0]!r}.{did_you_mean(unknown[0], fields)} Fields: {', '.join(fields)}."
    )
  kwargs = dict(body)
  kwargs["source"] = from_data(kwargs.get("source"), where)
  try:
    return cls(**kwargs)
  except WarmStartError as err:
    raise WarmStartError([f"{where}: {p}" for p in err.problems]) from err


# -- resolution against the checkpoint's metadata ------------------------------------------------------------------------


def expand(spec: Any, match: re.Match[str] | None) -> Any:
  """The transform with every template expanded against a rule's match (`\\1`, `\\g<name>`); `{i}` stays."""
  if match is None:
    return spec
  return _expand_nested_index(spec.map_templates(match.expand), match)


def _expand_nested_index(spec: Any, match: re.Match[str]) -> Any:
  if not isinstance(spec, _Transform):
    return spec
  source = _expand_nested_index(spec.source, match)
  if isinstance(spec, Take) and isinstance(spec.index, str):
    spec = dataclasses.replace(spec, index=match.expand(spec.index))
  return dataclasses.replace(spec, source=source) if source is not spec.source else spec


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
  """A resolved transform: an operation with its inputs and the shape and dtype it gives.

  Attributes:
    op: `"read"` (a checkpoint tensor, or one slice of it), `"zeros"` (new
      entries of an optimizer slot), `"take"`, `"stack"`, `"transpose"`,
      `"reshape"`, `"broadcast"`.
    shape: The shape it gives.
    dtype: The dtype it gives (the checkpoint's; the chain's `Cast` is last).
    args: Its inputs.
    name: For `read`: the checkpoint tensor.
    region: For `read`: `(start, stop)` per axis of the tensor, or None for
      all of it.
    squeeze: For `read`: the axes of the region dropped (a `Take` of one
      index pushed into the read, so only that slice is read).
    axis: The axis of `take`, `stack`, `broadcast`.
    param: `take`: the index (tuple); `transpose`: the permutation;
      `broadcast`: the noise.
    zero: For `take` in a slot: which new entries are zero (repeats).
  """

  op: str
  shape: Shape
  dtype: np.dtype
  args: tuple[Node, ...] = ()
  name: str | None = None
  region: tuple[tuple[int, int], ...] | None = None
  squeeze: tuple[int, ...] = ()
  axis: int = 0
  param: Any = None
  zero: tuple[bool, ...] | None = None

  def inputs(self) -> tuple[str, ...]:
    """The checkpoint tensors read, in order."""
    if self.op == "read":
      return (self.name,)  # type: ignore[return-value]
    return tuple(dict.fromkeys(n for a in self.args for n in a.inputs()))

  def reads(self) -> Iterator[tuple[str, Any, int]]:
    """`(tensor, region, bytes)` for every read: only the slices and rows a leaf needs."""
    if self.op == "read":
      size = math.prod(self.shape) * self.dtype.itemsize
      yield self.name, self.region, size  # type: ignore[misc]
    elif self.op == "take" and self.args[0].op == "read" and self.args[0].region is None:
      child = self.args[0]
      rows = sorted(set(self.param))
      row_bytes = math.prod(d for k, d in enumerate(child.shape) if k != self.axis) * child.dtype.itemsize
      yield child.name, ("rows", self.axis, tuple(rows)), len(rows) * row_bytes  # type: ignore[misc]
    else:
      for a in self.args:
        yield from a.reads()

  def describe(self) -> str:
    """The chain with the shapes through it: `wte/embedding (50, 8) -> transpose (8, 50)`."""
    if self.op == "read":
      if self.region is None:
        return f"{self.name} {self.shape}"
      # Only this slice is read: numpy's index of it, ':' for a whole axis.
      index = ", ".join(str(a) if k in self.squeeze else ":" for k, (a, b) in enumerate(self.region))
      return f"{self.name}[{index}] {self.shape}"
    if self.op == "zeros":
      return f"zeros {self.shape}"
    if self.op == "stack":
      first, last = self.args[0].describe(), self.args[-1].inputs()
      return f"stack(axis={self.axis}) of {len(self.args)} [{first} ... {last[-1] if last else ''}] -> {self.shape}"
    if self.op == "take":
      what = f"take(axis={self.axis}, index={_short(self.param)})"
    elif self.op == "transpose":
      what = f"transpose{tuple(self.param)}"
    elif self.op == "broadcast":
      what = f"broadcast(axis={self.axis}, {self.shape[self.axis]}" + (f", noise={self.param})" if self.param else ")")
    else:
      what = self.op
    return f"{self.args[0].describe()} -> {what} {self.shape}"

  def key(self) -> tuple[Any, ...]:
    """The structure (ops, shapes, parameters), without tensor names: one compiled function per key."""
    zero = None if self.zero is None else tuple(self.zero)
    return (self.op, self.shape, str(self.dtype), self.axis, self.param, self.region is None, self.squeeze, zero,
            tuple(a.key() for a in self.args))  # fmt: skip


def _norm_axis(axis: int, ndim: int) -> int | None:
  return axis + ndim if -ndim <= axis < 0 else (axis if 0 <= axis < ndim else None)


def resolve(
  spec: Any,
  ckpt: Mapping[str, Variable],
  *,
  expected: Shape | None,
  slot: bool,
  where: str,
  problems: list[str],
  subs: str | None = None,
) -> Node | None:
  """Resolves an expanded transform (or template) against the checkpoint's metadata.

  Args:
    spec: A template or a transform, its templates expanded (`expand`).
    ckpt: The checkpoint's variables.
    expected: The shape the result must have (the live leaf's), where known:
      it gives `Stack`'s and `Broadcast`'s `num` and `Reshape`'s shape.
    slot: Whether the leaf is an optimizer slot (new copies become zeros).
    where: The rule and leaf, for messages.
    problems: Where problems go.
    subs: The `{i}` of an enclosing `Stack`.

  Returns:
    The node, or None after recording a problem.
  """
  if isinstance(spec, str):
    name = spec if subs is None else spec.replace("{i}", subs)
    found = ckpt.get(name)
    if found is None:
      problems.append(f"{where}: no tensor {name!r} in the checkpoint.{did_you_mean(name, ckpt)}")
      return None
    if found.shape is None or found.dtype is None:
      problems.append(f"{where}: checkpoint entry {name!r} is not an array ({found.label}); transforms take arrays.")
      return None
    return Node("read", tuple(found.shape), np.dtype(found.dtype), name=name)
  kind = type(spec).__name__
  if isinstance(spec, Stack | Broadcast):
    num = spec.num
    if num is None and expected is not None and _norm_axis(spec.axis, len(expected)) is not None:
      num = expected[_norm_axis(spec.axis, len(expected))]  # type: ignore[index]
    if num is None:
      problems.append(f"{where}: {kind}.num is needed here (the live shape does not give it); pass num=.")
      return None
    inner_expected = None
    if expected is not None and (a := _norm_axis(spec.axis, len(expected))) is not None:
      inner_expected = expected[:a] + expected[a + 1 :]
    if isinstance(spec, Broadcast) and slot and spec.slots == "zeros":
      child = resolve(spec.source, ckpt, expected=inner_expected, slot=slot, where=where, problems=problems, subs=subs)
      if child is None:
        return None
      axis = _norm_axis(spec.axis, len(child.shape) + 1)
      if axis is None:
        problems.append(f"{where}: {spec.describe()} on shape {child.shape}: axis {spec.axis} is out of range.")
        return None
      return Node("zeros", child.shape[:axis] + (num,) + child.shape[axis:], child.dtype)
    if isinstance(spec, Stack):
      children, missing = [], []
      for i in range(num):
        found: list[str] = []
        child = resolve(spec.source, ckpt, expected=inner_expected, slot=slot, where=where, problems=found, subs=str(i))
        if child is None:
          missing.append((i, found))
        else:
          children.append(child)
      if missing:
        shown = ", ".join(str(i) for i, _ in missing[:10]) + (" ..." if len(missing) > 10 else "")
        problems.append(
          f"{where}: {spec.describe()} of {num} needs every layer, but {len(missing)} cannot be read"
          f" (i = {shown}): {missing[0][1][0].split(': ', 1)[-1]}"
        )
        return None
      shapes = {(c.shape, str(c.dtype)) for c in children}
      if len(shapes) > 1:
        problems.append(f"{where}: {spec.describe()} needs layers of one shape and dtype, got {sorted(shapes)[:3]}.")
        return None
      base = children[0]
      axis = _norm_axis(spec.axis, len(base.shape) + 1)
      if axis is None:
        problems.append(f"{where}: {spec.describe()} of shape {base.shape}: axis {spec.axis} is out of range.")
        return None
      return Node("stack", base.shape[:axis] + (num,) + base.shape[axis:], base.dtype, tuple(children), axis=axis)
    child = resolve(spec.source, ckpt, expected=inner_expected, slot=slot, where=where, problems=problems, subs=subs)
    if child is None:
      return None
    axis = _norm_axis(spec.axis, len(child.shape) + 1)
    if axis is None:
      problems.append(f"{where}: {spec.describe()} of shape {child.shape}: axis {spec.axis} is out of range.")
      return None
    noise = 0.0 if slot else float(spec.noise)
    return Node(
      "broadcast", child.shape[:axis] + (num,) + child.shape[axis:], child.dtype, (child,), axis=axis, param=noise
    )
  if isinstance(spec, Transpose):
    inner_expected = None
    if expected is not None and spec.axes is not None and len(spec.axes) == len(expected):
      inverse = np.argsort(spec.axes)
      inner_expected = tuple(expected[int(k)] for k in inverse)
    elif expected is not None and spec.axes is None:
      inner_expected = tuple(reversed(expected))
    child = resolve(spec.source, ckpt, expected=inner_expected, slot=slot, where=where, problems=problems, subs=subs)
    if child is None:
      return None
    axes = tuple(reversed(range(len(child.shape)))) if spec.axes is None else tuple(spec.axes)
    if len(axes) != len(child.shape):
      problems.append(
        f"{where}: {spec.describe()} of shape {child.shape}: axes {axes} do not match its {len(child.shape)} axes."
      )
      return None
    return Node("transpose", tuple(child.shape[a] for a in axes), child.dtype, (child,), param=axes)
  if isinstance(spec, Reshape):
    child = resolve(spec.source, ckpt, expected=None, slot=slot, where=where, problems=problems, subs=subs)
    if child is None:
      return None
    shape = spec.shape if spec.shape is not None else expected
    if shape is None:
      problems.append(f"{where}: {spec.describe()} needs shape= here (the live shape does not give it).")
      return None
    size = math.prod(child.shape)
    if -1 in shape:
      rest = math.prod(d for d in shape if d != -1)
      if rest == 0 or size % rest:
        problems.append(
          f"{where}: {spec.describe()} cannot reshape {child.shape} ({size} entries) into {tuple(shape)}."
        )
        return None
      shape = tuple(size // rest if d == -1 else d for d in shape)
    if math.prod(shape) != size:
      problems.append(
        f"{where}: {spec.describe()} cannot reshape {child.shape} ({size} entries) into {tuple(shape)}"
        f" ({math.prod(shape)} entries)."
      )
      return None
    return Node("reshape", tuple(shape), child.dtype, (child,))
  if isinstance(spec, Take):
    child = resolve(spec.source, ckpt, expected=None, slot=slot, where=where, problems=problems, subs=subs)
    if child is None:
      return None
    axis = _norm_axis(spec.axis, len(child.shape))
    if axis is None:
      problems.append(f"{where}: {spec.describe()} of shape {child.shape}: axis {spec.axis} is out of range.")
      return None
    n = child.shape[axis]
    index = spec.index
    if isinstance(index, str):
      text = index if subs is None else index.replace("{i}", subs)
      try:
        index = int(text)
      except ValueError:
        problems.append(f"{where}: {spec.describe()}: the index template gives {text!r}, not an int.")
        return None
    if isinstance(index, int):
      if not -n <= index < n:
        problems.append(
          f"{where}: {spec.describe()}: index {index} is past the {n} entries of axis {axis} of"
          f" {child.inputs()[0]!r} {child.shape}."
        )
        return None
      index %= n
      shape = child.shape[:axis] + child.shape[axis + 1 :]
      if child.op == "read" and child.region is None:  # only that slice is read
        region = tuple((index, index + 1) if k == axis else (0, d) for k, d in enumerate(child.shape))
        return Node("read", shape, child.dtype, name=child.name, region=region, squeeze=(axis,))
      return Node("take", shape, child.dtype, (child,), axis=axis, param=index)
    bad = [i for i in index if not -n <= i < n]
    if bad:
      problems.append(
        f"{where}: {spec.describe()}: index {bad[0]} is past the {n} entries of axis {axis} of"
        f" {child.inputs()[0]!r} {child.shape}."
      )
      return None
    index = tuple(i % n for i in index)
    zero = None
    if slot and spec.slots == "zeros":
      seen: set[int] = set()
      zero = tuple(i in seen or seen.add(i) for i in index)  # type: ignore[func-returns-value]
      zero = zero if any(zero) else None
    shape = child.shape[:axis] + (len(index),) + child.shape[axis + 1 :]
    return Node("take", shape, child.dtype, (child,), axis=axis, param=index, zero=zero)
  problems.append(f"{where}: {spec!r} is not a checkpoint name or a transform.")
  return None


def shape_hint(live: Shape, found: Shape, source: str) -> str:
  """For a shape mismatch: the transform that probably fits, in words (or the vocabulary hint).

  Examples:
    >>> shape_hint((4, 8), (24, 4, 8), "layers/k")
    " It looks stacked over 24 layers along axis 0: load one with fws.Take('layers/k', axis=0, index=...) (e.g. index=r'\\\\1' from the rule's layer number)."
    >>> shape_hint((8, 4), (4, 8), "emb")
    " It looks transposed: fws.Transpose('emb')."
  """
  live, found = tuple(live), tuple(found)
  if len(found) == len(live) + 1:
    for a in range(len(found)):
      if found[:a] + found[a + 1 :] == live:
        return (
          f" It looks stacked over {found[a]} layers along axis {a}: load one with"
          f" fws.Take({source!r}, axis={a}, index=...) (e.g. index=r'\\1' from the rule's layer number)."
        )
  if len(live) == len(found) + 1:
    for a in range(len(live)):
      if live[:a] + live[a + 1 :] == found:
        return (
          f" The state has one more axis ({live[a]} at axis {a}): fws.Broadcast({source!r}, axis={a}) copies it"
          f" (experts), fws.Stack(...) stacks {live[a]} tensors (layers)."
        )
  if len(live) == len(found) and live != found and sorted(live) == sorted(found):
    if len(live) == 2 or live == tuple(reversed(found)):
      return f" It looks transposed: fws.Transpose({source!r})."
    used: set[int] = set()
    axes = []
    for d in live:
      k = next(k for k, e in enumerate(found) if e == d and k not in used)
      used.add(k)
      axes.append(k)
    return f" It looks transposed: fws.Transpose({source!r}, axes={axes})."
  if math.prod(live) == math.prod(found):
    return f" It has the same number of entries: fws.Reshape({source!r}) if the layout is C order."
  if len(live) == len(found):
    differ = [d for d in range(len(live)) if live[d] != found[d]]
    if len(differ) == 1:
      a = differ[0]
      return (
        f" Only axis {a} differs ({found[a]} -> {live[a]}): give it a VocabInfo if its rows are a vocabulary, or"
        f" fws.Take({source!r}, axis={a}, index=[...]) to choose entries (e.g. layers, for depth growth)."
      )
  return " Leave it out of vars_to_warm_start, or give it a VocabInfo if its rows are a vocabulary."
