"""The stage context: everything built from the config for one stage (models, mesh, optimizer, abstract sharded
state, the Stage), frozen once built. Tests, the benchmark, AOT compilation and the evaluators use it without
running the loop.

`build_context(config, name, mesh=None, *, tokenizer=None, frozen=None)` takes the tokenizer and the frozen
models (role -> parameters, see `Stage.frozen_models`) as arguments; `load_frozen(ctx, workdir)` returns the
context with its frozen models loaded. Nothing is set on a context after it is built; jitted helpers a stage
needs are the Stage's own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmstages import inputs, partitioning, seeds
from llmstages import lora as lora_lib
from llmstages import regularization as reg_lib
from llmstages import stages as stages_lib
from llmstages import workdir as workdir_lib
from llmstages.model import Decoder, ModelConfig, RegSites, init_params, split_head
from llmstages.train.step import TrainState, compiler_options, make_eval_step, make_lr_schedule, make_optimizer, \
    make_train_step

STAGE_KEYS_REQUIRED = ("steps", "batch_size", "seq_len", "learning_rate", "data", "init_from", "eval_every",
                       "checkpoint_every", "reg")


@dataclasses.dataclass(frozen=True, eq=False)
class StageContext:
  """Everything built from the config for one stage; immutable (use `dataclasses.replace` for a variant)."""
  name: str
  config: Any
  stage_config: Any  # config.<name>, the stage's ml_collections block.
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
  init_fn: Any = dataclasses.field(repr=False)  # Jitted (rng, params or None) -> TrainState in its shardings.
  merge_fn: Any = dataclasses.field(repr=False)  # With LoRA, jitted (base, adapters) -> merged params.
  given_tokenizer: Any = dataclasses.field(default=None, repr=False)
  frozen: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # role -> frozen parameters.

  @functools.cached_property
  def tokenizer(self):
    """The tokenizer given to `build_context`, else the pipeline's (`inputs.tokenizer_for`), built on first use
    (so compiling or inspecting shardings needs no data)."""
    return self.given_tokenizer if self.given_tokenizer is not None else inputs.tokenizer_for(self.config)

  @property
  def lora(self):
    """The stage's LoRA config block when LoRA is on, else None."""
    lora_config = self.stage_config.get("lora")
    return lora_config if lora_lib.enabled(lora_config) else None

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
    with self.activate():
      return self.merge_fn(state.base, state.params)

  def init_state(self, rng: jax.Array | None = None, params=None) -> TrainState:
    """A fresh state (new params unless given), created directly in its sharded layout. With LoRA, `params` (or
    a fresh init) becomes the frozen base and fresh adapters train."""
    rng = self.seed_key if rng is None else rng
    with self.activate():
      if params is not None:
        params = jax.device_put(params, {k: self.params_sharding[k] for k in params})
      return self.init_fn(rng, params)

  def activate(self):
    return partitioning.activate(self.mesh, self.rules)

  def data_shard(self) -> tuple[int, int]:
    """(index, count) of this process's share of each batch: all of it when the mesh is process-local."""
    if jax.process_count() > 1 and self.mesh.devices.size == jax.local_device_count():
      return 0, 1
    return jax.process_index(), jax.process_count()

  def step_values_at(self, step: int):
    """The regularization rates and loss coefficients of `step` (`regularization.rates_at`)."""
    return reg_lib.rates_at(self.stage_config.reg, step, self.stage_config.steps, self.model_cfg.num_layers)

  def weight_decay_mask(self):
    return reg_lib.weight_decay_mask(self.abstract_state.params, self.stage_config.reg, self.model_cfg.num_layers)

  def jit_train_step(self):
    step = make_train_step(self.stage, self.model, self.tx, self.lr_fn, self.weight_decay_mask(),
                           self.stage_config.grad_accum, self.seed_key, self.lora)
    batch_sharding = partitioning.batch_sharding(self.mesh)
    replicated = partitioning.replicated(self.mesh)
    return jax.jit(step, in_shardings=(self.state_sharding, batch_sharding, replicated),
                   out_shardings=(self.state_sharding, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options(self.mesh))

  def compile_train_step(self):
    """The train step compiled ahead of the loop for this stage's shapes (a bad config fails here, not at step 1)."""
    with self.activate():
      return self.jit_train_step().lower(self.abstract_state, self.abstract_batch(),
                                         self.abstract_step_values()).compile()

  def abstract_step_values(self):
    replicated = partitioning.replicated(self.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
                        self.step_values_at(0))

  def jit_eval_step(self):
    return jax.jit(make_eval_step(self.stage, self.eval_model),
                   in_shardings=(self.params_sharding, partitioning.batch_sharding(self.mesh)),
                   out_shardings=partitioning.replicated(self.mesh))

  def abstract_batch(self):
    return self.stage.abstract_batch(self)

  def token_batch_shapes(self, rows: int | None = None, local: bool = False) -> inputs.TokenBatch:
    """The five token arrays of a [rows, seq_len] batch (default: the stage's global batch)."""
    rows = (rows or self.stage_config.batch_size) // (jax.process_count() if local else 1)
    return inputs.token_batch_shapes(rows, self.stage_config.seq_len, partitioning.batch_sharding(self.mesh))

  def abstract_lm_params(self, with_head: bool = False):
    """Abstract parameters of the language model (plus a scalar head), on this stage's shardings."""
    lm, _ = split_head(self.abstract_params)
    return {**lm, **self.abstract_head} if with_head else lm


def load_frozen(ctx: StageContext, workdir: str) -> StageContext:
  """`ctx` with the frozen models of `Stage.frozen_models` loaded from `workdir`."""
  frozen = {}
  for role, (source, with_head) in ctx.stage.frozen_models().items():
    frozen[role] = workdir_lib.load_final_params(workdir, source, ctx.abstract_lm_params(with_head),
                                                 needed_by=f"stage {ctx.name}'s {role} model (stage {source!r})",
                                                 with_head=with_head)
  return dataclasses.replace(ctx, frozen=frozen)


def validate_stage_config(config, name: str) -> None:
  if name not in config:
    raise ValueError(f"config.stages names {name!r} but there is no config.{name} block")
  stage_config = config[name]
  missing = [k for k in STAGE_KEYS_REQUIRED if k not in stage_config]
  if missing:
    raise ValueError(f"config.{name} lacks keys {missing}")
  where = f"config.{name}"
  for key in ("steps", "batch_size", "seq_len"):
    if stage_config[key] <= 0:
      raise ValueError(f"{where}.{key} must be positive, got {stage_config[key]}")
  if stage_config.batch_size % stage_config.grad_accum:
    raise ValueError(f"{where}.batch_size={stage_config.batch_size} must divide by "
                     f"grad_accum={stage_config.grad_accum}")
  if stage_config.seq_len > config.model.max_seq_len:
    raise ValueError(f"{where}.seq_len={stage_config.seq_len} exceeds "
                     f"config.model.max_seq_len={config.model.max_seq_len}")
  if not 0.0 <= stage_config.replay < 1.0:
    raise ValueError(f"{where}.replay must be in [0, 1), got {stage_config.replay}")
  if stage_config.replay > 0 and not stage_config.init_from:
    raise ValueError(f"{where}.replay needs init_from (the stage whose data is replayed)")
  reg_lib.validate(stage_config.reg, where)
  if "lora" in stage_config:
    lora_lib.validate(stage_config.lora, where)


def _abstract_state(model, tx, lora_config, name: str, mesh, rules, seed_key):
  """(abstract state, its shardings, abstract scalar head) on `mesh`, from the parameters' logical axis names."""
  def abstract_init(rng):
    params = model.init({"params": rng}, jnp.zeros((1, 8), jnp.int32))["params"]
    step = jnp.zeros((), jnp.int32)
    if lora_config is not None:
      adapters = lora_lib.box_like(lora_lib.init(nn.unbox(params), lora_config, rng, f"config.{name}"), params)
      return TrainState(step=step, params=adapters, opt_state=tx.init(adapters), base=params)
    return TrainState(step=step, params=params, opt_state=tx.init(params))  # Boxed: moments inherit axis names.

  with partitioning.activate(mesh, rules):
    boxed = jax.eval_shape(abstract_init, seed_key)
    state_sharding = partitioning.logical_to_sharding(boxed, mesh, rules)
    head_model = Decoder(model.cfg, RegSites(), score_head=True)
    boxed_head = jax.eval_shape(lambda r: split_head(head_model.init(
        {"params": r}, jnp.zeros((1, 8), jnp.int32))["params"])[1], seed_key)
    head_sharding = partitioning.logical_to_sharding(boxed_head, mesh, rules)
  shaped = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = jax.tree.map(shaped, nn.unbox(boxed), state_sharding)
  abstract_head = jax.tree.map(shaped, nn.unbox(boxed_head), head_sharding)
  return abstract_state, state_sharding, abstract_head


def _init_fn(model, tx, lora_config, name: str, param_names: frozenset, state_sharding):
  """Jitted (rng, params or None) -> TrainState: fresh parameters where none (or not all) are given."""
  def init(rng, params):
    if params is None or set(params) != param_names:
      # Missing entries (a new scalar head on a language model) start fresh.
      params = {**init_params(model, rng), **(params or {})}
    step = jnp.zeros((), jnp.int32)
    if lora_config is not None:
      adapters = lora_lib.init(params, lora_config, jax.random.fold_in(rng, 1), f"config.{name}")
      return TrainState(step=step, params=adapters, opt_state=tx.init(adapters), base=params)
    return TrainState(step=step, params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=state_sharding)


def build_context(config, name: str, mesh=None, *, tokenizer=None, frozen=None) -> StageContext:
  """The context of stage `name`: its typed Stage (config checked), models, mesh, optimizer and abstract state.
  `tokenizer` defaults to the pipeline's (built on first use); `frozen` maps roles to loaded frozen parameters."""
  validate_stage_config(config, name)
  stage_config = config[name]
  model_cfg = ModelConfig.from_config(config.model)
  stage = stages_lib.get(stage_config.get("kind") or name, stage_config, f"config.{name}")
  mesh = mesh if mesh is not None else partitioning.make_mesh(config.mesh)
  rules = partitioning.rules_from_config(config.mesh.rules)
  partitioning.check_batch_divisible(stage_config.batch_size // stage_config.grad_accum, mesh,
                                     f"config.{name}.batch_size")
  model = Decoder(model_cfg, reg_lib.sites(stage_config.reg), score_head=stage.score_head)
  tx = make_optimizer(stage_config)
  seed_key = seeds.stage_key(config.seed, name)
  lora_config = stage_config.get("lora") if lora_lib.enabled(stage_config.get("lora")) else None
  abstract_state, state_sharding, abstract_head = _abstract_state(model, tx, lora_config, name, mesh, rules,
                                                                  seed_key)
  param_names = frozenset(abstract_state.base if lora_config is not None else abstract_state.params)
  merge_fn = None
  if lora_config is not None:
    merge_fn = jax.jit(lambda base, adapters: lora_lib.merge(base, adapters, lora_config),
                       in_shardings=(state_sharding.base, state_sharding.params), out_shardings=state_sharding.base)
  return StageContext(
      name=name, config=config, stage_config=stage_config, model_cfg=model_cfg, model=model,
      eval_model=Decoder(model_cfg, RegSites(), score_head=stage.score_head), lm_model=Decoder(model_cfg, RegSites()),
      stage=stage, mesh=mesh, rules=rules, tx=tx, lr_fn=make_lr_schedule(stage_config), state_sharding=state_sharding,
      abstract_state=abstract_state, seed_key=seed_key, abstract_head=abstract_head,
      init_fn=_init_fn(model, tx, lora_config, name, param_names, state_sharding), merge_fn=merge_fn,
      given_tokenizer=tokenizer, frozen=dict(frozen or {}))
