"""`evaluate_stage`: runs a stage's evaluators on its final parameters and writes `<workdir>/<stage>/eval.json`.

The one module of evals/ that touches the trainer (train, workdir, inputs): it loads the stage, builds the
`EvalContext`'s score and sample functions once, and hands evaluators that context, never the trainer.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from llmstages import inputs, losses, partitioning, stages, train
from llmstages import workdir as workdir_lib
from llmstages.evals import prompts
from llmstages.evals.context import EvalContext, get
from llmstages.evals.settings import EvalConfig
from llmstages.model import split_head
from llmstages.sampler import Sampler

# Metrics printed after a stage's evaluation (substrings of their keys).
HEADLINE = ("greedy", "/R", "perplexity", "validity", "distinct_2", "answer_rate", "maj@")


def eval_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "eval.json")


def check(config, stage: str) -> EvalConfig | None:
  """The checked `config.eval` when `config.<stage>.evals` lists evaluators (None otherwise): an unknown
  evaluator, a bad setting or an empty data spec an evaluator needs fails here, before any work."""
  wanted = tuple(config[stage].evals)
  if not wanted:
    return None
  evaluators = [get(name, where=f"config.{stage}.evals") for name in wanted]
  settings = EvalConfig.from_config(config.eval)
  for evaluator in evaluators:
    settings.check_needs(evaluator.needs, evaluator.name, stage)
  return settings


def evaluate_stage(config, stage: str, workdir: str, tokenizer=None, force: bool = False) -> dict | None:
  """Runs `config.<stage>.evals` on the stage's final parameters; writes and returns eval.json's content."""
  settings = check(config, stage)
  if settings is None:
    return None
  wanted = tuple(config[stage].evals)
  fmt = prompts.prompt_format(config, stage)
  path = eval_path(workdir, stage)
  if os.path.exists(path) and not force:
    with open(path) as f:
      done = json.load(f)
    if set(done.get("evaluators", [])) == set(wanted) and done.get("prompt_format") == fmt:
      return done
  tokenizer = tokenizer if tokenizer is not None else inputs.tokenizer_for(config, workdir)
  context, params = _load_stage(config, stage, workdir, tokenizer)
  evaluation = _eval_context(config, stage, workdir, settings, fmt, tokenizer, context, params)
  results: dict[str, dict] = {}
  for name in dict.fromkeys(wanted):
    print(f"[{stage}] evaluating {name} ...", flush=True)
    for key, metric in get(name).run(evaluation).items():
      results[f"{name}/{key}"] = metric.to_json()
  out = {"stage": stage, "step": int(config[stage].steps), "evaluators": list(wanted), "prompt_format": fmt,
         "metrics": results}
  if jax.process_index() == 0:
    _write(out, path, os.path.join(workdir, stage, "tensorboard"))
  return out


def _load_stage(config, stage: str, workdir: str, tokenizer):
  """The stage's training context and final parameters (with its scalar head, if it has one)."""
  context = train.build_context(config, stage, tokenizer=tokenizer)
  head = context.stage.score_head
  params = workdir_lib.load_final_params(workdir, stage, context.abstract_lm_params(head),
                                         needed_by=f"evals of stage {stage!r}", with_head=head)
  if jax.process_count() > 1:
    # Every host evaluates a full copy on its own devices (identical results; process 0 writes them): sampling
    # and host-side scoring need whole arrays, which a mesh spanning hosts cannot hand to one process.
    host_params = multihost_utils.process_allgather(params, tiled=True)
    local = partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())
    context = train.build_context(config, stage, mesh=local, tokenizer=tokenizer)
    params = jax.device_put(host_params, {k: context.params_sharding[k] for k in host_params})
  return context, params


def _eval_context(config, stage: str, workdir: str, settings: EvalConfig, fmt: str, tokenizer, context,
                  params) -> EvalContext:
  """The score and sample functions of the stage's language model (and, for `stage_loss`, its whole model)."""
  lm_params, _ = split_head(params)
  sampler = Sampler(context.model_cfg, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, mesh=context.mesh,
                    rules=context.rules, mc_dropout=settings.mc_dropout)
  return EvalContext(
      stage=stage, settings=settings, seed=config.seed, seq_len=config[stage].seq_len,
      data_dir=inputs.data_dir(config), prompt_format=fmt, tokenizer=tokenizer, model_cfg=context.model_cfg,
      num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm_params)),
      next_token_stage=isinstance(context.stage, stages.NextTokenStage),
      generate=functools.partial(sampler.generate, lm_params),
      logprobs=functools.partial(_token_logprobs, context, lm_params),
      lm_loss=functools.partial(_lm_loss, stage, context, lm_params, tokenizer),
      stage_loss=functools.partial(_stage_loss, config, stage, workdir, tokenizer, context, params))


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logprobs(model, params, tokens_BxL):
  """log p(tokens[t + 1] | tokens[:t + 1]) under `model`, [B, L - 1]: evals' one call of `model.apply`."""
  logits_BxLxV = model.apply({"params": params}, tokens_BxL[:, :-1]).logits
  return losses.token_logprobs(logits_BxLxV, tokens_BxL[:, 1:])


def _token_logprobs(context, params, sequences, batch_size: int = 64) -> list[np.ndarray]:
  """log p(seq[t] | seq[:t]) for t = 1..len-1 of every sequence, deterministic (no dropout), in nats."""
  longest = max(len(s) for s in sequences)
  length = int(2 ** np.ceil(np.log2(max(longest, 8))))
  limit = context.model_cfg.max_seq_len
  if length > limit:
    raise ValueError(f"a scored sequence of {longest} tokens exceeds config.model.max_seq_len={limit}")
  out = []
  for lo in range(0, len(sequences), batch_size):
    rows = sequences[lo:lo + batch_size]
    tokens_BxL = np.zeros((batch_size, length), np.int32)
    for r, seq in enumerate(rows):
      tokens_BxL[r, :len(seq)] = seq
    with context.activate():
      logprobs_BxL = np.asarray(_next_token_logprobs(context.lm_model, params, tokens_BxL), np.float64)
    out.extend(logprobs_BxL[r, :len(seq) - 1] for r, seq in enumerate(rows))
  return out


@functools.partial(jax.jit, static_argnums=0)
def _next_token_loss(model, params, batch):
  """Next-token loss sums of `model` on a batch, no dropout (`stages.NextTokenStage`)."""
  loss_sum, count, metrics = stages.NextTokenStage().loss(model, params, batch, None, None, False)
  return {"loss_sum": loss_sum, "count": count, "m": metrics}


def _lm_loss(stage: str, context, params, tokenizer, mixture, max_batches: int) -> dict[str, float]:
  """The language model's next-token means on at most `max_batches` validation batches of `mixture` (None: the
  stage's own held-out mixture)."""
  batches = inputs.make_batches(context, tokenizer, split="validation", mixture=mixture)
  sums = []
  with context.activate():
    for _ in range(max_batches):
      local = next(batches, None)
      if local is None:
        break
      batch = inputs.TokenBatch.from_dict(partitioning.global_batch(local, context.mesh))
      out = jax.device_get(_next_token_loss(context.lm_model, params, batch))
      sums.append({"loss_sum": out["loss_sum"], "count": out["count"], **out["m"]})
  if not sums:
    raise ValueError(f"stage {stage!r}: the perplexity data gave no validation batches")
  return train.mean_metrics(sums, "eval")


def _stage_loss(config, stage: str, workdir: str, tokenizer, context, params) -> dict[str, float]:
  """The stage's own held-out metrics (`train.evaluate`), with its frozen models (reference, reward model).

  When the training loop evaluated at its last step (it does whenever `eval_every` > 0) under the same stage
  block, it scored the same held-out batches with the same final parameters: its figures (`final_eval.json`) are
  reused rather than computed twice (for GRPO, `eval_steps` more batches of rollouts). Single-process only: in a
  multi-host run only process 0 writes them, and every process must take the same path."""
  logged = workdir_lib.load_final_eval(workdir_lib.stage_dir(workdir, stage), config[stage].steps, config[stage])
  if logged is not None and jax.process_count() == 1:
    return logged
  if context.stage.frozen_models():
    context = train.load_frozen(context, workdir)
  with context.activate():
    return train.evaluate(context, context.jit_eval_step(), params, tokenizer)


def _write(out: dict, path: str, tensorboard_dir: str) -> None:
  """eval.json (atomically), the metrics as TensorBoard scalars `final/<key>`, and the headline printed."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  from tensorboardX import SummaryWriter  # Optional heavy dependency, only on the process that writes.
  results, stage = out["metrics"], out["stage"]
  with SummaryWriter(tensorboard_dir) as tb:
    for key, m in results.items():
      if np.isfinite(m["value"]):
        tb.add_scalar(f"final/{key}", m["value"], out["step"])
  lines = [f"  {k} = {v['value']:.4g} (n={v['n']})" for k, v in results.items()
           if any(h in k for h in HEADLINE) and "memorization/" not in k or k.endswith("mean_greedy")]
  print(f"[{stage}] wrote {len(results)} metrics to {path}; headline:\n" + "\n".join(lines), flush=True)
