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
