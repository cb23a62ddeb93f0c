"""Verifiable rewards for RL stages: registered functions that judge a completion of a prompt, or abstain.

A reward function takes `(completion, prompt)` — the generated text (cut at the first `<|end|>`) and the `Prompt`
it answers — and returns a float, or None when it does not apply to that prompt (an arithmetic checker on a story
request). A sample's reward is the sum of the functions that apply; each is logged on its own.

    arith   1 if the final answer (after the last 'Answer:', else the last integer) is the true result, else 0
    facts   1 if the answer (`text.answer_text`: up to the period that ends it) exactly matches the fact (SQuAD
            normalization)
    story   1 if the story parses under the story grammar, resolves every goal and states only true bios facts

Adding one is a decorated function: `@register('name') def fn(completion, prompt) -> float | None`; the functions
live in the one registry (`llmstages.registry`, category 'reward'), and `get` / `names` read it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from llmstages import registry, text
from llmstages.data import arith, chat, stories


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One RL prompt: the text the model continues, what is known about its answer, and where it came from."""
  text: str
  kind: str  # 'arith' | 'bios' | 'world' | 'story' | '' (unknown)
  answer: str  # The reference answer ('' if none).
  meta: dict
  source: str  # Source spec text.
  index: int  # Record index in that source.
  bios_n: int = 2000  # The bios people the prompt's source was built on (for story facts).
  bios_seed: int = 0

  def describe(self) -> str:
    return f"record {self.index} of {self.source!r} ({self.kind or 'unknown kind'}: {self.text[-80:]!r})"


def register(name: str) -> Callable[[Callable], Callable]:
  """Decorator: registers a reward function as `name` (registry category 'reward')."""
  return registry.register("reward", name)


def get(name: str, where: str = "") -> Callable:
  """The reward function `name`; `where` names the config key that asked (unknown names list the known ones)."""
  return registry.get("reward", name, where=where)


def names() -> list[str]:
  return registry.names("reward")


class RewardError(RuntimeError):
  pass


def score(reward_names: tuple[str, ...], completion: str, prompt: Prompt, where: str) -> dict[str, float | None]:
  """{function: reward or None}; a function that raises becomes a RewardError naming it, the stage and the item."""
  out = {}
  for name in reward_names:
    try:
      value = get(name)(completion, prompt)
    except Exception as e:
      raise RewardError(f"{where}: reward function {name!r} raised {type(e).__name__}: {e} on {prompt.describe()}"
                        f" with completion {completion[:80]!r}") from e
    out[name] = None if value is None else float(value)
  return out


def completion_text(text: str) -> str:
  """The reply: text up to the first `<|end|>` (the chat template's end of turn)."""
  return text.split(chat.END, 1)[0]


@register("arith")
def arith_correct(completion: str, prompt: Prompt) -> float | None:
  if prompt.kind == "arith":
    result = int(prompt.answer)
  elif not prompt.kind and arith.parse_prompt(prompt.text) is not None:
    result = arith.solve(*arith.parse_prompt(prompt.text))
  else:
    return None
  return float(arith.final_answer(completion) == result)


@register("facts")
def fact_exact_match(completion: str, prompt: Prompt) -> float | None:
  if prompt.kind not in ("bios", "world") or not prompt.answer:
    return None
  return float(text.exact_match(text.answer_text(completion), prompt.answer))


@functools.lru_cache(maxsize=4)
def _story_people(bios_n: int, bios_seed: int):
  return stories.bios_people(bios_n, bios_seed)


@register("story")
def story_valid(completion: str, prompt: Prompt) -> float | None:
  if prompt.kind != "story":
    return None
  # The opener is the raw prompt itself, or the chat request's (meta "opener"); a reply that retells it is whole.
  opener = prompt.text if prompt.meta.get("opener_in_prompt") else prompt.meta.get("opener", "")
  reply = completion.strip()
  story = f"{opener} {reply}" if opener and not reply.startswith(opener) else reply
  return float(stories.check_story(story, _story_people(prompt.bios_n, prompt.bios_seed)))
