"""Loads a finished stage of a workdir for sampling: the resolved config, the tokenizer, a KV-cache sampler on
the stage's mesh and the stage's final parameters. `generate` and `serve` share it (an L4 helper for L5 entry
points: it sits above `train`, which builds the stage's context and restores the parameters)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmstages import pipeline, train
from llmstages.sampler import Sampler


@dataclasses.dataclass
class LoadedStage:
  """What sampling from a finished stage needs."""
  config: Any
  stage: str
  tokenizer: Any
  sampler: Sampler
  params: Any

  def encode_prompt(self, text: str) -> list[int]:
    """BOS + the prompt's tokens, as training laid documents out."""
    return [self.tokenizer.bos_id] + self.tokenizer.encode(text)


def load_stage(workdir: str, stage: str, mc_dropout: float = 0.0, needed_by: str = "") -> LoadedStage:
  config = pipeline.load_config(workdir)
  if stage not in config.stages:
    raise ValueError(f"--stage={stage!r} is not one of this workdir's stages {list(config.stages)}")
  tctx = train.build_context(config, stage)
  params = train.load_final_params(workdir, stage, tctx.abstract_lm_params(),
                                   needed_by=needed_by or f"--stage={stage}")
  tok = train.tokenizer_for(config)
  sampler = Sampler(tctx.model_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=tctx.mesh, rules=tctx.rules,
                    mc_dropout=mc_dropout)
  return LoadedStage(config=config, stage=stage, tokenizer=tok, sampler=sampler, params=params)
