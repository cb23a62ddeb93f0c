"""Shared test fixtures: tiny models, synthetic batches, one-device meshes, and results made once per test session
even when pytest-xdist runs the suite in several worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import socket

import filelock
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmstages import experiments
from llmstages.model import Decoder, ModelConfig, RegSites

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                   max_seq_len=64)


def shared_path(tmp_path_factory, name: str) -> pathlib.Path:
  """`name` in the directory every pytest-xdist worker of this session shares (the base temp without xdist)."""
  root = tmp_path_factory.getbasetemp()
  return pathlib.Path(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


@contextlib.contextmanager
def made_once(tmp_path_factory, name: str):
  """Yields (directory, done): `done` is False for the first process of the test session to get here, which must
  fill `directory` (and does so holding a lock); the others wait for it, then get True and only read.

  Under pytest-xdist every worker has its own base temp (`.../popen-gwN`) inside one shared root, so the expensive
  session fixtures (the killed-and-resumed smoke sweep, the chat-tuned model) are made once, not once per worker.
  """
  directory = shared_path(tmp_path_factory, name)
  marker, lock = directory.with_name(f"{name}.done"), directory.with_name(f"{name}.lock")
  with filelock.FileLock(str(lock)):
    done = marker.exists()
    if not done:
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir(parents=True)
    yield directory, done
    if not done:
      marker.touch()


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for a server or a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_device_env() -> dict:
  """os.environ for a process that sees one CPU device, as a plain machine has: the XLA flags without conftest's
  8-device count, the others (the tests' optimization level) kept."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def tiny(**kw) -> ModelConfig:
  return dataclasses.replace(TINY, **kw)


def init_params(cfg: ModelConfig, seed: int = 0):
  return nn.unbox(Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))["params"]


def packed_batch(batch: int = 4, length: int = 16, vocab: int = 64, seed: int = 0, docs_per_row: int = 2):
  """Rows holding `docs_per_row` documents each, then padding; as the data pipeline lays them out."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  bounds = np.linspace(0, length - 2, docs_per_row + 1).astype(int)  # Last 2 tokens are padding.
  for d in range(docs_per_row):
    lo, hi = bounds[d], bounds[d + 1]
    seg[:, lo:hi] = d + 1
    pos[:, lo:hi] = np.arange(hi - lo)
  tokens[seg == 0] = 0
  targets = np.roll(tokens, -1, axis=1)
  mask = ((seg > 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
  return {"inputs": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def one_device_mesh():
  from llmstages import partitioning
  return partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def tiny_config(stages=("pretrain",), **stage_overrides):
  """A locked pipeline config with a tiny model; `stage_overrides` apply to every stage block."""
  from llmstages import config as config_lib
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_seq_len=64))
  c.stages = tuple(stages)
  for name in stages:
    c[name] = config_lib.stage_config(name, steps=6, batch_size=8, seq_len=16, warmup_steps=2, log_every=2,
                                      eval_every=0, checkpoint_every=3)
    for k, v in stage_overrides.items():
      if k == "reg":
        c[name].reg.update(v)
      else:
        c[name][k] = v
  return config_lib.finalize(c)


def load_config(path: str, arg: str = "", **overrides):
  """Loads `configs/<path>` (the `configs` package) as the command line does, then applies dotted-key overrides."""
  cfg = experiments.config_file(path, arg)
  for key, value in overrides.items():  # The config stays locked: a mistyped key fails here too.
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return cfg


def read_metrics(workdir: str, stage: str, key: str) -> dict[int, float]:
  import json
  import os
  out = {}
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        out[row["step"]] = row[key]
  return out
