"""The decoder's layers: projections, RMSNorm, RoPE, masks, the KV cache, attention, the MLP and the block.

Shapes in names: B batch, L (query) length, S key length, D d_model, N query heads, K kv heads, G = N // K,
H head dim, F mlp dim, V vocab, Y layers.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmstages.model.config import ModelConfig, RegSites

Array = jax.Array

def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def dropout(x: Array, rate: Array, rng: Array, broadcast_dims: tuple[int, ...] = ()) -> Array:
  """Inverted dropout with a traced rate; rate 0 is the identity, bit for bit."""
  shape = list(x.shape)
  for d in broadcast_dims:
    shape[d] = 1
  keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
  return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


def param_init(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _letters(n: int, start: int) -> str:
  return "".join(chr(ord("a") + start + i) for i in range(n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def project(x, kernel, n_in: int, out_dtype=None):
  """x [..., I1..Ik] . kernel [I1..Ik, O1..Om] -> [..., O1..Om] (k = n_in), with a hand-written backward.

  The backward exists for the weight gradient, which contracts over every token: a row-major dot must then
  transpose one of its operands, and autodiff of `einsum` transposes the cotangent whatever its size. Here the
  smaller of (input, cotangent) is transposed: for the MLP's up projections the [tokens, D] input rather than the
  [tokens, F] cotangent, for the tied output layer the [tokens, D] hidden state rather than the [tokens, V]
  logits' cotangent (measured on the 2-core CPU: a 128 MB transposed write was 9% of the bench train step).
  """
  return _project_fwd(x, kernel, n_in, out_dtype)[0]


def _equation(x_ndim: int, n_in: int, n_out: int) -> tuple[str, str, str]:
  lead, ins, outs = _letters(x_ndim - n_in, 0), _letters(n_in, 10), _letters(n_out, 16)
  return lead + ins, ins + outs, lead + outs


def _project_fwd(x, kernel, n_in, out_dtype):
  xs, ks, ys = _equation(x.ndim, n_in, kernel.ndim - n_in)
  y = jnp.einsum(f"{xs},{ks}->{ys}", x, kernel, preferred_element_type=out_dtype)
  return y, (x, kernel)


def _project_bwd(n_in, out_dtype, res, g):
  x, kernel = res
  xs, ks, ys = _equation(x.ndim, n_in, kernel.ndim - n_in)
  g = g.astype(kernel.dtype)
  dx = jnp.einsum(f"{ys},{ks}->{xs}", g, kernel, preferred_element_type=jnp.float32).astype(x.dtype)
  if int(np.prod(kernel.shape[:n_in])) <= int(np.prod(kernel.shape[n_in:])):  # Transpose the input.
    dk = jnp.einsum(f"{xs},{ys}->{ks}", x, g, preferred_element_type=jnp.float32)
  else:  # Transpose the cotangent, then the (small) kernel-shaped result.
    ins, outs = ks[:n_in], ks[n_in:]
    dk = jnp.einsum(f"{ys},{xs}->{outs}{ins}", g, x, preferred_element_type=jnp.float32)
    dk = jnp.transpose(dk, tuple(range(kernel.ndim - n_in, kernel.ndim)) + tuple(range(kernel.ndim - n_in)))
  return dx, dk.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Einsum(nn.Module):
  """A bias-free projection `einsum(equation, x, kernel)` with a logically named kernel of `shape`; the
  kernel's leading axes contract with x's trailing ones (as in every projection of the decoder), via `project`."""
  equation: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  std: float
  dtype: Any
  out_dtype: Any = None  # e.g. float32 logits from bfloat16 inputs.

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", param_init(self.std, self.axes), self.shape, jnp.float32)
    lhs, rest = self.equation.split(",")
    rhs, out = rest.split("->")
    n_in = len(set(lhs) & set(rhs))
    if lhs[len(lhs) - n_in:] != rhs[:n_in] or out != lhs[:len(lhs) - n_in] + rhs[n_in:]:
      raise ValueError(f"Einsum {self.equation!r}: the kernel's leading axes must contract x's trailing ones")
    return project(x.astype(self.dtype), kernel.astype(self.dtype), n_in, self.out_dtype)


class ScoreHead(nn.Module):
  """hidden -> one float32 score per position: a zero-initialized linear map plus bias (scores start at 0)."""
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD):
    kernel_D = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (x_BxLxD.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), jnp.float32)
    return jnp.einsum("bld,d->bl", x_BxLxD.astype(jnp.float32), kernel_D) + bias


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """RoPE's [H/2] inverse frequencies; with `rope_scaling_factor`, Llama 3.1's scaling: wavelengths beyond the
  original context / low_freq_factor are divided by the factor, those below original / high_freq_factor kept,
  and the band between interpolated smoothly (as transformers' "llama3" rope_type)."""
  h = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h // 2, dtype=np.float64) * 2.0 / h))
  factor = cfg.rope_scaling_factor
  if not factor:
    return inv_freq.astype(np.float32)
  low, high, old = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
  smooth = (old / wavelen - low) / (high - low)
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)


def rope_tables(positions_BxL: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """RoPE's (sin, cos), each [B, L, 1, H/2] float32: computed once per forward pass and shared by every layer's
  queries and keys (computed inside each layer, XLA recomputed them per head, forward and backward)."""
  angles_BxLxh = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  return jnp.sin(angles_BxLxh)[:, :, None, :], jnp.cos(angles_BxLxh)[:, :, None, :]


def apply_rope(x_BxLxNxH: Array, tables: tuple[Array, Array]) -> Array:
  """Rotary embedding, Llama / Hugging Face convention (rotate the two halves, not interleaved pairs)."""
  sin, cos = tables
  half = x_BxLxNxH.shape[-1] // 2
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def rope(x_BxLxNxH: Array, positions_BxL: Array, theta: float, inv_freq: np.ndarray | None = None) -> Array:
  """`apply_rope` at `positions` (inverse frequencies from theta unless given)."""
  h = x_BxLxNxH.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (np.arange(0, h // 2, dtype=np.float32) * 2.0 / h))
  return apply_rope(x_BxLxNxH, rope_tables(positions_BxL, inv_freq))


def attention_mask(segment_ids_BxL: Array | None, length: int) -> Array:
  """Causal mask that also keeps packed documents apart: [B, L, L] (or [1, L, L] without segments).

  Padding (segment 0) attends only to padding, so no row of the softmax is empty.
  """
  causal_LxL = jnp.tril(jnp.ones((length, length), jnp.bool_))
  if segment_ids_BxL is None:
    return causal_LxL[None]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return same_BxLxL & causal_LxL[None]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
  """An empty KV cache: per layer {'k', 'v'} of [B, K, S, H] (stacked as [Y, B, K, S, H] with scanned layers).

  Head-major, so decoding attends over the cache without transposing it every step.
  """
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.num_kv_heads, length, cfg.dim_per_head)
  if cfg.scan_layers:
    shape = (cfg.num_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]


def cache_length(cache) -> int:
  return (cache[0] if isinstance(cache, list) else cache)["k"].shape[-2]


def cache_mask(cache_index, length: int, slots: int, kv_start_B) -> Array:
  """[B, L, S]: the query in slot cache_index + i sees slots from its row's first real one up to its own."""
  q_slot_L = cache_index + jnp.arange(length)
  s = jnp.arange(slots)
  causal_LxS = s[None, :] <= q_slot_L[:, None]
  real_BxS = s[None, :] >= kv_start_B[:, None]
  return causal_LxS[None] & real_BxS[:, None, :]


class Attention(nn.Module):
  cfg: ModelConfig
  sites: RegSites
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, rope_sincos, mask_BxLxS, attn_rate, cache=None, cache_index=None):
    """`rope_sincos`: `rope_tables` at the tokens' positions. `cache` ({'k', 'v'}: [B, K, S, H]) switches to
    decoding: the new keys and values are written at slot `cache_index` and queries attend over all S slots under
    `mask_BxLxS`. Returns (out, new cache) then."""
    cfg = self.cfg
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    dt = cfg.compute_dtype
    d, std = cfg.d_model, cfg.init_std
    q = Einsum("bld,dnh->blnh", (d, n, h), ("embed", "heads", "head_dim"), std, dt, name="q")(x_BxLxD)
    kk = Einsum("bld,dkh->blkh", (d, k, h), ("embed", "kv_heads", "head_dim"), std, dt, name="k")(x_BxLxD)
    v = Einsum("bld,dkh->blkh", (d, k, h), ("embed", "kv_heads", "head_dim"), std, dt, name="v")(x_BxLxD)
    q_BxLxNxH = constrain(apply_rope(q, rope_sincos),
                           ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
    k_BxSxKxH = constrain(apply_rope(kk, rope_sincos),
                           ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
    v_BxSxKxH = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads",
                               "activation_head_dim"))
    use_dropout = self.sites.attn_dropout and not self.deterministic
    rng = self.make_rng("dropout") if use_dropout else None
    if cache is not None:
      at = (0, 0, cache_index, 0)
      put = lambda buf, new_BxLxKxH: jax.lax.dynamic_update_slice(buf, jnp.swapaxes(new_BxLxKxH, 1, 2).astype(
          buf.dtype), at)
      cache = {"k": put(cache["k"], k_BxSxKxH), "v": put(cache["v"], v_BxSxKxH)}
      out_BxLxNxH = explicit_attention(q_BxLxNxH, cache["k"], cache["v"], mask_BxLxS, attn_rate, rng)
    elif use_dropout or cfg.attention in ("xla", "manual"):
      out_BxLxNxH = explicit_attention(q_BxLxNxH, jnp.swapaxes(k_BxSxKxH, 1, 2), jnp.swapaxes(v_BxSxKxH, 1, 2),
                                       mask_BxLxS, attn_rate, rng)
    else:
      impl = {"auto": None, "cudnn": "cudnn"}[cfg.attention]
      out_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxLxS[:, None],
                                                 implementation=impl)
    out_BxLxNxH = constrain(out_BxLxNxH, ("activation_batch", "activation_length", "activation_heads",
                                           "activation_head_dim"))
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    out_BxLxD = Einsum("blnh,nhd->bld", (n, h, cfg.d_model), ("heads", "head_dim", "embed"), out_std, dt,
                       name="o")(out_BxLxNxH)
    return out_BxLxD if cache is None else (out_BxLxD, cache)


def explicit_attention(q_BxLxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxLxS, rate, rng):
  """Softmax attention written out as two batched matmuls over head-major operands; GQA by grouping query heads.

  Queries are moved to [B, K, G*L, H] so that both matmuls have their batch dims (b, k) leading and the kv heads
  are never repeated: on XLA:CPU this is faster than `jax.nn.dot_product_attention`'s vmapped [B, L, N, H] form
  (its backward transposes every operand), and it is the one path that can drop attention probabilities.
  """
  b, l, n, h = q_BxLxNxH.shape
  kv, s = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
  g = n // kv
  q_BxKxMxH = jnp.swapaxes(q_BxLxNxH, 1, 2).reshape(b, kv, g * l, h)  # M = G * L, query heads of a group first.
  logits_BxKxMxS = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxSxH, preferred_element_type=jnp.float32)
  logits_BxKxGxLxS = logits_BxKxMxS.reshape(b, kv, g, l, s) / np.sqrt(h).astype(np.float32)
  big_neg = jnp.finfo(jnp.float32).min * 0.7
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, big_neg)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1)
  if rng is not None:
    probs = dropout(probs, rate, rng)
  out_BxKxMxH = jnp.einsum("bkms,bksh->bkmh", probs.astype(v_BxKxSxH.dtype).reshape(b, kv, g * l, s), v_BxKxSxH)
  return jnp.swapaxes(out_BxKxMxH.reshape(b, n, l, h), 1, 2)


class Mlp(nn.Module):
  cfg: ModelConfig
  sites: RegSites
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, mlp_rate):
    cfg = self.cfg
    d, f, dt = cfg.d_model, cfg.mlp_dim, cfg.compute_dtype
    gate = Einsum("bld,df->blf", (d, f), ("embed", "mlp"), cfg.init_std, dt, name="gate")(x_BxLxD)
    up = Einsum("bld,df->blf", (d, f), ("embed", "mlp"), cfg.init_std, dt, name="up")(x_BxLxD)
    h_BxLxF = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    if self.sites.mlp_dropout and not self.deterministic:
      h_BxLxF = dropout(h_BxLxF, mlp_rate, self.make_rng("dropout"))
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    return Einsum("blf,fd->bld", (f, d), ("mlp", "embed"), out_std, dt, name="down")(h_BxLxF)


class Block(nn.Module):
  """Pre-norm decoder block. `layer_rates` holds this layer's four rates (scalars)."""
  cfg: ModelConfig
  sites: RegSites
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, rope_sincos, mask_BxLxS, layer_rates, cache=None, cache_index=None):
    cfg = self.cfg
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BxLxD)
    h = Attention(cfg, self.sites, self.deterministic, name="attn")(h, rope_sincos, mask_BxLxS,
                                                                    layer_rates["attn_dropout"], cache, cache_index)
    if cache is not None:
      h, cache = h
    x_BxLxD = x_BxLxD + self._regularize_branch(h, layer_rates)
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BxLxD)
    h = Mlp(cfg, self.sites, self.deterministic, name="mlp")(h, layer_rates["mlp_dropout"])
    x_BxLxD = x_BxLxD + self._regularize_branch(h, layer_rates)
    x_BxLxD = constrain(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BxLxD if cache is None else (x_BxLxD, cache)

  def _regularize_branch(self, h_BxLxD, layer_rates):
    if self.deterministic:
      return h_BxLxD
    if self.sites.residual_dropout:
      h_BxLxD = dropout(h_BxLxD, layer_rates["residual_dropout"], self.make_rng("dropout"))
    if self.sites.drop_path:  # Stochastic depth: drop the whole branch for some sequences.
      h_BxLxD = dropout(h_BxLxD, layer_rates["drop_path"], self.make_rng("dropout"), broadcast_dims=(1, 2))
    return h_BxLxD


class ScannedBlock(nn.Module):
  """`Block` in the (carry, x) -> (carry, y) form nn.scan wants."""
  cfg: ModelConfig
  sites: RegSites
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, xs, rope_sincos, mask_BxLxS, cache_index):
    layer_rates, cache = xs
    block = Block(self.cfg, self.sites, self.deterministic, name="block")
    out = block(x_BxLxD, rope_sincos, mask_BxLxS, layer_rates, cache, cache_index)
    return out if cache is not None else (out, None)



def neftune_scale(segment_ids_BxL: Array | None, shape: tuple[int, int, int], alpha) -> Array:
  """NEFTune's noise bound alpha / sqrt(L * d) per token, L the true length of the token's own document.

  Packed rows hold several documents, so L is counted per segment; padding (segment 0) gets no noise.
  """
  b, l, d = shape
  if segment_ids_BxL is None:
    return jnp.full((b, l), alpha / np.sqrt(l * d), jnp.float32)
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  length_BxL = jnp.sum(same_BxLxL, axis=-1).astype(jnp.float32)
  return jnp.where(segment_ids_BxL > 0, alpha / jnp.sqrt(length_BxL * d), 0.0)
