"""What a stage's local files hold, measured before training: examples, tokens, examples longer than seq_len, and
the epochs the stage's steps imply (as OpenAI's fine-tuning reports before a job starts).

Only `file:` and `chat:` sources are measured (they are in memory and usually small); corpora are not.

Too-long examples (more than `seq_len` training pairs) follow `too_long`:
    error     refuse: training does not start; the message names the file and its too-long lines
    truncate  cut to seq_len pairs (`BatchIterator(truncate=True)`), counted in the report
    chunk     cut into seq_len-long pieces, each its own segment (the iterator's behaviour for corpora)
    auto      error for chat files, chunk otherwise
"""

from __future__ import annotations

import dataclasses

from llmstages.data import loader, sources

TOO_LONG = ("auto", "error", "truncate", "chunk")


@dataclasses.dataclass
class FileStats:
  source: str
  examples: int
  tokens: int          # [BOS] + tokens + [EOS], summed
  loss_tokens: int     # tokens that carry loss
  longest: int
  too_long: list[int]  # line numbers (or record indices) of examples with more than seq_len pairs
  excess_pairs: int    # pairs past seq_len, summed over the too-long examples (what truncation drops)
  extra_chunks: int    # pieces beyond one per example when too-long examples are chunked
  chat: bool           # every record is a chat

  def pairs(self, truncate: bool) -> int:
    """Training pairs the file yields per epoch."""
    return self.tokens - self.examples - (self.excess_pairs if truncate else 0)


def file_stats(spec_text: str, tokenizer, seq_len: int, data_dir: str) -> FileStats:
  src = sources.open_source(spec_text, "train", data_dir)
  tokens = loss = longest = excess = extra = 0
  too_long, chat = [], True
  for i in range(len(src)):
    rec = src.record(i)
    chat = chat and rec.get("format") == "chat"
    ids, flags = loader.tokenize_document(tokenizer, sources.record_to_document(rec))
    tokens += len(ids)
    loss += int(flags[1:].sum())
    longest = max(longest, len(ids))
    n_pairs = len(ids) - 1
    if n_pairs > seq_len:
      too_long.append(int(rec.get("line", i)))
      excess += n_pairs - seq_len
      extra += -(-n_pairs // seq_len) - 1
  return FileStats(src.spec.text, len(src), tokens, loss, longest, too_long, excess, extra, chat)


def check_and_report(mixture, *, tokenizer, seq_len: int, batch_size: int, steps: int, pack: bool, data_dir: str,
                     too_long: str, where: str) -> tuple[list[FileStats], list[str]]:
  """(stats, report lines) of the mixture's local files; raises ValueError for refused too-long examples.

  Epochs: each step takes `batch_size` rows; a file of weight share w gets w of them. Packed rows hold up to
  seq_len pairs, so with packing the figure assumes full rows (an upper bound); unpacked, one example per row."""
  if too_long not in TOO_LONG:
    raise ValueError(f"{where}.too_long={too_long!r}; expected one of {TOO_LONG}")
  mixture = sources.parse_mixture(mixture)
  total_w = sum(w for _, w in mixture)
  stats, lines = [], []
  for text, weight in mixture:
    if sources.parse_source(text).kind not in ("file", "chat"):
      continue
    st = file_stats(text, tokenizer, seq_len, data_dir)
    mode = ("error" if st.chat else "chunk") if too_long == "auto" else too_long
    if st.too_long and mode == "error":
      shown = ", ".join(map(str, st.too_long[:10])) + (" ..." if len(st.too_long) > 10 else "")
      raise ValueError(f"{where}: {len(st.too_long)} of {st.examples} examples in {st.source} are longer than "
                       f"seq_len={seq_len} tokens (longest {st.longest}; lines {shown}); raise "
                       f"{where}.seq_len, shorten them, or set {where}.too_long=truncate (or chunk)")
    share = weight / total_w
    if pack:
      epochs = steps * batch_size * seq_len * share / max(st.pairs(mode == "truncate"), 1)
    else:
      epochs = steps * batch_size * share / (st.examples + (st.extra_chunks if mode == "chunk" else 0))
    lines.append(f"{st.source}: {st.examples} examples, {st.tokens:,} tokens ({st.loss_tokens:,} with loss), "
                 f"longest {st.longest}; {len(st.too_long)} longer than seq_len={seq_len} "
                 f"({'truncated' if mode == 'truncate' else mode if st.too_long else 'none'}); "
                 f"{steps} steps x {batch_size} rows at weight {share:.2f} = "
                 f"{'<= ' if pack else ''}{epochs:.2f} epochs")
    stats.append(st)
  return stats, lines

