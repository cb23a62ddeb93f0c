"""Scoring answers to prompts, shared by the fact and arithmetic evaluators: greedy exact match, maj@k and pass@k,
the same prompts after `eval.shots` solved examples, and the eval records those prompts come from.

Greedy means temperature 0 (argmax); maj@k and pass@k draw `eval.samples` samples at `eval.temperature`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from llmstages import data
from llmstages import text as text_lib
from llmstages.evals import metrics
from llmstages.evals.context import EvalContext, Metric
from llmstages.text import answer_text

Judge = Callable[[int, "str | None"], bool]  # judge(i, answer): whether prompt i's answer is right.


def with_name(spec: str, name: str) -> str:
  """`bios(n=10)` -> `bios_qa(n=10)`: the same corpus arguments under another source name."""
  return name + spec[spec.index("("):] if "(" in spec else name


def records(ctx: EvalContext, spec: str, split: str, limit: int) -> list[dict]:
  """The first `limit` records of `spec`'s `split`."""
  src = data.open_source(spec, split, ctx.data_dir)
  return [src.record(i) for i in range(min(limit, len(src)))]


def matches(references: Sequence[str]) -> Judge:
  return lambda i, answer: answer is not None and text_lib.exact_match(answer, references[i])


def score_prompts(ctx: EvalContext, prompts: Sequence[str], correct: Judge, prefix: str,
                  max_new_tokens: int | None = None, extract: Callable[[str], str | None] = answer_text,
                  questions: Sequence[str] | None = None, continuation: bool = False,
                  greedy_only: bool = False) -> dict:
  """Greedy exact match, maj@k and pass@k (not with `greedy_only`) over `prompts`; `correct(i, answer)` judges
  prompt i's answer.

  `extract` takes a reply to the answer that is judged and voted on. `questions` (default: the prompts) are posed
  in the stage's prompt format (`EvalContext.encode_question`); with `continuation`, as raw text to continue.
  """
  settings = ctx.settings
  new = max_new_tokens or settings.max_new_tokens
  encode = ctx.encode_text if continuation else ctx.encode_question
  ids = [encode(q) for q in (questions or prompts)]
  greedy = ctx.generate(ids, max_new_tokens=new, temperature=0.0)
  greedy_ok = [float(correct(i, extract(ctx.decode(seq)))) for i, seq in enumerate(greedy.sequences())]
  out = {f"{prefix}greedy": Metric.mean_of(greedy_ok)}
  k = settings.samples
  if k > 1 and not greedy_only:
    many = ctx.generate(ids, max_new_tokens=new, temperature=settings.temperature, num_samples=k, seed=ctx.seed)
    answers = [extract(ctx.decode(seq)) for seq in many.sequences()]
    majority, passes = [], {kk: [] for kk in settings.pass_k if kk <= k}
    for i in range(len(prompts)):
      mine = answers[i * k:(i + 1) * k]
      vote, _ = text_lib.majority_vote(mine)
      majority.append(float(vote is not None and correct(i, vote)))
      right = sum(bool(correct(i, a)) for a in mine)
      for kk in passes:
        passes[kk].append(metrics.pass_at_k(k, right, kk))
    out[f"{prefix}maj@{k}"] = Metric.mean_of(majority)
    for kk, values in passes.items():
      out[f"{prefix}pass@{kk}"] = Metric.mean_of(values)
  return out


def shot_prefix(ctx: EvalContext, spec: str) -> str:
  """`eval.shots` solved examples, one per line, from the end of `spec`'s train split: evaluators score the first
  `num_prompts` records of a split, so no shot is a scored prompt."""
  k, n = ctx.settings.shots, ctx.settings.num_prompts
  src = data.open_source(spec, "train", ctx.data_dir)
  if len(src) < k + n:
    raise ValueError(f"config.eval.shots={k}: {spec!r} has {len(src)} training records, fewer than shots + "
                     f"num_prompts = {k + n}, so shots would overlap the scored prompts")
  shots = [src.record(i) for i in range(len(src) - k, len(src))]
  return "".join(f"{r['prompt']}{r['completion']}\n" for r in shots)


def score_with_shots(ctx: EvalContext, spec: str, prompts: Sequence[str], correct: Judge, prefix: str,
                     **kw) -> dict:
  """`score_prompts` as asked (0-shot), and with `eval.shots = K > 0` the same prompts after K solved examples of
  `spec`, under `{prefix}{K}shot/`: the prompting baseline fine-tuning has to beat."""
  out = score_prompts(ctx, prompts, correct, prefix, **kw)
  k = ctx.settings.shots
  if k > 0:  # The examples go before the question, inside the chat turn when there is one.
    shots = shot_prefix(ctx, spec)
    questions = [shots + q for q in (kw.pop("questions", None) or prompts)]
    out.update(score_prompts(ctx, prompts, correct, f"{prefix}{k}shot/", questions=questions, **kw))
  return out
