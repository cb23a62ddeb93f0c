"""The sweep report: numbers against the runs' eval.json files, paired differences, and both plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from llmstages import compare
from tests.test_sweep import ROOT, _env, smoke_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_sweep(directory, values: dict) -> None:
  """A sweep directory as `llmstages.sweep` leaves it; values[(setting, seed)][stage][metric] = value."""
  runs = []
  for (setting, seed), stages in values.items():
    h = f"{setting}-{seed}"
    runs.append({"setting": setting, "seed": seed, "overrides": {}, "hash": h})
    rd = os.path.join(directory, "runs", h)
    os.makedirs(rd)
    with open(os.path.join(rd, "result.json"), "w") as f:
      json.dump({"host": "testhost", "devices": "1 x cpu"}, f)
    for stage, metrics in stages.items():
      os.makedirs(os.path.join(rd, stage))
      with open(os.path.join(rd, stage, "eval.json"), "w") as f:
        json.dump({"metrics": {k: {"value": v, "n": 4} for k, v in metrics.items()}}, f)
  runs.append({"setting": "b", "seed": 9, "overrides": {}, "hash": "unfinished"})
  with open(os.path.join(directory, "sweep.json"), "w") as f:
    json.dump({"experiment": "fake:smoke", "description": "A fake sweep.", "metrics": ["acc", "div"],
               "pareto": ["div", "acc"], "baseline": "a", "stages": ["s1", "s2"], "runs": runs,
               "command": "python -m llmstages.sweep --experiment=fake"}, f)


def test_report_numbers_are_seed_means_and_paired_differences(tmp_path):
  rng = np.random.default_rng(0)
  values = {}
  for seed in range(3):
    base = rng.normal(0.5, 0.1)
    values[("a", seed)] = {"s1": {"acc": base, "div": 0.2}, "s2": {"acc": base + 0.1, "div": 0.3}}
    values[("b", seed)] = {"s1": {"acc": base + 0.2, "div": 0.2 + 0.01 * seed}, "s2": {"acc": base, "div": 0.4}}
  _fake_sweep(tmp_path, values)
  out = compare.compare(str(tmp_path), str(tmp_path / "out" / "r.md"), command="python -m llmstages.compare X")
  table, paired = out["summary"]["table"], out["summary"]["paired"]
  for setting in ("a", "b"):
    for stage in ("s1", "s2"):
      for m in ("acc", "div"):
        seeds = [values[(setting, s)][stage][m] for s in range(3)]
        row = table[stage][setting][m]
        assert row["n"] == 3 and np.isclose(row["mean"], np.mean(seeds))
        assert row["lo"] <= row["mean"] <= row["hi"]
        assert min(seeds) - 1e-12 <= row["lo"] and row["hi"] <= max(seeds) + 1e-12
  # b - a is exactly +0.2 on every seed after s1: the interval is that point and excludes 0; after s2 it is -0.1.
  d = paired["s1"]["b"]["acc"]
  assert np.isclose(d["mean"], 0.2) and np.isclose(d["lo"], 0.2) and np.isclose(d["hi"], 0.2) and d["claim"]
  assert np.isclose(paired["s2"]["b"]["acc"]["mean"], -0.1) and paired["s2"]["b"]["acc"]["claim"]
  assert paired["s1"]["b"]["div"]["lo"] == 0.0 and not paired["s1"]["b"]["div"]["claim"]  # Touches 0.
  assert "a" not in paired["s1"]  # No difference of the baseline with itself.
  text = open(out["paths"]["report"]).read()
  assert "python -m llmstages.compare X" in text and "testhost" in text and "6 of 7 planned runs finished" in text
  assert "b seed 9: runs/unfinished" in text and "+0.2 [0.2, 0.2] *" in text
  for key in ("pareto", "trajectory"):
    with open(out["paths"][key], "rb") as f:
      assert f.read(8) == PNG
  with open(out["paths"]["json"]) as f:
    assert np.isclose(json.load(f)["table"]["s2"]["b"]["div"]["mean"], 0.4)


def test_compare_on_a_finished_smoke_sweep(tmp_path_factory, tmp_path):
  workdir, _ = smoke_sweep(tmp_path_factory)
  report = tmp_path / "report" / "smoke.md"
  out = subprocess.run([sys.executable, "-m", "llmstages.compare", workdir, "--out", str(report)], env=_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  for path in (report, tmp_path / "report" / "smoke.pareto.png", tmp_path / "report" / "smoke.trajectory.png"):
    assert path.exists(), out.stdout
  assert (tmp_path / "report" / "smoke.pareto.png").read_bytes()[:8] == PNG
  text = report.read_text()
  assert f"python -m llmstages.compare {workdir} --out {report}" in text
  assert "CPUs" in text and "4 of 4 planned runs finished" in text
  with open(os.path.join(workdir, "sweep.json")) as f:
    sweep = json.load(f)
  summary = json.loads((tmp_path / "report" / "smoke.json").read_text())
  assert summary["stages"] == ["pretrain", "cpt"] and sweep["baseline"] == "none"
  checked = 0
  for stage in sweep["stages"]:
    for setting in ("none", "dropout@pretrain"):
      hashes = [r["hash"] for r in sweep["runs"] if r["setting"] == setting]
      evals = []
      for h in hashes:
        with open(os.path.join(workdir, "runs", h, stage, "eval.json")) as f:
          evals.append(json.load(f)["metrics"])
      for metric in sweep["metrics"]:
        row = summary["table"][stage][setting][metric]
        assert np.isclose(row["mean"], np.mean([e[metric]["value"] for e in evals])), (stage, setting, metric)
        assert f"{row['mean']:.4g}" in text
        checked += 1
  assert checked == 2 * 2 * len(sweep["metrics"])


def test_stages_of_two_routes_merge_in_order():
  dpo = ["pretrain", "sft", "instruct", "reward", "dpo", "grpo"]
  ppo = ["pretrain", "sft", "instruct", "reward", "ppo", "grpo"]
  merged = compare.merge_stage_orders([dpo, ppo])
  assert merged == ["pretrain", "sft", "instruct", "reward", "ppo", "dpo", "grpo"]
  for route in (dpo, ppo):  # Each route's own order survives.
    assert [s for s in merged if s in route] == route
  assert compare.merge_stage_orders([["a", "b"], ["a", "b"]]) == ["a", "b"]
