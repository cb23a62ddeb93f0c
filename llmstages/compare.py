r"""Compares the runs of a sweep: per stage, each setting's metrics over seeds, paired differences, and two plots.

  python -m llmstages.compare DIR [--out=REPORT.md] [--metrics=KEY,...]
  python -m llmstages.compare --from_json=REPORT.json [--out=REPORT.md]
  python -m llmstages.compare --baseline WORKDIR [--stages=sft,instruct]   (a run with --config.eval.shots=K)

Reads DIR/sweep.json (metrics, Pareto pair and baseline, written by `python -m llmstages.sweep`) and every finished
run's DIR/runs/<hash>/{run.json, result.json, <stage>/eval.json}. Per stage and setting: each metric's mean over
seeds with a 95% Student-t interval (`interval`), and the difference against the baseline setting, paired by seed,
marked * where its paired t-interval excludes 0 with at least 3 seeds (`paired_difference`; docs/RESEARCH.md: a
5% false-claim rate at every seed count for normal per-seed differences). Writes REPORT.md (default
DIR/report.md), REPORT.json (the same numbers, every per-seed value and the header) and beside them two PNG plots:
REPORT.pareto.png (the PARETO pair, e.g. factual accuracy against diversity, with both intervals, one panel per
stage) and REPORT.trajectory.png (each metric after each stage, one line per setting). `--from_json` recomputes
every interval and claim from an earlier REPORT.json's per-seed values (the sweep directory may be gone) and writes
it all again (default: REPORT.md beside it). `--metrics` adds eval.json keys after the sweep's own (a question the
experiment's METRICS did not list, asked of runs already made). `--baseline`: see `baseline_table`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import sys

import numpy as np
from absl import app, flags

from llmstages import cli
from llmstages.evals import metrics as eval_metrics

_OUT = flags.DEFINE_string("out", "", "The Markdown report; '' writes DIR/report.md. Plots and JSON go beside it.")
_FROM_JSON = flags.DEFINE_string("from_json", "", "Re-render from this REPORT.json's per-seed values, not a DIR.")
_BASELINE = flags.DEFINE_bool("baseline", False, "DIR is one pipeline's workdir run with eval.shots=K: print each "
                              "stage's 0-shot and K-shot scores side by side (did fine-tuning beat prompting?).")
_METRICS = flags.DEFINE_list("metrics", [], "With DIR: also report these eval.json keys, after the sweep's METRICS.")
_STAGES = flags.DEFINE_list("stages", [], "With --baseline: these stages, in this order (the last is 'after'); "
                            "default: every stage with K-shot scores.")

MIN_SEEDS_FOR_CLAIM = 3
ALPHA = 0.05
PROCEDURE = f"paired t-interval over seeds, {1 - ALPHA:.0%}"
# Keys of REPORT.json that `--from_json` needs besides the numbers (older reports lack them: see `from_json`).
HEADER_KEYS = ("description", "sweep_command", "hosts", "seeds", "planned_runs", "unfinished", "pareto")


def merge_stage_orders(orders: list[list[str]]) -> list[str]:
  """One order of every stage in `orders`, each after its predecessor in its own run: runs of two routes
  (... reward, dpo, grpo) and (... reward, ppo, grpo) give (... reward, ppo, dpo, grpo)."""
  out: list[str] = []
  for order in orders:
    for i, stage in enumerate(order):
      if stage not in out:  # Its predecessor order[i - 1] is in `out` by now.
        out.insert(out.index(order[i - 1]) + 1 if i else 0, stage)
  return out


def load_sweep(directory: str, metrics: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
  """(sweep.json, runs): each run's run.json plus 'finished' and 'evals' {stage: {metric: value}}.

  `metrics` join the sweep's 'metrics' (each must be in some run's eval.json). The sweep's 'stages' become
  the stages the finished runs actually ran (a setting may change `stages`), merged in order, keeping those after
  which some run has a metric the report shows."""
  path = os.path.join(directory, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: DIR must be the --workdir of `python -m llmstages.sweep`")
  with open(path) as f:
    sweep = json.load(f)
  runs = []
  for spec in sweep["runs"]:
    run_dir = os.path.join(directory, "runs", spec["hash"])
    run = {**spec, "dir": run_dir, "finished": os.path.exists(os.path.join(run_dir, "result.json")), "evals": {},
           "result": None}
    if run["finished"]:
      with open(os.path.join(run_dir, "result.json")) as f:
        run["result"] = json.load(f)
      for stage in run["result"].get("stages") or sweep["stages"]:
        eval_path = os.path.join(run_dir, stage, "eval.json")
        if os.path.exists(eval_path):
          with open(eval_path) as f:
            run["evals"][stage] = {k: m["value"] for k, m in json.load(f)["metrics"].items()}
    runs.append(run)
  reported = {k for r in runs for stage in r["evals"].values() for k in stage}
  missing = [m for m in metrics if m not in reported]
  if missing:
    raise ValueError(f"--metrics: {missing} in no run's eval.json under {directory}/runs (mistyped, or "
                     f"never evaluated: a run's <stage>/eval.json lists the keys)")
  sweep["metrics"] = list(dict.fromkeys(list(sweep["metrics"]) + list(metrics)))
  ran = [r["result"].get("stages") or sweep["stages"] for r in runs if r["finished"]]
  merged = merge_stage_orders(ran) if ran else list(sweep["stages"])
  wanted = set(sweep["metrics"]) | set(sweep.get("pareto") or ())
  evaluated = [st for st in merged if any(wanted & set(r["evals"].get(st, {})) for r in runs)]
  sweep["stages"] = evaluated or merged
  return sweep, runs


def interval(values: list[float]) -> dict:
  """Mean over seeds and its Student-t interval; bounds are nan with fewer than 2 seeds."""
  if not values:
    return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
  est, lo, hi = eval_metrics.t_interval(values, ALPHA)
  return {"mean": est, "lo": lo, "hi": hi, "n": len(values)}


def paired_difference(values: dict, base: dict) -> dict:
  """The report's claim rule: setting minus baseline over the seeds both have ({seed: value} each), with the
  paired t-interval over seeds; `claim` where it excludes 0 with at least MIN_SEEDS_FOR_CLAIM seeds."""
  common = sorted(set(values) & set(base))
  if not common:
    return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "claim": False}
  est, lo, hi = eval_metrics.paired_t_diff([values[s] for s in common], [base[s] for s in common], ALPHA)
  claim = len(common) >= MIN_SEEDS_FOR_CLAIM and (lo > 0 or hi < 0)
  return {"mean": est, "lo": lo, "hi": hi, "n": len(common), "claim": bool(claim)}


def settings_in_order(runs: list[dict]) -> list[str]:
  return list(dict.fromkeys(r["setting"] for r in runs))


def wanted_metrics(sweep: dict) -> list[str]:
  return list(dict.fromkeys(list(sweep["metrics"]) + list(sweep.get("pareto") or [])))


def per_seed_values(sweep: dict, runs: list[dict]) -> dict:
  """stage -> setting -> metric -> {seed: value} over the finished runs (finite values only)."""
  finished = [r for r in runs if r["finished"]]
  per_seed: dict = {}
  for stage in sweep["stages"]:
    for setting in settings_in_order(runs):
      for metric in wanted_metrics(sweep):
        vals = {}
        for r in finished:
          v = r["evals"].get(stage, {}).get(metric)
          if r["setting"] == setting and isinstance(v, (int, float)) and math.isfinite(v):
            vals[r["seed"]] = float(v)
        per_seed.setdefault(stage, {}).setdefault(setting, {})[metric] = vals
  return per_seed


def summarize(per_seed: dict, stages: list[str], settings: list[str], metrics: list[str], baseline: str) -> dict:
  """Every number of the report: per stage, setting and metric the per-seed values, mean and interval; the paired
  differences against the baseline."""
  table: dict = {}
  paired: dict = {}
  for stage in stages:
    for setting in settings:
      for metric in metrics:
        vals = per_seed[stage][setting][metric]
        row = interval([vals[s] for s in sorted(vals)])
        table.setdefault(stage, {}).setdefault(setting, {})[metric] = {
            **row, "values": {str(s): vals[s] for s in sorted(vals)}}
        if setting == baseline or baseline not in per_seed[stage]:
          continue
        diff = paired_difference(vals, per_seed[stage][baseline][metric])
        paired.setdefault(stage, {}).setdefault(setting, {})[metric] = diff
  return {"settings": settings, "table": table, "paired": paired, "procedure": PROCEDURE}


def report_from_sweep(sweep: dict, runs: list[dict]) -> dict:
  """The report's content: the sweep's header facts and `summarize`'s numbers."""
  finished = [r for r in runs if r["finished"]]
  settings = settings_in_order(runs)
  return {
      "experiment": sweep["experiment"], "description": sweep.get("description", ""), "baseline": sweep["baseline"],
      "stages": sweep["stages"], "metrics": sweep["metrics"], "pareto": list(sweep.get("pareto") or []),
      "sweep_command": sweep.get("command", "python -m llmstages.sweep"),
      "hosts": sorted({f"{r['result'].get('host', '?')} ({r['result'].get('devices', '?')})" for r in finished}),
      "seeds": sorted({r["seed"] for r in runs}), "planned_runs": len(runs),
      "unfinished": [{"setting": r["setting"], "seed": r["seed"], "hash": r["hash"]} for r in runs
                     if not r["finished"]],
      **summarize(per_seed_values(sweep, runs), sweep["stages"], settings, wanted_metrics(sweep), sweep["baseline"])}


def report_from_json(path: str) -> dict:
  """A report recomputed from an earlier REPORT.json: its per-seed values through today's `summarize`."""
  with open(path) as f:
    old = json.load(f)
  missing = [k for k in HEADER_KEYS if k not in old]
  if missing:
    raise ValueError(f"{path} lacks {missing}: it was written before REPORT.json kept the report's header; "
                     f"re-run `python -m llmstages.compare DIR` on the sweep directory")
  per_seed = {stage: {setting: {metric: {int(seed): v for seed, v in row["values"].items()}
                                for metric, row in rows.items()}
                      for setting, rows in by_setting.items()}
              for stage, by_setting in old["table"].items()}
  metrics = list(dict.fromkeys(list(old["metrics"]) + list(old["pareto"])))
  return {**{k: old[k] for k in ("experiment", "baseline", "stages", "metrics", *HEADER_KEYS)},
          **summarize(per_seed, old["stages"], old["settings"], metrics, old["baseline"])}


def _fmt(x: float) -> str:
  return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _cell(row: dict, signed: bool = False) -> str:
  if row["n"] == 0:
    return "-"
  mean = f"{row['mean']:+.4g}" if signed and math.isfinite(row["mean"]) else _fmt(row["mean"])
  star = " *" if row.get("claim") else ""
  if not (math.isfinite(row["lo"]) and math.isfinite(row["hi"])):
    return f"{mean} [n={row['n']}]"  # One seed: no interval.
  return f"{mean} [{_fmt(row['lo'])}, {_fmt(row['hi'])}]{star}"


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # No /proc off Linux.
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return f"{platform.node()} ({platform.platform()}; {os.cpu_count()} CPUs: {cpu}; Python {platform.python_version()})"


def _error(row: dict) -> list[list[float]]:
  """Error-bar lengths below and above the mean; 0 where there is no interval (one seed)."""
  below, above = row["mean"] - row["lo"], row["hi"] - row["mean"]
  return [[below if math.isfinite(below) else 0.0], [above if math.isfinite(above) else 0.0]]


def write_plots(report: dict, pareto_path: str, trajectory_path: str) -> None:
  import matplotlib  # Imported here, not at the top: the module's slowest import, and only plots need it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # Plotting only (see above).
  colors = plt.get_cmap("tab20" if len(report["settings"]) > 10 else "tab10")
  color = {s: colors(i % colors.N) for i, s in enumerate(report["settings"])}
  for draw, path in ((_pareto_plot, pareto_path), (_trajectory_plot, trajectory_path)):
    fig = draw(plt, report, color)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pareto_plot(plt, report: dict, color: dict):
  """One panel per stage: the PARETO pair of every setting, with intervals, and the non-dominated front."""
  stages, table = report["stages"], report["table"]
  x_key, y_key = (report["pareto"] or report["metrics"][:2])[:2]
  fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.5), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    points = []
    for s in report["settings"]:
      x, y = table[stage][s][x_key], table[stage][s][y_key]
      if x["n"] == 0 or y["n"] == 0:
        continue
      ax.errorbar(x["mean"], y["mean"], xerr=_error(x), yerr=_error(y), fmt="o", color=color[s], capsize=3,
                  label=f"{s}{' (baseline)' if s == report['baseline'] else ''}")
      points.append((x["mean"], y["mean"]))
    front = sorted(p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))
    if len(front) > 1:
      ax.plot(*zip(*front), "--", color="gray", linewidth=1, label="non-dominated (higher is better on both)")
    ax.set(xlabel=x_key, ylabel=y_key, title=f"after stage '{stage}'")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.suptitle(f"mean over seeds, {1 - ALPHA:.0%} t-interval over seeds on both axes")
  return fig


def _trajectory_plot(plt, report: dict, color: dict):
  """One panel per metric: its value after each stage, one line per setting."""
  stages, settings, metrics = report["stages"], report["settings"], report["metrics"]
  cols = min(3, len(metrics))
  rows = math.ceil(len(metrics) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  xs = np.arange(len(stages))
  for i, metric in enumerate(metrics):
    ax = axes[i // cols][i % cols]
    for j, s in enumerate(settings):
      cells = [report["table"][st][s][metric] for st in stages]
      has = np.array([c["n"] > 0 for c in cells])  # A setting's line joins the stages it was scored after.
      mean = np.array([c["mean"] for c in cells])[has]
      err = np.array([np.ravel(_error(c)) for c in cells]).reshape(-1, 2)[has].T
      offset = (j - (len(settings) - 1) / 2) * 0.02  # Keeps overlapping error bars apart.
      ax.errorbar(xs[has] + offset, mean, yerr=err, marker="o", capsize=2, color=color[s], label=s)
    ax.set_xticks(xs, stages)
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
  for k in range(len(metrics), rows * cols):
    axes[k // cols][k % cols].axis("off")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.suptitle(f"each metric after each stage (mean over seeds, {1 - ALPHA:.0%} t-interval)")
  return fig


def _interval_width(report: dict) -> str:
  """How wide an interval is at the seed count of most cells (finished seeds: a cell's `n`)."""
  counts = [cell["n"] for stage in report["table"].values() for setting in stage.values() for cell in setting.values()]
  if not counts:
    return ""
  n = max(set(counts), key=counts.count)
  if n < 2:
    return f"With {n} seed there is no interval."
  t = eval_metrics.t_quantile(n, ALPHA)
  return f"With {n} seeds (most cells) an interval is the mean +- {t:.2f} standard errors."


def render(report: dict, command: str, plots: tuple[str, str]) -> str:
  stages, metrics, baseline, settings = report["stages"], report["metrics"], report["baseline"], report["settings"]
  finished = report["planned_runs"] - len(report["unfinished"])
  lines = [
      f"# Sweep report: {report['experiment']}", "", report["description"], "",
      f"- Report made by `{command}` on {machine()} at {datetime.datetime.now().isoformat(timespec='seconds')}.",
      f"- Runs made by `{report['sweep_command']}`; they ran on: {', '.join(report['hosts']) or 'none finished'}.",
      f"- {finished} of {report['planned_runs']} planned runs finished ({len(settings)} settings x seeds "
      f"{report['seeds']}).",
      f"- Each cell: mean over seeds [{1 - ALPHA:.0%} Student-t interval over seeds]. Paired differences: setting "
      f"minus the baseline `{baseline}` on the same seeds, with the {report['procedure']}; * marks an interval "
      f"that excludes 0 with at least {MIN_SEEDS_FOR_CLAIM} seeds (a {ALPHA:.0%} false-claim rate per cell when "
      f"the two settings do not differ). {_interval_width(report)}",
  ]
  if report["unfinished"]:
    lines += ["", "Unfinished runs (not in the numbers):", ""]
    lines += [f"- {r['setting']} seed {r['seed']}: runs/{r['hash']}" for r in report["unfinished"]]
  header = ["| setting | seeds | " + " | ".join(f"`{m}`" for m in metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
  for stage in stages:
    lines += ["", f"## After stage `{stage}`", "", *header]
    for s in settings:
      n = max(report["table"][stage][s][m]["n"] for m in metrics)
      name = f"{s} (baseline)" if s == baseline else s
      lines.append(f"| {name} | {n} | " + " | ".join(_cell(report["table"][stage][s][m]) for m in metrics) + " |")
    if stage in report["paired"]:
      lines += ["", f"Paired difference against `{baseline}` (same seeds; {report['procedure']}):", "", *header]
      for s, row in report["paired"][stage].items():
        n = max(row[m]["n"] for m in metrics)
        lines.append(f"| {s} | {n} | " + " | ".join(_cell(row[m], signed=True) for m in metrics) + " |")
  x_key, y_key = (report["pareto"] or metrics[:2])[:2]
  lines += ["", "## Plots", "",
            f"`{y_key}` against `{x_key}` per stage, with {1 - ALPHA:.0%} intervals on both axes; the dashed line "
            f"joins the settings no other setting beats on both:", "", f"![pareto]({os.path.basename(plots[0])})",
            "", "Each metric after each stage, one line per setting:", "",
            f"![trajectory]({os.path.basename(plots[1])})", ""]
  return "\n".join(lines)


def write(report: dict, out: str, command: str) -> dict:
  """Writes REPORT.md, REPORT.json and both plots; returns their paths."""
  stem = out[:-3] if out.endswith(".md") else out
  paths = {"report": out, "json": f"{stem}.json", "pareto": f"{stem}.pareto.png",
           "trajectory": f"{stem}.trajectory.png"}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  write_plots(report, paths["pareto"], paths["trajectory"])
  with open(out, "w") as f:
    f.write(render(report, command, (paths["pareto"], paths["trajectory"])))
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return paths


def compare(directory: str, out: str = "", command: str = "", metrics: tuple[str, ...] = ()) -> dict:
  """Writes the report of the sweep in `directory`, its JSON and both plots; returns the paths and the summary.
  `metrics`: eval.json keys to report after the sweep's own."""
  report = report_from_sweep(*load_sweep(directory, metrics))
  command = command or "python -m llmstages.compare " + " ".join(sys.argv[1:])
  return {"paths": write(report, out or os.path.join(directory, "report.md"), command), "summary": report}


def from_json(path: str, out: str = "", command: str = "") -> dict:
  """Re-renders an earlier report from the per-seed values in its REPORT.json (see `report_from_json`)."""
  report = report_from_json(path)
  command = command or "python -m llmstages.compare " + " ".join(sys.argv[1:])
  out = out or (path[:-5] if path.endswith(".json") else path) + ".md"
  return {"paths": write(report, out, command), "summary": report}


def baseline_table(workdir: str, stages: list[str] | None = None) -> str:
  """Markdown: one row per scored metric with a K-shot twin (`.../Kshot/greedy`, eval.shots=K), one column pair
  (0-shot, K-shot) per stage that has eval.json, and the last column: the last stage at 0-shot minus the best
  K-shot score of any earlier stage (> 0: fine-tuning beat prompting the model it started from)."""
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
  if _FROM_JSON.value:
    if len(argv) != 1:
      raise app.UsageError("usage: python -m llmstages.compare --from_json=REPORT.json [--out=REPORT.md] (no DIR)")
    result = from_json(_FROM_JSON.value, _OUT.value)
  else:
    if len(argv) != 2:
      raise app.UsageError("usage: python -m llmstages.compare DIR [--out=REPORT.md] | --baseline WORKDIR")
    if _BASELINE.value:
      table = baseline_table(argv[1], _STAGES.value or None)
      print(table)
      if _OUT.value:
        with open(_OUT.value, "w") as f:
          f.write(table + "\n")
      return
    result = compare(argv[1], _OUT.value, metrics=tuple(_METRICS.value))
  print("\n".join(f"wrote {p}" for p in result["paths"].values()))


if __name__ == "__main__":
  cli.run(main)
