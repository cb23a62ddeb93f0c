"""Regularization as data: per-site rates, depth and step schedules, the weight-decay mask.

The config block `config.<stage>.reg` is resolved here into
- `RegSites`: which stochastic sites exist in the compiled step (static; a site exists when its rate is > 0), and
- `rates_at(step)`: the traced values for one step (per-layer vectors for the layer sites), so a rate sweep or a
  schedule never recompiles.
The step schedule scales dropout at every site, drop-path, NEFTune, label smoothing and weight decay; z-loss is a
stability aid and stays constant.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import numpy as np

from llmstages.model import RegSites

SITES = ("embed_dropout", "attn_dropout", "residual_dropout", "mlp_dropout")
SCHEDULES = ("constant", "early", "late", "linear", "linear_up")


def site_rates(reg) -> dict[str, float]:
  """Each dropout site's rate: its own value, or `reg.dropout` where it is None."""
  out = {}
  for site in SITES:
    value = reg[site]
    out[site] = float(reg.dropout if value is None else value)
  return out


def validate(reg, where: str) -> None:
  own = {site: reg[site] for site in SITES if reg[site] is not None}
  for key, value in {"dropout": reg.dropout, **own, "drop_path": reg.drop_path}.items():
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{where}.reg.{key}: a rate must be in [0, 1), got {value}")
  if not 0.0 <= reg.label_smoothing < 1.0:
    raise ValueError(f"{where}.reg.label_smoothing must be in [0, 1), got {reg.label_smoothing}")
  if reg.schedule not in SCHEDULES:
    raise ValueError(f"{where}.reg.schedule: {reg.schedule!r} is not one of {SCHEDULES}")
  if not 0.0 <= reg.schedule_fraction <= 1.0:
    raise ValueError(f"{where}.reg.schedule_fraction must be in [0, 1], got {reg.schedule_fraction}")
  for pattern in reg.no_decay:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}.reg.no_decay: bad regex {pattern!r}: {e}") from None


def sites(reg) -> RegSites:
  rates = site_rates(reg)
  return RegSites(**{k: rates[k] > 0 for k in SITES}, drop_path=reg.drop_path > 0,
                  neftune=reg.neftune_alpha > 0)


def schedule_factor(reg, step: int, total_steps: int) -> float:
  frac = step / max(total_steps, 1)
  x = reg.schedule_fraction
  if reg.schedule == "constant":
    return 1.0
  if reg.schedule == "early":
    return float(frac < x)
  if reg.schedule == "late":
    return float(frac >= 1.0 - x)
  if reg.schedule == "linear":
    return 1.0 - frac
  return frac  # linear_up


def layer_mask(reg, num_layers: int) -> np.ndarray:
  """1.0 for layers that take regularization, 0.0 for the last `exempt_last_k_layers`."""
  mask = np.ones((num_layers,), np.float32)
  k = int(reg.exempt_last_k_layers)
  if k:
    mask[max(num_layers - k, 0):] = 0.0
  return mask


def rates_at(reg, step: int, total_steps: int, num_layers: int) -> dict[str, Any]:
  """The traced values of one train step (float32 numpy; shapes never change, so nothing recompiles)."""
  f = schedule_factor(reg, step, total_steps)
  layers = layer_mask(reg, num_layers)
  rates = site_rates(reg)
  depth = np.arange(1, num_layers + 1, dtype=np.float32) / num_layers
  out = {
      "embed_dropout": np.float32(f * rates["embed_dropout"]),
      "attn_dropout": (f * rates["attn_dropout"] * layers).astype(np.float32),
      "residual_dropout": (f * rates["residual_dropout"] * layers).astype(np.float32),
      "mlp_dropout": (f * rates["mlp_dropout"] * layers).astype(np.float32),
      "drop_path": (f * reg.drop_path * depth * layers).astype(np.float32),
      "neftune_alpha": np.float32(f * reg.neftune_alpha),
  }
  hparams = {
      "label_smoothing": np.float32(f * reg.label_smoothing),
      "z_loss": np.float32(reg.z_loss),
      "weight_decay": np.float32(f * reg.weight_decay),
  }
  return {"rates": out, "loss": hparams}


_LAYER_RE = re.compile(r"^layers_(\d+)/")


def weight_decay_mask(params, reg, num_layers: int):
  """A tree of multipliers (0 or 1) shaped to broadcast against each parameter.

  Paths matching any `reg.no_decay` regex get 0. With `exempt_last_k_layers`, the last k layers get 0 too: by name
  for unrolled layers (`layers_7/...`), by slice for scanned ones (a [num_layers, 1, ...] vector).
  """
  patterns = [re.compile(p) for p in reg.no_decay]
  layers = layer_mask(reg, num_layers)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  out = {}
  for path, leaf in flat.items():
    if any(p.search(path) for p in patterns):
      out[path] = np.zeros((), np.float32)
      continue
    m = _LAYER_RE.match(path)
    if m:
      out[path] = np.float32(layers[int(m.group(1))])
    elif path.startswith("layers/"):  # Scanned: leading axis is the layer.
      out[path] = layers.reshape((num_layers,) + (1,) * (len(leaf.shape) - 1))
    else:
      out[path] = np.ones((), np.float32)
  return flax.traverse_util.unflatten_dict(out, sep="/")
