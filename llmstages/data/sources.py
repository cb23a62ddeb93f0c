"""Source specs and mixtures: parsing them, the named sources (registry category 'source'), and opening a source
as documents.

A *source spec* names where documents come from:

    NAME                     a registered corpus source, e.g. `bios`, `bios_qa`, `arith`
    NAME(k=v,...)            with corpus arguments, e.g. `bios(n=2000,format=multi_permute,seed=1)`;
                             the special argument `split=S` reads builder split S whatever split the iterator asks
    file:PATH                a local .txt (documents = blank-line-separated paragraphs) or .jsonl file (chat,
                             preference, prompt, prompt/completion or text lines, see `jsonl`; the format is
                             detected and every line validated first); the same documents for every split
    chat:PATH                a .jsonl file that must be chat (OpenAI's fine-tuning format)
    tfds:NAME[/CONFIG][:SPLIT]  a TFDS catalog dataset read with `tfds.data_source` from TFDS's own data dir;
                             without SPLIT the iterator's split is used

A *mixture* is `SOURCE[:WEIGHT],SOURCE[:WEIGHT],...` (weights default to 1.0 and are normalized).

A document is a list of `(text, has_loss)` segments: plain text is `[(text, True)]`, a prompt/completion pair is
`[(prompt, False), (completion, True)]`, chat text is split by `chat.chat_segments`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from llmstages import registry
from llmstages.data import chat, corpus, jsonl

Document = list[tuple[str, bool]]


@dataclasses.dataclass(frozen=True)
class SourceEntry:
  """A registered source name: which corpus builder and which of its splits serve 'train' and 'validation'."""
  name: str
  builder: type[corpus.CorpusBuilder]
  splits: dict                     # iterator split -> builder split
  defaults: dict                   # corpus arguments implied by the name
  doc: str


def register_source(name: str, builder: type[corpus.CorpusBuilder], *, train: str = "train",
                    validation: str = "validation", doc: str = "", **defaults) -> None:
  """Registers `name` (registry category 'source'); each corpus module registers its own names next to its
  builder."""
  registry.add("source", name, SourceEntry(name, builder, {"train": train, "validation": validation}, defaults,
                                           doc))


class _RegisteredSources(collections.abc.Mapping):
  """The registered source names as a read-only mapping name -> SourceEntry (a view of the registry)."""

  def __getitem__(self, name: str) -> SourceEntry:
    if name not in registry.names("source"):
      raise KeyError(name)
    return registry.get("source", name)

  def __iter__(self) -> Iterator[str]:
    return iter(registry.names("source"))

  def __len__(self) -> int:
    return len(registry.names("source"))


SOURCES = _RegisteredSources()


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str                  # 'corpus' | 'file' | 'chat' | 'tfds'
  name: str                  # registry name, file path, or TFDS 'name[/config]'
  kwargs: tuple = ()         # sorted (key, value) corpus arguments
  split: str | None = None   # explicit split, overriding the iterator's

  @property
  def text(self) -> str:
    if self.kind in ("file", "chat"):
      return f"{self.kind}:{self.name}"
    if self.kind == "tfds":
      return f"tfds:{self.name}" + (f":{self.split}" if self.split else "")
    args = [f"{k}={v}" for k, v in self.kwargs] + ([f"split={self.split}"] if self.split else [])
    return self.name + (f"({','.join(args)})" if args else "")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits at `sep` outside parentheses and brackets."""
  parts, depth, current = [], 0, []
  for ch in text:
    if ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    if ch == sep and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  parts.append("".join(current))
  return parts


def _convert(value: str):
  low = value.lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


_NAME_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?$", re.S)


def parse_source(text: str) -> SourceSpec:
  """Parses one source spec (see the module docstring); raises ValueError for unknown names."""
  text = text.strip()
  for kind in ("file", "chat"):
    if text.startswith(f"{kind}:"):
      path = os.path.expanduser(text[len(kind) + 1:].strip())
      if not path:
        raise ValueError(f"source {text!r}: {kind}: needs a path")
      return SourceSpec(kind, path)
  if text.startswith("tfds:"):
    rest = text[len("tfds:"):].strip()
    name, _, split = rest.partition(":")
    if not name:
      raise ValueError(f"source {text!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
    return SourceSpec("tfds", name.strip(), split=split.strip() or None)
  m = _NAME_RE.match(text)
  if not m:
    raise ValueError(f"source {text!r}: expected NAME, NAME(k=v,...), file:PATH, chat:PATH or "
                     "tfds:NAME[/CONFIG]:SPLIT")
  name, args = m.group(1), m.group(2)
  if name not in SOURCES:
    raise ValueError(f"unknown dataset {name!r} in {text!r}; known datasets: {', '.join(sorted(SOURCES))}, "
                     "file:PATH, tfds:NAME[/CONFIG]:SPLIT")
  kwargs, split = {}, None
  for arg in _split_top_level(args or ""):
    if not arg.strip():
      continue
    key, eq, value = arg.partition("=")
    if not eq:
      raise ValueError(f"source {text!r}: argument {arg!r} is not key=value")
    key, value = key.strip(), value.strip()
    if key == "split":
      split = value
    else:
      kwargs[key] = _convert(value)
  return SourceSpec("corpus", name, tuple(sorted(kwargs.items())), split)


def parse_mixture(spec: str | Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
  """'bios:0.7,arith:0.3' -> [('bios', 0.7), ('arith', 0.3)]. Weights default to 1.0; every source is
  validated. Raises ValueError naming the spec for unknown datasets, bad weights, or weights summing to 0."""
  if isinstance(spec, str):
    entries = []
    for part in _split_top_level(spec):
      part = part.strip()
      if not part:
        raise ValueError(f"mixture {spec!r}: empty entry")
      head, sep, tail = part.rpartition(":")
      weight = 1.0
      if sep and head and not head.endswith(("file", "chat", "tfds")) and _is_float(tail):
        part, weight = head.strip(), float(tail)
      entries.append((part, weight))
  else:
    entries = [(str(s), float(w)) for s, w in spec]
  if not entries:
    raise ValueError(f"mixture {spec!r} is empty")
  for source, weight in entries:
    parse_source(source)
    if weight < 0 or weight != weight:
      raise ValueError(f"mixture {spec!r}: weight {weight} of {source!r} must be >= 0")
  if sum(w for _, w in entries) <= 0:
    raise ValueError(f"mixture {spec!r}: weights sum to zero")
  return entries


def _is_float(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


# --- documents ---------------------------------------------------------------------------------------------------
def record_to_document(rec: dict) -> Document:
  """Turns a decoded record (or a dict with 'text' / 'prompt'+'completion') into loss-annotated segments."""
  fmt = rec.get("format") or ("pc" if "prompt" in rec else "text")
  if fmt == "text":
    return [(rec["text"], True)]
  if fmt in ("pc", "pref"):
    return [(rec["prompt"], False), (rec["completion"], True)]
  if fmt == "chat":
    return chat.chat_segments(rec["text"])
  raise ValueError(f"unknown record format {fmt!r}")


class DocSource:
  """Random access to the documents of one source and split."""

  spec: SourceSpec

  def __len__(self) -> int:
    raise NotImplementedError

  def record(self, i: int) -> dict:
    raise NotImplementedError

  def document(self, i: int) -> Document:
    return record_to_document(self.record(i))


class CorpusSource(DocSource):
  def __init__(self, spec: SourceSpec, builder, split: str):
    self.spec, self.builder, self.split = spec, builder, split
    self._data = corpus.open_split(builder, split)
    if len(self._data) == 0:
      raise ValueError(f"source {spec.text!r}: split {split!r} is empty")

  def __len__(self):
    return len(self._data)

  def record(self, i):
    return corpus.decode_record(self._data[i])


class ListSource(DocSource):
  def __init__(self, spec: SourceSpec, records: list[dict]):
    self.spec, self._records = spec, records

  def __len__(self):
    return len(self._records)

  def record(self, i):
    return self._records[i]


def read_file(path: str, expect: str | None = None) -> list[dict]:
  """Records of a .txt or .jsonl file (`jsonl.read_jsonl`: every line validated, format detected or `expect`ed);
  clear errors for missing/empty files and bad lines."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{'chat' if expect == 'chat' else 'file'}:{path}: no such file")
  if expect is not None and not path.endswith(".jsonl"):
    raise ValueError(f"chat:{path}: a chat file must be .jsonl (one {{\"messages\": [...]}} per line)")
  with open(path, encoding="utf-8") as f:
    content = f.read()
  records = []
  if path.endswith(".jsonl"):
    _, records = jsonl.read_jsonl(path, expect)
  elif path.endswith((".txt", ".md")):
    records = [{"format": "text", "text": p.strip()} for p in re.split(r"\n\s*\n", content) if p.strip()]
  else:
    raise ValueError(f"file:{path}: unsupported extension; use .txt (paragraphs) or .jsonl")
  if not records:
    raise ValueError(f"file:{path}: the file is empty (no documents)")
  for i, rec in enumerate(records):
    rec.setdefault("index", i)
  return records


class TfdsSource(DocSource):
  """A TFDS catalog dataset. Documents come from feature 'text', or 'prompt'+'completion', or the first string
  feature."""

  def __init__(self, spec: SourceSpec, split: str):
    self.spec = spec
    self._data = tfds.data_source(spec.name, split=split, data_dir=os.environ.get("TFDS_DATA_DIR"))
    if len(self._data) == 0:
      raise ValueError(f"source {spec.text!r}: split {split!r} is empty")

  def __len__(self):
    return len(self._data)

  def record(self, i):
    raw = self._data[i]
    get = lambda k: raw[k].decode("utf-8") if isinstance(raw[k], bytes) else str(raw[k])
    if "text" in raw:
      return {"format": "text", "text": get("text")}
    if "prompt" in raw and "completion" in raw:
      return {"format": "pc", "prompt": get("prompt"), "completion": get("completion")}
    for key, value in raw.items():
      if isinstance(value, (bytes, str)):
        return {"format": "text", "text": get(key)}
    raise ValueError(f"source {self.spec.text!r}: no text feature in {sorted(raw)}")


def corpus_builder(spec: SourceSpec, data_dir: str):
  """The (built) TFDS builder of a corpus spec."""
  entry = SOURCES[spec.name]
  return corpus.builder_for(entry.builder, {**entry.defaults, **dict(spec.kwargs)}, data_dir)


def builder_split(spec: SourceSpec, split: str) -> str:
  if spec.split:
    return spec.split
  return SOURCES[spec.name].splits.get(split, split)


def open_source(spec: SourceSpec | str, split: str, data_dir: str) -> DocSource:
  """Opens a source for one iterator split ('train', 'validation', or a builder split name)."""
  spec = parse_source(spec) if isinstance(spec, str) else spec
  if spec.kind in ("file", "chat"):
    return ListSource(spec, read_file(spec.name, "chat" if spec.kind == "chat" else None))
  if spec.kind == "tfds":
    return TfdsSource(spec, spec.split or split)
  return CorpusSource(spec, corpus_builder(spec, data_dir), builder_split(spec, split))


def source_info(name_spec: str, data_dir: str) -> dict:
  """Metadata of a source: for corpora the builder's metadata (bios: fact table, N0, S0, ...) plus splits."""
  spec = parse_source(name_spec)
  if spec.kind in ("file", "chat"):
    return {"source": spec.text, "kind": spec.kind,
            "num_documents": len(read_file(spec.name, "chat" if spec.kind == "chat" else None))}
  if spec.kind == "tfds":
    builder = tfds.builder(spec.name, data_dir=os.environ.get("TFDS_DATA_DIR"))
    return {"source": spec.text, "kind": "tfds",
            "splits": {k: v.num_examples for k, v in builder.info.splits.items()}}
  builder = corpus_builder(spec, data_dir)
  info = dict(builder.info.metadata)
  info.update({"source": spec.text, "kind": "corpus", "builder": builder.name,
               "config": builder.builder_config.name, "version": str(builder.version),
               "data_dir": builder.data_dir, "arguments": builder.kwargs,
               "split_map": dict(SOURCES[spec.name].splits) if not spec.split else {"*": spec.split},
               "splits": {k: v.num_examples for k, v in builder.info.splits.items()}})
  return info
