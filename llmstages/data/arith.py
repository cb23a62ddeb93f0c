"""The `arith` corpus: 2-3 digit addition and subtraction with verifiable answers (answer-only or scratchpad).

Problems are `a + b` or `a - b` with a, b drawn uniformly among numbers of `min_digits`..`max_digits` digits
(the digit count itself uniform); for subtraction a >= b, so answers are never negative. Every problem is
distinct; validation problems never occur in train.

    prompt      "What is 345 + 78?"
    completion  " 423"                                             (format=answer)
                " 5+8=13, write 3 carry 1. 4+7+1=12, write 2 carry 1. 3+0+1=4, write 4. Answer: 423"
                                                                   (format=scratchpad; subtraction steps read
                                                                   "5-8 is negative, so 15-8=7, write 7 borrow 1")

`verify(prompt, answer)` checks a model's answer (the text after the last 'Answer:' if present, else the last
integer in it) against the true result; `final_answer` extracts it. This is the reward for GRPO.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from llmstages.data import corpus, sources

_PROMPT = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


@dataclasses.dataclass
class ArithConfig(tfds.core.BuilderConfig):
  seed: int = 0
  format: str = "answer"          # answer | scratchpad
  n_train: int = 20000
  n_validation: int = 1000
  min_digits: int = 2
  max_digits: int = 3
  ops: str = "+-"


def _numbers(rng: np.random.Generator, size: int, min_digits: int, max_digits: int) -> np.ndarray:
  digits = rng.integers(min_digits, max_digits + 1, size=size)
  low = np.where(digits > 1, 10 ** (digits - 1), 0)
  return low + (rng.random(size) * (10 ** digits - low)).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _problems(seed, n_train, n_validation, min_digits, max_digits, ops):
  rng = np.random.default_rng([seed, 0xA417])
  seen: set = set()
  out = []
  wanted = n_train + n_validation
  span = 10 ** max_digits - 10 ** max(min_digits - 1, 0)
  if wanted > 0.25 * span * span * len(ops):
    raise ValueError(f"arith: {wanted} distinct problems do not fit in {min_digits}-{max_digits} digits")
  while len(out) < wanted:
    size = 2 * (wanted - len(out)) + 64
    a_s, b_s = _numbers(rng, size, min_digits, max_digits), _numbers(rng, size, min_digits, max_digits)
    op_s = rng.integers(len(ops), size=size)
    for a, b, o in zip(a_s.tolist(), b_s.tolist(), op_s.tolist()):
      op = ops[o]
      if op == "-" and a < b:
        a, b = b, a
      if (a, op, b) not in seen:
        seen.add((a, op, b))
        out.append((a, op, b))
        if len(out) == wanted:
          break
  return out[:n_train], out[n_train:]


def problems(cfg: ArithConfig) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
  """(train, validation) lists of distinct (a, op, b)."""
  if cfg.format not in ("answer", "scratchpad"):
    raise ValueError(f"arith: format={cfg.format!r}; expected answer or scratchpad")
  if not cfg.ops or set(cfg.ops) - set("+-"):
    raise ValueError(f"arith: ops={cfg.ops!r}; use a combination of '+' and '-'")
  if not 1 <= cfg.min_digits <= cfg.max_digits:
    raise ValueError(f"arith: need 1 <= min_digits <= max_digits, got {cfg.min_digits}, {cfg.max_digits}")
  return _problems(cfg.seed, cfg.n_train, cfg.n_validation, cfg.min_digits, cfg.max_digits, cfg.ops)


def solve(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b


def prompt_text(a: int, op: str, b: int) -> str:
  return f"What is {a} {op} {b}?"


def scratchpad(a: int, op: str, b: int) -> str:
  """Column-by-column working from the units digit, ending in 'Answer: N' (no leading space)."""
  da, db = str(a)[::-1], str(b)[::-1]
  steps, carry = [], 0
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    if op == "+":
      total = x + y + carry
      expr = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
      carry = total // 10
      steps.append(f"{expr}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    else:
      value = x - y - carry
      expr = f"{x}-{y}" + (f"-{carry}" if carry else "")
      if value < 0:
        borrowed = f"{x + 10}-{y}" + (f"-{carry}" if carry else "")
        steps.append(f"{expr} is negative, so {borrowed}={value + 10}, write {value + 10} borrow 1")
        carry = 1
      else:
        steps.append(f"{expr}={value}, write {value}")
        carry = 0
  if op == "+" and carry:
    steps.append(f"write the carry {carry}")
  return ". ".join(steps) + f". Answer: {solve(a, op, b)}"


def completion_text(a: int, op: str, b: int, fmt: str) -> str:
  return " " + (str(solve(a, op, b)) if fmt == "answer" else scratchpad(a, op, b))


def parse_prompt(prompt: str) -> tuple[int, str, int] | None:
  m = _PROMPT.search(prompt)
  return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


def final_answer(text: str) -> int | None:
  """The integer after the last 'Answer:' or, without one, the last integer in `text`."""
  if "Answer:" in text:
    text = text.rsplit("Answer:", 1)[1]
    m = re.search(r"-?\d+", text)
  else:
    found = re.findall(r"-?\d+", text)
    m = re.match(r"-?\d+", found[-1]) if found else None
  return int(m.group(0)) if m else None


def verify(prompt: str, answer: str) -> bool:
  """True when `answer` states the correct result of the problem in `prompt`."""
  problem = parse_prompt(prompt)
  if problem is None:
    raise ValueError(f"arith.verify: no 'What is A op B?' in prompt {prompt!r}")
  return final_answer(answer) == solve(*problem)


class LlmstagesArith(corpus.CorpusBuilder):
  """Addition/subtraction problems (see the module docstring)."""

  CONFIG_CLASS = ArithConfig
  CONFIG_PREFIX = "{format}_n{n_train}_s{seed}"

  def metadata(self) -> dict:
    cfg = self.builder_config
    return {"corpus": "arith", "format": cfg.format, "digits": [cfg.min_digits, cfg.max_digits],
            "ops": cfg.ops, "verify": "llmstages.data.arith.verify"}

  def split_records(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    train, validation = problems(cfg)
    for i, (a, op, b) in enumerate(train if split == "train" else validation):
      yield corpus.record(i, format="pc", prompt=prompt_text(a, op, b),
                          completion=completion_text(a, op, b, cfg.format),
                          meta={"a": a, "op": op, "b": b, "answer": solve(a, op, b)})


sources.register_source("arith", LlmstagesArith, doc="2-3 digit +/- problems, answer only (prompt/completion)")
sources.register_source("arith_scratchpad", LlmstagesArith, format="scratchpad",
                        doc="arith with a column-wise scratchpad")
