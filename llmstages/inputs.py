"""Batch wiring: a stage's data mixture, the data directory, the pipeline's tokenizer, the local-data report, the
token-batch iterator, and the typed batch the step and every loss read (`TokenBatch`).

A batch is a `flax.struct.dataclass` (Tunix's `TrainExample` habit), not a dict whose keys are kept in sync by
hand: it is a pytree, so it is sharded, split into micro-batches and passed through `jax.jit` as a dict was.
Stage-only batches (preference pairs, rollouts) build on it in `llmstages.stages`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llmstages import data
from llmstages.data import report as data_report

Array = Any  # jax.Array, np.ndarray or jax.ShapeDtypeStruct (an abstract batch).
StageContext = Any  # train.StageContext; train imports this module.

TOKEN_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@flax.struct.dataclass
class TokenBatch:
  """Rows of packed documents, [B, L] each: the data layer's layout (see `llmstages.data`)."""
  inputs: Array  # int32 token ids.
  targets: Array  # int32, the next token of each input.
  positions: Array  # int32, positions within each packed document.
  segment_ids: Array  # int32, the document of each token; 0 is padding.
  loss_mask: Array  # float32, 1 where the target counts.

  @classmethod
  def from_dict(cls, arrays: Mapping[str, Array]) -> "TokenBatch":
    """From the data layer's {'inputs', 'targets', 'positions', 'segment_ids', 'loss_mask'} dict."""
    return cls(**{k: arrays[k] for k in TOKEN_FIELDS})


def token_batch_shapes(rows: int, seq_len: int, sharding) -> TokenBatch:
  """Abstract [rows, seq_len] token arrays on `sharding`."""
  shape = (rows, seq_len)
  struct = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return TokenBatch(inputs=struct(jnp.int32), targets=struct(jnp.int32), positions=struct(jnp.int32),
                    segment_ids=struct(jnp.int32), loss_mask=struct(jnp.float32))


def stage_mixture(config, name: str):
  stage_config = config[name]
  mixture = data.parse_mixture(stage_config.data)
  if stage_config.replay > 0:
    old = data.parse_mixture(config[stage_config.init_from].data)
    new_total = sum(w for _, w in mixture)
    old_total = sum(w for _, w in old)
    mixture = ([(s, (1 - stage_config.replay) * w / new_total) for s, w in mixture]
               + [(s, stage_config.replay * w / old_total) for s, w in old])
  return mixture


def data_dir(config) -> str:
  return config.data.dir or os.environ.get("LLMSTAGES_DATA_DIR") or os.path.expanduser("~/.cache/llmstages/data")


def tokenizer_for(config, workdir: str | None = None):
  """The one tokenizer of a pipeline: an imported model's (`data.tokenizer`, a Hugging Face directory), or ours
  trained on every stage's sources (or `data.tokenizer_sources`).

  With `workdir`, ours is the workdir's own copy, `<workdir>/tokenizer/<key>/spm.model` (key: the sources and vocab
  size), written on first use and read from then on: a tokenizer rebuilt in another data directory (another
  SentencePiece version, a corpus rebuilt by other code, or one trained before tokenizers were single-threaded) can
  give other ids than the ones the workdir's checkpoints were trained on, and they would read it as noise."""
  if config.data.get("tokenizer"):
    tok = data.HFTokenizer(config.data.tokenizer)
    if tok.vocab_size > config.model.vocab_size:
      raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r} has {tok.vocab_size} tokens but "
                       f"config.model.vocab_size={config.model.vocab_size}")
    return tok
  if config.data.tokenizer_sources:
    sources = [s for s, _ in data.parse_mixture(config.data.tokenizer_sources)]
  else:
    sources = []
    for name in config.stages:
      for s, _ in data.parse_mixture(config[name].data):
        if s not in sources:
          sources.append(s)
  vocab = config.model.vocab_size
  pinned = os.path.join(workdir, "tokenizer", data.tokenizer_key(sources, vocab), "spm.model") if workdir else ""
  if pinned and os.path.exists(pinned):
    tok = data.Tokenizer.load(pinned)
  else:
    tok = data.get_tokenizer(sources, vocab, data_dir(config))
  if jax.process_count() > 1:
    tok = _process_zero_tokenizer(tok)
  if pinned and jax.process_index() == 0 and not os.path.exists(pinned):
    tok.save(pinned)
  if tok.vocab_size > vocab:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but config.model.vocab_size={vocab}")
  return tok


def _process_zero_tokenizer(tok):
  """Process 0's tokenizer, on every process (a collective: every process calls it). Hosts with their own data
  directories would otherwise each train one, and nothing makes them equal (other SentencePiece versions, other
  corpora)."""
  proto = np.frombuffer(tok.model_proto, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(proto.size)))
  buf = np.zeros(size, np.uint8)
  buf[:min(size, proto.size)] = proto[:size]
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()
  return tok if got == tok.model_proto else data.Tokenizer(got)


def report_local_data(ctx: StageContext, tokenizer) -> list[str]:
  """Prints what the stage's local files hold and the epochs its steps imply; refuses too-long examples
  (`<stage>.too_long`, see `llmstages.data.report`) before anything compiles or trains."""
  stage_config = ctx.stage_config
  if not stage_config.data:  # A stage that reads no data (an imported base) has nothing to report.
    return []
  _, lines = data_report.check_and_report(
      stage_mixture(ctx.config, ctx.name), tokenizer=tokenizer, seq_len=stage_config.seq_len,
      batch_size=stage_config.batch_size, steps=stage_config.steps, pack=stage_config.pack,
      data_dir=data_dir(ctx.config), too_long=stage_config.get("too_long", "auto"), where=f"config.{ctx.name}")
  for line in lines:
    print(f"[{ctx.name}] data: {line}", flush=True)
  return lines


def split_mixture(ctx: StageContext, split: str):
  """The mixture a split reads: the stage's own (with replay), or `eval_data` for held-out splits when set."""
  mixture = stage_mixture(ctx.config, ctx.name)
  if split != "train" and ctx.stage_config.eval_data:
    mixture = data.parse_mixture(ctx.stage_config.eval_data)
  return mixture


def make_batches(ctx: StageContext, tokenizer, split: str = "train", mixture=None):
  """The stage's token-batch iterator (this process's rows; get_state/set_state for resumption)."""
  stage_config = ctx.stage_config
  if mixture is None:
    mixture = split_mixture(ctx, split)
  index, count = ctx.data_shard()
  return data.make_iterator(mixture, tokenizer=tokenizer, batch_size=stage_config.batch_size,
                            seq_len=stage_config.seq_len, seed=ctx.config.seed, split=split,
                            data_dir=data_dir(ctx.config), process_index=index, process_count=count,
                            pack=stage_config.pack, cross_document_attention=stage_config.cross_document_attention,
                            truncate=stage_config.get("too_long", "auto") == "truncate")
