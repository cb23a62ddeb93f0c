"""Post-training stages: identities (DPO = log 2, GRPO zero advantage, GAE, SFT masking, accumulation) and errors.
Direction on tiny models trained from files is in test_post_direction.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmstages import config as config_lib
from llmstages import losses, pipeline, rewards, stages, train
from llmstages import model as model_lib
from llmstages.inputs import TokenBatch
from llmstages.model import Decoder
from llmstages.stages import preference, rl
from tests.helpers import init_params, one_device_mesh, packed_batch, tiny


def pair_batch(b=4, length=16, vocab=64, seed=0):
  """Preference pairs: a shared prompt (no loss), then different completions of different lengths."""
  rng = np.random.default_rng(seed)
  prompt_len = rng.integers(3, 7, b)
  shared = rng.integers(4, vocab, (b, length + 1))
  pos = np.arange(length)[None, :]
  out = {}
  for side in preference.SIDES:
    tokens = np.where(np.arange(length + 1)[None, :] < prompt_len[:, None], shared,
                      rng.integers(4, vocab, (b, length + 1)))
    ends = rng.integers(prompt_len + 2, length + 1)
    real = pos < ends[:, None]
    out[side] = {"inputs": (tokens[:, :-1] * real).astype(np.int32), "targets": (tokens[:, 1:] * real).astype(np.int32),
                 "loss_mask": ((pos >= prompt_len[:, None] - 1) & real).astype(np.float32),
                 "segment_ids": real.astype(np.int32), "positions": (pos * real).astype(np.int32)}
  return preference.PreferenceBatch.from_dict(out)


def dpo_stage(**dpo):
  stage_config = config_lib.stage_config("dpo", init_from="sft")
  stage_config.dpo.update(dpo)
  return stages.get("dpo", stage_config)


def with_reference(model, params, pair):
  lp = preference.sequence_logprobs(model, params, preference._both(pair))
  b = lp.shape[0] // 2
  return pair.replace(ref_chosen=lp[:b], ref_rejected=lp[b:])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_is_log2_when_policy_is_reference(label_smoothing):
  cfg = tiny()
  model, params = Decoder(cfg), init_params(cfg, seed=1)
  batch = with_reference(model, params, pair_batch())
  loss_sum, count, metrics = dpo_stage(label_smoothing=label_smoothing).loss(model, params, batch, None, None, False)
  assert count == 4
  np.testing.assert_allclose(loss_sum / count, math.log(2), rtol=1e-6)
  assert metrics["margin"] == 0 and metrics["correct"] == 0


def test_ipo_loss_at_reference_and_dpo_loss_direction():
  cfg = tiny()
  model, params = Decoder(cfg), init_params(cfg, seed=1)
  batch = with_reference(model, params, pair_batch())
  loss_sum, count, _ = dpo_stage(loss="ipo", beta=0.5).loss(model, params, batch, None, None, False)
  np.testing.assert_allclose(loss_sum / count, 1.0, rtol=1e-6)  # (0 - 1 / (2 * 0.5))^2
  delta = jnp.array([-1.0, 0.0, 1.0])
  np.testing.assert_allclose(preference.dpo_loss(delta, 0.1), -jax.nn.log_sigmoid(0.1 * delta), rtol=1e-6)
  np.testing.assert_allclose(preference.dpo_loss(delta, 0.1, 0.1),
                             -0.9 * jax.nn.log_sigmoid(0.1 * delta) - 0.1 * jax.nn.log_sigmoid(-0.1 * delta))


def test_ipo_averages_log_ratios_per_token_by_hand():
  # Chosen: policy -6, reference -9 over 3 tokens; rejected: policy -8, reference -4 over 4 tokens.
  # token_mean: (-6 + 9) / 3 - (-8 + 4) / 4 = 1 + 1 = 2, loss (2 - 1 / (2 * 0.5))^2 = 1. sum: 3 + 4 = 7, loss 36.
  policy, ref, n = jnp.array([-6.0, -8.0]), jnp.array([-9.0, -4.0]), jnp.array([3.0, 4.0])
  mean_ratio = preference.log_ratios(policy, ref, n, "ipo", "token_mean")
  np.testing.assert_allclose(mean_ratio, [1.0, -1.0])
  np.testing.assert_allclose(preference.log_ratios(policy, ref, n, "ipo", "sum"), [3.0, -4.0])
  np.testing.assert_allclose(preference.log_ratios(policy, ref, n, "sigmoid", "token_mean"), [3.0, -4.0])  # DPO sums.
  np.testing.assert_allclose(preference.dpo_loss(mean_ratio[:1] - mean_ratio[1:], 0.5, kind="ipo"), [1.0])
  np.testing.assert_allclose(preference.dpo_loss(jnp.array([7.0]), 0.5, kind="ipo"), [36.0])
  # The stage, against per-token log-probs computed here from the two models' logits.
  cfg = tiny()
  model, params, ref_params = Decoder(cfg), init_params(cfg, seed=1), init_params(cfg, seed=2)
  pair = with_reference(model, ref_params, pair_batch())

  def side_means(p, side):
    b = getattr(pair, side)
    lp = jax.nn.log_softmax(model.apply({"params": p}, b.inputs, b.positions, b.segment_ids).logits, axis=-1)
    tok = np.take_along_axis(np.asarray(lp), np.asarray(b.targets)[..., None], axis=-1)[..., 0]
    return (tok * b.loss_mask).sum(-1), b.loss_mask.sum(-1)
  (pc, nc), (pr, nr) = side_means(params, "chosen"), side_means(params, "rejected")
  (rc, _), (rr, _) = side_means(ref_params, "chosen"), side_means(ref_params, "rejected")
  for ipo_logps, delta in (("token_mean", (pc - rc) / nc - (pr - rr) / nr), ("sum", (pc - rc) - (pr - rr))):
    loss_sum, count, _ = dpo_stage(loss="ipo", beta=0.5, ipo_logps=ipo_logps).loss(model, params, pair, None, None,
                                                                                  False)
    np.testing.assert_allclose(loss_sum / count, np.mean((delta - 1.0) ** 2), rtol=1e-4)  # f32 sums in another order
  assert config_lib.dpo_config().ipo_logps == "token_mean"
  with pytest.raises(ValueError, match="dpo.ipo_logps: 'mean' is not one of token_mean, sum"):
    dpo_stage(ipo_logps="mean").frozen_models()


def test_reward_loss_is_log2_with_a_fresh_head():
  cfg = tiny()
  model = Decoder(cfg, score_head=True)
  params = jax.tree.map(jnp.asarray, model_lib.init_params(model, jax.random.key(0)))
  loss_sum, count, metrics = stages.get("reward").loss(model, params, pair_batch(), None, None, False)
  np.testing.assert_allclose(loss_sum / count, math.log(2), rtol=1e-6)  # Zero-initialized head: equal scores.


def grpo_stage(kl_coef, **rl_overrides):
  stage_config = config_lib.stage_config("grpo", init_from="sft")
  stage_config.rl.kl_coef = kl_coef
  stage_config.rl.update(rl_overrides)
  return stages.get("grpo", stage_config)


def rollout_batch(model, params, seed=0, b=8):
  batch = packed_batch(batch=b, length=16, vocab=64, seed=seed, docs_per_row=1)
  logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]).logits
  logp = losses.token_logprobs(logits, batch["targets"]) * batch["loss_mask"]
  return rl.RolloutBatch(tokens=TokenBatch.from_dict(batch), old_logp=logp, ref_logp=logp)


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_grpo_equal_rewards_give_zero_advantage_and_gradient(kl_coef):
  rewards_R = np.array([0.5] * 4 + [1.0] * 4)
  adv, flat = rl.group_advantages(rewards_R, 4, 1e-4)
  assert np.all(adv == 0) and flat.tolist() == [True, True]
  cfg = tiny()
  model, params = Decoder(cfg), init_params(cfg, seed=2)
  batch = rollout_batch(model, params).replace(advantages=jnp.asarray(adv))
  stage = grpo_stage(kl_coef)
  grads = jax.grad(lambda p: stage.loss(model, p, batch, None, None, False)[0])(params)
  worst = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  assert worst == 0.0 if kl_coef == 0 else worst < 1e-6
  # A group with different rewards does get a gradient.
  adv2, _ = rl.group_advantages(np.array([0.0, 1.0, 0.0, 0.0] + [1.0] * 4), 4, 1e-4)
  batch2 = batch.replace(advantages=jnp.asarray(adv2))
  grads2 = jax.grad(lambda p: stage.loss(model, p, batch2, None, None, False)[0])(params)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads2)) > 1e-4


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_types_by_hand(loss_type):
  # At ratio 1 and kl_coef 0 every completion token's loss is -A of its row. Rows of 1, 2, 3 and 4 tokens with
  # A = 1, -1, 2, 0.5: dapo = -(1 - 2 + 6 + 2) / 10 = -0.7; grpo (per-sequence mean, then mean) = -(1 - 1 + 2 + 0.5)
  # / 4 = -0.625; dr_grpo = -(1 - 2 + 6 + 2) / (max_new_tokens 8 x 4 rows) = -0.21875.
  cfg = tiny()
  model, params = Decoder(cfg), init_params(cfg, seed=2)
  batch = rollout_batch(model, params, b=4)
  mask = np.zeros((4, 16), np.float32)
  for row, n in enumerate((1, 2, 3, 4)):
    mask[row, 5:5 + n] = 1.0
  tokens = batch.tokens.replace(loss_mask=mask)
  logits = model.apply({"params": params}, tokens.inputs, tokens.positions, tokens.segment_ids).logits
  logp = losses.token_logprobs(logits, tokens.targets) * mask
  batch = batch.replace(tokens=tokens, advantages=jnp.array([1.0, -1.0, 2.0, 0.5]), old_logp=logp, ref_logp=logp)
  stage = grpo_stage(0.0, loss_type=loss_type, max_new_tokens=8)
  loss_sum, count, metrics = stage.loss(model, params, batch, None, None, False)
  expected = {"dapo": (-7.0, 10.0), "grpo": (-2.5, 4.0), "dr_grpo": (-7.0 / 8, 4.0)}[loss_type]
  np.testing.assert_allclose([loss_sum, count], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio"] / count, 1.0, rtol=1e-5)  # A token mean or a mean of sequence means.
  assert config_lib.stage_config("grpo").rl.loss_type == "dapo"  # TRL's current default.


def test_grpo_loss_types_accumulate_exactly():
  # The train step adds (loss sum, count) over micro-batches and divides once; for every loss type that must equal
  # the full batch's average. (The weights do not depend on the parameters, so the gradients add the same way; the
  # full train-step test above checks that for the default type.) Unequal rows, ratios away from 1.
  cfg = tiny()
  model, params = Decoder(cfg), init_params(cfg, seed=4)
  batch = rollout_batch(model, params, seed=5)
  mask = batch.tokens.loss_mask
  mask[0, 3:] = 0
  mask[5, :12] = 0
  batch = batch.replace(advantages=np.random.default_rng(6).normal(size=(8,)).astype(np.float32),
                        old_logp=batch.old_logp + 0.1 * mask)
  averages = {}
  for loss_type in rl.LOSS_TYPES:
    stage = grpo_stage(0.04, loss_type=loss_type)
    fn = jax.jit(lambda b: stage.loss(model, params, b, None, None, False)[:2])
    full_sum, full_count = fn(batch)
    # Micro-batch i: rows 2i and 2i + 1 only (the others masked out), so one compile serves all four.
    parts = [fn(batch.replace(tokens=batch.tokens.replace(loss_mask=mask * (np.arange(8)[:, None] // 2 == i))))
             for i in range(4)]
    acc_sum, acc_count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert acc_count == full_count
    np.testing.assert_allclose(acc_sum / acc_count, full_sum / full_count, rtol=1e-5)
    averages[loss_type] = float(full_sum / full_count)
  assert len({round(v, 6) for v in averages.values()}) == 3, averages  # Three different averages.


def test_rl_log_probs_are_taken_at_the_sampling_temperature():
  cfg = _tiny_stage_config("grpo")
  with cfg.unlocked():
    cfg.grpo.rl.temperature = 0.5
    cfg.grpo.rl.kl_coef = 0.0
  ctx = train.build_context(cfg, "grpo", mesh=one_device_mesh())
  params = ctx.init_state().params
  batch = rollout_batch(ctx.lm_model, params, seed=3)
  tokens = batch.tokens
  logits = np.asarray(ctx.lm_model.apply({"params": params}, tokens.inputs, tokens.positions,
                                         tokens.segment_ids).logits, np.float64)
  scaled = logits / 0.5
  logp_t = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      scaled.max(-1, keepdims=True)
  want = np.take_along_axis(logp_t, np.asarray(tokens.targets)[..., None], axis=-1)[..., 0] * tokens.loss_mask
  with ctx.activate():
    passes = jax.device_get(ctx.stage.logprob_passes(ctx, params, tokens))
  np.testing.assert_allclose(passes["old_logp"], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(passes["ref_logp"], want, rtol=1e-4, atol=1e-5)
  _, logp, _ = ctx.stage.policy_pass(ctx.lm_model, params, tokens, None, None, False)
  np.testing.assert_allclose(np.asarray(logp) * tokens.loss_mask, want, rtol=1e-4, atol=1e-5)
  at_t1 = np.take_along_axis(jax.nn.log_softmax(logits), np.asarray(tokens.targets)[..., None], -1)[..., 0]
  assert np.abs(np.asarray(at_t1) * tokens.loss_mask - want).max() > 0.1  # The temperature matters.


def test_grpo_groups_follow_prompt_order():
  # Rows are prompt-major (the sampler's order): rows 0-2 are prompt 0's samples, rows 3-5 prompt 1's, ...
  rewards_R = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0])
  adv, flat = rl.group_advantages(rewards_R, 3, 0.0)
  assert flat.tolist() == [True, False, True]
  np.testing.assert_allclose(adv, [0, 0, 0, -1, 0, 1, 0, 0, 0], atol=1e-6)  # (r - 1) / std(ddof=1) = r - 1.
  from llmstages.sampler import Sampler
  cfg = tiny(max_seq_len=64)
  samples = Sampler(cfg, eos_id=2, pad_id=0).generate(init_params(cfg), [[1, 5], [1, 6, 7], [1, 8]],
                                                      max_new_tokens=3, temperature=1.0, num_samples=3)
  assert samples.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def gae_loop(rewards_BxL, values_BxL, mask_BxL, gamma, lam):
  adv, ret = np.zeros_like(rewards_BxL), np.zeros_like(rewards_BxL)
  for b in range(rewards_BxL.shape[0]):
    next_value, next_adv = 0.0, 0.0
    for t in reversed(range(rewards_BxL.shape[1])):
      if not mask_BxL[b, t]:
        continue
      delta = rewards_BxL[b, t] + gamma * next_value - values_BxL[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values_BxL[b, t]
      adv[b, t], ret[b, t] = next_adv, next_adv + values_BxL[b, t]
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_equals_a_python_loop_with_masked_steps(gamma, lam):
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(3, 12)).astype(np.float32), rng.normal(size=(3, 12)).astype(np.float32)
  mask = np.zeros((3, 12), np.float32)
  mask[0, 4:10] = 1  # Prompt before, padding after.
  mask[1, 2:12] = 1
  mask[1, 6] = 0  # A masked step inside the completion is skipped, not a boundary.
  mask[2, 5:6] = 1  # One token.
  adv, ret = rl.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
  ref_adv, ref_ret = gae_loop(r, v, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)


def test_sft_loss_and_gradient_ignore_prompt_labels():
  cfg = tiny()
  model, params = Decoder(cfg), init_params(cfg, seed=3)
  batch = packed_batch(batch=4, length=16, vocab=64, seed=4)
  batch["loss_mask"][:, :6] = 0  # The prompt.
  changed = {**batch, "targets": np.where(batch["loss_mask"] > 0, batch["targets"], (batch["targets"] + 7) % 64)}
  assert not np.array_equal(changed["targets"], batch["targets"])
  stage = stages.get("sft")

  def loss_and_grad(b):
    return jax.value_and_grad(lambda p: stage.loss(model, p, TokenBatch.from_dict(b), None, None, False)[0])(params)
  (l1, g1), (l2, g2) = loss_and_grad(batch), loss_and_grad(changed)
  assert l1 == l2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), g1, g2)


def _tiny_stage_config(name, **kw):
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_seq_len=64))
  c.stages = (name,)
  c[name] = config_lib.stage_config(name, steps=4, batch_size=8, seq_len=16, warmup_steps=0, init_from="x", **kw)
  if "rl" in c[name]:
    c[name].rl.max_new_tokens = 8  # Below seq_len, as the rl config block requires.
  return config_lib.finalize(c)


@pytest.mark.parametrize("kind", ["dpo", "grpo", "ppo"])
def test_micro_batched_accumulation_equals_the_full_batch(kind):
  outs = []
  for accum in (1, 4):
    cfg = _tiny_stage_config(kind, grad_accum=accum)
    ctx = train.build_context(cfg, kind, mesh=one_device_mesh())
    state = ctx.init_state()
    lm, _ = model_lib.split_head(state.params)
    if kind == "dpo":
      batch = with_reference(ctx.lm_model, lm, pair_batch(b=8, seed=5))
    else:
      batch = rollout_batch(ctx.lm_model, lm, seed=5)
      mask = batch.tokens.loss_mask
      mask[0, 3:] = 0  # Unequal token counts per micro-batch.
      rng = np.random.default_rng(6)
      if kind == "grpo":
        batch = batch.replace(advantages=rng.normal(size=(8,)).astype(np.float32))
      else:
        batch = batch.replace(**{k: rng.normal(size=(8, 16)).astype(np.float32) * mask
                                 for k in ("advantages", "returns", "old_values")})
      batch = batch.replace(old_logp=batch.old_logp + 0.1 * mask)  # Ratios away from 1: clipping is active.
    with ctx.activate():
      new, metrics = ctx.jit_train_step()(state, batch, ctx.step_values_at(0))
    outs.append((jax.device_get(new.params), jax.device_get(metrics)))
  (p1, m1), (p4, m4) = outs
  assert m1["count"] == m4["count"]
  np.testing.assert_allclose(m1["loss_sum"], m4["loss_sum"], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)


def test_a_raising_reward_function_names_the_stage_and_item():
  @rewards.register("test_raises")
  def boom(completion, prompt):
    raise KeyError("no such field")
  prompt = rewards.Prompt(text="What is 1 + 2?", kind="arith", answer="3", meta={}, source="file:x.jsonl", index=7)
  with pytest.raises(rewards.RewardError, match=r"stage grpo: reward function 'test_raises' raised KeyError.*record 7"):
    rewards.score(("arith", "test_raises"), " 3", prompt, "stage grpo")
  assert rewards.score(("arith", "facts"), "Answer: 3", prompt, "s") == {"arith": 1.0, "facts": None}


# ---------------------------------------------------------------------------------------------------------------
# Errors.

def test_missing_init_from_or_frozen_model_names_the_stage(tmp_path):
  cfg = _tiny_stage_config("dpo")
  with pytest.raises(ValueError, match=r"config.dpo.init_from='x': that stage neither runs before 'dpo'.*nor has a "
                     r"final checkpoint"):
    pipeline.run(cfg, str(tmp_path), mesh=one_device_mesh())
  c = config_lib.base_config()
  c.stages = ("sft", "ppo")
  c.sft = config_lib.stage_config("sft")
  c.ppo = config_lib.stage_config("ppo", init_from="sft")
  with pytest.raises(ValueError, match=r"config.ppo: its reward model, stage 'reward', neither runs before 'ppo'"):
    pipeline.run(config_lib.finalize(c), str(tmp_path), mesh=one_device_mesh())
