"""FLOP counts and the roofline: published per-chip TPU figures, model FLOPs per token, a step-time lower bound.

Pure arithmetic, no devices: `llmstages.bench` (MFU on this machine) and `llmstages.aot` (predictions for TPU
topologies) both count model FLOPs with `train_flops_per_token`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # Dense bf16 FLOP/s.
  hbm_bytes: float
  hbm_bytes_per_s: float


GIB = 2**30
# Published per-chip figures, Google Cloud TPU documentation (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e,
# "system architecture" tables): bf16 peak compute, HBM capacity, HBM bandwidth. Keyed by jax `device_kind`.
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * GIB, 1228e9),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GIB, 819e9),
    "TPU v5": Chip("v5p", 459e12, 95 * GIB, 2765e9),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GIB, 1640e9),
}


def matmul_params(mc) -> int:
  """Parameters that take part in a matmul per token: every layer's projections and the output projection (the
  embedding lookup is a gather, not a matmul)."""
  h = mc.dim_per_head
  per_layer = mc.d_model * h * (2 * mc.num_heads + 2 * mc.num_kv_heads) + 3 * mc.d_model * mc.mlp_dim
  return mc.num_layers * per_layer + mc.d_model * mc.vocab_size


def train_flops_per_token(mc, seq_len: int) -> float:
  """6 N + 12 * layers * seq_len * heads * head_dim: forward and backward, attention counted as if not causal
  (PaLM's convention, appendix B)."""
  return 6.0 * matmul_params(mc) + 12.0 * mc.num_layers * seq_len * mc.num_heads * mc.dim_per_head


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A lower bound on one step's time on one chip: it can go no faster than its FLOPs at peak, nor than its HBM
  traffic at full bandwidth. Communication between chips and imperfect overlap are not counted: a prediction."""
  compute_s: float
  memory_s: float
  step_s: float
  mfu: float  # Model FLOPs (the formula, not XLA's count, so recomputation does not count) / (step_s * peak).
  tokens_per_s: float  # Whole-topology tokens per second.
  bound: str  # "compute" or "memory".


def roofline(chip: Chip, xla_flops: float, xla_bytes: float, model_flops: float, tokens: int) -> Roofline:
  """`xla_flops`, `xla_bytes`, `model_flops`: per chip per step; `tokens`: per step on the whole topology."""
  compute_s = xla_flops / chip.peak_flops
  memory_s = xla_bytes / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return Roofline(compute_s=compute_s, memory_s=memory_s, step_s=step_s,
                  mfu=model_flops / (step_s * chip.peak_flops), tokens_per_s=tokens / step_s,
                  bound="compute" if compute_s >= memory_s else "memory")
