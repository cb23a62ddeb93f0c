"""The PyTorch baseline: `model.Decoder` written again the plain way nanoGPT is (eager PyTorch, AdamW).

Owns the eager model (`TorchDecoder`), the copy of Flax parameters into it (`load_from_flax`), the nanoGPT train
step and optimizer, KV-cache and no-cache generation, and the two timings `python -m llmstages.bench` compares our
JAX code against (`bench_train`, `bench_decode`). It is the yardstick we are judged by, so it is written to be fast
in the ordinary ways a competent PyTorch user would: fused q/k/v and gate/up projections, PyTorch's
`scaled_dot_product_attention`, a preallocated KV cache, AdamW's fused (or foreach) kernel, every core used.

Nothing here imports JAX or Flax (the timings must not share the process with an idle XLA runtime for no reason);
the bench imports it where torch is installed and runs with `bench.torch=False` where it is not. `model_cfg` is a `model.ModelConfig` (read by attribute only).

Shapes in names as in `model`: B batch, L (query) length, S key length, P prompt length, T new tokens, D d_model,
N query heads, K kv heads, H head dim, F mlp dim, V vocab, Y layers.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
  from llmstages.model import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # Per layer: (keys_BxKxSxH, values_BxKxSxH), preallocated.


def _head_dim(cfg: "ModelConfig") -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


def autocast_dtype(cfg: "ModelConfig") -> torch.dtype | None:
  """The autocast dtype that mirrors `config.model.dtype` (parameters stay float32 in both); None for float32."""
  dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
  if cfg.dtype not in dtypes:
    raise ValueError(f"config.model.dtype: {cfg.dtype!r} has no PyTorch equivalent here; use one of {list(dtypes)}")
  return dtypes[cfg.dtype]


def _autocast(model: "TorchDecoder"):
  dtype = autocast_dtype(model.cfg)
  device_type = model.embed.weight.device.type
  return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
  """cos and sin, each [max_len, head_dim // 2] float32, computed exactly as `model.rope` does.

  inv_freq and the angles are float32 products as in JAX (so the rounding of position * inv_freq matches); the
  cosine of each float32 angle is taken in float64 and rounded once.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float32) * 2.0 / head_dim))
  angles_Sxh = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)
  angles_Sxh = angles_Sxh.astype(np.float64)
  return (torch.from_numpy(np.cos(angles_Sxh).astype(np.float32)),
          torch.from_numpy(np.sin(angles_Sxh).astype(np.float32)))


def apply_rope(x_BxNxLxH: torch.Tensor, cos_Lxh: torch.Tensor, sin_Lxh: torch.Tensor) -> torch.Tensor:
  """Rotate-half RoPE (Llama / Hugging Face), in float32 like `model.rope`."""
  x = x_BxNxLxH.float()
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat((x1 * cos_Lxh - x2 * sin_Lxh, x2 * cos_Lxh + x1 * sin_Lxh), dim=-1).type_as(x_BxNxLxH)


class RMSNorm(nn.Module):

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # Always float32, like model.RMSNorm (a no-op cast when x already is).
    return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


class Attention(nn.Module):
  """Grouped-query attention with RoPE. q, k and v come from one fused matmul, as nanoGPT's `c_attn`."""

  def __init__(self, cfg: "ModelConfig"):
    super().__init__()
    self.n, self.k, self.h = cfg.num_heads, cfg.num_kv_heads, _head_dim(cfg)
    self.qkv = nn.Linear(cfg.d_model, (self.n + 2 * self.k) * self.h, bias=False)
    self.o = nn.Linear(self.n * self.h, cfg.d_model, bias=False)

  def forward(self, x_BxLxD, cos_Lxh, sin_Lxh, cache=None, start_pos: int = 0):
    b, l, _ = x_BxLxD.shape
    n, kv, h = self.n, self.k, self.h
    q, k, v = self.qkv(x_BxLxD).split((n * h, kv * h, kv * h), dim=-1)
    q_BxNxLxH = apply_rope(q.view(b, l, n, h).transpose(1, 2), cos_Lxh, sin_Lxh)
    k_BxKxSxH = apply_rope(k.view(b, l, kv, h).transpose(1, 2), cos_Lxh, sin_Lxh)
    v_BxKxSxH = v.view(b, l, kv, h).transpose(1, 2)
    prefix = 0  # Cached keys before this chunk.
    if cache is not None:
      k_cache, v_cache = cache
      k_cache[:, :, start_pos:start_pos + l] = k_BxKxSxH
      v_cache[:, :, start_pos:start_pos + l] = v_BxKxSxH
      if start_pos:
        prefix = start_pos
        k_BxKxSxH, v_BxKxSxH = k_cache[:, :, :prefix + l], v_cache[:, :, :prefix + l]
    mask_LxS = None
    if prefix and l > 1:  # A chunk after a prefix: causal with an offset (is_causal aligns top-left).
      mask_LxS = torch.ones(l, prefix + l, dtype=torch.bool, device=x_BxLxD.device).tril(diagonal=prefix)
    out_BxNxLxH = F.scaled_dot_product_attention(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, attn_mask=mask_LxS,
                                                 is_causal=not prefix and l > 1, enable_gqa=kv != n)
    return self.o(out_BxNxLxH.transpose(1, 2).reshape(b, l, n * h))


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one fused matmul."""

  def __init__(self, cfg: "ModelConfig"):
    super().__init__()
    self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_dim, bias=False)
    self.down = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=False)

  def forward(self, x_BxLxD):
    gate_BxLxF, up_BxLxF = self.gate_up(x_BxLxD).chunk(2, dim=-1)
    return self.down(F.silu(gate_BxLxF) * up_BxLxF)


class Block(nn.Module):

  def __init__(self, cfg: "ModelConfig"):
    super().__init__()
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = Mlp(cfg)

  def forward(self, x_BxLxD, cos_Lxh, sin_Lxh, cache=None, start_pos: int = 0):
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), cos_Lxh, sin_Lxh, cache, start_pos)
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class TorchDecoder(nn.Module):
  """The architecture of `model.Decoder` (deterministic forward: no dropout, no packing) in eager PyTorch."""

  def __init__(self, cfg: "ModelConfig"):
    super().__init__()
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"config.model.num_kv_heads: num_heads={cfg.num_heads} is not a multiple of "
                       f"num_kv_heads={cfg.num_kv_heads}")
    self.cfg = cfg
    self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    cos, sin = rope_tables(_head_dim(cfg), cfg.max_seq_len, cfg.rope_theta)
    self.register_buffer("rope_cos", cos, persistent=False)
    self.register_buffer("rope_sin", sin, persistent=False)
    self.reset_parameters()

  def reset_parameters(self):
    """The initializers of `model.Decoder`: normal(init_std), output projections scaled by 1/sqrt(2 Y), norms 1."""
    out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
    for name, p in self.named_parameters():
      if p.dim() < 2:
        nn.init.ones_(p)
      else:
        nn.init.normal_(p, 0.0, out_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else self.cfg.init_std)

  def forward(self, tokens_BxL: torch.Tensor, start_pos: int = 0, kv_cache: KVCache | None = None,
              last_only: bool = False) -> torch.Tensor:
    """Logits (float32), [B, L, V], or [B, 1, V] for the last position only when `last_only` (generation)."""
    end = start_pos + tokens_BxL.shape[1]
    if end > self.cfg.max_seq_len:
      raise ValueError(f"position {end - 1} is past config.model.max_seq_len={self.cfg.max_seq_len}")
    cos_Lxh, sin_Lxh = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
    x_BxLxD = self.embed(tokens_BxL)
    for i, layer in enumerate(self.layers):
      x_BxLxD = layer(x_BxLxD, cos_Lxh, sin_Lxh, None if kv_cache is None else kv_cache[i], start_pos)
    if last_only:
      x_BxLxD = x_BxLxD[:, -1:]
    hidden_BxLxD = self.final_norm(x_BxLxD)
    head_VxD = self.embed.weight if self.lm_head is None else self.lm_head.weight
    return F.linear(hidden_BxLxD, head_VxD).float()


# ---------------------------------------------------------------------------------------------------------------
# Flax -> PyTorch parameters.


def _array(tree: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
  node: Any = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"Flax params have no {'/'.join(path[:i + 1])} (the torch model wants "
                     f"{'/'.join(path)}); is the ModelConfig the one the params were made with?")
    node = node[key]
  if hasattr(node, "unbox"):  # An nn.Partitioned box left by init; the value is what we copy.
    node = node.unbox()
  return np.asarray(node, dtype=np.float32)


def _copy(param: torch.Tensor, value: np.ndarray, where: str):
  if tuple(param.shape) != value.shape:
    raise ValueError(f"{where}: Flax shape {value.shape} does not fit the torch parameter {tuple(param.shape)}; "
                     "is the ModelConfig the one the params were made with?")
  param.copy_(torch.tensor(value))


@torch.no_grad()
def load_from_flax(torch_model: TorchDecoder, params: Mapping[str, Any]) -> TorchDecoder:
  """Copies a `Decoder` param tree (unboxed; `layers_i` or scanned `layers/block` layout) into `torch_model`.

  Flax kernels are [in, out] (with heads split out); torch Linear weights are [out, in]. Returns the model.
  """
  if "params" in params and "embed" not in params:
    params = params["params"]

  def layer_array(i: int, *path: str) -> np.ndarray:
    if "layers" in params:  # scan_layers: one stacked array per parameter, layer axis first.
      return _array(params, ("layers", "block") + path)[i]
    return _array(params, (f"layers_{i}",) + path)

  _copy(torch_model.embed.weight, _array(params, ("embed", "embedding")), "embed/embedding")
  for i, layer in enumerate(torch_model.layers):
    q_DxNxH, k_DxKxH, v_DxKxH = (layer_array(i, "attn", name, "kernel") for name in ("q", "k", "v"))
    qkv_Dx_ = np.concatenate([w.reshape(w.shape[0], -1) for w in (q_DxNxH, k_DxKxH, v_DxKxH)], axis=1)
    _copy(layer.attn.qkv.weight, qkv_Dx_.T, f"layers_{i}/attn/{{q,k,v}}/kernel")
    o_NxHxD = layer_array(i, "attn", "o", "kernel")
    _copy(layer.attn.o.weight, o_NxHxD.reshape(-1, o_NxHxD.shape[-1]).T, f"layers_{i}/attn/o/kernel")
    gate_DxF, up_DxF = layer_array(i, "mlp", "gate", "kernel"), layer_array(i, "mlp", "up", "kernel")
    _copy(layer.mlp.gate_up.weight, np.concatenate([gate_DxF, up_DxF], axis=1).T, f"layers_{i}/mlp/{{gate,up}}")
    _copy(layer.mlp.down.weight, layer_array(i, "mlp", "down", "kernel").T, f"layers_{i}/mlp/down/kernel")
    _copy(layer.attn_norm.weight, layer_array(i, "attn_norm", "scale"), f"layers_{i}/attn_norm/scale")
    _copy(layer.mlp_norm.weight, layer_array(i, "mlp_norm", "scale"), f"layers_{i}/mlp_norm/scale")
  _copy(torch_model.final_norm.weight, _array(params, ("final_norm", "scale")), "final_norm/scale")
  if torch_model.lm_head is not None:
    _copy(torch_model.lm_head.weight, _array(params, ("lm_head", "kernel")).T, "lm_head/kernel")
  elif "lm_head" in params:
    raise ValueError("Flax params have an lm_head but config.model.tie_embeddings=True")
  return torch_model


# ---------------------------------------------------------------------------------------------------------------
# Training, nanoGPT style.


def loss_fn(model: TorchDecoder, tokens_BxL: torch.Tensor, targets_BxL: torch.Tensor) -> torch.Tensor:
  """Mean next-token cross-entropy over every position (nanoGPT's loss)."""
  logits_BxLxV = model(tokens_BxL)
  return F.cross_entropy(logits_BxLxV.view(-1, logits_BxLxV.size(-1)), targets_BxL.reshape(-1))


def fused_adamw_supported(device: torch.device | str) -> bool:
  """Whether this torch build has the single-kernel AdamW for `device` (CUDA always; CPU in recent releases)."""
  try:
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros_like(p)
    torch.optim.AdamW([p], fused=True).step()
  except (RuntimeError, TypeError):
    return False
  return True


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), *, eps: float = 1e-8,
                   fused: bool | None = None) -> torch.optim.AdamW:
  """AdamW with nanoGPT's groups: decay every >=2-D weight (matmuls, embedding), none on norm scales.

  `fused=None` takes the fused kernel where this torch has it for the parameters' device, else foreach (default).
  """
  params = [p for p in model.parameters() if p.requires_grad]  # model.parameters() lists a tied table once.
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  if fused is None:
    fused = fused_adamw_supported(params[0].device)
  return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if fused else None)


def train_step_fn(model: TorchDecoder, optimizer: torch.optim.Optimizer,
                  grad_clip: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
  """nanoGPT's step: forward (autocast when config.model.dtype is not float32), backward, clip, AdamW, zero grads.

  Returns step(tokens_BxL, targets_BxL) -> the loss before the update (detached).
  """

  def step(tokens_BxL: torch.Tensor, targets_BxL: torch.Tensor) -> torch.Tensor:
    with _autocast(model):
      loss = loss_fn(model, tokens_BxL, targets_BxL)
    loss.backward()
    if grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  return step


# ---------------------------------------------------------------------------------------------------------------
# Generation.


def make_kv_cache(model: TorchDecoder, batch: int, max_len: int) -> KVCache:
  """One preallocated (keys, values) pair of [B, K, max_len, H] per layer."""
  cfg = model.cfg
  weight = model.embed.weight
  dtype = autocast_dtype(cfg) or weight.dtype
  shape = (batch, cfg.num_kv_heads, max_len, _head_dim(cfg))
  def buffer():
    return torch.empty(shape, dtype=dtype, device=weight.device)

  return [(buffer(), buffer()) for _ in range(cfg.num_layers)]


def _next_token(logits_BxV: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
  if temperature == 0.0:
    return logits_BxV.argmax(dim=-1)
  probs_BxV = torch.softmax(logits_BxV / temperature, dim=-1)
  return torch.multinomial(probs_BxV, 1, generator=generator).squeeze(-1)


def _check_length(model: TorchDecoder, prompt_BxP: torch.Tensor, max_new_tokens: int) -> int:
  total = prompt_BxP.shape[1] + max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(f"prompt ({prompt_BxP.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} is past "
                     f"config.model.max_seq_len={model.cfg.max_seq_len}")
  return total


@torch.inference_mode()  # no_grad, minus autograd's version counting.
def generate(model: TorchDecoder, prompt_BxP: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
  """Prompt + `max_new_tokens` tokens, [B, P + T]: one prefill, then one token per step through a KV cache.

  Greedy when temperature == 0, else sampling from softmax(logits / temperature) with `generator`.
  """
  b, p = prompt_BxP.shape
  total = _check_length(model, prompt_BxP, max_new_tokens)
  cache = make_kv_cache(model, b, total)
  out_BxS = torch.empty((b, total), dtype=torch.long, device=prompt_BxP.device)
  out_BxS[:, :p] = prompt_BxP
  with _autocast(model):
    logits_BxV = model(prompt_BxP, 0, cache, last_only=True)[:, -1]
    for t in range(max_new_tokens):
      token_B = _next_token(logits_BxV, temperature, generator)
      out_BxS[:, p + t] = token_B
      if t + 1 < max_new_tokens:
        logits_BxV = model(token_B[:, None], p + t, cache, last_only=True)[:, -1]
  return out_BxS


@torch.inference_mode()
def generate_no_cache(model: TorchDecoder, prompt_BxP: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
  """As `generate`, but every token re-runs the full forward over the whole sequence so far (slow reference)."""
  _check_length(model, prompt_BxP, max_new_tokens)
  out_BxS = prompt_BxP
  with _autocast(model):
    for _ in range(max_new_tokens):
      logits_BxV = model(out_BxS, last_only=True)[:, -1]
      out_BxS = torch.cat((out_BxS, _next_token(logits_BxV, temperature, generator)[:, None]), dim=1)
  return out_BxS


def hf_llama(cfg: "ModelConfig", seed: int = 0):
  """A random-init transformers `LlamaForCausalLM` of `cfg`'s size (SDPA attention, float32, eval mode): the
  transformers-style KV cache the bench compares our decoding with. Nothing is downloaded."""
  import transformers  # Optional heavy dependency, only the bench needs it.
  torch.manual_seed(seed)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=_head_dim(cfg), max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)
  return transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").eval()


@torch.inference_mode()
def hf_generate(model, prompt_BxP: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
  """Greedy `generate` with transformers' own (dynamic) KV cache, exactly `max_new_tokens` new tokens per row."""
  mask_BxP = torch.ones_like(prompt_BxP)
  return model.generate(prompt_BxP, attention_mask=mask_BxP, max_new_tokens=max_new_tokens,
                        min_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


# ---------------------------------------------------------------------------------------------------------------
# Timings for `llmstages.bench`.


def machine_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


class _Threads:
  """Sets torch's intra-op threads for a block (default: every core this process may use), then restores them."""

  def __init__(self, num_threads: int | None):
    self.num_threads = num_threads or machine_cores()

  def __enter__(self):
    self.saved = torch.get_num_threads()
    torch.set_num_threads(self.num_threads)
    return self.num_threads

  def __exit__(self, *exc):
    torch.set_num_threads(self.saved)


def _sync(device: torch.device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def bench_train(model_cfg: "ModelConfig", batch_size: int = 16, seq_len: int = 256, steps: int = 10,
                warmup: int = 2, *, lr: float = 3e-4, weight_decay: float = 0.1, num_threads: int | None = None,
                device: str = "cpu", seed: int = 0) -> dict[str, Any]:
  """Times `steps` nanoGPT train steps of a random-init model after `warmup` untimed ones, on random tokens.

  step_ms is the mean over timed steps (step_ms_median beside it, for a shared machine); tokens_per_sec counts
  batch_size * seq_len tokens per step.
  """
  dev = torch.device(device)
  with _Threads(num_threads) as threads:
    torch.manual_seed(seed)
    model = TorchDecoder(model_cfg).to(dev).train()
    optimizer = make_optimizer(model, lr, weight_decay)
    step = train_step_fn(model, optimizer)
    tokens_BxL = torch.randint(model_cfg.vocab_size, (batch_size, seq_len), device=dev)
    targets_BxL = torch.randint(model_cfg.vocab_size, (batch_size, seq_len), device=dev)
    for _ in range(warmup):
      step(tokens_BxL, targets_BxL)
    _sync(dev)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      loss = step(tokens_BxL, targets_BxL)
      _sync(dev)
      times.append(time.perf_counter() - start)
  total = sum(times)
  return {"tokens_per_sec": batch_size * seq_len * steps / total, "step_ms": 1e3 * total / steps,
          "step_ms_median": 1e3 * statistics.median(times), "loss": float(loss), "threads": threads,
          "fused_adamw": bool(optimizer.defaults.get("fused")),
          "num_params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}


def bench_decode(model_cfg: "ModelConfig", batch: int = 32, prompt_len: int = 16, new_tokens: int = 128, *,
                 repeats: int = 1, temperature: float = 0.0, num_threads: int | None = None, device: str = "cpu",
                 seed: int = 0) -> dict[str, Any]:
  """Times `generate` (prefill + KV-cache decoding) of a random-init model, after one short untimed run.

  tokens_per_sec counts batch * new_tokens generated tokens over the whole call, prefill included; step_ms is that
  time divided by new_tokens. With repeats > 1 the fastest run is reported.
  """
  dev = torch.device(device)
  with _Threads(num_threads) as threads:
    torch.manual_seed(seed)
    model = TorchDecoder(model_cfg).to(dev).eval()
    prompt_BxP = torch.randint(model_cfg.vocab_size, (batch, prompt_len), device=dev)
    generator = torch.Generator(dev).manual_seed(seed)
    generate(model, prompt_BxP, min(new_tokens, 4), temperature, generator)
    _sync(dev)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      generate(model, prompt_BxP, new_tokens, temperature, generator)
      _sync(dev)
      times.append(time.perf_counter() - start)
  best = min(times)
  return {"tokens_per_sec": batch * new_tokens / best, "step_ms": 1e3 * best / new_tokens, "total_ms": 1e3 * best,
          "threads": threads, "torch": torch.__version__}
