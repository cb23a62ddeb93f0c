"""Evaluation after a stage: evaluators from the registry (category "evaluator"), run on the stage's final
parameters by `evaluate_stage`.

Each stage lists its evaluators in `config.<stage>.evals`; their settings live in `config.eval` (checked as
`settings.EvalConfig`). Results go to `<workdir>/<stage>/eval.json` (every metric with its sample count and a 95%
bootstrap interval over prompts) and to TensorBoard. One module per family: loss (perplexity, stage), facts
(bios_facts, world_facts), arith, capacity, diversity; this package imports them so they register. Adding an
evaluator is one decorated function that uses only the context's functions, never the trainer:

    @register("my_eval", needs=("bios",))
    def my_eval(ctx: EvalContext) -> dict[str, Metric]: ...
"""

from llmstages.evals import arith, capacity, diversity, facts, loss  # noqa: F401  (they register their evaluators)
from llmstages.evals.context import EvalContext, Evaluator, Metric, get, names, register
from llmstages.evals.core import check, evaluate_stage
from llmstages.evals.settings import EvalConfig

__all__ = ["EvalConfig", "EvalContext", "Evaluator", "Metric", "check", "evaluate_stage", "get", "names",
           "register"]
