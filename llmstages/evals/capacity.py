"""The `capacity` evaluator: knowledge capacity R and R_max in bits per parameter (Physics of LMs 3.3), from the
deterministic losses of the name and value tokens of every trained biography."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from llmstages import data
from llmstages.data import bios
from llmstages.evals import metrics
from llmstages.evals.context import EvalContext, Metric, register

_PRONOUN = re.compile(r"\b(He|She|His|Her|his|her)\b")


@register("capacity", needs=("bios",))
def capacity(ctx: EvalContext) -> dict:
  """R = [N(log2 N0 - p1/ln2) + N(log2 S0 - p2/ln2)] / P (Physics of LMs 3.3, Def. 4.3), no dropout or smoothing.

  Both losses are read in the contexts the model trained on: each trained person's biographies exactly as the
  corpus rendered them (`bios_contexts`), cut into the stage's `seq_len` chunks as training cut them, averaged
  over those renderings. p1: the summed cross-entropy of the
  name tokens right after BOS. p2: the summed cross-entropy of the value tokens of every bit-carrying attribute,
  plus the first token that reveals the pronoun. Every trained person counts. P counts every parameter, embedding
  rows only for tokens that occur in the biographies.
  """
  info = data.source_info(ctx.settings.bios, ctx.data_dir)
  people = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")]
  contexts = bios_contexts(ctx.tokenizer, info, people)
  logprobs = chunked_logprobs(ctx, [c["ids"] for c in contexts], ctx.seq_len)
  p1, p2 = np.zeros(len(people)), np.zeros(len(people))
  for c, lp in zip(contexts, logprobs):
    # lp[t - 1] is log p(ids[t] | ids[:t]); a rendering counts 1/variants of its person's losses.
    p1[c["person"]] -= lp[c["name"] - 1].sum() / c["variants"]
    p2[c["person"]] -= lp[c["values"] - 1].sum() / c["variants"]

  used = {ctx.tokenizer.bos_id, ctx.tokenizer.eos_id}.union(*(c["ids"] for c in contexts))
  model = ctx.model_cfg
  tables = 1 if model.tie_embeddings else 2
  p_used = ctx.num_params - tables * (model.vocab_size - len(used)) * model.d_model
  p_nonembed = ctx.num_params - tables * model.vocab_size * model.d_model
  bits = lambda params: metrics.knowledge_capacity(float(np.mean(p1)), float(np.mean(p2)), len(people), info["N0"],
                                                   info["S0"], params)
  cap, cap_nonembed = bits(p_used), bits(p_nonembed)
  n = len(people)
  return {"R": Metric(cap["R"], n), "R_max": Metric(cap["R_max"], n), "bits": Metric(cap["bits"], n),
          "bits_max": Metric(cap["bits_max"], n), "R_nonembedding": Metric(cap_nonembed["R"], n),
          "p1_nats": Metric.mean_of(p1), "p2_nats": Metric.mean_of(p2), "params_counted": Metric(p_used, 1),
          "params_nonembedding": Metric(p_nonembed, 1), "renderings_per_person": Metric(contexts[0]["variants"], n)}


def chunked_logprobs(ctx: EvalContext, sequences: Sequence[Sequence[int]], seq_len: int) -> list[np.ndarray]:
  """Per-token log-probs of each sequence as training saw it: a document longer than `seq_len` pairs is cut into
  chunks of `seq_len` pairs, each trained without the chunks before it (`data.loader`)."""
  chunks, owners = [], []
  for i, ids in enumerate(sequences):
    for start in range(0, len(ids) - 1, seq_len):
      chunks.append(ids[start:start + seq_len + 1])
      owners.append(i)
  per_chunk = ctx.logprobs(chunks)
  out = [[] for _ in sequences]
  for i, lp in zip(owners, per_chunk):
    out[i].append(lp)
  return [np.concatenate(parts) for parts in out]


def bios_contexts(tokenizer, info: dict, people: Sequence[dict]) -> list[dict]:
  """Every training biography of `people`, re-rendered as the corpus wrote it, with the token positions to score.

  One dict per (person, rendering): 'ids' (BOS + the biography's tokens, as the data pipeline tokenizes it),
  'name' (positions of the tokens of the opening name), 'values' (positions of the tokens that overlap a
  bit-carrying attribute's value, and of the first pronoun, which carries the gender bit), 'person' (index into
  `people`) and 'variants' (renderings per person). Positions count BOS as 0.
  """
  variants = info["variants"]
  out = []
  for index, person in enumerate(people):
    for v in range(variants):
      text, spans = "", []
      for attr, sentence in bios.bio_sentences(person, info["format"], bios.bio_rng(info["seed"], person["id"], v)):
        text += " " if text else ""  # As `bios.render_bio` joins the sentences.
        begin = len(text) + sentence.index("{v}")
        text += sentence.replace("{v}", person[attr])
        if attr in info["bit_attributes"]:
          spans.append((begin, begin + len(person[attr])))
      pronoun = _PRONOUN.search(text, len(person["name"]))
      if pronoun:
        spans.append(pronoun.span())
      ids, token_spans = tokenizer.encode_with_spans(text)
      overlaps = lambda lo, hi: [t + 1 for t, (a, b) in enumerate(token_spans) if a < hi and b > lo]
      if not text.startswith(person["name"]):
        raise ValueError(f"bios rendering {v} of person {person['id']} does not open with the name: {text[:60]!r}")
      out.append({"ids": [tokenizer.bos_id] + ids, "person": index, "variants": variants,
                  "name": np.asarray(overlaps(0, len(person["name"])), np.int64),
                  "values": np.asarray(sorted({t for lo, hi in spans for t in overlaps(lo, hi)}), np.int64)})
  return out
