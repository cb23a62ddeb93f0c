"""The runs' processes: worker threads that claim trials and run each run as `python -m llmstages.sweep
--run_dir=DIR/runs/<hash>` in a subprocess (so a crash stays in its run), recording a heartbeat for its trial
every heartbeat_interval seconds, taking over the runs of workers whose heartbeats stopped, and ending the
processes on SIGINT/SIGTERM; and that subprocess's side, `run_one`, which runs the pipeline in the run's
directory (an interrupted run resumes there from its latest checkpoint) and writes result.json when it finished.

Each run directory holds stdout.txt and stderr.txt (appended attempt after attempt, a header line per attempt) and
attempts.jsonl (one line per attempt: host, pid, trial, start, end, exit status). A worker holds the run
directory's lock while its run executes, so no run executes twice at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
from absl import logging

from llmstages import experiments, pipeline
from llmstages.sweep import plan as plan_lib
from llmstages.sweep import report
from llmstages.sweep import study as study_lib

ERROR_TAIL_LINES = 25


def now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def child_env(workdir: str, workers: int, compilation_cache: str) -> dict:
  """The runs' environment: this package importable, unbuffered output, the parent's pid (see
  `_die_with_parent`) and a shared JAX compilation cache (a sweep of identical shapes compiles once)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [experiments.ROOT, env.get("PYTHONPATH", "")]))
  env["PYTHONUNBUFFERED"] = "1"
  env["LLMSTAGES_SWEEP_PARENT"] = str(os.getpid())
  if workers > 1:  # Several runs share an accelerator: none may preallocate most of its memory.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if compilation_cache != "off" and not (compilation_cache == "auto" and "JAX_COMPILATION_CACHE_DIR" in env):
    env["JAX_COMPILATION_CACHE_DIR"] = (os.path.join(workdir, "jax_cache") if compilation_cache == "auto"
                                        else os.path.abspath(compilation_cache))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  return env


class Workers:
  """`count` threads that pull trials from the study until no trial is waiting, running or lost anywhere."""

  def __init__(self, plan: plan_lib.Plan, study: study_lib.Study, workdir: str, count: int, heartbeat_interval: int,
               env: dict, progress: report.Progress, lock: threading.RLock, log=print):
    self.plan, self.study, self.workdir, self.count = plan, study, workdir, count
    self.heartbeat_interval = heartbeat_interval
    self.env = env
    self.progress = progress
    self.lock = lock  # Re-entrant: the signal handler may run while the main thread holds it.
    self.log = log
    self.host = socket.gethostname()
    self.stopping = threading.Event()
    self.children: dict[int, subprocess.Popen] = {}
    self.claim_lock = threading.Lock()
    self.executed = 0  # Runs this command executed (finished or not).

  def run(self) -> None:
    """Runs the worker threads to the end, a progress line at least every 5 s (or progress_every)."""
    threads = [threading.Thread(target=self.work, args=(i,), daemon=True) for i in range(self.count)]
    for t in threads:
      t.start()
    while any(t.is_alive() for t in threads):
      for t in threads:
        t.join(timeout=min(5.0, self.progress.every))
      self.progress()

  def stop(self, signum=None, frame=None) -> None:
    """SIGINT/SIGTERM: stop pulling, end the running runs (their trials fail; a rerun resumes them)."""
    self.stopping.set()
    with self.lock:
      for proc in list(self.children.values()):
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGTERM)

  def work(self, index: int) -> None:
    """One worker thread: claim a trial, run it (or skip it, saying why), until nothing is left anywhere."""
    poll = max(0.5, min(5.0, self.heartbeat_interval / 2))
    while not self.stopping.is_set():
      with self.claim_lock:
        claimed = self.study.claim()
      if claimed is None:
        counts = self.progress.tally()
        if counts["running"] == 0 and counts["waiting"] == 0 and counts["lost"] == 0:
          return
        with self.lock:  # Take over the runs of workers that died, anywhere.
          self.study.fail_stale()
          if self.queue(("lost",)):
            self.log("[sweep] queued again the runs of workers that stopped sending heartbeats")
        self.stopping.wait(poll)
        continue
      trial, trial_id = claimed
      run_hash = trial.user_attrs.get("run", "")
      run = self.plan.runs.get(run_hash)
      if run is None:
        self.study.prune(trial_id, trial.number, "not in this command's plan (did the experiment change?)")
        continue
      duplicate = self.study.duplicate_of(trial)
      if duplicate:
        self.study.prune(trial_id, trial.number, duplicate)
        continue
      directory = plan_lib.run_dir(self.workdir, run_hash)
      if plan_lib.is_finished(directory):
        value, metrics = report.result_value(directory, self.plan)
        self.study.complete(trial_id, trial.number, value, {"skipped": "result.json existed", **metrics})
        continue
      with study_lib.run_lock(directory) as mine:
        if not mine:  # Another worker of this machine (or of the shared filesystem) is in this run's directory.
          self.study.prune(trial_id, trial.number, f"runs/{run_hash} is in use by another worker")
          continue
        self.execute(index, trial.number, trial_id, run, directory)

  def queue(self, states: tuple[str, ...]) -> int:
    """Queues the plan's runs whose status is in `states` (see `Study.queue`)."""
    return self.study.queue(self.plan.runs, states, self.progress.finished,
                            lambda h: report.result_value(plan_lib.run_dir(self.workdir, h), self.plan))

  def execute(self, index: int, number: int, trial_id: int, run: experiments.Run, directory: str) -> None:
    """Runs `run` in a subprocess of its own, its trial's heartbeat recorded meanwhile; records the outcome."""
    self.progress(f"[worker {index}] start {run.setting} seed {run.seed} (runs/{run.hash}, trial {number})",
                  force=True)
    start = time.time()
    header = f"\n=== {now()} trial {number} on {self.host} (pid {os.getpid()}, worker {index}) ===\n"
    with open(os.path.join(directory, "stdout.txt"), "ab") as out, \
        open(os.path.join(directory, "stderr.txt"), "ab") as err:
      for f in (out, err):
        f.write(header.encode())
        f.flush()
      stderr_start = err.tell()
      proc = subprocess.Popen([sys.executable, "-m", "llmstages.sweep", f"--run_dir={directory}"], stdout=out,
                              stderr=err, env=self.env, start_new_session=True)
      with self.lock:
        self.children[proc.pid] = proc
      self._wait_with_heartbeats(proc, index, number, trial_id)
      with self.lock:
        self.children.pop(proc.pid, None)
        self.executed += 1
    seconds = time.time() - start
    with open(os.path.join(directory, "attempts.jsonl"), "a") as f:
      f.write(json.dumps({"trial": number, "host": self.host, "pid": proc.pid, "worker": index,
                          "start": datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds"),
                          "end": now(), "seconds": round(seconds, 1), "returncode": proc.returncode}) + "\n")
    attrs = {"host": self.host, "seconds": round(seconds, 1), "returncode": proc.returncode}
    if proc.returncode == 0 and plan_lib.is_finished(directory):
      value, metrics = report.result_value(directory, self.plan)
      self.study.complete(trial_id, number, value, {**attrs, **metrics})
      self.progress(f"[worker {index}] done {run.setting} seed {run.seed} in {report.format_seconds(seconds)}",
                    force=True)
    else:
      self._record_failure(index, number, trial_id, run, directory, stderr_start, proc.returncode, attrs)

  def _wait_with_heartbeats(self, proc: subprocess.Popen, index: int, number: int, trial_id: int) -> None:
    while True:
      try:
        proc.wait(timeout=self.heartbeat_interval)
        return
      except subprocess.TimeoutExpired:
        try:
          self.study.record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001  (a database hiccup must not kill the run)
          self.log(f"[worker {index}] note: heartbeat of trial {number} failed: {e}")

  def _record_failure(self, index: int, number: int, trial_id: int, run: experiments.Run, directory: str,
                      stderr_start: int, returncode: int, attrs: dict) -> None:
    """The trial fails with why and the end of this attempt's stderr (a later sweep command retries it)."""
    with open(os.path.join(directory, "stderr.txt"), "rb") as f:
      f.seek(stderr_start)
      tail = f.read().decode(errors="replace").rstrip().splitlines()[-ERROR_TAIL_LINES:]
    why = (f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}") if returncode \
        else "no result.json"
    if self.stopping.is_set():
      why = f"interrupted ({why})"
    self.study.fail(trial_id, number, {**attrs, "error": "\n".join([why] + tail)})
    last = next((line for line in reversed(tail) if line.strip()), "")
    self.progress(f"[worker {index}] FAILED {run.setting} seed {run.seed} ({why}): {last}", force=True)


# ---------------------------------------------------------------------------------------------------------------
# One run, in its own process.

def _die_with_parent() -> None:
  """Linux: this process gets SIGKILL when the worker that started it dies, so a killed sweep leaves no orphans."""
  parent = int(os.environ.get("LLMSTAGES_SWEEP_PARENT", "0"))
  if not parent or not sys.platform.startswith("linux"):
    return
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent:  # The parent died before prctl took effect.
    os._exit(1)


def run_one(directory: str) -> None:
  """Runs the run described by DIRECTORY/run.json (the pipeline resumes in its directory); writes result.json."""
  _die_with_parent()
  spec, run = plan_lib.read_run(directory)
  logging.set_verbosity(logging.WARNING)
  print(f"Run {spec['hash']}: {spec['setting']} seed {spec['seed']} of {spec['experiment']}; overrides "
        f"{json.dumps(spec['overrides'])}", flush=True)
  print("Resolved config:\n" + str(run.config), flush=True)
  start = time.time()
  pipeline.run(run.config, directory)
  if jax.process_index() == 0:
    plan_lib.write_json(os.path.join(directory, "result.json"), {
        "hash": spec["hash"], "setting": spec["setting"], "seed": spec["seed"], "finished": now(),
        "seconds": round(time.time() - start, 1), "host": socket.gethostname(), "platform": platform.platform(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "stages": list(run.config.stages)})
