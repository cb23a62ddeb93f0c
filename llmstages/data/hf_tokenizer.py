"""A Hugging Face model directory's tokenizer behind the same interface as our SentencePiece `Tokenizer`.

`tokenizer.json` runs through the `tokenizers` library; a directory with only `tokenizer.model` runs through
SentencePiece. Special tokens come from tokenizer_config.json / special_tokens_map.json (falling back to
config.json's ids); a model without a pad token pads with EOS (padding never carries loss or attention).

Chat data and prompts come in our template (`chat.format_chat`). When the model has a chat template
(tokenizer_config.json's `chat_template`, or chat_template.jinja; rendered with Jinja2 as transformers does), they
are re-rendered in it: `encode` renders a chat text (an eval or RL prompt ending in `<|assistant|>`), and
`render_chat_document` a training document, keeping loss on the assistant turns that had it (the template's
end-of-turn text included, so the model learns to stop). Nothing here needs transformers.
"""

from __future__ import annotations

import json
import os
import shutil

import jinja2
import jinja2.sandbox
import sentencepiece as spm
import tokenizers

from llmstages.data import chat

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _content(token) -> str | None:
  return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
  """encode/decode/token_id/vocab_size/pad_id/bos_id/eos_id/unk_id as `Tokenizer`, plus the chat template."""

  def __init__(self, path: str):
    self.path = path
    tok_json, sp_model = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.exists(tok_json):
      self._tok = tokenizers.Tokenizer.from_file(tok_json)
      self._sp = None
      self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
    elif os.path.exists(sp_model):
      self._tok = None
      self._sp = spm.SentencePieceProcessor(model_file=sp_model)
      self.vocab_size = self._sp.get_piece_size()
    else:
      raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")
    cfg = {**_read_json(os.path.join(path, "special_tokens_map.json")),
           **_read_json(os.path.join(path, "tokenizer_config.json"))}
    model_cfg = _read_json(os.path.join(path, "config.json"))
    ids = {}
    for role in ("bos", "eos", "pad", "unk"):
      piece = _content(cfg.get(f"{role}_token"))
      i = self._piece_id(piece) if piece else None
      if i is None and isinstance(model_cfg.get(f"{role}_token_id"), int):
        i = model_cfg[f"{role}_token_id"]
      ids[role] = i
    if ids["eos"] is None:
      raise ValueError(f"{path}: no eos_token in tokenizer_config.json and no eos_token_id in config.json")
    self.eos_id = ids["eos"]
    self.bos_id = ids["bos"] if ids["bos"] is not None else self.eos_id
    self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
    self.unk_id = ids["unk"] if ids["unk"] is not None else self.pad_id
    self.add_bos = cfg.get("add_bos_token", ids["bos"] is not None)
    template_file = os.path.join(path, "chat_template.jinja")
    self.chat_template = cfg.get("chat_template")
    if self.chat_template is None and os.path.exists(template_file):
      with open(template_file) as f:
        self.chat_template = f.read()
    self._special = {_content(cfg.get(f"{r}_token")) for r in ("bos", "eos", "pad", "unk")} - {None}

  def _piece_id(self, piece: str) -> int | None:
    if self._tok is not None:
      return self._tok.token_to_id(piece)
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS added. Chat text in our template is rendered with the model's."""
    if self.chat_template and chat.is_chat_text(text):
      messages, _, generation = chat.parse_chat(text)
      text = self._strip_bos(self.apply_chat_template(messages, add_generation_prompt=generation))
    return self._encode(text)

  def _encode(self, text: str) -> list[int]:
    if self._tok is not None:
      return self._tok.encode(text, add_special_tokens=False).ids
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    """Text of `ids`; pad/bos/eos are dropped, ids past the vocabulary decode as the unknown token."""
    drop = (self.pad_id, self.bos_id, self.eos_id)
    ids = [int(i) if int(i) < self.vocab_size else self.unk_id for i in ids if int(i) not in drop]
    if self._tok is not None:
      return self._tok.decode(ids, skip_special_tokens=False)
    return self._sp.decode(ids)

  def token_id(self, piece: str) -> int:
    """Id of a special or single-piece token; KeyError if it is not one piece."""
    i = self._piece_id(piece)
    if i is None:
      raise KeyError(f"{piece!r} is not a piece of the tokenizer in {self.path}")
    return i

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) if self._tok is not None else self._sp.id_to_piece(int(i))

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation rendered by the model's own chat template (as transformers renders it)."""
    if not self.chat_template:
      raise ValueError(f"{self.path}: the tokenizer has no chat template (tokenizer_config.json "
                       f"'chat_template' or chat_template.jinja)")

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    special = {f"{r}_token": self.id_to_piece(getattr(self, f"{r}_id")) for r in ("bos", "eos", "pad")}
    return env.from_string(self.chat_template).render(messages=messages,
                                                      add_generation_prompt=add_generation_prompt, **special)

  def _strip_bos(self, text: str) -> str:
    """Templates often start with the BOS text; our data adds the BOS id itself."""
    bos = self.id_to_piece(self.bos_id)
    return text[len(bos):] if bos and text.startswith(bos) else text

  def render_chat_document(self, document):
    """A training document [(text, has_loss)] in our chat template -> the same conversation in the model's,
    as segments; an assistant turn keeps loss (its content and the template's text closing it) iff it had."""
    if not self.chat_template:
      return document
    text = "".join(t for t, _ in document)
    if not chat.is_chat_text(text):
      return document
    messages, spans, generation = chat.parse_chat(text)
    loss_chars, pos = set(), 0
    for piece, has_loss in document:
      if has_loss:
        loss_chars.update(range(pos, pos + len(piece)))
      pos += len(piece)
    out, done = [], ""
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.apply_chat_template(messages[:i], add_generation_prompt=True)
      after = self.apply_chat_template(messages[:i + 1])
      if not (before.startswith(done) and after.startswith(before)):
        raise ValueError(f"{self.path}: the chat template does not render conversations prefix by prefix, "
                         f"so assistant turns cannot be marked for loss")
      start, end = spans[i]
      has_loss = any(c in loss_chars for c in range(start, end)) or (start == end and start in loss_chars)
      out += [(before[len(done):], False), (after[len(before):], has_loss)]
      done = after
    out.append((self.apply_chat_template(messages, add_generation_prompt=generation)[len(done):], False))
    out = [(t, f) for t, f in out if t]
    if out:
      out[0] = (self._strip_bos(out[0][0]), out[0][1])
    return [(t, f) for t, f in out if t]

  def save_pretrained(self, out_dir: str) -> None:
    """Copies the tokenizer's files into `out_dir` (hf export)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
      src = os.path.join(self.path, name)
      if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
        shutil.copy(src, os.path.join(out_dir, name))

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def __repr__(self):
    return f"HFTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def is_hf_tokenizer_dir(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
