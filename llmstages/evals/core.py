"""The evaluator registry, the context an evaluator gets, and writing eval.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from llmstages import losses
from llmstages.data import chat
from llmstages.evals import metrics as M
from llmstages.model import HEAD_PARAMS

_REGISTRY: dict[str, Callable[["EvalContext"], dict]] = {}


def register(name: str):
  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"evaluator {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn
  return wrap


def get(name: str):
  from llmstages.evals import evaluators  # noqa: F401  (fills the registry)
  if name not in _REGISTRY:
    raise ValueError(f"unknown evaluator {name!r}; known evaluators: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  from llmstages.evals import evaluators  # noqa: F401
  return sorted(_REGISTRY)


@dataclasses.dataclass
class Metric:
  """One number with how many items it averages and a 95% bootstrap interval over those items."""
  value: float
  n: int
  ci95: tuple[float, float] | None = None

  @classmethod
  def mean_of(cls, values: Sequence[float], seed: int = 0) -> "Metric":
    values = np.asarray(values, np.float64)
    if len(values) == 0:
      return cls(float("nan"), 0, None)
    est, lo, hi = M.bootstrap_ci(values, seed=seed)
    return cls(float(est), int(len(values)), (float(lo), float(hi)))

  def to_json(self) -> dict:
    out = {"value": self.value, "n": self.n}
    if self.ci95 is not None:
      out["ci95"] = list(self.ci95)
    return out


@dataclasses.dataclass
class EvalContext:
  """What an evaluator may use: the trained parameters, the tokenizer, a sampler, a log-prob function."""
  config: Any
  stage: str
  params: Any  # The language model (no scalar head).
  tokenizer: Any
  train_ctx: Any  # train.StageContext of the stage (model, mesh, rules, abstract state).
  workdir: str
  stage_params: Any = None  # The stage's parameters as trained: with its scalar head, if it has one.
  prompt_format: str = "raw"  # 'chat': questions go in the chat template the stage was tuned on (`prompt_format`).

  @property
  def ecfg(self):
    return self.config.eval

  @property
  def data_dir(self) -> str:
    from llmstages import train
    return train.data_dir(self.config)

  @property
  def model_cfg(self):
    return self.train_ctx.model_cfg

  def sampler(self, mc_dropout: float = 0.0):
    from llmstages.sampler import Sampler
    return Sampler(self.model_cfg, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                   mesh=self.train_ctx.mesh, rules=self.train_ctx.rules,
                   mc_dropout=mc_dropout or self.ecfg.mc_dropout)

  def encode_prompt(self, text: str) -> list[int]:
    """Text the model continues as it is (a biography cut before a value): BOS + tokens."""
    return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

  def encode_question(self, text: str) -> list[int]:
    """A question or request: as it is, or as one user turn of the chat template (`prompt_format`)."""
    return self.encode_prompt(wrap_question(text, self.prompt_format))

  def decode(self, ids: Sequence[int]) -> str:
    """The generated text up to the end of the reply (EOS, or the chat template's end of turn)."""
    ids = [i for i in ids if i not in (self.tokenizer.eos_id, self.tokenizer.pad_id)]
    return self.tokenizer.decode(ids).split(chat.END, 1)[0]

  def token_logprobs(self, sequences: Sequence[Sequence[int]], batch_size: int = 64) -> list[np.ndarray]:
    """log p(seq[t] | seq[:t]) for t = 1..len-1 of every sequence, deterministic (no dropout), in nats."""
    fn = _logprob_fn(self.train_ctx.lm_model)
    longest = max(len(s) for s in sequences)
    length = int(2 ** np.ceil(np.log2(max(longest, 8))))
    if length > self.model_cfg.max_seq_len:
      raise ValueError(f"a scored sequence of {longest} tokens exceeds config.model.max_seq_len="
                       f"{self.model_cfg.max_seq_len}")
    out = []
    for lo in range(0, len(sequences), batch_size):
      rows = sequences[lo:lo + batch_size]
      tokens = np.zeros((batch_size, length), np.int32)
      for r, seq in enumerate(rows):
        tokens[r, :len(seq)] = seq
      with self.train_ctx.activate():
        lp = np.asarray(fn(self.params, tokens), np.float64)
      out.extend(lp[r, :len(seq) - 1] for r, seq in enumerate(rows))
    return out


# Stage kinds that train on the chat template (instruct) or on chat-formatted data (the preference and RL stages).
CHAT_KINDS = ("instruct", "reward", "dpo", "ppo", "grpo")
PROMPT_FORMATS = {"auto": None, "always": "chat", "never": "raw"}


def prompt_format(config, stage: str) -> str:
  """'chat' or 'raw': how the evaluators pose questions to `stage`, from `config.eval.chat`.

  'auto' gives 'chat' when the stage or any stage it started from (its `init_from` chain) is of a kind in
  `CHAT_KINDS`, so a model is asked in the format it was tuned on; 'always' and 'never' force either.
  """
  choice = config.eval.chat
  if choice not in PROMPT_FORMATS:
    raise ValueError(f"config.eval.chat={choice!r}; expected one of {sorted(PROMPT_FORMATS)}")
  if PROMPT_FORMATS[choice]:
    return PROMPT_FORMATS[choice]
  seen = set()
  while stage and stage in config and stage not in seen:
    seen.add(stage)
    if config[stage].kind in CHAT_KINDS:
      return "chat"
    stage = config[stage].init_from
  return "raw"


def wrap_question(text: str, fmt: str) -> str:
  """`text` as a raw prompt, or as a user turn followed by the assistant's turn token (fmt='chat')."""
  if fmt == "chat":
    return chat.format_chat([{"role": "user", "content": text}], add_generation_prompt=True)
  if fmt != "raw":
    raise ValueError(f"prompt format {fmt!r}; expected 'raw' or 'chat'")
  return text


_LOGPROB_FNS: dict = {}


def _logprob_fn(model):
  if model not in _LOGPROB_FNS:
    def fn(params, tokens_BxL):
      logits = model.apply({"params": params}, tokens_BxL[:, :-1])
      return losses.token_logprobs(logits, tokens_BxL[:, 1:])
    _LOGPROB_FNS[model] = jax.jit(fn)
  return _LOGPROB_FNS[model]


def eval_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "eval.json")


def evaluate_stage(config, stage: str, workdir: str, tokenizer=None, force: bool = False) -> dict | None:
  """Runs `config.<stage>.evals` on the stage's final parameters; writes and returns eval.json's content."""
  from llmstages import train
  wanted = tuple(config[stage].evals)
  if not wanted:
    return None
  fns = {name: get(name) for name in wanted}  # Unknown names fail before any work.
  path = eval_path(workdir, stage)
  if os.path.exists(path) and not force:
    with open(path) as f:
      done = json.load(f)
    if set(done.get("evaluators", [])) == set(wanted) and done.get("prompt_format") == prompt_format(config, stage):
      return done
  tokenizer = tokenizer if tokenizer is not None else train.tokenizer_for(config)
  tctx = train.build_context(config, stage)
  params = train.load_final_params(workdir, stage, tctx.abstract_lm_params(tctx.stage.score_head),
                                   needed_by=f"evals of stage {stage!r}", with_head=tctx.stage.score_head)
  if jax.process_count() > 1:
    # Every host evaluates a full copy on its own devices (identical results; process 0 writes them): sampling
    # and host-side scoring need whole arrays, which a mesh spanning hosts cannot hand to one process.
    from jax.experimental import multihost_utils
    from llmstages import partitioning
    host_params = multihost_utils.process_allgather(params, tiled=True)
    local = partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())
    tctx = train.build_context(config, stage, mesh=local)
    params = jax.device_put(host_params, {k: tctx.params_sharding[k] for k in host_params})
  lm_params = {k: v for k, v in params.items() if k not in HEAD_PARAMS}
  fmt = prompt_format(config, stage)
  ctx = EvalContext(config=config, stage=stage, params=lm_params, stage_params=params, tokenizer=tokenizer,
                    train_ctx=tctx, workdir=workdir, prompt_format=fmt)
  results: dict[str, dict] = {}
  for name, fn in fns.items():
    print(f"[{stage}] evaluating {name} ...", flush=True)
    for key, metric in fn(ctx).items():
      results[f"{name}/{key}"] = metric.to_json()
  out = {"stage": stage, "step": int(config[stage].steps), "evaluators": list(wanted), "prompt_format": fmt,
         "metrics": results}
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(out, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    from tensorboardX import SummaryWriter
    with SummaryWriter(os.path.join(workdir, stage, "tensorboard")) as tb:
      for key, m in results.items():
        if np.isfinite(m["value"]):
          tb.add_scalar(f"final/{key}", m["value"], out["step"])
    headline = ("greedy", "/R", "perplexity", "validity", "distinct_2", "answer_rate", "maj@")
    lines = [f"  {k} = {v['value']:.4g} (n={v['n']})" for k, v in results.items()
             if any(h in k for h in headline) and "memorization/" not in k or k.endswith("mean_greedy")]
    print(f"[{stage}] wrote {len(results)} metrics to {path}; headline:\n" + "\n".join(lines), flush=True)
  return out
