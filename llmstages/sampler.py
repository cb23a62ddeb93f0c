"""The KV-cache sampler: jitted prefill plus a `lax.while_loop` decode, batched, on the training mesh.

Order of samples: with `num_samples = n`, sample j of prompt i is row `i * n + j` (prompt-major), so each prompt's
samples are contiguous, in prompt order (GRPO's groups rely on this).

Prompts are left-padded to a bucketed length (powers of two from 16), so nearby lengths share one compile;
`kv_start` tells each row where its real tokens begin, and positions count from there, so padding changes
nothing. Temperature 0 is a true argmax. Temperature, top-k and top-p are traced values (no recompiles);
whether any top-k/top-p filtering exists is static. A row stops at EOS and is padded after it (log-prob 0).
The number of new tokens is bucketed too (multiples of 16, `new_token_bucket`): the loop is compiled for the
bucket and stops at the count asked for, a traced value, so an evaluator that asks for 6, 10 and 14 tokens compiles
once. The KV cache grows in power-of-two segments from 64 slots (`cache_segments`), so a step attends over the
filled slots rounded up to a bucket rather than over the whole preallocated length.

Log-probs: at temperature > 0, each token's log-prob under the distribution it was drawn from (temperature
scaled, then filtered by `filter_logits`: top-k, then top-p on the renormalized top-k mass); at temperature 0,
its log-prob at temperature 1. At temperature 1 without filtering these are the training code's log-probs of the
same tokens.

Optional MC dropout (`mc_dropout > 0`) keeps dropout on at every site during sampling: a second source of
randomness, even at temperature 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmstages import partitioning
from llmstages.losses import first_argmax
from llmstages.model import Decoder, ModelConfig, RegSites, init_cache, zero_rates


def bucket_length(n: int, minimum: int = 16) -> int:
  b = minimum
  while b < n:
    b *= 2
  return b


def new_token_bucket(n: int, room: int) -> int:
  """The decode loop's compiled length for `n` new tokens: n rounded up to a multiple of 16, at most `room` (the
  context left after the padded prompt, itself >= n). Measured on the capacity smoke pipeline: bios_facts asks
  for 6 attributes' continuations of different lengths plus the QA prompts, 15 compiles of ~4 s each unbucketed."""
  return min(-(-n // 16) * 16, room)


@dataclasses.dataclass
class Samples:
  """Generated continuations; row r belongs to prompt `prompt_index[r]` (prompt-major order)."""
  tokens: np.ndarray  # [R, T] int32, pad after EOS.
  logprobs: np.ndarray  # [R, T] float32, 0 after EOS.
  lengths: np.ndarray  # [R] tokens generated, EOS included.
  prompt_index: np.ndarray  # [R]

  def sequences(self) -> list[list[int]]:
    """Each row's tokens up to and including EOS."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _choose(logits_BxV, key, temperature, top_k, top_p, filtering: bool):
  """(token, log-prob) per row; see the module docstring for which log-prob."""
  logits = logits_BxV.astype(jnp.float32)

  def greedy(_):
    token_B = first_argmax(logits)
    # log_softmax at the chosen token only (as losses.token_logprobs does), not over the whole [B, V] row.
    chosen_B = jnp.take_along_axis(logits, token_B[:, None], axis=-1)[:, 0]
    return token_B, chosen_B - jax.nn.logsumexp(logits, axis=-1)

  def sample(_):
    return _sample(logits, key, temperature, top_k, top_p, filtering)

  return jax.lax.cond(temperature > 0, sample, greedy, None)


def filter_logits(scaled_BxV, top_k, top_p):
  """Top-k, then top-p over the renormalized top-k distribution (Hugging Face's TopK then TopP warpers, vLLM):
  the kept tokens keep their logits, the others get -inf. top_k = 0 keeps every token; ties with the k-th logit
  stay, as in Hugging Face. Top-p keeps the smallest set, by descending probability, whose mass reaches top_p,
  the top token always; that mass is measured after top-k, so top_k=2, top_p=0.5 on probabilities
  (0.4, 0.3, 0.2, 0.1) keeps only the first token (4/7 >= 0.5), where a top-p over all four would keep two."""
  v = scaled_BxV.shape[-1]
  sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth_B = jnp.take(sorted_BxV, k - 1, axis=-1)
  in_k_BxV = sorted_BxV >= kth_B[:, None]
  probs_sorted = jax.nn.softmax(jnp.where(in_k_BxV, sorted_BxV, -jnp.inf), axis=-1)  # Renormalized after top-k.
  before_BxV = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted  # Mass strictly above each entry.
  keep_sorted = in_k_BxV & (before_BxV < top_p)
  threshold_B = jnp.min(jnp.where(keep_sorted, sorted_BxV, jnp.inf), axis=-1)
  return jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)


def _sample(logits, key, temperature, top_k, top_p, filtering: bool):
  scaled = logits / temperature
  if filtering:
    scaled = filter_logits(scaled, top_k, top_p)
  token_B = first_argmax(scaled + jax.random.gumbel(key, scaled.shape))  # Gumbel-max: a categorical draw.
  logp_sampled = jax.nn.log_softmax(scaled, axis=-1)
  return token_B, jnp.take_along_axis(logp_sampled, token_B[:, None], axis=-1)[:, 0]


def cache_segments(prompt_len: int, new_tokens: int, minimum: int = 64) -> list[tuple[int, int]]:
  """(cache slots, decode steps that end the segment) per segment of the decode loop: the KV cache grows in
  powers of two from `minimum` slots up to prompt_len + new_tokens, so that each step attends over the slots
  filled so far rounded up to a bucket, not over the whole preallocated cache (the step that feeds token i writes
  slot prompt_len + i and needs that many slots plus one). Each segment is one more compiled copy of the step
  (~0.5 s of compile at the bench model); generations of up to `minimum` tokens in all keep one.

  Why 64: a decode step reads every slot of its cache, and once weights and cache outgrow the CPU's last-level
  cache it reads them at DRAM speed (on this project's 2-core VM, 32 MB L3: a [32, 4, S, 64] float32 key cache
  read takes 13 us at S = 32, 250 us at S = 128). Side by side in one process at the bench model (batch 32,
  16 + 128 tokens, 9 alternating calls, identical tokens): 8.1 ms per token with one 144-slot cache (minimum 256),
  7.0-7.6 with segments from 64 (64, 128, 144), 6.9-7.3 from 32 (one more compile for 2-4% more)."""
  total = prompt_len + new_tokens
  segments, slots = [], min(total, max(minimum, bucket_length(prompt_len + 1)))
  while True:
    last_step = min(new_tokens, slots - prompt_len)
    segments.append((slots, last_step))
    if last_step == new_tokens:
      return segments
    slots = min(total, 2 * slots)


@functools.partial(jax.jit, static_argnames=("model", "new_tokens", "eos_id", "pad_id", "filtering", "mc"))
def _generate(params, prompt_BxP, kv_start_B, rng, temperature, top_k, top_p, mc_rate, num_new, *, model: Decoder,
              new_tokens: int, eos_id: int, pad_id: int, filtering: bool, mc: bool):
  """Up to `num_new` (traced, <= the static `new_tokens`, the buffers' length) tokens per row."""
  b, p = prompt_BxP.shape
  segments = cache_segments(p, new_tokens)
  cache = init_cache(model.cfg, b, segments[0][0])
  rates = jax.tree.map(lambda r: r + mc_rate, zero_rates(model.cfg.num_layers)) if mc else None
  rates = None if rates is None else {**rates, "neftune_alpha": jnp.zeros((), jnp.float32),
                                      "drop_path": jnp.zeros_like(rates["drop_path"])}

  def apply(tokens_BxL, positions_BxL, cache, index, key):
    out = model.apply({"params": params}, tokens_BxL, positions_BxL, cache=cache, cache_index=index,
                      kv_start_B=kv_start_B, rates=rates, deterministic=not mc, rngs={"dropout": key} if mc else None,
                      last_only=True)  # The prompt's prefill needs its last logits only.
    return out.logits[:, -1], out.cache

  positions_BxP = jnp.maximum(jnp.arange(p)[None, :] - kv_start_B[:, None], 0)
  rng, key = jax.random.split(rng)
  last_BxV, cache = apply(prompt_BxP, positions_BxP, cache, 0, key)
  prompt_len_B = p - kv_start_B

  def body(state):
    i, last_BxV, cache, tokens_BxT, logps_BxT, done_B, rng = state
    rng, k_sample, k_drop = jax.random.split(rng, 3)
    token_B, logp_B = _choose(last_BxV, k_sample, temperature, top_k, top_p, filtering)
    token_B = jnp.where(done_B, pad_id, token_B).astype(jnp.int32)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    tokens_BxT = tokens_BxT.at[:, i].set(token_B)
    logps_BxT = logps_BxT.at[:, i].set(logp_B)
    done_B = done_B | (token_B == eos_id)
    last_BxV, cache = apply(token_B[:, None], (prompt_len_B + i)[:, None], cache, p + i, k_drop)
    return i + 1, last_BxV, cache, tokens_BxT, logps_BxT, done_B, rng

  state = (jnp.int32(0), last_BxV, cache, jnp.full((b, new_tokens), pad_id, jnp.int32),
           jnp.zeros((b, new_tokens), jnp.float32), jnp.zeros((b,), jnp.bool_), rng)
  for slots, last_step in segments:
    grow = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, slots - x.shape[-2]), (0, 0)])
    state = state[:2] + (jax.tree.map(grow, state[2]),) + state[3:]
    cond = lambda state, last_step=last_step: (state[0] < last_step) & (state[0] < num_new) & ~jnp.all(state[5])
    state = jax.lax.while_loop(cond, body, state)
  _, _, _, tokens_BxT, logps_BxT, _, _ = state
  return tokens_BxT, logps_BxT


class Sampler:
  """Samples continuations of token prompts from a `Decoder`'s parameters.

  `mesh`/`rules`: run inside that mesh (parameters keep their training shardings). `mc_dropout`: dropout rate at
  every site during sampling (0: deterministic model).
  """

  def __init__(self, model_cfg: ModelConfig, *, eos_id: int, pad_id: int, mesh=None, rules=(),
               mc_dropout: float = 0.0):
    self.cfg = model_cfg
    self.eos_id, self.pad_id = eos_id, pad_id
    self.mesh, self.rules = mesh, rules
    self.mc_dropout = float(mc_dropout)
    sites = RegSites(embed_dropout=False, attn_dropout=True, residual_dropout=True, mlp_dropout=True) \
        if self.mc_dropout > 0 else RegSites()
    self.model = Decoder(model_cfg, sites)

  def prepare(self, prompts: Sequence[Sequence[int]], new_tokens: int, num_samples: int = 1):
    """Left-pads prompts to a bucketed length; returns (prompt_BxP, kv_start_B) with rows prompt-major."""
    if not prompts:
      raise ValueError("no prompts to sample from")
    longest = max(len(x) for x in prompts)
    if min(len(x) for x in prompts) == 0:
      raise ValueError("a prompt is empty: every prompt needs at least one token (e.g. BOS)")
    limit = self.cfg.max_seq_len
    if longest + new_tokens > limit:
      raise ValueError(f"a prompt of {longest} tokens plus {new_tokens} new tokens exceeds the model's context "
                       f"(config.model.max_seq_len={limit})")
    p = min(bucket_length(longest), limit - new_tokens)
    rows = [list(x) for x in prompts for _ in range(num_samples)]
    prompt_BxP = np.full((len(rows), p), self.pad_id, np.int32)
    kv_start_B = np.zeros((len(rows),), np.int32)
    for r, toks in enumerate(rows):
      prompt_BxP[r, p - len(toks):] = toks
      kv_start_B[r] = p - len(toks)
    return prompt_BxP, kv_start_B

  def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
               token_bucket: int | None = None) -> Samples:
    """`token_bucket`: the decode loop's compiled length, >= max_new_tokens (default `new_token_bucket`); a
    caller that sees many different counts (a server) passes coarser buckets for fewer compiles. The loop still
    stops at max_new_tokens; a larger bucket only lets the KV cache grow longer (more masked slots), so the logits
    agree to float rounding."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or num_samples < 1:
      raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                       f"top_p={top_p} (in (0, 1]), max_new_tokens={max_new_tokens} (>= 1), "
                       f"num_samples={num_samples} (>= 1)")
    if token_bucket is not None and token_bucket < max_new_tokens:
      raise ValueError(f"token_bucket={token_bucket} is below max_new_tokens={max_new_tokens}")
    prompt_BxP, kv_start_B = self.prepare(prompts, max_new_tokens, num_samples)
    filtering = top_k > 0 or top_p < 1.0
    args = (params, prompt_BxP, kv_start_B, jax.random.key(seed), np.float32(temperature), np.int32(top_k),
            np.float32(top_p), np.float32(self.mc_dropout), np.int32(max_new_tokens))
    kwargs = dict(model=self.model, new_tokens=self._bucket(prompt_BxP.shape[1], max_new_tokens, token_bucket),
                  eos_id=self.eos_id, pad_id=self.pad_id, filtering=filtering, mc=self.mc_dropout > 0)
    if self.mesh is not None:
      with partitioning.activate(self.mesh, self.rules):
        tokens, logps = _generate(*args, **kwargs)
    else:
      tokens, logps = _generate(*args, **kwargs)
    tokens = np.asarray(jax.device_get(tokens))[:, :max_new_tokens]
    logps = np.asarray(jax.device_get(logps))[:, :max_new_tokens]
    is_eos = tokens == self.eos_id
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
    prompt_index = np.repeat(np.arange(len(prompts)), num_samples)
    return Samples(tokens=tokens, logprobs=logps, lengths=lengths, prompt_index=prompt_index)

  def _bucket(self, prompt_len: int, new_tokens: int, token_bucket: int | None = None) -> int:
    room = self.cfg.max_seq_len - prompt_len  # >= new_tokens: `prepare` pads the prompt to leave that room.
    return new_token_bucket(new_tokens, room) if token_bucket is None else min(token_bucket, room)

  def lower(self, params, rows: int, prompt_len: int, max_new_tokens: int, filtering: bool = False):
    """The decode loop `generate` runs, lowered for `rows` prompts of `prompt_len` tokens and not run: `params` may
    be abstract (`jax.ShapeDtypeStruct`s with shardings), so `llmstages.aot` can compile it for a TPU topology.
    The prompts and sampling settings are replicated over the mesh, as `generate`'s host arrays are."""
    rep = None if self.mesh is None else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    key = jax.eval_shape(jax.random.key, 0)
    args = (params, spec((rows, prompt_len), jnp.int32), spec((rows,), jnp.int32),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep), spec((), jnp.float32), spec((), jnp.int32),
            spec((), jnp.float32), spec((), jnp.float32), spec((), jnp.int32))
    kwargs = dict(model=self.model, new_tokens=self._bucket(prompt_len, max_new_tokens), eos_id=self.eos_id,
                  pad_id=self.pad_id, filtering=filtering, mc=self.mc_dropout > 0)
    if self.mesh is None:
      return _generate.lower(*args, **kwargs)
    with partitioning.activate(self.mesh, self.rules):
      return _generate.lower(*args, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "new_tokens"))
def generate_without_cache(params, prompt_BxP, *, model: Decoder, new_tokens: int):
  """Greedy decoding by recomputing the whole forward pass for every token (a reference and a baseline).

  Prompts must be unpadded and of equal length; the buffer has a fixed shape so this compiles once.
  """
  b, p = prompt_BxP.shape
  buf = jnp.concatenate([prompt_BxP, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)

  def body(i, buf):
    logits = model.apply({"params": params}, buf).logits
    nxt = first_argmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False))
    return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), p + i, axis=1)

  return jax.lax.fori_loop(0, new_tokens, body, buf)[:, p:]
