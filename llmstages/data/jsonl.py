"""JSONL training files: detecting their format, validating every line before anything trains, and turning lines
into records (`sources.record_to_document` reads them).

Formats (detected from each line's keys; `chat:PATH` requires every line to be chat):

    chat        {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
                OpenAI's fine-tuning format: every role known, every content a string, at least one assistant
                message. Rendered with `chat.format_chat`; loss on assistant turns only.
    preference  {"prompt": P, "chosen": C, "rejected": R} (TRL's format), each a string or a message list; or
                TRL's implicit prompt: only "chosen" and "rejected", two conversations whose shared leading
                messages are the prompt. Feeds reward and DPO.
    prompt      {"prompt": P, "answer": "...", "verifier": "arith" | "facts"} (verifier optional: "facts",
                exact match, by default; "arith" checks the final number). Feeds GRPO.
    pc          {"prompt": "...", "completion": "..."} (optionally "rejected": a preference pair)
    text        {"text": "..."}

A message-list prompt is rendered as a chat ending in `<|assistant|>` and a chat reply as " reply<|end|>", as the
instruct data are. Any line may carry a "meta" object. `read_jsonl` reads the whole file and raises one
`ValueError` listing every bad line (file:line: problem, the first 20) before returning anything, so nothing
trains on a partly read file.
"""

from __future__ import annotations

import json

from llmstages.data import chat

FORMATS = ("chat", "preference", "prompt", "pc", "text")
VERIFIER_KINDS = {"facts": "world", "arith": "arith"}  # verifier -> the prompt kind its reward applies to.
MAX_LISTED_ERRORS = 20


class LineError(ValueError):
  pass


def detect_format(obj: dict) -> str:
  if "messages" in obj:
    return "chat"
  if "chosen" in obj or ("rejected" in obj and "completion" not in obj):
    return "preference"
  if "completion" in obj:
    return "pc"
  if "prompt" in obj and ("answer" in obj or "verifier" in obj):
    return "prompt"
  if "text" in obj:
    return "text"
  raise LineError(f"expected 'messages' (chat), 'prompt' + 'chosen' + 'rejected' (preference), 'prompt' + "
                  f"'answer' (prompt), 'prompt' + 'completion' or 'text'; got keys {sorted(obj)}")


def check_messages(messages, what: str = "messages", need_assistant: bool = True) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise LineError(f"{what!r} must be a non-empty list of messages")
  for j, m in enumerate(messages):
    if not isinstance(m, dict):
      raise LineError(f"{what}[{j}] must be an object with 'role' and 'content'")
    if m.get("role") not in chat.ROLES:
      raise LineError(f"{what}[{j}]: unknown role {m.get('role')!r}; expected one of {sorted(chat.ROLES)}")
    if not isinstance(m.get("content"), str):
      raise LineError(f"{what}[{j}]: content must be a string, got {type(m.get('content')).__name__}")
    extra = set(m) - {"role", "content", "name", "weight"}
    if extra:
      raise LineError(f"{what}[{j}]: unsupported keys {sorted(extra)} (tool calls are not supported)")
  if need_assistant and not any(m["role"] == "assistant" for m in messages):
    raise LineError(f"{what!r} has no assistant message: there is nothing to learn")
  return messages


def _prompt_text(prompt, what: str = "prompt") -> tuple[str, bool]:
  """(rendered prompt, whether it is a chat)."""
  if isinstance(prompt, str):
    if not prompt:
      raise LineError(f"{what!r} is empty")
    return prompt, False
  messages = check_messages(prompt, what, need_assistant=False)
  return chat.format_chat(messages, add_generation_prompt=True), True


def _reply_text(reply, what: str, is_chat: bool) -> str:
  if isinstance(reply, str):
    if not reply.strip():
      raise LineError(f"{what!r} is empty")
    return f" {reply}{chat.END}" if is_chat else reply
  messages = check_messages(reply, what, need_assistant=True)
  if len(messages) != 1 or messages[0]["role"] != "assistant":
    raise LineError(f"{what!r} must be one assistant message, got roles {[m['role'] for m in messages]}")
  return f" {messages[0]['content']}{chat.END}"


def _implicit_prompt(obj: dict) -> dict:
  """TRL's implicit-prompt preference line: the shared leading messages of chosen and rejected."""
  chosen = check_messages(obj["chosen"], "chosen")
  rejected = check_messages(obj["rejected"], "rejected")
  k = 0
  while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
    k += 1
  if k == 0:
    raise LineError("without 'prompt', 'chosen' and 'rejected' must share their leading (prompt) messages")
  return {"prompt": chosen[:k], "chosen": chosen[k:], "rejected": rejected[k:]}


def line_record(obj, fmt: str | None) -> tuple[str, dict]:
  """(format, record) of one decoded line; raises LineError naming the problem."""
  if not isinstance(obj, dict):
    raise LineError(f"expected a JSON object, got {type(obj).__name__}")
  meta = obj.get("meta", {})
  if not isinstance(meta, dict):
    raise LineError("'meta' must be a JSON object")
  this = detect_format(obj)
  if fmt is not None and this != fmt:
    raise LineError(f"a {this} line where every line must be {fmt}")
  if this == "chat":
    messages = check_messages(obj["messages"])
    return this, {"format": "chat", "text": chat.format_chat(messages), "meta": meta}
  if this == "preference":
    for key in ("chosen", "rejected"):
      if key not in obj:
        raise LineError(f"a preference line needs 'prompt', 'chosen' and 'rejected'; {key!r} is missing")
    if "prompt" not in obj:
      obj = _implicit_prompt(obj)
    prompt, is_chat = _prompt_text(obj["prompt"])
    return this, {"format": "pref", "prompt": prompt, "completion": _reply_text(obj["chosen"], "chosen", is_chat),
                  "rejected": _reply_text(obj["rejected"], "rejected", is_chat), "meta": meta}
  if this == "prompt":
    prompt, _ = _prompt_text(obj["prompt"])
    verifier = obj.get("verifier", "facts")
    if verifier not in VERIFIER_KINDS:
      raise LineError(f"unknown verifier {verifier!r}; known: {sorted(VERIFIER_KINDS)}")
    answer = obj.get("answer", "")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer) == "":
      raise LineError("'answer' must be a non-empty string or number")
    if verifier == "arith" and not str(answer).lstrip("-").isdigit():
      raise LineError(f"verifier 'arith' needs an integer answer, got {answer!r}")
    return this, {"format": "pc", "prompt": prompt, "completion": f" {answer}",
                  "meta": {**meta, "kind": VERIFIER_KINDS[verifier], "answer": str(answer), "verifier": verifier}}
  if this == "pc":
    if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
      raise LineError("'prompt' and 'completion' must be strings")
    rec = {"format": "pc", "prompt": obj["prompt"], "completion": obj["completion"], "meta": meta}
    if isinstance(obj.get("rejected"), str):  # A preference pair: completion is the chosen one.
      rec.update(format="pref", rejected=obj["rejected"])
    return this, rec
  if not isinstance(obj["text"], str):
    raise LineError("'text' must be a string")
  return this, {"format": "text", "text": obj["text"], "meta": meta}


def read_jsonl(path: str, expect: str | None = None) -> tuple[dict[str, int], list[dict]]:
  """({format: lines}, records) of a JSONL file, every line validated first (and of format `expect` if given);
  see the module docstring."""
  if expect is not None and expect not in FORMATS:
    raise ValueError(f"unknown JSONL format {expect!r}; known: {FORMATS}")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  formats, records, errors = {}, [], []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise LineError(f"malformed JSONL line, not JSON ({e.msg} at column {e.colno}): {line[:60]!r}") \
            from None
      this, rec = line_record(obj, expect)
      formats[this] = formats.get(this, 0) + 1
      rec["line"] = lineno
      records.append(rec)
    except LineError as e:
      errors.append(f"{path}:{lineno}: {e}")
  if errors:
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    raise ValueError(f"{path}: {len(errors)} bad line(s) of {len(lines)}; nothing was read:\n  "
                     + "\n  ".join(errors[:MAX_LISTED_ERRORS]) + more)
  if not records:
    raise ValueError(f"{path}: the file is empty (no documents)")
  for i, rec in enumerate(records):
    rec.setdefault("index", i)
  return formats, records
