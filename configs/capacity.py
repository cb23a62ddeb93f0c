r"""Knowledge capacity: pretrain a small model on synthetic biographies only, then measure bits per parameter.

  python -m llmstages.main --config=configs/capacity.py --workdir=/tmp/llmstages_capacity

One stage ('pretrain') on `bios(n=2000, multi_permute)` for 100 exposures per person (the corpus holds 5 fixed
renderings of each biography, so each rendering is seen about 20 times), scored by `capacity` (Physics of LMs 3.3, Def. 4.3: R and R_max in bits per parameter, all noise off)
and `bios_facts`. The model is `SIZES['s']` (75,504 parameters with this 512-token vocabulary); the sweep in
experiments/capacity.py varies the size, the exposures (via `steps_for_exposures`) and dropout.
2000 people carry about 128K bits (log2(N0/N) + log2 S0 = 16.3 + 47.6 bits each), so R_max is about 1.7 bits/param
at this size; 100 exposures are 6,104 steps of 32 x 128 tokens. `:people=N` sets the population (what
experiments/capacity.py:cpu uses, 200 people, to fit the 2-core CPU); `:smoke` shrinks everything to run in
seconds.
"""

import math

from llmstages import config as config_lib

PEOPLE = 2000
# Model shapes (d_model, num_layers, num_heads, num_kv_heads, mlp_dim); parameter counts with the 512-token vocab.
SIZES = {
    "xxs": (16, 2, 2, 1, 48),  # 14,416 parameters
    "xs": (32, 2, 4, 2, 64),  # 34,976 parameters
    "s": (48, 2, 4, 2, 128),  # 75,504
    "m": (64, 2, 4, 2, 192),  # 131,392
}
# Tokens of one biography document under this config's tokenizer (multi_permute, 512-token vocab): the mean over
# the first 2000 training documents of bios(n=2000) was 122.8 (range 94-153), plus BOS/EOS. An estimate: the
# exposures a run reaches differ from the nominal ones by a few percent.
TOKENS_PER_BIO = {"multi_permute": 125.0}


def bios_spec(n: int, fmt: str = "multi_permute") -> str:
  return f"bios(n={n},format={fmt})"


def steps_for_exposures(exposures: float, people: int, batch_size: int, seq_len: int,
                        tokens_per_bio: float = TOKENS_PER_BIO["multi_permute"]) -> int:
  """Training steps in which each person's biography is seen `exposures` times (on average)."""
  return max(1, math.ceil(exposures * people * tokens_per_bio / (batch_size * seq_len)))


def model_overrides(size: str) -> dict:
  d, layers, heads, kv, mlp = SIZES[size]
  return {"model.d_model": d, "model.num_layers": layers, "model.num_heads": heads, "model.num_kv_heads": kv,
          "model.mlp_dim": mlp}


def get_config(arg: str = ""):
  flags, values = config_lib.parse_args(arg, {"smoke", "people=N"}, "configs/capacity.py")
  smoke = "smoke" in flags
  people = values.get("people") or (100 if smoke else PEOPLE)
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=512, max_seq_len=256))
  c.model.update({k.split(".")[1]: v for k, v in model_overrides("xs" if smoke else "s").items()})
  c.stages = ("pretrain",)
  bios = bios_spec(people)
  batch_size, seq_len = (4, 64) if smoke else (32, 128)
  steps = 8 if smoke else steps_for_exposures(100, people, batch_size, seq_len)
  c.pretrain = config_lib.stage_config(
      "pretrain", steps=steps, batch_size=batch_size, seq_len=seq_len, learning_rate=3e-3,
      warmup_steps=2 if smoke else 100, data=bios, eval_every=0, eval_steps=2 if smoke else 4,
      checkpoint_every=4 if smoke else 1000, log_every=2 if smoke else 100,
      evals=("perplexity", "capacity", "bios_facts"))
  c.eval.update(dict(bios=bios, num_prompts=4 if smoke else 64, samples=2 if smoke else 4,
                     pass_k=(1, 2) if smoke else (1, 4), max_new_tokens=6 if smoke else 16))
  return config_lib.finalize(c)
