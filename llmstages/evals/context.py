"""What an evaluator is and what it gets: the `Evaluator` entry of the registry (category "evaluator"), the
`EvalContext` of plain functions over a stage's final parameters, and `Metric`, one reported number.

An evaluator imports nothing of the trainer: `evaluate_stage` (evals/core.py) builds the context's functions once
(big_vision's predict_fn habit), so a family module reads like `ctx.generate(ctx.encode_question(q), ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from llmstages import registry
from llmstages.data import chat
from llmstages.evals import metrics
from llmstages.evals.prompts import decode_reply
from llmstages.evals.settings import EvalConfig


@dataclasses.dataclass
class Metric:
  """One number with how many items it averages and a 95% bootstrap interval over those items."""
  value: float
  n: int
  ci95: tuple[float, float] | None = None

  @classmethod
  def mean_of(cls, values: Sequence[float], seed: int = 0) -> "Metric":
    values = np.asarray(values, np.float64)
    if len(values) == 0:
      return cls(float("nan"), 0, None)
    est, lo, hi = metrics.bootstrap_ci(values, seed=seed)
    return cls(float(est), int(len(values)), (float(lo), float(hi)))

  def to_json(self) -> dict:
    out = {"value": self.value, "n": self.n}
    if self.ci95 is not None:
      out["ci95"] = list(self.ci95)
    return out


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator may use, all built by `evaluate_stage` for one stage's final parameters."""
  stage: str
  settings: EvalConfig  # config.eval, checked.
  seed: int  # config.seed: the sampling seed of maj@k, pass@k and the diversity samples.
  seq_len: int  # config.<stage>.seq_len: the chunks training cut documents into.
  data_dir: str
  prompt_format: str  # 'chat': questions go in the chat template the stage was tuned on (`prompts.prompt_format`).
  tokenizer: Any
  model_cfg: Any  # model.ModelConfig of the stage.
  num_params: int  # Every parameter of the language model (no scalar head).
  next_token_stage: bool  # The stage trains on next-token loss, so its own eval mixture is text to score.
  # generate(prompt ids, *, max_new_tokens, temperature, num_samples=1, seed=0) -> sampler.Samples, from the
  # language model (with `eval.mc_dropout`).
  generate: Callable[..., Any]
  # logprobs(sequences) -> per sequence, log p(seq[t] | seq[:t]) for t = 1..len-1, in nats, no dropout.
  logprobs: Callable[[Sequence[Sequence[int]]], list[np.ndarray]]
  # lm_loss(mixture or None, max_batches) -> the next-token means ('eval/nll', ...) of the language model on the
  # validation split of `mixture` (None: the stage's own held-out mixture).
  lm_loss: Callable[[Any, int], dict[str, float]]
  # stage_loss() -> the stage's own held-out means on `eval_steps` batches, with its scalar head and frozen models.
  stage_loss: Callable[[], dict[str, float]]

  def encode_text(self, text: str) -> list[int]:
    """Text the model continues as it is (a biography cut before a value)."""
    return chat.encode_prompt(self.tokenizer, text)

  def encode_question(self, text: str) -> list[int]:
    """A question or request: as it is, or as one user turn of the chat template (`prompt_format`)."""
    return chat.encode_prompt(self.tokenizer, text, chat=self.prompt_format == "chat")

  def decode(self, ids: Sequence[int]) -> str:
    return decode_reply(self.tokenizer, ids)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A registered evaluator: `run(ctx) -> {metric name: Metric}`; `needs` are the `config.eval` data specs it
  reads, which must be set in any config whose stages list it."""
  name: str
  run: Callable[[EvalContext], dict[str, Metric]]
  needs: tuple[str, ...] = ()


def register(name: str, needs: Sequence[str] = ()):
  """Decorator: registers `fn` as evaluator `name` (`config.<stage>.evals` lists it); returns `fn` unchanged."""
  def wrap(fn):
    registry.add("evaluator", name, Evaluator(name, fn, tuple(needs)))
    return fn
  return wrap


def get(name: str, where: str = "") -> Evaluator:
  """The evaluator registered as `name`; `where` names the config key that lists it."""
  known = names()
  if name not in known:
    at = f" (listed in {where})" if where else ""
    raise ValueError(f"unknown evaluator {name!r}; known evaluators: {known}{at}")
  return registry.get("evaluator", name)


def names() -> list[str]:
  return registry.names("evaluator")
