"""Config defaults shared by every config file in `configs/`.

A config file builds on `base_config()` and `stage_config(name)`, sets what it needs, and returns the config
locked (`finalize`), so a mistyped key or a value of the wrong type fails at once with a message naming it.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Logical axis -> mesh axes. MaxText-style names; one table decides every partitioning.
DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 8192
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = 0  # 0: d_model // num_heads.
  m.mlp_dim = 768
  m.max_seq_len = 2048
  m.dtype = "float32"  # Compute dtype; parameters stay float32.
  m.tie_embeddings = True
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.init_std = 0.02
  m.scan_layers = False
  m.remat = "none"  # none | full | dots (see model.REMAT_POLICIES).
  m.attention = "xla"  # xla (= manual: model.explicit_attention) | auto, cudnn: jax.nn.dot_product_attention.
  return m


def reg_config() -> ml_collections.ConfigDict:
  """Regularization for one stage. All off except weight decay, as in docs/RESEARCH.md."""
  r = ml_collections.ConfigDict()
  r.dropout = 0.0  # Default rate of every dropout site.
  # Per-site rates; None inherits `dropout`.
  r.embed_dropout = config_dict.placeholder(float)
  r.attn_dropout = config_dict.placeholder(float)
  r.residual_dropout = config_dict.placeholder(float)
  r.mlp_dropout = config_dict.placeholder(float)
  r.drop_path = 0.0  # Rate at the last layer; layer l (0-based) drops with drop_path * (l + 1) / num_layers.
  r.neftune_alpha = 0.0
  r.label_smoothing = 0.0
  r.z_loss = 0.0
  r.weight_decay = 0.1
  # Regexes over '/'-joined parameter paths that get no weight decay (norm scales and biases).
  r.no_decay = ("norm/scale$", "bias$")
  r.exempt_last_k_layers = 0  # The last k layers get no dropout, drop-path or weight decay.
  r.schedule = "constant"  # constant | early | late | linear (ramp down to 0) | linear_up (ramp up from 0).
  r.schedule_fraction = 0.5  # early: on for the first x of steps; late: on for the last x of steps.
  return r


def eval_config() -> ml_collections.ConfigDict:
  """Settings shared by the evaluators that stages list in `<stage>.evals`."""
  e = ml_collections.ConfigDict()
  e.bios = ""  # The pretraining bios spec, e.g. 'bios(n=1000,format=multi_permute)': its facts are scored.
  e.world = ""  # e.g. 'world'
  e.arith = ""  # e.g. 'arith_scratchpad' or 'arith'
  e.stories = ""  # e.g. 'stories(bios_n=1000)': the creative prompt set
  e.perplexity_data = ""  # Mixture scored by `perplexity` after every stage; '' = each stage's own eval mixture.
  e.perplexity_batches = 8  # Validation batches (of the stage's batch_size x seq_len) that `perplexity` scores.
  e.num_prompts = 64
  e.max_new_tokens = 16
  e.story_tokens = 64
  e.samples = 8  # k for maj@k and per-input diversity; pass@k uses these samples.
  e.pass_k = (1, 4, 8)
  e.temperature = 0.7
  e.mc_dropout = 0.0  # > 0: inference-time dropout while sampling.
  # How questions (QA, arithmetic, story requests) are posed: 'auto' wraps them in the chat template after a stage
  # that was tuned on it (instruct and every stage after it), 'always' / 'never' force chat / raw prompts.
  e.chat = "auto"
  # V of EAD (diversity): 0 = the story grammar's word vocabulary (`stories.word_vocabulary`), > 0 = this value.
  e.ead_vocab = 0
  e.shots = 0  # K > 0: factual and arithmetic evaluators also score each prompt after K solved training examples.
  return e


def dpo_config() -> ml_collections.ConfigDict:
  """Direct preference optimization (docs/RESEARCH.md): sigmoid DPO with label smoothing (cDPO), or IPO."""
  d = ml_collections.ConfigDict()
  d.beta = 0.1
  d.label_smoothing = 0.0  # cDPO's eps: the assumed share of flipped preference labels.
  d.loss = "sigmoid"  # sigmoid | ipo
  # IPO only: each side's log-ratio as its mean over completion tokens ('token_mean', as TRL does on the IPO
  # authors' advice) or its sum ('sum', the sequence log-prob of the paper's formula). Sigmoid DPO always sums.
  d.ipo_logps = "token_mean"
  d.reference = ""  # Stage whose final parameters are the frozen reference; '' = init_from.
  return d


def rl_config(kind: str) -> ml_collections.ConfigDict:
  """On-policy RL from rollouts of the KV-cache sampler: GRPO (verifiable rewards) or PPO (reward model)."""
  r = ml_collections.ConfigDict()
  r.num_generations = 4  # Samples per prompt (GRPO's group size G); batch_size counts sequences.
  r.max_new_tokens = 32
  r.temperature = 1.0  # > 0. Sampling, and the old, reference and policy log-probs (logits / temperature, as TRL).
  r.top_p = 1.0
  r.kl_coef = 0.04 if kind == "grpo" else 0.05  # GRPO: k3 in the loss; PPO: k1 per token in the reward.
  r.clip_eps = 0.2
  # GRPO: how per-token losses are averaged (TRL's loss_type). 'dapo' (default, TRL's current default): over every
  # completion token of the batch; 'grpo' (DeepSeekMath): per sequence, then over sequences; 'dr_grpo' (Dr. GRPO):
  # summed and divided by max_new_tokens x sequences, a constant. Exact under grad_accum for all three.
  r.loss_type = "dapo"
  r.updates_per_rollout = 1 if kind == "grpo" else 2  # Optimizer steps per rollout batch (PPO epochs).
  r.kinds = ()  # Prompt kinds kept (e.g. ('arith',)); () keeps all.
  r.reference = ""  # Frozen reference stage; '' = init_from.
  # GRPO: reward functions (llmstages.rewards); a sample's reward is the sum of those that apply to its prompt.
  r.rewards = ("arith", "facts", "story")
  r.std_eps = 1e-4
  # PPO: the reward model's stage, GAE and the value loss.
  r.reward_from = "reward"
  r.gamma = 1.0
  r.lam = 0.95
  r.vf_coef = 0.5
  r.value_clip = 0.2
  r.whiten_advantages = True
  return r


def lora_config() -> ml_collections.ConfigDict:
  """LoRA for one stage (llmstages.lora): rank 0 trains every parameter."""
  lc = ml_collections.ConfigDict()
  lc.rank = 0
  lc.alpha = 16.0  # Scale alpha / rank, as in PEFT.
  lc.dropout = 0.0  # Rank dropout: each step drops whole rank-1 components of every adapter with this rate.
  # Regexes over '/'-joined parameter paths; each match must be a projection kernel (q k v o gate up down lm_head).
  lc.targets = ("attn/(q|k|v|o)/kernel$", "mlp/(gate|up|down)/kernel$")
  return lc


def stage_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A stage block. `kind` (default: the name) picks the stage type, so a pipeline may run one type twice."""
  s = ml_collections.ConfigDict()
  s.kind = overrides.pop("kind", name)
  s.steps = 1000
  s.batch_size = 16  # Global batch (sequences).
  s.seq_len = 256
  s.grad_accum = 1  # Micro-batches per step; batch_size must divide by it.
  s.learning_rate = 1e-3
  s.lr_schedule = "cosine"  # cosine | linear | constant (after warmup).
  s.warmup_steps = 100
  s.min_lr_ratio = 0.1
  s.optimizer = "adamw"  # adamw | sgd (momentum 0.9) | lion. Weight decay is decoupled and applied by the loop.
  s.b1 = 0.9
  s.b2 = 0.95
  s.eps = 1e-8
  s.grad_clip = 1.0  # Global-norm clip; 0 disables.
  s.data = "bios"  # Mixture spec, see llmstages.data.parse_mixture.
  s.eval_data = ""  # Held-out mixture; '' uses `data` with split 'validation'.
  s.replay = 0.0  # Fraction of each batch drawn from the init_from stage's mixture (continued pretraining).
  s.pack = True
  s.too_long = "auto"  # Examples longer than seq_len: auto | error | truncate | chunk (llmstages.data.report).
  s.cross_document_attention = False
  s.init_from = ""  # '' (fresh init) or the name of an earlier stage whose final parameters start this one.
  s.log_every = 10
  s.eval_every = 100
  s.eval_steps = 4
  s.checkpoint_every = 200
  s.keep_checkpoints = 3
  s.reg = reg_config()
  s.lora = lora_config()
  s.evals = ()  # Evaluators run on the final parameters (see llmstages.evals): e.g. ('perplexity', 'capacity').
  if s.kind == "dpo":
    s.dpo = dpo_config()
  if s.kind in ("grpo", "ppo"):
    s.rl = rl_config(s.kind)
  for k, v in overrides.items():
    s[k] = v
  return s


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 takes all remaining devices.
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # '' -> $LLMSTAGES_DATA_DIR or ~/.cache/llmstages/data.
  c.data.tokenizer_sources = ""  # '' -> the union of every stage's `data`.
  c.data.tokenizer = ""  # A Hugging Face model directory whose tokenizer every stage uses ('' -> ours, trained).
  c.stages = ("pretrain",)
  c.eval = eval_config()
  c.progress = "auto"  # auto (bar on a terminal, log lines otherwise) | bar | log.
  return c


def parse_args(arg: str, known: set[str], where: str) -> tuple[set[str], dict[str, int]]:
  """'smoke,people=50' -> ({'smoke'}, {'people': 50}); unknown flags or keys fail naming `where`."""
  flags, values = set(), {}
  for opt in filter(None, arg.split(",")):
    key, eq, value = opt.partition("=")
    if eq and f"{key}=N" in known:
      try:
        values[key] = int(value)
      except ValueError:
        raise ValueError(f"{where}: {key}={value!r} is not an integer") from None
    elif not eq and key in known:
      flags.add(key)
    else:
      raise ValueError(f"{where}: unknown arg {opt!r}; known: {sorted(known)}")
  return flags, values


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c
