r"""Samples from a trained stage.

  python -m llmstages.generate --workdir=DIR --stage=STAGE --prompt=TEXT [--temperature=0.7 --top_p=0.9
      --top_k=0 --num_samples=8 --max_new_tokens=64 --vote --seed=0 --mc_dropout=0.0]

Prints each sample; with --vote also the majority answer and its share of the samples, voted as the evaluators
vote: on the final number for an arithmetic problem ("What is A op B?"), else on the fact answer (normalized, as
exact match scores it). `--chat=auto` poses the prompt in the chat template when the stage was tuned on it, as
the evaluators do; `always` / `never` force it.
"""

from __future__ import annotations

from absl import flags

from llmstages import cli, load, pipeline

load_config = pipeline.load_config  # Kept for callers of generate.load_config.
generate = load.generate  # The library function; this module adds only the command line.

_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline's workdir (holds config.json and the stages).")
_STAGE = flags.DEFINE_string("stage", None, "Which stage's final parameters to sample from.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat the flag for several prompts).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy (argmax).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most (stops at EOS).")
_VOTE = flags.DEFINE_bool("vote", False, "Print the majority answer over the samples and its share.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MC_DROPOUT = flags.DEFINE_float("mc_dropout", 0.0, "Inference-time dropout rate at every site.")
_CHAT = flags.DEFINE_enum("chat", "auto", ["auto", "always", "never"],
                          "Wrap the prompt in the chat template: auto = when the stage was tuned on it.")
flags.mark_flags_as_required(["workdir", "stage", "prompt"])


def main(argv):
  del argv
  results = generate(_WORKDIR.value, _STAGE.value, list(_PROMPT.value), max_new_tokens=_MAX_NEW.value,
                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                     num_samples=_NUM_SAMPLES.value, seed=_SEED.value, mc_dropout=_MC_DROPOUT.value,
                     chat=_CHAT.value)
  for r in results:
    print(f"=== {r['prompt']}")
    for j, s in enumerate(r["samples"]):
      print(f"[{j}] {s}")
    if _VOTE.value:
      answer, share = r["vote"]
      print(f"vote: {answer!r} ({share:.0%} of {len(r['samples'])} samples; answers {r['answers']})")


if __name__ == "__main__":
  cli.run(main)
