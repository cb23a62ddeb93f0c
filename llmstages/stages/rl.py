"""On-policy RL stages: `grpo` (verifiable rewards) and `ppo` (a reward model), on rollouts from `rollout.py`.

Aggregation, `rl.loss_type` (GRPO; PPO is token-level), as (sum, count) so that grad_accum stays exact:
'dapo' (default, TRL's current default): sum over completion tokens / their count; 'grpo' (DeepSeekMath): the sum
of per-sequence token means / the number of sequences; 'dr_grpo' (Dr. GRPO): the token sum / max_new_tokens, over
the number of sequences, i.e. divided by the constant max_new_tokens x sequences. GRPO's logged token metrics
(kl, clip_fraction, entropy, ratio) are token means under 'dapo' and means of per-sequence means otherwise.

GRPO (DeepSeekMath): advantage A = (r - mean_group) / (std_group + std_eps) on every token of a sample (std: the
sample standard deviation, ddof=1, as TRL); ratio = exp(logp - logp_old); loss -min(ratio A, clip(ratio) A) +
kl_coef * k3, k3 = exp(ref - logp) - (ref - logp) - 1. Rewards: `rl.rewards` from `llmstages.rewards`, summed
over those that apply to a prompt. A group whose rewards are all equal has A = 0 and no gradient (its share is
logged as `frac_zero_std`).

PPO-RLHF (Ouyang et al. 2022, TRL's PPO): the policy carries a value head (a scalar head on the same trunk). Per
token reward -kl_coef * (logp_old - ref) and, at the last completion token, the frozen reward model's score of
the whole sequence; GAE(gamma, lambda) over completion tokens; advantages whitened over the batch; clipped
policy loss; value loss 0.5 * max((V - R)^2, (clip(V, V_old +- value_clip) - R)^2) weighted by vf_coef.

With `rl.updates_per_rollout` = 1 the ratio is 1 at every step and the clipped objective is the plain policy
gradient (see `rollout.py` for reuse across steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llmstages import partitioning
from llmstages import rewards as rewards_lib
from llmstages.inputs import TokenBatch
from llmstages.model import Decoder, RegSites
from llmstages.stages.base import register
from llmstages.stages.preference import final_scores
from llmstages.stages.rollout import (PromptIterator, RLConfig, RolloutBatch, RolloutStage,  # noqa: F401
                                      record_prompt)

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (tested on their own).

def group_advantages(rewards_R: np.ndarray, group_size: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """GRPO advantages for prompt-major rows: (A per row, whether each group's rewards have zero spread)."""
  r = np.asarray(rewards_R, np.float64).reshape(-1, group_size)
  mean = r.mean(axis=1, keepdims=True)
  std = r.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(mean)
  flat = np.all(r == r[:, :1], axis=1)
  adv = np.where(flat[:, None], 0.0, (r - mean) / np.where(flat[:, None], 1.0, std + eps))
  return adv.reshape(-1).astype(np.float32), flat


def gae(rewards_BxL, values_BxL, mask_BxL, gamma: float, lam: float):
  """Generalized advantage estimation over the masked (completion) steps of each row; unmasked steps are skipped
  (they neither receive an advantage nor break the recursion). Returns (advantages, returns), 0 where unmasked."""
  def step(carry, x):
    next_value, next_adv = carry
    r, v, m = x
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0.0)

  xs = (rewards_BxL.T, values_BxL.T, mask_BxL.T > 0)
  zeros = jnp.zeros(rewards_BxL.shape[:1], jnp.float32)
  _, adv_LxB = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
  adv_BxL = adv_LxB.T
  return adv_BxL, jnp.where(mask_BxL > 0, adv_BxL + values_BxL, 0.0)


def masked_whiten(x_BxL, mask_BxL, eps: float = 1e-8):
  m = mask_BxL.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x_BxL * m) / n
  var = jnp.sum(jnp.square(x_BxL - mean) * m) / n
  return jnp.where(m > 0, (x_BxL - mean) * jax.lax.rsqrt(var + eps), 0.0)


def clipped_policy_loss(logp_BxL, old_logp_BxL, adv, clip_eps):
  """-min(ratio A, clip(ratio, 1-e, 1+e) A) per token, and whether the clipped term was the one taken."""
  ratio = jnp.exp(logp_BxL - old_logp_BxL)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
  return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32), ratio


def k3(logp_BxL, ref_logp_BxL):
  """Schulman's k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
  d = ref_logp_BxL - logp_BxL
  return jnp.exp(d) - d - 1.0


def aggregation_weights(mask_BxL, loss_type: str, max_new_tokens: int):
  """(loss weights, metric weights, count) such that sum(per_token * weights) / count, summed over micro-batches
  before the division, is `rl.loss_type`'s average (see the module docstring)."""
  mask = mask_BxL.astype(jnp.float32)
  tokens_B = jnp.sum(mask, axis=-1)
  sequences = jnp.sum((tokens_B > 0).astype(jnp.float32))
  per_sequence = mask / jnp.maximum(tokens_B, 1.0)[:, None]
  if loss_type == "dapo":
    return mask, mask, jnp.sum(mask)
  if loss_type == "grpo":
    return per_sequence, per_sequence, sequences
  if loss_type == "dr_grpo":
    return mask / float(max_new_tokens), per_sequence, sequences
  raise ValueError(f"rl.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def policy_entropy(logits_BxLxV):
  """Entropy of the (temperature-scaled) policy at each position."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# The stages.

@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(RLConfig):
  def __post_init__(self):
    super().__post_init__()
    for name in self.rewards:
      rewards_lib.get(name)
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"{self.where}.rl.loss_type={self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not self.rewards:
      raise ValueError(f"{self.where}.rl.rewards is empty: GRPO needs at least one reward function")


@register("grpo")
class GRPO(RolloutStage):
  Config = GRPOConfig

  def abstract_batch(self, ctx):
    rows = jax.ShapeDtypeStruct((self.cfg.batch_size,), jnp.float32, sharding=partitioning.batch_sharding(ctx.mesh))
    return super().abstract_batch(ctx).replace(advantages=rows)

  def make_experience(self, ctx, params, prompts, step, split):
    cfg = self.cfg
    rows, replies, prompt_index, stats = self.rollout(ctx, params, prompts, step, split)
    per_fn = {name: [] for name in cfg.rewards}
    total = np.zeros((len(replies),), np.float64)
    for r, reply in enumerate(replies):
      scores = rewards_lib.score(cfg.rewards, reply, prompts[prompt_index[r]], f"stage {ctx.name}")
      for name, v in scores.items():
        if v is not None:
          per_fn[name].append(v)
          total[r] += v
    adv, flat = group_advantages(total, cfg.num_generations, cfg.std_eps)
    arrays = partitioning.global_batch({**rows, "advantages": adv}, ctx.mesh)
    tokens = TokenBatch.from_dict(arrays)
    batch = RolloutBatch(tokens=tokens, advantages=arrays["advantages"], **self.logprob_passes(ctx, params, tokens))
    groups = total.reshape(-1, cfg.num_generations)
    host = {"reward": float(total.mean()), "reward_std": float(groups.std(axis=1, ddof=1).mean())
            if cfg.num_generations > 1 else 0.0, "frac_zero_std": float(flat.mean()), **stats}
    for name, vals in per_fn.items():
      if vals:
        host[f"reward_{name}"] = float(np.mean(vals))
    return batch, host

  def loss(self, model, params, batch, step_values, rng, train):
    cfg = self.cfg
    mask = batch.tokens.loss_mask
    logits, logp, _ = self.policy_pass(model, params, batch.tokens, step_values, rng, train)
    pg, clipped, ratio = clipped_policy_loss(logp, batch.old_logp, batch.advantages[:, None], cfg.clip_eps)
    per_token = pg
    kl = k3(logp, batch.ref_logp)
    if cfg.kl_coef > 0:
      per_token = per_token + cfg.kl_coef * kl
    weights, metric_weights, count = aggregation_weights(mask, cfg.loss_type, cfg.max_new_tokens)
    metrics = {"kl": jnp.sum(kl * metric_weights), "clip_fraction": jnp.sum(clipped * metric_weights),
               "entropy": jnp.sum(policy_entropy(logits) * metric_weights),
               "ratio": jnp.sum(ratio * metric_weights)}
    return jnp.sum(per_token * weights), count, metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(RLConfig):
  def __post_init__(self):
    super().__post_init__()
    if self.loss_type != "dapo":
      raise ValueError(f"{self.where}.rl.loss_type={self.loss_type!r}: PPO averages over tokens; only "
                       f"'dapo' applies (the other loss types are GRPO's)")
    if not self.reward_from:
      raise ValueError(f"{self.where}.rl.reward_from is empty: PPO needs a reward model stage")


def reward_model_rows(rows, eos_id: int):
  """The reward model reads each sequence as it read its training pairs: up to the token before the final EOS;
  a sequence without EOS has its last generated token scored too."""
  score_rows = {k: rows[k].copy() for k in ("inputs", "positions", "segment_ids")}
  for r in range(rows["inputs"].shape[0]):
    n = int(rows["segment_ids"][r].sum())
    if rows["targets"][r, n - 1] != eos_id:
      score_rows["inputs"][r, n] = rows["targets"][r, n - 1]
      score_rows["positions"][r, n] = n
      score_rows["segment_ids"][r, n] = 1
  return score_rows


@register("ppo")
class PPO(RolloutStage):
  Config = PPOConfig
  score_head = True  # The value head.

  def __init__(self, stage_config=None, where: str = ""):
    super().__init__(stage_config, where)
    self._experience_fn = None

  def frozen_models(self):
    return {**super().frozen_models(), "reward": (self.cfg.reward_from, True)}

  def abstract_batch(self, ctx):
    per_token = jax.ShapeDtypeStruct((self.cfg.batch_size, self.cfg.seq_len), jnp.float32,
                                     sharding=partitioning.batch_sharding(ctx.mesh))
    return super().abstract_batch(ctx).replace(old_values=per_token, advantages=per_token, returns=per_token)

  def experience_fn(self, ctx):
    """Jitted: reward-model score, per-token rewards, GAE, whitening."""
    if self._experience_fn is None:
      cfg = self.cfg
      reward_model = Decoder(ctx.model_cfg, RegSites(), score_head=True)

      def experience(frozen, batch, score_rows):
        score_B = final_scores(reward_model, frozen["reward"], score_rows)
        mask = batch.tokens.loss_mask
        kl_BxL = (batch.old_logp - batch.ref_logp) * mask
        last_BxL = jax.nn.one_hot(jnp.sum(mask, -1).astype(jnp.int32) + jnp.argmax(mask, -1) - 1,
                                  mask.shape[1]) * mask
        rewards_BxL = -cfg.kl_coef * kl_BxL + score_B[:, None] * last_BxL
        adv, returns = gae(rewards_BxL, batch.old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
          adv = masked_whiten(adv, mask)
        stats = {"score": jnp.mean(score_B), "kl_sum": jnp.mean(jnp.sum(kl_BxL, -1)),
                 "return": jnp.sum(returns * mask) / jnp.maximum(jnp.sum(mask), 1.0)}
        return adv, returns, stats
      self._experience_fn = jax.jit(experience)
    return self._experience_fn

  def make_experience(self, ctx, params, prompts, step, split):
    rows, replies, prompt_index, stats = self.rollout(ctx, params, prompts, step, split)
    score_rows = reward_model_rows(rows, ctx.tokenizer.eos_id)
    tokens = TokenBatch.from_dict(partitioning.global_batch(rows, ctx.mesh))
    batch = RolloutBatch(tokens=tokens, **self.logprob_passes(ctx, params, tokens))
    score_batch = partitioning.global_batch(score_rows, ctx.mesh)
    score_tokens = TokenBatch(inputs=score_batch["inputs"], targets=None, positions=score_batch["positions"],
                              segment_ids=score_batch["segment_ids"], loss_mask=None)
    adv, returns, device_stats = self.experience_fn(ctx)(ctx.frozen, batch, score_tokens)
    batch = batch.replace(advantages=adv, returns=returns)
    host = {k: float(v) for k, v in jax.device_get(device_stats).items()}
    host["reward"] = host.pop("score")
    return batch, {**host, **stats}

  def loss(self, model, params, batch, step_values, rng, train):
    cfg = self.cfg
    mask = batch.tokens.loss_mask
    logits, logp, values = self.policy_pass(model, params, batch.tokens, step_values, rng, train)
    values = values * mask
    pg, clipped, ratio = clipped_policy_loss(logp, batch.old_logp, batch.advantages, cfg.clip_eps)
    old_v, ret = batch.old_values, batch.returns
    v_clipped = old_v + jnp.clip(values - old_v, -cfg.value_clip, cfg.value_clip)
    v_loss = 0.5 * jnp.maximum(jnp.square(values - ret), jnp.square(v_clipped - ret))
    per_token = pg + cfg.vf_coef * v_loss
    metrics = {"policy_loss": jnp.sum(pg * mask), "value_loss": jnp.sum(v_loss * mask),
               "clip_fraction": jnp.sum(clipped * mask), "entropy": jnp.sum(policy_entropy(logits) * mask),
               "approx_kl": jnp.sum(((ratio - 1.0) - jnp.log(ratio)) * mask),
               "value_clip_fraction": jnp.sum((jnp.abs(values - old_v) > cfg.value_clip) * mask)}
    return jnp.sum(per_token * mask), jnp.sum(mask), metrics
