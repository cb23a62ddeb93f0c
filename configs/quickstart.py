r"""Quickstart: all seven stages of configs/pipeline.py, shortened to run in under 10 minutes on a 2-core CPU.

  python -m llmstages.main --config=configs/quickstart.py --workdir=/tmp/llmstages_quickstart

pretrain (600 steps on synthetic biographies, scratchpad arithmetic and stories) -> cpt (new people, 25% replay)
-> sft (QA, story continuations, arithmetic) -> instruct (chat template) -> reward (Bradley-Terry) -> dpo -> grpo
(verifiable rewards), each evaluated on facts, arithmetic, story diversity and perplexity; results in
<workdir>/<stage>/eval.json. The README shows the table of one run. `:ppo` puts PPO-RLHF in place of DPO;
`:smoke` shrinks everything so the whole pipeline runs in about two minutes (the tests use it); `:people=N` sets the
bios population (default 300).
"""

from configs import pipeline
from llmstages import config as config_lib


def get_config(arg: str = ""):
  flags, values = config_lib.parse_args(arg, {"ppo", "smoke", "people=N"}, "configs/quickstart.py")
  return pipeline.build(flags | {"quick"}, **values)
