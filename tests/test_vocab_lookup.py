"""The old vocabulary's lookup in `build_mapping` (flax_warmstart/_src/vocab.py: `_OldIndex`, `_Hashed`).

Large vocabularies are matched by a 64-bit hash of each token's UTF-8 bytes,
every match confirmed byte by byte: the result must be exactly a dict's,
whatever the tokens (non-ASCII, lone surrogates, long, line breaks inside),
and a hash collision must not match two different tokens.
"""

import itertools

import numpy as np
import pytest

from flax_warmstart._src import vocab
from flax_warmstart._src.errors import WarmStartError


@pytest.fixture
def hash_always(monkeypatch):
  monkeypatch.setattr(vocab, "_HASH_MIN_TOKENS", 0)


def _tokens(rng, n):
  alphabet = list("abcxyz _-\t") + ["é", "ß", "中", "🙂", "\udc80"]  # \udc80: a byte the file's UTF-8 lacked
  out = {"".join(rng.choice(alphabet, size=rng.integers(1, 30))) for _ in range(n)}
  out |= {"x" * k for k in range(1, 40)}  # every length across the 8-byte words
  return sorted(out)


def _reference(new, old):
  index = {}
  for i, tok in enumerate(old):
    index.setdefault(tok, i)
  return np.array([index.get(t, -1) for t in new], np.int32)


def test_hashed_lookup_equals_a_dict(hash_always):
  rng = np.random.default_rng(0)
  old = _tokens(rng, 3000)
  rng.shuffle(old)
  new = [old[i] for i in rng.choice(len(old), 2000)] + _tokens(np.random.default_rng(1), 500)  # repeats, unknowns
  rng.shuffle(new)
  table = vocab._OldIndex(old, "old.txt")
  assert table._hashed is not None and table._dict is None
  np.testing.assert_array_equal(table.rows(new), _reference(new, old))
  assert table.rows([]).shape == (0,)
  assert old[5] in table and table[old[5]] == 5  # a donor lookup builds the dict only then


def test_a_hash_collision_matches_nothing(hash_always, monkeypatch):
  """With a hash that only sees the length, same-length tokens collide: only equal bytes match."""
  of = vocab._Hashed.of

  def by_length(tokens, joined=None):
    hashed = of(tokens, joined)
    return (
      None
      if hashed is None
      else vocab._Hashed(hashed.words, hashed.starts, hashed.lengths, hashed.lengths.astype(np.uint64))
    )

  monkeypatch.setattr(vocab._Hashed, "of", by_length)
  table = vocab._OldIndex(["a", "bb", "ccc" * 5], "old.txt")
  assert table._hashed is not None
  np.testing.assert_array_equal(table.rows(["x", "bb", "cc", "ccc" * 5, "ccd" * 5]), [-1, 1, -1, 2, -1])


def test_duplicates_and_line_breaks_fall_back_to_the_dict(hash_always):
  with pytest.raises(WarmStartError, match=r"Duplicate token 'b' in old vocabulary old.txt: lines 2 and 4"):
    vocab._OldIndex(["a", "b", "c", "b"], "old.txt")
  table = vocab._OldIndex(["a", "b\nc", "d"], "old.txt")  # in memory, a token may hold a line break
  assert table._hashed is None
  np.testing.assert_array_equal(table.rows(["d", "b\nc", "b"]), [2, 1, -1])
  table = vocab._OldIndex(["a", "b", "c"], "old.txt")
  np.testing.assert_array_equal(table.rows(["c", "x\ny", "a"]), [2, -1, 0])


def test_build_mapping_is_the_same_either_way(monkeypatch):
  rng = np.random.default_rng(2)
  old = _tokens(rng, 6000) + ["apple"]
  new = [old[i] for i in rng.permutation(len(old))[:4000]] + [" apple", "new"]
  kwargs = dict(new_tokens=new, old_tokens=old, num_rows=len(new) + 2, new_vocab_size=len(new), num_oov_buckets=2)
  hashed = vocab.build_mapping(**kwargs, where="w")
  monkeypatch.setattr(vocab, "_HASH_MIN_TOKENS", 10**9)
  plain = vocab.build_mapping(**kwargs, where="w")
  for field in ("index", "slot_index", "fill_index"):
    np.testing.assert_array_equal(getattr(hashed, field), getattr(plain, field))
  assert hashed.stats() == plain.stats() and hashed.warnings == plain.warnings
  assert any("surrounding whitespace" in w for w in hashed.warnings)


@pytest.mark.parametrize("edge", list(" \t\f\v"))
def test_edge_space_finds_whitespace_at_either_end_of_any_token(edge):
  def naive(tokens):
    return any(t[:1] in " \t\f\v" and t[:1] or t[-1:] in " \t\f\v" and t[-1:] for t in tokens)

  base = ["apple", "中文", "b c", "\udc80x"]
  for where, tokens in itertools.product(range(len(base)), [lambda t: edge + t, lambda t: t + edge]):
    cases = list(base)
    cases[where] = tokens(cases[where])
    assert vocab._edge_space(cases) == naive(cases) is True
  assert vocab._edge_space(base) is False and vocab._edge_space([]) is False
