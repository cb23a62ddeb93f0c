"""Loss evaluators.

- `perplexity`: held-out next-token loss, perplexity and accuracy of the language model on `eval.perplexity_data`
  (validation split), or on the stage's own held-out mixture when that is empty (next-token stages only).
- `stage`: the stage's own held-out metrics (its loss on `eval_steps` validation batches): preference accuracy and
  margin of a reward model or DPO policy (n: pairs), mean reward of RL rollouts (n: held-out prompts, the
  independent samples; a prompt's G rollouts and their tokens are not), next-token loss otherwise (n: tokens).
"""

from __future__ import annotations

from llmstages import data
from llmstages.evals.context import EvalContext, Metric, register


@register("perplexity")
def perplexity(ctx: EvalContext) -> dict:
  spec = ctx.settings.perplexity_data
  if not spec and not ctx.next_token_stage:
    raise ValueError(f"stage {ctx.stage!r} is not a next-token stage: set config.eval.perplexity_data to score "
                     f"its perplexity")
  scalars = ctx.lm_loss(data.parse_mixture(spec) if spec else None, ctx.settings.perplexity_batches)
  n = int(scalars["eval/tokens"])
  return {"loss": Metric(scalars["eval/nll"], n), "perplexity": Metric(scalars["eval/perplexity"], n),
          "accuracy": Metric(scalars["eval/accuracy"], n)}


@register("stage")
def stage_metrics(ctx: EvalContext) -> dict:
  scalars = dict(ctx.stage_loss())
  count = scalars.pop("eval/count", scalars.pop("eval/tokens", 0))
  n = int(scalars.pop("eval/prompts", count))
  return {key.split("/", 1)[1]: Metric(value, n) for key, value in scalars.items()}
