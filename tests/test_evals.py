"""Evaluators: direction (a trained model beats its untrained self), eval.json contents, errors, generate CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmstages import evals, pipeline
from llmstages.evals.evaluators import answer_text
from tests.helpers import load_config, one_device_mesh

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
  return out


def test_trained_model_recalls_facts_its_untrained_self_does_not(runs):
  (_, before), (_, after) = runs["untrained"], runs["trained"]
  assert before["bios_facts/qa_train/greedy"]["value"] == 0.0
  assert after["bios_facts/qa_train/greedy"]["value"] >= 0.5
  assert before["bios_facts/memorization/mean_greedy"]["value"] == 0.0
  assert after["bios_facts/memorization/mean_greedy"]["value"] >= 0.5
  assert after["bios_facts/qa_train/pass@4"]["value"] >= after["bios_facts/qa_train/pass@1"]["value"]


def test_capacity_is_bounded_and_rises_with_training(runs):
  (_, before), (_, after) = runs["untrained"], runs["trained"]
  assert before["capacity/R"]["value"] <= 0.0  # An untrained model stores nothing.
  for m in (before, after):
    assert m["capacity/R"]["value"] <= m["capacity/R_max"]["value"]
  assert after["capacity/R"]["value"] > before["capacity/R"]["value"] + 0.01
  assert after["capacity/p2_nats"]["value"] < before["capacity/p2_nats"]["value"]


def test_eval_json_has_counts_and_intervals(runs):
  _, m = runs["trained"]
  greedy = m["bios_facts/qa_test/greedy"]
  assert greedy["n"] == 12 and len(greedy["ci95"]) == 2
  assert greedy["ci95"][0] <= greedy["value"] <= greedy["ci95"][1]


def test_generate_cli_votes(runs):
  workdir, _ = runs["trained"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-m", "llmstages.generate", f"--workdir={workdir}", "--stage=pretrain",
                      "--prompt=What is the birth city of Nobody Known Here?", "--num_samples=3",
                      "--temperature=0.7", "--vote", "--max_new_tokens=8"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "vote:" in r.stdout and "of 3 samples" in r.stdout


def test_generate_missing_stage_checkpoint_is_named(tmp_path, runs):
  workdir, _ = runs["untrained"]
  from llmstages import generate
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  os.remove(copy / "pretrain" / "final.json")
  with pytest.raises(FileNotFoundError, match="no final checkpoint of stage 'pretrain'"):
    generate.generate(str(copy), "pretrain", ["hi"], max_new_tokens=2)


def test_unknown_evaluator_fails_before_training(tmp_path):
  c = load_config("quickstart.py", "smoke", **{"data.dir": str(tmp_path / "d"), "stages": ("pretrain",),
                                              "pretrain.evals": ("perplexity", "bleurt")})
  with pytest.raises(ValueError, match="unknown evaluator 'bleurt'; known evaluators: .*capacity"):
    pipeline.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "pretrain")


def test_answer_text():
  assert answer_text(" Sledepriohaven") == "Sledepriohaven"
  assert answer_text(" March 18, 2047. She was") == "March 18, 2047"
  assert answer_text(" Paris\nMore") == "Paris"
