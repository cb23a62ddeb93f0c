r"""Each regularizer alone, at one stage at a time: factual accuracy and bits/param against diversity.

  python -m llmstages.sweep --experiment=dropout_vs_facts --workdir=/tmp/sweeps/dropout_vs_facts --workers=2
  python -m llmstages.compare /tmp/sweeps/dropout_vs_facts --out=experiments/results/dropout_vs_facts.md

Base: configs/quickstart.py (pretrain, then CPT on new people) with every regularizer off, weight decay included,
so that each setting turns on exactly one thing: dropout at every site, each dropout site alone (embeddings,
attention probabilities, residual branches, MLP hidden), drop-path, NEFTune, label smoothing or weight decay, in
the pretrain stage or in the CPT stage only (the later stages of quickstart.py are left out). 1 + 2 x 9 = 19 settings
x 3 seeds = 57 runs; a quickstart pretrain + CPT took 5.7 minutes on the 2-core CPU, so about 6 hours with one
worker (not run yet). The question (RESEARCH.md):
does regularization cost stored facts (memorization exact match, capacity R) while buying diversity (EAD)? A claim
needs the paired-difference interval against `none` to exclude 0.

`:smoke` runs 2 settings x 2 seeds of the quickstart smoke model in seconds each (the tests use it).
"""

from llmstages import experiments as X

STAGES = ("pretrain", "cpt")
RATE = 0.1
# Setting name -> the stage's reg keys it sets (everything else stays off).
REGULARIZERS = {
    "dropout": {"reg.dropout": RATE},
    "embed_dropout": {"reg.embed_dropout": RATE},
    "attn_dropout": {"reg.attn_dropout": RATE},
    "residual_dropout": {"reg.residual_dropout": RATE},
    "mlp_dropout": {"reg.mlp_dropout": RATE},
    "drop_path": {"reg.drop_path": RATE},
    "neftune": {"reg.neftune_alpha": 5.0},
    "label_smoothing": {"reg.label_smoothing": RATE},
    "weight_decay": {"reg.weight_decay": RATE},
}

METRICS = (
    "bios_facts/memorization/mean_greedy",
    "capacity/R",
    "diversity/per_input/ead",
    "diversity/across_input/distinct_2",
    "diversity/per_input/self_bleu4",
    "perplexity/loss",
)
PARETO = ("diversity/per_input/ead", "bios_facts/memorization/mean_greedy")
BASELINE = "none"


def _opts(arg: str) -> set[str]:
  opts = set(filter(None, arg.split(",")))
  if opts - {"smoke"}:
    raise ValueError(f"experiments/dropout_vs_facts.py: unknown arg(s) {sorted(opts - {'smoke'})}; known: smoke")
  return opts


def get_config(arg: str = ""):
  smoke = "smoke" in _opts(arg)
  c = X.config_file("quickstart.py", "smoke" if smoke else "")
  c.stages = STAGES  # quickstart.py may run later stages too; this experiment is about these two.
  for stage in STAGES:
    c[stage].reg.weight_decay = 0.0  # The baseline has no regularization at all.
    c[stage].evals = ("perplexity", "bios_facts", "capacity", "diversity")  # What METRICS read.
  return c


def at_stage(stage: str, name: str) -> dict:
  return X.setting(f"{name}@{stage}", {f"{stage}.{k}": v for k, v in REGULARIZERS[name].items()})


def get_sweep(arg: str = ""):
  if "smoke" in _opts(arg):
    return X.product([X.setting("none"), at_stage("pretrain", "dropout")], X.seeds(2))
  settings = [X.setting("none")] + [at_stage(stage, name) for stage in STAGES for name in REGULARIZERS]
  return X.product(settings, X.seeds(3))
