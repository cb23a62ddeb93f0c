"""Stages: a stage adds only its typed config block, its loss, its metrics and its data; the loop in
`llmstages.train` does the rest.

Adding a stage is one decorated class (in `base.py`'s terms), in a module this package imports:

    @register('my_stage')
    class MyStage(Stage):
      def loss(self, model, params, batch, step_values, rng, train): ...

Stages: `pretrain`, `cpt`, `sft`, `instruct` (next-token loss on masked targets, `base.py`), `reward` and `dpo`
(`preference.py`), `grpo` and `ppo` (`rl.py`, sampling in `rollout.py`). A stage may also override `Config` (its
typed config block, validated when the stage is built), `batches` (its data), `abstract_batch` (the shapes the step
is compiled for), `prepare` (host or device work between data and step: reference log-probs, rollouts, rewards),
`frozen_models` (frozen parameters it needs) and set `score_head`. Stage kinds live in `llmstages.registry`
(category 'stage'); this package imports every module that registers one.
"""

from __future__ import annotations

from llmstages import registry
from llmstages.stages import preference, rl, rollout  # noqa: F401  (register their stages)
from llmstages.stages.base import (ContinuedPretrain, Imported, InstructionTune, NextTokenConfig,  # noqa: F401
                                   NextTokenStage, Pretrain, Stage, SupervisedFineTune, apply_model, register)


def get(name: str, stage_config=None, where: str = "") -> Stage:
  """A stage of kind `name` for the config block `stage_config` (found at `where`, e.g. 'config.dpo'); its typed
  config is built and checked here, so a bad value fails naming its key before anything compiles."""
  return registry.get("stage", name, where=where)(stage_config, where)


def names() -> list[str]:
  return registry.names("stage")
