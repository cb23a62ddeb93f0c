r"""Knowledge capacity: bits per parameter against parameter count, at 100 and 1000 exposures, with and without dropout.

  python -m llmstages.sweep --experiment=capacity --workdir=/tmp/sweeps/capacity --workers=2
  python -m llmstages.compare /tmp/sweeps/capacity --out=experiments/results/capacity.md

Base: configs/capacity.py (pretrain only, on bios(n=2000, multi_permute)). Settings: model size xs / s / m
(35K / 76K / 131K parameters) x exposures 100 / 1000 x dropout 0 / 0.1, 3 seeds: 36 runs. Not run yet; budget
from PLATFORM.md's throughput figures: 100 exposures are 25M tokens (4-8 minutes a run), 1000 exposures 250M
tokens (40-80 minutes a run), about 14 hours in all with one worker; `:seeds=1` runs one seed first. Physics of
LMs 3.3 reports R >= 1 bit/param at 100 exposures and >= 2 at 1000 for 1M-0.5B parameters with dropout off; these
models are below that size range, and R_max (about 3.6 / 1.7 / 1.0 bits/param here) caps the larger ones.

`:smoke` runs sizes xs and s x dropout 0 / 0.1, one seed, 8 steps each: seconds a run (the tests' shape).
"""

from llmstages import experiments as X

METRICS = (
    "capacity/R",
    "capacity/R_nonembedding",
    "capacity/R_max",
    "capacity/params_counted",
    "bios_facts/memorization/mean_greedy",
    "perplexity/loss",
)
PARETO = ("capacity/params_counted", "capacity/R")
BASELINE = "s/E100/dropout0"


def _opts(arg: str) -> dict:
  opts = dict(o.partition("=")[::2] for o in filter(None, arg.split(",")))
  unknown = set(opts) - {"smoke", "seeds"}
  if unknown:
    raise ValueError(f"experiments/capacity.py: unknown arg(s) {sorted(unknown)}; known: smoke, seeds=N")
  return opts


def get_config(arg: str = ""):
  return X.config_file("capacity.py", "smoke" if "smoke" in _opts(arg) else "")


def get_sweep(arg: str = ""):
  opts = _opts(arg)
  cap = X.config_module("capacity.py")  # SIZES, steps_for_exposures
  base = get_config(arg)
  smoke = "smoke" in opts
  sizes = ("xs", "s") if smoke else tuple(cap.SIZES)
  exposures = (100,) if smoke else (100, 1000)
  n_seeds = int(opts.get("seeds") or (1 if smoke else 3))
  settings = []
  for size in sizes:
    for e in exposures:
      steps = 8 if smoke else cap.steps_for_exposures(e, cap.PEOPLE, base.pretrain.batch_size, base.pretrain.seq_len)
      for rate in (0.0, 0.1):
        settings.append(X.setting(f"{size}/E{e}/dropout{rate:g}", cap.model_overrides(size),
                                  **{"pretrain.steps": steps, "pretrain.reg.dropout": rate}))
  return X.product(settings, X.seeds(n_seeds))
