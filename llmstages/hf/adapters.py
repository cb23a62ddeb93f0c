"""LoRA adapters (`llmstages.lora`) as PEFT adapters: adapter_config.json + adapter_model.safetensors."""

from __future__ import annotations

import json
import os

import flax
import jax
import numpy as np
from safetensors.numpy import save_file

from llmstages import lora
from llmstages.hf import hf_module_name
from llmstages.model import HEAD_PARAMS, ModelConfig


def save_peft(mc: ModelConfig, adapters, rank: int, alpha: float, out_dir: str, base_model: str = "",
              dropout: float = 0.0) -> None:
  """Writes LoRA `adapters` (see `llmstages.lora`) as a PEFT adapter: adapter_config.json and
  adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base, out_dir)` loads.

  HF's delta for weight[out, in] is lora_B @ lora_A; ours is a @ b on [in, out] kernels, so lora_A = a.T and
  lora_B = b.T with the head axes flattened in the order HF's rows use."""
  flat = flax.traverse_util.flatten_dict(adapters, sep="/")
  if any(p.split("/")[0] in HEAD_PARAMS for p in flat):
    raise ValueError("save_peft: these adapters train a scalar head, which a PEFT causal-LM adapter cannot hold")
  tensors, modules = {}, []
  for path, a, b in lora.adapter_pairs(adapters):
    template, layers = hf_module_name(mc, path)
    a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
    layered = path.startswith("layers/")
    for j, layer in enumerate(layers or [None]):
      aj, bj = (a[j], b[j]) if layered else (a, b)
      name = template.format(layer) if layer is not None else template
      tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(aj.reshape(-1, rank).T)
      tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(bj.reshape(rank, -1).T)
      modules.append(name)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
            # Our dropout is rank dropout (see llmstages.lora); PEFT would read this as input dropout, which only
            # matters if the adapter is trained further there.
            "lora_dropout": float(dropout), "target_modules": sorted(modules), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": base_model}
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
