"""The shared TFDS machinery behind every generated corpus: record schema, config naming, cached building.

Every llmstages corpus (bios, world, arith, stories, instructions, preferences) is a `CorpusBuilder`, a
`tfds.core.GeneratorBasedBuilder` whose splits are plain Python generators of records with one schema:

    index       int64   position of the record in its generator (array_record shuffles at build time, so
                        record i of the data source is not example i; `index` gives the generator order back)
    format      text    'text' (plain LM document), 'pc' (prompt/completion), 'chat' (chat-template text, loss
                        on assistant turns), 'pref' (prompt/chosen/rejected)
    text        text    the document for 'text' and 'chat'
    prompt      text    for 'pc' and 'pref'
    completion  text    for 'pc'; the chosen answer for 'pref'
    rejected    text    for 'pref'
    meta        text    a JSON object with per-record facts (person id, attribute, answer, ...)

A corpus config is a dataclass of keyword arguments (`n`, `seed`, ...). Its TFDS config name is derived from the
arguments (a readable prefix and a hash of all of them), so every distinct argument set is built once into
`data_dir/<builder>/<config>/<version>` with `file_format='array_record'` and reused afterwards; a file lock
(`filelock.FileLock`) makes concurrent first uses (several processes) build it once. No TensorFlow is needed.

A corpus module states only what is its own: the config dataclass, `CONFIG_PREFIX`, `SPLITS`, `split_records` and
`metadata`; the TFDS side (features, split generators, the description, which is the module's docstring) is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Iterator

import filelock
import numpy as np
import tensorflow_datasets as tfds

FORMATS = ("text", "pc", "chat", "pref")
_STRING_FIELDS = ("format", "text", "prompt", "completion", "rejected", "meta")


def record(index: int, *, format: str, text: str = "", prompt: str = "", completion: str = "",
           rejected: str = "", meta: dict | None = None) -> dict:
  """Makes one record of the common schema (see the module docstring)."""
  assert format in FORMATS, format
  return {"index": index, "format": format, "text": text, "prompt": prompt, "completion": completion,
          "rejected": rejected, "meta": json.dumps(meta or {}, sort_keys=True)}


def decode_record(raw: dict) -> dict:
  """Turns a record read from an array_record data source (bytes fields) back into Python strings."""
  out = {"index": int(raw["index"])}
  for key in _STRING_FIELDS:
    value = raw[key]
    out[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
  out["meta"] = json.loads(out["meta"]) if out["meta"] else {}
  return out


def config_name(prefix: str, kwargs: dict) -> str:
  """A TFDS config name unique to `kwargs`: readable prefix plus a hash of every argument."""
  digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
  return f"{prefix}_{digest}"


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class of every generated corpus. A subclass sets `CONFIG_CLASS` (a `tfds.core.BuilderConfig` dataclass
  of the corpus arguments), `CONFIG_PREFIX` (a format string over those arguments: the readable part of the
  config name) and `SPLITS` when not train/validation, and implements `split_records` (and `metadata`)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS: list = []
  CONFIG_CLASS: type = tfds.core.BuilderConfig
  CONFIG_PREFIX = "cfg"
  SPLITS: tuple[str, ...] = ("train", "validation")

  # --- to implement -----------------------------------------------------------------------------------------
  def split_records(self, split: str) -> Iterator[dict]:
    """Yields the records (see `record`) of one split, in generator order."""
    raise NotImplementedError

  def metadata(self) -> dict:
    """JSON-serializable facts about the corpus stored with it (fact tables, value counts, versions)."""
    return {}

  @classmethod
  def config_prefix(cls, kwargs: dict) -> str:
    return cls.CONFIG_PREFIX.format(**kwargs)

  # --- TFDS plumbing -------------------------------------------------------------------------------------------
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS locates a builder's source file to look for checksum/metadata files next to it; for builders in an
    # installed package that lookup needs the `importlib_resources` backport. Ours download nothing.
    return None

  @property
  def kwargs(self) -> dict:
    """The corpus arguments (config fields other than TFDS's own)."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(self.builder_config, f.name)
            for f in dataclasses.fields(self.builder_config) if f.name not in base}

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "index": np.int64, **{key: tfds.features.Text() for key in _STRING_FIELDS}})
    description = sys.modules[type(self).__module__].__doc__  # The corpus module's docstring describes it.
    return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    # Metadata is computed at build time and written next to the records (metadata.json).
    self.info.metadata.update(self.metadata())
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split: str = "train"):
    for rec in self.split_records(split):
      yield rec["index"], rec


def builder_for(builder_cls: type[CorpusBuilder], kwargs: dict, data_dir: str) -> CorpusBuilder:
  """Returns the builder for `kwargs` (filled with the config defaults), building it on first use."""
  fields = {f.name: f for f in dataclasses.fields(builder_cls.CONFIG_CLASS)}
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  allowed = sorted(set(fields) - base)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"{builder_cls.name}: unknown argument(s) {unknown}; allowed: {allowed}")
  full = {}
  for name in allowed:
    f = fields[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    value = kwargs.get(name, default)
    if default is not None and not isinstance(value, type(default)):
      try:
        value = type(default)(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{builder_cls.name}: argument {name}={value!r} is not a "
                         f"{type(default).__name__}") from e
    full[name] = value
  config = builder_cls.CONFIG_CLASS(name=config_name(builder_cls.config_prefix(full), full), **full)
  with _quiet_tfds():
    builder = builder_cls(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      os.makedirs(data_dir, exist_ok=True)
      with filelock.FileLock(os.path.join(data_dir, f".{builder.name}.{config.name}.lock")):
        builder = builder_cls(config=config, data_dir=data_dir)  # Re-check after waiting on the lock.
        if not builder.is_prepared():
          # TFDS's nested tqdm bars flood a log file; keep them for terminals only.
          if not sys.stderr.isatty():
            tfds.disable_progress_bar()
          builder.download_and_prepare(file_format="array_record")
          builder = builder_cls(config=config, data_dir=data_dir)
  return builder


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's per-build 'Using custom data configuration' warnings (ours are always custom)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def open_split(builder: CorpusBuilder, split: str):
  """The array_record data source of one split; records decode with `decode_record`."""
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name}: unknown split {split!r}; available: {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def iter_split(builder: CorpusBuilder, split: str) -> Iterator[dict]:
  """All records of a split in generator order (by `index`), decoded. For tests and small corpora."""
  source = open_split(builder, split)
  records = [decode_record(r) for r in _get_many(source, range(len(source)))]
  return iter(sorted(records, key=lambda r: r["index"]))


def _get_many(source, indices) -> list:
  indices = list(indices)
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]
