r"""Dropout against stored bits: capacity R (bits/param) at the dropout rates 0, 0.05, 0.1, 0.2, near saturation.

  python -m llmstages.sweep --experiment=dropout_bits:cpu --workdir=/tmp/sweeps/dropout_bits --workers=2
  python -m llmstages.compare /tmp/sweeps/dropout_bits --out=experiments/results/dropout_bits.md

No published paper measures this (issue #19's new question): Physics of LMs 3.3 reports about 2 bits/param at 1000
exposures and 1 at 100 with dropout off; Morris et al. 2025 about 3.6 for GPT-style models. Base: configs/capacity.py
(pretraining only, on bios(multi_permute)) at size `m` (d_model 64; 114K parameters counted), the smallest size whose
R measures storage on this corpus (the pilots of experiments/results/README.md: 10K and 26K parameters never learn
the name and value vocabularies, R < 0), on 4000 people, so that R_max (about 2.2 bits/param) stays above what 100
exposures can store: if R levels off below R_max, the model is full and R is its capacity. 100 exposures are 12,208
steps of 32 x 128 tokens (50M tokens); 1000 exposures would be ten times that and do not fit. 4 rates x 3 seeds =
12 runs (the design; `seeds=N` sets the seed count, 5 being the project default). On the 2-core CPU with two
workers a run without dropout takes 25-33 minutes and one with dropout 0.1 or 0.2 about 45-48 (alone: 31; three
workers: an hour): the design is some 4 hours of the machine, past the 3 an experiment may use. `:cpu` drops the
rate 0.05: 3 rates x 3 seeds, 9 runs, all run on 2026-12-03 (357 CPU-minutes; experiments/results/README.md).

`:smoke` runs rates 0 and 0.1 of the capacity smoke model, one seed, in seconds each (the tests' shape).
"""

from configs import capacity as capacity_config
from llmstages import experiments

PEOPLE = 4000
SIZE = "m"
EXPOSURES = 100
RATES = (0.0, 0.05, 0.1, 0.2)
SEEDS = 3
CPU_RATES = (0.0, 0.1, 0.2)

METRICS = (
    "capacity/R",
    "capacity/R_nonembedding",
    "capacity/R_max",
    "capacity/p1_nats",
    "capacity/p2_nats",
    "bios_facts/memorization/mean_greedy",
    "perplexity/loss",
)
PARETO = ("perplexity/loss", "capacity/R")
BASELINE = "dropout0"


def _opts(arg: str) -> dict:
  return experiments.arg_options(arg, {"smoke", "cpu", "seeds"}, "experiments/dropout_bits.py")


def get_config(arg: str = ""):
  if "smoke" in _opts(arg):
    return capacity_config.get_config("smoke")
  c = capacity_config.get_config(f"people={PEOPLE}")
  for key, value in capacity_config.model_overrides(SIZE).items():
    experiments.set_key(c, key, value)
  c.pretrain.steps = capacity_config.steps_for_exposures(EXPOSURES, PEOPLE, c.pretrain.batch_size,
                                                         c.pretrain.seq_len)
  return c


def get_sweep(arg: str = ""):
  opts = _opts(arg)
  smoke = "smoke" in opts
  rates = (0.0, 0.1) if smoke else CPU_RATES if "cpu" in opts else RATES
  n_seeds = experiments.seed_count(opts, 1 if smoke else SEEDS, "experiments/dropout_bits.py")
  settings = [experiments.setting(f"dropout{rate:g}", {"pretrain.reg.dropout": rate}) for rate in rates]
  return experiments.product(settings, experiments.seeds(n_seeds))
