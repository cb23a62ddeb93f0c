"""On-policy RL stages: `grpo` (verifiable rewards) and `ppo` (a reward model), rollouts from the KV-cache sampler.

Each step: draw `batch_size / num_generations` prompts, sample `num_generations` completions of each with the
current policy (prompt-major: sample j of prompt i is row i * G + j, so a group is contiguous), score them, run the
old-policy (and reference) log-prob passes without dropout, and hand the step one batch of [prompt + completion]
rows whose loss mask covers the completion tokens. Every log-prob (old, reference, policy; and the entropy) is of
the sampling distribution, logits / rl.temperature, as TRL computes them (without top-p, as TRL).

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

`rl.updates_per_rollout` = k: a rollout batch serves k consecutive optimizer steps (PPO's epochs; GRPO's
num_iterations). With k = 1 the ratio is 1 at every step and the clipped objective is the plain policy gradient.
The prompt iterator still advances every step. A run resumed mid-cycle samples a fresh rollout at the resumed step
(so it matches an uninterrupted run only when checkpoint_every is a multiple of k).

The reference model's pass is skipped when kl_coef is 0. The sampler and every log-prob pass run without dropout;
the policy's gradient pass uses the stage's `reg` block (all off by default). RL stages run in one process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmstages import losses, partitioning, seeds
from llmstages import rewards as rewards_lib
from llmstages.model import HEAD_PARAMS, Decoder, RegSites
from llmstages.stages import Stage, apply_model, register
from llmstages.stages.preference import final_scores


# ---------------------------------------------------------------------------------------------------------------
# Prompts.

def record_prompt(rec: dict, source) -> rewards_lib.Prompt:
  """A data record as an RL prompt: preference/chat records give the conversation up to `<|assistant|>`,
  prompt/completion records their prompt; kind and answer come from the record's meta."""
  from llmstages.data import chat
  meta = dict(rec.get("meta") or {})
  fmt = rec.get("format")
  if fmt == "chat":
    text = rec["text"][:rec["text"].rindex(chat.ASSISTANT) + len(chat.ASSISTANT)]
  elif rec.get("prompt"):
    text = rec["prompt"]
  else:
    raise ValueError(f"source {source.spec.text!r}: record {rec.get('index')} (format {fmt!r}) has no prompt")
  kind = meta.get("kind", "")
  answer = str(meta.get("answer", ""))
  if not kind:
    if "op" in meta:
      kind = "arith"
    elif "attr" in meta:
      kind, answer = "bios", rec.get("completion", "").strip()
    elif "relation" in meta:
      kind, answer = "world", rec.get("completion", "").strip()
    elif source.spec.name.startswith("stories"):
      kind, meta["opener_in_prompt"] = "story", True
  if kind == "arith" and "result" in meta:
    answer = str(meta["result"])
  args = dict(source.spec.kwargs)
  return rewards_lib.Prompt(text=text, kind=kind, answer=answer, meta=meta, source=source.spec.text,
                            index=int(rec.get("index", -1)), bios_n=int(args.get("bios_n", 2000)),
                            bios_seed=int(args.get("bios_seed", 0)))


class PromptIterator:
  """Batches of `n` prompts from one source, optionally only some kinds and only those whose [BOS] + tokens fit
  in `max_tokens` (with a tokenizer). Train: a fresh permutation per epoch (keyed by seed and epoch); other splits:
  the records in order, so every evaluation sees the same prompts. State: {'epoch', 'position'}."""

  def __init__(self, spec: str, split: str, data_dir: str, n: int, seed: int, kinds=(), tokenizer=None,
               max_tokens: int = 0):
    from llmstages import data
    self.source = data.open_source(spec, split, data_dir)
    self.n, self.seed, self.split = n, seed, split
    self._prompts = {}
    self.items, self.too_long = [], 0
    for i in range(len(self.source)):
      prompt = self._prompt(i)
      if kinds and prompt.kind not in kinds:
        continue
      if tokenizer is not None and max_tokens and 1 + len(tokenizer.encode(prompt.text)) > max_tokens:
        self.too_long += 1
        continue
      self.items.append(i)
    if not self.items:
      raise ValueError(f"source {spec!r} ({split}) has no prompts" + (f" of kinds {tuple(kinds)}" if kinds else "")
                       + (f" of at most {max_tokens} tokens" if max_tokens else ""))
    self.epoch, self.position = 0, 0

  def _prompt(self, i: int) -> rewards_lib.Prompt:
    if i not in self._prompts:
      self._prompts[i] = record_prompt(self.source.record(i), self.source)
    return self._prompts[i]

  def _order(self) -> list[int]:
    if self.split != "train":
      return self.items
    rng = np.random.default_rng([self.seed, self.epoch])
    return [self.items[j] for j in rng.permutation(len(self.items))]

  def __iter__(self):
    return self

  def __next__(self) -> list[rewards_lib.Prompt]:
    out = []
    order = self._order()
    while len(out) < self.n:
      if self.position >= len(order):
        self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
      out.append(self._prompt(order[self.position]))
      self.position += 1
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: dict) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


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


LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


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


def token_entropy(logits_BxLxV):
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# The shared rollout machinery.

def _seed(config_seed: int, name: str, split: str, step: int) -> int:
  return seeds.stage_seed(config_seed, name, int(split == "train"), step)


class RolloutStage(Stage):
  """Prompts -> sampled completions -> rewards and log-prob passes -> one training batch."""

  PER_TOKEN = ("old_logp", "ref_logp")  # Per-token fields the loss reads besides the five token arrays.

  def validate(self, ctx):
    rl, scfg = self.scfg.rl, self.scfg
    if jax.process_count() > 1:
      raise NotImplementedError(f"{self.where}: RL stages run in one process for now (sampling gathers rollouts "
                                f"on the host); run this stage with one process")
    if rl.num_generations < 1 or scfg.batch_size % rl.num_generations:
      raise ValueError(f"{self.where}.batch_size={scfg.batch_size} must be a multiple of "
                       f"rl.num_generations={rl.num_generations} (rows = prompts x generations)")
    if rl.updates_per_rollout < 1:
      raise ValueError(f"{self.where}.rl.updates_per_rollout must be >= 1, got {rl.updates_per_rollout}")
    if rl.max_new_tokens >= scfg.seq_len:
      raise ValueError(f"{self.where}.rl.max_new_tokens={rl.max_new_tokens} must be below seq_len={scfg.seq_len}")
    if rl.temperature <= 0:
      raise ValueError(f"{self.where}.rl.temperature={rl.temperature} must be > 0: RL samples its rollouts")

  def prepare(self, ctx, params, prompts, step, split):
    """A fresh rollout batch every `rl.updates_per_rollout` training steps, reused (with its old log-probs and
    advantages) by the steps in between, so the ratio moves away from 1 and clipping acts; host metrics are
    reported on the step that made the rollout. Evaluation always samples afresh."""
    k = ctx.scfg.rl.updates_per_rollout
    if split != "train" or k == 1:
      return self.make_experience(ctx, params, prompts, step, split)
    start = step - step % k
    cached = ctx.cache.get("rollout")
    if cached is not None and cached[0] == start:
      return cached[1], {}
    batch, host = self.make_experience(ctx, params, prompts, step, split)
    ctx.cache["rollout"] = (start, batch)
    return batch, host

  def reference_stage(self, scfg) -> str:
    ref = scfg.rl.reference or scfg.init_from
    if not ref:
      raise ValueError(f"{self.where}: an RL stage starts from a trained policy: set init_from")
    return ref

  def frozen_models(self, scfg):
    ref = self.reference_stage(scfg)
    return {"reference": (ref, False)} if scfg.rl.kl_coef > 0 else {}

  def batches(self, ctx, tokenizer, split):
    from llmstages import data, train
    self.validate(ctx)
    scfg = ctx.scfg
    spec = scfg.eval_data if split != "train" and scfg.eval_data else scfg.data
    mixture = data.parse_mixture(spec)
    if len(mixture) != 1:
      raise ValueError(f"{self.where}.data={spec!r}: an RL stage reads its prompts from one source")
    it = PromptIterator(mixture[0][0], split, train.data_dir(ctx.config), scfg.batch_size // scfg.rl.num_generations,
                        ctx.config.seed, tuple(scfg.rl.kinds), tokenizer, scfg.seq_len - scfg.rl.max_new_tokens)
    if it.too_long:
      print(f"[{ctx.name}] {split}: {len(it.items)} prompts; {it.too_long} longer than seq_len - rl.max_new_tokens "
            f"= {scfg.seq_len - scfg.rl.max_new_tokens} tokens are left out", flush=True)
    return it

  def abstract_batch(self, ctx):
    out = ctx.token_batch_shapes()
    shape = (ctx.scfg.batch_size, ctx.scfg.seq_len)
    sh = partitioning.batch_sharding(ctx.mesh)
    for k in self.PER_TOKEN:
      out[k] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
    return out

  def sampler(self, ctx):
    if "sampler" not in ctx.cache:
      from llmstages.sampler import Sampler
      ctx.cache["sampler"] = Sampler(ctx.model_cfg, eos_id=ctx.tokenizer.eos_id, pad_id=ctx.tokenizer.pad_id,
                                     mesh=ctx.mesh, rules=ctx.rules)
    return ctx.cache["sampler"]

  def rollout(self, ctx, params, prompts, step, split):
    """Samples G completions per prompt; returns host rows, the decoded replies and sampling statistics."""
    scfg, rl, tok = ctx.scfg, ctx.scfg.rl, ctx.tokenizer
    ids = [[tok.bos_id] + tok.encode(p.text) for p in prompts]
    for p, x in zip(prompts, ids):
      if len(x) + rl.max_new_tokens > scfg.seq_len:
        raise ValueError(f"{self.where}: the prompt of {p.describe()} has {len(x)} tokens; with "
                         f"rl.max_new_tokens={rl.max_new_tokens} it exceeds seq_len={scfg.seq_len}")
    lm_params = {k: v for k, v in params.items() if k not in HEAD_PARAMS}
    samples = self.sampler(ctx).generate(
        lm_params, ids, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
        num_samples=rl.num_generations, seed=_seed(ctx.config.seed, ctx.name, split, step))
    B, L = scfg.batch_size, scfg.seq_len
    rows = {k: np.zeros((B, L), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = np.zeros((B, L), np.float32)
    replies = []
    for r, (gen, n) in enumerate(zip(samples.tokens, samples.lengths)):
      prompt = ids[samples.prompt_index[r]]
      seq = prompt + gen[:n].tolist()
      m = len(seq) - 1
      rows["inputs"][r, :m] = seq[:-1]
      rows["targets"][r, :m] = seq[1:]
      rows["loss_mask"][r, len(prompt) - 1:m] = 1.0
      rows["segment_ids"][r, :m] = 1
      rows["positions"][r, :m] = np.arange(m)
      text = tok.decode([t for t in gen[:n].tolist() if t not in (tok.eos_id, tok.pad_id)])
      replies.append(rewards_lib.completion_text(text))
    ended = samples.tokens[np.arange(B), samples.lengths - 1] == tok.eos_id
    stats = {"completion_length": float(samples.lengths.mean()), "eos_fraction": float(ended.mean())}
    return rows, replies, samples.prompt_index, stats

  def logprob_passes(self, ctx, params, batch):
    """Old-policy and reference per-token log-probs (no dropout), on device."""
    key = "logprob_passes"
    if key not in ctx.cache:
      policy, lm = ctx.eval_model, ctx.lm_model
      use_ref = "reference" in ctx.frozen
      temperature = ctx.scfg.rl.temperature

      def passes(params, frozen, batch):
        out = policy.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = out[0] if isinstance(out, tuple) else out
        res = {"old_logp": losses.token_logprobs(logits / temperature, batch["targets"]) * batch["loss_mask"]}
        if isinstance(out, tuple):
          res["old_values"] = out[1] * batch["loss_mask"]
        if use_ref:
          ref_logits = lm.apply({"params": frozen["reference"]}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
          res["ref_logp"] = losses.token_logprobs(ref_logits / temperature, batch["targets"]) * batch["loss_mask"]
        else:
          res["ref_logp"] = res["old_logp"]
        return res
      ctx.cache[key] = jax.jit(passes)
    return ctx.cache[key](params, ctx.frozen, batch)

  def policy_pass(self, model, params, batch, dyn, rng, train):
    """(logits / temperature, their log-probs of the targets, values or None)."""
    out = apply_model(model, params, batch, dyn, rng, train)
    logits, values = out if isinstance(out, tuple) else (out, None)
    logits = logits.astype(jnp.float32) / self.scfg.rl.temperature
    return logits, losses.token_logprobs(logits, batch["targets"]), values


@register("grpo")
class GRPO(RolloutStage):

  def validate(self, ctx):
    super().validate(ctx)
    for name in self.scfg.rl.rewards:
      rewards_lib.get(name)
    if self.scfg.rl.loss_type not in LOSS_TYPES:
      raise ValueError(f"{self.where}.rl.loss_type={self.scfg.rl.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not self.scfg.rl.rewards:
      raise ValueError(f"{self.where}.rl.rewards is empty: GRPO needs at least one reward function")

  def abstract_batch(self, ctx):
    out = super().abstract_batch(ctx)
    out["advantages"] = jax.ShapeDtypeStruct((ctx.scfg.batch_size,), jnp.float32,
                                             sharding=partitioning.batch_sharding(ctx.mesh))
    return out

  def make_experience(self, ctx, params, prompts, step, split):
    rl = ctx.scfg.rl
    rows, replies, prompt_index, stats = self.rollout(ctx, params, prompts, step, split)
    per_fn = {name: [] for name in rl.rewards}
    total = np.zeros((len(replies),), np.float64)
    for r, reply in enumerate(replies):
      scores = rewards_lib.score(tuple(rl.rewards), reply, prompts[prompt_index[r]], f"stage {ctx.name}")
      for name, v in scores.items():
        if v is not None:
          per_fn[name].append(v)
          total[r] += v
    adv, flat = group_advantages(total, rl.num_generations, rl.std_eps)
    batch = partitioning.global_batch({**rows, "advantages": adv}, ctx.mesh)
    batch.update(self.logprob_passes(ctx, params, batch))
    groups = total.reshape(-1, rl.num_generations)
    host = {"reward": float(total.mean()), "reward_std": float(groups.std(axis=1, ddof=1).mean())
            if rl.num_generations > 1 else 0.0, "frac_zero_std": float(flat.mean()), **stats}
    for name, vals in per_fn.items():
      if vals:
        host[f"reward_{name}"] = float(np.mean(vals))
    return batch, host

  def loss(self, model, params, batch, dyn, rng, train):
    rl = self.scfg.rl
    mask = batch["loss_mask"]
    logits, logp, _ = self.policy_pass(model, params, batch, dyn, rng, train)
    pg, clipped, ratio = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"][:, None], rl.clip_eps)
    per_token = pg
    kl = k3(logp, batch["ref_logp"])
    if rl.kl_coef > 0:
      per_token = per_token + rl.kl_coef * kl
    weights, metric_weights, count = aggregation_weights(mask, rl.loss_type, rl.max_new_tokens)
    metrics = {"kl": jnp.sum(kl * metric_weights), "clip_fraction": jnp.sum(clipped * metric_weights),
               "entropy": jnp.sum(token_entropy(logits) * metric_weights), "ratio": jnp.sum(ratio * metric_weights)}
    return jnp.sum(per_token * weights), count, metrics


@register("ppo")
class PPO(RolloutStage):
  score_head = True  # The value head.
  PER_TOKEN = ("old_logp", "ref_logp", "old_values", "advantages", "returns")

  def validate(self, ctx):
    super().validate(ctx)
    if self.scfg.rl.loss_type != "dapo":
      raise ValueError(f"{self.where}.rl.loss_type={self.scfg.rl.loss_type!r}: PPO averages over tokens; only "
                       f"'dapo' applies (the other loss types are GRPO's)")

  def frozen_models(self, scfg):
    if not scfg.rl.reward_from:
      raise ValueError(f"{self.where}.rl.reward_from is empty: PPO needs a reward model stage")
    return {**super().frozen_models(scfg), "reward": (scfg.rl.reward_from, True)}

  def experience(self, ctx):
    """Jitted: reward-model score, per-token rewards, GAE, whitening."""
    if "ppo_experience" not in ctx.cache:
      rl = self.scfg.rl
      rm = Decoder(ctx.model_cfg, RegSites(), score_head=True)

      def fn(frozen, batch, score_rows):
        score_B = final_scores(rm, frozen["reward"], score_rows)
        mask = batch["loss_mask"]
        kl_BxL = (batch["old_logp"] - batch["ref_logp"]) * mask
        last_BxL = jax.nn.one_hot(jnp.sum(mask, -1).astype(jnp.int32) + jnp.argmax(mask, -1) - 1,
                                  mask.shape[1]) * mask
        rewards_BxL = -rl.kl_coef * kl_BxL + score_B[:, None] * last_BxL
        adv, returns = gae(rewards_BxL, batch["old_values"], mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
          adv = masked_whiten(adv, mask)
        stats = {"score": jnp.mean(score_B), "kl_sum": jnp.mean(jnp.sum(kl_BxL, -1)),
                 "return": jnp.sum(returns * mask) / jnp.maximum(jnp.sum(mask), 1.0)}
        return {"advantages": adv, "returns": returns}, stats
      ctx.cache["ppo_experience"] = jax.jit(fn)
    return ctx.cache["ppo_experience"]

  def make_experience(self, ctx, params, prompts, step, split):
    rows, replies, prompt_index, stats = self.rollout(ctx, params, prompts, step, split)
    # The reward model reads each sequence as it read its training pairs: up to the token before the final EOS.
    score_rows = {k: rows[k].copy() for k in ("inputs", "positions", "segment_ids")}
    eos = ctx.tokenizer.eos_id
    for r in range(rows["inputs"].shape[0]):
      n = int(rows["segment_ids"][r].sum())
      if rows["targets"][r, n - 1] != eos:  # No EOS: the last generated token is scored too.
        score_rows["inputs"][r, n] = rows["targets"][r, n - 1]
        score_rows["positions"][r, n] = n
        score_rows["segment_ids"][r, n] = 1
    batch = partitioning.global_batch(rows, ctx.mesh)
    batch.update(self.logprob_passes(ctx, params, batch))
    extra, dev_stats = self.experience(ctx)(ctx.frozen, batch, partitioning.global_batch(score_rows, ctx.mesh))
    batch.update(extra)
    host = {k: float(v) for k, v in jax.device_get(dev_stats).items()}
    host["reward"] = host.pop("score")
    return batch, {**host, **stats}

  def loss(self, model, params, batch, dyn, rng, train):
    rl = self.scfg.rl
    mask = batch["loss_mask"]
    logits, logp, values = self.policy_pass(model, params, batch, dyn, rng, train)
    values = values * mask
    pg, clipped, ratio = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], rl.clip_eps)
    old_v, ret = batch["old_values"], batch["returns"]
    v_clipped = old_v + jnp.clip(values - old_v, -rl.value_clip, rl.value_clip)
    v_loss = 0.5 * jnp.maximum(jnp.square(values - ret), jnp.square(v_clipped - ret))
    per_token = pg + rl.vf_coef * v_loss
    metrics = {"policy_loss": jnp.sum(pg * mask), "value_loss": jnp.sum(v_loss * mask),
               "clip_fraction": jnp.sum(clipped * mask), "entropy": jnp.sum(token_entropy(logits) * mask),
               "approx_kl": jnp.sum(((ratio - 1.0) - jnp.log(ratio)) * mask),
               "value_clip_fraction": jnp.sum((jnp.abs(values - old_v) > rl.value_clip) * mask)}
    return jnp.sum(per_token * mask), jnp.sum(mask), metrics
