"""Token-level losses that return sums and counts, never means: accumulation and packing stay exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def first_argmax(x_BxV: Array) -> Array:
  """argmax over the last axis (first index on ties) as two plain reductions: XLA:CPU's variadic-reduce argmax
  is several times slower than a max and a min (on the train step's [4096, 8192] logits: more than the whole
  cross-entropy's forward and backward together)."""
  v = x_BxV.shape[-1]
  is_max = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def token_logprobs(logits_BxLxV: Array, targets_BxL: Array) -> Array:
  """log p(target) per position, float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  logz_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return target_logit_BxL - logz_BxL


def masked_sum(values_BxL: Array, mask_BxL: Array) -> Array:
  """Per-row sum of `values` where `mask` is set, [B] float32."""
  return jnp.sum(values_BxL.astype(jnp.float32) * mask_BxL.astype(jnp.float32), axis=-1)


def next_token_loss(logits_BxLxV: Array, targets_BxL: Array, mask_BxL: Array, label_smoothing=0.0, z_loss=0.0):
  """Cross-entropy with optional label smoothing and z-loss, summed over masked tokens.

  Returns (loss_sum, token_count, metrics) where metrics are sums too: `nll` is the un-smoothed negative
  log-likelihood, `correct` counts argmax hits. Label smoothing spreads `label_smoothing` of the target mass
  uniformly over the vocabulary; z-loss adds z_loss * logsumexp(logits)^2 (PaLM).
  """
  logits = logits_BxLxV.astype(jnp.float32)
  mask = mask_BxL.astype(jnp.float32)
  logz_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = logz_BxL - target_logit_BxL
  smooth_BxL = logz_BxL - jnp.mean(logits, axis=-1)  # Cross-entropy against the uniform distribution.
  loss_BxL = (1.0 - label_smoothing) * nll_BxL + label_smoothing * smooth_BxL + z_loss * jnp.square(logz_BxL)
  correct_BxL = (first_argmax(logits) == targets_BxL).astype(jnp.float32)
  metrics = {"nll": jnp.sum(nll_BxL * mask), "correct": jnp.sum(correct_BxL * mask),
             "logz_sq": jnp.sum(jnp.square(logz_BxL) * mask)}
  return jnp.sum(loss_BxL * mask), jnp.sum(mask), metrics
