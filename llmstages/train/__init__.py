"""The one training loop every stage shares (L3): `context` builds a stage's frozen context (models, mesh,
optimizer, abstract sharded state, the Stage), `step` the sharded train and eval steps, `loop` runs them with
checkpoints, metrics and evaluation, `writer` holds the metric sinks.

A stage (see `llmstages.stages`) supplies only its loss, data and batch preparation; stage-directory I/O is in
`llmstages.workdir` and batch wiring in `llmstages.inputs`.
"""

from llmstages.train.context import (StageContext, build_context, load_frozen,  # noqa: F401
                                     validate_stage_config)
from llmstages.train.loop import TrainingError, evaluate, mean_metrics, run_stage  # noqa: F401
from llmstages.train.step import TrainState  # noqa: F401

__all__ = ["StageContext", "TrainState", "TrainingError", "build_context", "evaluate", "load_frozen",
           "mean_metrics", "run_stage", "validate_stage_config"]
