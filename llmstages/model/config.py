"""Model configuration: the architecture's sizes (`ModelConfig`), which regularization sites exist (`RegSites`),
remat policies and the layout of the traced regularization rates (`zero_rates`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 8192
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_dim: int = 768
  max_seq_len: int = 2048
  dtype: str = "float32"
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  # Llama 3.1+ RoPE frequency scaling ("llama3" rope_type); factor 0 is plain RoPE.
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  init_std: float = 0.02
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "xla"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    mc = cls(**{k: cfg[k] for k in names if k in cfg})
    mc.validate()
    return mc

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def validate(self):
    def bad(key, why):
      raise ValueError(f"config.model.{key}: {why}")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if not self.head_dim and self.d_model % self.num_heads:
      bad("num_heads", f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set model.head_dim")
    if self.dim_per_head % 2:
      bad("head_dim", f"RoPE needs an even head dim, got {self.dim_per_head}")
    if self.rope_scaling_factor and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
      bad("rope_high_freq_factor", f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor > 0, got "
          f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
    if self.remat not in REMAT_POLICIES:
      bad("remat", f"{self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.attention not in ("auto", "xla", "cudnn", "manual"):  # xla and manual: `explicit_attention`.
      bad("attention", f"{self.attention!r} is not one of auto, xla, cudnn, manual")
    try:
      jnp.dtype(self.dtype)
    except TypeError:
      bad("dtype", f"{self.dtype!r} is not a dtype name (float32, bfloat16, ...)")


@dataclasses.dataclass(frozen=True)
class RegSites:
  """Which stochastic regularizers exist in the compiled forward pass (static). Their rates are traced."""
  embed_dropout: bool = False
  attn_dropout: bool = False
  residual_dropout: bool = False
  mlp_dropout: bool = False
  drop_path: bool = False
  neftune: bool = False

  @property
  def any(self) -> bool:
    return any(dataclasses.astuple(self))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

LAYER_RATE_KEYS = ("attn_dropout", "residual_dropout", "mlp_dropout", "drop_path")


def zero_rates(num_layers: int) -> dict[str, Array]:
  """Rates that switch every regularizer off; the layout `__call__` expects."""
  rates = {k: jnp.zeros((num_layers,), jnp.float32) for k in LAYER_RATE_KEYS}
  rates["embed_dropout"] = jnp.zeros((), jnp.float32)
  rates["neftune_alpha"] = jnp.zeros((), jnp.float32)
  return rates

