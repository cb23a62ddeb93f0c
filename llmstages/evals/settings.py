"""The eval block (`config.eval`) as a typed, frozen dataclass, checked when `evaluate_stage` starts (and when
`pipeline.run` starts, before any stage trains) instead of deep inside an evaluator. Every error names its key."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from llmstages import config as config_lib
from llmstages.evals.prompts import check_chat_choice

WHERE = "config.eval"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """Settings shared by the evaluators (`config.eval`; the meaning of each key is in `config.eval_config`)."""
  bios: str
  world: str
  arith: str
  stories: str
  perplexity_data: str
  perplexity_batches: int
  num_prompts: int
  max_new_tokens: int
  story_tokens: int
  samples: int
  pass_k: tuple[int, ...]
  temperature: float
  mc_dropout: float
  chat: str
  ead_vocab: int
  shots: int

  @classmethod
  def from_config(cls, block) -> "EvalConfig":
    """From `config.eval` (a ConfigDict or dict); keys it lacks (a workdir's config.json written before a key
    existed) take `config.eval_config()`'s defaults; a key no evaluator reads is an error."""
    values = dict(config_lib.eval_config().to_dict())
    given = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    unknown = sorted(set(given) - set(values))
    if unknown:
      raise ValueError(f"{WHERE} has keys no evaluator reads: {unknown}; known: {sorted(values)}")
    values.update(given)
    values["pass_k"] = tuple(values["pass_k"])  # A list after a round trip through config.json.
    return cls(**values)

  def __post_init__(self):
    for key in ("perplexity_batches", "num_prompts", "max_new_tokens", "story_tokens", "samples"):
      _check(key, getattr(self, key), lambda v: _is_int(v) and v >= 1, "a positive integer")
    for key in ("ead_vocab", "shots"):
      _check(key, getattr(self, key), lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check("pass_k", self.pass_k, lambda v: all(_is_int(k) and k >= 1 for k in v), "positive integers")
    _check("temperature", self.temperature, lambda v: _is_number(v) and v >= 0, "a number >= 0")
    _check("mc_dropout", self.mc_dropout, lambda v: _is_number(v) and 0 <= v < 1, "a rate in [0, 1)")
    for key in ("bios", "world", "arith", "stories", "perplexity_data"):
      _check(key, getattr(self, key), lambda v: isinstance(v, str), "a string (a data spec, or '')")
    check_chat_choice(self.chat)

  def check_needs(self, needs: Sequence[str], evaluator: str, stage: str) -> None:
    """Fails when `evaluator`, listed by `stage`, reads data specs of this block that are empty."""
    for key in needs:
      if not getattr(self, key):
        raise ValueError(f"{WHERE}.{key} is empty but stage {stage!r} lists {evaluator}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(key: str, value, ok, expected: str) -> None:
  if not ok(value):
    raise ValueError(f"{WHERE}.{key}={value!r}; expected {expected}")
