"""The `arith` evaluator: arithmetic answers checked against the solution (`data.arith.solve`), scratchpad or
answer-only per `eval.arith`; greedy, maj@k, pass@k (voting on the final number) and K-shot with `eval.shots`."""

from __future__ import annotations

from llmstages.data import arith as arith_data
from llmstages.evals.answers import records, score_with_shots
from llmstages.evals.context import EvalContext, register
from llmstages.evals.prompts import arith_answer


@register("arith", needs=("arith",))
def arith(ctx: EvalContext) -> dict:
  spec = ctx.settings.arith
  recs = records(ctx, spec, "validation", ctx.settings.num_prompts)
  prompts = [r["prompt"] for r in recs]
  scratchpad = "scratchpad" in spec
  new = ctx.settings.max_new_tokens * (4 if scratchpad else 1)
  # In the chat template a worked answer is asked for as instruction tuning asks for it.
  ask = "Show your work. " if scratchpad and ctx.prompt_format == "chat" else ""
  solutions = [arith_data.solve(*arith_data.parse_prompt(p)) for p in prompts]
  return score_with_shots(ctx, spec, prompts, lambda i, a: a is not None and int(a) == solutions[i], "",
                          max_new_tokens=new, extract=arith_answer, questions=[ask + p for p in prompts])
