"""Vocabulary files and the old -> new row mapping, on the host with numpy.

Files are read as TensorFlow reads them (`TextFileLineIterator`): split on
`\\n`, one trailing `\\r` removed per line, no other stripping, a final newline
adds no line. An empty line, or a duplicate token among the old vocabulary's
considered lines, is an error naming the file, the line and the token.

What TensorFlow accepts but is most likely a mistake gives TensorFlow's result
and a WARNING (logged on the `flax_warmstart` logger when the mapping is built,
and kept in `VocabMapping.warnings`): a UTF-8 byte-order mark, which stays part
of the first token; carriage returns inside a line (CR-only line endings make
the whole file one line); tokens that differ only by surrounding whitespace; a
new vocabulary that shares no token with the old one; a `new_vocab_size`
larger than the new vocabulary file.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from flax_warmstart._src import tokenizer_vocab
from flax_warmstart._src.errors import WarmStartError
from flax_warmstart._src.settings import NEW_ROW_INITIALIZERS

# A path (text file, SentencePiece model, tokenizer.json) or tokens; also an in-memory tokenizer (tokenizer_vocab.py).
VocabSource = str | os.PathLike | Sequence[str]

logger = logging.getLogger("flax_warmstart")

BOM = "\ufeff"
# Whitespace (not a line break) at the start or end of a token, in the tokens joined by "\n".
# ASCII whitespace other than \n that may start or end a token (\r is reported on its own).
_EDGE_CHARS = " \t\f\v"


def _edge_space(tokens: Sequence[str], joined: str | None = None) -> bool:
  """Whether any token starts or ends with whitespace: numpy over the joined tokens' UTF-8 bytes.

  An edge character next to a line break or the text's ends (UTF-8 puts no
  ASCII byte inside a longer character). About 20x faster than a multiline
  regex on a million tokens, and 5x faster than `str.find` of each character
  beside a line break ("\n" starts every line, so `find` cannot skip).

  Args:
    tokens: The tokens.
    joined: `"\n".join(tokens)` when the caller has it.
  """
  text = np.frombuffer(("\n".join(tokens) if joined is None else joined).encode("utf-8", "surrogatepass"), np.uint8)
  if not text.size:
    return False
  edge, line = text == ord(_EDGE_CHARS[0]), text == 10
  for c in _EDGE_CHARS[1:]:
    edge |= text == ord(c)
  return bool(edge[0] or edge[-1] or np.any(edge[1:] & line[:-1]) or np.any(edge[:-1] & line[1:]))


def describe_source(source: VocabSource) -> str:
  """A short name for a vocabulary in messages: its path, `<N in-memory tokens>` or the tokenizer's."""
  if isinstance(source, str | os.PathLike):
    return os.fspath(source)
  if tokenizer_vocab.is_tokenizer(source):
    return tokenizer_vocab.describe_tokenizer(source)
  return f"<{len(source)} in-memory tokens>"


def read_vocab(source: VocabSource, *, size: int = -1, field: str = "vocabulary") -> list[str]:
  """Reads a vocabulary: a file path (any path etils can open), a token sequence or a tokenizer.

  A SentencePiece model or tokenizer.json file, or such a tokenizer in memory,
  gives its tokens in id order (see tokenizer_vocab.py).

  Args:
    source: A path (local, `gs://`, ...), a sequence of tokens, or a tokenizer.
    size: `-1` for every line, else only the first `size` lines (TensorFlow's
      `old_vocab_size`): lines after them are not checked.
    field: The setting that names `source` (`new_vocab`, `old_vocab`), for
      messages about tokenizers.

  Returns:
    The tokens, one per line (a tokenizer's in id order).

  Raises:
    WarmStartError: For a missing or empty file, an empty line among the lines
      read, or a `size` of 0, below -1, or beyond the number of lines; a
      tokenizer file its library cannot read.
    ImportError: For a tokenizer file whose extra is not installed.

  Examples:
    >>> read_vocab(["apple", "banana", "guava"], size=2)
    ['apple', 'banana']
  """
  where = describe_source(source)
  if size == 0 or size < -1:
    raise WarmStartError(
      f"old_vocab_size={size} for vocabulary {where}: use -1 for the whole file or a positive number of lines."
    )
  if isinstance(source, str | os.PathLike):
    path = epath.Path(source)
    if not path.exists():
      raise WarmStartError(f"Vocabulary file {where} does not exist.")
    if path.is_dir():
      raise WarmStartError(
        f"Vocabulary path {where} is a directory; new_vocab and old_vocab must name a file with one token per line."
      )
    try:
      data = path.read_bytes()
    except OSError as err:
      raise WarmStartError(f"Cannot read vocabulary file {where}: {err}") from None
    tokens = tokenizer_vocab.tokens_from_file(data, where, field=field)  # None: a text file
    if tokens is None:
      text = data.decode("utf-8", "surrogateescape")
      del data
      tokens = text.split("\n")
      if tokens and tokens[-1] == "":
        tokens.pop()  # A final newline ends the last line; it does not start one.
      if "\r" in text:
        tokens = [t[:-1] if t.endswith("\r") else t for t in tokens]
  elif tokenizer_vocab.is_tokenizer(source):
    tokens = tokenizer_vocab.tokens_from_tokenizer(source, field=field)
  else:
    tokens = list(source)
    bad = [t for t in tokens if not isinstance(t, str)]
    if bad:
      raise WarmStartError(f"Vocabulary {where} must hold str tokens; found {type(bad[0]).__name__} {bad[0]!r}.")
  if not tokens:
    raise WarmStartError(f"Vocabulary {where} is empty.")
  if size != -1:
    if size > len(tokens):
      raise WarmStartError(
        f"Invalid vocab_size in {where}: expected {size} lines (old_vocab_size) but the file has {len(tokens)}."
        + _cr_hint(tokens)
      )
    tokens = tokens[:size]
  if "" in tokens:
    line = tokens.index("") + 1
    raise WarmStartError(
      f"Invalid content in {where}: empty line found at line {line}. Every line must hold one token."
    )
  return tokens


def _cr_hint(tokens: Sequence[str]) -> str:
  """A hint for an error about a file's line count, when carriage returns may explain it."""
  if not any("\r" in t for t in tokens[:100]):
    return ""
  return " Its lines hold carriage returns (\\r): CR-only line endings make the whole file one line; use \\n."


def token_warnings(tokens: Sequence[str], source: str, *, joined: str | None = None) -> list[str]:
  """What looks wrong in a vocabulary that TensorFlow reads anyway.

  Args:
    tokens: The vocabulary's tokens (its lines).
    source: The vocabulary, for messages.
    joined: `"\n".join(tokens)` when the caller has it.

  Returns:
    One message per problem: a UTF-8 byte-order mark kept in the first token,
    carriage returns inside lines (CR-only line endings).

  Examples:
    >>> token_warnings(["\\ufeffapple", "banana"], "old.txt")[0][:60]
    'old.txt starts with a UTF-8 byte-order mark (BOM): as in Ten'
    >>> token_warnings(["apple", "banana"], "old.txt")
    []
  """
  out = []
  if tokens and tokens[0].startswith(BOM):
    out.append(
      f"{source} starts with a UTF-8 byte-order mark (BOM): as in TensorFlow, it stays part of the first token"
      f" {tokens[0]!r} (line 1), which then matches no token without it. Save the file as UTF-8 without a BOM"
      " (Python: encoding='utf-8', not 'utf-8-sig')."
    )
  joined = "\n".join(tokens) if joined is None else joined
  at = joined.find("\r")
  if at >= 0:
    line = joined.count("\n", 0, at)
    lines = "the whole file is one line" if len(tokens) == 1 else f"it has {len(tokens)} lines"
    out.append(
      f"{source}: line {line + 1} holds carriage returns (\\r) inside its token {reprlib.repr(tokens[line])}; the"
      f" file looks like it has CR-only (classic Mac) line endings. As in TensorFlow, only \\n ends a line (one \\r"
      f" before it is dropped), so {lines}. Convert its line endings to \\n."
    )
  return out


def token_index(tokens: Sequence[str], where: str) -> dict[str, int]:
  """Token -> line number; a duplicate token is an error naming both lines."""
  index = dict(zip(tokens, range(len(tokens)), strict=True))
  if len(index) != len(tokens):
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
      if tok in seen:
        raise WarmStartError(
          f"Duplicate token {tok!r} in old vocabulary {where}: lines {seen[tok] + 1} and {i + 1}."
          " Each old token must name one row of the checkpoint tensor."
        )
      seen[tok] = i
  return index


@dataclasses.dataclass(frozen=True, eq=False)
class VocabMapping:
  """Where each row (along the vocabulary axis) of a remapped variable comes from.

  Attributes:
    index: `int32 [rows]`: the old row copied into each new row, or -1.
    slot_index: As `index`, without donor tokens: what optimizer slots follow
      (new rows of slots start at zero).
    fill_index: `int32 [rows]`: for rows with `index == -1`, the row of the
      fill table (missing rows, then explicit vectors, then OOV rows).
    num_vocab_rows: Rows that are vocabulary entries; the rest are OOV.
    num_missing: New tokens with no old row, no donor and no explicit vector:
      the backup initializer fills them.
    explicit: `(row, vector)` for tokens given an explicit vector.
    copied: Rows copied from an old row of the same token.
    donated: Rows copied from a donor token's old row.
    oov: Out-of-vocabulary rows.
    dropped: Old vocabulary rows that no new row uses.
    old_rows_used: Number of old vocabulary lines considered.
    warnings: What looks wrong but does not stop the remap (TensorFlow accepts
      it): each was logged as a WARNING when the mapping was built.
  """

  index: np.ndarray
  slot_index: np.ndarray
  fill_index: np.ndarray
  num_vocab_rows: int
  num_missing: int
  explicit: tuple[tuple[int, np.ndarray], ...]
  copied: int
  donated: int
  oov: int
  dropped: int
  old_rows_used: int
  warnings: tuple[str, ...] = ()

  def stats(self) -> dict[str, int]:
    """The statistics: rows copied, donated, explicit, new (backup), OOV, old rows dropped.

    Examples:
      >>> m = build_mapping(new_tokens=["b", "z"], old_tokens=["a", "b"], num_rows=3,
      ...                   new_vocab_size=2, num_oov_buckets=1, where="x")
      >>> m.stats()
      {'copied': 1, 'donated': 0, 'explicit': 0, 'new': 1, 'oov': 1, 'dropped': 1}
    """
    return {
      "copied": self.copied,
      "donated": self.donated,
      "explicit": len(self.explicit),
      "new": self.num_missing,
      "oov": self.oov,
      "dropped": self.dropped,
    }


# The old vocabulary's lookup (`build_mapping`): tokens are matched by a 64-bit hash of their UTF-8 bytes, computed
# 8 bytes at a time with numpy, and every match is confirmed byte by byte, so the result is exactly a dict's. About
# 4x faster than building and probing a dict of a million fresh strings (their hashes are not cached yet).
_MIX = np.uint64(0x9E3779B97F4A7C15)
_HASH_MIN_TOKENS = 4096  # below this a dict is as fast
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclasses.dataclass(frozen=True, eq=False)
class _Hashed:
  """Tokens as one UTF-8 byte string, with each token's start, length and hash.

  Attributes:
    words: The bytes as overlapping little-endian 64-bit words (`words[i]`: the 8 bytes from byte `i`).
    starts: Each token's first byte.
    lengths: Its length in bytes.
    hashes: Each token's hash (equal tokens have equal hashes).
  """

  words: np.ndarray
  starts: np.ndarray
  lengths: np.ndarray
  hashes: np.ndarray

  @classmethod
  def of(cls, tokens: Sequence[str], joined: str | None = None) -> _Hashed | None:
    """The hashed tokens (`joined`: `"\n".join(tokens)` when the caller has it); None if a token holds a line break."""
    joined = "\n".join(tokens) if joined is None else joined
    blob = np.frombuffer(joined.encode("utf-8", "surrogatepass") + b"\n" + bytes(8), np.uint8)
    ends = np.flatnonzero(blob[:-8] == 10)
    if len(ends) != len(tokens):
      return None
    starts = np.empty_like(ends)
    starts[:1], starts[1:] = 0, ends[:-1] + 1
    lengths = ends - starts
    words = np.ndarray((len(blob) - 7,), np.dtype("<u8"), blob, strides=(1,))
    # Longest first: the tokens a byte offset reaches are a prefix, hashed without gathers.
    longest = int(lengths.max()) if len(tokens) else 0
    shorter = longest - lengths  # 0 for the longest: a radix sort when it fits 16 bits
    by_length = np.argsort(shorter.astype(np.uint16) if longest < 1 << 16 else shorter, kind="stable")
    sorted_starts, sorted_lengths = starts[by_length], lengths[by_length]
    mixed = sorted_lengths.astype(np.uint64) * _MIX
    for offset in range(0, int(sorted_lengths[0]) if len(tokens) else 0, 8):
      n = int(np.searchsorted(-sorted_lengths, -offset, side="left"))
      word = _word(words, sorted_starts[:n] + offset, sorted_lengths[:n] - offset)
      mixed[:n] = (mixed[:n] ^ word) * _MIX
      mixed[:n] ^= mixed[:n] >> np.uint64(29)
    hashes = np.empty_like(mixed)
    hashes[by_length] = mixed
    return cls(words, starts, lengths, hashes)


def _word(words: np.ndarray, at: np.ndarray, left: np.ndarray) -> np.ndarray:
  """The 8 bytes at `at`, those beyond a token's end (`left` bytes remain in it) zeroed."""
  shift = (64 - 8 * np.minimum(left, 8)).astype(np.uint64)
  return words[at] & (_ALL_ONES >> shift)


def _same_tokens(a: _Hashed, ia: np.ndarray, b: _Hashed, ib: np.ndarray) -> np.ndarray:
  """Whether token `ia[k]` of `a` and token `ib[k]` of `b` are the same bytes, for each k."""
  same = a.lengths[ia] == b.lengths[ib]
  lengths = a.lengths[ia]
  for offset in range(0, int(lengths.max()) if len(lengths) else 0, 8):
    k = np.flatnonzero(same & (lengths > offset))
    left = lengths[k] - offset
    same[k] = _word(a.words, a.starts[ia[k]] + offset, left) == _word(b.words, b.starts[ib[k]] + offset, left)
  return same


class _OldIndex:
  """The old vocabulary's token -> line lookup: `rows(tokens)` for many, `in` and `[]` for a few (donors).

  Tokens are matched by hash and confirmed byte by byte (see `_Hashed`); a
  dict (`token_index`) is built only where hashing does not apply: a small
  vocabulary, a token holding a line break, two old tokens with one hash (a
  duplicate, which `token_index` reports, or a collision), or a donor lookup.
  """

  def __init__(self, tokens: Sequence[str], source: str, *, joined: str | None = None) -> None:
    self.tokens, self.source, self._dict = tokens, source, None
    self._hashed = _Hashed.of(tokens, joined) if len(tokens) >= _HASH_MIN_TOKENS else None
    if self._hashed is not None:
      self._order = np.argsort(self._hashed.hashes)
      self._sorted = self._hashed.hashes[self._order]
      if np.any(self._sorted[1:] == self._sorted[:-1]):
        self._hashed = None
    if self._hashed is None:
      self._dict = token_index(tokens, source)

  @property
  def _by_token(self) -> dict[str, int]:
    if self._dict is None:
      self._dict = token_index(self.tokens, self.source)
    return self._dict

  def __contains__(self, token: str) -> bool:
    return token in self._by_token

  def __getitem__(self, token: str) -> int:
    return self._by_token[token]

  def rows(self, tokens: Sequence[str], *, joined: str | None = None) -> np.ndarray:
    """`int32`: each token's old line, or -1 (`joined`: `"\n".join(tokens)` when the caller has it)."""
    if not len(tokens):
      return np.zeros(0, np.int32)
    new = _Hashed.of(tokens, joined) if self._hashed is not None else None
    if new is not None:
      order = np.argsort(new.hashes)  # sorted needles: each search starts where the last one ended
      at = np.empty(len(order), np.intp)
      at[order] = np.minimum(np.searchsorted(self._sorted, new.hashes[order]), len(self._sorted) - 1)
      hit = np.flatnonzero(self._sorted[at] == new.hashes)
      old = self._order[at[hit]]
      # Old hashes are distinct and equal tokens hash alike: a token whose bytes differ (a collision) is not old.
      same = _same_tokens(new, hit, self._hashed, old)
      rows = np.full(len(tokens), -1, np.int32)
      rows[hit[same]] = old[same]
      return rows
    lookup = self._by_token.get
    return np.fromiter(map(lookup, tokens, itertools.repeat(-1)), np.int32, count=len(tokens))


def build_mapping(
  *,
  new_tokens: Sequence[str],
  old_tokens: Sequence[str],
  num_rows: int,
  new_vocab_size: int,
  num_oov_buckets: int,
  where: str,
  old_source: str = "the old vocabulary",
  new_source: str = "the new vocabulary",
  donors: Mapping[str, str] | None = None,
  vectors: Mapping[str, Any] | None = None,
  row_shape: tuple[int, ...] = (),
) -> VocabMapping:
  """Builds the row mapping of one variable, TensorFlow's `GenerateVocabRemapping`.

  Args:
    new_tokens: The new vocabulary (read whole).
    old_tokens: The old vocabulary's considered lines.
    num_rows: Size of the live variable along its vocabulary axis.
    new_vocab_size: How many leading new tokens are vocabulary rows.
    num_oov_buckets: OOV rows after them.
    where: The variable, for messages.
    old_source: The old vocabulary's file (or description), for messages.
    new_source: The new vocabulary's file (or description), for messages.
    donors: New token -> old token whose row it copies.
    vectors: New token -> explicit vector (shape `row_shape`).
    row_shape: Shape of one slice along the vocabulary axis.

  Returns:
    The `VocabMapping`.

  Raises:
    WarmStartError: For inconsistent sizes, too short a new vocabulary, unknown
      donor or explicit tokens, duplicate old tokens.

  Examples:
    >>> m = build_mapping(new_tokens=["orange", "guava", "banana", "apple", "raspberry"],
    ...                   old_tokens=["apple", "banana", "guava", "orange"], num_rows=5,
    ...                   new_vocab_size=5, num_oov_buckets=0, where="fruit_weights")
    >>> m.index.tolist()
    [3, 2, 1, 0, -1]
  """
  # Each vocabulary joined once: hashed for the lookup, searched for what to warn about.
  joined_new, joined_old = "\n".join(new_tokens), "\n".join(old_tokens)
  try:
    old_index = _OldIndex(old_tokens, old_source, joined=joined_old)
  except WarmStartError as err:
    raise WarmStartError([f"{where}: {p}" for p in err.problems]) from None
  n_load = min(num_rows, new_vocab_size)
  if n_load > len(new_tokens):
    raise WarmStartError(
      f"{where}: new vocabulary {new_source} has {len(new_tokens)} lines but {n_load} vocabulary rows need a token"
      " (lookup table size must be larger than last new vocab entry's line). Check new_vocab_size."
      + _cr_hint(new_tokens)
    )
  tokens = new_tokens[:n_load]
  joined_used = joined_new if n_load == len(new_tokens) else None
  index = old_index.rows(tokens, joined=joined_used)
  slot_index = index.copy()
  problems = []
  # Rows of each token (a token may repeat in the new vocabulary), built only
  # when donors or explicit vectors need it: one pass, not one per entry.
  rows_of: dict[str, list[int]] = {}
  if donors or vectors:
    for row, tok in enumerate(tokens):
      rows_of.setdefault(tok, []).append(row)
  donated = 0
  for tok, donor in (donors or {}).items():
    if tok not in rows_of:
      problems.append(f"{where}: donor entry for {tok!r}, which is not among the new vocabulary's {n_load} rows.")
    elif donor not in old_index:
      problems.append(f"{where}: donor token {donor!r} (for {tok!r}) is not in the old vocabulary.")
    elif index[rows_of[tok][0]] >= 0:
      problems.append(f"{where}: {tok!r} is in the old vocabulary already; it needs no donor {donor!r}.")
    else:
      index[rows_of[tok]] = old_index[donor]
      donated += len(rows_of[tok])
  explicit_rows: list[tuple[int, np.ndarray]] = []
  for tok, vector in (vectors or {}).items():
    vec = np.asarray(vector)
    if tok not in rows_of:
      problems.append(f"{where}: explicit vector for {tok!r}, which is not among the new vocabulary's {n_load} rows.")
    elif vec.shape != row_shape:
      problems.append(f"{where}: explicit vector for {tok!r} has shape {vec.shape}, expected {row_shape}.")
    elif index[rows_of[tok][0]] >= 0:
      problems.append(f"{where}: {tok!r} already gets a row from the old vocabulary; drop its explicit vector.")
    else:
      explicit_rows += [(r, vec) for r in rows_of[tok]]
  if problems:
    raise WarmStartError(problems, header="Invalid vocabulary remap")
  explicit_set = {r for r, _ in explicit_rows}
  missing = [r for r in np.flatnonzero(index < 0).tolist() if r not in explicit_set]
  num_oov = num_rows - n_load
  fill_index = np.zeros(num_rows, dtype=np.int32)
  fill_index[missing] = np.arange(len(missing), dtype=np.int32)
  for k, (r, _) in enumerate(explicit_rows):
    fill_index[r] = len(missing) + k
  fill_index[n_load:] = len(missing) + len(explicit_rows) + np.arange(num_oov, dtype=np.int32)
  full_index = np.concatenate([index, np.full(num_oov, -1, np.int32)])
  full_slot_index = np.concatenate([slot_index, np.full(num_oov, -1, np.int32)])
  used = np.zeros(len(old_tokens), dtype=bool)
  used[index[index >= 0]] = True
  copied = int(np.count_nonzero(slot_index >= 0))
  warnings = [f"{where}: new vocabulary {w}" for w in token_warnings(new_tokens, new_source, joined=joined_new)]
  warnings += [f"{where}: old vocabulary {w}" for w in token_warnings(old_tokens, old_source, joined=joined_old)]
  if new_vocab_size > len(new_tokens):
    warnings.append(
      f"{where}: new_vocab_size ({new_vocab_size}) is larger than new vocabulary {new_source} ({len(new_tokens)}"
      f" lines). TensorFlow accepts it, since this variable's {num_rows} rows need only its first {n_load} lines,"
      f" but then no row is an OOV row. If the file is complete, set new_vocab_size={len(new_tokens)} (and"
      " num_oov_buckets to the rows after it)."
    )
  if n_load and not copied and not donated:
    warnings.append(
      f"{where}: none of the {n_load} new vocabulary tokens used ({new_source}) is in the old vocabulary"
      f" ({old_source}, {len(old_tokens)} tokens considered): no row is copied from the checkpoint. Check that"
      " new_vocab and old_vocab are this variable's vocabularies, in the same tokenization."
    )
  if copied < n_load:
    warnings += _whitespace_warnings(
      tokens, index, old_tokens, where=where, new_source=new_source, joined=(joined_used, joined_old)
    )
  for warning in warnings:
    logger.warning("%s", warning)
  return VocabMapping(
    index=full_index,
    slot_index=full_slot_index,
    fill_index=fill_index,
    num_vocab_rows=n_load,
    num_missing=len(missing),
    explicit=tuple(explicit_rows),
    copied=copied,
    donated=donated,
    oov=num_oov,
    dropped=len(old_tokens) - int(used.sum()),
    old_rows_used=len(old_tokens),
    warnings=tuple(warnings),
  )


def _whitespace_warnings(
  tokens: Sequence[str],
  index: np.ndarray,
  old_tokens: Sequence[str],
  *,
  where: str,
  new_source: str,
  joined: tuple[str | None, str | None] = (None, None),
) -> list[str]:
  """A warning when new tokens without an old row match an old token once surrounding whitespace is stripped.

  TensorFlow compares whole lines, so `"apple "` is not `"apple"`. Cheap when
  no token has surrounding whitespace: one regex search over the joined tokens.
  """
  if not (_edge_space(tokens, joined[0]) or _edge_space(old_tokens, joined[1])):
    return []
  stripped = {}
  for i, tok in enumerate(old_tokens):
    stripped.setdefault(tok.strip(), i)
  pairs = [
    (tok, old_tokens[stripped[tok.strip()]])
    for tok, i in zip(tokens, index.tolist(), strict=True)
    if i < 0 and tok.strip() in stripped
  ]
  if not pairs:
    return []
  shown = ", ".join(f"{new!r} ~ {old!r}" for new, old in pairs[:3]) + (" ..." if len(pairs) > 3 else "")
  return [
    f"{where}: {len(pairs)} token(s) of new vocabulary {new_source} match an old token only when surrounding"
    f" whitespace is ignored ({shown}); as in TensorFlow, they are new rows. Strip the vocabulary files if the"
    " whitespace is not part of the tokens."
  ]


@dataclasses.dataclass(frozen=True, eq=False)
class Remap:
  """A planned vocabulary remap of one leaf.

  Attributes:
    info: The `VocabInfo`.
    mapping: The row mapping, built from the vocabularies.
    follows: For an optimizer slot, the parameter whose mapping it follows
      (its new rows start at zero, donors do not apply); None for the
      parameter itself.
  """

  info: Any
  mapping: VocabMapping
  follows: str | None = None

  @property
  def index(self) -> np.ndarray:
    """The old row of each new row, or -1."""
    return self.mapping.slot_index if self.follows else self.mapping.index


def plan_remap(
  name: str, source: str, shape: tuple[int, ...], old_shape: tuple[int, ...], info: Any
) -> tuple[Remap | None, list[str]]:
  """Validates a `VocabInfo` against both shapes and builds its mapping.

  Args:
    name: The live variable's name.
    source: The checkpoint tensor's name.
    shape: The live variable's shape.
    old_shape: The checkpoint tensor's shape.
    info: Its `VocabInfo`.

  Returns:
    `(remap, problems)`: the remap, or None with the problems found.
  """
  where = f"{name!r}" + (f" (checkpoint tensor {source!r})" if source != name else "")
  problems = []
  if not info.new_vocab or info.new_vocab_size < 1 or not info.old_vocab:
    problems.append(
      f"{where}: VocabInfo must provide all of new_vocab, new_vocab_size (> 0) and old_vocab; got"
      f" new_vocab={info.new_vocab!r}, new_vocab_size={info.new_vocab_size!r}, old_vocab={info.old_vocab!r}."
    )
  if info.num_oov_buckets < 0:
    problems.append(f"{where}: num_oov_buckets must be >= 0, but received {info.num_oov_buckets}.")
  init = info.backup_initializer
  if init is not None and not callable(init) and not isinstance(init, NEW_ROW_INITIALIZERS):
    problems.append(
      f"{where}: backup_initializer must be callable (key, shape, dtype) -> Array, MeanOfOldRows() or"
      f" MeanCovarianceOfOldRows(), instead of being {init!r} of type {type(init).__name__}."
    )
  axis = info.axis
  if len(shape) <= axis:
    problems.append(f"{where}: axis={axis} needs a variable of rank >= {axis + 1}, but its shape is {shape}.")
  elif len(old_shape) != len(shape):
    problems.append(f"{where}: the checkpoint tensor has shape {old_shape}, of another rank than the state's {shape}.")
  if problems:
    return None, problems
  rows, size, oov = shape[axis], info.new_vocab_size, info.num_oov_buckets
  if axis == 0 and rows > size + oov:
    problems.append(
      f"{where}: {rows} rows exceed new_vocab_size ({size}) + num_oov_buckets ({oov}) = {size + oov}."
      " Raise new_vocab_size or num_oov_buckets, or check the variable."
    )
  if axis == 1 and rows != size + oov:
    problems.append(
      f"{where}: expected dimension 1 of shape {shape} to be new_vocab_size ({size}) + num_oov_buckets ({oov})"
      f" = {size + oov}."
    )
  if axis == 0 and old_shape[1:] != shape[1:]:
    problems.append(
      f"{where}: the checkpoint tensor has shape {old_shape} and the state {shape}; with axis=0 only dimension 0"
      " (the vocabulary) may differ."
    )
  if axis == 1 and (old_shape[0] < shape[0] or old_shape[2:] != shape[2:]):
    problems.append(
      f"{where}: the checkpoint tensor has shape {old_shape} and the state {shape}; with axis=1 only dimension 1"
      " (the vocabulary) may differ, and the state may use fewer leading rows, not more."
    )
  tokens = {}
  for field, lines in (("new_vocab", -1), ("old_vocab", info.old_vocab_size if axis == 0 else -1)):
    try:
      tokens[field] = read_vocab(getattr(info, field), size=lines, field=field)
    except WarmStartError as err:
      problems += [f"{where}: {p}" for p in err.problems]
  if problems:
    return None, problems
  try:
    mapping = build_mapping(
      new_tokens=tokens["new_vocab"],
      old_tokens=tokens["old_vocab"],
      num_rows=rows,
      new_vocab_size=size,
      num_oov_buckets=oov,
      where=where,
      old_source=describe_source(info.old_vocab),
      new_source=describe_source(info.new_vocab),
      donors=info.donor_tokens,
      vectors=info.token_vectors,
      row_shape=shape[:axis] + shape[axis + 1 :],
    )
  except WarmStartError as err:
    return None, list(err.problems)
  top = int(mapping.index.max(initial=-1))
  if top >= old_shape[axis]:
    token = tokens["old_vocab"][top]
    problems.append(
      f"{where}: old vocabulary token {token!r} (line {top + 1} of {describe_source(info.old_vocab)}) names row"
      f" {top}, but the checkpoint tensor has only {old_shape[axis]} along axis {axis}. Check old_vocab and"
      " old_vocab_size."
    )
    return None, problems
  return Remap(info, mapping), problems
