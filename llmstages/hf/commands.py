"""The `python -m llmstages.hf` commands as functions (the CLI in `__main__.py` only parses flags): import a
Hugging Face model as a finished stage of a workdir, export a stage back out. Entry-point layer: uses train and
pipeline's workdir functions, so a stage written here is read exactly as a trained one."""

from __future__ import annotations

import dataclasses
import os

import jax

from llmstages import config as config_lib
from llmstages import hf, inputs, pipeline, train
from llmstages import workdir as workdir_lib
from llmstages.hf import adapters as adapters_lib
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
  workdir_lib.save_final_params(workdir, stage, params, step=0)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"imported {hf_dir} ({n:,} parameters) as stage {stage!r}: {workdir_lib.final_params_dir(workdir, stage)}",
        flush=True)


def export_model(workdir: str, stage: str, out: str, peft: bool = False, dtype: str = "float32", mesh=None) -> None:
  """Writes stage `stage` of `workdir` as a Hugging Face directory (LoRA merged), or its PEFT adapter."""
  config = pipeline.load_config(workdir)
  if stage not in config:
    raise ValueError(f"--stage={stage!r}: {workdir}/config.json has no config.{stage} block")
  ctx = train.build_context(config, stage, mesh)
  tokenizer = inputs.tokenizer_for(config, workdir)
  if peft:
    export_peft(workdir, stage, ctx, out)
  else:
    params = workdir_lib.load_final_params(workdir, stage, ctx.abstract_lm_params(),
                                           needed_by=f"hf export --stage={stage}")
    hf.save(ctx.model_cfg, params, out, tokenizer=tokenizer, dtype=dtype)
  print(f"exported stage {stage!r} of {workdir} to {out}{' (PEFT adapter)' if peft else ''}", flush=True)


def export_peft(workdir: str, stage: str, ctx, out: str) -> None:
  """The LoRA adapters of `stage` as a PEFT adapter directory over the model of its init_from stage."""
  if not ctx.lora:
    raise ValueError(f"--peft: stage {stage!r} did not train LoRA adapters (config.{stage}.lora.rank is 0)")
  adapters, meta = workdir_lib.load_final_lora(workdir, stage, ctx.abstract_state.params)
  base = ctx.stage_config.init_from
  base_model = ctx.config[base].get("hf_dir", "") if base and base in ctx.config else ""
  adapters_lib.save_peft(ctx.model_cfg, adapters, meta["rank"], meta["alpha"], out, base_model=base_model or base,
               dropout=meta["dropout"])


# SmolLM-135M and Llama-3.2-1B shapes (their config.json values), for the memory table: nothing is downloaded.
MEMORY_MODELS = {
    "SmolLM-135M": dict(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                        tie_embeddings=True, max_seq_len=2048),
    "Llama-3.2-1B": dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                         mlp_dim=8192, tie_embeddings=True, max_seq_len=2048),
}


def memory_rows(rank: int = 16, optimizer: str = "adamw") -> list[dict]:
  """Parameter, gradient and optimizer memory (float32, whole model, before sharding) of full fine-tuning and of
  LoRA on every projection, from the abstract train state `build_context` makes (jax.eval_shape: no weights)."""
  rows = []
  for name, shape in MEMORY_MODELS.items():
    for lora_rank in (0, rank):
      c = config_lib.base_config()
      c.model.update(dict(shape, scan_layers=True))
      c.stages = ("tune",)
      c.tune = config_lib.stage_config("tune", kind="sft", batch_size=1, seq_len=128, optimizer=optimizer)
      c.tune.lora.rank = lora_rank
      c.mesh.fsdp = 1
      mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
      ctx = train.build_context(config_lib.finalize(c), "tune", mesh)
      size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
      count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
      st = ctx.abstract_state
      rows.append({"model": name, "mode": f"LoRA r={lora_rank}" if lora_rank else "full",
                   "parameters": count(ctx.abstract_params), "trainable": count(st.params),
                   "params_bytes": size(ctx.abstract_params) + (size(st.params) if lora_rank else 0),
                   "grads_bytes": size(st.params), "optimizer_bytes": size(st.opt_state)})
  return rows


def memory_table(rank: int = 16) -> str:
  gib = lambda b: f"{b / 2**30:.3f}"
  lines = [f"Training memory, float32, whole model before sharding (AdamW: two moments per trained parameter). LoRA "
           f"r={rank} on q k v o gate up down; activations not included.",
           "| model | mode | parameters | trainable | params GiB | grads GiB | optimizer GiB | total GiB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in memory_rows(rank):
    total = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
    lines.append(f"| {r['model']} | {r['mode']} | {r['parameters']:,} | {r['trainable']:,} | "
                 f"{gib(r['params_bytes'])} | {gib(r['grads_bytes'])} | {gib(r['optimizer_bytes'])} | {gib(total)} |")
  return "\n".join(lines)
