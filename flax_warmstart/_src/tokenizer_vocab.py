"""Tokenizer vocabularies: SentencePiece models and Hugging Face tokenizers as `VocabInfo` vocabularies.

Besides a text file (one token per line) or a token list, `VocabInfo.new_vocab`
and `old_vocab` may be

* a SentencePiece model file (T5, Gemma, Llama 2: `spiece.model`,
  `tokenizer.model`) or a loaded `sentencepiece.SentencePieceProcessor`, read
  with the `sentencepiece` extra;
* a Hugging Face `tokenizer.json` or a loaded `tokenizers.Tokenizer` (also a
  `transformers` fast tokenizer, through its `backend_tokenizer`), read with the
  `tokenizers` extra.

The tokens are the tokenizer's pieces in id order: token `i` is what id `i`
decodes to (`id_to_piece(i)`, `id_to_token(i)`), so row `i` of an embedding is
the row of id `i`, and `new_vocab_size` / `old_vocab_size` take the first ids
as they take the first lines of a text file. A tokenizer.json's
`added_tokens` count at their ids: the ids `tokenizers` gives them when it
loads the file, which are the ids written in every well-formed file (a WARNING
names any token the library moves, and any id two tokens share).

An id that no token maps to (a gap in a tokenizer.json vocabulary) becomes the
placeholder `gap_token(i)`, `"\\x00<no token at id i>"`, logged at INFO. It
matches only the same placeholder: a row with no token keeps its place when
both vocabularies have no token at that id (one tokenizer grown by added
tokens), and is a new row (backup initializer) otherwise. A token that is the
empty string is an error, as an empty line of a text file is.

A file's kind is told by its name, then by its content: `*.json` must be a
tokenizer.json (a JSON object with a `"model"` key), `*.model` a SentencePiece
model (a serialized `ModelProto`); any other name is a tokenizer.json if it
holds such a JSON object, a SentencePiece model if it parses as one, and a text
vocabulary otherwise (`*.txt` and `*.vocab` are always text).
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import os
import sys
from typing import Any

from flax_warmstart._src.errors import WarmStartError, install_extra

logger = logging.getLogger("flax_warmstart")

# The extras that read tokenizer vocabularies (pyproject.toml's optional dependencies).
SENTENCEPIECE_EXTRA = "sentencepiece"
TOKENIZERS_EXTRA = "tokenizers"


class FileKind(enum.Enum):
  """What a vocabulary file holds."""

  TEXT = "text"
  SENTENCEPIECE = "SentencePiece model"
  TOKENIZER_JSON = "Hugging Face tokenizer.json"


def gap_token(i: int) -> str:
  """The placeholder token of an id that no token maps to.

  Examples:
    >>> gap_token(7)
    '\\x00<no token at id 7>'
  """
  return f"\x00<no token at id {i}>"


def missing_extra_message(package: str, extra: str, what: str) -> str:
  """The message of the `ImportError` raised when an optional package is missing.

  Examples:
    >>> missing_extra_message("sentencepiece", "sentencepiece", "SentencePiece model spm.model")
    "Reading SentencePiece model spm.model needs the optional package `sentencepiece`: pip install sentencepiece (the `sentencepiece` extra; in a clone of flax_warmstart: pip install -e '.[sentencepiece]')"
  """
  return f"Reading {what} needs the optional package `{package}`: {install_extra(extra, package)}"


def _import(package: str, extra: str, what: str) -> Any:
  """`import package`, or an ImportError naming the extra to install."""
  try:
    return importlib.import_module(package)
  except ImportError as err:
    raise ImportError(missing_extra_message(package, extra, what)) from err


def _loaded_class(module: str, name: str) -> type | None:
  """A class of a library only if that library is imported already (an object of it may exist only then)."""
  mod = sys.modules.get(module)
  return getattr(mod, name, None) if mod is not None else None


def _hf_tokenizer(value: Any) -> Any:
  """The `tokenizers.Tokenizer` behind `value` (itself or a transformers fast tokenizer's backend), or None."""
  cls = _loaded_class("tokenizers", "Tokenizer")
  if cls is None:
    return None
  if isinstance(value, cls):
    return value
  backend = getattr(value, "backend_tokenizer", None)
  return backend if isinstance(backend, cls) else None


def _sp_processor(value: Any) -> Any:
  """`value` if it is a `sentencepiece.SentencePieceProcessor`, else None."""
  cls = _loaded_class("sentencepiece", "SentencePieceProcessor")
  return value if cls is not None and isinstance(value, cls) else None


def is_tokenizer(value: Any) -> bool:
  """Whether `value` is an in-memory tokenizer `VocabInfo` reads its tokens from.

  A `sentencepiece.SentencePieceProcessor`, a `tokenizers.Tokenizer`, or an
  object with such a `backend_tokenizer` (a transformers fast tokenizer).
  Imports neither library.

  Examples:
    >>> is_tokenizer(["a", "b"]), is_tokenizer("spm.model")
    (False, False)
  """
  return _sp_processor(value) is not None or _hf_tokenizer(value) is not None


def tokenizer_hint(value: Any) -> str:
  """A hint for a tokenizer-like object `VocabInfo` cannot read (a transformers slow tokenizer), or ''.

  Examples:
    >>> tokenizer_hint(object())
    ''
  """
  if not hasattr(value, "convert_ids_to_tokens"):
    return ""
  return (
    " For a transformers tokenizer, pass its tokenizer.json or `tokenizer.backend_tokenizer` (fast tokenizers), or"
    " the tokens in id order: `tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))`."
  )


def describe_tokenizer(value: Any) -> str:
  """A short name of an in-memory tokenizer for messages, e.g. `<SentencePieceProcessor, 8000 pieces>`."""
  sp = _sp_processor(value)
  if sp is not None:
    return f"<SentencePieceProcessor, {sp.get_piece_size()} pieces>"
  hf = _hf_tokenizer(value)
  size = hf.get_vocab_size(with_added_tokens=True) if hf is not None else "?"
  return f"<{type(value).__name__}, {size} tokens>"


# --------------------------------------------------------------------------- file kinds


def _is_sentencepiece_proto(data: bytes) -> bool:
  """Whether `data` is a serialized protobuf message whose first field is 1 (`ModelProto.pieces`), length-delimited.

  A walk over the top-level wire format: every field must have a valid key
  and length, and the last must end exactly at the end of the data. A text
  file does not pass (its first byte would be an empty line's `\\n` and the
  rest would have to be valid wire format too).
  """
  if not data.startswith(b"\n"):
    return False
  pos, end = 0, len(data)

  def varint() -> int | None:
    nonlocal pos
    shift = result = 0
    while pos < end and shift < 64:
      byte = data[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      if not byte & 0x80:
        return result
      shift += 7
    return None

  while pos < end:
    key = varint()
    if key is None or key >> 3 == 0:
      return False
    wire = key & 7
    if wire == 0:
      if varint() is None:
        return False
    elif wire == 1:
      pos += 8
    elif wire == 2:
      length = varint()
      if length is None:
        return False
      pos += length
    elif wire == 5:
      pos += 4
    else:  # groups (3, 4) are not in sentencepiece_model.proto; 6 and 7 do not exist
      return False
  return pos == end


def _json_object(data: bytes) -> tuple[Any, str | None]:
  """`(value, None)` for JSON data, `(None, why)` for anything else."""
  try:
    return json.loads(data.decode("utf-8")), None
  except UnicodeDecodeError as err:
    return None, f"it is not UTF-8 text ({err.reason} at byte {err.start})"
  except json.JSONDecodeError as err:
    return None, f"it is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"


def _not_tokenizer_json(value: Any) -> str:
  """Why a parsed JSON value is not a tokenizer.json (with a hint for a `{token: id}` vocab.json)."""
  if not isinstance(value, dict):
    return f"it holds a JSON {type(value).__name__}, not an object with a 'model' key"
  keys = ", ".join(repr(k) for k in list(value)[:5]) + (", ..." if len(value) > 5 else "")
  hint = ""
  if value and all(isinstance(v, int) for v in value.values()):
    hint = (
      ". It looks like a {token: id} vocab.json: pass the tokenizer.json beside it, or the tokens in id order"
      " (`sorted(vocab, key=vocab.get)`)"
    )
  return f"it is a JSON object without a 'model' key (keys: {keys}){hint}"


def file_kind(data: bytes, path: str) -> tuple[FileKind, Any]:
  """What a vocabulary file holds, from its name and content.

  Args:
    data: The file's bytes.
    path: Its path (its name decides first, see the module docstring).

  Returns:
    `(kind, parsed)`: `parsed` is the JSON object of a tokenizer.json, else None.

  Raises:
    WarmStartError: For a `.json` file that is not a tokenizer.json, a `.model`
      file that is not a SentencePiece model, or a JSON object without a
      `"model"` key (a `{token: id}` vocab.json).

  Examples:
    >>> file_kind(b"apple\\nbanana\\n", "vocab.txt")[0]
    <FileKind.TEXT: 'text'>
    >>> file_kind(b'{"version": "1.0", "model": {"type": "WordLevel"}}', "tok")[0]
    <FileKind.TOKENIZER_JSON: 'Hugging Face tokenizer.json'>
    >>> file_kind(b"\\n\\x05\\n\\x01a\\x15\\x00", "spiece")[0]
    <FileKind.SENTENCEPIECE: 'SentencePiece model'>
  """
  name = os.path.basename(path).lower()
  if name.endswith((".txt", ".vocab")):
    return FileKind.TEXT, None
  if name.endswith(".model"):
    if not _is_sentencepiece_proto(data):
      raise WarmStartError(
        f"{path} has a SentencePiece model's .model extension but does not hold one (a serialized ModelProto"
        f" starting with its pieces; its first bytes are {data[:16]!r}). Give the tokenizer's .model file, or rename"
        " a text vocabulary (one token per line) to .txt."
      )
    return FileKind.SENTENCEPIECE, None
  if name.endswith(".json") or data.lstrip()[:1] == b"{":
    value, why = _json_object(data)
    if why is None and isinstance(value, dict) and "model" in value:
      return FileKind.TOKENIZER_JSON, value
    if name.endswith(".json") or why is None:
      reason = why or _not_tokenizer_json(value)
      raise WarmStartError(
        f"{path} is not a Hugging Face tokenizer.json: {reason}. A tokenizer.json is the JSON object"
        " `tokenizer.save(path)` writes, with a 'model' key; a text vocabulary has one token per line."
      )
  if _is_sentencepiece_proto(data):
    return FileKind.SENTENCEPIECE, None
  return FileKind.TEXT, None


# --------------------------------------------------------------------------- tokens


def _checked(tokens: list[str | None], what: str) -> list[str]:
  """Tokens in id order, gaps (None) replaced by `gap_token(i)`; an empty token or a clash is an error."""
  if not tokens:
    raise WarmStartError(f"{what} has no tokens.")
  gaps = [i for i, t in enumerate(tokens) if t is None]
  if gaps:
    real = set(tokens)
    clash = [i for i in gaps if gap_token(i) in real]
    if clash:
      raise WarmStartError(f"{what}: a token is the placeholder {gap_token(clash[0])!r} of the empty id {clash[0]}.")
    shown = ", ".join(map(str, gaps[:10])) + (" ..." if len(gaps) > 10 else "")
    logger.info(
      "%s: %d of its %d ids have no token (%s); each is the placeholder %r (id i), which matches only the same"
      " placeholder of the other vocabulary.",
      what,
      len(gaps),
      len(tokens),
      shown,
      gap_token(gaps[0]),
    )
    for i in gaps:
      tokens[i] = gap_token(i)
  if "" in tokens:
    raise WarmStartError(
      f"{what}: the token of id {tokens.index('')} is the empty string, which cannot name a row. Pass the tokens"
      " as a list instead, with a placeholder of your choice there."
    )
  return tokens  # type: ignore[return-value]


def _sp_tokens(sp: Any, what: str) -> list[str]:
  n = sp.get_piece_size()
  if n == 0:
    raise WarmStartError(f"{what} holds no model: load one first (`SentencePieceProcessor(model_file=...)`).")
  return _checked(list(sp.id_to_piece(list(range(n)))), what)


def _hf_tokens(tok: Any, what: str, file_ids: dict[str, int] | None = None) -> list[str]:
  """Tokens in id order of a `tokenizers.Tokenizer`: `id_to_token(i)` (an added token first, as in decoding)."""
  vocab = tok.get_vocab(with_added_tokens=True)
  if not vocab:
    raise WarmStartError(f"{what} has no tokens.")
  n = max(vocab.values()) + 1
  tokens = [tok.id_to_token(i) for i in range(n)]
  problems = []
  shared = sorted({i for t, i in vocab.items() if tokens[i] != t})
  if shared:
    by_id = ", ".join(f"{i}: " + " and ".join(sorted(repr(t) for t, j in vocab.items() if j == i)) for i in shared[:3])
    problems.append(
      f"ids shared by several tokens ({by_id}); each row follows the token the id decodes to"
      f" ({', '.join(repr(tokens[i]) for i in shared[:3])})"
    )
  moved = [(t, i, vocab.get(t)) for t, i in (file_ids or {}).items() if vocab.get(t) != i]
  if moved:
    shown = ", ".join(f"{t!r} from {i} to {j}" for t, i, j in moved[:3]) + (" ..." if len(moved) > 3 else "")
    problems.append(
      f"tokenizers moves added tokens from the ids written in the file ({shown}); the ids it gives are those a model"
      " trained with this tokenizer saw, and rows follow them"
    )
  for problem in problems:
    logger.warning("%s: %s.", what, problem)
  return _checked(tokens, what)


def tokens_from_tokenizer(value: Any, *, field: str = "vocabulary") -> list[str]:
  """The tokens, in id order, of an in-memory tokenizer (see `is_tokenizer`).

  Args:
    value: A `SentencePieceProcessor`, a `tokenizers.Tokenizer`, or an object
      with such a `backend_tokenizer`.
    field: The setting that names it (`new_vocab`, `old_vocab`), for messages.

  Returns:
    Token `i` is the piece of id `i`; ids with no token are `gap_token(i)`.

  Raises:
    WarmStartError: For a tokenizer without tokens or with an empty token.
  """
  what = f"{field} {describe_tokenizer(value)}"
  sp = _sp_processor(value)
  if sp is not None:
    return _sp_tokens(sp, what)
  hf = _hf_tokenizer(value)
  if hf is None:
    raise WarmStartError(f"{field}: {type(value).__name__} is not a tokenizer flax_warmstart reads.")
  return _hf_tokens(hf, what)


def tokens_from_file(data: bytes, path: str, *, field: str = "vocabulary") -> list[str] | None:
  """The tokens, in id order, of a tokenizer file, or None for a text vocabulary.

  Args:
    data: The file's bytes.
    path: Its path, for `file_kind` and messages.
    field: The setting that names it (`new_vocab`, `old_vocab`), for messages.

  Returns:
    Token `i` is the piece of id `i` (ids with no token are `gap_token(i)`),
    or None when the file is a text vocabulary (one token per line).

  Raises:
    WarmStartError: For a file of a tokenizer kind that its library cannot
      read, naming the setting and the file.
    ImportError: When the file's library (extra) is not installed.
  """
  try:
    kind, parsed = file_kind(data, path)
  except WarmStartError as err:
    raise WarmStartError([f"{field}: {p}" for p in err.problems]) from None
  if kind is FileKind.TEXT:
    return None
  what = f"{field} {kind.value} {path}"
  if kind is FileKind.SENTENCEPIECE:
    spm = _import("sentencepiece", SENTENCEPIECE_EXTRA, f"{kind.value} {path} ({field})")
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError) as err:
      raise WarmStartError(f"{field}: sentencepiece cannot load {path} as a SentencePiece model: {err}") from None
    return _sp_tokens(sp, what)
  tokenizers = _import("tokenizers", TOKENIZERS_EXTRA, f"{kind.value} {path} ({field})")
  try:
    tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
  except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception for a malformed file)
    raise WarmStartError(
      f"{field}: tokenizers {tokenizers.__version__} cannot load {path} as a tokenizer.json: {err}"
    ) from None
  return _hf_tokens(tok, what, _file_added_ids(parsed))


def _file_added_ids(parsed: Any) -> dict[str, int]:
  """`{content: id}` of a tokenizer.json's `added_tokens`, as written in the file."""
  added = parsed.get("added_tokens") if isinstance(parsed, dict) else None
  if not isinstance(added, list):
    return {}
  return {
    t["content"]: t["id"]
    for t in added
    if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)
  }
