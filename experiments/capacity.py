r"""Knowledge capacity: bits per parameter against parameter count, at 100 and 1000 exposures, with and without dropout.

  python -m llmstages.sweep --experiment=capacity:cpu --workdir=/tmp/sweeps/capacity_cpu
  python -m llmstages.compare /tmp/sweeps/capacity_cpu --out=experiments/results/capacity.md

Base: configs/capacity.py (pretrain only, on bios(multi_permute)). No arg, the whole design: 2000 people, model
size xs / s / m (35K / 76K / 131K parameters) x exposures 100 / 1000 x dropout 0 / 0.1, 5 seeds: 60 runs; 100
exposures are 25M tokens (12-20 minutes a run on the 2-core CPU, measured 37K tokens/s for xs alone), 1000
exposures 250M tokens (2-3 hours a run): not run here. R_max is about 3.6 / 1.7 / 1.0 bits/param for these sizes.

`:cpu`, what experiments/results/capacity.md ran: 200 people (2.5M tokens for 100 exposures), sizes xxs / xs (14K /
35K parameters, R_max below 1 bit/param for both, so neither is saturated) x dropout 0 / 0.1 at 100 exposures, 5
seeds: 20 runs of about 2-3 worker-minutes (the shipped report ran 3 seeds, before the default became 5). `seeds=N`
sets the seed count. Physics of LMs 3.3 reports R >= 1 bit/param at 100 exposures and >= 2 at 1000 for 1M-0.5B
parameters with dropout off; these models are below that size range.

`:smoke` runs sizes xs and s x dropout 0 / 0.1, one seed, 8 steps each: seconds a run (the tests' shape).
"""

from configs import capacity as capacity_config
from llmstages import experiments

METRICS = (
    "capacity/R",
    "capacity/R_nonembedding",
    "capacity/R_max",
    "capacity/params_counted",
    "bios_facts/memorization/mean_greedy",
    "perplexity/loss",
)
PARETO = ("capacity/params_counted", "capacity/R")
BASELINE = "xs/E100/dropout0"


CPU_PEOPLE = 200


def _opts(arg: str) -> dict:
  return experiments.arg_options(arg, {"smoke", "cpu", "seeds"}, "experiments/capacity.py")


def get_config(arg: str = ""):
  opts = _opts(arg)
  return capacity_config.get_config("smoke" if "smoke" in opts else f"people={CPU_PEOPLE}" if "cpu" in opts
                                    else "")


def get_sweep(arg: str = ""):
  opts = _opts(arg)
  base = get_config(arg)
  smoke, cpu = "smoke" in opts, "cpu" in opts
  people = CPU_PEOPLE if cpu else 100 if smoke else capacity_config.PEOPLE
  sizes = ("xs", "s") if smoke else ("xxs", "xs") if cpu else ("xs", "s", "m")
  exposures = (100,) if smoke or cpu else (100, 1000)
  n_seeds = experiments.seed_count(opts, 1 if smoke else experiments.DEFAULT_SEEDS, "experiments/capacity.py")
  settings = []
  for size in sizes:
    for e in exposures:
      steps = 8 if smoke else capacity_config.steps_for_exposures(e, people, base.pretrain.batch_size,
                                                                  base.pretrain.seq_len)
      for rate in (0.0, 0.1):
        settings.append(experiments.setting(f"{size}/E{e}/dropout{rate:g}", capacity_config.model_overrides(size),
                                            **{"pretrain.steps": steps, "pretrain.reg.dropout": rate}))
  return experiments.product(settings, experiments.seeds(n_seeds))
