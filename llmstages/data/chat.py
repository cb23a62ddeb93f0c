"""The chat template: special tokens, rendering a conversation, and which parts of it carry loss.

A conversation is rendered as `<|system|> ...<|end|><|user|> ...<|end|><|assistant|> ...<|end|>` (one space after
each role token, no newlines). Training puts loss on assistant content and its closing `<|end|>` only; the role
tokens themselves and all system/user text have loss 0.
"""

from __future__ import annotations

import re

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (USER, ASSISTANT, SYSTEM, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

_TURN = re.compile(r"(<\|system\|>|<\|user\|>|<\|assistant\|>)(.*?)(<\|end\|>|$)", re.S)


def format_chat(messages: list[dict], *, add_generation_prompt: bool = False) -> str:
  """Renders [{'role': 'user', 'content': ...}, ...]. `add_generation_prompt` appends the bare `<|assistant|>`
  token; the model then writes " reply<|end|>" (the reply starts with a space, as in training)."""
  parts = []
  for m in messages:
    if m["role"] not in ROLES:
      raise ValueError(f"chat: unknown role {m['role']!r}; expected one of {sorted(ROLES)}")
    parts.append(f"{ROLES[m['role']]} {m['content']}{END}")
  if add_generation_prompt:
    parts.append(ASSISTANT)
  return "".join(parts)


def chat_segments(text: str) -> list[tuple[str, bool]]:
  """Splits chat text into (piece, has_loss) segments; loss on assistant content + `<|end|>` only."""
  segments: list[tuple[str, bool]] = []
  pos = 0
  for m in _TURN.finditer(text):
    if m.start() > pos:  # Text outside any turn (should not happen in well-formed chats): no loss.
      segments.append((text[pos:m.start()], False))
    role, content, end = m.groups()
    if role == ASSISTANT:
      segments.append((role, False))
      segments.append((content + end, True))
    else:
      segments.append((role + content + end, False))
    pos = m.end()
  if pos < len(text):
    segments.append((text[pos:], False))
  return [s for s in segments if s[0]]


def is_chat_text(text: str) -> bool:
  """Whether `text` starts with a turn of our template (a role token and its space)."""
  return any(text.startswith(role + " ") or text == ASSISTANT or text.startswith(role + END)
             for role in ROLES.values())


def parse_chat(text: str) -> tuple[list[dict], list[tuple[int, int]], bool]:
  """Our template back to (messages, content character spans, ends with a bare `<|assistant|>`), so another
  template (an imported model's) can render the same conversation. Inverse of `format_chat`."""
  role_of = {v: k for k, v in ROLES.items()}
  messages, spans, pos = [], [], 0
  for m in _TURN.finditer(text):
    if text[pos:m.start()].strip():
      raise ValueError(f"chat: text outside any turn at character {pos}: {text[pos:m.start()][:40]!r}")
    role, content, end = m.groups()
    pos = m.end()
    if not end:
      if content or role != ASSISTANT or pos != len(text):
        raise ValueError(f"chat: unterminated {role} turn: {text[m.start():m.start() + 60]!r}")
      return messages, spans, True
    start = m.start(2) + (1 if content.startswith(" ") else 0)
    messages.append({"role": role_of[role], "content": text[start:m.end(2)]})
    spans.append((start, m.end(2)))
  return messages, spans, False


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
  """BOS + the tokens of `text`, as training laid documents out: the one way a prompt becomes model input (evals,
  generate, the OpenAI-compatible server). With `chat`, `text` is posed as one user turn followed by the bare
  `<|assistant|>` token; a conversation already rendered with `format_chat` goes in with chat=False."""
  if chat:
    text = format_chat([{"role": "user", "content": text}], add_generation_prompt=True)
  return [tokenizer.bos_id] + tokenizer.encode(text)
