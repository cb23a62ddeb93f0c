"""The `diversity` evaluator: creative diversity of story continuations. Per-input (k samples of one prompt) and
across-input (one sample per prompt) distinct-n, EAD, self-BLEU, Ent-n, the sampled tokens' mean NLL (an entropy
estimate), novelty against the training stories, validity and effective diversity."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llmstages import data
from llmstages.data import instructions
from llmstages.data import stories as stories_data
from llmstages.evals import metrics
from llmstages.evals.answers import records, with_name
from llmstages.evals.context import EvalContext, Metric, register


def continuation(reply: str, opener: str) -> str:
  """A story reply without the opener it starts from, if it retells it (instruction tuning teaches replies that
  continue the opener, as a raw continuation does; a model may still retell it)."""
  reply = reply.strip()
  return reply[len(opener):].strip() if reply.startswith(opener) else reply


def story_vocabulary(ctx: EvalContext) -> frozenset[str]:
  """The word types the story grammar of `eval.stories` can write: EAD's V, the same whatever the model samples."""
  args = data.source_info(with_name(ctx.settings.stories, "stories"), ctx.data_dir)["arguments"]
  defaults = stories_data.StoriesConfig(name="vocabulary")
  pick = lambda key: args.get(key, getattr(defaults, key))
  return stories_data.word_vocabulary(int(pick("bios_n")), int(pick("bios_seed")), float(pick("bios_fraction")))


def diversity_scores(groups: Sequence[Sequence[Sequence[str]]], vocab: int) -> dict:
  """Per-input (the k samples of one prompt) and across-input (each prompt's first sample) diversity of tokenized
  samples grouped by prompt; `vocab` is EAD's V. A prompt's per-input scores depend on its own samples alone."""
  across = [g[0] for g in groups]
  out = {}
  for n in (1, 2, 3):
    out[f"per_input/distinct_{n}"] = Metric.mean_of([metrics.distinct_n(g, n) for g in groups])
    out[f"across_input/distinct_{n}"] = Metric(metrics.distinct_n(across, n), len(across))
  out["per_input/ead"] = Metric.mean_of([metrics.ead_avg(g, vocab) for g in groups])
  out["across_input/ead"] = Metric(metrics.ead_avg(across, vocab), len(across))
  out["per_input/self_bleu4"] = Metric.mean_of([metrics.self_bleu(g) for g in groups])
  out["across_input/self_bleu4"] = Metric(metrics.self_bleu(across), len(across))
  out["across_input/ent_2"] = Metric(metrics.ngram_entropy(across, 2), len(across))
  return out


def novelty_scores(ctx: EvalContext, tokens: Sequence[Sequence[str]]) -> dict:
  """Share of each sample's 4- and 8-grams that no training story (of the first 5000) contains."""
  train_src = data.open_source(with_name(ctx.settings.stories, "stories"), "train", ctx.data_dir)
  corpus = [" ".join(text for text, _ in train_src.document(i)) for i in range(min(len(train_src), 5000))]
  out = {}
  for n in (4, 8):
    ref = metrics.build_ngram_set(corpus, n)
    out[f"novelty_{n}"] = Metric.mean_of([metrics.novelty([t], ref, n) for t in tokens if len(t) >= n])
  return out


@register("diversity", needs=("stories",))
def diversity(ctx: EvalContext) -> dict:
  settings = ctx.settings
  recs = records(ctx, with_name(settings.stories, "stories_prompts"), "validation", settings.num_prompts)
  openers = [r["prompt"] for r in recs]
  k = max(settings.samples, 2)
  if ctx.prompt_format == "chat":  # The request instruction tuning taught; the reply continues the opener.
    ids = [ctx.encode_question(instructions.STORY_REQUESTS[0].format(opener=o)) for o in openers]
  else:
    ids = [ctx.encode_text(o) for o in openers]
  samples = ctx.generate(ids, max_new_tokens=settings.story_tokens, temperature=settings.temperature,
                         num_samples=k, seed=ctx.seed)
  texts = [continuation(ctx.decode(s), openers[i // k]) for i, s in enumerate(samples.sequences())]
  tokens = [t.split() for t in texts]
  groups = [tokens[i * k:(i + 1) * k] for i in range(len(openers))]
  across = [g[0] for g in groups]
  vocab = settings.ead_vocab or len(story_vocabulary(ctx))
  out = {"ead_vocab": Metric(float(vocab), 1), **diversity_scores(groups, vocab)}
  lengths = np.maximum(samples.lengths, 1)
  out["token_nll"] = Metric.mean_of(-samples.logprobs.sum(axis=1) / lengths)  # Entropy estimate at T=1.
  out.update(novelty_scores(ctx, tokens))
  full = [f"{openers[i // k]} {texts[i]}" for i in range(len(texts))]
  people = data.source_info(settings.bios, ctx.data_dir)["facts"] if settings.bios else None
  valid = [stories_data.check_story(t, people) for t in full]
  out["validity"] = Metric.mean_of([float(v) for v in valid])
  valid_across = [valid[i * k] for i in range(len(openers))]
  out["effective_distinct_2"] = Metric(metrics.effective_diversity(across, valid_across, n=2),
                                       int(sum(valid_across)))
  return out
