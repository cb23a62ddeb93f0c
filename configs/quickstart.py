r"""Quickstart: pretrain a small Llama-style model on synthetic biographies, then continue pretraining on new people.

  python -m llmstages.main --config=configs/quickstart.py --workdir=/tmp/llmstages_quickstart

`:smoke` shrinks everything to run in seconds (the tests use it). Expected on a 2-core CPU (about 4 minutes in all):
pretrain train loss falls from ~6.3 to ~0.73 (held-out ~0.91); CPT learns the new people while replaying 25% of
the old (train ~0.63, held-out ~0.92).
"""

from llmstages import config as config_lib


def get_config(arg: str = ""):
  opts = set(filter(None, arg.split(",")))
  unknown = opts - {"smoke"}
  if unknown:
    raise ValueError(f"configs/quickstart.py: unknown arg(s) {sorted(unknown)}; known: smoke")
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                      max_seq_len=256))
  c.stages = ("pretrain", "cpt")
  bios = "bios(n=300,format=multi_permute,n_new=100)"
  stories = "stories(bios_n=300)"
  evals = ("perplexity", "bios_facts", "capacity", "arith", "diversity")
  c.pretrain = config_lib.stage_config(
      "pretrain", steps=600, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=50,
      data=f"{bios}:0.6,arith_scratchpad:0.25,{stories}:0.15", eval_every=100, checkpoint_every=200, log_every=20,
      evals=evals)
  c.cpt = config_lib.stage_config(
      "cpt", steps=200, batch_size=16, seq_len=128, learning_rate=1e-3, warmup_steps=20,
      data=bios.replace("bios(", "bios_new("), replay=0.25, init_from="pretrain", eval_every=100,
      checkpoint_every=100, log_every=20, evals=evals)
  c.eval.update(dict(bios=bios, arith="arith_scratchpad", stories=stories, num_prompts=32, samples=4,
                     pass_k=(1, 4), story_tokens=96))
  if "smoke" in opts:
    c.model.update(dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64))
    for name in c.stages:
      c[name].update(dict(steps=8, batch_size=4, seq_len=64, warmup_steps=2, eval_every=4, eval_steps=2,
                          checkpoint_every=4, log_every=2))
    small = "bios(n=100,format=multi_permute,n_new=20)"
    c.pretrain.data = f"{small}:0.6,arith_scratchpad:0.25,stories(bios_n=100):0.15"
    c.cpt.data = small.replace("bios(", "bios_new(")
    c.eval.update(dict(bios=small, stories="stories(bios_n=100)", num_prompts=4, samples=2, pass_k=(1, 2),
                       max_new_tokens=6, story_tokens=8))
  return config_lib.finalize(c)
