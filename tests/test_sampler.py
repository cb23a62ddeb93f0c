"""Sampler identities: cached decode == full forward, greedy == argmax == top-k 1, seeds, log-probs, order, EOS;
the serving batcher's token budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmstages import losses
from llmstages.model import Decoder, init_cache
from llmstages.sampler import Sampler, _generate, cache_segments, filter_logits, generate_without_cache
from tests.helpers import init_params, tiny

CFG = tiny(vocab_size=64, max_seq_len=64)
EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, seed=1)


def _prompts(lengths=(5, 9, 3), seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, 64, n)) for n in lengths]


def test_cached_decode_equals_full_forward(params):
  model = Decoder(CFG)
  rng = np.random.default_rng(0)
  lengths = [12, 7]
  total = 16
  seqs = [rng.integers(3, 64, total).astype(np.int32) for _ in lengths]
  # Left-pad the prompts (first `n` tokens) into one batch; then feed the rest one token per step.
  p = max(lengths)
  prompt = np.zeros((2, p), np.int32)
  start = np.array([p - n for n in lengths], np.int32)
  for r, n in enumerate(lengths):
    prompt[r, p - n:] = seqs[r][:n]
  cache = init_cache(CFG, 2, p + total)
  pos = np.maximum(np.arange(p)[None] - start[:, None], 0)
  out = model.apply({"params": params}, prompt, pos, cache=cache, cache_index=0, kv_start_B=start)
  logits, cache = out.logits, out.cache
  got = {r: [np.asarray(logits[r, p - 1])] for r in range(2)}
  for i in range(total - min(lengths)):
    tok = np.array([seqs[r][min(lengths[r] + i, total - 1)] for r in range(2)], np.int32)[:, None]
    step_pos = (np.array(lengths) + i)[:, None]
    out = model.apply({"params": params}, tok, step_pos, cache=cache, cache_index=p + i, kv_start_B=start)
    logits, cache = out.logits, out.cache
    for r in range(2):
      got[r].append(np.asarray(logits[r, 0]))
  for r, n in enumerate(lengths):
    full = np.asarray(model.apply({"params": params}, seqs[r][None]).logits)[0]
    for i in range(total - n):
      np.testing.assert_allclose(got[r][i], full[n - 1 + i], rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax_is_top_k_1_and_matches_no_cache(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  prompts = _prompts((6, 6))
  greedy = s.generate(params, prompts, max_new_tokens=10, temperature=0.0)
  top1 = s.generate(params, prompts, max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  ref = generate_without_cache(params, jnp.asarray(np.array(prompts, np.int32)), model=Decoder(CFG), new_tokens=10)
  np.testing.assert_array_equal(greedy.tokens, np.asarray(ref))


@pytest.mark.parametrize("prompt_len,new_tokens", [(16, 128), (6, 290), (64, 32), (100, 900), (300, 1)])
def test_cache_segments_grow_by_doubling_and_hold_every_step(prompt_len, new_tokens):
  segments = cache_segments(prompt_len, new_tokens)
  slots = [s for s, _ in segments]
  assert slots[-1] == prompt_len + new_tokens and slots[0] >= min(64, prompt_len + new_tokens)
  assert len(segments) > 1 or prompt_len + new_tokens <= 64 or prompt_len >= 64
  assert all(b == min(2 * a, prompt_len + new_tokens) for a, b in zip(slots, slots[1:]))
  first = 0
  for slots_j, last in segments:  # Step i writes slot prompt_len + i: it needs prompt_len + i + 1 slots.
    assert first < last and prompt_len + last <= slots_j
    first = last
  assert first == new_tokens


def test_decoding_across_cache_segments_matches_no_cache():
  cfg = tiny(vocab_size=64, max_seq_len=320)
  params = init_params(cfg, seed=3)
  prompts = _prompts((6, 6), seed=1)
  # The 6-token prompts are left-padded to 16; step i writes slot 16 + i.
  assert cache_segments(16, 290) == [(64, 48), (128, 112), (256, 240), (306, 290)]
  greedy = Sampler(cfg, eos_id=-1, pad_id=PAD).generate(params, prompts, max_new_tokens=290)
  ref = generate_without_cache(params, jnp.asarray(np.array(prompts, np.int32)), model=Decoder(cfg), new_tokens=290)
  np.testing.assert_array_equal(greedy.tokens, np.asarray(ref))
  full = np.asarray(Decoder(cfg).apply({"params": params}, np.concatenate([prompts, greedy.tokens], 1)).logits)
  want = np.take_along_axis(jax.nn.log_softmax(full[:, 5:-1]), greedy.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(greedy.logprobs, want, rtol=1e-4, atol=1e-4)


def test_seeds_repeat_and_differ(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  a = s.generate(params, _prompts(), max_new_tokens=12, temperature=1.0, seed=3)
  b = s.generate(params, _prompts(), max_new_tokens=12, temperature=1.0, seed=3)
  c = s.generate(params, _prompts(), max_new_tokens=12, temperature=1.0, seed=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()


def test_logprobs_equal_training_logprobs(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  prompts = _prompts((5, 9))
  out = s.generate(params, prompts, max_new_tokens=8, temperature=1.0, seed=0)
  for r, prompt in enumerate(prompts):
    seq = np.array(prompt + out.tokens[r].tolist(), np.int32)[None]
    logits = Decoder(CFG).apply({"params": params}, seq[:, :-1]).logits
    lp = np.asarray(losses.token_logprobs(logits, seq[:, 1:]))[0, len(prompt) - 1:]
    np.testing.assert_allclose(out.logprobs[r], lp, rtol=1e-5, atol=1e-5)


def test_top_p_and_top_k_restrict_the_support(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  prompt = _prompts((6,))
  greedy = s.generate(params, prompt, max_new_tokens=1, temperature=0.0)
  first = int(greedy.tokens[0, 0])
  tiny_p = s.generate(params, prompt, max_new_tokens=1, temperature=1.0, top_p=1e-6, num_samples=16, seed=1)
  assert set(tiny_p.tokens[:, 0].tolist()) == {first}  # Only the top token survives a tiny top_p.
  np.testing.assert_allclose(tiny_p.logprobs[:, 0], 0.0, atol=1e-6)  # ... with all the mass.
  k3 = s.generate(params, prompt, max_new_tokens=1, temperature=2.0, top_k=3, num_samples=64, seed=2)
  logits = np.asarray(Decoder(CFG).apply({"params": params}, np.array(prompt, np.int32)).logits)[0, -1]
  assert set(k3.tokens[:, 0].tolist()) <= set(np.argsort(logits)[-3:].tolist())


def test_top_p_after_top_k_renormalizes_by_hand():
  # p = (0.4, 0.3, 0.2, 0.1). top_k=2 leaves (4/7, 3/7): the first token alone reaches top_p=0.5, so the second
  # goes. A top-p over the unfiltered mass would keep both (0.4 < 0.5), the bug this guards against.
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
  kept = np.isfinite(np.asarray(filter_logits(logits, jnp.int32(2), jnp.float32(0.5))))
  assert kept.tolist() == [[True, False, False, False], [False, False, False, True]]
  # top_p=0.6 keeps both top-k tokens (4/7 < 0.6); top_k=0 is top-p alone over all four (0.4 + 0.3 >= 0.6).
  assert np.isfinite(np.asarray(filter_logits(logits, jnp.int32(2), jnp.float32(0.6))))[0].tolist() == \
      [True, True, False, False]
  assert np.isfinite(np.asarray(filter_logits(logits, jnp.int32(0), jnp.float32(0.6))))[0].tolist() == \
      [True, True, False, False]
  assert np.isfinite(np.asarray(filter_logits(logits, jnp.int32(3), jnp.float32(1.0)))).sum(axis=1).tolist() == [3, 3]


def test_sampled_logprob_is_renormalized_after_top_k_and_top_p(params):
  # The sampler's log-prob is that of the distribution it drew from: with top_k=2, top_p chosen between the two
  # renormalized masses, only the top token survives and has log-prob 0.
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  prompt = _prompts((6,))
  logits = np.asarray(Decoder(CFG).apply({"params": params}, np.array(prompt, np.int32)).logits)[0, -1].astype(
      np.float64)
  top2 = np.sort(logits)[-2:]
  p_top = 1.0 / (1.0 + np.exp(top2[0] - top2[1]))  # The top token's share of the top-2 mass.
  out = s.generate(params, prompt, max_new_tokens=1, temperature=1.0, top_k=2, top_p=float(p_top) * 0.99,
                   num_samples=16, seed=3)
  assert set(out.tokens[:, 0].tolist()) == {int(np.argmax(logits))}
  np.testing.assert_allclose(out.logprobs[:, 0], 0.0, atol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(5, 0.3), (10, 0.7), (3, 0.95), (0, 0.5), (7, 1.0)])
def test_filter_matches_transformers_top_k_then_top_p_warpers(top_k, top_p):
  import torch  # Heavy, and only this parity test needs it (the `test` extra installs it).
  from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
  logits = np.random.default_rng(top_k).normal(size=(6, 50)).astype(np.float32) * 2.0
  scores = torch.from_numpy(logits.copy())
  if top_k > 0:
    scores = TopKLogitsWarper(top_k=top_k)(None, scores)
  if top_p < 1.0:
    scores = TopPLogitsWarper(top_p=top_p)(None, scores)
  ours = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores.numpy()))
  np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


def test_sample_order_is_prompt_major(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  prompts = _prompts((4, 7, 5))
  many = s.generate(params, prompts, max_new_tokens=6, temperature=0.0, num_samples=3)
  np.testing.assert_array_equal(many.prompt_index, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  for i, prompt in enumerate(prompts):
    one = s.generate(params, [prompt], max_new_tokens=6, temperature=0.0)
    for j in range(3):
      np.testing.assert_array_equal(many.tokens[3 * i + j], one.tokens[0])


def test_stops_at_eos_and_pads_after(params):
  prompts = _prompts((6, 6))
  free = Sampler(CFG, eos_id=-1, pad_id=PAD).generate(params, prompts, max_new_tokens=10)
  eos = int(free.tokens[0, 3])  # Declare row 0's 4th greedy token the EOS token.
  out = Sampler(CFG, eos_id=eos, pad_id=PAD).generate(params, prompts, max_new_tokens=10)
  first = int(np.argmax(free.tokens[0] == eos))
  assert out.lengths[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert (out.tokens[0, first + 1:] == PAD).all() and (out.logprobs[0, first + 1:] == 0).all()


def test_bucketed_lengths_share_a_compile(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  s.generate(params, _prompts((5,)), max_new_tokens=4)
  n = _generate._cache_size()
  s.generate(params, _prompts((11,)), max_new_tokens=4, temperature=0.7, top_k=0)
  s.generate(params, _prompts((16,)), max_new_tokens=4)
  assert _generate._cache_size() == n
  # New-token counts share a compile too (a bucket of 16): the loop stops at the count asked for.
  short = s.generate(params, _prompts((5,)), max_new_tokens=9)
  long = s.generate(params, _prompts((5,)), max_new_tokens=16)
  assert _generate._cache_size() == n
  assert short.tokens.shape == short.logprobs.shape == (1, 9) and (short.lengths == 9).all()
  np.testing.assert_array_equal(short.tokens, long.tokens[:, :9])
  np.testing.assert_array_equal(short.logprobs, long.logprobs[:, :9])


def test_a_coarser_token_bucket_changes_no_token(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  kw = dict(max_new_tokens=9, temperature=0.8, seed=3)
  default = s.generate(params, _prompts(), **kw)  # Compiled for 16 new tokens.
  coarse = s.generate(params, _prompts(), token_bucket=32, **kw)
  np.testing.assert_array_equal(default.tokens, coarse.tokens)
  np.testing.assert_allclose(default.logprobs, coarse.logprobs, rtol=1e-6)  # A longer cache: other float sums.
  with pytest.raises(ValueError, match="token_bucket=8 is below max_new_tokens=9"):
    s.generate(params, _prompts(), token_bucket=8, **kw)


def test_batcher_decodes_to_the_largest_request_not_its_bucket(params):
  from llmstages.batching import Batcher, Request

  class Recording(Sampler):
    def generate(self, params, prompts, **kw):
      self.seen.append(kw)
      return super().generate(params, prompts, **kw)

  s = Recording(CFG, eos_id=-1, pad_id=PAD)
  s.seen = []
  batcher = Batcher(s, params, bos_id=1, window_ms=0)
  try:
    got = batcher.submit(Request(rows=_prompts((5,)), max_new_tokens=20)).result(timeout=120)
  finally:
    batcher.close()
  assert s.seen[0]["max_new_tokens"] == 20 and s.seen[0]["token_bucket"] == 32  # Stops at 20, compiled for 32.
  assert list(batcher.calls) == [(1, 16, 32)]
  alone = Sampler(CFG, eos_id=-1, pad_id=PAD).generate(params, _prompts((5,)), max_new_tokens=20)
  assert got[0].tokens == alone.tokens[0].tolist() and not got[0].stopped


def test_mc_dropout_varies_greedy_output():
  cfg = tiny(vocab_size=64, max_seq_len=64, init_std=0.5)  # Peaked logits, so dropout can flip the argmax.
  params = init_params(cfg, seed=2)
  prompts = _prompts((6,))
  mc = Sampler(cfg, eos_id=-1, pad_id=PAD, mc_dropout=0.3)
  a = mc.generate(params, prompts, max_new_tokens=12, seed=0)
  b = mc.generate(params, prompts, max_new_tokens=12, seed=1)
  assert (a.tokens != b.tokens).any()
  plain = Sampler(cfg, eos_id=-1, pad_id=PAD)
  np.testing.assert_array_equal(plain.generate(params, prompts, max_new_tokens=12, seed=0).tokens,
                                plain.generate(params, prompts, max_new_tokens=12, seed=1).tokens)


def test_prompt_longer_than_context_is_named(params):
  s = Sampler(CFG, eos_id=-1, pad_id=PAD)
  with pytest.raises(ValueError, match="exceeds the model's context.*max_seq_len=64"):
    s.generate(params, [list(range(3, 60))], max_new_tokens=10)
