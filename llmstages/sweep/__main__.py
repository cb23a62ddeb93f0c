"""`python -m llmstages.sweep`: the flags, `--list`, and the sweep command (plan, queue, work, summarize); see the
package docstring for what a sweep does."""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import app, flags

from llmstages import cli, experiments
from llmstages.sweep import plan as plan_lib
from llmstages.sweep import report, worker
from llmstages.sweep import study as study_lib

_LIST = flags.DEFINE_bool("list", False, "List the experiments in experiments/, one line each, and exit.")
_EXPERIMENT = flags.DEFINE_string("experiment", None, "NAME[:ARG] of experiments/NAME.py, or PATH.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: runs/<hash>/ per run, optuna.db, sweep.json.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Runs executed at once by this command.")
_STORAGE = flags.DEFINE_string("storage", "", "Optuna storage URL; '' keeps the study in WORKDIR/optuna.db.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_interval", 30, "Seconds between a running trial's heartbeats.")
_GRACE = flags.DEFINE_integer("grace_period", 0, "A running trial without a heartbeat for this many seconds has "
                              "lost its worker and is run again; 0 means 4 x heartbeat_interval.")
_RETRY = flags.DEFINE_bool("retry_failed", True, "Queue again the runs that failed in an earlier sweep command.")
_CACHE = flags.DEFINE_string("compilation_cache", "auto", "JAX persistent compilation cache of the runs: auto "
                             "(WORKDIR/jax_cache unless JAX_COMPILATION_CACHE_DIR is set), off, or a directory.")
_PROGRESS = flags.DEFINE_integer("progress_every", 60, "Seconds between progress lines when nothing changes.")
_RUN_DIR = flags.DEFINE_string("run_dir", "", "Internal: run the one run described by RUN_DIR/run.json (what each "
                               "worker's subprocess does).")


def list_experiments() -> str:
  lines = []
  for name in experiments.names():
    try:
      exp = experiments.load(name)
      count = len(exp.module.get_sweep(""))
      lines.append(f"{name:28s} {count:4d} runs  {exp.description}")
    except Exception as e:  # noqa: BLE001  (one broken file must not hide the others)
      lines.append(f"{name:28s}  ERROR  {type(e).__name__}: {e}")
  return "\n".join(lines)


def log(line: str) -> None:
  print(line, flush=True)


def run_sweep(exp: experiments.Experiment, workdir: str, storage_url: str = "", workers: int = 1,
              heartbeat_interval: int = 30, grace_period: int = 0, retry_failed: bool = True,
              compilation_cache: str = "auto", progress_every: int = 60) -> int:
  """Queues the runs, runs workers that pull them until no trial is left anywhere, summarizes; returns the exit
  status (0: every run finished, 1: some did not, 130: interrupted)."""
  workdir = os.path.abspath(workdir)
  grace_period = grace_period or 4 * heartbeat_interval
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  plan = plan_lib.Plan.of(exp)
  study = study_lib.Study(storage_url, workdir, plan.study_name, heartbeat_interval, grace_period, log=log)
  lock = threading.RLock()
  progress = report.Progress(plan, study, workdir, workers, progress_every, lock, log=log)
  env = worker.child_env(workdir, workers, compilation_cache)
  pool = worker.Workers(plan, study, workdir, workers, heartbeat_interval, env, progress, lock, log=log)
  signal.signal(signal.SIGINT, pool.stop)
  signal.signal(signal.SIGTERM, pool.stop)
  plan.write(workdir, study_lib.redact(storage_url) or "sqlite:///WORKDIR/optuna.db",
             " ".join(["python -m llmstages.sweep"] + sys.argv[1:]))
  with lock:
    study.fail_stale()
  queued = pool.queue(("new", "lost", "failed") if retry_failed else ("new", "lost"))
  log(f"[sweep] {exp.spec}: {len(plan.runs)} runs in {workdir}/runs; {queued} queued by this command; study "
      f"{study.name!r} in {study_lib.redact(storage_url) or 'optuna.db'}; {workers} worker(s) on {pool.host}")
  pool.run()
  code = report.summary(plan, study, workdir, pool.executed, log=log)
  return 130 if pool.stopping.is_set() else code


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RUN_DIR.value:
    worker.run_one(_RUN_DIR.value)
    return
  if _LIST.value:
    print(list_experiments())
    return
  if not _EXPERIMENT.value or not _WORKDIR.value:
    raise app.UsageError("--experiment and --workdir are required (or --list)")
  if _WORKERS.value < 1:
    raise app.UsageError(f"--workers must be at least 1, got {_WORKERS.value}")
  sys.exit(run_sweep(experiments.load(_EXPERIMENT.value), _WORKDIR.value, storage_url=_STORAGE.value,
                     workers=_WORKERS.value, heartbeat_interval=_HEARTBEAT.value, grace_period=_GRACE.value,
                     retry_failed=_RETRY.value, compilation_cache=_CACHE.value, progress_every=_PROGRESS.value))


if __name__ == "__main__":
  cli.run(main)
