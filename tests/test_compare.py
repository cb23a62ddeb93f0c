"""The sweep report: numbers against the runs' eval.json files, paired differences, and both plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmstages import compare
from tests.test_sweep import ROOT, _env, smoke_sweep

T_975_2DF = 4.302652729749464  # Student-t 97.5% quantile, 2 degrees of freedom (3 seeds), from tables.

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
        half = T_975_2DF * np.std(seeds, ddof=1) / np.sqrt(3)
        assert row["n"] == 3 and np.isclose(row["mean"], np.mean(seeds))
        np.testing.assert_allclose([row["lo"], row["hi"]], [np.mean(seeds) - half, np.mean(seeds) + half], atol=1e-12)
  # b - a is exactly +0.2 on every seed after s1: the interval is that point and excludes 0; after s2 it is -0.1.
  d = paired["s1"]["b"]["acc"]
  assert np.isclose(d["mean"], 0.2) and np.isclose(d["lo"], 0.2) and np.isclose(d["hi"], 0.2) and d["claim"]
  assert np.isclose(paired["s2"]["b"]["acc"]["mean"], -0.1) and paired["s2"]["b"]["acc"]["claim"]
  # Differences 0, 0.01, 0.02 share a sign (the old percentile bootstrap claimed them); the t-interval
  # 0.01 -+ 4.303 * 0.01 / sqrt(3) does not exclude 0.
  d = paired["s1"]["b"]["div"]
  np.testing.assert_allclose([d["lo"], d["hi"]], 0.01 + np.array([-1, 1]) * T_975_2DF * 0.01 / np.sqrt(3), atol=1e-12)
  assert not d["claim"]
  assert "a" not in paired["s1"]  # No difference of the baseline with itself.
  text = open(out["paths"]["report"]).read()
  assert "python -m llmstages.compare X" in text and "testhost" in text and "6 of 7 planned runs finished" in text
  assert "b seed 9: runs/unfinished" in text and "+0.2 [0.2, 0.2] *" in text
  assert "paired t-interval over seeds, 95%" in text and out["summary"]["procedure"] in text
  assert "With 3 seeds (most cells) an interval is the mean +- 4.30 standard errors." in text  # t_{0.975, 2}.
  for key in ("pareto", "trajectory"):
    with open(out["paths"][key], "rb") as f:
      assert f.read(8) == PNG
  with open(out["paths"]["json"]) as f:
    assert np.isclose(json.load(f)["table"]["s2"]["b"]["div"]["mean"], 0.4)
  with open(os.path.join(tmp_path, "sweep.json")) as f:  # A report of only `acc`, then `div` asked for.
    sweep = json.load(f)
  with open(os.path.join(tmp_path, "sweep.json"), "w") as f:
    json.dump({**sweep, "metrics": ["acc"], "pareto": []}, f)
  more = compare.compare(str(tmp_path), str(tmp_path / "more.md"), command="X", metrics=("acc", "div"))
  assert more["summary"]["metrics"] == ["acc", "div"]  # After the sweep's own, no duplicate.
  assert np.isclose(more["summary"]["table"]["s2"]["b"]["div"]["mean"], 0.4)
  with pytest.raises(ValueError, match=r"--metrics: \['acc_typo'\] in no run's eval.json"):
    compare.compare(str(tmp_path), str(tmp_path / "typo.md"), command="X", metrics=("acc_typo",))


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


def _claim_rate(rng, n_seeds: int, trials: int, effect: float, noise) -> float:
  """Share of `trials` comparisons that compare.paired_difference (the report's rule) claims. Per seed, both
  settings share a seed effect; each run adds its own noise; `effect` is in standard deviations of the per-seed
  difference."""
  claims = 0
  for _ in range(trials):
    seed_effect = rng.normal(size=n_seeds)
    a_noise, b_noise = noise(rng, n_seeds), noise(rng, n_seeds)
    base = dict(enumerate(seed_effect + b_noise))
    setting = dict(enumerate(seed_effect + a_noise + effect * np.sqrt(2.0)))  # Var(a - b) = 2 for unit noise.
    claims += compare.paired_difference(setting, base)["claim"]
  return claims / trials


def test_claim_rule_has_a_5_percent_false_claim_rate_and_keeps_power():
  rng = np.random.default_rng(0)
  normal = lambda r, n: r.normal(size=n)  # noqa: E731
  skewed = lambda r, n: r.exponential(size=n) - 1.0  # noqa: E731  Unit variance, skewed; a - b is symmetric.
  for n_seeds in range(3, 11):  # 1000 null comparisons at each seed count, 8000 in all.
    rate = _claim_rate(rng, n_seeds, 1000, 0.0, normal)
    assert rate <= 0.07, (n_seeds, rate)  # Nominal 0.05; the percentile bootstrap gave about 0.25 at 3 seeds.
  assert _claim_rate(rng, 3, 1000, 0.0, skewed) <= 0.07
  assert _claim_rate(rng, 5, 1000, 0.0, skewed) <= 0.07
  # Power: +3 standard deviations of the per-seed difference on every seed. Exact (noncentral t): 0.75 at 3 seeds,
  # 0.97 at 4, 0.998 at 5 (the experiments' default); no 5%-level test does much better at 3 seeds.
  assert _claim_rate(rng, 5, 1000, 3.0, normal) >= 0.8
  assert _claim_rate(rng, 4, 1000, 3.0, normal) >= 0.8
  assert _claim_rate(rng, 3, 1000, 3.0, normal) >= 0.65
  assert _claim_rate(rng, 2, 100, 30.0, normal) == 0  # Fewer than MIN_SEEDS_FOR_CLAIM seeds never claim.


def test_paired_difference_uses_the_seeds_both_settings_have():
  d = compare.paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 7: 100.0}, {0: 0.5, 1: 1.5, 2: 2.5, 3: -100.0})
  assert d["n"] == 3 and np.isclose(d["mean"], 0.5) and np.isclose(d["lo"], 0.5) and d["claim"]
  none = compare.paired_difference({0: 1.0}, {1: 1.0})
  assert none["n"] == 0 and not none["claim"] and np.isnan(none["mean"])
  one = compare.paired_difference({0: 5.0}, {0: 1.0})  # One seed: a difference, no interval, no claim.
  assert one["n"] == 1 and one["mean"] == 4.0 and np.isnan(one["lo"]) and not one["claim"]
  assert compare._cell(one, signed=True) == "+4 [n=1]"


def test_a_report_re_renders_from_its_json(tmp_path):
  rng = np.random.default_rng(1)
  values = {(s, seed): {"s1": {"acc": float(rng.normal()), "div": float(rng.normal())},
                        "s2": {"acc": float(rng.normal()), "div": float(rng.normal())}}
            for s in ("a", "b") for seed in range(4)}
  _fake_sweep(tmp_path, values)
  first = compare.compare(str(tmp_path), str(tmp_path / "r.md"), command="python -m llmstages.compare X")
  os.makedirs(tmp_path / "again")
  again = compare.from_json(str(tmp_path / "r.json"), str(tmp_path / "again" / "r.md"), command="from json")
  for key in ("table", "paired", "settings", "stages", "unfinished", "hosts", "seeds", "planned_runs"):
    assert again["summary"][key] == first["summary"][key], key
  first_text = open(first["paths"]["report"]).read().splitlines()
  again_text = open(again["paths"]["report"]).read().splitlines()
  assert [l for l in first_text if "Report made by" not in l] == [l for l in again_text if "Report made by" not in l]
  with open(tmp_path / "r.json") as f:
    old = json.load(f)
  del old["hosts"]
  with open(tmp_path / "old.json", "w") as f:
    json.dump(old, f)
  with pytest.raises(ValueError, match=r"old.json lacks \['hosts'\]"):
    compare.from_json(str(tmp_path / "old.json"))
