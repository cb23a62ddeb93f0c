"""Fact evaluators (docs/RESEARCH.md defines each score).

- `bios_facts`: exact match per attribute on trained people's own biographies cut before the value
  (memorization; greedy only for continued pretraining's new people, `new_people/`), on QA prompts of QA-train
  and QA-test people (extraction) and of never-seen people (answer rate = hallucination rate, since no answer
  about them can be right); greedy, maj@k and pass@k, and K-shot with `eval.shots`.
- `world_facts`: geographic QA with the training and the held-out question templates.
"""

from __future__ import annotations

from llmstages import data
from llmstages.data import bios
from llmstages.evals.answers import matches, records, score_prompts, score_with_shots, with_name
from llmstages.evals.context import EvalContext, Metric, register
from llmstages.text import answer_text


def memorization(ctx: EvalContext, info: dict, people: list[dict], prefix: str = "memorization/",
                 greedy_only: bool = False) -> dict:
  """Each person's first training biography, cut just before the value (the exact text trained on, in every format;
  a template the person's biography never used would test extraction instead). The answer is the rest of that
  sentence: the value, and the template's words after it ("Biology during his studies")."""
  out = {}
  attrs = list(info["questions"])
  render = lambda p: (info["format"], bios.bio_rng(info["seed"], p["id"], 0))
  prefixes = [bios.bio_prefixes(p, *render(p)) for p in people]
  texts = [bios.render_bio(p, *render(p)) for p in people]
  for attr in attrs:
    prompts = [pre[attr] for pre in prefixes]
    rests = [answer_text(full[len(pre):]) for full, pre in zip(texts, prompts)]
    # As many new tokens as the longest answer takes, +2 (a token boundary that differs in context; the period):
    # "Landscape Architecture during her studies" is 20 tokens of the quickstart's 1024-token vocabulary, and at
    # `eval.max_new_tokens` (16) no model could get it right.
    new = max(ctx.settings.max_new_tokens, max(len(ctx.encode_text(" " + r)) for r in rests) + 2)
    # A biography is continued as it was trained, in every prompt format.
    out.update(score_prompts(ctx, prompts, matches(rests), f"{prefix}{attr}/", max_new_tokens=new,
                             continuation=True, greedy_only=greedy_only))
  out[f"{prefix}mean_greedy"] = Metric.mean_of([out[f"{prefix}{a}/greedy"].value for a in attrs])
  return out


@register("bios_facts", needs=("bios",))
def bios_facts(ctx: EvalContext) -> dict:
  info = data.source_info(ctx.settings.bios, ctx.data_dir)
  n = ctx.settings.num_prompts
  trained = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")][:n]
  out = memorization(ctx, info, trained)
  # Continued pretraining's people (bios_new): 0 until a stage trains on their biographies; greedy only.
  new_people = [p for p in info["facts"] if p["group"] == "new"][:n]
  if new_people:
    out.update(memorization(ctx, info, new_people, "new_people/", greedy_only=True))
  # Extraction: QA on QA-train people (seen in QA data if a stage trained on it) and QA-test people.
  for split, name in (("train", "qa_train"), ("validation", "qa_test")):
    qa = with_name(ctx.settings.bios, "bios_qa")
    recs = records(ctx, qa, split, n)
    prompts = [r["prompt"] for r in recs]
    answers = [r["completion"] for r in recs]
    out.update(score_with_shots(ctx, qa, prompts, matches(answers), f"{name}/"))
  # Never-seen people: any answer is invented.
  recs = records(ctx, with_name(ctx.settings.bios, "bios_qa_unseen"), "train", n)
  greedy = ctx.generate([ctx.encode_question(r["prompt"]) for r in recs],
                        max_new_tokens=ctx.settings.max_new_tokens, temperature=0.0)
  answered = [float(bool(answer_text(ctx.decode(s)))) for s in greedy.sequences()]
  out["unseen/answer_rate"] = Metric.mean_of(answered)
  return out


@register("world_facts", needs=("world",))
def world_facts(ctx: EvalContext) -> dict:
  out = {}
  for split, name in (("train", "train_templates"), ("validation", "heldout_templates")):
    qa = with_name(ctx.settings.world, "world_qa")
    recs = records(ctx, qa, split, ctx.settings.num_prompts)
    answers = [r["completion"] for r in recs]
    out.update(score_with_shots(ctx, qa, [r["prompt"] for r in recs], matches(answers), f"{name}/"))
  return out
