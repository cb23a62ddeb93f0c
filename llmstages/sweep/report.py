"""What a sweep tells: each run's result (the objective and final metrics read from its eval.json, recorded on its
trial), progress lines with an ETA while it works, and the closing summary with the exit status. The comparison
of the finished runs is `python -m llmstages.compare DIR`, which reads the sweep.json the plan wrote."""

from __future__ import annotations

import json
import math
import os
import threading
import time

from llmstages.sweep import plan as plan_lib
from llmstages.sweep import study as study_lib


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def result_value(directory: str, plan: plan_lib.Plan) -> tuple[float, dict]:
  """The objective (the first metric at the last stage, 0 where absent) and the final stage's metrics."""
  path = os.path.join(directory, plan.stages[-1], "eval.json")
  metrics = {}
  if os.path.exists(path):
    with open(path) as f:
      values = json.load(f).get("metrics", {})
    metrics = {k: values[k]["value"] for k in plan.metrics if k in values}
  value = metrics.get(plan.metrics[0], 0.0)
  value = value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
  return float(value), {"final_" + k: v for k, v in metrics.items()}


class Progress:
  """Progress lines: the runs' states, elapsed time and an ETA; one line per change, else one per `every` s."""

  def __init__(self, plan: plan_lib.Plan, study: study_lib.Study, workdir: str, workers: int, every: int,
               lock: threading.RLock, log=print):
    self.plan, self.study, self.workdir, self.workers, self.every = plan, study, workdir, workers, every
    self.lock = lock  # The sweep's: log lines of several worker threads do not interleave.
    self.log = log
    self.started = time.time()
    self._last_line = ""
    self._last_print = 0.0

  def finished(self, run_hash: str) -> bool:
    return plan_lib.is_finished(plan_lib.run_dir(self.workdir, run_hash))

  def tally(self) -> dict[str, int]:
    return self.study.tally(self.plan.runs, self.finished)

  def __call__(self, event: str = "", force: bool = False) -> None:
    counts = self.tally()
    elapsed = time.time() - self.started
    seconds = self.study.seconds_of_completed(self.plan.runs)
    left = counts["waiting"] + counts["lost"] + counts["new"] + 0.5 * counts["running"]
    if seconds and left:
      mean = sum(seconds) / len(seconds)
      eta = format_seconds(mean * left / max(1, counts["running"], self.workers))
    else:
      eta = "?" if left else "0s"
    state = (f"[sweep] {counts['done']}/{len(self.plan.runs)} done, {counts['failed']} failed, "
             f"{counts['running']} running, {counts['waiting'] + counts['lost']} waiting")
    with self.lock:
      if event:
        self.log(event)
      # The state without the clock: a line per change, else one per progress_every (not one per 5 s poll).
      if force or state != self._last_line or time.time() - self._last_print > self.every:
        self.log(f"{state} | elapsed {format_seconds(elapsed)}, eta {eta}")
        self._last_line, self._last_print = state, time.time()


def summary(plan: plan_lib.Plan, study: study_lib.Study, workdir: str, executed: int, log=print) -> int:
  """Logs what finished and, for every run that did not, its state and the end of its last error; returns the
  exit status (0: every run finished)."""
  statuses = study.statuses(plan.runs, lambda h: plan_lib.is_finished(plan_lib.run_dir(workdir, h)))
  counts = {state: sum(s.state == state for s in statuses.values()) for state in study_lib.STATES}
  log(f"[sweep] summary: {counts['done']}/{len(plan.runs)} runs done, {counts['failed']} failed, "
      f"{counts['running'] + counts['waiting'] + counts['lost'] + counts['new']} not finished; "
      f"this command executed {executed}")
  unfinished = 0
  for run_hash, run in plan.runs.items():
    status = statuses[run_hash]
    if status.state == "done":
      continue
    unfinished += 1
    errors = [t.user_attrs.get("error", "") for t in status.trials if t.state.name == "FAIL"]
    log(f"  {status.state.upper()} {run.setting} seed {run.seed}: {plan_lib.run_dir(workdir, run_hash)}")
    if errors and errors[-1]:
      log("    " + "\n    ".join(errors[-1].splitlines()[-8:]))
  if unfinished:
    log(f"[sweep] {unfinished} run(s) did not finish; rerun the same command to retry them (finished runs are "
        f"skipped, interrupted ones resume from their checkpoints)")
  return 1 if unfinished else 0
