"""The one training loop every stage shares: state, sharded step, accumulation, checkpoints, metrics, eval.

A stage (see `llmstages.stages`) supplies only `loss(model, params, batch, dyn, rng, train) -> (sum, count,
metric sums)`. Everything else lives here once:
- state and optimizer (optax; decoupled, masked weight decay applied here so its strength is a traced value),
- the step, `jax.jit` with in/out shardings and donated state, compiled before the loop (memory estimate printed),
- exact gradient accumulation: micro-batch sums and counts are added, the mean is taken once,
- per-step RNG by `fold_in(stage key, step)`, so a resumed run draws the same dropout masks,
- orbax checkpoints with the data-iterator position, a save on SIGTERM/SIGINT, NaN/Inf stop with the step named,
- held-out eval loss every `eval_every`, metrics to JSONL + TensorBoard, progress with ETA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmstages import checkpoint as ckpt_lib
from llmstages import lora as lora_lib
from llmstages import partitioning
from llmstages import regularization as reg_lib
from llmstages import seeds
from llmstages import stages as stages_lib
from llmstages.metrics import MetricsWriter, Progress
from llmstages.model import HEAD_PARAMS, Decoder, ModelConfig, RegSites

STAGE_KEYS_REQUIRED = ("steps", "batch_size", "seq_len", "learning_rate", "data", "init_from", "eval_every",
                       "checkpoint_every", "reg")


class TrainingError(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # What trains: the model's parameters, or with LoRA only the adapters (see `llmstages.lora`).
  opt_state: Any
  base: Any = None  # With LoRA, the frozen parameters the adapters modify; passed through every step unchanged.


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedules.

def make_lr_schedule(scfg) -> optax.Schedule:
  peak, warmup, steps = scfg.learning_rate, scfg.warmup_steps, scfg.steps
  decay_steps = max(steps - warmup, 1)
  end = peak * scfg.min_lr_ratio
  if scfg.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=scfg.min_lr_ratio)
  elif scfg.lr_schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif scfg.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"lr_schedule: {scfg.lr_schedule!r} is not one of cosine, linear, constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(scfg) -> optax.GradientTransformation:
  """The update direction (before learning rate and weight decay, which the step applies)."""
  parts = []
  if scfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(scfg.grad_clip))
  if scfg.optimizer == "adamw":
    parts.append(optax.scale_by_adam(b1=scfg.b1, b2=scfg.b2, eps=scfg.eps))
  elif scfg.optimizer == "lion":
    parts.append(optax.scale_by_lion(b1=scfg.b1, b2=scfg.b2))
  elif scfg.optimizer == "sgd":
    parts.append(optax.trace(decay=scfg.b1))
  else:
    raise ValueError(f"optimizer: {scfg.optimizer!r} is not one of adamw, lion, sgd")
  return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------------------------
# The step.

def split_microbatches(batch: dict[str, jax.Array], grad_accum: int) -> dict[str, jax.Array]:
  """[B, ...] -> [A, B/A, ...], taking every A-th row so each micro-batch spans all batch shards."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // grad_accum, grad_accum) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(stage, model, tx, lr_fn, wd_mask, grad_accum: int, seed_key: jax.Array, lora=None) -> Callable:
  """(state, batch, dyn) -> (state, metric sums). `dyn` holds the traced regularization values of this step.

  With `lora` (a stage's lora config block), `state.params` are adapters merged into the frozen `state.base`
  inside the differentiated function, so only they get gradients."""

  def loss_and_grad(params, micro, dyn, rng, base):
    def f(p):
      if lora is not None:  # A separate stream for rank dropout, so the model's own dropout masks do not change.
        p = lora_lib.merge(base, p, lora, jax.random.fold_in(rng, 0x10AA))
      loss_sum, count, metrics = stage.loss(model, p, micro, dyn, rng, True)
      return loss_sum, (count, metrics)
    (loss_sum, (count, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss_sum, count, metrics, grads

  def train_step(state: TrainState, batch, dyn):
    rng = jax.random.fold_in(seed_key, state.step)
    if grad_accum == 1:
      loss_sum, count, metrics, grad_sum = loss_and_grad(state.params, batch, dyn, rng, state.base)
    else:
      micro = split_microbatches(batch, grad_accum)

      def body(carry, xs):
        i, mb = xs
        out = loss_and_grad(state.params, mb, dyn, jax.random.fold_in(rng, i), state.base)
        return jax.tree.map(jnp.add, carry, out), None

      first = jax.eval_shape(lambda: loss_and_grad(state.params, jax.tree.map(lambda x: x[0], micro), dyn, rng,
                                                   state.base))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
      (loss_sum, count, metrics, grad_sum), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    grad_norm = optax.tree.norm(grads)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = lr_fn(state.step)
    wd = dyn["loss"]["weight_decay"]
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


# ---------------------------------------------------------------------------------------------------------------
# Stage setup.

@dataclasses.dataclass
class StageContext:
  """Everything built from the config for one stage; tests and the benchmark use it without running the loop."""
  name: str
  config: Any
  scfg: Any
  model_cfg: ModelConfig
  model: Decoder  # With this stage's regularization sites (and scalar head, if the stage has one).
  eval_model: Decoder  # The same without regularization: eval loss, log-prob passes.
  lm_model: Decoder  # The bare language model, no head, no regularization: sampling, reference models.
  stage: stages_lib.Stage
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  state_sharding: Any
  abstract_state: Any
  seed_key: jax.Array
  abstract_head: Any  # Abstract (sharded) parameters of a scalar head, for loading frozen reward models.
  tokenizer: Any = None  # Set by `run_stage`; stages that decode or score text need it.
  frozen: dict = dataclasses.field(default_factory=dict)  # role -> frozen parameters (see Stage.frozen_models).
  cache: dict = dataclasses.field(default_factory=dict, repr=False)  # Stage-owned jitted functions.
  _init_fns: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def lora(self):
    """The stage's LoRA config block when LoRA is on, else None."""
    lcfg = self.scfg.get("lora")
    return lcfg if lora_lib.enabled(lcfg) else None

  @property
  def abstract_params(self):
    """Abstract parameters of the whole model (with LoRA: the frozen base, not the adapters)."""
    return self.abstract_state.base if self.lora else self.abstract_state.params

  @property
  def params_sharding(self):
    return self.state_sharding.base if self.lora else self.state_sharding.params

  def full_params(self, state: TrainState):
    """The parameters the model runs with: `state.params`, or with LoRA the base with the adapters merged."""
    if not self.lora:
      return state.params
    if "merge" not in self._init_fns:
      self._init_fns["merge"] = jax.jit(lambda base, ad: lora_lib.merge(base, ad, self.lora),
                                        in_shardings=(self.state_sharding.base, self.state_sharding.params),
                                        out_shardings=self.state_sharding.base)
    with self.activate():
      return self._init_fns["merge"](state.base, state.params)

  def init_state(self, rng: jax.Array | None = None, params=None) -> TrainState:
    """A fresh state (new params unless given), created directly in its sharded layout. With LoRA, `params` (or
    a fresh init) becomes the frozen base and fresh adapters train."""
    rng = self.seed_key if rng is None else rng

    def init(rng, params):
      if params is None or set(params) != set(self.abstract_params):
        # Missing entries (a new scalar head on a language model) start fresh.
        params = {**_init_params(self.model, rng), **(params or {})}
      step = jnp.zeros((), jnp.int32)
      if self.lora:
        adapters = lora_lib.init(params, self.lora, jax.random.fold_in(rng, 1), f"config.{self.name}")
        return TrainState(step=step, params=adapters, opt_state=self.tx.init(adapters), base=params)
      return TrainState(step=step, params=params, opt_state=self.tx.init(params))

    key = "fresh" if params is None else ("given",) + tuple(sorted(params))
    if key not in self._init_fns:
      if params is None:
        self._init_fns[key] = jax.jit(lambda r, _: init(r, None), out_shardings=self.state_sharding)
      else:
        given = {k: self.params_sharding[k] for k in params}
        self._init_fns[key] = jax.jit(init, in_shardings=(None, given), out_shardings=self.state_sharding)
    with self.activate():
      return self._init_fns[key](rng, params)

  def activate(self):
    return partitioning.activate(self.mesh, self.rules)

  def data_shard(self) -> tuple[int, int]:
    """(index, count) of this process's share of each batch: all of it when the mesh is process-local."""
    if jax.process_count() > 1 and self.mesh.devices.size == jax.local_device_count():
      return 0, 1
    return jax.process_index(), jax.process_count()

  def dyn_at(self, step: int):
    return reg_lib.rates_at(self.scfg.reg, step, self.scfg.steps, self.model_cfg.num_layers)

  def weight_decay_mask(self):
    return reg_lib.weight_decay_mask(self.abstract_state.params, self.scfg.reg, self.model_cfg.num_layers)

  def jit_train_step(self):
    step = make_train_step(self.stage, self.model, self.tx, self.lr_fn, self.weight_decay_mask(),
                           self.scfg.grad_accum, self.seed_key, self.lora)
    batch_sh = partitioning.batch_sharding(self.mesh)
    rep = partitioning.replicated(self.mesh)
    return jax.jit(step, in_shardings=(self.state_sharding, batch_sh, rep), out_shardings=(self.state_sharding, rep),
                   donate_argnums=(0,), compiler_options=compiler_options(self.mesh))

  def compile_train_step(self):
    """The train step compiled ahead of the loop for this stage's shapes (a bad config fails here, not at step 1)."""
    with self.activate():
      return self.jit_train_step().lower(self.abstract_state, self.abstract_batch(), _abstract_dyn(self)).compile()

  def jit_eval_step(self):
    return jax.jit(make_eval_step(self.stage, self.eval_model),
                   in_shardings=(self.params_sharding, partitioning.batch_sharding(self.mesh)),
                   out_shardings=partitioning.replicated(self.mesh))

  def abstract_batch(self):
    return self.stage.abstract_batch(self)

  def token_batch_shapes(self, rows: int | None = None, local: bool = False):
    """The five token arrays of a [rows, seq_len] batch (default: the stage's global batch)."""
    b = (rows or self.scfg.batch_size) // (jax.process_count() if local else 1)
    shape = (b, self.scfg.seq_len)
    sh = partitioning.batch_sharding(self.mesh)
    types = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
             "positions": jnp.int32}
    return {k: jax.ShapeDtypeStruct(shape, t, sharding=sh) for k, t in types.items()}

  def abstract_lm_params(self, with_head: bool = False):
    """Abstract parameters of the language model (plus a scalar head), on this stage's shardings."""
    lm = {k: v for k, v in self.abstract_params.items() if k not in HEAD_PARAMS}
    return {**lm, **self.abstract_head} if with_head else lm

  def load_frozen(self, workdir: str) -> dict:
    """Loads the frozen models of `Stage.frozen_models` (once per stage run)."""
    self.frozen = {}
    for role, (source, with_head) in self.stage.frozen_models(self.scfg).items():
      self.frozen[role] = load_final_params(workdir, source, self.abstract_lm_params(with_head),
                                            needed_by=f"stage {self.name}'s {role} model (stage {source!r})",
                                            with_head=with_head)
    return self.frozen


def _init_params(model, rng):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(model.init({"params": rng}, tokens))["params"]


def validate_stage_config(config, name: str) -> None:
  if name not in config:
    raise ValueError(f"config.stages names {name!r} but there is no config.{name} block")
  scfg = config[name]
  missing = [k for k in STAGE_KEYS_REQUIRED if k not in scfg]
  if missing:
    raise ValueError(f"config.{name} lacks keys {missing}")
  where = f"config.{name}"
  for key in ("steps", "batch_size", "seq_len"):
    if scfg[key] <= 0:
      raise ValueError(f"{where}.{key} must be positive, got {scfg[key]}")
  if scfg.batch_size % scfg.grad_accum:
    raise ValueError(f"{where}.batch_size={scfg.batch_size} must divide by grad_accum={scfg.grad_accum}")
  if scfg.seq_len > config.model.max_seq_len:
    raise ValueError(f"{where}.seq_len={scfg.seq_len} exceeds config.model.max_seq_len={config.model.max_seq_len}")
  if not 0.0 <= scfg.replay < 1.0:
    raise ValueError(f"{where}.replay must be in [0, 1), got {scfg.replay}")
  if scfg.replay > 0 and not scfg.init_from:
    raise ValueError(f"{where}.replay needs init_from (the stage whose data is replayed)")
  reg_lib.validate(scfg.reg, where)
  if "lora" in scfg:
    lora_lib.validate(scfg.lora, where)


def build_context(config, name: str, mesh=None) -> StageContext:
  validate_stage_config(config, name)
  scfg = config[name]
  mc = ModelConfig.from_config(config.model)
  stage = stages_lib.get(scfg.get("kind") or name, scfg, f"config.{name}")
  mesh = mesh if mesh is not None else partitioning.make_mesh(config.mesh)
  rules = partitioning.rules_from_config(config.mesh.rules)
  partitioning.check_batch_divisible(scfg.batch_size // scfg.grad_accum, mesh, f"config.{name}.batch_size")
  model = Decoder(mc, reg_lib.sites(scfg.reg), score_head=stage.score_head)
  eval_model = Decoder(mc, RegSites(), score_head=stage.score_head)
  lm_model = Decoder(mc, RegSites())
  tx = make_optimizer(scfg)
  lr_fn = make_lr_schedule(scfg)
  seed_key = seeds.stage_key(config.seed, name)

  lcfg = scfg.get("lora") if lora_lib.enabled(scfg.get("lora")) else None

  def abstract_init(rng):
    params = model.init({"params": rng}, jnp.zeros((1, 8), jnp.int32))["params"]
    step = jnp.zeros((), jnp.int32)
    if lcfg is not None:
      adapters = lora_lib.box_like(lora_lib.init(nn.unbox(params), lcfg, rng, f"config.{name}"), params)
      return TrainState(step=step, params=adapters, opt_state=tx.init(adapters), base=params)
    return TrainState(step=step, params=params, opt_state=tx.init(params))  # Boxed: moments inherit axis names.

  with partitioning.activate(mesh, rules):
    boxed = jax.eval_shape(abstract_init, seed_key)
    state_sharding = partitioning.logical_to_sharding(boxed, mesh, rules)
    head_model = Decoder(mc, RegSites(), score_head=True)
    boxed_head = jax.eval_shape(lambda r: {k: v for k, v in head_model.init(
        {"params": r}, jnp.zeros((1, 8), jnp.int32))["params"].items() if k in HEAD_PARAMS}, seed_key)
    head_sharding = partitioning.logical_to_sharding(boxed_head, mesh, rules)
  shaped = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = jax.tree.map(shaped, nn.unbox(boxed), state_sharding)
  abstract_head = jax.tree.map(shaped, nn.unbox(boxed_head), head_sharding)
  return StageContext(name=name, config=config, scfg=scfg, model_cfg=mc, model=model, eval_model=eval_model,
                      lm_model=lm_model, stage=stage, mesh=mesh, rules=rules, tx=tx, lr_fn=lr_fn,
                      state_sharding=state_sharding, abstract_state=abstract_state, seed_key=seed_key,
                      abstract_head=abstract_head)


# ---------------------------------------------------------------------------------------------------------------
# Final parameters of a stage: what `init_from` and the evaluators load.

def final_params_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final_params")


def final_head_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final_head")


def final_marker(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final.json")


def stage_finished(workdir: str, stage: str) -> bool:
  return os.path.exists(final_marker(workdir, stage))


def save_final_params(workdir: str, stage: str, params, step: int) -> None:
  """Saves the language model to `final_params` and a scalar head, if any, apart in `final_head`, so every later
  stage and evaluator loads a plain language model."""
  import orbax.checkpoint as ocp
  path = final_params_dir(workdir, stage)
  lm = {k: v for k, v in params.items() if k not in HEAD_PARAMS}
  head = {k: v for k, v in params.items() if k in HEAD_PARAMS}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), lm, force=True)
    if head:
      ckptr.save(os.path.abspath(final_head_dir(workdir, stage)), head, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(final_marker(workdir, stage), "w") as f:
      json.dump({"stage": stage, "step": int(step), "params": os.path.abspath(path)}, f)


def final_lora_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final_lora")


def save_final_lora(workdir: str, stage: str, adapters, lcfg) -> None:
  """A LoRA stage's adapters, apart from the base (`final_params` holds the merged model every later stage and
  evaluator reads), with lora.json naming the rank, alpha and the stage they adapt (for `hf export --peft`)."""
  import orbax.checkpoint as ocp
  path = final_lora_dir(workdir, stage)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(path, "adapters")), adapters, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, "lora.json"), "w") as f:
      json.dump({"rank": int(lcfg.rank), "alpha": float(lcfg.alpha), "dropout": float(lcfg.dropout),
                 "targets": list(lcfg.targets)}, f, indent=1)


def load_final_lora(workdir: str, stage: str, abstract_adapters):
  """(adapters, lora.json) of a LoRA stage, restored onto the shardings of `abstract_adapters`."""
  import orbax.checkpoint as ocp
  path = final_lora_dir(workdir, stage)
  if not os.path.exists(os.path.join(path, "lora.json")):
    raise FileNotFoundError(f"stage {stage!r} in {workdir} has no LoRA adapters ({path}/lora.json is missing): "
                            f"was it trained with {stage}.lora.rank > 0?")
  with open(os.path.join(path, "lora.json")) as f:
    meta = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(os.path.join(path, "adapters")), abstract_adapters), meta


def load_final_params(workdir: str, stage: str, abstract_params, needed_by: str = "", with_head: bool = False):
  """The final parameters of `stage` in `workdir`, restored onto the shardings of `abstract_params`.

  Head entries (model.HEAD_PARAMS) of `abstract_params` are restored from the stage's scalar head when
  `with_head`, and otherwise left out."""
  import orbax.checkpoint as ocp
  who = f"{needed_by}: " if needed_by else ""
  lm_abstract = {k: v for k, v in abstract_params.items() if k not in HEAD_PARAMS}
  head_abstract = {k: v for k, v in abstract_params.items() if k in HEAD_PARAMS}
  if with_head and not os.path.isdir(final_head_dir(workdir, stage)) and stage_finished(workdir, stage):
    raise FileNotFoundError(f"{who}stage {stage!r} in {workdir} has no scalar head ({final_head_dir(workdir, stage)}"
                            f" is missing): it must be a stage with a head, such as a reward model")
  if not stage_finished(workdir, stage):
    ckdir = os.path.join(workdir, stage, "checkpoints")
    hint = (f"stage {stage!r} has checkpoints in {ckdir} but did not finish; rerun it first"
            if os.path.isdir(ckdir) and os.listdir(ckdir) else f"run stage {stage!r} first")
    raise FileNotFoundError(f"{who}no final checkpoint of stage {stage!r} in {workdir} "
                            f"(expected {final_marker(workdir, stage)}); {hint}")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = dict(ckptr.restore(os.path.abspath(final_params_dir(workdir, stage)), lm_abstract))
      if with_head:
        params.update(ckptr.restore(os.path.abspath(final_head_dir(workdir, stage)), head_abstract))
      return params
  except Exception as e:
    raise ckpt_lib.CheckpointError(f"{who}cannot restore the final parameters of stage {stage!r} from "
                                   f"{final_params_dir(workdir, stage)}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# Data wiring.

def stage_mixture(config, name: str):
  from llmstages import data
  scfg = config[name]
  mixture = data.parse_mixture(scfg.data)
  if scfg.replay > 0:
    old = data.parse_mixture(config[scfg.init_from].data)
    new_total = sum(w for _, w in mixture)
    old_total = sum(w for _, w in old)
    mixture = ([(s, (1 - scfg.replay) * w / new_total) for s, w in mixture]
               + [(s, scfg.replay * w / old_total) for s, w in old])
  return mixture


def data_dir(config) -> str:
  return config.data.dir or os.environ.get("LLMSTAGES_DATA_DIR") or os.path.expanduser("~/.cache/llmstages/data")


def tokenizer_for(config):
  """The one tokenizer of a pipeline: an imported model's (`data.tokenizer`, a Hugging Face directory), or ours
  trained on every stage's sources (or `data.tokenizer_sources`)."""
  from llmstages import data
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
  tok = data.get_tokenizer(sources, config.model.vocab_size, data_dir(config))
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but config.model.vocab_size={config.model.vocab_size}")
  return tok


def report_local_data(ctx: StageContext, tokenizer) -> list[str]:
  """Prints what the stage's local files hold and the epochs its steps imply; refuses too-long examples
  (`<stage>.too_long`, see `llmstages.data.report`) before anything compiles or trains."""
  from llmstages.data import report
  scfg = ctx.scfg
  if not scfg.data:  # A stage that reads no data (an imported base) has nothing to report.
    return []
  _, lines = report.check_and_report(stage_mixture(ctx.config, ctx.name), tokenizer=tokenizer, seq_len=scfg.seq_len,
                                     batch_size=scfg.batch_size, steps=scfg.steps, pack=scfg.pack,
                                     data_dir=data_dir(ctx.config), too_long=scfg.get("too_long", "auto"),
                                     where=f"config.{ctx.name}")
  for line in lines:
    print(f"[{ctx.name}] data: {line}", flush=True)
  return lines


def make_batches(ctx: StageContext, tokenizer, split: str = "train", mixture=None):
  from llmstages import data
  scfg = ctx.scfg
  if mixture is None:
    mixture = stage_mixture(ctx.config, ctx.name)
    if split != "train" and scfg.eval_data:
      mixture = data.parse_mixture(scfg.eval_data)
  index, count = ctx.data_shard()
  return data.make_iterator(mixture, tokenizer=tokenizer, batch_size=scfg.batch_size, seq_len=scfg.seq_len,
                            seed=ctx.config.seed, split=split, data_dir=data_dir(ctx.config),
                            process_index=index, process_count=count,
                            pack=scfg.pack, cross_document_attention=scfg.cross_document_attention,
                            truncate=scfg.get("too_long", "auto") == "truncate")


# ---------------------------------------------------------------------------------------------------------------
# The loop.

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


def summarize(sums: list[dict[str, np.ndarray]], prefix: str, host: list[dict[str, float]] = ()) -> dict[str, float]:
  """Means of a window of steps: metric sums over summed counts (see `Stage`); `host` metrics (already means,
  one dict per step, e.g. rollout rewards) are averaged over steps."""
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
      out[f"{prefix}/{k}"] = float(np.mean(values))
  return out


def _memory_report(compiled) -> str:
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


def evaluate(ctx: StageContext, eval_fn, params, tokenizer) -> dict[str, float]:
  """The stage's own held-out metrics: its loss (and, for RL stages, rollout rewards) on `eval_steps` batches."""
  it = ctx.stage.batches(ctx, tokenizer, "validation")
  sums, host = [], []
  for i in range(ctx.scfg.eval_steps):
    local = _next_batch(ctx, it, "validation")
    if local is None:
      break
    batch, host_metrics = _prepare(ctx, params, local, i, "validation")
    sums.append(jax.device_get(eval_fn(params, batch)))
    host.append(host_metrics)
  if not sums:
    raise TrainingError(f"stage {ctx.name}: the validation split gave no batches")
  return summarize(sums, "eval", host)


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
  ctx = build_context(config, name, mesh)
  scfg = ctx.scfg
  stage_dir = os.path.join(workdir, name)
  os.makedirs(stage_dir, exist_ok=True)
  if stage_finished(workdir, name):
    print(f"[{name}] already finished ({final_marker(workdir, name)}); skipping", flush=True)
    return {"stage": name, "skipped": True}
  tokenizer = tokenizer if tokenizer is not None else tokenizer_for(config)
  ctx.tokenizer = tokenizer
  report_local_data(ctx, tokenizer)
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=scfg.keep_checkpoints)
  try:
    return _train(ctx, workdir, stage_dir, ckpt, tokenizer)
  finally:
    ckpt.close()


def _train(ctx: StageContext, workdir: str, stage_dir: str, ckpt: ckpt_lib.Checkpointer, tokenizer):
  name, scfg = ctx.name, ctx.scfg
  train_iter = ctx.stage.batches(ctx, tokenizer, "train")
  restored = ckpt.restore_latest(ctx.abstract_state)
  if restored is not None:
    start, state, meta = restored
    train_iter.set_state(meta["data"])
    print(f"[{name}] resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
  elif scfg.init_from:
    params = load_final_params(workdir, scfg.init_from, ctx.abstract_params,
                               needed_by=f"config.{name}.init_from={scfg.init_from!r}")
    state = ctx.init_state(params=params)
    start = 0
    print(f"[{name}] initialized from the final parameters of stage {scfg.init_from!r}", flush=True)
  else:
    state = ctx.init_state()
    start = 0

  ctx.load_frozen(workdir)
  eval_fn = ctx.jit_eval_step()
  t0 = time.time()
  compiled = ctx.compile_train_step()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ctx.abstract_params))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ctx.abstract_state.params))
  trained = f" ({n_train:,} trained: LoRA)" if ctx.lora else ""
  print(f"[{name}] compiled the train step in {time.time() - t0:.1f}s; {n_params:,} parameters{trained}; mesh "
        f"{dict(ctx.mesh.shape)}; {_memory_report(compiled)}", flush=True)

  writer = MetricsWriter(stage_dir, resume_step=start if restored is not None else None)
  progress = Progress(name, start, scfg.steps, ctx.config.progress)
  rep = partitioning.replicated(ctx.mesh)
  window, window_host, window_t0, window_tokens = [], [], time.time(), 0
  pending = None  # The previous step's metrics: checked while the current step runs.
  last_saved = start if restored is not None else None

  def check_finite(metrics, step):
    loss = float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0)
    if not math.isfinite(loss):
      kept = f"the last good checkpoint is step {last_saved} in {ckpt.directory}" if last_saved is not None else \
          "no checkpoint had been saved yet"
      raise TrainingError(f"stage {name}: loss is {loss} at step {step}; stopping ({kept}). Lower the learning rate, "
                          f"raise warmup, or check the data.")

  def save(step, state):
    nonlocal last_saved
    ckpt.save(step, state, {"data": train_iter.get_state(), "stage": name, "step": step}, force=True)
    last_saved = step

  try:
    with _StopRequested() as stop, ctx.activate():
      for step in range(start, scfg.steps):
        local = _next_batch(ctx, train_iter, "train")
        if local is None:
          raise TrainingError(f"stage {name}: the training data ran out at step {step}")
        batch, host_metrics = _prepare(ctx, ctx.full_params(state), local, step, "train")
        window_host.append(host_metrics)
        dyn = jax.device_put(ctx.dyn_at(step), rep)
        state, metrics = compiled(state, batch, dyn)
        window_tokens += scfg.batch_size * scfg.seq_len
        if pending is not None:
          check_finite(*pending)
        pending = (metrics, step)
        window.append(metrics)
        done = step + 1
        if done % scfg.log_every == 0 or done == scfg.steps:
          sums = jax.device_get(window)
          for i, m in enumerate(sums):
            check_finite(m, done - len(sums) + i)
          scalars = summarize(sums, "train", window_host)
          elapsed = time.time() - window_t0
          scalars["train/tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
          writer.write(done, scalars)
          progress.update(done, scalars)
          window, window_host, window_t0, window_tokens = [], [], time.time(), 0
        t_aside = time.time()  # Eval and saving are kept out of train/tokens_per_sec.
        if scfg.eval_every and (done % scfg.eval_every == 0 or done == scfg.steps):
          scalars = evaluate(ctx, eval_fn, ctx.full_params(state), tokenizer)
          writer.write(done, scalars)
          progress.update(done, scalars)
        if done % scfg.checkpoint_every == 0 or stop.signum is not None:
          check_finite(*pending)
          save(done, state)
        window_t0 += time.time() - t_aside
        if stop.signum is not None:
          ckpt.wait()
          msg = (f"[{name}] received signal {stop.signum} at step {done}; saved checkpoint step {done} in "
                 f"{ckpt.directory}. Rerun the same command to resume.")
          print(msg, flush=True)
          raise SystemExit(128 + stop.signum)
      if pending is not None:
        check_finite(*pending)
  finally:
    progress.close()
    writer.close()

  if last_saved != scfg.steps:
    save(scfg.steps, state)
  ckpt.wait()
  save_final_params(workdir, name, ctx.full_params(state), scfg.steps)
  if ctx.lora:
    save_final_lora(workdir, name, state.params, ctx.lora)
  print(f"[{name}] finished {scfg.steps} steps; final parameters in {final_params_dir(workdir, name)}", flush=True)
  return {"stage": name, "skipped": False, "steps": scfg.steps}


def _abstract_dyn(ctx: StageContext):
  rep = partitioning.replicated(ctx.mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep),
                      ctx.dyn_at(0))
