r"""Runs an experiment's sweep: each run in its own workdir and subprocess, bookkept in an Optuna study.

  python -m llmstages.sweep --list
  python -m llmstages.sweep --experiment=NAME[:ARG] --workdir=DIR [--workers=N] [--storage=URL]

Every run of the experiment (`experiments/NAME.py`, see llmstages/experiments.py) is queued up front as a WAITING
trial of the Optuna study 'llmstages:NAME[:ARG]'. The store is the SQLite file DIR/optuna.db unless --storage names
another Optuna storage URL (e.g. postgresql://USER@HOST/DB): then workers on several machines run the same command
against one study, with DIR on a filesystem they share. Each of the --workers pulls one trial at a time and runs it
as `python -m llmstages.sweep --run_dir=...` in a subprocess, so a crash stays in its run. A run's workdir is
DIR/runs/<hash>, the hash of its fully resolved config (seed included):

  run.json         experiment, setting, seed, overrides and hash
  config.json      the resolved config (the pipeline writes it)
  result.json      written when the run has finished: every later sweep skips the run
  attempts.jsonl   one line per attempt: host, pid, trial, start, end, exit status
  stdout.txt, stderr.txt   the run's output, appended attempt after attempt
  <stage>/...      what `python -m llmstages.main` writes (metrics.jsonl, checkpoints, eval.json, ...)

Rerunning the command skips finished runs, retries failed ones and resumes an interrupted one from its latest
checkpoint (the pipeline does that in the same workdir). A worker records a heartbeat for its trial every
--heartbeat_interval seconds; a trial whose worker died (machine lost, kill -9) is failed once its heartbeat is
--grace_period old and its run queued again, by any worker still waiting or by the next sweep command.

No run executes twice at once: a worker claims a WAITING trial with the storage's WAITING -> RUNNING update, atomic
on a database server and made under a file lock in DIR for SQLite (which lets two connections both read WAITING);
queueing happens under the same file lock; and should two trials of one run still exist (two sweep commands
on machines that share no lock queued it at the same moment), a worker runs its trial only if no trial of that run
with a lower number is waiting, running or complete, and otherwise marks its own PRUNED as a duplicate; a worker
also holds a lock on the run's directory while the run executes. A worker
with nothing left to pull waits until no trial runs anywhere, then prints a summary; the exit status is non-zero
when any run failed. Runs share a JAX compilation cache (DIR/jax_cache) so that a sweep of identical shapes
compiles once. The study's objective value is the experiment's first metric at its last stage (0 where absent);
each trial's user attributes hold its run hash, setting, seed, seconds, host and, on failure, the end of stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

from absl import app, flags

from llmstages import cli, experiments

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

ERROR_TAIL_LINES = 25


def run_dir(workdir: str, run_hash: str) -> str:
  return os.path.join(workdir, "runs", run_hash)


def is_finished(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "result.json"))


def study_name(exp: experiments.Experiment) -> str:
  return f"llmstages:{exp.spec}"


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


@contextlib.contextmanager
def dir_lock(workdir: str):
  """An exclusive lock over the sweep's directory (every process on this machine, and on NFS)."""
  import fcntl
  with open(os.path.join(workdir, ".sweep.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(directory: str):
  """Yields whether this thread holds the run directory's lock; the OS drops it if the worker dies."""
  import fcntl
  with open(os.path.join(directory, ".lock"), "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def redact(url: str) -> str:
  """The storage URL without its password, for logs and reports."""
  if "://" in url and "@" in url:
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
  return url


# ---------------------------------------------------------------------------------------------------------------
# The study.

def _optuna():
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  return optuna


def open_study(url: str, workdir: str, name: str, heartbeat_interval: int, grace_period: int):
  """(study, storage); creating the tables and the study is retried, as another command may be doing the same."""
  optuna = _optuna()
  url = url or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'optuna.db'))}"
  engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
  for attempt in range(5):
    try:
      with dir_lock(workdir):
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                             grace_period=grace_period)
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize")
      return study, storage
    except Exception as e:  # noqa: BLE001  (a concurrent CREATE TABLE on a shared server; try again)
      if attempt == 4:
        raise RuntimeError(f"--storage={redact(url)}: cannot open Optuna study {name!r}: {e}") from e
      time.sleep(1.0 + attempt)


@dataclasses.dataclass
class Status:
  """Where one run stands: new, waiting, running, done, failed (its run raised) or lost (its worker died)."""
  state: str
  trials: list


def run_status(trials: list, finished_on_disk: bool) -> Status:
  from optuna.trial import TrialState
  states = {t.state for t in trials}
  if TrialState.COMPLETE in states:
    return Status("done", trials)
  if TrialState.RUNNING in states:
    return Status("running", trials)
  if TrialState.WAITING in states:
    return Status("waiting", trials)
  if finished_on_disk:
    return Status("done", trials)
  failed = [t for t in trials if t.state == TrialState.FAIL]
  if not failed:
    return Status("new", trials)
  return Status("failed" if "error" in failed[-1].user_attrs else "lost", trials)


def trials_by_run(storage, study_id: int) -> dict[str, list]:
  out: dict[str, list] = {}
  for t in sorted(storage.get_all_trials(study_id, deepcopy=False), key=lambda t: t.number):
    out.setdefault(t.user_attrs.get("run", ""), []).append(t)
  return out


class Sweep:
  """One sweep command: queues the runs, then runs workers that pull them until no trial is left anywhere."""

  def __init__(self, exp: experiments.Experiment, workdir: str, storage_url: str = "", workers: int = 1,
               heartbeat_interval: int = 30, grace_period: int = 0, retry_failed: bool = True,
               compilation_cache: str = "auto", progress_every: int = 60, log=print):
    self.exp = exp
    self.workdir = os.path.abspath(workdir)
    self.workers = workers
    self.heartbeat_interval = heartbeat_interval
    self.grace_period = grace_period or 4 * heartbeat_interval
    self.retry_failed = retry_failed
    self.progress_every = progress_every
    self.log = log
    self.host = socket.gethostname()
    os.makedirs(os.path.join(self.workdir, "runs"), exist_ok=True)
    self.runs = {r.hash: r for r in exp.runs()}
    self.metrics = exp.metrics
    self.stages = tuple(exp.base_config().stages)
    self.storage_url = storage_url
    self.study, self.storage = open_study(storage_url, self.workdir, study_name(exp), heartbeat_interval,
                                          self.grace_period)
    self.study_id = self.storage.get_study_id_from_name(self.study.study_name)
    self.env = self._child_env(compilation_cache)
    self.stopping = threading.Event()
    self.children: dict[int, subprocess.Popen] = {}
    self.claim_lock = threading.Lock()
    self.lock = threading.RLock()  # Re-entrant: the signal handler may run while the main thread holds it.
    self.started = time.time()
    self.executed = 0  # Runs this command executed (finished or not).
    self._last_line = ""
    self._last_print = 0.0

  def _child_env(self, compilation_cache: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [experiments.ROOT, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["LLMSTAGES_SWEEP_PARENT"] = str(os.getpid())
    if self.workers > 1:  # Several runs share an accelerator: none may preallocate most of its memory.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if compilation_cache != "off" and not (compilation_cache == "auto" and "JAX_COMPILATION_CACHE_DIR" in env):
      env["JAX_COMPILATION_CACHE_DIR"] = (os.path.join(self.workdir, "jax_cache") if compilation_cache == "auto"
                                          else os.path.abspath(compilation_cache))
      env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    return env

  # -- Queueing ---------------------------------------------------------------------------------------------------

  def write_plan(self) -> None:
    """DIR/sweep.json (what compare reads) and each run's run.json."""
    exp = self.exp
    plan = {"experiment": exp.spec, "name": exp.name, "description": exp.description, "metrics": list(self.metrics),
            "pareto": list(exp.pareto) if exp.pareto else None, "baseline": exp.baseline,
            "stages": list(self.stages), "study": self.study.study_name,
            "storage": redact(self.storage_url) or "sqlite:///WORKDIR/optuna.db",
            "command": " ".join(["python -m llmstages.sweep"] + sys.argv[1:]),
            "runs": [r.to_json() for r in self.runs.values()]}
    path = os.path.join(self.workdir, "sweep.json")
    if os.path.exists(path):
      with open(path) as f:
        earlier = json.load(f).get("experiment")
      if earlier != exp.spec:
        raise ValueError(f"--workdir={self.workdir} holds the sweep of {earlier!r}, not {exp.spec!r}: give each "
                         f"experiment (and arg) its own directory")
    _write_json(path, plan)
    for run in self.runs.values():
      rd = run_dir(self.workdir, run.hash)
      os.makedirs(rd, exist_ok=True)
      path = os.path.join(rd, "run.json")
      spec = {"experiment": exp.spec, **run.to_json()}
      if not os.path.exists(path):
        _write_json(path, spec)

  def queue(self, states: tuple[str, ...]) -> int:
    """Adds a WAITING trial for every run whose status is in `states`; returns how many. Under the dir lock."""
    from optuna.trial import TrialState, create_trial
    queued = 0
    with dir_lock(self.workdir):
      by_run = trials_by_run(self.storage, self.study_id)
      for h, run in self.runs.items():
        rd = run_dir(self.workdir, h)
        status = run_status(by_run.get(h, []), is_finished(rd))
        attrs = {"run": h, "setting": run.setting, "seed": run.seed}
        if status.state == "done" and not any(t.state == TrialState.COMPLETE for t in status.trials):
          # Finished on disk but unknown to this store (a new --storage, a deleted database): record it as is.
          value, metrics = self._result_value(rd)
          self.study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                            user_attrs={**attrs, "skipped": "result.json existed", **metrics}))
        elif status.state in states:
          self.study.enqueue_trial({}, user_attrs=attrs)
          queued += 1
    return queued

  # -- Workers ----------------------------------------------------------------------------------------------------

  def tally(self) -> dict[str, int]:
    by_run = trials_by_run(self.storage, self.study_id)
    counts = {k: 0 for k in ("done", "failed", "running", "waiting", "lost", "new")}
    for h in self.runs:
      counts[run_status(by_run.get(h, []), is_finished(run_dir(self.workdir, h))).state] += 1
    return counts

  def _pop(self):
    """Claims the lowest-numbered WAITING trial; None when there is none.

    The storage's WAITING -> RUNNING update is atomic on a database server (a row lock), but not on SQLite, where
    two connections can both read WAITING and both write RUNNING: the claim is also made under this process's lock
    and the directory's file lock, which every worker of a SQLite study shares.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    with self.claim_lock, dir_lock(self.workdir):
      waiting = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,))
      for t in sorted(waiting, key=lambda t: t.number):
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
        try:
          claimed = self.storage.set_trial_state_values(trial_id, TrialState.RUNNING)
        except (UpdateFinishedTrialError, RuntimeError):
          claimed = False
        except Exception as e:  # noqa: BLE001  (SQLite 'database is locked' under contention: try the next one)
          self.log(f"[sweep] note: claiming trial {t.number} failed ({type(e).__name__}); trying again")
          claimed = False
        if claimed:
          self.storage.record_heartbeat(trial_id)
          return t, trial_id
    return None

  def _duplicate_of(self, trial) -> str:
    from optuna.trial import TrialState
    h = trial.user_attrs.get("run")
    for t in trials_by_run(self.storage, self.study_id).get(h, []):
      if t.number == trial.number:
        continue
      if t.state == TrialState.COMPLETE:
        return f"run {h} already finished in trial {t.number}"
      if t.number < trial.number and t.state in (TrialState.WAITING, TrialState.RUNNING):
        return f"duplicate of trial {t.number} (run {h})"
    return ""

  def _set_attrs(self, trial_id: int, attrs: dict) -> None:
    for k, v in attrs.items():
      try:
        self.storage.set_trial_user_attr(trial_id, k, v)
      except Exception:  # noqa: BLE001  (the trial was failed as stale meanwhile; the run is re-queued)
        return

  def _tell(self, number: int, state, value: float | None = None) -> None:
    try:
      self.study.tell(number, values=None if value is None else [value], state=state, skip_if_finished=True)
    except Exception as e:  # noqa: BLE001
      self.log(f"[sweep] note: could not record trial {number} as {state.name}: {e}")

  def _result_value(self, rd: str) -> tuple[float, dict]:
    """The objective (first metric at the last stage, 0 where absent) and the final stage's metrics."""
    path = os.path.join(rd, self.stages[-1], "eval.json")
    metrics = {}
    if os.path.exists(path):
      with open(path) as f:
        values = json.load(f).get("metrics", {})
      metrics = {k: values[k]["value"] for k in self.metrics if k in values}
    value = metrics.get(self.metrics[0], 0.0)
    value = value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
    return float(value), {"final_" + k: v for k, v in metrics.items()}

  def worker(self, index: int) -> None:
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState
    poll = max(0.5, min(5.0, self.heartbeat_interval / 2))
    while not self.stopping.is_set():
      popped = self._pop()
      if popped is None:
        counts = self.tally()
        if counts["running"] == 0 and counts["waiting"] == 0 and counts["lost"] == 0:
          return
        with self.lock:  # Take over the runs of workers that died, anywhere.
          fail_stale_trials(self.study)
          if self.queue(("lost",)):
            self.log("[sweep] queued again the runs of workers that stopped sending heartbeats")
        self.stopping.wait(poll)
        continue
      trial, trial_id = popped
      h = trial.user_attrs.get("run", "")
      run = self.runs.get(h)
      if run is None:
        self._set_attrs(trial_id, {"skipped": "not in this command's plan (did the experiment change?)"})
        self._tell(trial.number, TrialState.PRUNED)
        continue
      duplicate = self._duplicate_of(trial)
      if duplicate:
        self._set_attrs(trial_id, {"skipped": duplicate})
        self._tell(trial.number, TrialState.PRUNED)
        continue
      rd = run_dir(self.workdir, h)
      if is_finished(rd):
        value, metrics = self._result_value(rd)
        self._set_attrs(trial_id, {"skipped": "result.json existed", **metrics})
        self._tell(trial.number, TrialState.COMPLETE, value)
        continue
      with run_lock(rd) as mine:
        if not mine:  # Another worker of this machine (or of the shared filesystem) is in this run's directory.
          self._set_attrs(trial_id, {"skipped": f"runs/{h} is in use by another worker"})
          self._tell(trial.number, TrialState.PRUNED)
          continue
        self.execute(index, trial.number, trial_id, run, rd)

  def execute(self, index: int, number: int, trial_id: int, run: experiments.Run, rd: str) -> None:
    from optuna.trial import TrialState
    self.progress(f"[worker {index}] start {run.setting} seed {run.seed} (runs/{run.hash}, trial {number})",
                  force=True)
    start = time.time()
    cmd = [sys.executable, "-m", "llmstages.sweep", f"--run_dir={rd}"]
    header = f"\n=== {_now()} trial {number} on {self.host} (pid {os.getpid()}, worker {index}) ===\n"
    with open(os.path.join(rd, "stdout.txt"), "ab") as out, open(os.path.join(rd, "stderr.txt"), "ab") as err:
      out.write(header.encode())
      err.write(header.encode())
      out.flush()
      err.flush()
      err_start = err.tell()
      proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, start_new_session=True)
      with self.lock:
        self.children[proc.pid] = proc
      while True:
        try:
          proc.wait(timeout=self.heartbeat_interval)
          break
        except subprocess.TimeoutExpired:
          try:
            self.storage.record_heartbeat(trial_id)
          except Exception as e:  # noqa: BLE001  (a database hiccup must not kill the run)
            self.log(f"[worker {index}] note: heartbeat of trial {number} failed: {e}")
      with self.lock:
        self.children.pop(proc.pid, None)
        self.executed += 1
    seconds = time.time() - start
    rc = proc.returncode
    with open(os.path.join(rd, "attempts.jsonl"), "a") as f:
      f.write(json.dumps({"trial": number, "host": self.host, "pid": proc.pid, "worker": index,
                          "start": datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds"),
                          "end": _now(), "seconds": round(seconds, 1), "returncode": rc}) + "\n")
    attrs = {"host": self.host, "seconds": round(seconds, 1), "returncode": rc}
    if rc == 0 and is_finished(rd):
      value, metrics = self._result_value(rd)
      self._set_attrs(trial_id, {**attrs, **metrics})
      self._tell(number, TrialState.COMPLETE, value)
      self.progress(f"[worker {index}] done {run.setting} seed {run.seed} in {_fmt_seconds(seconds)}", force=True)
    else:
      with open(os.path.join(rd, "stderr.txt"), "rb") as f:
        f.seek(err_start)
        tail = f.read().decode(errors="replace").rstrip().splitlines()[-ERROR_TAIL_LINES:]
      why = (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}") if rc else "no result.json"
      if self.stopping.is_set():
        why = f"interrupted ({why})"
      self._set_attrs(trial_id, {**attrs, "error": "\n".join([why] + tail)})
      self._tell(number, TrialState.FAIL)
      last = next((line for line in reversed(tail) if line.strip()), "")
      self.progress(f"[worker {index}] FAILED {run.setting} seed {run.seed} ({why}): {last}", force=True)

  # -- Progress and the whole command -----------------------------------------------------------------------------

  def progress(self, event: str = "", force: bool = False) -> None:
    counts = self.tally()
    total = len(self.runs)
    elapsed = time.time() - self.started
    done = [t for t in self.storage.get_all_trials(self.study_id, deepcopy=False)
            if t.state.name == "COMPLETE" and "seconds" in t.user_attrs and t.user_attrs.get("run") in self.runs]
    left = counts["waiting"] + counts["lost"] + counts["new"] + 0.5 * counts["running"]
    if done and left:
      mean = sum(t.user_attrs["seconds"] for t in done) / len(done)
      eta = _fmt_seconds(mean * left / max(1, counts["running"], self.workers))
    else:
      eta = "?" if left else "0s"
    state = (f"[sweep] {counts['done']}/{total} done, {counts['failed']} failed, {counts['running']} running, "
             f"{counts['waiting'] + counts['lost']} waiting")
    with self.lock:
      if event:
        self.log(event)
      # The state without the clock: a line per change, else one per progress_every (not one per 5 s poll).
      if force or state != self._last_line or time.time() - self._last_print > self.progress_every:
        self.log(f"{state} | elapsed {_fmt_seconds(elapsed)}, eta {eta}")
        self._last_line, self._last_print = state, time.time()

  def stop(self, signum=None, frame=None) -> None:
    """SIGINT/SIGTERM: stop pulling, end the running runs (their trials fail; a rerun resumes them)."""
    self.stopping.set()
    with self.lock:
      for proc in list(self.children.values()):
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGTERM)

  def run(self) -> int:
    """Queues, works, summarizes; returns the exit status (0: every run finished)."""
    self.write_plan()
    states = ("new", "lost", "failed") if self.retry_failed else ("new", "lost")
    from optuna.storages import fail_stale_trials
    with self.lock:
      fail_stale_trials(self.study)
    queued = self.queue(states)
    self.log(f"[sweep] {self.exp.spec}: {len(self.runs)} runs in {self.workdir}/runs; {queued} queued by this "
             f"command; study {self.study.study_name!r} in {redact(self.storage_url) or 'optuna.db'}; "
             f"{self.workers} worker(s) on {self.host}")
    threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.workers)]
    for t in threads:
      t.start()
    while any(t.is_alive() for t in threads):
      for t in threads:
        t.join(timeout=min(5.0, self.progress_every))
      self.progress()
    return self.summary()

  def summary(self) -> int:
    by_run = trials_by_run(self.storage, self.study_id)
    counts = self.tally()
    self.log(f"[sweep] summary: {counts['done']}/{len(self.runs)} runs done, {counts['failed']} failed, "
             f"{counts['running'] + counts['waiting'] + counts['lost'] + counts['new']} not finished; "
             f"this command executed {self.executed}")
    bad = 0
    for h, run in self.runs.items():
      status = run_status(by_run.get(h, []), is_finished(run_dir(self.workdir, h)))
      if status.state == "done":
        continue
      bad += 1
      errors = [t.user_attrs.get("error", "") for t in status.trials if t.state.name == "FAIL"]
      self.log(f"  {status.state.upper()} {run.setting} seed {run.seed}: {run_dir(self.workdir, h)}")
      if errors and errors[-1]:
        self.log("    " + "\n    ".join(errors[-1].splitlines()[-8:]))
    if bad:
      self.log(f"[sweep] {bad} run(s) did not finish; rerun the same command to retry them (finished runs are "
               f"skipped, interrupted ones resume from their checkpoints)")
    return 1 if bad else 0


def _fmt_seconds(s: float) -> str:
  s = int(round(s))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------------------------------------------
# One run, in its own process.

def _die_with_parent() -> None:
  """Linux: this process gets SIGKILL when the worker that started it dies, so a killed sweep leaves no orphans."""
  parent = int(os.environ.get("LLMSTAGES_SWEEP_PARENT", "0"))
  if not parent or not sys.platform.startswith("linux"):
    return
  import ctypes
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent:  # The parent died before prctl took effect.
    os._exit(1)


def run_one(directory: str) -> None:
  _die_with_parent()
  with open(os.path.join(directory, "run.json")) as f:
    spec = json.load(f)
  exp = experiments.load(spec["experiment"])
  run = exp.resolve({**spec["overrides"], "seed": spec["seed"], "setting": spec["setting"]})
  if run.hash != spec["hash"]:
    raise RuntimeError(f"{directory}/run.json: the experiment {spec['experiment']} now resolves this run to config "
                       f"{run.hash}, not {spec['hash']}: its base config changed after the sweep queued it. Rerun "
                       f"the sweep command to plan the runs again.")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import jax
  from llmstages import pipeline
  print(f"Run {spec['hash']}: {spec['setting']} seed {spec['seed']} of {spec['experiment']}; overrides "
        f"{json.dumps(spec['overrides'])}", flush=True)
  print("Resolved config:\n" + str(run.config), flush=True)
  start = time.time()
  pipeline.run(run.config, directory)
  if jax.process_index() == 0:
    _write_json(os.path.join(directory, "result.json"), {
        "hash": spec["hash"], "setting": spec["setting"], "seed": spec["seed"], "finished": _now(),
        "seconds": round(time.time() - start, 1), "host": socket.gethostname(), "platform": platform.platform(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "stages": list(run.config.stages)})


# ---------------------------------------------------------------------------------------------------------------

def list_experiments() -> str:
  lines = []
  for name in experiments.names():
    try:
      exp = experiments.load(name)
      n = len(exp.module.get_sweep(""))
      lines.append(f"{name:28s} {n:4d} runs  {exp.description}")
    except Exception as e:  # noqa: BLE001  (one broken file must not hide the others)
      lines.append(f"{name:28s}  ERROR  {type(e).__name__}: {e}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RUN_DIR.value:
    run_one(_RUN_DIR.value)
    return
  if _LIST.value:
    print(list_experiments())
    return
  if not _EXPERIMENT.value or not _WORKDIR.value:
    raise app.UsageError("--experiment and --workdir are required (or --list)")
  if _WORKERS.value < 1:
    raise app.UsageError(f"--workers must be at least 1, got {_WORKERS.value}")
  exp = experiments.load(_EXPERIMENT.value)
  sweep = Sweep(exp, _WORKDIR.value, storage_url=_STORAGE.value, workers=_WORKERS.value,
                heartbeat_interval=_HEARTBEAT.value, grace_period=_GRACE.value, retry_failed=_RETRY.value,
                compilation_cache=_CACHE.value, progress_every=_PROGRESS.value,
                log=lambda line: print(line, flush=True))
  signal.signal(signal.SIGINT, sweep.stop)
  signal.signal(signal.SIGTERM, sweep.stop)
  code = sweep.run()
  if sweep.stopping.is_set():
    code = 130
  sys.exit(code)


if __name__ == "__main__":
  cli.run(main)
