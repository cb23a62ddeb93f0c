"""The training loop every stage shares: resume or initialize, compile ahead, step, log, evaluate, checkpoint.

- the step is compiled before the loop (memory estimate printed), so a bad config fails before step 1,
- orbax checkpoints carry the data-iterator position; SIGTERM/SIGINT save before exiting; a NaN/Inf loss stops
  the run with the step named (checked one step late, while the next step runs),
- held-out eval every `eval_every` (`evaluate`), metrics to JSONL + TensorBoard, progress with ETA,
- the final parameters (and LoRA adapters) go to the workdir (`llmstages.workdir`) for later stages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from llmstages import checkpoint as ckpt_lib
from llmstages import inputs, partitioning
from llmstages import workdir as workdir_lib
from llmstages.train.context import StageContext, build_context, load_frozen
from llmstages.train.step import memory_report
from llmstages.train.writer import MetricsWriter, Progress


class TrainingError(RuntimeError):
  pass


class _StopRequested:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so it can save before exiting."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:  # Second signal: give up at once.
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def mean_metrics(sums: list[dict[str, np.ndarray]], prefix: str,
                 host: list[dict[str, float]] = ()) -> dict[str, float]:
  """Means of a window of steps: metric sums over summed counts (see `Stage`); `host` metrics (already means,
  one dict per step, e.g. rollout rewards) are averaged over steps, except `prompts` (an RL step's prompt count),
  which is summed: `<prefix>/prompts` is how many prompts the window's rollouts answered."""
  total = {k: float(sum(np.asarray(m[k], np.float64) for m in sums)) for k in sums[0]}
  count = max(total.pop("count"), 1.0)
  out = {f"{prefix}/loss": total.pop("loss_sum") / count}
  if "nll" in total:
    out[f"{prefix}/perplexity"] = math.exp(min(total["nll"] / count, 50.0))
  for k in ("grad_norm", "lr"):
    if k in total:
      out[f"{prefix}/{k}"] = total.pop(k) / len(sums)
  for k, v in total.items():
    out[f"{prefix}/{'accuracy' if k == 'correct' else k}"] = v / count
  out[f"{prefix}/tokens" if "nll" in total else f"{prefix}/count"] = count
  for k in sorted({k for h in host for k in h}):
    values = [h[k] for h in host if k in h and math.isfinite(h[k])]
    if values:
      out[f"{prefix}/{k}"] = float(np.sum(values) if k == "prompts" else np.mean(values))
  return out


def evaluate(ctx: StageContext, eval_fn, params, tokenizer=None) -> dict[str, float]:
  """The stage's own held-out metrics: its loss (and, for RL stages, rollout rewards) on `eval_steps` batches."""
  it = ctx.stage.batches(ctx, tokenizer if tokenizer is not None else ctx.tokenizer, "validation")
  sums, host = [], []
  for i in range(ctx.stage_config.eval_steps):
    local = _next_batch(ctx, it, "validation")
    if local is None:
      break
    batch, host_metrics = _prepare(ctx, params, local, i, "validation")
    sums.append(jax.device_get(eval_fn(params, batch)))
    host.append(host_metrics)
  if not sums:
    raise TrainingError(f"stage {ctx.name}: the validation split gave no batches")
  return mean_metrics(sums, "eval", host)


def _prepare(ctx: StageContext, params, local, step: int, split: str):
  try:
    return ctx.stage.prepare(ctx, params, local, step, split)
  except ValueError as e:
    raise TrainingError(f"stage {ctx.name}, step {step} ({split}): {e}") from e


def _next_batch(ctx: StageContext, it, split: str):
  """next(it), None at the end; a data error names the stage (the data layer names the source and record)."""
  try:
    return next(it)
  except StopIteration:
    return None
  except (ValueError, KeyError) as e:
    raise TrainingError(f"stage {ctx.name}: bad {split} data: {e}") from e


def run_stage(config, name: str, workdir: str, tokenizer=None, mesh=None) -> dict[str, Any]:
  """Trains stage `name` to `config.<name>.steps`, resuming from its latest checkpoint. Returns a summary."""
  ctx = build_context(config, name, mesh, tokenizer=tokenizer)
  stage_dir = workdir_lib.stage_dir(workdir, name)
  os.makedirs(stage_dir, exist_ok=True)
  if workdir_lib.stage_finished(workdir, name):
    print(f"[{name}] already finished ({workdir_lib.final_marker(workdir, name)}); skipping", flush=True)
    return {"stage": name, "skipped": True}
  if tokenizer is None:  # The workdir's own copy (`inputs.tokenizer_for`).
    ctx = dataclasses.replace(ctx, given_tokenizer=inputs.tokenizer_for(config, workdir))
  inputs.report_local_data(ctx, ctx.tokenizer)
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=ctx.stage_config.keep_checkpoints)
  try:
    return _train(ctx, workdir, stage_dir, ckpt)
  finally:
    ckpt.close()


def _initial_state(ctx: StageContext, workdir: str, ckpt: ckpt_lib.Checkpointer, train_iter):
  """(first step, state, whether it was resumed): the latest checkpoint, else `init_from`'s final parameters,
  else a fresh init."""
  name, stage_config = ctx.name, ctx.stage_config
  restored = ckpt.restore_latest(ctx.abstract_state)
  if restored is not None:
    start, state, meta = restored
    train_iter.set_state(meta["data"])
    print(f"[{name}] resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    return start, state, True
  if stage_config.init_from:
    params = workdir_lib.load_final_params(workdir, stage_config.init_from, ctx.abstract_params,
                                           needed_by=f"config.{name}.init_from={stage_config.init_from!r}")
    state = ctx.init_state(params=params)
    print(f"[{name}] initialized from the final parameters of stage {stage_config.init_from!r}", flush=True)
    return 0, state, False
  return 0, ctx.init_state(), False


def _compile(ctx: StageContext):
  t0 = time.time()
  compiled = ctx.compile_train_step()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ctx.abstract_params))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ctx.abstract_state.params))
  trained = f" ({n_train:,} trained: LoRA)" if ctx.lora else ""
  print(f"[{ctx.name}] compiled the train step in {time.time() - t0:.1f}s; {n_params:,} parameters{trained}; mesh "
        f"{dict(ctx.mesh.shape)}; {memory_report(compiled)}", flush=True)
  return compiled


def _train(ctx: StageContext, workdir: str, stage_dir: str, ckpt: ckpt_lib.Checkpointer):
  name, stage_config = ctx.name, ctx.stage_config
  train_iter = ctx.stage.batches(ctx, ctx.tokenizer, "train")
  start, state, resumed = _initial_state(ctx, workdir, ckpt, train_iter)
  ctx = load_frozen(ctx, workdir)
  eval_fn = ctx.jit_eval_step()
  compiled = _compile(ctx)
  loop = _Loop(ctx, stage_dir, ckpt, train_iter, start, resumed)
  state = loop.run(state, compiled, eval_fn)
  if loop.last_saved != stage_config.steps:
    loop.save(stage_config.steps, state)
  ckpt.wait()
  workdir_lib.save_final_params(workdir, name, ctx.full_params(state), stage_config.steps)
  if ctx.lora:
    workdir_lib.save_final_lora(workdir, name, state.params, ctx.lora)
  print(f"[{name}] finished {stage_config.steps} steps; final parameters in "
        f"{workdir_lib.final_params_dir(workdir, name)}", flush=True)
  return {"stage": name, "skipped": False, "steps": stage_config.steps}


class _Loop:
  """The steps from `start` to `stage_config.steps`, with their metric window, evaluation and checkpoints."""

  def __init__(self, ctx: StageContext, stage_dir: str, ckpt: ckpt_lib.Checkpointer, train_iter, start: int,
               resumed: bool):
    self.ctx, self.ckpt, self.train_iter, self.start, self.stage_dir = ctx, ckpt, train_iter, start, stage_dir
    self.name, self.stage_config = ctx.name, ctx.stage_config
    self.writer = MetricsWriter(stage_dir, resume_step=start if resumed else None)
    if start < self.stage_config.steps:
      workdir_lib.drop_final_eval(stage_dir)
    self.progress = Progress(self.name, start, self.stage_config.steps, ctx.config.progress)
    self.last_saved = start if resumed else None
    self._reset_window()

  def _reset_window(self):
    self.window, self.window_host, self.window_t0, self.window_tokens = [], [], time.time(), 0

  def check_finite(self, metrics, step: int) -> None:
    loss = float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0)
    if not math.isfinite(loss):
      kept = f"the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}" \
          if self.last_saved is not None else "no checkpoint had been saved yet"
      raise TrainingError(f"stage {self.name}: loss is {loss} at step {step}; stopping ({kept}). Lower the learning "
                          f"rate, raise warmup, or check the data.")

  def save(self, step: int, state) -> None:
    self.ckpt.save(step, state, {"data": self.train_iter.get_state(), "stage": self.name, "step": step}, force=True)
    self.last_saved = step

  def run(self, state, compiled, eval_fn):
    """Runs the steps; returns the final state. Raises SystemExit after saving when a signal asks to stop."""
    pending = None  # The previous step's metrics: checked while the current step runs.
    try:
      with _StopRequested() as stop, self.ctx.activate():
        for step in range(self.start, self.stage_config.steps):
          state, metrics = self._step(state, compiled, step)
          if pending is not None:
            self.check_finite(*pending)
          pending = (metrics, step)
          self.window.append(metrics)
          done = step + 1
          self._log_window(done)
          t_aside = time.time()  # Eval and saving are kept out of train/tokens_per_sec.
          self._evaluate_and_save(done, state, eval_fn, pending, stop.signum is not None)
          self.window_t0 += time.time() - t_aside
          if stop.signum is not None:
            self._exit_on_signal(stop.signum, done)
        if pending is not None:
          self.check_finite(*pending)
    finally:
      self.progress.close()
      self.writer.close()
    return state

  def _step(self, state, compiled, step: int):
    ctx = self.ctx
    local = _next_batch(ctx, self.train_iter, "train")
    if local is None:
      raise TrainingError(f"stage {self.name}: the training data ran out at step {step}")
    batch, host_metrics = _prepare(ctx, ctx.full_params(state), local, step, "train")
    self.window_host.append(host_metrics)
    step_values = jax.device_put(ctx.step_values_at(step), partitioning.replicated(ctx.mesh))
    state, metrics = compiled(state, batch, step_values)
    self.window_tokens += self.stage_config.batch_size * self.stage_config.seq_len
    return state, metrics

  def _log_window(self, done: int) -> None:
    if not (done % self.stage_config.log_every == 0 or done == self.stage_config.steps):
      return
    sums = jax.device_get(self.window)
    for i, m in enumerate(sums):
      self.check_finite(m, done - len(sums) + i)
    scalars = mean_metrics(sums, "train", self.window_host)
    elapsed = time.time() - self.window_t0
    scalars["train/tokens_per_sec"] = self.window_tokens / max(elapsed, 1e-9)
    self.writer.write(done, scalars)
    self.progress.update(done, scalars)
    self._reset_window()

  def _evaluate_and_save(self, done: int, state, eval_fn, pending, stopping: bool) -> None:
    stage_config = self.stage_config
    if stage_config.eval_every and (done % stage_config.eval_every == 0 or done == stage_config.steps):
      scalars = evaluate(self.ctx, eval_fn, self.ctx.full_params(state))
      self.writer.write(done, scalars)
      self.progress.update(done, scalars)
      if done == stage_config.steps:  # The `stage` evaluator reuses it rather than scoring the same batches again.
        workdir_lib.save_final_eval(self.stage_dir, done, stage_config, scalars)
    if done % stage_config.checkpoint_every == 0 or stopping:
      self.check_finite(*pending)
      self.save(done, state)

  def _exit_on_signal(self, signum: int, done: int) -> None:
    self.ckpt.wait()
    print(f"[{self.name}] received signal {signum} at step {done}; saved checkpoint step {done} in "
          f"{self.ckpt.directory}. Rerun the same command to resume.", flush=True)
    raise SystemExit(128 + signum)
