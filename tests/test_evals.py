"""Evaluators: direction (a trained model beats its untrained self), eval.json contents, errors, generate CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmstages import data, evals, pipeline, train
from llmstages.evals import capacity, prompts
from llmstages.text import answer_text
from tests.helpers import load_config, one_device_env, one_device_mesh, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIOS = "bios(n=8,format=multi_permute,n_new=4,n_unseen=4)"


def _config(data_dir, steps, lr):
  c = load_config("quickstart.py", "smoke", **{"data.dir": data_dir, "stages": ("pretrain",)})
  c.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128))
  c.pretrain.update(dict(steps=steps, learning_rate=lr, warmup_steps=10, batch_size=16, eval_every=0,
                         checkpoint_every=1000, log_every=50, evals=("bios_facts", "capacity"),
                         data=f"{BIOS}:0.5,{BIOS.replace('bios(', 'bios_qa(')}:0.5"))
  c.data.tokenizer_sources = f"{BIOS},{BIOS.replace('bios(', 'bios_qa(')}"
  c.eval.update(dict(bios=BIOS, num_prompts=12, samples=4, pass_k=(1, 4), max_new_tokens=8))
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("data"))
  out = {}
  for name, steps, lr in (("untrained", 1, 0.0), ("trained", 300, 1e-2)):
    workdir = str(tmp_path_factory.mktemp(name))
    pipeline.run(_config(data_dir, steps, lr), workdir, mesh=one_device_mesh())
    with open(os.path.join(workdir, "pretrain", "eval.json")) as f:
      out[name] = (workdir, json.load(f)["metrics"])
  out["data_dir"] = data_dir
  return out


def test_trained_model_recalls_facts_its_untrained_self_does_not(runs):
  (_, before), (_, after) = runs["untrained"], runs["trained"]
  assert before["bios_facts/qa_train/greedy"]["value"] == 0.0
  assert after["bios_facts/qa_train/greedy"]["value"] >= 0.5
  assert before["bios_facts/memorization/mean_greedy"]["value"] == 0.0
  assert after["bios_facts/memorization/mean_greedy"]["value"] >= 0.5
  assert after["bios_facts/qa_train/pass@4"]["value"] >= after["bios_facts/qa_train/pass@1"]["value"]
  # Continued pretraining's people: never trained on here, so unknown (test_train trains on them).
  assert before["bios_facts/new_people/mean_greedy"]["value"] == 0.0
  assert after["bios_facts/new_people/mean_greedy"]["value"] <= 0.2


def test_continued_pretraining_on_the_new_people_is_measured(runs, tmp_path):
  """cpt on bios_new from the trained model, half of each batch replayed: its new people go from unknown to
  partly memorized (seq_len 128: at 64 the biographies are cut, and their later facts never trained)."""
  shutil.copytree(os.path.join(runs["trained"][0], "pretrain"), tmp_path / "pretrain")
  c = _config(runs["data_dir"], 300, 1e-2)
  c.stages = ("cpt",)
  c.cpt.update(dict(steps=200, learning_rate=1e-2, warmup_steps=10, batch_size=16, seq_len=128, eval_every=0,
                    replay=0.5, checkpoint_every=1000, log_every=100, evals=("bios_facts",),
                    init_from="pretrain", data=BIOS.replace("bios(", "bios_new(")))
  pipeline.run(c, str(tmp_path), mesh=one_device_mesh())
  with open(tmp_path / "cpt" / "eval.json") as f:
    after = json.load(f)["metrics"]
  before = runs["trained"][1]["bios_facts/new_people/mean_greedy"]["value"]
  assert before <= 0.2
  assert after["bios_facts/new_people/mean_greedy"]["value"] >= before + 0.2  # 0.04 -> 0.33 when written.
  assert after["bios_facts/new_people/birth_city/greedy"]["n"] == 4  # The 4 new people.


def test_capacity_is_bounded_and_rises_with_training(runs):
  (_, before), (_, after) = runs["untrained"], runs["trained"]
  assert before["capacity/R"]["value"] <= 0.0  # An untrained model stores nothing.
  for m in (before, after):
    assert m["capacity/R"]["value"] <= m["capacity/R_max"]["value"]
  assert after["capacity/R"]["value"] > before["capacity/R"]["value"] + 0.01
  assert after["capacity/p2_nats"]["value"] < before["capacity/p2_nats"]["value"]


def test_stage_evaluator_reuses_the_loops_evaluation_at_the_last_step(tmp_path, monkeypatch):
  """The loop evaluates at its last step whenever eval_every > 0; the `stage` evaluator then takes those figures
  instead of scoring the same batches with the same parameters again (they equal what it computes), but not
  when the stage's config block has changed since (here `eval_steps`)."""
  c = load_config("quickstart.py", "smoke", **{"data.dir": str(tmp_path / "data"), "stages": ("pretrain",)})
  c.pretrain.update(dict(steps=4, eval_every=4, checkpoint_every=4, batch_size=8, evals=("stage",)))
  workdir = str(tmp_path / "run")
  pipeline.run(c, workdir, mesh=one_device_mesh())
  logged = read_metrics(workdir, "pretrain", "eval/loss")
  with open(os.path.join(workdir, "pretrain", "eval.json")) as f:
    written = json.load(f)["metrics"]
  assert list(logged) == [4] and written["stage/loss"]["value"] == logged[4]
  assert written["stage/loss"]["n"] == read_metrics(workdir, "pretrain", "eval/tokens")[4] > 0

  def scored_again(*args, **kwargs):
    raise AssertionError("the stage evaluator ran the held-out evaluation a second time")

  with monkeypatch.context() as m:
    m.setattr(train, "evaluate", scored_again)
    assert evals.evaluate_stage(c, "pretrain", workdir, force=True)["metrics"] == written
    changed = c.copy_and_resolve_references()
    changed.pretrain.eval_steps = 1
    with pytest.raises(AssertionError, match="a second time"):  # Other settings: computed, not reused.
      evals.evaluate_stage(changed, "pretrain", workdir, force=True)
  # Trained again (here: from scratch, without an evaluation at the last step): the kept figures are dropped, and
  # the evaluator computes them, the same (deterministic, on an 8-device mesh against the loop's one device).
  for kept in ("final.json", "checkpoints", "final_params"):
    path = os.path.join(workdir, "pretrain", kept)
    os.remove(path) if kept.endswith(".json") else shutil.rmtree(path)
  again = c.copy_and_resolve_references()
  again.pretrain.eval_every = 0
  pipeline.run(again, workdir, mesh=one_device_mesh())
  assert not os.path.exists(os.path.join(workdir, "pretrain", "final_eval.json"))
  computed = evals.evaluate_stage(c, "pretrain", workdir, force=True)["metrics"]
  np.testing.assert_allclose(computed["stage/loss"]["value"], written["stage/loss"]["value"], rtol=1e-6)
  assert computed["stage/loss"]["n"] == written["stage/loss"]["n"]


def test_eval_json_has_counts_and_intervals(runs):
  _, m = runs["trained"]
  greedy = m["bios_facts/qa_test/greedy"]
  assert greedy["n"] == 12 and len(greedy["ci95"]) == 2
  assert greedy["ci95"][0] <= greedy["value"] <= greedy["ci95"][1]


def test_generate_cli_votes(runs):
  workdir, _ = runs["trained"]
  env = one_device_env()
  r = subprocess.run([sys.executable, "-m", "llmstages.generate", f"--workdir={workdir}", "--stage=pretrain",
                      "--prompt=What is the birth city of Nobody Known Here?", "--num_samples=3",
                      "--temperature=0.7", "--vote", "--max_new_tokens=8"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "vote:" in r.stdout and "of 3 samples" in r.stdout
  # Library logs stay at WARNING: no orbax INFO lines around the samples.
  assert "NonBlockingMetadataStore" not in r.stdout + r.stderr
  assert not [line for line in r.stderr.splitlines() if line[:1] == "I" and line[1:5].isdigit()], r.stderr[-2000:]


def test_generate_missing_stage_checkpoint_is_named(tmp_path, runs):
  workdir, _ = runs["untrained"]
  from llmstages import load
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  os.remove(copy / "pretrain" / "final.json")
  with pytest.raises(FileNotFoundError, match="no final checkpoint of stage 'pretrain'"):
    load.generate(str(copy), "pretrain", ["hi"], max_new_tokens=2)


def test_unknown_evaluator_fails_before_training(tmp_path):
  c = load_config("quickstart.py", "smoke", **{"data.dir": str(tmp_path / "d"), "stages": ("pretrain",),
                                              "pretrain.evals": ("perplexity", "bleurt")})
  with pytest.raises(ValueError, match="unknown evaluator 'bleurt'; known evaluators: .*capacity"):
    pipeline.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "pretrain")


# --- direction of the world_facts, arith and diversity evaluators ------------------------------------------------
SKILL_BIOS = "bios(n=8)"
WORLD = "world(n_cities=24)"
ARITH = "arith(min_digits=1,max_digits=2,ops=+,n_train=16,n_validation=8)"
STORIES = "stories(bios_n=8,n_train=400,n_validation=50)"


def _write_pairs(path, spec, split, data_dir, limit=None):
  """A JSONL file of the first `limit` prompt/completion records of a corpus split."""
  if not os.path.exists(path):
    src = data.open_source(spec, split, data_dir)
    with open(path, "w") as f:
      for i in range(min(limit or len(src), len(src))):
        rec = src.record(i)
        f.write(json.dumps({"prompt": rec["prompt"], "completion": rec["completion"]}) + "\n")
  return f"file:{path}"


def _skills_config(data_dir, steps, lr):
  """What is trained on is what the evaluators ask: the arith corpus's training sums and the 16 city questions
  `world_facts` poses first, each written to a file (a model this small memorizes them; it does not learn to add
  or the 3,000 questions of the QA corpus), and grammar stories."""
  sums = _write_pairs(os.path.join(data_dir, "sums.jsonl"), ARITH, "train", data_dir)
  cities = _write_pairs(os.path.join(data_dir, "cities.jsonl"), WORLD.replace("world(", "world_qa("), "train",
                        data_dir, limit=16)
  mixture = f"{sums}:0.35,{cities}:0.35,{STORIES}:0.3"
  c = load_config("quickstart.py", "smoke", **{"data.dir": data_dir, "stages": ("pretrain",)})
  c.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128))
  c.pretrain.update(dict(steps=steps, learning_rate=lr, warmup_steps=10, batch_size=16, seq_len=64, eval_every=0,
                         checkpoint_every=1000, log_every=100, evals=("world_facts", "arith", "diversity"),
                         data=mixture))
  c.pretrain.reg.weight_decay = 0.0
  c.data.tokenizer_sources = f"{sums},{cities},{STORIES},{SKILL_BIOS}"
  c.eval.update(dict(bios=SKILL_BIOS, world=WORLD, arith=sums, stories=STORIES, num_prompts=16, samples=4,
                     pass_k=(1, 4), max_new_tokens=6, story_tokens=24, temperature=1.0))
  return c


@pytest.fixture(scope="module")
def skills(tmp_path_factory):
  """A tiny model before (1 step at lr 0) and after 400 steps on city facts with their QA, 1-digit addition and
  grammar stories: (config, workdir, eval.json metrics) of each."""
  data_dir = str(tmp_path_factory.mktemp("data"))
  out = {}
  for name, steps, lr in (("untrained", 1, 0.0), ("trained", 400, 1e-2)):
    c = _skills_config(data_dir, steps, lr)
    workdir = str(tmp_path_factory.mktemp(name))
    pipeline.run(c, workdir, mesh=one_device_mesh())
    with open(os.path.join(workdir, "pretrain", "eval.json")) as f:
      out[name] = (c, workdir, json.load(f)["metrics"])
  return out


def test_world_facts_rise_with_training_on_city_qa(skills):
  before, after = skills["untrained"][2], skills["trained"][2]
  assert before["world_facts/train_templates/greedy"]["value"] <= 0.1
  assert after["world_facts/train_templates/greedy"]["value"] >= 0.5
  assert after["world_facts/train_templates/greedy"]["n"] == 16


def test_arith_rises_with_training_on_addition(skills):
  before, after = skills["untrained"][2], skills["trained"][2]
  assert before["arith/greedy"]["value"] <= 0.1
  assert after["arith/greedy"]["value"] >= before["arith/greedy"]["value"] + 0.3
  assert after["arith/pass@4"]["value"] >= after["arith/pass@1"]["value"]


def test_story_diversity_falls_with_sampling_temperature(skills):
  """The same trained model's k samples per opener: near-greedy sampling repeats itself, T=1 does not."""
  c, workdir, hot = skills["trained"]
  cold_config = c.copy_and_resolve_references()
  cold_config.eval.temperature = 0.05
  cold = evals.evaluate_stage(cold_config, "pretrain", workdir, force=True)["metrics"]
  for key in ("per_input/distinct_2", "per_input/ead"):
    assert hot[f"diversity/{key}"]["value"] >= cold[f"diversity/{key}"]["value"] + 0.1, key
  assert hot["diversity/per_input/distinct_2"]["n"] == 16


def test_answer_text():
  assert answer_text(" Sledepriohaven") == "Sledepriohaven"
  assert answer_text(" March 18, 2047. She was") == "March 18, 2047"
  assert answer_text(" Paris\nMore") == "Paris"


# --- capacity in the trained contexts, and chat-format evaluation -------------------------------------------------
TINY_BIOS = "bios(n=4,format=multi_permute,variants=2,n_new=2,n_unseen=2)"


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
  """A tiny model trained until it has memorized the 8 biographies of 4 people."""
  c = load_config("quickstart.py", "smoke", **{"data.dir": str(tmp_path_factory.mktemp("data")),
                                              "stages": ("pretrain",)})
  c.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128))
  c.pretrain.update(dict(steps=200, learning_rate=1e-2, warmup_steps=10, batch_size=8, seq_len=128, eval_every=0,
                         checkpoint_every=1000, log_every=100, evals=("capacity",), data=TINY_BIOS))
  c.pretrain.reg.weight_decay = 0.0
  c.data.tokenizer_sources = TINY_BIOS
  c.eval.update(dict(bios=TINY_BIOS))
  workdir = str(tmp_path_factory.mktemp("memorized"))
  pipeline.run(c, workdir, mesh=one_device_mesh())
  with open(os.path.join(workdir, "pretrain", "eval.json")) as f:
    return c, json.load(f)["metrics"], workdir


def test_memorization_generates_as_many_tokens_as_the_answer_takes(memorized, tmp_path):
  """The answer is the rest of the training sentence ("Biology during his studies"), often longer than
  `eval.max_new_tokens`: memorization is scored the same whatever that setting (at 2 tokens, which no answer fits,
  the old evaluator scored 0)."""
  c, _, workdir = memorized
  shutil.copytree(os.path.join(workdir, "pretrain"), tmp_path / "pretrain")
  shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
  scores = {}
  for new_tokens in (2, 16):
    forced = c.copy_and_resolve_references()
    forced.eval.max_new_tokens = new_tokens
    forced.pretrain.evals = ("bios_facts",)
    m = evals.evaluate_stage(forced, "pretrain", str(tmp_path), force=True)["metrics"]
    scores[new_tokens] = {k: v["value"] for k, v in m.items() if k.startswith("bios_facts/memorization/")}
  assert scores[2] == scores[16] and scores[16]["bios_facts/memorization/mean_greedy"] >= 0.75, scores


def test_capacity_of_a_model_that_memorized_its_biographies_is_near_r_max(memorized):
  _, m, _ = memorized
  assert m["capacity/renderings_per_person"]["value"] == 2
  assert m["capacity/p2_nats"]["value"] < 1.0  # Of about 33 nats of value information per person.
  assert m["capacity/R"]["value"] >= 0.9 * m["capacity/R_max"]["value"]
  assert m["capacity/R"]["value"] <= m["capacity/R_max"]["value"] + 1e-9


def test_capacity_scores_the_value_and_name_tokens_of_each_training_biography(memorized):
  from llmstages import data, inputs
  from llmstages.data import bios
  c, _, _ = memorized
  info = data.source_info(TINY_BIOS, c.data.dir)
  tok = inputs.tokenizer_for(c)
  people = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")]
  contexts = capacity.bios_contexts(tok, info, people)
  assert len(contexts) == 2 * len(people)
  src = data.open_source(TINY_BIOS, "train", c.data.dir)
  trained = sorted(tuple(data.tokenize_document(tok, src.document(i))[0][:-1]) for i in range(len(src)))
  assert sorted(tuple(ctx["ids"]) for ctx in contexts) == trained  # Exactly the training token sequences.
  for ctx in contexts:
    person = people[ctx["person"]]
    ids = np.asarray(ctx["ids"])
    assert tok.decode(ids[ctx["name"]].tolist()) == person["name"]
    scored = tok.decode(ids[ctx["values"]].tolist())
    for attr in bios.BIT_ATTRIBUTES:
      assert person[attr] in scored
    assert len(ctx["values"]) < len(ids) / 2  # Values and one pronoun, not the template words.


def _chat_config(data_dir):
  chat_data = "instructions(bios_n=4,n_train=400,n_validation=40,w_bios=1,w_world=0,w_arith=0,w_story=0," \
              "system_fraction=0,multi_turn_fraction=0)"
  bios_spec = "bios(n=4)"
  c = load_config("quickstart.py", "smoke", **{"data.dir": data_dir, "stages": ("instruct",)})
  c.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128))
  c.instruct.update(dict(steps=250, learning_rate=1e-2, warmup_steps=10, batch_size=16, seq_len=64, eval_every=0,
                         checkpoint_every=1000, log_every=50, evals=("bios_facts",), data=chat_data, init_from=""))
  c.instruct.reg.weight_decay = 0.0
  c.data.tokenizer_sources = f"{chat_data},{bios_spec}"
  c.eval.update(dict(bios=bios_spec, num_prompts=12, samples=1, max_new_tokens=8))
  return c


def test_an_instruct_tuned_model_is_asked_in_its_chat_template(tmp_path_factory):
  c = _chat_config(str(tmp_path_factory.mktemp("data")))
  workdir = str(tmp_path_factory.mktemp("instruct"))
  pipeline.run(c, workdir, mesh=one_device_mesh())
  with open(os.path.join(workdir, "instruct", "eval.json")) as f:
    auto = json.load(f)
  assert auto["prompt_format"] == "chat"
  scores = {}
  for choice in ("always", "never"):
    forced = c.copy_and_resolve_references()
    forced.eval.chat = choice
    scores[choice] = evals.evaluate_stage(forced, "instruct", workdir, force=True)
  assert scores["never"]["prompt_format"] == "raw"
  chat, raw = (scores[k]["metrics"]["bios_facts/qa_train/greedy"]["value"] for k in ("always", "never"))
  assert chat == auto["metrics"]["bios_facts/qa_train/greedy"]["value"]
  assert chat >= 0.5 and chat > raw + 0.25


def test_prompt_format_follows_the_stage_lineage():
  from llmstages import config as config_lib
  c = config_lib.base_config()
  c.stages = ("pretrain", "sft", "instruct", "dpo", "sft2")
  c.pretrain = config_lib.stage_config("pretrain")
  c.sft = config_lib.stage_config("sft", init_from="pretrain")
  c.instruct = config_lib.stage_config("instruct", init_from="sft")
  c.dpo = config_lib.stage_config("dpo", init_from="instruct")
  c.sft2 = config_lib.stage_config("sft2", kind="sft", init_from="dpo")
  fmt = {s: prompts.prompt_format(c, s) for s in c.stages}
  assert fmt == {"pretrain": "raw", "sft": "raw", "instruct": "chat", "dpo": "chat", "sft2": "chat"}
  c.eval.chat = "never"
  assert prompts.prompt_format(c, "dpo") == "raw"
  c.eval.chat = "sometimes"
  with pytest.raises(ValueError, match="config.eval.chat='sometimes'"):
    prompts.prompt_format(c, "dpo")
