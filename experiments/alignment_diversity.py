r"""Alignment and diversity: story diversity, maj@k and pass@k after SFT, DPO or PPO, and GRPO.

  python -m llmstages.sweep --experiment=alignment_diversity --workdir=/tmp/sweeps/alignment_diversity
  python -m llmstages.compare /tmp/sweeps/alignment_diversity --out=experiments/results/alignment_diversity.md

Base: configs/quickstart.py with 50 people (`people=50`, 300 pretraining steps), without CPT. Two routes share
pretrain -> sft -> instruct -> reward and differ in the preference stage: 'dpo' (DPO, then GRPO from it) and 'ppo'
(PPO-RLHF against the reward model, then GRPO from it). sft, the preference stage and grpo are evaluated; the
stage-trajectory plot of `compare` shows each metric after each of them. Expected (docs/RESEARCH.md): RL and DPO lower
per-input diversity (Kirk et al. 2024); RL raises maj@k more than pass@k (DeepSeekMath); the base model can win at
large k (Yue et al. 2025). 2 routes x 5 seeds = 10 runs of six stages, about 8 worker-minutes each on the 2-core CPU
(the shipped report ran 3 seeds, before the default became 5).

`:smoke` runs both routes x 2 seeds of the quickstart smoke model.
"""

from configs import quickstart
from llmstages import experiments

METRICS = (
    "diversity/per_input/ead",
    "diversity/per_input/distinct_2",
    "diversity/per_input/self_bleu4",
    "arith/greedy",
    "arith/maj@4",
    "arith/pass@4",
    "bios_facts/qa_train/maj@4",
    "bios_facts/qa_train/pass@4",
)
PARETO = ("diversity/per_input/ead", "arith/maj@4")
BASELINE = "dpo"


def _smoke(arg: str) -> bool:
  opts = set(filter(None, arg.split(",")))
  if opts - {"smoke"}:
    raise ValueError(f"experiments/alignment_diversity.py: unknown arg(s) {sorted(opts - {'smoke'})}; known: smoke")
  return "smoke" in opts


PEOPLE = 50
PRETRAIN_STEPS = 300


def get_config(arg: str = ""):
  smoke = _smoke(arg)
  c = quickstart.get_config("smoke" if smoke else f"people={PEOPLE}")
  if not smoke:
    c.pretrain.steps = c.pretrain.eval_every = c.pretrain.checkpoint_every = PRETRAIN_STEPS
  c.sft.init_from = "pretrain"
  c.pretrain.evals = ()  # Shared by both routes; the trajectory starts at sft.
  c.instruct.evals = ()  # SFT -> preference stage -> GRPO is the trajectory asked about; saves CPU time.
  return c


def get_sweep(arg: str = ""):
  common = ("pretrain", "sft", "instruct", "reward")
  settings = [experiments.setting("dpo", {"stages": common + ("dpo", "grpo"), "grpo.init_from": "dpo"}),
              experiments.setting("ppo", {"stages": common + ("ppo", "grpo"), "grpo.init_from": "ppo"})]
  return experiments.product(settings, experiments.seeds(2 if _smoke(arg) else experiments.DEFAULT_SEEDS))
