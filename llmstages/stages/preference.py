"""Preference stages on (prompt, chosen, rejected) pairs: `reward` and `dpo` (docs/RESEARCH.md, post-training losses).

- `reward`: a scalar head on the decoder, read at each sequence's last real token; Bradley-Terry loss
  -log sigmoid(r_chosen - r_rejected). Logs accuracy (r_chosen > r_rejected), margin and both scores.
- `dpo`: delta = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], sums over completion tokens;
  sigmoid loss -(1-eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta) (eps > 0: cDPO), or IPO's
  (delta - 1/(2 beta))^2, where each side's log-probs are by default means over its completion tokens
  (`dpo.ipo_logps='token_mean'`, as TRL does on the IPO authors' advice; 'sum' keeps the sequence sums). The
  frozen reference's log-probs are computed once per batch, outside the gradient, by `prepare`. Logs
  chosen/rejected rewards (beta * log-ratio), margin, accuracy and the policy's log-probs.

Both take pairs from `data.make_preference_iterator`: one pair per row, the prompt without loss. Every count is
of pairs. The reference and the log-prob passes run without dropout or noise; the policy's own pass uses the
stage's `reg` block (all off by default), so training DPO with dropout is a config choice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llmstages import data, inputs, losses, partitioning
from llmstages.inputs import TokenBatch
from llmstages.stages.base import Stage, apply_model, register

SIDES = ("chosen", "rejected")
DPO_LOSSES = ("sigmoid", "ipo")
IPO_LOGPS = ("token_mean", "sum")


@flax.struct.dataclass
class PreferenceBatch:
  """One pair per row: both sides as token rows, and (DPO) the frozen reference's summed log-probs [B]."""
  chosen: TokenBatch
  rejected: TokenBatch
  ref_chosen: Any = None
  ref_rejected: Any = None

  @classmethod
  def from_dict(cls, pair) -> "PreferenceBatch":
    return cls(chosen=TokenBatch.from_dict(pair["chosen"]), rejected=TokenBatch.from_dict(pair["rejected"]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairConfig:
  """What the reward stage reads from its block."""
  where: str
  seq_len: int

  @classmethod
  def from_block(cls, block, where: str) -> "PairConfig":
    return cls(where=where, seq_len=block.seq_len)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(PairConfig):
  """`config.<stage>.dpo`, with the reference resolved (`dpo.reference`, else `init_from`)."""
  beta: float
  label_smoothing: float
  loss: str
  ipo_logps: str
  reference: str

  def __post_init__(self):
    if not self.reference:
      raise ValueError(f"{self.where}: DPO needs a reference model: set init_from (or dpo.reference) to an "
                       f"earlier stage")
    if self.loss not in DPO_LOSSES:
      raise ValueError(f"{self.where}.dpo.loss: {self.loss!r} is not one of {', '.join(DPO_LOSSES)}")
    if self.ipo_logps not in IPO_LOGPS:
      raise ValueError(f"{self.where}.dpo.ipo_logps: {self.ipo_logps!r} is not one of {', '.join(IPO_LOGPS)}")
    if self.beta <= 0 or not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"{self.where}.dpo: beta must be > 0 (got {self.beta}) and label_smoothing in "
                       f"[0, 0.5) (got {self.label_smoothing})")

  @classmethod
  def from_block(cls, block, where: str) -> "DPOConfig":
    dpo = block.dpo
    return cls(where=where, seq_len=block.seq_len, beta=dpo.beta, label_smoothing=dpo.label_smoothing,
               loss=dpo.loss, ipo_logps=dpo.ipo_logps, reference=dpo.reference or block.init_from)


class PairStage(Stage):
  """Shared data handling of the preference stages."""
  Config = PairConfig

  def batches(self, ctx, tokenizer, split):
    stage_config = ctx.stage_config
    index, count = ctx.data_shard()
    return data.make_preference_iterator(inputs.split_mixture(ctx, split), tokenizer=tokenizer,
                                         batch_size=stage_config.batch_size, seq_len=stage_config.seq_len,
                                         seed=ctx.config.seed, split=split, data_dir=inputs.data_dir(ctx.config),
                                         process_index=index, process_count=count)

  def abstract_batch(self, ctx):
    return PreferenceBatch(chosen=ctx.token_batch_shapes(), rejected=ctx.token_batch_shapes())

  def prepare(self, ctx, params, local_batch, step, split):
    check_pairs(self.cfg, local_batch)
    return PreferenceBatch.from_dict(partitioning.global_batch(local_batch, ctx.mesh)), {}


def check_pairs(cfg: PairConfig, local_batch) -> None:
  """Every real pair must keep completion tokens within seq_len on both sides (else its log-ratio is empty)."""
  for side in SIDES:
    rows = local_batch[side]
    real = rows["segment_ids"].max(axis=-1) > 0
    empty = real & (rows["loss_mask"].sum(axis=-1) == 0)
    if empty.any():
      row = int(np.argmax(empty))
      raise ValueError(f"the {side} completion of the pair in batch row {row} has no tokens "
                       f"within {cfg.where}.seq_len={cfg.seq_len} (its prompt fills the row); raise "
                       f"seq_len or shorten the prompts")


def _both(pair: PreferenceBatch) -> TokenBatch:
  """Chosen and rejected rows stacked into one batch [2B, L], so one forward pass scores both."""
  return jax.tree.map(lambda c, r: jnp.concatenate([c, r], axis=0), pair.chosen, pair.rejected)


def sequence_logprobs(model, params, batch: TokenBatch, step_values=None, rng=None, train=False) -> jax.Array:
  """Summed log-probs of each row's loss-masked targets, [B] float32."""
  logits_BxLxV = apply_model(model, params, batch, step_values, rng, train).logits
  return losses.masked_sum(losses.token_logprobs(logits_BxLxV, batch.targets), batch.loss_mask)


def last_token_index(segment_ids_BxL: jax.Array) -> jax.Array:
  """Index of each (right-padded) row's last real input token."""
  return jnp.maximum(jnp.sum(segment_ids_BxL > 0, axis=-1) - 1, 0)


def final_scores(model, params, batch: TokenBatch, step_values=None, rng=None, train=False) -> jax.Array:
  """A scalar-head model's score at each row's last real token, [B]."""
  scores_BxL = apply_model(model, params, batch, step_values, rng, train).scores
  return jnp.take_along_axis(scores_BxL, last_token_index(batch.segment_ids)[:, None], axis=-1)[:, 0]


def _real_pairs(pair: PreferenceBatch) -> jax.Array:
  return (jnp.max(pair.chosen.segment_ids, axis=-1) > 0).astype(jnp.float32)


@register("reward")
class RewardModel(PairStage):
  score_head = True

  def loss(self, model, params, batch, step_values, rng, train):
    scores = final_scores(model, params, _both(batch), step_values, rng, train)
    b = scores.shape[0] // 2
    chosen_B, rejected_B = scores[:b], scores[b:]
    valid_B = _real_pairs(batch)
    diff_B = chosen_B - rejected_B
    loss_B = jax.nn.softplus(-diff_B)  # -log sigmoid(r_chosen - r_rejected)
    metrics = {"correct": jnp.sum((diff_B > 0) * valid_B), "margin": jnp.sum(diff_B * valid_B),
               "score_chosen": jnp.sum(chosen_B * valid_B), "score_rejected": jnp.sum(rejected_B * valid_B)}
    return jnp.sum(loss_B * valid_B), jnp.sum(valid_B), metrics


def log_ratios(policy_B, reference_B, tokens_B, kind: str = "sigmoid", ipo_logps: str = "token_mean"):
  """Per-pair log pi(y) - log ref(y) of one side from summed log-probs; IPO with 'token_mean' divides both by
  the side's completion token count."""
  ratio_B = policy_B - reference_B
  if kind == "ipo" and ipo_logps == "token_mean":
    return ratio_B / jnp.maximum(tokens_B, 1.0)
  return ratio_B


def dpo_loss(delta_B: jax.Array, beta, label_smoothing=0.0, kind: str = "sigmoid") -> jax.Array:
  """Per-pair DPO loss of the log-ratio difference `delta_B` (see the module docstring)."""
  if kind == "ipo":
    return jnp.square(delta_B - 1.0 / (2.0 * beta))
  if kind != "sigmoid":
    raise ValueError(f"dpo.loss: {kind!r} is not one of sigmoid, ipo")
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta_B)
          - label_smoothing * jax.nn.log_sigmoid(-beta * delta_B))


@register("dpo")
class DirectPreference(PairStage):
  Config = DPOConfig

  def __init__(self, stage_config=None, where: str = ""):
    super().__init__(stage_config, where)
    self._reference_fn = None  # Jitted on first use: the frozen reference's log-probs of both sides.

  def frozen_models(self):
    return {"reference": (self.cfg.reference, False)}

  def abstract_batch(self, ctx):
    rows = jax.ShapeDtypeStruct((ctx.stage_config.batch_size,), jnp.float32,
                                sharding=partitioning.batch_sharding(ctx.mesh))
    return super().abstract_batch(ctx).replace(ref_chosen=rows, ref_rejected=rows)

  def reference_fn(self, ctx):
    if self._reference_fn is None:
      model = ctx.lm_model

      def reference(ref_params, pair):
        lp = sequence_logprobs(model, ref_params, _both(pair))
        b = lp.shape[0] // 2
        return lp[:b], lp[b:]
      self._reference_fn = jax.jit(reference)
    return self._reference_fn

  def prepare(self, ctx, params, local_batch, step, split):
    batch, _ = super().prepare(ctx, params, local_batch, step, split)
    ref_chosen, ref_rejected = self.reference_fn(ctx)(ctx.frozen["reference"], batch)
    return batch.replace(ref_chosen=ref_chosen, ref_rejected=ref_rejected), {}

  def loss(self, model, params, batch, step_values, rng, train):
    cfg = self.cfg
    lp = sequence_logprobs(model, params, _both(batch), step_values, rng, train)
    b = lp.shape[0] // 2
    n_chosen_B, n_rejected_B = (jnp.sum(side.loss_mask.astype(jnp.float32), axis=-1)
                                for side in (batch.chosen, batch.rejected))
    chosen_B = log_ratios(lp[:b], batch.ref_chosen, n_chosen_B, cfg.loss, cfg.ipo_logps)
    rejected_B = log_ratios(lp[b:], batch.ref_rejected, n_rejected_B, cfg.loss, cfg.ipo_logps)
    delta_B = chosen_B - rejected_B
    valid_B = _real_pairs(batch)
    loss_B = dpo_loss(delta_B, cfg.beta, cfg.label_smoothing, cfg.loss)
    metrics = {"correct": jnp.sum((delta_B > 0) * valid_B), "margin": jnp.sum(cfg.beta * delta_B * valid_B),
               "reward_chosen": jnp.sum(cfg.beta * chosen_B * valid_B),
               "reward_rejected": jnp.sum(cfg.beta * rejected_B * valid_B),
               "logp_chosen": jnp.sum(lp[:b] * valid_B), "logp_rejected": jnp.sum(lp[b:] * valid_B)}
    return jnp.sum(loss_B * valid_B), jnp.sum(valid_B), metrics
