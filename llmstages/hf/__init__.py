"""Hugging Face Llama checkpoints <-> llmstages parameters (safetensors), with no dependency on transformers.

`load(hf_dir)` reads a `LlamaForCausalLM` directory (config.json plus model.safetensors or a sharded
model.safetensors.index.json) into a `ModelConfig` and our parameter tree; `save(...)` writes one back that
`transformers.AutoModelForCausalLM.from_pretrained` loads. The CLI (`python -m llmstages.hf`) lives in
`__main__.py` and `commands.py`, PEFT adapters in `adapters.py`; this module is a library (model and numpy only).

Layouts. HF stores a linear map as weight[out, in]; our `Einsum` kernels are [in..., out...] with the heads split
out (q: [D, N, H], o: [N, H, D]). Both use RoPE on split halves (rotate_half), so q/k need no permutation.

Placement. Each tensor is read alone (safetensors `safe_open`, memory-mapped) and put straight into its target
sharding with `jax.make_array_from_callback`, so the host holds one tensor (one stacked tensor with scanned
layers) at a time and each device receives only its shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import flax
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llmstages.model import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# safetensors dtypes we convert to float32 (our parameters are float32); anything else (int8, fp8, ...) is a
# quantized checkpoint we cannot read faithfully.
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
# Tensors some checkpoints carry that hold nothing (recomputed buffers).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
SHARD_BYTES = 4 << 30  # export: a new safetensors file every ~4 GiB, as transformers does by default.


class HFFormatError(ValueError):
  """A Hugging Face directory we cannot read; the message names the file or tensor at fault."""


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.

def _rope_theta(hf: dict) -> float:
  params = hf.get("rope_parameters") or {}
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_supported(hf: dict, where: str) -> None:
  def bad(why):
    raise HFFormatError(f"{where}: {why}")
  arch = hf.get("architectures") or [f"<model_type {hf.get('model_type')!r}>"]
  if arch[0] not in ARCHITECTURES:
    bad(f"architecture {arch[0]!r} is not supported; llmstages imports {', '.join(ARCHITECTURES)} (a Llama "
        f"decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention)")
  if hf.get("sliding_window") not in (None, 0):
    bad(f"sliding_window={hf['sliding_window']} (sliding-window attention) is not supported: our attention is "
        f"full causal")
  if hf.get("hidden_act", "silu") != "silu":
    bad(f"hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      bad(f"{key}=true: biases on projections are not supported")
  kind = _rope_scaling(hf).get("rope_type", "default")
  if kind not in ("default", "llama3"):
    bad(f"rope scaling {kind!r} is not supported (plain RoPE and Llama 3.1's 'llama3' scaling are)")


def _rope_scaling(hf: dict) -> dict:
  """The RoPE scaling block: transformers 5's rope_parameters or 4's rope_scaling (whose 'type' was renamed)."""
  scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling["type"]
  return scaling


def config_from_hf(hf_dir: str, **overrides) -> ModelConfig:
  """Our ModelConfig for the Llama in `hf_dir/config.json` (`overrides`: e.g. scan_layers, dtype, remat)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise HFFormatError(f"{path} not found: not a Hugging Face model directory")
  with open(path) as f:
    hf = json.load(f)
  _check_supported(hf, path)
  n = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n
  mc = ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n,
                   head_dim=0 if head_dim * n == hf["hidden_size"] else head_dim, mlp_dim=hf["intermediate_size"],
                   max_seq_len=hf.get("max_position_embeddings", 2048),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=_rope_theta(hf),
                   norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)))
  scaling = _rope_scaling(hf)
  if scaling.get("rope_type") == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if any(k not in scaling for k in keys):
      raise HFFormatError(f"{path}: llama3 rope scaling lacks {[k for k in keys if k not in scaling]}")
    mc = dataclasses.replace(mc, rope_scaling_factor=float(scaling["factor"]),
                             rope_low_freq_factor=float(scaling["low_freq_factor"]),
                             rope_high_freq_factor=float(scaling["high_freq_factor"]),
                             rope_original_max_len=int(scaling["original_max_position_embeddings"]))
  mc = dataclasses.replace(mc, **overrides)
  mc.validate()
  return mc


def hf_config(mc: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None, dtype: str = "float32") -> dict:
  """config.json of a LlamaForCausalLM equal to `mc` (written by hand, so export needs no transformers)."""
  rope = {"rope_type": "default", "rope_theta": mc.rope_theta}
  if mc.rope_scaling_factor:
    rope.update(rope_type="llama3", factor=mc.rope_scaling_factor, low_freq_factor=mc.rope_low_freq_factor,
                high_freq_factor=mc.rope_high_freq_factor, original_max_position_embeddings=mc.rope_original_max_len)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": mc.vocab_size,
      "hidden_size": mc.d_model, "intermediate_size": mc.mlp_dim, "num_hidden_layers": mc.num_layers,
      "num_attention_heads": mc.num_heads, "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.dim_per_head,
      "hidden_act": "silu", "max_position_embeddings": mc.max_seq_len, "rms_norm_eps": mc.norm_eps,
      "rope_theta": mc.rope_theta, "rope_parameters": rope,
      "tie_word_embeddings": mc.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "attention_dropout": 0.0, "initializer_range": mc.init_std, "use_cache": True, "torch_dtype": dtype,
      "dtype": dtype, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
  }


# ---------------------------------------------------------------------------------------------------------------
# The tensor map.

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and where it lives in our tree. `layer` is set for per-layer tensors."""
  hf_name: str
  path: tuple[str, ...]  # Our path; for per-layer tensors, the path inside one layer's block.
  kind: str  # copy | t (transpose) | in_heads (q/k/v: [out, D] -> [D, n, H]) | out_heads (o: [D, N*H] -> [N, H, D])
  ours_shape: tuple[int, ...]
  layer: int | None = None

  @property
  def hf_shape(self) -> tuple[int, ...]:
    s = self.ours_shape
    if self.kind == "copy":
      return s
    if self.kind == "t":
      return s[::-1]
    if self.kind == "in_heads":
      return (s[1] * s[2], s[0])
    return (s[2], s[0] * s[1])  # out_heads

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    """A view where possible (no copy): the callback then copies only each device's slice."""
    if self.kind == "copy":
      return w
    if self.kind == "t":
      return w.T
    return w.T.reshape(self.ours_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "copy":
      return x
    if self.kind == "t":
      return x.T
    if self.kind == "in_heads":
      return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1]).T


def tensor_map(mc: ModelConfig) -> list[Tensor]:
  d, n, k, h, f, v = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.dim_per_head, mc.mlp_dim, mc.vocab_size
  out = [Tensor("model.embed_tokens.weight", ("embed", "embedding"), "copy", (v, d))]
  per_layer = [
      ("input_layernorm.weight", ("attn_norm", "scale"), "copy", (d,)),
      ("self_attn.q_proj.weight", ("attn", "q", "kernel"), "in_heads", (d, n, h)),
      ("self_attn.k_proj.weight", ("attn", "k", "kernel"), "in_heads", (d, k, h)),
      ("self_attn.v_proj.weight", ("attn", "v", "kernel"), "in_heads", (d, k, h)),
      ("self_attn.o_proj.weight", ("attn", "o", "kernel"), "out_heads", (n, h, d)),
      ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy", (d,)),
      ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "t", (d, f)),
      ("mlp.up_proj.weight", ("mlp", "up", "kernel"), "t", (d, f)),
      ("mlp.down_proj.weight", ("mlp", "down", "kernel"), "t", (f, d)),
  ]
  for i in range(mc.num_layers):
    out += [Tensor(f"model.layers.{i}.{name}", path, kind, shape, i) for name, path, kind, shape in per_layer]
  out.append(Tensor("model.norm.weight", ("final_norm", "scale"), "copy", (d,)))
  if not mc.tie_embeddings:
    out.append(Tensor("lm_head.weight", ("lm_head", "kernel"), "t", (d, v)))
  return out


def our_path(mc: ModelConfig, t: Tensor) -> tuple[str, ...]:
  """Where `t` sits in the parameter tree: `layers_i/...` unrolled, `layers/block/...` (stacked) when scanned."""
  if t.layer is None:
    return t.path
  return ("layers", "block") + t.path if mc.scan_layers else (f"layers_{t.layer}",) + t.path


def hf_module_name(mc: ModelConfig, path: str) -> tuple[str, list[int]]:
  """'layers_3/attn/q/kernel' -> ('model.layers.{}.self_attn.q_proj', [3]); scanned 'layers/block/...' -> all
  layers. Used by LoRA's PEFT export."""
  for t in tensor_map(dataclasses.replace(mc, scan_layers=False, num_layers=1)):
    suffix = "/".join(t.path)
    if t.layer is None and path == suffix:
      return t.hf_name.rsplit(".", 1)[0], []
    if t.layer is not None and path.endswith("/" + suffix):
      head = path[: -len(suffix) - 1]
      template = t.hf_name.replace(".0.", ".{}.", 1).rsplit(".", 1)[0]
      if head == "layers/block":
        return template, list(range(mc.num_layers))
      m = re.fullmatch(r"layers_(\d+)", head)
      if m:
        return template, [int(m.group(1))]
  raise KeyError(f"{path!r} is not a parameter with a Hugging Face counterpart")


# ---------------------------------------------------------------------------------------------------------------
# Reading.

class _Files:
  """The safetensors files of a checkpoint: which file holds which tensor, opened lazily, checked on the way."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      for shard in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(hf_dir, shard)):
          users = sorted(k for k, v in weight_map.items() if v == shard)
          raise HFFormatError(f"{index} lists shard {shard!r} (holding {len(users)} tensors, e.g. {users[0]}) "
                              f"but {os.path.join(hf_dir, shard)} does not exist")
      self.where = {name: os.path.join(hf_dir, shard) for name, shard in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, framework="np") as f:
        self.where = {name: single for name in f.keys()}
    else:
      raise HFFormatError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json "
                          f"(PyTorch .bin checkpoints are not read; convert them with save_pretrained)")
    self._open: dict[str, Any] = {}

  def _handle(self, name: str):
    path = self.where[name]
    if path not in self._open:
      self._open[path] = safe_open(path, framework="np")
    return self._open[path]

  def check(self, t: Tensor) -> None:
    if t.hf_name not in self.where:
      raise HFFormatError(f"{self.hf_dir}: tensor {t.hf_name!r} is missing from the checkpoint")
    sl = self._handle(t.hf_name).get_slice(t.hf_name)
    dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
    file = self.where[t.hf_name]
    if dtype not in FLOAT_DTYPES:
      raise HFFormatError(f"{file}: tensor {t.hf_name!r} has dtype {dtype}; only {sorted(FLOAT_DTYPES)} can be read "
                          f"(quantized checkpoints are not supported)")
    if shape != t.hf_shape:
      raise HFFormatError(f"{file}: tensor {t.hf_name!r} has shape {list(shape)}; config.json implies "
                          f"{list(t.hf_shape)}")

  def read(self, t: Tensor) -> np.ndarray:
    """Our layout of `t`, float32."""
    return t.to_ours(self._handle(t.hf_name).get_tensor(t.hf_name)).astype(np.float32, copy=False)

  def close(self):
    self._open.clear()


def _place(shape, sharding, read: Callable[[], np.ndarray]) -> jax.Array:
  """A global array on `sharding` whose shards are sliced from `read()` (called once per tensor)."""
  cache = []

  def shard(index):
    if not cache:
      cache.append(read())
    return np.ascontiguousarray(cache[0][index])

  return jax.make_array_from_callback(shape, sharding, shard)


def load(hf_dir: str, abstract_params=None, **overrides) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of the Llama in `hf_dir`. `abstract_params` (a tree of ShapeDtypeStruct with
  shardings, e.g. a stage's `abstract_lm_params()`) says where each parameter goes; default: the first device.
  `overrides` change ModelConfig fields that do not touch the weights (scan_layers, dtype, remat, attention)."""
  mc = config_from_hf(hf_dir, **overrides)
  files = _Files(hf_dir)
  tensors = tensor_map(mc)
  for t in tensors:
    files.check(t)
  expected = {t.hf_name for t in tensors}
  unused = sorted(n for n in files.where if n not in expected and not IGNORED.search(n)
                  and not (mc.tie_embeddings and n == "lm_head.weight"))
  if unused:
    raise HFFormatError(f"{hf_dir}: {len(unused)} tensors have no place in a Llama decoder, e.g. {unused[:3]} "
                        f"(in {files.where[unused[0]]}); is this a Llama checkpoint?")
  shardings = {}
  if abstract_params is not None:
    shardings = {p: a.sharding for p, a in flax.traverse_util.flatten_dict(abstract_params).items()}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  flat = {}
  by_path: dict[tuple[str, ...], list[Tensor]] = {}
  for t in tensors:
    by_path.setdefault(our_path(mc, t), []).append(t)
  for path, group in by_path.items():
    if path not in shardings and abstract_params is not None:
      raise HFFormatError(f"{hf_dir}: {'/'.join(path)} is not in the target parameter tree (model config mismatch)")
    sharding = shardings.get(path, default)
    if mc.scan_layers and group[0].layer is not None:
      shape = (mc.num_layers,) + group[0].ours_shape
      flat[path] = _place(shape, sharding, lambda g=group: np.stack([files.read(t) for t in g]))
    else:
      flat[path] = _place(group[0].ours_shape, sharding, lambda t=group[0]: files.read(t))
  missing = set(shardings) - set(flat)
  if missing:
    raise HFFormatError(f"{hf_dir}: the target tree has parameters the checkpoint lacks: {sorted(missing)[:3]}")
  files.close()
  return mc, flax.traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------------
# Writing.

def to_hf_tensors(mc: ModelConfig, params, dtype=np.float32) -> dict[str, np.ndarray]:
  """{HF name: numpy array} of our `params`, one tensor gathered to the host at a time."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for t in tensor_map(mc):
    path = our_path(mc, t)
    if path not in flat:
      raise KeyError(f"parameter {'/'.join(path)} is missing; does the model config match the parameters?")
    x = np.asarray(jax.device_get(flat[path]))
    if mc.scan_layers and t.layer is not None:
      x = x[t.layer]
    out[t.hf_name] = np.ascontiguousarray(t.to_hf(x)).astype(dtype)
  return out


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, prefix: str = "model") -> None:
  """`prefix.safetensors`, or numbered shards plus `prefix.safetensors.index.json` past SHARD_BYTES."""
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    if current and size + x.nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
  shards.append(current)
  meta = {"format": "pt"}  # transformers refuses files without it.
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, f"{prefix}.safetensors"), metadata=meta)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  total = sum(x.nbytes for x in tensors.values())
  with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save(mc: ModelConfig, params, out_dir: str, tokenizer=None, dtype: str = "float32") -> None:
  """Writes `params` as a LlamaForCausalLM directory (config.json, safetensors, tokenizer files if given).

  `tokenizer`: an `HFTokenizer` (its files are copied) or our SentencePiece `Tokenizer` (written as
  tokenizer.model), or None."""
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"save: dtype={dtype!r} is not one of float32, bfloat16, float16")
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  os.makedirs(out_dir, exist_ok=True)
  tensors = to_hf_tensors(mc, params, np_dtype)
  if jax.process_index() != 0:
    return
  write_safetensors(tensors, out_dir)
  ids = {} if tokenizer is None else dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(mc, dtype=dtype, **ids), f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": ids.get("bos_id"), "eos_token_id": ids.get("eos_id"),
               "pad_token_id": ids.get("pad_id")}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)

