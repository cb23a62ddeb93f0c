r"""Hugging Face checkpoints in and out of a workdir, and a memory table.

  python -m llmstages.hf import --hf_dir=DIR --workdir=W [--stage=base --scan_layers]
  python -m llmstages.hf export --workdir=W --stage=S --out=DIR [--peft --dtype=bfloat16]
  python -m llmstages.hf memory

`import` makes `W/<stage>/` a finished stage (final_params + final.json, as a trained stage leaves them) and
writes `W/config.json` with the imported model and tokenizer, so `init_from='base'` starts from it and
`python -m llmstages.generate --workdir=W --stage=base` samples it. `export` writes a LoRA stage merged (or, with
`--peft`, its adapter alone, for `peft.PeftModel.from_pretrained(base, DIR)`). `memory` prints parameter and
optimizer memory with and without LoRA for SmolLM-135M- and Llama-3.2-1B-shaped models (abstract shapes only).
"""

from __future__ import annotations

from absl import app, flags

from llmstages import cli
from llmstages.hf import commands
from llmstages.hf.commands import COMMANDS

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: a LlamaForCausalLM directory (config.json + safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The llmstages workdir.")
_STAGE = flags.DEFINE_string("stage", "base", "import: the stage to create; export: the stage to write.")
_OUT = flags.DEFINE_string("out", None, "export: the output directory.")
_PEFT = flags.DEFINE_bool("peft", False, "export: write the stage's LoRA adapter in PEFT format.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "export: tensor dtype.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "import: stack the layers (model.scan_layers) in the workdir.")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m llmstages.hf {{{'|'.join(COMMANDS)}}} [flags]; got {argv[1:]}")
  command = argv[1]
  if command == "import":
    if not _HF_DIR.value or not _WORKDIR.value:
      raise app.UsageError("import needs --hf_dir and --workdir")
    commands.import_model(_HF_DIR.value, _WORKDIR.value, _STAGE.value, scan_layers=_SCAN.value)
  elif command == "export":
    if not _WORKDIR.value or not _OUT.value:
      raise app.UsageError("export needs --workdir, --stage and --out")
    commands.export_model(_WORKDIR.value, _STAGE.value, _OUT.value, _PEFT.value, _DTYPE.value)
  else:
    print(commands.memory_table())


if __name__ == "__main__":
  cli.run(main)
