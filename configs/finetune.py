r"""Post-training a pretrained Hugging Face Llama: base (imported) -> sft -> instruct -> dpo -> grpo.

  python -m llmstages.hf import --hf_dir=DIR --workdir=W
  python -m llmstages.main --config=configs/finetune.py:hf_dir=DIR --workdir=W
  python -m llmstages.main --config=configs/finetune.py:hf_dir=DIR,lora --workdir=W_lora   # (import into W_lora too)
  python -m llmstages.hf export --workdir=W --stage=grpo --out=OUT [--peft]

The model (shape, RoPE, norms) and tokenizer come from DIR; `base` is the imported stage, scored by the same
evaluators as every later stage (its row is the pretrained baseline). The stages and data are those of
configs/pipeline.py from SFT on: SFT teaches the bios population (biographies plus QA on the QA-train half, so
`bios_facts` measures taught facts and QA-test generalization), story continuations and scratchpad arithmetic;
instruct the same tasks as chat; DPO on the preference pairs against the instruct model; GRPO with verifiable
rewards. `world_facts` tracks what the pretrained model already knew about real cities (forgetting).

Args (comma-separated): `hf_dir=DIR` (required), `lora` (LoRA r=16, alpha=32 on every projection of every stage,
with learning rates for adapters), `smoke` (tiny steps and evals, for tests), `people=N` (bios population, default
300). Learning rates are those usual for full fine-tuning of a pretrained model (1e-5 to 5e-5), 10x for LoRA.
"""

import dataclasses
import os

from configs import pipeline
from llmstages import config as config_lib
from llmstages import hf
from llmstages.data.hf_tokenizer import is_hf_tokenizer_dir

ARGS = {"lora", "smoke", "people=N"}
STAGES = ("sft", "instruct", "dpo", "grpo")


def get_config(arg: str = ""):
  rest, hf_dir = [], ""
  for opt in filter(None, arg.split(",")):
    key, _, value = opt.partition("=")
    if key == "hf_dir":
      hf_dir = value
    else:
      rest.append(opt)
  if not hf_dir:
    raise ValueError("configs/finetune.py: needs hf_dir=DIR (a Hugging Face Llama directory), e.g. "
                     "--config=configs/finetune.py:hf_dir=/path/to/SmolLM-135M")
  flags, values = config_lib.parse_args(",".join(rest), ARGS, "configs/finetune.py")
  return build(os.path.abspath(hf_dir), flags, **values)


def build(hf_dir: str, opts: set[str], people: int | None = None):
  c = pipeline.build(opts & {"smoke"}, people)
  c.unlock()
  mc = hf.config_from_hf(hf_dir)
  c.model.update(dataclasses.asdict(mc))
  if not is_hf_tokenizer_dir(hf_dir):
    raise ValueError(f"configs/finetune.py: {hf_dir} has no tokenizer.json or tokenizer.model")
  c.data.tokenizer = hf_dir
  c.base = config_lib.stage_config("base", kind="hf_import", steps=1, data="", init_from="",
                                   evals=c.sft.evals + ("world_facts",), batch_size=c.sft.batch_size,
                                   seq_len=c.sft.seq_len)
  c.base.hf_dir = hf_dir
  c.stages = ("base",) + STAGES
  c.eval.world = "world"
  bios = c.eval.bios
  stories_sft = c.eval.stories.replace("stories(", "stories_sft(")
  c.sft.data = f"{bios}:0.35,{bios.replace('bios(', 'bios_qa(')}:0.35,{stories_sft}:0.15,arith_scratchpad:0.15"
  c.sft.init_from = "base"
  lora = "lora" in opts
  for name, lr in zip(STAGES, (5e-5, 3e-5, 1e-5, 1e-5)):
    s = c[name]
    s.evals = tuple(e for e in s.evals if e != "capacity") + ("world_facts",)
    s.learning_rate = lr * (10 if lora else 1)
    s.reg.weight_decay = 0.0 if lora else 0.01
    s.grad_clip = 1.0
    if lora:
      s.lora.update(dict(rank=16, alpha=32.0))
  c.dpo.init_from = "instruct"
  c.grpo.init_from = "dpo"
  return config_lib.finalize(c)
