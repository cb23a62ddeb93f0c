"""Stage registry: a stage adds only its loss, its metrics and its data; the loop in `train.py` does the rest.

Adding a stage is one decorated class:

    @register('my_stage')
    class MyStage(Stage):
      def loss(self, model, params, batch, dyn, rng, train): ...
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from llmstages import losses

_REGISTRY: dict[str, type["Stage"]] = {}


def register(name: str) -> Callable[[type["Stage"]], type["Stage"]]:
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f"stage {name!r} is registered twice")
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def get(name: str) -> "Stage":
  if name not in _REGISTRY:
    raise ValueError(f"unknown stage {name!r}; known stages: {sorted(_REGISTRY)}")
  return _REGISTRY[name]()


def names() -> list[str]:
  return sorted(_REGISTRY)


class Stage:
  """The per-stage pieces of training. `loss` returns (sum, count, metric sums): means are taken once, later."""
  name = ""

  def loss(self, model, params, batch: dict[str, jax.Array], dyn: dict[str, Any], rng: jax.Array | None,
           train: bool):
    raise NotImplementedError


class NextTokenStage(Stage):
  """Next-token prediction on `loss_mask`ed targets: pretraining, continued pretraining, SFT-style data."""

  def loss(self, model, params, batch, dyn, rng, train):
    logits_BxLxV = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        rates=dyn["rates"] if train else None, deterministic=not train,
        rngs={"dropout": rng} if train else None)
    smoothing = dyn["loss"]["label_smoothing"] if train else 0.0
    z_loss = dyn["loss"]["z_loss"] if train else 0.0
    return losses.next_token_loss(logits_BxLxV, batch["targets"], batch["loss_mask"], smoothing, z_loss)


@register("pretrain")
class Pretrain(NextTokenStage):
  pass


@register("cpt")
class ContinuedPretrain(NextTokenStage):
  """Same objective as pretraining, on a new mixture with `replay` of the init_from stage's data."""
