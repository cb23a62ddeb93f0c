r"""Checks JSONL training files before a run, as OpenAI's fine-tuning data checks do.

  python -m llmstages.data.validate FILE [FILE ...] [--format=chat] [--tokenizer=SPM_MODEL --seq_len=N]

Every line is validated (`llmstages.data.jsonl`); a bad file prints each bad line as FILE:LINE: problem and the
command exits 1. A good file prints its line formats and, for chat, the messages per example and role counts.
With `--tokenizer` (a pipeline's `spm.model`, under DATA_DIR/tokenizers/) it also prints token counts and how
many examples are longer than `--seq_len`. Training prints the same token report before its first step.
"""

from __future__ import annotations

import argparse
import collections
import sys

from llmstages.data import chat, jsonl, loader, sources
from llmstages.data.tokenizer import Tokenizer


def describe(path: str, fmt: str | None, tokenizer=None, seq_len: int = 0) -> list[str]:
  formats, records = jsonl.read_jsonl(path, fmt)
  lines = [f"{path}: {len(records)} examples OK ({', '.join(f'{n} {f}' for f, n in formats.items())})"]
  chats = [r for r in records if r["format"] == "chat"]
  if chats:
    roles = collections.Counter()
    turns = []
    for r in chats:
      segs = [piece for piece, _ in chat.chat_segments(r["text"])]
      counts = collections.Counter(role for role, tag in chat.ROLES.items() for s in segs if s.startswith(tag))
      roles.update(counts)
      turns.append(sum(counts.values()))
    lines.append(f"  messages per example: min {min(turns)}, max {max(turns)}, mean {sum(turns) / len(turns):.1f};"
                 f" roles: {dict(roles)}")
  if tokenizer is not None:
    sizes = [len(loader.tokenize_document(tokenizer, sources.record_to_document(r))[0]) for r in records]
    lines.append(f"  tokens: {sum(sizes):,} in all, longest {max(sizes)}, mean {sum(sizes) / len(sizes):.1f}")
    if seq_len:
      long = [r["line"] for r, n in zip(records, sizes) if n - 1 > seq_len]
      lines.append(f"  {len(long)} longer than seq_len={seq_len}" + (f" (lines {long[:10]})" if long else ""))
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llmstages.data.validate", description=__doc__.split("\n\n")[0])
  parser.add_argument("files", nargs="+")
  parser.add_argument("--format", choices=jsonl.FORMATS, default=None, help="require every line in this format")
  parser.add_argument("--tokenizer", default=None, help="a SentencePiece model for token counts")
  parser.add_argument("--seq_len", type=int, default=0, help="report examples longer than this many tokens")
  args = parser.parse_args(argv)
  tokenizer = None
  if args.tokenizer:
    tokenizer = Tokenizer.load(args.tokenizer)
  failed = False
  for path in args.files:
    try:
      print("\n".join(describe(path, args.format, tokenizer, args.seq_len)))
    except (ValueError, FileNotFoundError, OSError) as e:
      print(f"INVALID {e}", file=sys.stderr)
      failed = True
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
