"""The Optuna bookkeeping of a sweep: the study and its storage, the locks, queueing each run as a trial, claiming
a trial, and where each run stands (new, waiting, running, done, failed or lost).

The store is the SQLite file DIR/optuna.db unless a storage URL names another (e.g. postgresql://USER@HOST/DB),
shared by workers on several machines. A worker claims a WAITING trial with the storage's WAITING -> RUNNING
update, atomic on a database server and made under DIR's file lock for SQLite (which lets two connections both
read WAITING); queueing happens under the same lock. Should two trials of one run still exist (two commands on
machines that share no lock queued it at once), `duplicate_of` lets only the lowest-numbered one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from typing import Callable, Iterable

import filelock
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState, create_trial

STATES = ("done", "failed", "running", "waiting", "lost", "new")


@contextlib.contextmanager
def dir_lock(workdir: str):
  """An exclusive lock over the sweep's directory (every process on this machine, and on NFS)."""
  with filelock.FileLock(os.path.join(workdir, ".sweep.lock")):
    yield


@contextlib.contextmanager
def run_lock(directory: str):
  """Yields whether this thread holds the run directory's lock; the OS drops it if the worker dies."""
  lock = filelock.FileLock(os.path.join(directory, ".lock"), timeout=0)
  try:
    lock.acquire()
  except filelock.Timeout:
    yield False
    return
  try:
    yield True
  finally:
    lock.release()


def redact(url: str) -> str:
  """The storage URL without its password, for logs and reports."""
  if "://" in url and "@" in url:
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url
  return url


@dataclasses.dataclass
class Status:
  """Where one run stands: new, waiting, running, done, failed (its run raised) or lost (its worker died)."""
  state: str
  trials: list


def run_status(trials: list, finished_on_disk: bool) -> Status:
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


class Study:
  """One experiment's Optuna study: a trial per attempt at a run, its user attribute 'run' the run's hash."""

  def __init__(self, url: str, workdir: str, name: str, heartbeat_interval: int, grace_period: int, log=print):
    """Opens (or creates) the study; creating the tables is retried, as another command may be doing the same."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    self.workdir = workdir
    self.log = log
    url = url or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'optuna.db'))}"
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
      try:
        with dir_lock(workdir):
          self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                    heartbeat_interval=heartbeat_interval, grace_period=grace_period)
          self.study = optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True,
                                           direction="maximize")
        break
      except Exception as e:  # noqa: BLE001  (a concurrent CREATE TABLE on a shared server; try again)
        if attempt == 4:
          raise RuntimeError(f"--storage={redact(url)}: cannot open Optuna study {name!r}: {e}") from e
        time.sleep(1.0 + attempt)
    self.name = self.study.study_name
    self.study_id = self.storage.get_study_id_from_name(self.name)

  def trials(self, states: tuple | None = None) -> list:
    return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

  def trials_by_run(self) -> dict[str, list]:
    """Run hash -> its trials, by trial number."""
    out: dict[str, list] = {}
    for t in sorted(self.trials(), key=lambda t: t.number):
      out.setdefault(t.user_attrs.get("run", ""), []).append(t)
    return out

  def statuses(self, runs: Iterable[str], finished: Callable[[str], bool]) -> dict[str, Status]:
    """Run hash -> Status, for `runs`; `finished(hash)` says whether the run's result is on disk."""
    by_run = self.trials_by_run()
    return {h: run_status(by_run.get(h, []), finished(h)) for h in runs}

  def tally(self, runs: Iterable[str], finished: Callable[[str], bool]) -> dict[str, int]:
    counts = {state: 0 for state in STATES}
    for status in self.statuses(runs, finished).values():
      counts[status.state] += 1
    return counts

  def queue(self, runs: dict, states: tuple[str, ...], finished: Callable[[str], bool],
            result: Callable[[str], tuple[float, dict]]) -> int:
    """Adds a WAITING trial for every run (hash -> experiments.Run) whose status is in `states`; returns how many.

    A run finished on disk but unknown to this store (a new storage URL, a deleted database) is recorded as a
    COMPLETE trial with `result(hash)`'s (objective, metrics). Under the directory's lock."""
    queued = 0
    with dir_lock(self.workdir):
      for h, status in self.statuses(runs, finished).items():
        run = runs[h]
        attrs = {"run": h, "setting": run.setting, "seed": run.seed}
        if status.state == "done" and not any(t.state == TrialState.COMPLETE for t in status.trials):
          value, metrics = result(h)
          self.study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                            user_attrs={**attrs, "skipped": "result.json existed", **metrics}))
        elif status.state in states:
          self.study.enqueue_trial({}, user_attrs=attrs)
          queued += 1
    return queued

  def fail_stale(self) -> None:
    """Fails the RUNNING trials whose heartbeat is older than the grace period (their worker died)."""
    fail_stale_trials(self.study)

  def claim(self):
    """(trial, trial_id) of the lowest-numbered WAITING trial, now RUNNING and ours; None when there is none.

    The storage's WAITING -> RUNNING update is atomic on a database server (a row lock), but not on SQLite, where
    two connections can both read WAITING and both write RUNNING: the claim is also made under the directory's
    file lock, which every worker of a SQLite study shares (callers in one process hold a thread lock too)."""
    with dir_lock(self.workdir):
      for t in sorted(self.trials((TrialState.WAITING,)), key=lambda t: t.number):
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

  def duplicate_of(self, trial) -> str:
    """Why `trial` must not run (its run finished, or a lower-numbered trial of it is queued); '' if it may."""
    run_hash = trial.user_attrs.get("run")
    for t in self.trials_by_run().get(run_hash, []):
      if t.number == trial.number:
        continue
      if t.state == TrialState.COMPLETE:
        return f"run {run_hash} already finished in trial {t.number}"
      if t.number < trial.number and t.state in (TrialState.WAITING, TrialState.RUNNING):
        return f"duplicate of trial {t.number} (run {run_hash})"
    return ""

  def record_heartbeat(self, trial_id: int) -> None:
    self.storage.record_heartbeat(trial_id)

  def set_attrs(self, trial_id: int, attrs: dict) -> None:
    for key, value in attrs.items():
      try:
        self.storage.set_trial_user_attr(trial_id, key, value)
      except Exception:  # noqa: BLE001  (the trial was failed as stale meanwhile; the run is re-queued)
        return

  def tell(self, number: int, state: TrialState, value: float | None = None) -> None:
    try:
      self.study.tell(number, values=None if value is None else [value], state=state, skip_if_finished=True)
    except Exception as e:  # noqa: BLE001
      self.log(f"[sweep] note: could not record trial {number} as {state.name}: {e}")

  def complete(self, trial_id: int, number: int, value: float, attrs: dict) -> None:
    self.set_attrs(trial_id, attrs)
    self.tell(number, TrialState.COMPLETE, value)

  def prune(self, trial_id: int, number: int, why: str) -> None:
    self.set_attrs(trial_id, {"skipped": why})
    self.tell(number, TrialState.PRUNED)

  def fail(self, trial_id: int, number: int, attrs: dict) -> None:
    self.set_attrs(trial_id, attrs)
    self.tell(number, TrialState.FAIL)

  def seconds_of_completed(self, runs: Iterable[str]) -> list[float]:
    """Seconds of every COMPLETE trial of `runs` that executed (not one skipped as already finished)."""
    wanted = set(runs)
    return [t.user_attrs["seconds"] for t in self.trials()
            if t.state == TrialState.COMPLETE and "seconds" in t.user_attrs and t.user_attrs.get("run") in wanted]
