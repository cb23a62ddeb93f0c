"""How questions are posed to a stage and how its replies are read: the prompt format a stage is asked in (raw
text or the chat template it was tuned on), the reply text of generated ids, and the answer a reply gives."""

from __future__ import annotations

from typing import Sequence

from llmstages.data import arith as arith_data
from llmstages.data import chat
from llmstages.text import answer_text

# Stage kinds that train on the chat template (instruct) or on chat-formatted data (the preference and RL stages).
CHAT_KINDS = ("instruct", "reward", "dpo", "ppo", "grpo")
# `config.eval.chat` -> the forced prompt format, None: follow the stage's lineage.
PROMPT_FORMATS = {"auto": None, "always": "chat", "never": "raw"}


def check_chat_choice(choice: str) -> None:
  if choice not in PROMPT_FORMATS:
    raise ValueError(f"config.eval.chat={choice!r}; expected one of {sorted(PROMPT_FORMATS)}")


def prompt_format(config, stage: str) -> str:
  """'chat' or 'raw': how the evaluators pose questions to `stage`, from `config.eval.chat`.

  'auto' gives 'chat' when the stage or any stage it started from (its `init_from` chain) is of a kind in
  `CHAT_KINDS`, so a model is asked in the format it was tuned on; 'always' and 'never' force either.
  """
  choice = config.eval.chat
  check_chat_choice(choice)
  if PROMPT_FORMATS[choice]:
    return PROMPT_FORMATS[choice]
  seen = set()
  while stage and stage in config and stage not in seen:
    seen.add(stage)
    if config[stage].kind in CHAT_KINDS:
      return "chat"
    stage = config[stage].init_from
  return "raw"


def decode_reply(tokenizer, ids: Sequence[int]) -> str:
  """The generated text up to the end of the reply (EOS, or the chat template's end of turn)."""
  ids = [i for i in ids if i not in (tokenizer.eos_id, tokenizer.pad_id)]
  return tokenizer.decode(ids).split(chat.END, 1)[0]


def arith_answer(text: str) -> str | None:
  """The final number `arith.verify` reads in a completion (after the last 'Answer:', else the last integer), as
  text; None when there is none. maj@k votes on this, never on the scratchpad that leads to it."""
  value = arith_data.final_answer(text.split("\n", 1)[0])
  return None if value is None else str(value)


def extract_answer(prompt: str, completion: str) -> str | None:
  """The answer a completion of `prompt` gives: the final number for an arithmetic problem, else the fact answer
  (`text.answer_text`). What `generate --vote` votes on; the evaluators pick the extractor by task instead."""
  return arith_answer(completion) if arith_data.parse_prompt(prompt) else answer_text(completion)
