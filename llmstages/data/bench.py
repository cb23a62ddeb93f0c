"""`python -m llmstages.data.bench`: data-layer speed, printed as JSON lines.

1. Time to build the quickstart corpora from scratch into a temporary directory: bios (N=2000, simple and
   multi_permute), arith, world; and to train the 8192-piece tokenizer on them.
2. Loader throughput (batches/s, tokens/s) for batch 16 x seq_len 256 on a bios mixture, cold (first pass,
   tokenizing) and warm (token cache filled), and the share of non-padding tokens.

Options: --data_dir DIR (reuse a directory instead of a fresh temp dir), --batches N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from llmstages import data
from llmstages.data import sources

QUICKSTART = ("bios(n=2000,format=simple)", "bios(n=2000,format=multi_permute)", "arith", "world")
MIXTURE = "bios(n=2000,format=multi_permute):0.8,bios_qa(n=2000,format=multi_permute):0.2"


def _emit(**fields):
  print(json.dumps(fields), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--batches", type=int, default=300)
  args = parser.parse_args(argv)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="llmstages_bench_")
  try:
    total = 0.0
    for spec in QUICKSTART:
      start = time.perf_counter()
      sources.corpus_builder(sources.parse_source(spec), data_dir)
      seconds = time.perf_counter() - start
      total += seconds
      _emit(bench="build", source=spec, seconds=round(seconds, 3))
    start = time.perf_counter()
    tok = data.get_tokenizer(list(QUICKSTART), 8192, data_dir)
    seconds = time.perf_counter() - start
    total += seconds
    _emit(bench="tokenizer", vocab_requested=8192, vocab_size=tok.vocab_size, seconds=round(seconds, 3))
    _emit(bench="build_total", seconds=round(total, 3))

    B, L = 16, 256
    it = data.make_iterator(MIXTURE, tokenizer=tok, batch_size=B, seq_len=L, seed=0, data_dir=data_dir)
    for phase in ("cold", "warm"):
      real = 0
      start = time.perf_counter()
      for _ in range(args.batches):
        batch = next(it)
        real += int((batch["segment_ids"] > 0).sum())
      seconds = time.perf_counter() - start
      _emit(bench="loader", phase=phase, mixture=MIXTURE, batch_size=B, seq_len=L, batches=args.batches,
            batches_per_s=round(args.batches / seconds, 1),
            tokens_per_s=round(args.batches * B * L / seconds),
            real_tokens_per_s=round(real / seconds), fill=round(real / (args.batches * B * L), 3))
    start = time.perf_counter()
    state = it.get_state()
    resumed = data.make_iterator(MIXTURE, tokenizer=tok, batch_size=B, seq_len=L, seed=0, data_dir=data_dir)
    resumed.set_state(json.loads(json.dumps(state)))
    next(resumed)
    _emit(bench="resume", seconds=round(time.perf_counter() - start, 3), state_bytes=len(json.dumps(state)))
  finally:
    if args.data_dir is None:
      shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
