"""The Stage interface every stage kind implements, its registration, the forward pass every loss makes, and the
next-token stages (`pretrain`, `cpt`, `sft`, `instruct`) with their typed config block.

A stage never imports `train` (the loop above it): its hooks receive the loop's context as an argument,
`ctx: Any  # train.StageContext`, and read from it the stage's config block, mesh, models, tokenizer and frozen
models. A stage owns its jitted helpers (reference passes, the sampler, rollouts), created lazily on first use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from llmstages import config as config_lib
from llmstages import inputs, losses, partitioning, registry
from llmstages.data import report as data_report
from llmstages.inputs import TokenBatch

StageContext = Any  # train.StageContext; train imports this package.


def register(name: str) -> Callable[[type["Stage"]], type["Stage"]]:
  """Registers a Stage class as stage kind `name` (registry category 'stage')."""
  def wrap(cls):
    registry.add("stage", name, cls)
    cls.name = name
    return cls
  return wrap


def config_block(stage_config, kind: str):
  """The stage's ml_collections block, or the defaults of `kind` when none is given (tests, evaluators)."""
  return stage_config if stage_config is not None else config_lib.stage_config(kind)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NextTokenConfig:
  """What a next-token stage reads from its block (`config.<stage>`), checked when the stage is built."""
  where: str
  too_long: str = "auto"

  def __post_init__(self):
    if self.too_long not in data_report.TOO_LONG:
      raise ValueError(f"{self.where}.too_long={self.too_long!r}; expected one of {data_report.TOO_LONG}")

  @classmethod
  def from_block(cls, block, where: str) -> "NextTokenConfig":
    return cls(where=where, too_long=block.get("too_long", "auto"))


class Stage:
  """The per-stage pieces of training. `loss` returns (sum, count, metric sums): means are taken once, later.

  Every metric sum is divided by the summed `count` when logged, except `nll` (also -> perplexity) and `correct`
  (-> accuracy), which are divided by it too under those names.
  """
  name = ""
  score_head = False  # The parameters carry a scalar head (model.HEAD_PARAMS).
  Config: Any = NextTokenConfig  # The typed config block of this stage kind (built from `config.<stage>`).

  def __init__(self, stage_config=None, where: str = ""):
    self.where = where or f"config.{self.name}"
    self.cfg = self.Config.from_block(config_block(stage_config, self.name), self.where)

  def loss(self, model, params, batch, step_values: dict[str, Any] | None, rng: jax.Array | None, train: bool):
    """(loss sum, count, metric sums) of `batch`. `step_values`: this step's traced regularization values
    (`regularization.rates_at`), None outside training."""
    raise NotImplementedError

  def frozen_models(self) -> dict[str, tuple[str, bool]]:
    """{role: (stage whose final parameters to load, with its scalar head)} of frozen models; loaded once."""
    return {}

  def batches(self, ctx: StageContext, tokenizer, split: str):
    """This stage's data iterator (get_state/set_state for resumption)."""
    return inputs.make_batches(ctx, tokenizer, split=split)

  def abstract_batch(self, ctx: StageContext):
    """Shapes and shardings of one global batch, as `prepare` returns it."""
    return ctx.token_batch_shapes()

  def prepare(self, ctx: StageContext, params, local_batch, step: int, split: str):
    """(global batch for the step, host metrics): turns this process's rows into the sharded step input."""
    return TokenBatch.from_dict(partitioning.global_batch(local_batch, ctx.mesh)), {}


def apply_model(model, params, batch: TokenBatch, step_values, rng, train: bool):
  """The forward pass every stage's loss makes (a `model.DecoderOutput`): the step's regularization rates and
  dropout RNG when training, deterministic otherwise (eval, reference and log-prob passes)."""
  return model.apply({"params": params}, batch.inputs, batch.positions, batch.segment_ids,
                     rates=step_values["rates"] if train else None, deterministic=not train,
                     rngs={"dropout": rng} if train else None)


class NextTokenStage(Stage):
  """Next-token prediction on `loss_mask`ed targets: pretraining, continued pretraining, SFT-style data."""

  def loss(self, model, params, batch, step_values, rng, train):
    logits_BxLxV = apply_model(model, params, batch, step_values, rng, train).logits
    smoothing = step_values["loss"]["label_smoothing"] if train else 0.0
    z_loss = step_values["loss"]["z_loss"] if train else 0.0
    return losses.next_token_loss(logits_BxLxV, batch.targets, batch.loss_mask, smoothing, z_loss)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImportedConfig:
  where: str
  hf_dir: str = "DIR"

  @classmethod
  def from_block(cls, block, where: str) -> "ImportedConfig":
    return cls(where=where, hf_dir=block.get("hf_dir", "DIR"))


@register("hf_import")
class Imported(Stage):
  """A stage whose final parameters `python -m llmstages.hf import` wrote; it is never trained here."""
  Config = ImportedConfig

  def batches(self, ctx, tokenizer, split):
    raise RuntimeError(f"{self.where} is imported, not trained: run `python -m llmstages.hf import "
                       f"--hf_dir={self.cfg.hf_dir} --workdir=WORKDIR --stage={ctx.name}` first")
