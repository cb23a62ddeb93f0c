"""The batch iterators: mixture sampling, per-epoch shuffling, tokenization, packing, sharding, resumable state.

Documents. Each document becomes `ids = [BOS] + tokens + [EOS]` with a loss flag per token (see
`sources.Document`); its training pairs are `inputs = ids[:-1]`, `targets = ids[1:]`, and `loss_mask` is the loss
flag of the *target* token (so for prompt/completion data exactly the completion tokens and the final EOS count).
A document with more than `seq_len` pairs is cut into chunks of `seq_len` pairs, each chunk its own segment with
positions restarting at 0 (or, with `truncate=True`, cut to its first `seq_len` pairs).

Packing (`pack=True`). First fit over a lookahead buffer of the next `PACK_LOOKAHEAD` pieces in stream order:
a row takes the oldest buffered piece that still fits, until none does; then it is padded and closed. An empty
row always takes the oldest piece, so no piece waits for long. Pieces are never split across rows (except the
chunks above). Each piece of a row gets segment id 1, 2, 3, ... and positions 0, 1, ...; padding has segment id
0, targets 0 (pad) and loss_mask 0. `pack=False`: one piece per row, in stream order.
`cross_document_attention=True`: the same rows, but every real token has segment id 1 and positions run 0..n-1
along the row (one attention sequence; documents see each other).

Order. A mixture draw k picks a source with probability proportional to its weight, using a uniform number that
depends only on (seed, k). Each source walks a permutation of its records per epoch, keyed by (seed, source,
epoch); `repeat=True` starts a freshly shuffled epoch when a source runs out, `repeat=False` retires the source
and, once all are retired, emits the last (padded) batch and then raises StopIteration. For any split other than
'train' the order does not depend on `seed` (every run evaluates the same batches).

Sharding. Every process computes the same global batch of `batch_size` rows and keeps the contiguous block
`[process_index * b, (process_index + 1) * b)`, b = batch_size // process_count; the union over processes is the
single-process batch. The state is global too, so it can be restored with another process count.

State. `get_state()` is a small JSON dict: mixture draws made, each source's (epoch, position, retired), the
references (source, record, chunk) of the pieces in the lookahead buffer, and batches emitted. `set_state`
restores it without replaying data.
"""

from __future__ import annotations

import numpy as np

from llmstages.data import sources as sources_lib
from llmstages.data.tokenizer import Tokenizer

STATE_VERSION = 2
_UNIFORM_BLOCK = 4096
_TOKEN_CACHE_DOCS = 200_000
PACK_LOOKAHEAD = 32  # pieces considered when filling a row


def tokenize_document(tokenizer: Tokenizer, document: sources_lib.Document) -> tuple[np.ndarray, np.ndarray]:
  """([BOS] + tokens + [EOS], loss flag per token); EOS takes the flag of the last segment. A tokenizer with its
  own chat template (an imported model's `HFTokenizer`) first re-renders chat documents in it."""
  render = getattr(tokenizer, "render_chat_document", None)
  if render is not None:
    document = render(document)
  ids, flags = [tokenizer.bos_id], [False]
  for text, has_loss in document:
    piece = tokenizer.encode(text)
    ids.extend(piece)
    flags.extend([has_loss] * len(piece))
  ids.append(tokenizer.eos_id)
  flags.append(document[-1][1] if document else False)
  return np.asarray(ids, np.int32), np.asarray(flags, np.bool_)


class BatchIterator:
  """Iterator of packed training batches; see the module docstring and `make_iterator`."""

  def __init__(self, mixture, *, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
               split: str = "train", data_dir: str, process_index: int = 0, process_count: int = 1,
               pack: bool = True, cross_document_attention: bool = False, repeat: bool = True,
               truncate: bool = False):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} (global) must be a positive multiple of "
                       f"process_count={process_count}")
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be >= 1")
    self.mixture = sources_lib.parse_mixture(mixture)
    self.tokenizer = tokenizer
    self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
    self.process_index, self.process_count = process_index, process_count
    self.pack, self.cross_document_attention, self.repeat = pack, cross_document_attention, repeat
    self.truncate = truncate  # Cut documents to seq_len pairs instead of chunking them (report.TOO_LONG).
    self._order_seed = seed if split == "train" else 0
    self.sources = [sources_lib.open_source(text, split, data_dir) for text, _ in self.mixture]
    self._weights = np.asarray([w for _, w in self.mixture], np.float64)
    self._token_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
    self._uniform_cache: tuple[int, np.ndarray] | None = None
    self._reset()

  # --- state ----------------------------------------------------------------------------------------------------
  def _reset(self):
    self._draws = 0
    self._epoch = [0] * len(self.sources)
    self._pos = [0] * len(self.sources)
    self._retired = [bool(w <= 0) for w in self._weights]
    self._buffer: list[list[int]] = []  # pieces [source, record, chunk] drawn but not yet placed
    self._batches = 0
    self._done = False

  def _identity(self) -> dict:
    return {"mixture": [[s, w] for s, w in self.mixture], "seed": self.seed, "split": self.split,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "pack": self.pack,
            "cross_document_attention": self.cross_document_attention, "repeat": self.repeat}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, **self._identity(), "draws": self._draws,
            "sources": [[e, p, r] for e, p, r in zip(self._epoch, self._pos, self._retired)],
            "buffer": [list(ref) for ref in self._buffer], "batches": self._batches, "done": self._done}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"iterator state version {state.get('version')} != {STATE_VERSION}")
    mine = self._identity()
    theirs = {k: state.get(k) for k in mine}
    theirs["mixture"] = [[s, float(w)] for s, w in theirs["mixture"] or []]
    if theirs != mine:
      diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
      raise ValueError(f"iterator state was saved for a different data config (saved, now): {diff}")
    self._draws = int(state["draws"])
    self._epoch = [int(e) for e, _, _ in state["sources"]]
    self._pos = [int(p) for _, p, _ in state["sources"]]
    self._retired = [bool(r) for _, _, r in state["sources"]]
    self._buffer = [[int(x) for x in ref] for ref in state["buffer"]]
    self._batches = int(state["batches"])
    self._done = bool(state["done"])

  # --- document stream -----------------------------------------------------------------------------------------
  def _uniform(self, k: int) -> float:
    block = k // _UNIFORM_BLOCK
    if self._uniform_cache is None or self._uniform_cache[0] != block:
      rng = np.random.default_rng([self._order_seed, 0x6D1, block])
      self._uniform_cache = (block, rng.random(_UNIFORM_BLOCK))
    return float(self._uniform_cache[1][k % _UNIFORM_BLOCK])

  def _permutation(self, source: int, epoch: int) -> np.ndarray:
    cached = self._perm_cache.get(source)
    if cached is None or cached[0] != epoch:
      rng = np.random.default_rng([self._order_seed, 0x5EED, source, epoch])
      cached = (epoch, rng.permutation(len(self.sources[source])))
      self._perm_cache[source] = cached
    return cached[1]

  def _draw_document(self) -> tuple[int, int] | None:
    active = [i for i, r in enumerate(self._retired) if not r]
    if not active:
      return None
    u = self._uniform(self._draws)
    self._draws += 1
    if len(active) == 1:
      source = active[0]
    else:
      cdf = np.cumsum(self._weights[active])
      source = active[min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(active) - 1)]
    record = int(self._permutation(source, self._epoch[source])[self._pos[source]])
    self._pos[source] += 1
    if self._pos[source] == len(self.sources[source]):
      if self.repeat:
        self._epoch[source] += 1
        self._pos[source] = 0
      else:
        self._retired[source] = True
    return source, record

  def _tokens(self, source: int, record: int) -> tuple[np.ndarray, np.ndarray]:
    key = (source, record)
    cached = self._token_cache.get(key)
    if cached is None:
      cached = tokenize_document(self.tokenizer, self.sources[source].document(record))
      if self.truncate and len(cached[0]) > self.seq_len + 1:
        cached = (cached[0][:self.seq_len + 1], cached[1][:self.seq_len + 1])
      if len(self._token_cache) < _TOKEN_CACHE_DOCS:
        self._token_cache[key] = cached
    return cached

  def _piece(self, ref: list[int]):
    """(inputs, targets, loss) of piece `ref` = [source, record, chunk]."""
    source, record, chunk = ref
    ids, flags = self._tokens(source, record)
    start, stop = chunk * self.seq_len, min((chunk + 1) * self.seq_len, len(ids) - 1)
    return ids[start:stop], ids[start + 1:stop + 1], flags[start + 1:stop + 1]

  def _piece_len(self, ref: list[int]) -> int:
    n_pairs = len(self._tokens(ref[0], ref[1])[0]) - 1
    return min(self.seq_len, n_pairs - ref[2] * self.seq_len)

  def _top_up(self):
    """Fills the lookahead buffer from the document stream (every chunk of a drawn document)."""
    want = PACK_LOOKAHEAD if self.pack else 1
    while len(self._buffer) < want:
      drawn = self._draw_document()
      if drawn is None:
        return
      n_pairs = len(self._tokens(*drawn)[0]) - 1
      n_chunks = max(1, -(-n_pairs // self.seq_len))
      self._buffer.extend([drawn[0], drawn[1], c] for c in range(n_chunks))

  # --- batches -------------------------------------------------------------------------------------------------
  def _global_batch(self) -> dict[str, np.ndarray] | None:
    B, L = self.batch_size, self.seq_len
    inputs_BxL = np.zeros((B, L), np.int32)
    targets_BxL = np.zeros((B, L), np.int32)
    loss_BxL = np.zeros((B, L), np.float32)
    segments_BxL = np.zeros((B, L), np.int32)
    positions_BxL = np.zeros((B, L), np.int32)
    rows = 0
    while rows < B:
      filled, segment = 0, 0
      while True:
        self._top_up()
        # The oldest piece that fits; an empty row always takes the oldest, so nothing starves.
        j = next((j for j, ref in enumerate(self._buffer) if filled + self._piece_len(ref) <= L), None)
        if j is None:
          break
        inp, tgt, flag = self._piece(self._buffer.pop(j))
        n = len(inp)
        segment += 1
        inputs_BxL[rows, filled:filled + n] = inp
        targets_BxL[rows, filled:filled + n] = tgt
        loss_BxL[rows, filled:filled + n] = flag
        if self.cross_document_attention:
          segments_BxL[rows, filled:filled + n] = 1
          positions_BxL[rows, filled:filled + n] = np.arange(filled, filled + n)
        else:
          segments_BxL[rows, filled:filled + n] = segment
          positions_BxL[rows, filled:filled + n] = np.arange(n)
        filled += n
        if not self.pack:
          break
      if not filled:  # Every source retired and the buffer is empty.
        break
      rows += 1
    if rows == 0:
      return None
    return {"inputs": inputs_BxL, "targets": targets_BxL, "loss_mask": loss_BxL,
            "segment_ids": segments_BxL, "positions": positions_BxL}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    batch = self._global_batch()
    if batch is None:
      self._done = True
      raise StopIteration
    self._batches += 1
    per = self.batch_size // self.process_count
    lo = self.process_index * per
    return _slice_rows(batch, lo, lo + per)


def _slice_rows(tree, lo: int, hi: int):
  if isinstance(tree, dict):
    return {k: _slice_rows(v, lo, hi) for k, v in tree.items()}
  return tree[lo:hi]


class PreferenceIterator(BatchIterator):
  """Aligned (chosen, rejected) batches of preference records, one pair per row (no packing).

  next(it) -> {'chosen': batch, 'rejected': batch}; each batch has the five arrays of `BatchIterator`, row i of
  both holds the same prompt (loss_mask 0) followed by the chosen / rejected completion (loss_mask 1, incl.
  EOS), starting at position 0 with segment id 1. A pair whose chosen or rejected document has more than
  `seq_len` pairs is skipped (a cut completion has no meaningful log-ratio); `skipped` counts them, and a run of
  1000 skips in a row is an error. Order, repeat, sharding and state work as in `BatchIterator`."""

  MAX_SKIPS_IN_A_ROW = 1000

  def __init__(self, mixture, **kwargs):
    super().__init__(mixture, pack=False, cross_document_attention=False, **kwargs)
    self.skipped = 0

  def _pair_tokens(self, source: int, record: int):
    key = (source, record, "pair")
    cached = self._token_cache.get(key)
    if cached is None:
      rec = self.sources[source].record(record)
      if rec.get("format") != "pref":
        raise ValueError(f"source {self.sources[source].spec.text!r}: record {record} has format "
                         f"{rec.get('format')!r}; a preference iterator needs 'pref' records "
                         "(prompt, completion = chosen, rejected)")
      for field, side in (("completion", "chosen"), ("rejected", "rejected")):
        if not rec[field].strip():
          raise ValueError(f"source {self.sources[source].spec.text!r}: record {record} (index "
                           f"{rec.get('index')}) has an empty {side} completion")
      cached = tuple(tokenize_document(self.tokenizer, [(rec["prompt"], False), (rec[field], True)])
                     for field in ("completion", "rejected"))
      if len(self._token_cache) < _TOKEN_CACHE_DOCS:
        self._token_cache[key] = cached
    return cached

  def _global_batch(self):
    B, L = self.batch_size, self.seq_len
    out = {side: {"inputs": np.zeros((B, L), np.int32), "targets": np.zeros((B, L), np.int32),
                  "loss_mask": np.zeros((B, L), np.float32), "segment_ids": np.zeros((B, L), np.int32),
                  "positions": np.zeros((B, L), np.int32)} for side in ("chosen", "rejected")}
    rows, skips_in_a_row = 0, 0
    while rows < B:
      drawn = self._draw_document()
      if drawn is None:
        break
      pair = self._pair_tokens(*drawn)
      if max(len(ids) - 1 for ids, _ in pair) > L:
        self.skipped += 1
        skips_in_a_row += 1
        if skips_in_a_row >= self.MAX_SKIPS_IN_A_ROW:
          raise ValueError(f"preference pairs of {[t for t, _ in self.mixture]}: {skips_in_a_row} pairs "
                           f"in a row are longer than seq_len={L}; raise seq_len")
        continue
      skips_in_a_row = 0
      for side, (ids, flags) in zip(("chosen", "rejected"), pair):
        n = len(ids) - 1
        batch = out[side]
        batch["inputs"][rows, :n] = ids[:n]
        batch["targets"][rows, :n] = ids[1:n + 1]
        batch["loss_mask"][rows, :n] = flags[1:n + 1]
        batch["segment_ids"][rows, :n] = 1
        batch["positions"][rows, :n] = np.arange(n)
      rows += 1
    return out if rows else None


def make_preference_iterator(mixture, *, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                             split: str = "train", data_dir: str, process_index: int = 0, process_count: int = 1,
                             repeat: bool = True) -> PreferenceIterator:
  """Aligned chosen/rejected batches of preference sources (e.g. 'preferences'); see `PreferenceIterator`."""
  return PreferenceIterator(mixture, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            split=split, data_dir=data_dir, process_index=process_index,
                            process_count=process_count, repeat=repeat)


def make_iterator(mixture, *, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                  split: str = "train", data_dir: str, process_index: int = 0, process_count: int = 1,
                  pack: bool = True, cross_document_attention: bool = False, repeat: bool = True,
                  truncate: bool = False) -> BatchIterator:
  """Batches of `mixture` (a spec string or [(source, weight)]); see the module docstring.

  next(it) -> dict of numpy arrays [batch_size // process_count, seq_len]: 'inputs', 'targets', 'segment_ids',
  'positions' (int32) and 'loss_mask' (float32)."""
  return BatchIterator(mixture, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed,
                       split=split, data_dir=data_dir, process_index=process_index, process_count=process_count,
                       pack=pack, cross_document_attention=cross_document_attention, repeat=repeat,
                       truncate=truncate)
