"""Loads a finished stage of a workdir for sampling: the resolved config, the tokenizer, a KV-cache sampler on
the stage's mesh and the stage's final parameters. `generate` and `serve` share it, and `generate` (sampling with
answers and a vote) lives here: an entry-point helper above `train`, which builds the stage's context, and
`workdir`, which restores the parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmstages import inputs, pipeline, text, train
from llmstages import workdir as workdir_lib
from llmstages.data import chat as data_chat
from llmstages.evals import prompts as eval_prompts
from llmstages.sampler import Sampler


@dataclasses.dataclass
class LoadedStage:
  """What sampling from a finished stage needs."""
  config: Any
  stage: str
  tokenizer: Any
  sampler: Sampler
  params: Any


def load_stage(workdir: str, stage: str, mc_dropout: float = 0.0, needed_by: str = "") -> LoadedStage:
  config = pipeline.load_config(workdir)
  if stage not in config.stages:
    raise ValueError(f"--stage={stage!r} is not one of this workdir's stages {list(config.stages)}")
  stage_ctx = train.build_context(config, stage)
  params = workdir_lib.load_final_params(workdir, stage, stage_ctx.abstract_lm_params(),
                                         needed_by=needed_by or f"--stage={stage}")
  tok = inputs.tokenizer_for(config, workdir)
  sampler = Sampler(stage_ctx.model_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=stage_ctx.mesh,
                    rules=stage_ctx.rules, mc_dropout=mc_dropout)
  return LoadedStage(config=config, stage=stage, tokenizer=tok, sampler=sampler, params=params)


def generate(workdir: str, stage: str, prompts: list[str], **kw) -> list[dict]:
  """What `python -m llmstages.generate` prints, as data (a library function: the command's module defines flags).

  Samples for each prompt: [{'prompt', 'format', 'samples': [reply, ...], 'answers', 'vote': (answer, share)}]."""
  loaded = load_stage(workdir, stage, mc_dropout=kw.pop("mc_dropout", 0.0), needed_by=f"generate --stage={stage}")
  tok, sampler, params = loaded.tokenizer, loaded.sampler, loaded.params
  chat = kw.pop("chat", "auto")
  fmt = eval_prompts.prompt_format(loaded.config, stage) if chat == "auto" else eval_prompts.PROMPT_FORMATS[chat]
  n = kw.get("num_samples", 1)
  out = sampler.generate(params, [data_chat.encode_prompt(tok, p, chat=fmt == "chat") for p in prompts], **kw)
  replies = [eval_prompts.decode_reply(tok, seq) for seq in out.sequences()]
  results = []
  for i, prompt in enumerate(prompts):
    samples = replies[i * n:(i + 1) * n]
    answers = [eval_prompts.extract_answer(prompt, s) for s in samples]
    results.append({"prompt": prompt, "format": fmt, "samples": samples, "answers": answers,
                    "vote": text.majority_vote(answers)})
  return results
