"""The train and eval steps every stage shares: state, optimizer and schedule, exact gradient accumulation,
decoupled weight decay, and the XLA options the step compiles with.

A stage supplies only `loss(model, params, batch, step_values, rng, train) -> (sum, count, metric sums)`:
- the optimizer (optax) gives the update direction; the learning rate and decoupled, masked weight decay are
  applied here, so the decay's strength is a traced value (`step_values['loss']['weight_decay']`),
- micro-batch sums and counts are added, the mean is taken once, so grad_accum is exact,
- the per-step RNG is `fold_in(stage key, step)`, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from llmstages import lora as lora_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # What trains: the model's parameters, or with LoRA only the adapters (see `llmstages.lora`).
  opt_state: Any
  base: Any = None  # With LoRA, the frozen parameters the adapters modify; passed through every step unchanged.


def make_lr_schedule(stage_config) -> optax.Schedule:
  peak, warmup, steps = stage_config.learning_rate, stage_config.warmup_steps, stage_config.steps
  decay_steps = max(steps - warmup, 1)
  end = peak * stage_config.min_lr_ratio
  if stage_config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=stage_config.min_lr_ratio)
  elif stage_config.lr_schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif stage_config.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"lr_schedule: {stage_config.lr_schedule!r} is not one of cosine, linear, constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(stage_config) -> optax.GradientTransformation:
  """The update direction (before learning rate and weight decay, which the step applies)."""
  parts = []
  if stage_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(stage_config.grad_clip))
  if stage_config.optimizer == "adamw":
    parts.append(optax.scale_by_adam(b1=stage_config.b1, b2=stage_config.b2, eps=stage_config.eps))
  elif stage_config.optimizer == "lion":
    parts.append(optax.scale_by_lion(b1=stage_config.b1, b2=stage_config.b2))
  elif stage_config.optimizer == "sgd":
    parts.append(optax.trace(decay=stage_config.b1))
  else:
    raise ValueError(f"optimizer: {stage_config.optimizer!r} is not one of adamw, lion, sgd")
  return optax.chain(*parts)


def split_microbatches(batch, grad_accum: int):
  """[B, ...] -> [A, B/A, ...] on every leaf, taking every A-th row so each micro-batch spans all batch shards."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // grad_accum, grad_accum) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(stage, model, tx, lr_fn, wd_mask, grad_accum: int, seed_key: jax.Array,
                    lora_config=None) -> Callable:
  """(state, batch, step_values) -> (state, metric sums). `step_values` holds the traced regularization values
  of this step (`regularization.rates_at`).

  With `lora_config` (a stage's lora block), `state.params` are adapters merged into the frozen `state.base`
  inside the differentiated function, so only they get gradients."""

  def loss_and_grad(params, micro, step_values, rng, base):
    def f(p):
      if lora_config is not None:  # A separate stream for rank dropout, so the model's dropout masks do not change.
        p = lora_lib.merge(base, p, lora_config, jax.random.fold_in(rng, 0x10AA))
      loss_sum, count, metrics = stage.loss(model, p, micro, step_values, rng, True)
      return loss_sum, (count, metrics)
    (loss_sum, (count, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss_sum, count, metrics, grads

  def accumulate(state: TrainState, batch, step_values, rng):
    """(loss sum, count, metric sums, gradient sum) over the batch, micro-batch by micro-batch."""
    if grad_accum == 1:
      return loss_and_grad(state.params, batch, step_values, rng, state.base)
    micro = split_microbatches(batch, grad_accum)

    def body(carry, xs):
      i, mb = xs
      out = loss_and_grad(state.params, mb, step_values, jax.random.fold_in(rng, i), state.base)
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.eval_shape(lambda: loss_and_grad(state.params, jax.tree.map(lambda x: x[0], micro), step_values,
                                                 rng, state.base))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    out, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    return out

  def train_step(state: TrainState, batch, step_values):
    rng = jax.random.fold_in(seed_key, state.step)
    loss_sum, count, metrics, grad_sum = accumulate(state, batch, step_values, rng)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    grad_norm = optax.tree.norm(grads)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = lr_fn(state.step)
    wd = step_values["loss"]["weight_decay"]
    params = jax.tree.map(lambda p, u, m: p - lr * (u + wd * m * p), state.params, direction, wd_mask)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, base=state.base)
    out = {"loss_sum": loss_sum, "count": count, **metrics, "grad_norm": grad_norm, "lr": lr}
    return new_state, out

  return train_step


def compiler_options(mesh) -> dict[str, str]:
  """XLA flags for the train step on this mesh's platform.

  On CPU, f32 dots go to YNNPACK by default (jaxlib 0.10.2); XLA's own (Eigen) dot emitter made the bench train
  step 5-10% faster on the 2-core Xeon (measured side by side, 2026-12-01), so the step compiles with it.
  Other platforms take XLA's defaults (the flag does not exist there).
  """
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_cpu_experimental_ynn_fusion_type": ""}
  return {}


def make_eval_step(stage, model) -> Callable:
  def eval_step(params, batch):
    loss_sum, count, metrics = stage.loss(model, params, batch, None, None, False)
    return {"loss_sum": loss_sum, "count": count, **metrics}
  return eval_step


def memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return "memory estimate unavailable on this backend"
  if m is None:
    return "memory estimate unavailable on this backend"
  mib = lambda b: b / 2**20
  return (f"arguments {mib(m.argument_size_in_bytes):.1f} MiB, outputs {mib(m.output_size_in_bytes):.1f} MiB, "
          f"temporaries {mib(m.temp_size_in_bytes):.1f} MiB, code {mib(m.generated_code_size_in_bytes):.1f} MiB "
          f"(per device)")
