"""LoRA as a functional wrapper: low-rank adapters {a, b} beside frozen kernels, merged W + scale * a @ b at apply.

The model is not changed: `merge(base, adapters)` builds the full parameter tree the decoder takes, inside the
differentiated function, so gradients reach only the adapters and the optimizer holds state only for them. The
frozen base passes through the train step untouched (bit-identical after the stage).

Config (`<stage>.lora`): `rank` (0 = off), `alpha` (scale = alpha / rank, as in PEFT), `targets` (regexes over
'/'-joined parameter paths; each match must be a projection kernel), `dropout`. LoRA dropout here is rank dropout
(LyCORIS' `rank_dropout`): each step drops whole rank-1 components a[:, j] b[j, :] with probability `dropout`
(rescaling the rest), per layer. It regularizes the same update PEFT's input dropout does, but fits a merged
weight (PEFT drops the adapter's input per token, which needs the adapter outside the matmul).

A kernel [in..., out...] (q: [D | N, H], o: [N, H | D], gate: [D | F], lm_head: [D | V]; scanned layers add a
leading layer axis) gets a: [in..., r] and b: [r, out...], initialized as PEFT does (a Kaiming-uniform, b = 0),
so the adapted model starts equal to the base. Parameters of a scalar head (model.HEAD_PARAMS) are new, not
pretrained, so they train in full beside the adapters.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmstages.model import HEAD_PARAMS

# Kernels LoRA can adapt, by their last two path parts, and how many leading (input) axes each has.
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "lm_head": 1}


def enabled(lora_config) -> bool:
  return lora_config is not None and lora_config.rank > 0


def scale(lora_config) -> float:
  return float(lora_config.alpha) / float(lora_config.rank)


def validate(lora_config, where: str) -> None:
  if lora_config.rank < 0:
    raise ValueError(f"{where}.lora.rank must be >= 0, got {lora_config.rank}")
  if not 0.0 <= lora_config.dropout < 1.0:
    raise ValueError(f"{where}.lora.dropout must be in [0, 1), got {lora_config.dropout}")
  for pattern in lora_config.targets:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}.lora.targets: bad regex {pattern!r}: {e}") from None


def targets(flat_shapes: dict[str, tuple[int, ...]], lora_config, where: str) -> dict[str, tuple[int, bool]]:
  """{path: (input axes, has a leading layer axis)} of the kernels the `targets` regexes pick."""
  patterns = [re.compile(p) for p in lora_config.targets]
  out = {}
  for path, shape in flat_shapes.items():
    if path.split("/")[0] in HEAD_PARAMS or not any(p.search(path) for p in patterns):
      continue
    parts = path.split("/")
    if parts[-1] != "kernel" or parts[-2] not in IN_DIMS:
      raise ValueError(f"{where}.lora.targets: {path!r} (shape {list(shape)}) matches but is not a projection "
                       f"kernel LoRA can adapt (one of {sorted(IN_DIMS)}); narrow the regex")
    out[path] = (IN_DIMS[parts[-2]], parts[0] == "layers")
  if not out:
    raise ValueError(f"{where}.lora.targets={tuple(lora_config.targets)} match no parameter; paths look like "
                     f"{sorted(flat_shapes)[:4]}")
  return out


def _flat(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _split(shape, n_in: int, layered: bool):
  lead = shape[:1] if layered else ()
  rest = shape[1:] if layered else shape
  return lead, rest[:n_in], rest[n_in:]


def init(base, lora_config, rng: jax.Array, where: str = "config.lora") -> dict:
  """Fresh adapters for the kernels of `base` that `lora_config.targets` pick (plus a copy of any scalar head)."""
  flat = _flat(base)
  picked = targets({p: tuple(x.shape) for p, x in flat.items()}, lora_config, where)
  r = int(lora_config.rank)
  out = {}
  for i, (path, (n_in, layered)) in enumerate(sorted(picked.items())):
    lead, ins, outs = _split(flat[path].shape, n_in, layered)
    bound = 1.0 / math.sqrt(int(np.prod(ins)))  # kaiming_uniform(a=sqrt(5)), as torch/PEFT initialize lora_A.
    out[f"{path}/a"] = jax.random.uniform(jax.random.fold_in(rng, i), lead + ins + (r,), jnp.float32, -bound, bound)
    out[f"{path}/b"] = jnp.zeros(lead + (r,) + outs, jnp.float32)
  for path, x in flat.items():
    if path.split("/")[0] in HEAD_PARAMS:
      out[path] = x
  return flax.traverse_util.unflatten_dict(out, sep="/")


def box_like(adapters, boxed_base):
  """`adapters` with logical axis names taken from the base kernels' (the rank axis is unsharded), so the
  partitioning rules place adapters and their optimizer moments beside the kernels they adapt."""
  names = {p: x.names for p, x in _flat(boxed_base).items() if isinstance(x, nn.Partitioned)}
  out = {}
  for path, x in _flat(adapters).items():
    kernel, part = path.rsplit("/", 1)
    if part not in ("a", "b") or kernel not in names:
      out[path] = nn.Partitioned(x, names[path]) if path in names else x
      continue
    n_in = x.ndim - 1 if part == "a" else None
    base_names = names[kernel]
    layered = kernel.startswith("layers/")
    if part == "a":
      out[path] = nn.Partitioned(x, tuple(base_names[:n_in]) + (None,))
    else:
      lead = base_names[:1] if layered else ()
      n_out = x.ndim - 1 - len(lead)
      out[path] = nn.Partitioned(x, tuple(lead) + (None,) + tuple(base_names[len(base_names) - n_out:]))
  return flax.traverse_util.unflatten_dict(out, sep="/")


def delta(a, b, layered: bool):
  """a @ b over the rank axis, shaped like the kernel: [(Y,) in..., out...]."""
  lead = a.shape[:1] if layered else ()
  ins, outs = a.shape[len(lead):-1], b.shape[len(lead) + 1:]
  r = a.shape[-1]
  a2 = a.reshape(lead + (int(np.prod(ins)), r))
  b2 = b.reshape(lead + (r, int(np.prod(outs))))
  return jnp.matmul(a2, b2).reshape(lead + ins + outs)


def merge(base, adapters, lora_config, rng: jax.Array | None = None):
  """The full parameters: each adapted kernel W + scale * a @ b (rank dropout when `rng` is given)."""
  flat, ad = dict(_flat(base)), _flat(adapters)
  s = scale(lora_config)
  for i, path in enumerate(sorted(p[:-2] for p in ad if p.endswith("/a"))):
    a, b = ad[f"{path}/a"], ad[f"{path}/b"]
    layered = path.startswith("layers/")
    if rng is not None and lora_config.dropout > 0:
      keep = 1.0 - lora_config.dropout
      mask_shape = a.shape[:1] + (1,) * (a.ndim - 2) + a.shape[-1:] if layered else (1,) * (a.ndim - 1) + a.shape[-1:]
      mask = jax.random.bernoulli(jax.random.fold_in(rng, i), keep, mask_shape)
      a = jnp.where(mask, a / keep, 0.0)
    w = flat[path]
    flat[path] = (w + s * delta(a, b, layered)).astype(w.dtype)
  for path, x in ad.items():
    if path.split("/")[0] in HEAD_PARAMS:
      flat[path] = x
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def adapter_pairs(adapters):
  """[(kernel path, a, b)] of the adapted kernels, in path order."""
  ad = _flat(adapters)
  return [(p[:-2], ad[p], ad[p[:-2] + "/b"]) for p in sorted(ad) if p.endswith("/a")]
