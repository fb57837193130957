"""Tokenizer vocabularies (flax_warmstart/_src/tokenizer_vocab.py): SentencePiece models and tokenizer.json files.

Tiny tokenizers are built offline in `tmp_path`: SentencePiece models trained
on a few lines, `tokenizers` WordLevel and BPE models from explicit
vocabularies. Rows must follow tokens: the old row of token `t` lands at `t`'s
new id, read from real Orbax checkpoints.
"""

import io
import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import run_cli, save_checkpoint

import flax_warmstart as fws
from flax_warmstart._src import tokenizer_vocab as tv
from flax_warmstart._src.serialize import settings_from_dict, settings_to_dict
from flax_warmstart._src.vocab import build_mapping, describe_source, plan_remap, read_vocab

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

EMBED = "embedder/embedding"
WIDTH = 3
CORPUS_OLD = [
  "the quick brown fox jumps over the lazy dog",
  "hello world, the world is big and the dog is lazy",
  "a fox and a dog walk over the hill",
] * 10
CORPUS_NEW = [
  "the lazy cat sleeps on the warm mat",
  "hello cat, the world is big and the mat is warm",
  "a cat and a dog walk over the hill",
] * 10


def train_spm(lines, vocab_size):
  """The bytes of a SentencePiece unigram model trained on `lines`."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_writer=out,
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    model_type="unigram",
    minloglevel=2,
  )
  return out.getvalue()


def sp_pieces(data):
  sp = spm.SentencePieceProcessor(model_proto=data)
  return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
  """(old.model, new.model): two SentencePiece models of different corpora, sharing some pieces."""
  root = tmp_path_factory.mktemp("spm")
  old, new = root / "old.model", root / "new.model"
  old.write_bytes(train_spm(CORPUS_OLD, 40))
  new.write_bytes(train_spm(CORPUS_NEW, 44))
  return str(old), str(new)


def word_level(vocab, added=(), special=()):
  """A `tokenizers` WordLevel tokenizer with `vocab` ({token: id}), then added and special tokens."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  if added:
    tok.add_tokens(list(added))
  if special:
    tok.add_special_tokens(list(special))
  return tok


def bpe():
  """A `tokenizers` BPE tokenizer from an explicit vocabulary and merges, with one added special token."""
  vocab = {"[UNK]": 0, "c": 1, "a": 2, "t": 3, "d": 4, "o": 5, "g": 6, "ca": 7, "cat": 8, "do": 9, "dog": 10}
  merges = [("c", "a"), ("ca", "t"), ("d", "o"), ("do", "g")]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<mask>"])
  return tok


class FastTokenizer:
  """A transformers-style fast tokenizer: a wrapper whose `backend_tokenizer` is the `tokenizers.Tokenizer`."""

  def __init__(self, backend):
    self._backend = backend

  @property
  def backend_tokenizer(self):
    return self._backend


class SlowTokenizer:
  """A transformers-style slow tokenizer: ids to tokens, no backend."""

  def convert_ids_to_tokens(self, ids):
    return [f"t{i}" for i in ids]


def old_table(n):
  """An `[n, WIDTH]` table whose row i is i + 1 (no row is zero)."""
  return (np.arange(n, dtype=np.float32)[:, None] + 1) * np.ones((1, WIDTH), np.float32)


def warm(tmp_path, old_tokens, info, rows):
  """Warm-starts a zero `[rows, WIDTH]` embedding from a real checkpoint of `old_table(len(old_tokens))`."""
  old = old_table(len(old_tokens))
  ckpt = save_checkpoint(tmp_path / "ckpt", {"embedder": {"embedding": jnp.asarray(old)}})
  live = {"embedder": {"embedding": jnp.zeros((rows, WIDTH), jnp.float32)}}
  out = fws.warm_start(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMBED: info}))
  return old, np.asarray(out["embedder"]["embedding"])


def assert_rows_follow_tokens(out, old, new_tokens, old_tokens, n_vocab):
  """Row i of `out` is the old row of token new_tokens[i] (zero when it is new); rows from n_vocab on are zero."""
  where = {t: i for i, t in enumerate(old_tokens)}
  copied = 0
  for i, tok in enumerate(new_tokens[:n_vocab]):
    want = old[where[tok]] if tok in where else np.zeros(WIDTH, np.float32)
    copied += tok in where
    np.testing.assert_array_equal(out[i], want, err_msg=f"row {i} ({tok!r})")
  np.testing.assert_array_equal(out[n_vocab:], 0)
  return copied


# --------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_model_gives_pieces_in_id_order(spm_files):
  old, _ = spm_files
  with open(old, "rb") as f:
    pieces = sp_pieces(f.read())
  assert read_vocab(old) == pieces
  assert pieces[:3] == ["<unk>", "<s>", "</s>"]
  assert read_vocab(old, size=5) == pieces[:5]  # old_vocab_size: a prefix, as for a text file


def test_sentencepiece_rows_follow_tokens(tmp_path, spm_files):
  old_path, new_path = spm_files
  old_tokens, new_tokens = read_vocab(old_path), read_vocab(new_path)
  shared = set(old_tokens) & set(new_tokens)
  assert 5 < len(shared) < len(new_tokens)  # some pieces move, some are new
  assert any(old_tokens.index(t) != new_tokens.index(t) for t in shared)
  rows = len(new_tokens) + 2  # two OOV rows
  old, out = warm(tmp_path, old_tokens, fws.VocabInfo(new_path, len(new_tokens), 2, old_path), rows)
  assert assert_rows_follow_tokens(out, old, new_tokens, old_tokens, len(new_tokens)) == len(shared)


def test_sentencepiece_processor_in_memory(tmp_path, spm_files):
  old_path, new_path = spm_files
  old_sp, new_sp = (spm.SentencePieceProcessor(model_file=p) for p in spm_files)
  info = fws.VocabInfo(new_sp, 20, 0, old_sp, old_vocab_size=30)
  assert info.new_vocab is new_sp and info.old_vocab is old_sp
  assert describe_source(new_sp) == f"<SentencePieceProcessor, {new_sp.get_piece_size()} pieces>"
  assert read_vocab(new_sp) == read_vocab(new_path)
  old_tokens = read_vocab(old_path)
  old, out = warm(tmp_path, old_tokens, info, 20)
  # new_vocab_size and old_vocab_size take the first ids, as they take a text file's first lines.
  assert_rows_follow_tokens(out, old, read_vocab(new_path), old_tokens[:30], 20)


def test_unloaded_sentencepiece_processor_is_an_error():
  sp = spm.SentencePieceProcessor()
  with pytest.raises(fws.WarmStartError, match=r"new_vocab <SentencePieceProcessor, 0 pieces> holds no model"):
    read_vocab(sp, field="new_vocab")


# --------------------------------------------------------------------------- tokenizer.json


def test_word_level_tokenizer_json_counts_added_tokens_at_their_ids(tmp_path):
  tok = word_level({"[UNK]": 0, "cat": 1, "dog": 2}, added=["fish"], special=["<pad>", "dog"])
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  assert read_vocab(str(path)) == ["[UNK]", "cat", "dog", "fish", "<pad>"]  # "dog" keeps its model id
  assert json.loads(path.read_text())["added_tokens"][0]["id"] == 2


def test_bpe_tokenizer_json_rows_follow_tokens(tmp_path):
  old_tok = bpe()
  new_tok = word_level({"[UNK]": 0, "dog": 1, "bird": 2, "cat": 3, "a": 4}, special=["<mask>"])
  old_path, new_path = tmp_path / "old" / "tokenizer.json", tmp_path / "new" / "tokenizer.json"
  for path, tok in ((old_path, old_tok), (new_path, new_tok)):
    path.parent.mkdir()
    tok.save(str(path))
  old_tokens, new_tokens = read_vocab(str(old_path)), read_vocab(str(new_path))
  assert old_tokens[-1] == "<mask>" and new_tokens == ["[UNK]", "dog", "bird", "cat", "a", "<mask>"]
  old, out = warm(tmp_path, old_tokens, fws.VocabInfo(str(new_path), 6, 1, str(old_path)), 7)
  assert assert_rows_follow_tokens(out, old, new_tokens, old_tokens, 6) == 5  # all but "bird"
  np.testing.assert_array_equal(out[5], old[11])  # <mask>: added token 11 of the old tokenizer


def test_tokenizers_objects_in_memory(tmp_path):
  old_tok, new_tok = bpe(), word_level({"[UNK]": 0, "cat": 1, "ca": 2}, special=["<mask>"])
  fast = FastTokenizer(new_tok)
  assert tv.is_tokenizer(old_tok) and tv.is_tokenizer(fast)
  assert describe_source(old_tok) == "<Tokenizer, 12 tokens>"
  assert describe_source(fast) == "<FastTokenizer, 4 tokens>"
  info = fws.VocabInfo(fast, 4, 0, old_tok)
  old_tokens = read_vocab(old_tok)
  old, out = warm(tmp_path, old_tokens, info, 4)
  assert assert_rows_follow_tokens(out, old, ["[UNK]", "cat", "ca", "<mask>"], old_tokens, 4) == 4


def test_gaps_are_placeholders_that_match_the_same_id(tmp_path, caplog):
  """Ids with no token: a row keeps its place when both tokenizers have the gap, and is new otherwise."""
  gappy = word_level({"[UNK]": 0, "a": 1, "c": 3})
  path = tmp_path / "tokenizer.json"
  gappy.save(str(path))
  with caplog.at_level(logging.INFO, logger="flax_warmstart"):
    tokens = read_vocab(str(path), field="old_vocab")
  assert tokens == ["[UNK]", "a", tv.gap_token(2), "c"]
  assert "old_vocab Hugging Face tokenizer.json" in caplog.text and "1 of its 4 ids have no token (2)" in caplog.text
  same = build_mapping(new_tokens=tokens, old_tokens=tokens, num_rows=4, new_vocab_size=4, num_oov_buckets=0, where="w")
  assert same.index.tolist() == [0, 1, 2, 3]
  full = read_vocab(word_level({"[UNK]": 0, "a": 1, "b": 2, "c": 3}))
  grown = build_mapping(new_tokens=full, old_tokens=tokens, num_rows=4, new_vocab_size=4, num_oov_buckets=0, where="w")
  assert grown.index.tolist() == [0, 1, -1, 3]


def test_shared_ids_and_moved_added_tokens_warn(tmp_path, caplog):
  tok = word_level({"[UNK]": 0, "a": 1, "c": 3}, added=["zz"])  # tokenizers gives "zz" id 3, as "c"
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    assert read_vocab(tok) == ["[UNK]", "a", tv.gap_token(2), "zz"]  # id 3 decodes to the added token
  assert "ids shared by several tokens (3: 'c' and 'zz')" in caplog.text
  data = json.loads(word_level({"[UNK]": 0, "a": 1}).to_str())
  data["added_tokens"] = [{**json.loads(tok.to_str())["added_tokens"][0], "id": 7}]
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps(data))
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="flax_warmstart"):
    assert read_vocab(str(path)) == ["[UNK]", "a", "zz"]
  assert "moves added tokens from the ids written in the file ('zz' from 7 to 2)" in caplog.text


def test_empty_token_is_an_error():
  with pytest.raises(fws.WarmStartError, match=r"old_vocab <Tokenizer, 2 tokens>: the token of id 1 is the empty"):
    read_vocab(word_level({"[UNK]": 0, "": 1}), field="old_vocab")


# --------------------------------------------------------------------------- file kinds


def test_file_kind_by_name_then_content(tmp_path, spm_files):
  with open(spm_files[0], "rb") as f:
    model = f.read()
  tok_json = bpe().to_str().encode()
  kind = tv.FileKind
  assert tv.file_kind(model, "spiece.model")[0] is kind.SENTENCEPIECE
  assert tv.file_kind(model, "gs://bucket/tokenizer_model")[0] is kind.SENTENCEPIECE  # content
  assert tv.file_kind(tok_json, "tokenizer.json")[0] is kind.TOKENIZER_JSON
  assert tv.file_kind(b"\n" + tok_json, "tok")[0] is kind.TOKENIZER_JSON  # content, after whitespace
  assert tv.file_kind(tok_json, "vocab.txt")[0] is kind.TEXT  # .txt and .vocab are always text
  assert tv.file_kind(b"\xe2\x96\x81the\t-1.5\n", "spm.vocab")[0] is kind.TEXT
  assert tv.file_kind(b"{\n}\n(\n", "chars")[0] is kind.TEXT  # starts like JSON, is not
  assert tv.file_kind(b"\napple\nbanana\n", "words")[0] is kind.TEXT  # an empty first line is not a protobuf
  # Read end to end: a model and a tokenizer.json without their extensions, a text file that starts with "{".
  for name, data, want in (
    ("spiece", model, sp_pieces(model)),
    ("tok", tok_json, read_vocab(bpe())),
    ("chars", b"{\n}\n(\n", ["{", "}", "("]),
  ):
    (tmp_path / name).write_bytes(data)
    assert read_vocab(str(tmp_path / name)) == want, name


@pytest.mark.parametrize(
  ("name", "data", "message"),
  [
    ("old.model", b"apple\nbanana\n", r"old_vocab: .*old\.model has a SentencePiece model's \.model extension but"),
    ("old.json", b'{"apple": 0, "banana": 1}', r"old_vocab: .*old\.json is not a Hugging Face tokenizer.json: .*"),
    ("old.json", b"apple\nbanana\n", r"old_vocab: .*old\.json is not a .* not valid JSON \(Expecting value at line 1"),
    ("old.json", b"\xff\xfe{}", r"old_vocab: .*old\.json is not a .* not UTF-8 text"),
    ("vocab", b'{"apple": 0, "banana": 1}', r"old_vocab: .*vocab is not a .*It looks like a \{token: id\} vocab\.json"),
    ("old.json", b'{"model": {"type": "Nope"}}', r"old_vocab: tokenizers \S+ cannot load .*old\.json as a tokenizer"),
    ("old.model", b"\n\x05\n\x01a\x15\x00", r"old_vocab: sentencepiece cannot load .*old\.model as a SentencePiece"),
  ],
)
def test_unreadable_tokenizer_files_name_the_setting_and_file(tmp_path, name, data, message):
  path = tmp_path / name
  path.write_bytes(data)
  new = tmp_path / "new.txt"
  new.write_text("apple\nbanana\n")
  remap, problems = plan_remap("emb", "emb", (2, 1), (2, 1), fws.VocabInfo(str(new), 2, 0, str(path)))
  assert remap is None and len(problems) == 1
  assert problems[0].startswith("'emb': old_vocab: "), problems
  assert str(path) in problems[0]
  with pytest.raises(fws.WarmStartError, match=message):
    read_vocab(str(path), field="old_vocab")


def test_missing_extra_message_names_the_extra():
  message = tv.missing_extra_message(
    "tokenizers", tv.TOKENIZERS_EXTRA, "Hugging Face tokenizer.json t.json (new_vocab)"
  )
  assert message == (
    "Reading Hugging Face tokenizer.json t.json (new_vocab) needs the optional package `tokenizers`:"
    " pip install tokenizers (the `tokenizers` extra; in a clone of flax_warmstart: pip install -e '.[tokenizers]')"
  )
  assert "pip install -e '.[sentencepiece]'" in tv.missing_extra_message("sentencepiece", "sentencepiece", "x")


def test_a_slow_transformers_tokenizer_gets_a_hint():
  with pytest.raises(fws.WarmStartError, match=r"got <.*SlowTokenizer.*convert_ids_to_tokens\(list\(range\(len"):
    fws.VocabInfo(SlowTokenizer(), 2, 0, ["a"])


# --------------------------------------------------------------------------- settings files


def test_tokenizer_paths_stay_paths_in_settings_files(tmp_path, spm_files):
  old_path, new_path = spm_files
  tok_path = str(tmp_path / "tokenizer.json")
  bpe().save(tok_path)
  settings = fws.WarmStartSettings(
    "/runs/old",
    var_name_to_vocab_info={
      EMBED: fws.VocabInfo(new_path, 40, 1, old_path),
      "head/bias": fws.VocabInfo(tok_path, 12, 0, tok_path),
    },
  )
  data = settings_to_dict(settings)
  assert data["var_name_to_vocab_info"][EMBED]["new_vocab"] == new_path
  assert data["var_name_to_vocab_info"]["head/bias"]["old_vocab"] == tok_path
  assert settings_from_dict(json.loads(json.dumps(data))) == settings
  assert settings_from_dict(yaml.safe_load(yaml.safe_dump(data))) == settings


def test_in_memory_tokenizer_is_recorded_as_its_tokens(tmp_path, spm_files):
  """Settings, plans and provenance record an in-memory tokenizer as its tokens in id order: exact and reloadable."""
  sp = spm.SentencePieceProcessor(model_file=spm_files[0])
  old_tokens = read_vocab(spm_files[0])
  info = fws.VocabInfo(spm_files[1], len(read_vocab(spm_files[1])), 0, sp)
  settings = fws.WarmStartSettings("/runs/old", var_name_to_vocab_info={EMBED: info})
  data = settings.to_dict()
  assert data["var_name_to_vocab_info"][EMBED]["old_vocab"] == old_tokens
  assert settings_from_dict(json.loads(json.dumps(data))).var_name_to_vocab_info[EMBED].old_vocab == tuple(old_tokens)
  data = settings_to_dict(
    fws.WarmStartSettings("/runs/old", var_name_to_vocab_info={EMBED: fws.VocabInfo(bpe(), 4, 0, ["a"])})
  )
  assert data["var_name_to_vocab_info"][EMBED]["new_vocab"] == read_vocab(bpe())
  # The plan of a real warm start with it, its provenance, and a warm start from the recorded settings agree.
  old = old_table(len(old_tokens))
  ckpt = save_checkpoint(tmp_path / "ckpt", {"embedder": {"embedding": jnp.asarray(old)}})
  live = {"embedder": {"embedding": jnp.zeros((info.new_vocab_size, WIDTH), jnp.float32)}}
  plan = fws.plan(live, fws.WarmStartSettings(ckpt, var_name_to_vocab_info={EMBED: info}))
  record = json.loads(json.dumps(plan.provenance()))
  assert record["leaves"][EMBED]["action"] == "load"
  recorded = settings_from_dict(record["settings"][0])
  assert recorded.var_name_to_vocab_info[EMBED].old_vocab == tuple(old_tokens)
  out = fws.warm_start(live, plan=plan)["embedder"]["embedding"]
  np.testing.assert_array_equal(out, fws.warm_start(live, recorded)["embedder"]["embedding"])
  assert np.count_nonzero(np.asarray(out).any(axis=1)) > 0


def test_command_line_plan_with_tokenizer_files(tmp_path, spm_files):
  old_path, new_path = spm_files
  old_tokens, new_tokens = read_vocab(old_path), read_vocab(new_path)
  old_ckpt = save_checkpoint(tmp_path / "old", {"embedder": {"embedding": jnp.asarray(old_table(len(old_tokens)))}})
  new_ckpt = save_checkpoint(tmp_path / "new", {"embedder": {"embedding": jnp.zeros((len(new_tokens), WIDTH))}})
  settings = tmp_path / "settings.yaml"
  settings.write_text(
    yaml.safe_dump(
      {
        "vars_to_warm_start": None,
        "var_name_to_vocab_info": {
          EMBED: {"new_vocab": new_path, "new_vocab_size": len(new_tokens), "num_oov_buckets": 0, "old_vocab": old_path}
        },
      }
    )
  )
  result = run_cli("plan", old_ckpt, new_ckpt, "--settings", settings, "--json")
  assert result.returncode == 0, result.stderr
  (leaf,) = [leaf for leaf in json.loads(result.stdout)["leaves"] if leaf["name"] == EMBED]
  shared = len(set(old_tokens) & set(new_tokens))
  assert leaf["action"] == "load" and leaf["vocab"]["copied"] == shared, leaf
