r"""Each regularizer alone, at one stage at a time: factual accuracy and bits/param against diversity.

  python -m llmstages.sweep --experiment=dropout_vs_facts:core --workdir=/tmp/sweeps/dropout_vs_facts_core
  python -m llmstages.compare /tmp/sweeps/dropout_vs_facts_core --out=experiments/results/dropout_vs_facts.md

Base: the quickstart curriculum (configs/quickstart.py: 64 people, 500 pretraining steps of 8 x 256 tokens mixing
biographies, QA of the QA-train half, scratchpad addition and stories; about 100 exposures per biography, enough
for the 0.9M-parameter model to memorize nearly every fact, so that a regularizer has something to cost) with every
regularizer off, weight decay included, so that each setting turns on exactly one thing.

No arg, the whole design: dropout at every site, each dropout site alone (embeddings, attention probabilities,
residual branches, MLP hidden), drop-path, NEFTune, label smoothing or weight decay, in the pretrain stage or in
the CPT stage (16 new people, 60 steps, half of each batch replayed) only: 1 + 2 x 9 = 19 settings x 5 seeds = 95
runs of pretrain + CPT, about 4-5 worker-minutes each on the 2-core CPU (some 3.5 hours with 2 workers).

`:core`, what experiments/results/dropout_vs_facts.md ran: pretraining only, and at it each family once: none,
dropout (every site), drop-path, NEFTune, label smoothing, weight decay: 6 settings x 5 seeds = 30 runs, about 3.6
CPU-minutes each (measured: 107 for the 30; under an hour with 2 workers on an otherwise idle machine). The question (docs/RESEARCH.md): does
regularization cost stored facts (memorization exact match, capacity R) while buying diversity (EAD)? A claim needs
the paired-difference interval against `none` to exclude 0.

`:sites`, each dropout site alone at pretraining (the full design's first cut): none, embed_dropout,
attn_dropout, residual_dropout, mlp_dropout: 5 settings x 5 seeds = 25 runs of pretraining only, the core's cost each
(measured: 93 CPU-minutes for the 25).

`:cpt`, the CPT-stage cut: pretrain + CPT with the regularizer in CPT only, each family once: none, dropout@cpt,
drop_path@cpt, neftune@cpt (NEFTune while fine-tuning on new documents, the like-for-like setting of Jain et al.
2024), label_smoothing@cpt, weight_decay@cpt: 6 settings x 5 seeds = 30 runs (measured: 63 CPU-minutes for none,
dropout and NEFTune, 66 for the other 15, run later in the same directory, which runs only the runs it lacks).
The question at CPT: does the regularizer cost the 16 new people's facts, or the 64 old ones'? Their score is not in
METRICS (pretraining cannot move it), so its report adds it:
`python -m llmstages.compare DIR --out=experiments/results/dropout_vs_facts_cpt.md
--metrics=bios_facts/new_people/mean_greedy`.

`:smoke` runs 2 settings x 2 seeds of the quickstart smoke model in seconds each (the tests use it).
"""

from configs import quickstart
from llmstages import experiments

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
CORE = ("dropout", "drop_path", "neftune", "label_smoothing", "weight_decay")  # One per family, for `:core`.
SITES = ("embed_dropout", "attn_dropout", "residual_dropout", "mlp_dropout")  # Each alone, for `:sites`.
AT_CPT = CORE  # For `:cpt`: each family once, in CPT only.

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


CUTS = {"core", "sites", "cpt"}
ARGS = {"smoke"} | CUTS


def _opts(arg: str) -> set[str]:
  opts = set(filter(None, arg.split(",")))
  if opts - ARGS:
    raise ValueError(f"experiments/dropout_vs_facts.py: unknown arg(s) {sorted(opts - ARGS)}; known: {sorted(ARGS)}")
  if len(opts & CUTS) > 1:
    raise ValueError(f"experiments/dropout_vs_facts.py: args {sorted(opts & CUTS)} are different cuts of the design; "
                     f"give one")
  return opts


def get_config(arg: str = ""):
  opts = _opts(arg)
  smoke = "smoke" in opts
  c = quickstart.get_config("smoke" if smoke else "")
  c.stages = ("pretrain",) if opts & {"core", "sites"} else STAGES  # quickstart.py runs later stages too; not here.
  for stage in STAGES:
    c[stage].reg.weight_decay = 0.0  # The baseline has no regularization at all.
    c[stage].evals = ("perplexity", "bios_facts", "capacity", "diversity")  # What METRICS read.
  return c


def at_stage(stage: str, name: str) -> dict:
  return experiments.setting(f"{name}@{stage}", {f"{stage}.{k}": v for k, v in REGULARIZERS[name].items()})


def get_sweep(arg: str = ""):
  opts = _opts(arg)
  if "smoke" in opts:
    return experiments.product([experiments.setting("none"), at_stage("pretrain", "dropout")], experiments.seeds(2))
  if "core" in opts:
    return experiments.product([experiments.setting("none")] + [at_stage("pretrain", name) for name in CORE],
                               experiments.seeds(experiments.DEFAULT_SEEDS))
  if "sites" in opts:
    return experiments.product([experiments.setting("none")] + [at_stage("pretrain", name) for name in SITES],
                               experiments.seeds(experiments.DEFAULT_SEEDS))
  if "cpt" in opts:
    return experiments.product([experiments.setting("none")] + [at_stage("cpt", name) for name in AT_CPT],
                               experiments.seeds(experiments.DEFAULT_SEEDS))
  settings = [experiments.setting("none")] + [at_stage(stage, name) for stage in STAGES for name in REGULARIZERS]
  return experiments.product(settings, experiments.seeds(experiments.DEFAULT_SEEDS))
