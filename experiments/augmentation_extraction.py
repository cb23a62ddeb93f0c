r"""Knowledge augmentation and extraction: biographies in one fixed form vs rewritten and reordered at every exposure.

  python -m llmstages.sweep --experiment=augmentation_extraction --workdir=/tmp/sweeps/augmentation_extraction \
      --workers=2
  python -m llmstages.compare /tmp/sweeps/augmentation_extraction --out=experiments/results/augmentation_extraction.md

After Physics of LMs 3.1: pretrain the configs/quickstart.py model (0.9M parameters) for the quickstart's 500 steps of
8 x 256 tokens on biographies of its 64 people (`simple`: one fixed biography per person; `multi_permute`: five
biographies per person, each with a fresh template per attribute and a shuffled sentence order), 85% of the tokens,
mixed with 15% stories, without the quickstart's QA in pretraining (the paper's setting: QA is seen only after
pretraining); then fine-tune (the 'cpt' stage, the quickstart's 60 steps, no replay) on QA pairs about the QA-train
half of the people. Memorization is exact match on a person's own training biography cut before the value;
extraction is QA accuracy on the other half, the QA-test people, whose facts were only ever seen in biographies
(`bios_facts/qa_test/greedy`). Both settings share one tokenizer (trained on both formats). 2 settings x 5 seeds =
10 runs: 19 minutes with 2 workers on the 2-core CPU (37 CPU-minutes). Paper, at GPT-2 scale: 9.7% (simple) vs 96.6% (multi5+permute).

`:smoke` runs both formats x 2 seeds of the quickstart smoke model in seconds each.
"""

from configs import quickstart
from llmstages import experiments

FORMATS = ("simple", "multi_permute")

METRICS = (
    "bios_facts/qa_test/greedy",
    "bios_facts/qa_train/greedy",
    "bios_facts/memorization/mean_greedy",
    "diversity/per_input/ead",
    "perplexity/loss",
)
PARETO = ("diversity/per_input/ead", "bios_facts/qa_test/greedy")
BASELINE = "simple"


def _opts(arg: str) -> set[str]:
  opts = set(filter(None, arg.split(",")))
  if opts - {"smoke"}:
    raise ValueError(f"experiments/augmentation_extraction.py: unknown arg(s) {sorted(opts - {'smoke'})}; "
                     "known: smoke")
  return opts


PEOPLE = 64  # The quickstart's population.


def _people(smoke: bool) -> str:
  return "n=100,n_new=20" if smoke else f"n={PEOPLE},n_new={PEOPLE // 5}"


def format_overrides(fmt: str, smoke: bool) -> dict:
  """Every config key that names the biography corpus, in format `fmt`."""
  people = _people(smoke)
  bios = f"bios({people},format={fmt})"
  stories = f"stories(bios_n={100 if smoke else PEOPLE})"
  return {
      "pretrain.data": f"{bios}:0.85,{stories}:0.15",
      "cpt.data": f"bios_qa({people},format={fmt})",
      "eval.bios": bios,
      "eval.perplexity_data": f"{bios}:0.85,{stories}:0.15",
  }


def get_config(arg: str = ""):
  smoke = "smoke" in _opts(arg)
  c = quickstart.get_config("smoke" if smoke else f"people={PEOPLE}")
  c.stages = ("pretrain", "cpt")  # quickstart.py may run later stages too; 'cpt' here is the QA fine-tuning.
  for key, value in format_overrides(FORMATS[0], smoke).items():
    experiments.set_key(c, key, value)
  c.cpt.replay = 0.0
  people = _people(smoke)
  c.data.tokenizer_sources = ",".join([f"bios({people},format={f})" for f in FORMATS] +
                                      [f"bios_qa({people},format={FORMATS[0]})", "arith_scratchpad",
                                       f"stories(bios_n={100 if smoke else PEOPLE})"])
  for stage in ("pretrain", "cpt"):
    c[stage].evals = ("perplexity", "bios_facts", "diversity")
  if not smoke:
    c.eval.num_prompts = 60  # QA prompts of 10 people per group (6 attributes each), memorization of 60 people.
  return c


def get_sweep(arg: str = ""):
  smoke = "smoke" in _opts(arg)
  settings = [experiments.setting(fmt, format_overrides(fmt, smoke)) for fmt in FORMATS]
  return experiments.product(settings, experiments.seeds(2 if smoke else experiments.DEFAULT_SEEDS))
