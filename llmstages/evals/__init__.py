"""Evaluation after a stage: a registry of evaluators, run on the stage's final parameters.

Each stage lists its evaluators in `config.<stage>.evals`; their settings live in `config.eval`. Results go to
`<workdir>/<stage>/eval.json` (every metric with its sample count and a 95% bootstrap interval over prompts) and to
TensorBoard. Adding an evaluator is one decorated function in `evaluators.py`:

    @register('my_eval')
    def my_eval(ctx: EvalContext) -> dict[str, Metric]: ...
"""

from llmstages.evals.core import EvalContext, Metric, evaluate_stage, get, names, register

__all__ = ["EvalContext", "Metric", "evaluate_stage", "get", "names", "register"]
