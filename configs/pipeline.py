r"""The full pipeline: pretrain -> cpt -> sft -> instruct -> reward -> dpo -> grpo, evaluated after every stage.

  python -m llmstages.main --config=configs/pipeline.py --workdir=/tmp/llmstages_pipeline
  python -m llmstages.main --config=configs/pipeline.py:ppo --workdir=/tmp/llmstages_pipeline_ppo

Args (comma-separated): `ppo` runs PPO-RLHF against the reward model in place of DPO; `quick` shortens every
stage (what configs/quickstart.py runs: under 10 minutes on a 2-core CPU, corpus building included); `smoke` shrinks
everything to seconds (tests); `people=N` sets the bios population (default 300, 64 with quick, 100 with smoke;
N // 5 new people for CPT, else 100, 16 with quick, 20 with smoke): fewer people means more exposures per person
for the same steps, which is how a small model stores facts on a CPU budget.

Data: one bios population (N people) is shared by every stage. Pretraining mixes their biographies (multi_permute)
with QA of the QA-train half (the mixed training of Physics of LMs 3.1: without it QA on the other half, which
only biographies mention, stays near 0 at this size), scratchpad addition and grammar stories about them. CPT adds
new people with replay of the pretraining mixture, SFT learns QA on the QA-train half, story continuations and
arithmetic, instruction tuning the same tasks in the chat template, the reward model and DPO the `preferences`
pairs (a wrong fact, a wrong sum or a broken story is rejected), GRPO answers chat arithmetic with a verifiable
reward. Arithmetic everywhere is 1-2 digit addition with a digit-level scratchpad (the evaluator scores the held-out
problems of the same corpus). Every stage is scored on facts (bios, arithmetic), diversity of stories (EAD with a
fixed V, validity), and perplexity on the pretraining held-out mixture; eval.json holds every figure with its n
and a 95% interval.

What each stage of `quick` is sized to show (64 prompts per metric, the 256 held-out pairs that fit):
  pretrain  500 steps of 8 x 256 tokens, 64 people (~100 exposures each): memorized biography facts near 1,
            QA on QA-train people near 1 and on QA-test people well above 0 (extraction), capacity R in bits/param.
  cpt       60 steps, 16 new people, half of each batch replayed: new people memorized (bios_facts/new_people,
            measured 0 -> 1.0) and the old people kept (bios_facts/memorization, 0.99 -> 0.90).
  sft       100 steps: QA-train near 1, QA-test above 0.2, arithmetic learned but imperfect so maj@k can beat
            greedy and GRPO has groups with signal; story continuations.
  instruct  120 steps of chat: the same facts asked in the chat template (no collapse).
  reward    80 steps of Bradley-Terry on the preference pairs, LoRA rank 16 at lr 3e-3: held-out pair accuracy
            (measured 0.58 of 256 pairs, short of 0.75: story pairs 0.79, arithmetic 0.56-0.60, biography pairs of
            QA-test people 0.53 (chance), though the instruct model's own log-probs tell 0.93 of those apart; at
            d_model 256 0.64, its biography pairs 0.51 while its log-probs tell 0.96 apart).
  dpo       80 steps from instruct at lr 1e-4, beta 0.5 (80 at 2e-4, beta 0.1 took QA-train from 0.66 to 0.16):
            held-out implicit-reward accuracy (measured 0.80 of 256 pairs), facts kept (QA-train 0.98 -> 0.94).
  grpo      30 steps of 6 prompts x 16 samples of "Show your work." chat addition at T=0.7, lr 5e-5: rollout
            reward rising (measured 0.09 at step 5 -> 0.16-0.25 at steps 10-30), held-out arithmetic above DPO's
            (0.31 vs 0.22), groups without signal 0.23-0.50 of a window's (mean 0.41; 0.44 of the 66 held-out
            prompts; 8 prompts x 12 samples gave 0.43-0.58; with bare-result prompts at T=1, rollouts were right
            8% of the time and 70-90% of groups had no signal).
  Stories: the instruction data's reply continues the user's opener (a reply that retold it began with a training
  opener for held-out ones); validity stays low at every stage (0.004-0.031: goals resolved that were never stated).
  Not shown at this size (README, "Reading"): maj@k clearly above greedy on arithmetic (one deterministic
  derivation per problem: the sampled answers' mode is greedy's answer, maj@16 0.59 vs greedy 0.61 on 256
  problems), the reward model at 0.75.
The tokenizer learns the pretraining mixture only (`data.tokenizer_sources`), so a later stage's data cannot move
an earlier stage. The full variant keeps the same data at 300 people and 2-3x the steps (not re-tuned: its DPO, 200
steps at 1e-4, may cost facts as the quick one did at 2e-4).
"""

from llmstages import config as config_lib
from llmstages import data


def data_specs(mixture: str) -> list[str]:
  return [spec for spec, _ in data.parse_mixture(mixture)]

ARGS = {"ppo", "quick", "smoke", "people=N"}


def get_config(arg: str = ""):
  flags, values = config_lib.parse_args(arg, ARGS, "configs/pipeline.py")
  return build(flags, **values)


def build(opts: set[str], people: int | None = None):
  quick, smoke = "quick" in opts, "smoke" in opts
  n = people or (100 if smoke else 64 if quick else 300)
  if n < 8:
    raise ValueError(f"configs/pipeline.py: people={n}; needs at least 8 (QA-train and QA-test halves)")
  n_new = max(n // 5, 2) if people else (20 if smoke else 16 if quick else 100)
  bios = f"bios(n={n},format=multi_permute,n_new={n_new})"
  bios_qa = bios.replace("bios(", "bios_qa(")
  stories = f"stories(bios_n={n})"
  # Addition of 1-2 digit numbers with a digit-level scratchpad: a size this model half-learns (2-3 digit +/- stays
  # at 0). The chat tasks, preference pairs and GRPO prompts use the same problems (the evaluator's held out).
  digits = dict(min_digits=1, max_digits=2, n_train=2000, n_validation=400, ops="+")
  arith = "arith_scratchpad(" + ",".join(f"{k}={v}" for k, v in digits.items()) + ")"
  arith_args = ",".join(f"arith_{k}={v}" for k, v in digits.items())
  # No world tasks (no stage teaches geography, so they only teach guessing).
  chat_args = (f"bios_n={n},n_train={400 if smoke else 3000},n_validation={50 if smoke else 300},w_world=0,"
               f"{arith_args}")
  # One user turn, no system prompt, as the evaluators and GRPO ask: this model finds a question's digits by their
  # position (chat arithmetic fell from 0.39 to 0.02 after instruction tuning with 30% system prompts and 20% earlier
  # turns before the question).
  chat_args += ",w_bios=0.4,w_arith=0.3,w_story=0.3,system_fraction=0,multi_turn_fraction=0"
  instructions, preferences = f"instructions({chat_args})", f"preferences({chat_args})"
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                      max_seq_len=256))
  # Mixed training (Physics of LMs 3.1): QA of the QA-train people next to every biography, so that QA on the
  # QA-test people (seen only in biographies) is extraction rather than zero.
  pretraining = f"{bios}:0.45,{bios_qa}:0.15,{arith}:0.2,{stories}:0.2"
  facts_and_stories = ("perplexity", "bios_facts", "arith", "diversity")
  stage = config_lib.stage_config
  c.pretrain = stage("pretrain", steps=1200, batch_size=8, seq_len=256, learning_rate=3e-3, warmup_steps=50,
                     data=pretraining, eval_every=200, checkpoint_every=200, log_every=20,
                     evals=facts_and_stories + ("capacity",))
  c.cpt = stage("cpt", steps=300, batch_size=16, seq_len=128, learning_rate=1e-3, warmup_steps=20,
                data=bios.replace("bios(", "bios_new("), replay=0.25, init_from="pretrain", eval_every=100,
                checkpoint_every=100, log_every=20, evals=facts_and_stories + ("capacity",))
  c.sft = stage("sft", steps=300, batch_size=8, seq_len=256, learning_rate=5e-4, warmup_steps=20,
                data=f"{bios_qa}:0.3,stories_sft(bios_n={n}):0.3,{arith}:0.4",
                init_from="cpt", eval_every=100, checkpoint_every=100, log_every=20, evals=facts_and_stories)
  c.instruct = stage("instruct", steps=300, batch_size=8, seq_len=256, learning_rate=5e-4, warmup_steps=20,
                     data=instructions, init_from="sft", eval_every=100, checkpoint_every=100,
                     log_every=20, evals=facts_and_stories)
  c.reward = stage("reward", steps=200, batch_size=8, seq_len=256, learning_rate=3e-4, warmup_steps=20,
                   data=preferences, init_from="instruct", eval_every=50, checkpoint_every=100,
                   log_every=10, eval_steps=4, evals=("stage",))
  c.dpo = stage("dpo", steps=200, batch_size=8, seq_len=256, learning_rate=1e-4, warmup_steps=10,
                data=preferences, init_from="instruct", eval_every=50, checkpoint_every=100,
                log_every=10, eval_steps=4, evals=facts_and_stories + ("stage",))
  c.ppo = stage("ppo", steps=100, batch_size=16, seq_len=128, learning_rate=5e-5, warmup_steps=5,
                data=preferences, init_from="instruct", eval_every=50, checkpoint_every=50,
                log_every=5, eval_steps=1, evals=facts_and_stories + ("stage",))
  c.ppo.rl.update(dict(num_generations=4, max_new_tokens=48, temperature=1.0, reward_from="reward"))
  c.grpo = stage("grpo", steps=100, batch_size=32, seq_len=128, learning_rate=5e-5, warmup_steps=5,
                 data=preferences, init_from="ppo" if "ppo" in opts else "dpo", eval_every=50,
                 checkpoint_every=50, log_every=5, eval_steps=1, evals=facts_and_stories + ("stage",))
  c.grpo.rl.update(dict(num_generations=8, max_new_tokens=48, temperature=1.0, kinds=("arith", "bios", "world")))
  middle = ("reward", "ppo") if "ppo" in opts else ("reward", "dpo")
  c.stages = ("pretrain", "cpt", "sft", "instruct") + middle + ("grpo",)
  c.eval.update(dict(bios=bios, arith=arith, stories=stories, num_prompts=32, samples=4,
                     pass_k=(1, 4), story_tokens=192, perplexity_data=pretraining))
  if quick:
    steps = dict(pretrain=500, cpt=60, sft=100, instruct=120, reward=80, dpo=80, ppo=20, grpo=30)
    for name, s in steps.items():
      c[name].steps = s
      c[name].eval_every = s
      c[name].checkpoint_every = s
    c.cpt.evals = facts_and_stories  # Capacity once, after pretraining: it re-reads the whole bios corpus.
    c.cpt.replay = 0.5  # 16 new people need few steps; half the batch keeps the old people, arithmetic and stories.
    # T=0.5: sampled scratchpads and stories go wrong less often, so maj@k can beat greedy on arithmetic.
    c.eval.update(dict(num_prompts=64, temperature=0.5))
    for name in ("reward", "dpo"):
      c[name].eval_steps = 32  # The 256 held-out pairs that fit in 256 tokens (64 left DPO +-0.11 around its floor).
    # GRPO's held-out rollout reward on 66 prompts (11 steps of 6 prompts x 16 samples), not 6.
    c.grpo.eval_steps = 11
    if not smoke:
      # LoRA (rank 16) at lr 3e-3: the zero-initialized head learns fast while the decoder moves little. Held-out
      # (296 pairs): 0.63, full fine-tuning 0.55 at lr 3e-4, 0.52 at 1e-3 (64 pairs), and 160 steps lowered both
      # (0.50-0.53: it fits the QA-train people and training openers, not what tells pairs apart).
      c.reward.update(dict(learning_rate=3e-3, warmup_steps=10))
      c.reward.lora.rank = 16
      # beta 0.5, 80 steps: held-out 0.77 (296 pairs) with QA-train 0.92; beta 0.1 gave 0.70 at 60 steps, 0.76 at 80
      # with QA-train 0.86.
      c.dpo.dpo.beta = 0.5
    # GRPO on arithmetic only: the facts of QA-train people are all answered right (every group's std is 0).
    # Only "Show your work." prompts, as the arith evaluator asks: bare-result prompts are right ~5% of the time
    # (no group signal) and pull the policy toward answering without the scratchpad. 64 new tokens fit a scratchpad
    # with a final carry (55 tokens; 48 cut every sum >= 100), T=0.7 and lr 5e-5 (2e-4 drove KL to 0.26 and the
    # reward down in 15 steps). 16 samples for each of 6 prompts: a problem solved with probability p gives a group
    # without signal with probability p^n + (1-p)^n. From one DPO checkpoint, 96 rows a step (30 steps): n=12 x 8
    # prompts, frac_zero_std 0.43-0.58 (mean 0.51), held-out 0.27; n=16 x 6: 0.23-0.50 (mean 0.41), held-out 0.31;
    # n=24 x 4: 0.10-0.50 (mean 0.29) but the rollout reward swings with so few problems and held-out 0.27; T=1.0
    # at n=12: 0.38-0.65, held-out 0.30.
    if not smoke:
      arith_only = chat_args.replace("w_bios=0.4,w_arith=0.3,w_story=0.3", "w_bios=0,w_arith=1,w_story=0")
      c.grpo.data = f"preferences({arith_only},arith_scratchpad_fraction=1.0)"
    c.grpo.update(dict(steps=30, batch_size=96, learning_rate=5e-5, checkpoint_every=30))
    c.grpo.rl.update(dict(kinds=("arith",), temperature=0.7, max_new_tokens=64, num_generations=16))
  if not smoke:
    # The tokenizer learns the pretraining mixture only, so later stages' data (GRPO's re-cut preferences, an
    # edited instruction corpus) cannot change it, nor through it any stage before them.
    c.data.tokenizer_sources = ",".join(data_specs(c.pretrain.data))
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
