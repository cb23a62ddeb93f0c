"""The PyTorch baseline is the same model as `model.Decoder`: same logits, loss and gradients from the same params,
and its KV-cache decoding equals a full forward pass."""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from llmstages import torch_ref
from llmstages.model import Decoder, ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_seq_len=64)


@pytest.fixture(autouse=True)
def one_thread():
  """These models are tiny; a second OpenMP thread only adds spin-waiting, badly so when the CPU is shared."""
  saved = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(saved)


def _flax_params(cfg, seed=0):
  """Random values in `Decoder.init`'s tree (shapes from eval_shape: no init to compile). Norm scales are random
  too, so a scale copied to the wrong place shows."""
  shapes = nn.unbox(jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if path[-1].key == "scale":
      return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(shape.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def _tokens(cfg, shape, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape, dtype=np.int64)


def _torch_model(cfg, params):
  return torch_ref.load_from_flax(torch_ref.TorchDecoder(cfg), params)


@pytest.mark.parametrize("tie,scan", [(True, False), (False, False), (True, True)])
def test_logits_match_flax(tie, scan):
  cfg = dataclasses.replace(TINY, tie_embeddings=tie, scan_layers=scan)
  params = _flax_params(cfg)
  tokens_BxL = _tokens(cfg, (2, 12))
  want = np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(tokens_BxL, jnp.int32)).logits)
  got = _torch_model(cfg, params)(torch.from_numpy(tokens_BxL)).detach().numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loss_and_grads_match_jax():
  cfg = dataclasses.replace(TINY, tie_embeddings=False)
  params = _flax_params(cfg)
  tokens_BxL, targets_BxL = _tokens(cfg, (2, 12), seed=1), _tokens(cfg, (2, 12), seed=2)

  def jax_loss(p):
    logits = Decoder(cfg).apply({"params": p}, jnp.asarray(tokens_BxL, jnp.int32)).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(targets_BxL, jnp.int32)).mean()

  want_loss, want_grads = jax.jit(jax.value_and_grad(jax_loss))(params)
  model = _torch_model(cfg, params)
  loss = torch_ref.loss_fn(model, torch.from_numpy(tokens_BxL), torch.from_numpy(targets_BxL))
  loss.backward()
  np.testing.assert_allclose(loss.item(), float(want_loss), rtol=1e-5)

  def close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

  close(model.embed.weight.grad, want_grads["embed"]["embedding"])
  close(model.lm_head.weight.grad, want_grads["lm_head"]["kernel"].T)
  close(model.layers[1].mlp.down.weight.grad, want_grads["layers_1"]["mlp"]["down"]["kernel"].T)
  q_DxNxH = want_grads["layers_0"]["attn"]["q"]["kernel"]
  n_h = cfg.num_heads * cfg.d_model // cfg.num_heads
  close(model.layers[0].attn.qkv.weight.grad[:n_h], q_DxNxH.reshape(cfg.d_model, n_h).T)
  close(model.layers[0].attn_norm.weight.grad, want_grads["layers_0"]["attn_norm"]["scale"])

  # The train step reports the same loss (taken before its update), then leaves no gradients behind.
  model = _torch_model(cfg, params)
  step = torch_ref.train_step_fn(model, torch_ref.make_optimizer(model, lr=1e-3, weight_decay=0.1))
  step_loss = step(torch.from_numpy(tokens_BxL), torch.from_numpy(targets_BxL))
  np.testing.assert_allclose(step_loss.item(), float(want_loss), rtol=1e-5)
  assert all(p.grad is None for p in model.parameters())


def test_optimizer_decays_weights_not_norms():
  model = torch_ref.TorchDecoder(TINY)
  decay, no_decay = torch_ref.make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
  assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
  assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters() if "norm" in n}
  assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_train_step_learns_a_fixed_batch():
  torch.manual_seed(0)
  model = torch_ref.TorchDecoder(TINY)
  step = torch_ref.train_step_fn(model, torch_ref.make_optimizer(model, lr=1e-2, weight_decay=0.0))
  tokens_BxL = torch.from_numpy(_tokens(TINY, (4, 16)))
  targets_BxL = torch.roll(tokens_BxL, -1, dims=1)
  first = step(tokens_BxL, targets_BxL).item()
  for _ in range(30):
    last = step(tokens_BxL, targets_BxL).item()
  assert first > 3.5 and last < 0.5 * first


def test_cached_decoding_equals_full_forward():
  params = _flax_params(TINY)
  model = _torch_model(TINY, params)
  seq_BxS = torch.from_numpy(_tokens(TINY, (3, 20)))
  with torch.no_grad():
    full_BxSxV = model(seq_BxS)
    cache = torch_ref.make_kv_cache(model, 3, 20)
    prefill_BxPxV = model(seq_BxS[:, :8], 0, cache)
    steps = [model(seq_BxS[:, t:t + 1], t, cache) for t in range(8, 14)]
    chunk_BxLxV = model(seq_BxS[:, 14:], 14, cache)  # Several tokens after a prefix: causal with an offset.
  cached_BxSxV = torch.cat([prefill_BxPxV, *steps, chunk_BxLxV], dim=1)
  np.testing.assert_allclose(cached_BxSxV.numpy(), full_BxSxV.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_with_cache_equals_without(temperature):
  model = _torch_model(TINY, _flax_params(TINY))
  prompt_BxP = torch.from_numpy(_tokens(TINY, (3, 5)))
  cached = torch_ref.generate(model, prompt_BxP, 24, temperature, torch.Generator().manual_seed(0))
  recomputed = torch_ref.generate_no_cache(model, prompt_BxP, 24, temperature, torch.Generator().manual_seed(0))
  assert cached.shape == (3, 29)
  assert torch.equal(cached[:, :5], prompt_BxP)
  assert torch.equal(cached, recomputed)


def test_load_rejects_params_of_another_config():
  params = _flax_params(TINY)
  with pytest.raises(ValueError, match="layers_0/attn/o/kernel|embed/embedding|q,k,v"):
    torch_ref.load_from_flax(torch_ref.TorchDecoder(dataclasses.replace(TINY, d_model=48)), params)
  with pytest.raises(KeyError, match="lm_head"):
    torch_ref.load_from_flax(torch_ref.TorchDecoder(dataclasses.replace(TINY, tie_embeddings=False)), params)


def test_generate_refuses_past_max_seq_len():
  model = torch_ref.TorchDecoder(TINY)
  with pytest.raises(ValueError, match="max_seq_len"):
    torch_ref.generate(model, torch.zeros((1, 60), dtype=torch.long), 8)


def test_bench_functions_report_throughput():
  train = torch_ref.bench_train(TINY, batch_size=2, seq_len=16, steps=2, warmup=1)
  decode = torch_ref.bench_decode(TINY, batch=2, prompt_len=4, new_tokens=8)
  for result in (train, decode):
    assert result["tokens_per_sec"] > 0 and result["step_ms"] > 0
  assert train["threads"] == torch_ref.machine_cores()


def test_module_does_not_import_jax():
  code = "import sys, llmstages.torch_ref; assert not {'jax', 'flax'} & set(sys.modules), 'jax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)
