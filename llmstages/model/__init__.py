"""The decoder: a functional Flax (linen) Llama-compatible transformer.

Owns the architecture (RMSNorm, RoPE in the Llama rotate-half convention, SwiGLU, grouped-query attention) and
every regularizer that lives inside the forward pass (dropout at four sites, drop-path, NEFTune). Layers only
name their logical axes; `partitioning` maps them to the mesh. `config` holds the sizes and the regularization
sites, `layers` the building blocks; this module the `Decoder`, its output and the scalar head's parameters.

Regularization rates enter `__call__` as traced arrays (`rates`), so changing a rate does not recompile; which
sites exist at all is static (`RegSites`), so a run without dropout pays nothing for it.

Shapes in names: B batch, L (query) length, S key length, D d_model, N query heads, K kv heads, G = N // K,
H head dim, F mlp dim, V vocab, Y layers.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llmstages.model.config import (LAYER_RATE_KEYS, REMAT_POLICIES, ModelConfig, RegSites,  # noqa: F401
                                    zero_rates)
from llmstages.model.layers import (Attention, Block, Einsum, Mlp, RMSNorm, ScannedBlock, ScoreHead,  # noqa: F401
                                    apply_rope, attention_mask, cache_length, cache_mask, constrain, dropout,
                                    explicit_attention, init_cache, neftune_scale, param_init, project, rope,
                                    rope_inv_freq, rope_tables)

Array = jax.Array

HEAD_PARAMS = ("score_head",)  # Parameters of the optional scalar head (not part of the language model).


def split_head(params) -> tuple[dict, dict]:
  """(language model, scalar head) entries of a parameter dict (`HEAD_PARAMS`); either may be empty."""
  lm = {k: v for k, v in params.items() if k not in HEAD_PARAMS}
  head = {k: v for k, v in params.items() if k in HEAD_PARAMS}
  return lm, head


def init_params(model: "Decoder", rng: Array):
  """Fresh (unboxed) parameters of `model`."""
  return nn.unbox(model.init({"params": rng}, jnp.zeros((1, 8), jnp.int32)))["params"]


@flax.struct.dataclass
class DecoderOutput:
  """What every `Decoder` call returns: float32 logits, the scalar head's float32 scores (a model with
  `score_head`, else None) and the updated KV cache (when decoding with a cache, else None)."""
  logits: Array  # [B, L, V]
  scores: Array | None = None  # [B, L]
  cache: Any = None


class Decoder(nn.Module):
  """tokens -> `DecoderOutput`. `rates` as in `zero_rates`; `deterministic=True` switches every regularizer off.

  `score_head=True` adds a scalar head on the final hidden state (reward model, PPO value head), whose scores the
  output carries. Its parameters live under `score_head`, apart from the language model's.
  """
  cfg: ModelConfig
  sites: RegSites = RegSites()
  score_head: bool = False

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, rates=None, deterministic=True,
               cache=None, cache_index=None, kv_start_B=None, last_only: bool = False) -> DecoderOutput:
    """With `cache` (see `init_cache`), decodes: tokens go to slots cache_index.. of the cache, row b attends to
    slots [kv_start_B[b], its own slot] (left-padded prompts), and the output carries the new cache.
    `last_only`: logits (and scores) of the last position only, [B, 1, V] (a prompt's prefill needs no more)."""
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if rates is None:
      rates = zero_rates(cfg.num_layers)
    deterministic = deterministic or not self.sites.any
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                     embedding_init=param_init(cfg.init_std, ("vocab", "embed")), name="embed")
    x_BxLxD = embed(tokens_BxL)
    x_BxLxD = constrain(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
    if not deterministic and self.sites.neftune:
      x_BxLxD = self._neftune(x_BxLxD, segment_ids_BxL, rates["neftune_alpha"])
    if not deterministic and self.sites.embed_dropout:
      x_BxLxD = dropout(x_BxLxD, rates["embed_dropout"], self.make_rng("dropout"))

    if cache is None:
      mask_BxLxS = attention_mask(segment_ids_BxL, l)
    else:
      mask_BxLxS = cache_mask(cache_index, l, cache_length(cache), kv_start_B)
    sincos = rope_tables(positions_BxL, rope_inv_freq(cfg))
    x_BxLxD, cache = self._blocks(x_BxLxD, sincos, mask_BxLxS, rates, deterministic, cache, cache_index)
    if last_only:
      x_BxLxD = x_BxLxD[:, -1:]
    hidden_BxLxD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x_BxLxD)
    if cfg.tie_embeddings:
      table_DxV = embed.embedding.astype(cfg.compute_dtype).T
      logits_BxLxV = project(hidden_BxLxD, table_DxV, 1, jnp.float32)
    else:
      logits_BxLxV = Einsum("bld,dv->blv", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                            cfg.compute_dtype, jnp.float32, name="lm_head")(hidden_BxLxD)
    logits_BxLxV = constrain(logits_BxLxV, ("activation_batch", "activation_length", "activation_vocab"))
    scores_BxL = ScoreHead(cfg.compute_dtype, name="score_head")(hidden_BxLxD) if self.score_head else None
    return DecoderOutput(logits=logits_BxLxV, scores=scores_BxL, cache=cache)

  def _blocks(self, x_BxLxD, rope_sincos, mask_BxLxS, rates, deterministic, cache, cache_index):
    """The layer stack (scanned or unrolled, rematerialized per `cfg.remat`): (hidden, new cache or None)."""
    cfg = self.cfg
    layer_rates = {k: rates[k] for k in LAYER_RATE_KEYS}
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.scan_layers:
      block_cls = ScannedBlock
      if cfg.remat != "none":
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      return stack(cfg, self.sites, deterministic, name="layers")(
          x_BxLxD, (layer_rates, cache), rope_sincos, mask_BxLxS, cache_index)
    block_cls = Block
    if cfg.remat != "none":
      block_cls = nn.remat(block_cls, policy=policy)
    new_cache = []
    for i in range(cfg.num_layers):
      rates_i = {k: v[i] for k, v in layer_rates.items()}
      block = block_cls(cfg, self.sites, deterministic, name=f"layers_{i}")
      if cache is None:
        x_BxLxD = block(x_BxLxD, rope_sincos, mask_BxLxS, rates_i)
      else:
        x_BxLxD, layer_cache = block(x_BxLxD, rope_sincos, mask_BxLxS, rates_i, cache[i], cache_index)
        new_cache.append(layer_cache)
    return x_BxLxD, (new_cache if cache is not None else None)

  def _neftune(self, x_BxLxD, segment_ids_BxL, alpha):
    scale_BxL = neftune_scale(segment_ids_BxL, x_BxLxD.shape, alpha)
    noise = jax.random.uniform(self.make_rng("dropout"), x_BxLxD.shape, jnp.float32, -1.0, 1.0)
    return (x_BxLxD.astype(jnp.float32) + noise * scale_BxL[..., None]).astype(x_BxLxD.dtype)

