"""The rollout machinery of the on-policy RL stages (`rl.py`): prompts, sampling, the log-prob passes, the rollout
batch and the typed `rl` config block.

Each step: draw `batch_size / num_generations` prompts, sample `num_generations` completions of each with the
current policy (prompt-major: sample j of prompt i is row i * G + j, so a group is contiguous), score them, run the
old-policy (and reference) log-prob passes without dropout, and hand the step one batch of [prompt + completion]
rows whose loss mask covers the completion tokens. Every log-prob (old, reference, policy; and the entropy) is of
the sampling distribution, logits / rl.temperature, as TRL computes them (without top-p, as TRL).

`rl.updates_per_rollout` = k: a rollout batch serves k consecutive optimizer steps (PPO's epochs; GRPO's
num_iterations). The prompt iterator still advances every step. A run resumed mid-cycle samples a fresh rollout at
the resumed step (so it matches an uninterrupted run only when checkpoint_every is a multiple of k).

The reference model's pass is skipped when kl_coef is 0. The sampler and every log-prob pass run without dropout;
the policy's gradient pass uses the stage's `reg` block (all off by default). RL stages run in one process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llmstages import data, inputs, losses, partitioning, seeds
from llmstages import rewards as rewards_lib
from llmstages.data import chat
from llmstages.inputs import TokenBatch
from llmstages.model import split_head
from llmstages.sampler import Sampler
from llmstages.stages.base import Stage, apply_model


@flax.struct.dataclass
class RolloutBatch:
  """Sampled [prompt + completion] rows and what the RL losses read besides them, [B, L] unless noted."""
  tokens: TokenBatch
  old_logp: Any = None  # The sampling policy's per-token log-probs (at rl.temperature), 0 off the completion.
  ref_logp: Any = None  # The frozen reference's (= old_logp when kl_coef is 0).
  advantages: Any = None  # GRPO: [B], one per sample; PPO: [B, L], per token.
  old_values: Any = None  # PPO: the value head at sampling time.
  returns: Any = None  # PPO: GAE returns.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """`config.<stage>.rl` with the stage settings rollouts depend on, checked when the stage is built."""
  where: str
  batch_size: int
  seq_len: int
  reference: str  # rl.reference, else init_from.
  num_generations: int
  max_new_tokens: int
  temperature: float
  top_p: float
  kl_coef: float
  clip_eps: float
  loss_type: str
  updates_per_rollout: int
  kinds: tuple
  rewards: tuple
  std_eps: float
  reward_from: str
  gamma: float
  lam: float
  vf_coef: float
  value_clip: float
  whiten_advantages: bool

  def __post_init__(self):
    where = self.where
    if not self.reference:
      raise ValueError(f"{where}: an RL stage starts from a trained policy: set init_from")
    if self.num_generations < 1 or self.batch_size % self.num_generations:
      raise ValueError(f"{where}.batch_size={self.batch_size} must be a multiple of "
                       f"rl.num_generations={self.num_generations} (rows = prompts x generations)")
    if self.updates_per_rollout < 1:
      raise ValueError(f"{where}.rl.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
    if self.max_new_tokens >= self.seq_len:
      raise ValueError(f"{where}.rl.max_new_tokens={self.max_new_tokens} must be below seq_len={self.seq_len}")
    if self.temperature <= 0:
      raise ValueError(f"{where}.rl.temperature={self.temperature} must be > 0: RL samples its rollouts")

  @classmethod
  def from_block(cls, block, where: str):
    rl = block.rl
    fields = {f.name for f in dataclasses.fields(cls)} - {"where", "batch_size", "seq_len", "reference"}
    values = {k: tuple(rl[k]) if k in ("kinds", "rewards") else rl[k] for k in fields}
    return cls(where=where, batch_size=block.batch_size, seq_len=block.seq_len,
               reference=rl.reference or block.init_from, **values)


def record_prompt(rec: dict, source) -> rewards_lib.Prompt:
  """A data record as an RL prompt: preference/chat records give the conversation up to `<|assistant|>`,
  prompt/completion records their prompt; kind and answer come from the record's meta."""
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


def _seed(config_seed: int, name: str, split: str, step: int) -> int:
  return seeds.stage_seed(config_seed, name, int(split == "train"), step)


def rows_from_samples(samples, ids, rows: int, seq_len: int, tokenizer):
  """Host [rows, seq_len] token arrays of prompt + completion (loss on the completion) and the decoded replies."""
  arrays = {k: np.zeros((rows, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  arrays["loss_mask"] = np.zeros((rows, seq_len), np.float32)
  replies = []
  for r, (gen, n) in enumerate(zip(samples.tokens, samples.lengths)):
    prompt = ids[samples.prompt_index[r]]
    seq = prompt + gen[:n].tolist()
    m = len(seq) - 1
    arrays["inputs"][r, :m] = seq[:-1]
    arrays["targets"][r, :m] = seq[1:]
    arrays["loss_mask"][r, len(prompt) - 1:m] = 1.0
    arrays["segment_ids"][r, :m] = 1
    arrays["positions"][r, :m] = np.arange(m)
    text = tokenizer.decode([t for t in gen[:n].tolist() if t not in (tokenizer.eos_id, tokenizer.pad_id)])
    replies.append(rewards_lib.completion_text(text))
  return arrays, replies


class RolloutStage(Stage):
  """Prompts -> sampled completions -> rewards and log-prob passes -> one training batch (a `RolloutBatch`).

  Owns, created on first use: the sampler, the jitted log-prob passes and the rollout reused across
  `rl.updates_per_rollout` steps."""
  Config = RLConfig

  def __init__(self, stage_config=None, where: str = ""):
    super().__init__(stage_config, where)
    self._sampler = None
    self._logprob_fn = None
    self._rollout = None  # (first step it serves, its batch)

  def check_runtime(self):
    if jax.process_count() > 1:
      raise NotImplementedError(f"{self.where}: RL stages run in one process for now (sampling gathers rollouts "
                                f"on the host); run this stage with one process")

  def make_experience(self, ctx, params, prompts, step: int, split: str):
    raise NotImplementedError

  def prepare(self, ctx, params, prompts, step, split):
    """A fresh rollout batch every `rl.updates_per_rollout` training steps, reused (with its old log-probs and
    advantages) by the steps in between, so the ratio moves away from 1 and clipping acts; host metrics are
    reported on the step that made the rollout. Evaluation always samples afresh."""
    k = self.cfg.updates_per_rollout
    if split != "train" or k == 1:
      return self.make_experience(ctx, params, prompts, step, split)
    start = step - step % k
    if self._rollout is not None and self._rollout[0] == start:
      return self._rollout[1], {}
    batch, host = self.make_experience(ctx, params, prompts, step, split)
    self._rollout = (start, batch)
    return batch, host

  def frozen_models(self):
    return {"reference": (self.cfg.reference, False)} if self.cfg.kl_coef > 0 else {}

  def batches(self, ctx, tokenizer, split):
    self.check_runtime()
    stage_config, cfg = ctx.stage_config, self.cfg
    spec = stage_config.eval_data if split != "train" and stage_config.eval_data else stage_config.data
    mixture = data.parse_mixture(spec)
    if len(mixture) != 1:
      raise ValueError(f"{self.where}.data={spec!r}: an RL stage reads its prompts from one source")
    it = PromptIterator(mixture[0][0], split, inputs.data_dir(ctx.config), cfg.batch_size // cfg.num_generations,
                        ctx.config.seed, cfg.kinds, tokenizer, cfg.seq_len - cfg.max_new_tokens)
    if it.too_long:
      print(f"[{ctx.name}] {split}: {len(it.items)} prompts; {it.too_long} longer than seq_len - rl.max_new_tokens "
            f"= {cfg.seq_len - cfg.max_new_tokens} tokens are left out", flush=True)
    return it

  def abstract_batch(self, ctx):
    per_token = jax.ShapeDtypeStruct((self.cfg.batch_size, self.cfg.seq_len), jnp.float32,
                                     sharding=partitioning.batch_sharding(ctx.mesh))
    return RolloutBatch(tokens=ctx.token_batch_shapes(), old_logp=per_token, ref_logp=per_token)

  def sampler(self, ctx) -> Sampler:
    if self._sampler is None:
      self._sampler = Sampler(ctx.model_cfg, eos_id=ctx.tokenizer.eos_id, pad_id=ctx.tokenizer.pad_id,
                              mesh=ctx.mesh, rules=ctx.rules)
    return self._sampler

  def rollout(self, ctx, params, prompts, step, split):
    """Samples G completions per prompt; returns host rows, the decoded replies and sampling statistics."""
    cfg, tok = self.cfg, ctx.tokenizer
    ids = [[tok.bos_id] + tok.encode(p.text) for p in prompts]
    for p, x in zip(prompts, ids):
      if len(x) + cfg.max_new_tokens > cfg.seq_len:
        raise ValueError(f"{self.where}: the prompt of {p.describe()} has {len(x)} tokens; with "
                         f"rl.max_new_tokens={cfg.max_new_tokens} it exceeds seq_len={cfg.seq_len}")
    lm_params, _ = split_head(params)
    samples = self.sampler(ctx).generate(
        lm_params, ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        num_samples=cfg.num_generations, seed=_seed(ctx.config.seed, ctx.name, split, step))
    rows, replies = rows_from_samples(samples, ids, cfg.batch_size, cfg.seq_len, tok)
    ended = samples.tokens[np.arange(cfg.batch_size), samples.lengths - 1] == tok.eos_id
    stats = {"completion_length": float(samples.lengths.mean()), "eos_fraction": float(ended.mean()),
             "prompts": len(prompts)}  # Summed, not averaged, over steps (train.mean_metrics).
    return rows, replies, samples.prompt_index, stats

  def logprob_passes(self, ctx, params, tokens: TokenBatch) -> dict:
    """Old-policy and reference per-token log-probs (and PPO's old values), no dropout, on device."""
    if self._logprob_fn is None:
      policy, lm = ctx.eval_model, ctx.lm_model
      use_ref = "reference" in ctx.frozen
      temperature = self.cfg.temperature

      def passes(params, frozen, tokens):
        out = policy.apply({"params": params}, tokens.inputs, tokens.positions, tokens.segment_ids)
        res = {"old_logp": losses.token_logprobs(out.logits / temperature, tokens.targets) * tokens.loss_mask}
        if out.scores is not None:
          res["old_values"] = out.scores * tokens.loss_mask
        if use_ref:
          ref_logits = lm.apply({"params": frozen["reference"]}, tokens.inputs, tokens.positions,
                                tokens.segment_ids).logits
          res["ref_logp"] = losses.token_logprobs(ref_logits / temperature, tokens.targets) * tokens.loss_mask
        else:
          res["ref_logp"] = res["old_logp"]
        return res
      self._logprob_fn = jax.jit(passes)
    return self._logprob_fn(params, ctx.frozen, tokens)

  def policy_pass(self, model, params, tokens: TokenBatch, step_values, rng, train):
    """(logits / temperature, their log-probs of the targets, values or None)."""
    out = apply_model(model, params, tokens, step_values, rng, train)
    logits = out.logits.astype(jnp.float32) / self.cfg.temperature
    return logits, losses.token_logprobs(logits, tokens.targets), out.scores
