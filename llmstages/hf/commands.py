"""The `python -m llmstages.hf` commands as functions (the CLI in `__main__.py` only parses flags): import a
Hugging Face model as a finished stage of a workdir, export a stage back out. Entry-point layer: uses train and
pipeline's workdir functions, so a stage written here is read exactly as a trained one."""

from __future__ import annotations

import dataclasses
import os

import jax

from llmstages import config as config_lib
from llmstages import hf, pipeline, train
from llmstages.data.hf_tokenizer import is_hf_tokenizer_dir

COMMANDS = ("import", "export", "memory")


def import_config(hf_dir: str, stage: str = "base", **model_overrides):
  """The workdir config of an imported model: its ModelConfig, its tokenizer, one `hf_import` stage."""
  mc = hf.config_from_hf(hf_dir, **model_overrides)
  c = config_lib.base_config()
  c.model.update(dataclasses.asdict(mc))
  c.data.tokenizer = os.path.abspath(hf_dir) if is_hf_tokenizer_dir(hf_dir) else ""
  c.stages = (stage,)
  c[stage] = config_lib.stage_config(stage, kind="hf_import", steps=1, init_from="", data="",
                                     seq_len=min(256, mc.max_seq_len), batch_size=jax.device_count())
  c[stage].hf_dir = os.path.abspath(hf_dir)
  return config_lib.finalize(c)


def import_model(hf_dir: str, workdir: str, stage: str = "base", mesh=None, **model_overrides) -> None:
  """Writes `workdir/<stage>` as a finished stage holding the model in `hf_dir`, loaded onto the stage's
  shardings."""
  config = import_config(hf_dir, stage, **model_overrides)
  if not config.data.tokenizer:
    print(f"note: {hf_dir} has no tokenizer.json or tokenizer.model; set config.data.tokenizer before training",
          flush=True)
  ctx = train.build_context(config, stage, mesh)
  _, params = hf.load(hf_dir, ctx.abstract_lm_params(), **model_overrides)
  pipeline.write_resolved_config(config, workdir)
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  train.save_final_params(workdir, stage, params, step=0)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"imported {hf_dir} ({n:,} parameters) as stage {stage!r}: {train.final_params_dir(workdir, stage)}",
        flush=True)


def export_model(workdir: str, stage: str, out: str, peft: bool = False, dtype: str = "float32", mesh=None) -> None:
  """Writes stage `stage` of `workdir` as a Hugging Face directory (LoRA merged), or its PEFT adapter."""
  config = pipeline.load_config(workdir)
  if stage not in config:
    raise ValueError(f"--stage={stage!r}: {workdir}/config.json has no config.{stage} block")
  ctx = train.build_context(config, stage, mesh)
  tokenizer = train.tokenizer_for(config)
  if peft:
    export_peft(workdir, stage, ctx, out)
  else:
    params = train.load_final_params(workdir, stage, ctx.abstract_lm_params(), needed_by=f"hf export --stage={stage}")
    hf.save(ctx.model_cfg, params, out, tokenizer=tokenizer, dtype=dtype)
  print(f"exported stage {stage!r} of {workdir} to {out}{' (PEFT adapter)' if peft else ''}", flush=True)


def export_peft(workdir: str, stage: str, ctx, out: str) -> None:
  """The LoRA adapters of `stage` as a PEFT adapter directory over the model of its init_from stage."""
  if not ctx.lora:
    raise ValueError(f"--peft: stage {stage!r} did not train LoRA adapters (config.{stage}.lora.rank is 0)")
  adapters, meta = train.load_final_lora(workdir, stage, ctx.abstract_state.params)
  base = ctx.scfg.init_from
  base_model = ctx.config[base].get("hf_dir", "") if base and base in ctx.config else ""
  hf.save_peft(ctx.model_cfg, adapters, meta["rank"], meta["alpha"], out, base_model=base_model or base,
               dropout=meta["dropout"])
