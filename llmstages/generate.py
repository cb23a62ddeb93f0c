r"""Samples from a trained stage.

  python -m llmstages.generate --workdir=DIR --stage=STAGE --prompt=TEXT [--temperature=0.7 --top_p=0.9
      --top_k=0 --num_samples=8 --max_new_tokens=64 --vote --seed=0 --mc_dropout=0.0]

Prints each sample; with --vote also the majority answer (normalized, as exact match scores it) and its share.
"""

from __future__ import annotations

from absl import app, flags

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
flags.mark_flags_as_required(["workdir", "stage", "prompt"])


def load_config(workdir: str):
  from llmstages import pipeline
  return pipeline.load_config(workdir)


def generate(workdir: str, stage: str, prompts: list[str], **kw) -> list[dict]:
  """Samples for each prompt: [{'prompt', 'samples': [text, ...], 'vote': (answer, share)}]."""
  from llmstages import train
  from llmstages.evals import metrics
  from llmstages.evals.evaluators import answer_text
  from llmstages.sampler import Sampler
  config = load_config(workdir)
  if stage not in config.stages:
    raise ValueError(f"--stage={stage!r} is not one of this workdir's stages {list(config.stages)}")
  tctx = train.build_context(config, stage)
  params = train.load_final_params(workdir, stage, tctx.abstract_lm_params(), needed_by=f"generate --stage={stage}")
  tok = train.tokenizer_for(config)
  sampler = Sampler(tctx.model_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=tctx.mesh, rules=tctx.rules,
                    mc_dropout=kw.pop("mc_dropout", 0.0))
  n = kw.get("num_samples", 1)
  out = sampler.generate(params, [[tok.bos_id] + tok.encode(p) for p in prompts], **kw)
  texts = [tok.decode([t for t in seq if t not in (tok.eos_id, tok.pad_id)]) for seq in out.sequences()]
  results = []
  for i, prompt in enumerate(prompts):
    samples = texts[i * n:(i + 1) * n]
    results.append({"prompt": prompt, "samples": samples,
                    "vote": metrics.majority_vote([answer_text(s) for s in samples])})
  return results


def main(argv):
  del argv
  results = generate(_WORKDIR.value, _STAGE.value, list(_PROMPT.value), max_new_tokens=_MAX_NEW.value,
                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                     num_samples=_NUM_SAMPLES.value, seed=_SEED.value, mc_dropout=_MC_DROPOUT.value)
  for r in results:
    print(f"=== {r['prompt']}")
    for j, s in enumerate(r["samples"]):
      print(f"[{j}] {s}")
    if _VOTE.value:
      answer, share = r["vote"]
      print(f"vote: {answer!r} ({share:.0%} of {len(r['samples'])} samples)")


if __name__ == "__main__":
  app.run(main)
