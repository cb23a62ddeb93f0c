"""The SentencePiece tokenizer: training it in-process on the text of some sources, caching it, wrapping it.

Fixed ids: pad=0, bos=1, eos=2, unk=3, then the chat tokens `<|user|>`=4, `<|assistant|>`=5, `<|system|>`=6,
`<|end|>`=7 (user-defined symbols, always matched whole). Unigram model with `byte_fallback=True` (any text
encodes), `split_digits=True` (arithmetic), identity normalization and no dummy prefix / whitespace folding, so
`decode(encode(s)) == s` and encoding two pieces separately matches encoding their concatenation at a space.

The trained model is cached under `data_dir/tokenizers/<hash>/spm.model`, the hash covering the normalized source
specs, the vocab size and `TOKENIZER_VERSION`. If the corpus cannot support the requested vocab size, training
uses `hard_vocab_limit=False`, so `Tokenizer.vocab_size <= vocab_size` always (the model's embedding has the
requested size; ids above the tokenizer's are simply never produced). Training uses one thread: SentencePiece's
result depends on its thread count, so a machine with more cores would otherwise train another tokenizer from the
same text (and its runs would not reproduce this machine's).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile

import filelock
import numpy as np
import sentencepiece as spm
import tqdm

from llmstages.data import chat, sources

TOKENIZER_VERSION = 2  # 2: trained on one thread (version 1 used every core).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Documents sampled per source to train the tokenizer: enough for stable pieces, and unigram training time grows
# faster than linearly with the number of sentences (15k: ~1 s, 33k: ~8 s here).
MAX_DOCS_PER_SOURCE = 5000
_MIN_EXTRA_PIECES = 4 + len(chat.CHAT_TOKENS) + 256  # specials + chat tokens + byte pieces


class Tokenizer:
  """A thin, picklable wrapper of a SentencePiece model (pickles its serialized proto, ~100 KB)."""

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._proto = model_proto
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size: int = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
    assert (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()) == (0, 1, 2, 3)

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model."""
    return self._proto

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read(), path)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS added."""
    return self._sp.encode(text)

  def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (as `encode`) and each token's [begin, end) character span in `text` (a byte-fallback
    piece inside a multi-byte character gets that character's span)."""
    proto = self._sp.encode(text, out_type="proto")
    starts = np.cumsum([0] + [len(ch.encode("utf-8")) for ch in text])  # SentencePiece counts UTF-8 bytes.
    ids, spans = [], []
    for piece in proto.pieces:
      begin = int(np.searchsorted(starts, piece.begin, side="right")) - 1
      end = int(np.searchsorted(starts, piece.end, side="left"))
      ids.append(piece.id)
      spans.append((begin, end))
    return ids, spans

  def decode(self, ids) -> str:
    """Text of `ids`; pad/bos/eos are dropped. Ids past the tokenizer's vocabulary (rows a larger model
    embedding has but no piece uses; a model can still sample them) decode as the unknown token."""
    n = self.vocab_size
    ids = [int(i) if int(i) < n else UNK_ID for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
    return self._sp.decode(ids)

  def token_id(self, piece: str) -> int:
    """Id of a special or single-piece token, e.g. '<|assistant|>'; KeyError if it is not one piece."""
    i = self._sp.piece_to_id(piece)
    if i == UNK_ID and piece != self._sp.id_to_piece(UNK_ID):
      raise KeyError(f"{piece!r} is not a piece of this tokenizer")
    return i

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def save(self, path: str) -> None:
    """Writes the SentencePiece model to `path` atomically (a reader never sees a partial file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(self._proto)
    os.replace(tmp, path)

  def save_pretrained(self, out_dir: str) -> None:
    """Writes tokenizer.model and tokenizer_config.json (hf export; `HFTokenizer` reads them back)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
      f.write(self._proto)
    names = {r: self._sp.id_to_piece(i) for r, i in (("pad", PAD_ID), ("bos", BOS_ID), ("eos", EOS_ID),
                                                      ("unk", UNK_ID))}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                 **{f"{r}_token": n for r, n in names.items()}}, f, indent=1)

  def __getstate__(self):
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["path"])

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _cache_key(source_texts: list[str], vocab_size: int) -> str:
  blob = json.dumps({"sources": sorted(source_texts), "vocab": vocab_size, "version": TOKENIZER_VERSION})
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def training_texts(source_texts: list[str], data_dir: str) -> list[str]:
  """Text of the sources' train splits: every segment of up to MAX_DOCS_PER_SOURCE documents each."""
  texts = []
  for text in source_texts:
    src = sources.open_source(text, "train", data_dir)
    indices = list(range(len(src)))
    if len(indices) > MAX_DOCS_PER_SOURCE:
      indices = sorted(random.Random(0).sample(indices, MAX_DOCS_PER_SOURCE))
    for i in tqdm.tqdm(indices, desc=f"tokenizer text: {text}", leave=False, mininterval=1.0):
      texts.append("".join(piece for piece, _ in src.document(i)))
  return texts


def _specs(sources_list: list[str]) -> list[str]:
  specs = []
  for entry in sources_list:
    for text, _ in sources.parse_mixture(entry):
      specs.append(sources.parse_source(text).text)
  if not specs:
    raise ValueError("get_tokenizer: no sources given")
  return specs


def tokenizer_key(sources_list: list[str], vocab_size: int) -> str:
  """The cache key of the tokenizer `get_tokenizer` returns for these sources and vocab size."""
  return _cache_key(_specs(sources_list), vocab_size)


def get_tokenizer(sources_list: list[str], vocab_size: int, data_dir: str) -> Tokenizer:
  """The tokenizer for these sources and vocab size, trained once and cached in `data_dir`.

  `sources_list` holds source specs (mixture weights, if present, are ignored)."""
  specs = _specs(sources_list)
  if vocab_size < _MIN_EXTRA_PIECES + 16:
    raise ValueError(f"get_tokenizer: vocab_size={vocab_size} is too small; byte fallback and special tokens "
                     f"alone need {_MIN_EXTRA_PIECES} ids (use >= {_MIN_EXTRA_PIECES + 16})")
  directory = os.path.join(data_dir, "tokenizers", _cache_key(specs, vocab_size))
  path = os.path.join(directory, "spm.model")
  if os.path.exists(path):
    return Tokenizer.load(path)
  os.makedirs(directory, exist_ok=True)
  # One trainer per cache entry: processes starting together must all use the same model, so the others wait
  # and load it.
  with filelock.FileLock(os.path.join(directory, ".lock")):
    if os.path.exists(path):
      return Tokenizer.load(path)
    return _train(specs, vocab_size, data_dir, directory, path)


def _train(specs: list[str], vocab_size: int, data_dir: str, directory: str, path: str) -> Tokenizer:
  texts = training_texts(specs, data_dir)
  if not any(t.strip() for t in texts):
    raise ValueError(f"get_tokenizer: sources {specs} contain no text")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
      hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, user_defined_symbols=list(chat.CHAT_TOKENS),
      max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
      num_threads=1, minloglevel=2)  # Not os.cpu_count(): the model depends on it (module docstring).
  tokenizer = Tokenizer(model.getvalue(), path)
  assert tokenizer.vocab_size <= vocab_size, (tokenizer.vocab_size, vocab_size)
  tokenizer.save(path)
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump({"sources": specs, "vocab_size_requested": vocab_size, "vocab_size": tokenizer.vocab_size,
               "version": TOKENIZER_VERSION, "documents": len(texts)}, f, indent=1)
  return tokenizer
