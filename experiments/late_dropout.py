r"""Late dropout: dropout on or off in the last fine-tuning stage only (instruction tuning), everything else equal.

  python -m llmstages.sweep --experiment=late_dropout --workdir=/tmp/sweeps/late_dropout --workers=2
  python -m llmstages.compare /tmp/sweeps/late_dropout --out=experiments/results/late_dropout.md

Base: the quickstart curriculum (configs/quickstart.py: 64 people, 500 pretraining steps of 8 x 256 tokens mixing
biographies, QA of the QA-train half, scratchpad addition and stories; sft 100 steps, instruct 120 steps in the chat
template) without CPT (pretrain -> sft -> instruct), no dropout anywhere, then dropout 0.1 at every site in
`instruct` only ('late') vs none ('off'). The two settings are identical up to `instruct`, so only `sft` (the common
starting point) and `instruct` are evaluated (after instruct in the chat template). Prior evidence
(docs/RESEARCH.md): T5 1.1 and PaLM pretrain without dropout and fine-tune with 0.1; the question here is whether
late dropout keeps facts (QA exact match) or diversity (EAD) better than fine-tuning without it. 2 settings x 5
seeds = 10 runs of three stages: 30 minutes with 2 workers on the 2-core CPU (50 CPU-minutes).

`:smoke` runs both settings x 2 seeds of the quickstart smoke model.
"""

from configs import quickstart
from llmstages import experiments

STAGES = ("pretrain", "sft", "instruct")
METRICS = (
    "bios_facts/qa_train/greedy",
    "bios_facts/qa_test/greedy",
    "arith/greedy",
    "diversity/per_input/ead",
    "diversity/across_input/distinct_2",
    "perplexity/loss",
)
PARETO = ("diversity/per_input/ead", "bios_facts/qa_train/greedy")
BASELINE = "off"


def _smoke(arg: str) -> bool:
  opts = set(filter(None, arg.split(",")))
  if opts - {"smoke"}:
    raise ValueError(f"experiments/late_dropout.py: unknown arg(s) {sorted(opts - {'smoke'})}; known: smoke")
  return "smoke" in opts


def get_config(arg: str = ""):
  smoke = _smoke(arg)
  c = quickstart.get_config("smoke" if smoke else "")
  c.stages = STAGES
  c.sft.init_from = "pretrain"
  c.pretrain.evals = ()  # Both settings share pretrain and sft; sft's scores are the common starting point.
  return c


def get_sweep(arg: str = ""):
  settings = [experiments.setting("off", {"instruct.reg.dropout": 0.0}),
              experiments.setting("late", {"instruct.reg.dropout": 0.1})]
  return experiments.product(settings, experiments.seeds(2 if _smoke(arg) else experiments.DEFAULT_SEEDS))
