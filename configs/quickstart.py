r"""Quickstart: all seven stages of configs/pipeline.py, shortened to run in under 10 minutes on a 2-core CPU.

  python -m llmstages.main --config=configs/quickstart.py --workdir=/tmp/llmstages_quickstart

pretrain (500 steps on the biographies of 64 people mixed with QA of half of them, scratchpad addition and stories)
-> cpt (16 new people, half of each batch replayed) -> sft (QA, story continuations, arithmetic) -> instruct (chat
template) -> reward (Bradley-Terry) -> dpo -> grpo (verifiable arithmetic reward), each evaluated on facts,
arithmetic, story diversity and perplexity on 64 prompts per metric; results in <workdir>/<stage>/eval.json and
<workdir>/results.md. configs/pipeline.py's docstring says what each stage is sized to show. `:ppo` puts PPO-RLHF in
place of DPO; `:smoke` shrinks everything so the whole pipeline runs in about two minutes (the tests use it);
`:people=N` sets the bios population (default 64 here, 300 in the full pipeline).
"""

from configs import pipeline
from llmstages import config as config_lib


def get_config(arg: str = ""):
  flags, values = config_lib.parse_args(arg, {"ppo", "smoke", "people=N"}, "configs/quickstart.py")
  return pipeline.build(flags | {"quick"}, **values)
