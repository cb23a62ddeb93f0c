r"""Alignment and diversity: story diversity, maj@k and pass@k after SFT, DPO or PPO, and GRPO.

  python -m llmstages.sweep --experiment=alignment_diversity --workdir=/tmp/sweeps/alignment_diversity
  python -m llmstages.compare /tmp/sweeps/alignment_diversity --out=experiments/results/alignment_diversity.md

Base: the quickstart curriculum (configs/quickstart.py: 64 people, 500 pretraining steps of 8 x 256 tokens; sft,
instruct, a LoRA reward model, DPO or PPO and GRPO as sized there) without CPT. Two routes share
pretrain -> sft -> instruct -> reward and differ in the preference stage: 'dpo' (DPO, then GRPO from it) and 'ppo'
(PPO-RLHF against the reward model, then GRPO from it). Every policy stage is evaluated (pretrain, sft, instruct,
the preference stage, grpo; the reward model by its held-out pair accuracy), so the stage-trajectory plot of
`compare` shows diversity, arithmetic and facts from the base model to the end of post-training. Expected
(docs/RESEARCH.md): SFT costs most of the per-input diversity and DPO little (Karouzos et al. 2026); RL and DPO lower
per-input diversity (Kirk et al. 2024); RL raises maj@k more than pass@k (DeepSeekMath); the base model can win at
large k (Yue et al. 2025). 2 routes x 5 seeds = 10 runs of six stages, about 10 CPU-minutes each on the 2-core CPU
(measured: 102 CPU-minutes for the ten; under an hour with 2 workers on an otherwise idle machine).

With and without regularization: two more settings take the DPO route with dropout 0.1 (every site) or NEFTune
(alpha 5) in SFT and instruct, so `dpo_dropout` and `dpo_neftune` pair with `dpo` seed by seed (the same pretrained
model; from SFT on they differ). The question: does regularizing the supervised stages keep the diversity they
take? 2 x 5 = 10 more runs (measured: 127 CPU-minutes for the ten, beside other work). The run hashes are the
resolved configs, so a sweep directory that holds the first 10 runs only runs the new ones.

`:smoke` runs both routes x 2 seeds of the quickstart smoke model.
"""

from configs import quickstart
from llmstages import experiments

METRICS = (
    "diversity/per_input/ead",
    "diversity/per_input/distinct_2",
    "diversity/per_input/self_bleu4",
    "diversity/across_input/ead",
    "diversity/validity",
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


def get_config(arg: str = ""):
  smoke = _smoke(arg)
  c = quickstart.get_config("smoke" if smoke else "")
  c.sft.init_from = "pretrain"
  c.pretrain.evals = tuple(e for e in c.pretrain.evals if e != "capacity")  # Not a question here; ~1 min a run.
  return c


# The regularized arms: the DPO route with one regularizer on in the two supervised stages, where the diversity
# goes (Karouzos et al. 2026); everything else as in `dpo`, so each pairs with it seed by seed.
SUPERVISED = ("sft", "instruct")
REGULARIZERS = {"dropout": {"reg.dropout": 0.1}, "neftune": {"reg.neftune_alpha": 5.0}}


def get_sweep(arg: str = ""):
  common = ("pretrain", "sft", "instruct", "reward")
  dpo = {"stages": common + ("dpo", "grpo"), "grpo.init_from": "dpo"}
  settings = [experiments.setting("dpo", dpo),
              experiments.setting("ppo", {"stages": common + ("ppo", "grpo"), "grpo.init_from": "ppo"})]
  if not _smoke(arg):
    settings += [experiments.setting(f"dpo_{name}", dpo, **{f"{stage}.{k}": v for stage in SUPERVISED
                                                            for k, v in reg.items()})
                 for name, reg in REGULARIZERS.items()]
  return experiments.product(settings, experiments.seeds(2 if _smoke(arg) else experiments.DEFAULT_SEEDS))
