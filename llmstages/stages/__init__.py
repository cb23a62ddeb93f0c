"""Stage registry: a stage adds only its loss, its metrics and its data; the loop in `train.py` does the rest.

Adding a stage is one decorated class:

    @register('my_stage')
    class MyStage(Stage):
      def loss(self, model, params, batch, dyn, rng, train): ...

Stages: `pretrain`, `cpt`, `sft`, `instruct` (next-token loss on masked targets, below), `reward` and `dpo`
(`preference.py`), `grpo` and `ppo` (`rl.py`). A stage may also override `batches` (its data), `abstract_batch`
(the shapes the step is compiled for), `prepare` (host or device work between data and step: reference
log-probs, rollouts, rewards), `frozen_models` (frozen parameters it needs) and set `score_head`.
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


def get(name: str, scfg=None, where: str = "") -> "Stage":
  """A stage of kind `name` for the config block `scfg` (found at `where`, e.g. 'config.dpo')."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown stage {name!r}; known stages: {sorted(_REGISTRY)}")
  return _REGISTRY[name](scfg, where)


def names() -> list[str]:
  return sorted(_REGISTRY)


class Stage:
  """The per-stage pieces of training. `loss` returns (sum, count, metric sums): means are taken once, later.

  Every metric sum is divided by the summed `count` when logged, except `nll` (also -> perplexity) and `correct`
  (-> accuracy), which are divided by it too under those names.
  """
  name = ""
  score_head = False  # The parameters carry a scalar head (model.HEAD_PARAMS).

  def __init__(self, scfg=None, where: str = ""):
    self.scfg = scfg  # The stage's config block (static settings such as DPO's beta).
    self.where = where or f"config.{self.name}"

  def loss(self, model, params, batch: dict[str, jax.Array], dyn: dict[str, Any], rng: jax.Array | None,
           train: bool):
    raise NotImplementedError

  def frozen_models(self, scfg) -> dict[str, tuple[str, bool]]:
    """{role: (stage whose final parameters to load, with its scalar head)} of frozen models; loaded once."""
    return {}

  def batches(self, ctx, tokenizer, split: str):
    """This stage's data iterator (get_state/set_state for resumption)."""
    from llmstages import train
    return train.make_batches(ctx, tokenizer, split=split)

  def abstract_batch(self, ctx) -> dict:
    """Shapes and shardings of one global batch, as `prepare` returns it."""
    return ctx.token_batch_shapes()

  def prepare(self, ctx, params, local_batch, step: int, split: str):
    """(global batch for the step, host metrics): turns this process's rows into the sharded step input."""
    from llmstages import partitioning
    return partitioning.global_batch(local_batch, ctx.mesh), {}


def apply_model(model, params, batch, dyn, rng, train: bool):
  """The forward pass every stage's loss makes: the step's regularization rates and dropout RNG when training,
  deterministic otherwise (eval, reference and log-prob passes)."""
  return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                     rates=dyn["rates"] if train else None, deterministic=not train,
                     rngs={"dropout": rng} if train else None)


class NextTokenStage(Stage):
  """Next-token prediction on `loss_mask`ed targets: pretraining, continued pretraining, SFT-style data."""

  def loss(self, model, params, batch, dyn, rng, train):
    logits_BxLxV = apply_model(model, params, batch, dyn, rng, train)
    smoothing = dyn["loss"]["label_smoothing"] if train else 0.0
    z_loss = dyn["loss"]["z_loss"] if train else 0.0
    return losses.next_token_loss(logits_BxLxV, batch["targets"], batch["loss_mask"], smoothing, z_loss)


@register("pretrain")
class Pretrain(NextTokenStage):
  pass


@register("cpt")
class ContinuedPretrain(NextTokenStage):
  """Same objective as pretraining, on a new mixture with `replay` of the init_from stage's data."""


@register("sft")
class SupervisedFineTune(NextTokenStage):
  """Prompt -> completion data ('pc' records): the data marks only completion tokens (and EOS) for loss;
  packed documents attend only within their own segment."""


@register("instruct")
class InstructionTune(NextTokenStage):
  """Chat data rendered with the tokenizer's chat tokens (`data.format_chat`): loss on assistant turns only."""


@register("hf_import")
class Imported(Stage):
  """A stage whose final parameters `python -m llmstages.hf import` wrote; it is never trained here."""

  def batches(self, ctx, tokenizer, split):
    hf_dir = self.scfg.get("hf_dir", "DIR") if self.scfg is not None else "DIR"
    raise RuntimeError(f"{self.where} is imported, not trained: run `python -m llmstages.hf import "
                       f"--hf_dir={hf_dir} --workdir=WORKDIR --stage={ctx.name}` first")


from llmstages.stages import preference, rl  # noqa: E402,F401  (register their stages)
