"""Token-level losses that return sums and counts, never means: accumulation and packing stay exact.

The cross-entropy's statistics come from one function with a hand-written gradient (`logit_stats`), because
the logits are the step's largest tensor ([B, L, V] float32): its backward is one elementwise pass that builds
d(logits) from the softmax and a one-hot compare, where autodiff of logsumexp and take_along_axis makes several
passes and a scatter.
"""

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


@jax.custom_vjp
def logit_stats(logits_BxLxV: Array, targets_BxL: Array) -> tuple[Array, Array, Array]:
  """(logsumexp, target logit, mean logit) per position of float32 logits, each [B, L]."""
  return _logit_stats(logits_BxLxV, targets_BxL)[0]


def _logit_stats(logits, targets):
  max_BxL = jnp.max(logits, axis=-1)
  logz_BxL = max_BxL + jnp.log(jnp.sum(jnp.exp(logits - max_BxL[..., None]), axis=-1))
  target_BxL = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mean_BxL = jnp.mean(logits, axis=-1)
  return (logz_BxL, target_BxL, mean_BxL), (logits, targets, logz_BxL)


def _logit_stats_bwd(res, cotangents):
  logits, targets, logz_BxL = res
  g_logz, g_target, g_mean = (c[..., None] for c in cotangents)
  v = logits.shape[-1]
  is_target = jnp.arange(v, dtype=targets.dtype) == targets[..., None]
  d_logits = (jnp.exp(logits - logz_BxL[..., None]) * g_logz + jnp.where(is_target, g_target, 0.0)
              + g_mean / v)
  return d_logits.astype(logits.dtype), None


logit_stats.defvjp(_logit_stats, _logit_stats_bwd)


def token_logprobs(logits_BxLxV: Array, targets_BxL: Array) -> Array:
  """log p(target) per position, float32."""
  logz_BxL, target_logit_BxL, _ = logit_stats(logits_BxLxV.astype(jnp.float32), targets_BxL)
  return target_logit_BxL - logz_BxL


def masked_sum(values_BxL: Array, mask_BxL: Array) -> Array:
  """Per-row sum of `values` where `mask` is set, [B] float32."""
  return jnp.sum(values_BxL.astype(jnp.float32) * mask_BxL.astype(jnp.float32), axis=-1)


def next_token_loss(logits_BxLxV: Array, targets_BxL: Array, mask_BxL: Array, label_smoothing=0.0, z_loss=0.0):
  """Cross-entropy with optional label smoothing and z-loss, summed over masked tokens.

  Returns (loss_sum, token_count, metrics) where metrics are sums too: `nll` is the un-smoothed negative
  log-likelihood, `correct` counts positions whose target has the largest logit (a tie for the largest counts
  as a hit). Label smoothing spreads `label_smoothing` of the target mass uniformly over the vocabulary; z-loss
  adds z_loss * logsumexp(logits)^2 (PaLM).
  """
  logits = logits_BxLxV.astype(jnp.float32)
  mask = mask_BxL.astype(jnp.float32)
  logz_BxL, target_logit_BxL, mean_logit_BxL = logit_stats(logits, targets_BxL)
  nll_BxL = logz_BxL - target_logit_BxL
  smooth_BxL = logz_BxL - mean_logit_BxL  # Cross-entropy against the uniform distribution.
  loss_BxL = (1.0 - label_smoothing) * nll_BxL + label_smoothing * smooth_BxL + z_loss * jnp.square(logz_BxL)
  # The same max the logsumexp takes (XLA computes it once): no argmax pass over the logits.
  correct_BxL = (target_logit_BxL >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  metrics = {"nll": jnp.sum(nll_BxL * mask), "correct": jnp.sum(correct_BxL * mask),
             "logz_sq": jnp.sum(jnp.square(logz_BxL) * mask)}
  return jnp.sum(loss_BxL * mask), jnp.sum(mask), metrics
