r"""Compares the runs of a sweep: per stage, each setting's metrics over seeds, paired differences, and two plots.

  python -m llmstages.compare DIR [--out=REPORT.md]
  python -m llmstages.compare --baseline WORKDIR [--stages=sft,instruct]   (a run with --config.eval.shots=K)

Reads DIR/sweep.json (the experiment's metrics, Pareto pair and baseline, written by `python -m llmstages.sweep`)
and every finished run's DIR/runs/<hash>/{run.json, result.json, <stage>/eval.json}. Per stage and setting, each
metric is the mean over seeds with a 95% percentile-bootstrap interval over seeds (`bootstrap_ci`); every other
setting gets the paired difference against the baseline, paired by seed (`paired_bootstrap_diff`), marked * where
its interval excludes 0 with at least 3 seeds (RESEARCH.md: the claim the report can support). Writes REPORT.md
(default DIR/report.md), REPORT.json with the same numbers, and beside them two PNG plots: REPORT.pareto.png (the
experiment's PARETO pair, e.g. factual accuracy against diversity, with both intervals as error bars, one panel per
stage) and REPORT.trajectory.png (each metric after each stage, one line per setting).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys

import numpy as np
from absl import app, flags

from llmstages.evals import metrics as M

_OUT = flags.DEFINE_string("out", "", "The Markdown report; '' writes DIR/report.md. Plots and JSON go beside it.")
_BASELINE = flags.DEFINE_bool("baseline", False, "DIR is one pipeline's workdir run with eval.shots=K: print each "
                              "stage's 0-shot and K-shot scores side by side (did fine-tuning beat prompting?).")
_STAGES = flags.DEFINE_list("stages", [], "With --baseline: these stages, in this order (the last is 'after'); "
                            "default: every stage with K-shot scores.")

MIN_SEEDS_FOR_CLAIM = 3


def merge_stage_orders(orders: list[list[str]]) -> list[str]:
  """One order of every stage in `orders`, each after its predecessor in its own run: runs of two routes
  (... reward, dpo, grpo) and (... reward, ppo, grpo) give (... reward, ppo, dpo, grpo)."""
  out: list[str] = []
  for order in orders:
    for i, stage in enumerate(order):
      if stage not in out:  # Its predecessor order[i - 1] is in `out` by now.
        out.insert(out.index(order[i - 1]) + 1 if i else 0, stage)
  return out


def load_sweep(directory: str) -> tuple[dict, list[dict]]:
  """(sweep.json, runs): each run's run.json plus 'finished' and 'evals' {stage: {metric: value}}.

  The sweep's 'stages' become the stages the finished runs actually ran (a setting may change `stages`), merged
  in order, keeping those after which some run has a metric the report shows."""
  path = os.path.join(directory, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: DIR must be the --workdir of `python -m llmstages.sweep`")
  with open(path) as f:
    sweep = json.load(f)
  runs = []
  for spec in sweep["runs"]:
    rd = os.path.join(directory, "runs", spec["hash"])
    run = {**spec, "dir": rd, "finished": os.path.exists(os.path.join(rd, "result.json")), "evals": {},
           "result": None}
    if run["finished"]:
      with open(os.path.join(rd, "result.json")) as f:
        run["result"] = json.load(f)
      for stage in run["result"].get("stages") or sweep["stages"]:
        ev = os.path.join(rd, stage, "eval.json")
        if os.path.exists(ev):
          with open(ev) as f:
            run["evals"][stage] = {k: m["value"] for k, m in json.load(f)["metrics"].items()}
    runs.append(run)
  ran = [r["result"].get("stages") or sweep["stages"] for r in runs if r["finished"]]
  merged = merge_stage_orders(ran) if ran else list(sweep["stages"])
  wanted = set(sweep["metrics"]) | set(sweep.get("pareto") or ())
  evaluated = [st for st in merged if any(wanted & set(r["evals"].get(st, {})) for r in runs)]
  sweep["stages"] = evaluated or merged
  return sweep, runs


def _interval(values: list[float], seed: int = 0) -> dict:
  if not values:
    return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
  est, lo, hi = M.bootstrap_ci(np.asarray(values, np.float64), seed=seed)
  return {"mean": est, "lo": lo, "hi": hi, "n": len(values)}


def settings_in_order(runs: list[dict]) -> list[str]:
  out: list[str] = []
  for r in runs:
    if r["setting"] not in out:
      out.append(r["setting"])
  return out


def summarize(sweep: dict, runs: list[dict]) -> dict:
  """Every number of the report: per stage, setting and metric the per-seed values, mean and interval; the paired
  differences against the baseline."""
  metrics, stages, baseline = sweep["metrics"], sweep["stages"], sweep["baseline"]
  wanted = list(dict.fromkeys(list(metrics) + list(sweep.get("pareto") or [])))
  finished = [r for r in runs if r["finished"]]
  settings = settings_in_order(runs)
  per_seed: dict = {}  # stage -> setting -> metric -> {seed: value}
  for stage in stages:
    for setting in settings:
      for metric in wanted:
        vals = {}
        for r in finished:
          v = r["evals"].get(stage, {}).get(metric)
          if r["setting"] == setting and isinstance(v, (int, float)) and math.isfinite(v):
            vals[r["seed"]] = float(v)
        per_seed.setdefault(stage, {}).setdefault(setting, {})[metric] = vals
  table: dict = {}
  paired: dict = {}
  for stage in stages:
    for setting in settings:
      for metric in wanted:
        vals = per_seed[stage][setting][metric]
        seeds = sorted(vals)
        row = _interval([vals[s] for s in seeds])
        table.setdefault(stage, {}).setdefault(setting, {})[metric] = {**row, "values": {str(s): vals[s]
                                                                                         for s in seeds}}
        if setting == baseline or baseline not in per_seed[stage]:
          continue
        base = per_seed[stage][baseline][metric]
        common = sorted(set(vals) & set(base))
        if common:
          est, lo, hi = M.paired_bootstrap_diff(np.array([vals[s] for s in common]),
                                                np.array([base[s] for s in common]))
          diff = {"mean": est, "lo": lo, "hi": hi, "n": len(common),
                  "claim": len(common) >= MIN_SEEDS_FOR_CLAIM and (lo > 0 or hi < 0)}
        else:
          diff = {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "claim": False}
        paired.setdefault(stage, {}).setdefault(setting, {})[metric] = diff
  return {"settings": settings, "table": table, "paired": paired}


def _fmt(x: float) -> str:
  return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _cell(row: dict, signed: bool = False) -> str:
  if row["n"] == 0:
    return "-"
  mean = f"{row['mean']:+.4g}" if signed and math.isfinite(row["mean"]) else _fmt(row["mean"])
  star = " *" if row.get("claim") else ""
  return f"{mean} [{_fmt(row['lo'])}, {_fmt(row['hi'])}]{star}"


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return f"{platform.node()} ({platform.platform()}; {os.cpu_count()} CPUs: {cpu}; Python {platform.python_version()})"


def write_plots(sweep: dict, summary: dict, pareto_path: str, trajectory_path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  stages, settings, table = sweep["stages"], summary["settings"], summary["table"]
  colors = plt.get_cmap("tab20" if len(settings) > 10 else "tab10")
  color = {s: colors(i % colors.N) for i, s in enumerate(settings)}
  x_key, y_key = (sweep.get("pareto") or sweep["metrics"][:2])[:2]

  fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.5), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    points = []
    for s in settings:
      x, y = table[stage][s][x_key], table[stage][s][y_key]
      if x["n"] == 0 or y["n"] == 0:
        continue
      ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["lo"]], [x["hi"] - x["mean"]]],
                  yerr=[[y["mean"] - y["lo"]], [y["hi"] - y["mean"]]], fmt="o", color=color[s], capsize=3,
                  label=f"{s}{' (baseline)' if s == sweep['baseline'] else ''}")
      points.append((x["mean"], y["mean"]))
    front = sorted(p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))
    if len(front) > 1:
      ax.plot(*zip(*front), "--", color="gray", linewidth=1, label="non-dominated (higher is better on both)")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(f"after stage '{stage}'")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.suptitle("mean over seeds, 95% bootstrap interval over seeds on both axes")
  fig.tight_layout()
  fig.savefig(pareto_path, dpi=110, bbox_inches="tight")
  plt.close(fig)

  metrics = sweep["metrics"]
  cols = min(3, len(metrics))
  rows = math.ceil(len(metrics) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  xs = np.arange(len(stages))
  for i, metric in enumerate(metrics):
    ax = axes[i // cols][i % cols]
    for j, s in enumerate(settings):
      rows_ = [table[st][s][metric] for st in stages]
      has = np.array([r["n"] > 0 for r in rows_])  # A setting's line joins the stages it was scored after.
      mean = np.array([r["mean"] for r in rows_])[has]
      lo = np.array([r["lo"] for r in rows_])[has]
      hi = np.array([r["hi"] for r in rows_])[has]
      offset = (j - (len(settings) - 1) / 2) * 0.02  # Keeps overlapping error bars apart.
      ax.errorbar(xs[has] + offset, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=2, color=color[s],
                  label=s)
    ax.set_xticks(xs, stages)
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
  for k in range(len(metrics), rows * cols):
    axes[k // cols][k % cols].axis("off")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.suptitle("each metric after each stage (mean over seeds, 95% bootstrap interval)")
  fig.tight_layout()
  fig.savefig(trajectory_path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def render(sweep: dict, runs: list[dict], summary: dict, command: str, plots: tuple[str, str]) -> str:
  stages, metrics, baseline = sweep["stages"], sweep["metrics"], sweep["baseline"]
  settings = summary["settings"]
  finished = [r for r in runs if r["finished"]]
  hosts = sorted({f"{r['result'].get('host', '?')} ({r['result'].get('devices', '?')})" for r in finished})
  seeds = sorted({r["seed"] for r in runs})
  lines = [
      f"# Sweep report: {sweep['experiment']}", "",
      sweep.get("description", ""), "",
      f"- Report made by `{command}` on {machine()} at {datetime.datetime.now().isoformat(timespec='seconds')}.",
      f"- Runs made by `{sweep.get('command', 'python -m llmstages.sweep')}`; they ran on: "
      f"{', '.join(hosts) or 'none finished'}.",
      f"- {len(finished)} of {len(runs)} planned runs finished ({len(settings)} settings x seeds {seeds}).",
      f"- Each cell: mean over seeds [95% percentile-bootstrap interval over seeds, 1000 resamples]. With 2-3 seeds "
      f"the interval is coarse. Paired differences: setting minus the baseline `{baseline}` on the same seeds; * "
      f"marks an interval that excludes 0 with at least {MIN_SEEDS_FOR_CLAIM} seeds.",
  ]
  missing = [r for r in runs if not r["finished"]]
  if missing:
    lines += ["", "Unfinished runs (not in the numbers):", ""]
    lines += [f"- {r['setting']} seed {r['seed']}: runs/{r['hash']}" for r in missing]
  header = ["| setting | seeds | " + " | ".join(f"`{m}`" for m in metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
  for stage in stages:
    lines += ["", f"## After stage `{stage}`", "", *header]
    for s in settings:
      n = max(summary["table"][stage][s][m]["n"] for m in metrics)
      name = f"{s} (baseline)" if s == baseline else s
      lines.append(f"| {name} | {n} | " + " | ".join(_cell(summary["table"][stage][s][m]) for m in metrics) + " |")
    if stage in summary["paired"]:
      lines += ["", f"Paired difference against `{baseline}` (same seeds):", "", *header]
      for s, row in summary["paired"][stage].items():
        n = max(row[m]["n"] for m in metrics)
        lines.append(f"| {s} | {n} | " + " | ".join(_cell(row[m], signed=True) for m in metrics) + " |")
  x_key, y_key = (sweep.get("pareto") or metrics[:2])[:2]
  lines += ["", "## Plots", "",
            f"`{y_key}` against `{x_key}` per stage, with 95% intervals on both axes; the dashed line joins the "
            f"settings no other setting beats on both:", "", f"![pareto]({os.path.basename(plots[0])})", "",
            "Each metric after each stage, one line per setting:", "", f"![trajectory]({os.path.basename(plots[1])})",
            ""]
  return "\n".join(lines)


def compare(directory: str, out: str = "", command: str = "") -> dict:
  """Writes the report, its JSON and both plots; returns the paths and the summary."""
  sweep, runs = load_sweep(directory)
  out = out or os.path.join(directory, "report.md")
  stem = out[:-3] if out.endswith(".md") else out
  paths = {"report": out, "json": f"{stem}.json", "pareto": f"{stem}.pareto.png",
           "trajectory": f"{stem}.trajectory.png"}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  summary = summarize(sweep, runs)
  write_plots(sweep, summary, paths["pareto"], paths["trajectory"])
  command = command or "python -m llmstages.compare " + " ".join(sys.argv[1:])
  with open(out, "w") as f:
    f.write(render(sweep, runs, summary, command, (paths["pareto"], paths["trajectory"])))
  with open(paths["json"], "w") as f:
    json.dump({"experiment": sweep["experiment"], "baseline": sweep["baseline"], "stages": sweep["stages"],
               "metrics": sweep["metrics"], **summary}, f, indent=2, sort_keys=True)
  return {"paths": paths, "summary": summary}


def baseline_table(workdir: str, stages: list[str] | None = None) -> str:
  """Markdown: one row per scored metric with a K-shot twin (`.../Kshot/greedy`, eval.shots=K), one column pair
  (0-shot, K-shot) per stage that has eval.json, and the last column: the last stage at 0-shot minus the best
  K-shot score of any earlier stage (> 0: fine-tuning beat prompting the model it started from)."""
  import re
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  k = int(config.get("eval", {}).get("shots", 0))
  evals = {}
  for stage in stages or config["stages"]:
    if stage not in config["stages"]:
      raise ValueError(f"--stages: {stage!r} is not a stage of {workdir} ({config['stages']})")
    path = os.path.join(workdir, stage, "eval.json")
    if os.path.exists(path):
      with open(path) as f:
        evals[stage] = {m: v["value"] for m, v in json.load(f)["metrics"].items()}
  if k <= 0 or not evals:
    raise ValueError(f"{workdir}: no K-shot scores (config eval.shots={k}, eval.json in {sorted(evals)}); "
                     "run the pipeline with --config.eval.shots=K and evaluators such as bios_facts or arith")
  shot = re.compile(rf"^(.*?){k}shot/(greedy)$")
  stages = [s for s in evals if any(map(shot.match, evals[s]))]
  if not stages:
    raise ValueError(f"{workdir}: no stage has {k}-shot scores; list bios_facts, world_facts or arith in its evals")
  rows = sorted({m.group(1) + m.group(2) for e in evals.values() for m in map(shot.match, e) if m})
  lines = ["| metric | " + " | ".join(f"{s} 0-shot | {s} {k}-shot" for s in stages)
           + f" | {stages[-1]} 0-shot - best earlier {k}-shot |", "| --- " * (2 * len(stages) + 2) + "|"]
  for metric in rows:
    twin = metric[:-len("greedy")] + f"{k}shot/greedy"
    cells = [evals[s].get(m, float("nan")) for s in stages for m in (metric, twin)]
    earlier = [evals[s].get(twin, float("nan")) for s in stages[:-1]]
    gain = evals[stages[-1]].get(metric, float("nan")) - max(earlier) if earlier else float("nan")
    lines.append(f"| {metric} | " + " | ".join(_fmt(c) for c in cells) + f" | {gain:+.3f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m llmstages.compare DIR [--out=REPORT.md] | --baseline WORKDIR")
  if _BASELINE.value:
    table = baseline_table(argv[1], _STAGES.value or None)
    print(table)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        f.write(table + "\n")
    return
  result = compare(argv[1], _OUT.value)
  print("\n".join(f"wrote {p}" for p in result["paths"].values()))


if __name__ == "__main__":
  app.run(main)
