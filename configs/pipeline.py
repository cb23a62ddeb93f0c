r"""The full pipeline: pretrain -> cpt -> sft -> instruct -> reward -> dpo -> grpo, evaluated after every stage.

  python -m llmstages.main --config=configs/pipeline.py --workdir=/tmp/llmstages_pipeline
  python -m llmstages.main --config=configs/pipeline.py:ppo --workdir=/tmp/llmstages_pipeline_ppo

Args (comma-separated): `ppo` runs PPO-RLHF against the reward model in place of DPO; `quick` shortens every
stage (what configs/quickstart.py runs: under 10 minutes on a 2-core CPU); `smoke` shrinks everything to seconds
(tests); `people=N` sets the bios population (default 300, 100 with smoke; N // 5 new people for CPT): fewer
people means more exposures per person for the same steps, which is how experiments/ makes a small model store
facts on a CPU budget.

Data: one bios population (N people) is shared by every stage: pretraining reads their biographies (plus
scratchpad arithmetic and grammar stories about them), CPT adds new people with 25% replay, SFT learns QA on the
QA-train half, story continuations and arithmetic, instruction tuning the same tasks in the chat template, the
reward model and DPO the `preferences` pairs (a wrong fact, a wrong sum or a broken story is rejected), GRPO
answers chat prompts with verifiable rewards (arithmetic, facts, story validity). Every stage is scored on facts
(bios, arithmetic), diversity of stories, and perplexity on the pretraining held-out mixture.
"""

from llmstages import config as config_lib

ARGS = {"ppo", "quick", "smoke", "people=N"}


def get_config(arg: str = ""):
  flags, values = config_lib.parse_args(arg, ARGS, "configs/pipeline.py")
  return build(flags, **values)


def build(opts: set[str], people: int | None = None):
  quick, smoke = "quick" in opts, "smoke" in opts
  n = people or (100 if smoke else 300)
  if n < 8:
    raise ValueError(f"configs/pipeline.py: people={n}; needs at least 8 (QA-train and QA-test halves)")
  n_new = max(n // 5, 2) if people else (20 if smoke else 100)
  bios = f"bios(n={n},format=multi_permute,n_new={n_new})"
  stories = f"stories(bios_n={n})"
  chat_args = f"bios_n={n},n_train={400 if smoke else 3000},n_validation={50 if smoke else 300}"
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                      max_seq_len=256))
  pretraining = f"{bios}:0.6,arith_scratchpad:0.25,{stories}:0.15"
  facts_and_stories = ("perplexity", "bios_facts", "arith", "diversity")
  stage = config_lib.stage_config
  c.pretrain = stage("pretrain", steps=1200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=50,
                     data=pretraining, eval_every=200, checkpoint_every=200, log_every=20,
                     evals=facts_and_stories + ("capacity",))
  c.cpt = stage("cpt", steps=300, batch_size=16, seq_len=128, learning_rate=1e-3, warmup_steps=20,
                data=bios.replace("bios(", "bios_new("), replay=0.25, init_from="pretrain", eval_every=100,
                checkpoint_every=100, log_every=20, evals=facts_and_stories + ("capacity",))
  c.sft = stage("sft", steps=300, batch_size=16, seq_len=128, learning_rate=5e-4, warmup_steps=20,
                data=f"{bios.replace('bios(', 'bios_qa(')}:0.5,stories_sft(bios_n={n}):0.25,arith_scratchpad:0.25",
                init_from="cpt", eval_every=100, checkpoint_every=100, log_every=20, evals=facts_and_stories)
  c.instruct = stage("instruct", steps=300, batch_size=8, seq_len=256, learning_rate=5e-4, warmup_steps=20,
                     data=f"instructions({chat_args})", init_from="sft", eval_every=100, checkpoint_every=100,
                     log_every=20, evals=facts_and_stories)
  c.reward = stage("reward", steps=200, batch_size=8, seq_len=256, learning_rate=3e-4, warmup_steps=20,
                   data=f"preferences({chat_args})", init_from="instruct", eval_every=50, checkpoint_every=100,
                   log_every=10, eval_steps=4, evals=("stage",))
  c.dpo = stage("dpo", steps=200, batch_size=8, seq_len=256, learning_rate=1e-4, warmup_steps=10,
                data=f"preferences({chat_args})", init_from="instruct", eval_every=50, checkpoint_every=100,
                log_every=10, eval_steps=4, evals=facts_and_stories + ("stage",))
  c.ppo = stage("ppo", steps=100, batch_size=16, seq_len=128, learning_rate=5e-5, warmup_steps=5,
                data=f"preferences({chat_args})", init_from="instruct", eval_every=50, checkpoint_every=50,
                log_every=5, eval_steps=1, evals=facts_and_stories + ("stage",))
  c.ppo.rl.update(dict(num_generations=4, max_new_tokens=48, temperature=1.0, reward_from="reward"))
  c.grpo = stage("grpo", steps=100, batch_size=32, seq_len=128, learning_rate=5e-5, warmup_steps=5,
                 data=f"preferences({chat_args})", init_from="ppo" if "ppo" in opts else "dpo", eval_every=50,
                 checkpoint_every=50, log_every=5, eval_steps=1, evals=facts_and_stories + ("stage",))
  c.grpo.rl.update(dict(num_generations=8, max_new_tokens=48, temperature=1.0, kinds=("arith", "bios", "world")))
  middle = ("reward", "ppo") if "ppo" in opts else ("reward", "dpo")
  c.stages = ("pretrain", "cpt", "sft", "instruct") + middle + ("grpo",)
  c.eval.update(dict(bios=bios, arith="arith_scratchpad", stories=stories, num_prompts=32, samples=4,
                     pass_k=(1, 4), story_tokens=96, perplexity_data=pretraining))
  if quick:
    steps = dict(pretrain=500, cpt=100, sft=100, instruct=120, reward=40, dpo=40, ppo=20, grpo=20)
    for name, s in steps.items():
      c[name].steps = s
      c[name].eval_every = s
      c[name].checkpoint_every = s
    c.cpt.evals = facts_and_stories  # Capacity once, after pretraining: it re-reads the whole bios corpus.
    c.eval.update(dict(num_prompts=16))
  if smoke:
    shrink_to_smoke(c)
  return config_lib.finalize(c)


def shrink_to_smoke(c) -> None:
  """`smoke`: a 2-layer d_model 32 model and a few steps per stage, so the whole pipeline runs in seconds."""
  c.model.update(dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64))
  for name in ("pretrain", "cpt", "sft", "instruct", "reward", "dpo", "ppo", "grpo"):
    rl = name in ("ppo", "grpo")
    seq_len = {"instruct": 192, "reward": 192, "dpo": 192, "ppo": 128, "grpo": 128}.get(name, 64)
    c[name].update(dict(steps=4 if rl else 8, batch_size=8 if rl else 4, seq_len=seq_len, warmup_steps=2,
                        eval_every=4, eval_steps=1 if rl else 2, checkpoint_every=4, log_every=2))
  c.ppo.rl.update(dict(num_generations=2, max_new_tokens=8))
  c.grpo.rl.update(dict(num_generations=4, max_new_tokens=8))
  c.eval.update(dict(num_prompts=4, samples=2, pass_k=(1, 2), max_new_tokens=6, story_tokens=8,
                     perplexity_batches=2))
