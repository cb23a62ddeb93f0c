"""Preference stages on (prompt, chosen, rejected) pairs: `reward` and `dpo` (docs/RESEARCH.md, post-training losses).

- `reward`: a scalar head on the decoder, read at each sequence's last real token; Bradley-Terry loss
  -log sigmoid(r_chosen - r_rejected). Logs accuracy (r_chosen > r_rejected), margin and both scores.
- `dpo`: delta = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], sums over completion tokens;
  sigmoid loss -(1-eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta) (eps > 0: cDPO), or IPO's
  (delta - 1/(2 beta))^2, where each side's log-probs are by default means over its completion tokens
  (`dpo.ipo_logps='token_mean'`, as TRL does on the IPO authors' advice; 'sum' keeps the sequence sums). The frozen reference's log-probs are computed once per batch, outside the gradient, by
  `prepare`. Logs chosen/rejected rewards (beta * log-ratio), margin, accuracy and the policy's log-probs.

Both take pairs from `data.make_preference_iterator`: one pair per row, the prompt without loss. Every count is
of pairs. The reference and the log-prob passes run without dropout or noise; the policy's own pass uses the
stage's `reg` block (all off by default), so training DPO with dropout is a config choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmstages import losses, partitioning
from llmstages.stages import Stage, apply_model, register

SIDES = ("chosen", "rejected")


class PairStage(Stage):
  """Shared data handling of the preference stages."""

  def batches(self, ctx, tokenizer, split):
    from llmstages import data, train
    scfg = ctx.scfg
    mixture = train.stage_mixture(ctx.config, ctx.name)
    if split != "train" and scfg.eval_data:
      mixture = data.parse_mixture(scfg.eval_data)
    index, count = ctx.data_shard()
    return data.make_preference_iterator(mixture, tokenizer=tokenizer, batch_size=scfg.batch_size,
                                         seq_len=scfg.seq_len, seed=ctx.config.seed, split=split,
                                         data_dir=train.data_dir(ctx.config), process_index=index,
                                         process_count=count)

  def abstract_batch(self, ctx):
    return {side: ctx.token_batch_shapes() for side in SIDES}

  def prepare(self, ctx, params, local_batch, step, split):
    check_pairs(ctx, local_batch)
    return partitioning.global_batch(local_batch, ctx.mesh), {}


def check_pairs(ctx, local_batch) -> None:
  """Every real pair must keep completion tokens within seq_len on both sides (else its log-ratio is empty)."""
  for side in SIDES:
    b = local_batch[side]
    real = b["segment_ids"].max(axis=-1) > 0
    empty = real & (b["loss_mask"].sum(axis=-1) == 0)
    if empty.any():
      row = int(np.argmax(empty))
      raise ValueError(f"the {side} completion of the pair in batch row {row} has no tokens "
                       f"within config.{ctx.name}.seq_len={ctx.scfg.seq_len} (its prompt fills the row); raise "
                       f"seq_len or shorten the prompts")


def _both(pair):
  """Chosen and rejected rows stacked into one batch [2B, L], so one forward pass scores both."""
  return jax.tree.map(lambda c, r: jnp.concatenate([c, r], axis=0), pair["chosen"], pair["rejected"])


def sequence_logprobs(model, params, batch, dyn=None, rng=None, train=False) -> jax.Array:
  """Summed log-probs of each row's loss-masked targets, [B] float32."""
  logits_BxLxV = apply_model(model, params, batch, dyn, rng, train)
  return losses.masked_sum(losses.token_logprobs(logits_BxLxV, batch["targets"]), batch["loss_mask"])


def last_token_index(segment_ids_BxL: jax.Array) -> jax.Array:
  """Index of each (right-padded) row's last real input token."""
  return jnp.maximum(jnp.sum(segment_ids_BxL > 0, axis=-1) - 1, 0)


def final_scores(model, params, batch, dyn=None, rng=None, train=False) -> jax.Array:
  """A scalar-head model's score at each row's last real token, [B]."""
  _, scores_BxL = apply_model(model, params, batch, dyn, rng, train)
  return jnp.take_along_axis(scores_BxL, last_token_index(batch["segment_ids"])[:, None], axis=-1)[:, 0]


def _real_pairs(pair) -> jax.Array:
  return (jnp.max(pair["chosen"]["segment_ids"], axis=-1) > 0).astype(jnp.float32)


@register("reward")
class RewardModel(PairStage):
  score_head = True

  def loss(self, model, params, batch, dyn, rng, train):
    scores = final_scores(model, params, _both(batch), dyn, rng, train)
    b = scores.shape[0] // 2
    chosen_B, rejected_B = scores[:b], scores[b:]
    valid_B = _real_pairs(batch)
    diff_B = chosen_B - rejected_B
    loss_B = jax.nn.softplus(-diff_B)  # -log sigmoid(r_chosen - r_rejected)
    metrics = {"correct": jnp.sum((diff_B > 0) * valid_B), "margin": jnp.sum(diff_B * valid_B),
               "score_chosen": jnp.sum(chosen_B * valid_B), "score_rejected": jnp.sum(rejected_B * valid_B)}
    return jnp.sum(loss_B * valid_B), jnp.sum(valid_B), metrics


IPO_LOGPS = ("token_mean", "sum")


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

  def frozen_models(self, scfg):
    reference = scfg.dpo.reference or scfg.init_from
    if not reference:
      raise ValueError(f"{self.where}: DPO needs a reference model: set init_from (or dpo.reference) to an "
                       f"earlier stage")
    if scfg.dpo.loss not in ("sigmoid", "ipo"):
      raise ValueError(f"{self.where}.dpo.loss: {scfg.dpo.loss!r} is not one of sigmoid, ipo")
    if scfg.dpo.ipo_logps not in IPO_LOGPS:
      raise ValueError(f"{self.where}.dpo.ipo_logps: {scfg.dpo.ipo_logps!r} is not one of {', '.join(IPO_LOGPS)}")
    if scfg.dpo.beta <= 0 or not 0.0 <= scfg.dpo.label_smoothing < 0.5:
      raise ValueError(f"{self.where}.dpo: beta must be > 0 (got {scfg.dpo.beta}) and label_smoothing in "
                       f"[0, 0.5) (got {scfg.dpo.label_smoothing})")
    return {"reference": (reference, False)}

  def abstract_batch(self, ctx):
    rows = jax.ShapeDtypeStruct((ctx.scfg.batch_size,), jnp.float32, sharding=partitioning.batch_sharding(ctx.mesh))
    return {**super().abstract_batch(ctx), "ref_chosen": rows, "ref_rejected": rows}

  def prepare(self, ctx, params, local_batch, step, split):
    batch, _ = super().prepare(ctx, params, local_batch, step, split)
    if "dpo_reference" not in ctx.cache:
      model = ctx.lm_model

      def reference(ref_params, pair):
        lp = sequence_logprobs(model, ref_params, _both(pair))
        b = lp.shape[0] // 2
        return {"ref_chosen": lp[:b], "ref_rejected": lp[b:]}
      ctx.cache["dpo_reference"] = jax.jit(reference)
    return {**batch, **ctx.cache["dpo_reference"](ctx.frozen["reference"], batch)}, {}

  def loss(self, model, params, batch, dyn, rng, train):
    cfg = self.scfg.dpo
    lp = sequence_logprobs(model, params, _both(batch), dyn, rng, train)
    b = lp.shape[0] // 2
    n_chosen_B, n_rejected_B = (jnp.sum(batch[side]["loss_mask"].astype(jnp.float32), axis=-1) for side in SIDES)
    chosen_B = log_ratios(lp[:b], batch["ref_chosen"], n_chosen_B, cfg.loss, cfg.ipo_logps)
    rejected_B = log_ratios(lp[b:], batch["ref_rejected"], n_rejected_B, cfg.loss, cfg.ipo_logps)
    delta_B = chosen_B - rejected_B
    valid_B = _real_pairs(batch)
    loss_B = dpo_loss(delta_B, cfg.beta, cfg.label_smoothing, cfg.loss)
    metrics = {"correct": jnp.sum((delta_B > 0) * valid_B), "margin": jnp.sum(cfg.beta * delta_B * valid_B),
               "reward_chosen": jnp.sum(cfg.beta * chosen_B * valid_B),
               "reward_rejected": jnp.sum(cfg.beta * rejected_B * valid_B),
               "logp_chosen": jnp.sum(lp[:b] * valid_B), "logp_rejected": jnp.sum(lp[b:] * valid_B)}
    return jnp.sum(loss_B * valid_B), jnp.sum(valid_B), metrics
