"""Post-training stages trained by the real loop on generated files, in direction: SFT fits, reward model and
DPO beat chance on held-out pairs, GRPO raises arithmetic reward, PPO raises the reward model's score and reuses
each rollout; a bad preference record names the stage and item. (Identities and errors: test_post.py.)"""

import json
import math
import random
import types

import numpy as np
import pytest

from llmstages import config as config_lib
from llmstages import inputs, pipeline, train
from llmstages import workdir as workdir_lib
from tests.helpers import one_device_mesh, read_metrics


# ---------------------------------------------------------------------------------------------------------------
# Direction: tiny models trained by the real loop on generated files.

GOOD = ["apple", "amber", "arrow", "atlas", "acorn", "anchor", "angel", "ash"]
BAD = ["zebra", "zinc", "zone", "zero", "zeal", "zest", "zigzag", "zoom"]


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return f"file:{path}"


def _pairs(rng, n, combos=None, template="Pick one: {} or {}?"):
  combos = combos or [(a, b) for a in GOOD for b in BAD]
  rows = []
  for _ in range(n):
    a, b = rng.choice(combos)
    options = [a, b] if rng.random() < 0.5 else [b, a]
    rows.append({"prompt": template.format(*options), "completion": f" {a}.", "rejected": f" {b}."})
  return rows


@pytest.fixture(scope="module")
def direction_run(tmp_path_factory):
  """fit (15 of 25 sums) -> grpo (all 25 sums, arith reward); sft (sums + pair prompts) -> reward, dpo, ppo."""
  d = tmp_path_factory.mktemp("post")
  rng = random.Random(0)
  sums = [(a, b) for a in range(5) for b in range(5)]
  # SFT: 15 of the 25 sums, and the pair prompts answered with the word named first: as often the rejected one
  # as the chosen one, so preference stages have room to act, yet deterministic, so SFT can fit it.
  seen = rng.sample(sums, 15)
  sum_rows = [{"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"} for a, b in seen]
  fit = _write_jsonl(d / "fit.jsonl", sum_rows)
  sft = _write_jsonl(d / "sft.jsonl", sum_rows + [{"prompt": row["prompt"], "completion": " " + row["prompt"].split()[2] + "."}
                                                  for row in _pairs(rng, 40)])
  combos = [(a, b) for a in GOOD for b in BAD]
  rng.shuffle(combos)
  prefs = _write_jsonl(d / "prefs.jsonl", _pairs(rng, 200, combos[16:]))
  held_out = _write_jsonl(d / "held_out.jsonl", _pairs(rng, 64, combos[:16]))  # Word pairs no training pair has.
  arith = _write_jsonl(d / "arith.jsonl", [{"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"}
                                           for a, b in sums])
  c = config_lib.base_config()
  c.data.dir = str(d / "data")
  c.model.update(dict(vocab_size=320, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                      max_seq_len=64))
  c.stages = ("fit", "sft", "reward", "dpo", "grpo", "ppo")
  common = dict(batch_size=16, seq_len=32, warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=100,
                eval_steps=4)
  c.fit = config_lib.stage_config("fit", kind="sft", steps=200, learning_rate=3e-3, data=fit, **common)
  c.sft = config_lib.stage_config("sft", steps=250, learning_rate=3e-3, data=sft, **common)
  c.fit.reg.weight_decay = c.sft.reg.weight_decay = 0.0
  c.reward = config_lib.stage_config("reward", steps=40, learning_rate=3e-3, data=prefs, eval_data=held_out,
                                     init_from="sft", **common)
  c.dpo = config_lib.stage_config("dpo", steps=80, learning_rate=1e-3, data=prefs, eval_data=held_out,
                                  init_from="sft", **common)
  c.grpo = config_lib.stage_config("grpo", steps=60, learning_rate=1e-3, data=arith, init_from="fit",
                                   **{**common, "batch_size": 64})
  c.grpo.rl.update(dict(num_generations=8, max_new_tokens=4, rewards=("arith",)))
  c.ppo = config_lib.stage_config("ppo", steps=30, learning_rate=1e-3, data=prefs, init_from="sft", **common)
  c.ppo.rl.update(dict(num_generations=4, max_new_tokens=4, reward_from="reward"))
  c = config_lib.finalize(c)
  workdir = str(d / "run")
  pipeline.run(c, workdir, mesh=one_device_mesh())
  return c, workdir


def _stage_eval(cfg, workdir, stage, params_from):
  """The stage's held-out metrics (its own `evaluate`) with the final parameters of stage `params_from`."""
  ctx = train.build_context(cfg, stage, mesh=one_device_mesh(), tokenizer=inputs.tokenizer_for(cfg))
  ctx = train.load_frozen(ctx, workdir)
  params = workdir_lib.load_final_params(workdir, params_from, ctx.abstract_state.params,
                                         with_head=ctx.stage.score_head and params_from == stage)
  with ctx.activate():
    if set(params) != set(ctx.abstract_state.params):  # A fresh head on the starting LM.
      params = ctx.init_state(params=params).params
    return train.evaluate(ctx, ctx.jit_eval_step(), params)


def test_sft_fits_a_handful_of_examples(direction_run):
  cfg, workdir = direction_run
  loss = read_metrics(workdir, "fit", "train/loss")  # A stage of kind sft on 15 prompt -> completion pairs.
  assert loss[1] > 2.0 and loss[200] < 0.05, (loss[1], loss[200])


def test_reward_model_beats_chance_on_held_out_pairs(direction_run):
  cfg, workdir = direction_run
  start, end = _stage_eval(cfg, workdir, "reward", "sft"), _stage_eval(cfg, workdir, "reward", "reward")
  assert start["eval/accuracy"] == 0.0  # Zero-initialized head: every pair ties.
  assert end["eval/accuracy"] >= 0.8 and end["eval/margin"] > 0, end


def test_dpo_starts_at_log2_and_raises_held_out_preference_accuracy(direction_run):
  cfg, workdir = direction_run
  np.testing.assert_allclose(read_metrics(workdir, "dpo", "train/loss")[1], math.log(2), rtol=1e-6)
  start, end = _stage_eval(cfg, workdir, "dpo", "sft"), _stage_eval(cfg, workdir, "dpo", "dpo")
  assert start["eval/margin"] == 0.0 and start["eval/accuracy"] == 0.0  # Policy = reference.
  assert end["eval/accuracy"] >= 0.8 and end["eval/margin"] > 0, end


def test_grpo_raises_arithmetic_reward_above_its_sft_start(direction_run):
  cfg, workdir = direction_run
  start, end = _stage_eval(cfg, workdir, "grpo", "sft"), _stage_eval(cfg, workdir, "grpo", "grpo")
  assert end["eval/reward"] > start["eval/reward"] + 0.1, (start["eval/reward"], end["eval/reward"])
  assert 0.0 <= read_metrics(workdir, "grpo", "train/frac_zero_std")[60] <= 1.0
  assert end["eval/prompts"] == 4 * 64 // 8  # eval_steps x prompts a step: the n of every held-out RL figure.


def test_stage_figures_count_what_is_independent():
  """n of the `stage` evaluator: held-out prompts for an RL stage (not the tokens its loss averages), pairs for a
  preference stage."""
  from llmstages.evals import loss as eval_loss
  rl = types.SimpleNamespace(stage_loss=lambda: {"eval/loss": 0.01, "eval/count": 4111.0, "eval/reward": 0.25,
                                                 "eval/frac_zero_std": 0.5, "eval/prompts": 6.0})
  assert {k: m.n for k, m in eval_loss.stage_metrics(rl).items()} == {"loss": 6, "reward": 6, "frac_zero_std": 6}
  pairs = types.SimpleNamespace(stage_loss=lambda: {"eval/loss": 0.6, "eval/accuracy": 0.6, "eval/count": 256.0})
  assert {k: m.n for k, m in eval_loss.stage_metrics(pairs).items()} == {"loss": 256, "accuracy": 256}


def test_ppo_raises_the_reward_model_score(direction_run):
  cfg, workdir = direction_run
  start, end = _stage_eval(cfg, workdir, "ppo", "sft"), _stage_eval(cfg, workdir, "ppo", "ppo")
  assert end["eval/reward"] > start["eval/reward"] + 0.1, (start["eval/reward"], end["eval/reward"])


def test_empty_completion_in_a_preference_set_names_stage_and_item(tmp_path):
  rows = _pairs(random.Random(1), 8)
  rows[3]["rejected"] = "  "
  prefs = _write_jsonl(tmp_path / "prefs.jsonl", rows)
  c = config_lib.base_config()
  c.data.dir = str(tmp_path / "data")
  c.model.update(dict(vocab_size=320, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=32,
                      max_seq_len=32))
  c.stages = ("reward",)
  c.reward = config_lib.stage_config("reward", steps=2, batch_size=8, seq_len=32, data=prefs, eval_every=0)
  with pytest.raises(train.TrainingError, match=r"stage reward: bad train data: .*record 3 .*empty rejected"):
    pipeline.run(config_lib.finalize(c), str(tmp_path / "run"), mesh=one_device_mesh())


def test_ppo_reuses_each_rollout_for_updates_per_rollout_steps(direction_run):
  cfg, workdir = direction_run
  assert cfg.ppo.rl.updates_per_rollout == 2
  kl = read_metrics(workdir, "ppo", "train/approx_kl")
  reward = read_metrics(workdir, "ppo", "train/reward")
  assert kl[3] < 1e-6 and kl[5] < 1e-6  # Fresh rollouts: the policy that sampled is the one being trained.
  assert kl[4] > 1e-6 and kl[6] > 1e-6  # Reused: one update later the ratio is off 1 (step 1 has lr 0: warmup).
  assert 1 in reward and 3 in reward and 2 not in reward  # Rollout metrics are logged where the rollout was made.
