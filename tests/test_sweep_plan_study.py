"""The sweep's plan and its Optuna bookkeeping, without a subprocess: which runs with which hashes, the files the
plan writes, queueing each run once, resuming a half-done study, taking over a lost run, and the locks."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from llmstages import experiments
from llmstages.sweep import plan as plan_lib
from llmstages.sweep import study as study_lib

SMOKE = "dropout_vs_facts:smoke"
# (setting, seed, hash) of the smoke sweep's runs: the hash is of the fully resolved config, so a changed config
# default, key or nesting shows up here. Last changed on purpose by the quickstart curriculum (issue #14), which
# changed the quickstart's data specs (the layering redesign before it kept every hash).
SMOKE_RUNS = [("none", 0, "0a4017903a4e21e1"), ("none", 1, "ab060f72eaa9c6c0"),
              ("dropout@pretrain", 0, "1ddcf1d1ccb7b1b4"), ("dropout@pretrain", 1, "f498ad376dc6da71")]
ALL_STATES = ("new", "lost", "failed")


def never_finished(run_hash: str) -> bool:
  return False


def no_result(run_hash: str) -> tuple[float, dict]:
  raise AssertionError(f"run {run_hash} is not finished on disk")


@pytest.fixture(scope="module")
def plan():
  return plan_lib.Plan.of(experiments.load(SMOKE))


def open_study(workdir, name: str = "llmstages:test", grace_period: int = 60) -> study_lib.Study:
  return study_lib.Study("", str(workdir), name, heartbeat_interval=1, grace_period=grace_period, log=lambda _: None)


def test_plan_lists_settings_times_seeds_with_stable_hashes(plan):
  assert [(r.setting, r.seed, h) for h, r in plan.runs.items()] == SMOKE_RUNS
  assert list(plan_lib.Plan.of(experiments.load(SMOKE)).runs) == list(plan.runs)  # Planned again: the same.
  assert plan.study_name == "llmstages:dropout_vs_facts:smoke"
  assert plan.stages == ("pretrain", "cpt") and plan.metrics[0] == "bios_facts/memorization/mean_greedy"
  core = plan_lib.Plan.of(experiments.load("dropout_vs_facts:core"))
  assert len(core.runs) == 6 * experiments.DEFAULT_SEEDS
  assert {r.seed for r in core.runs.values()} == set(range(experiments.DEFAULT_SEEDS))


def test_plan_writes_sweep_json_and_each_run_json(plan, tmp_path):
  plan.write(str(tmp_path), "sqlite:///WORKDIR/optuna.db", "python -m llmstages.sweep --experiment=" + SMOKE)
  with open(tmp_path / "sweep.json") as f:
    sweep = json.load(f)
  assert sweep["experiment"] == SMOKE and sweep["baseline"] == "none" and sweep["stages"] == ["pretrain", "cpt"]
  assert [(r["setting"], r["seed"], r["hash"]) for r in sweep["runs"]] == SMOKE_RUNS
  for run_hash, run in plan.runs.items():
    spec, again = plan_lib.read_run(plan_lib.run_dir(str(tmp_path), run_hash))
    assert spec == {"experiment": SMOKE, **run.to_json()} and again.hash == run_hash
  other = plan_lib.Plan.of(experiments.load("late_dropout:smoke"))
  with pytest.raises(ValueError, match="holds the sweep of 'dropout_vs_facts:smoke'"):
    other.write(str(tmp_path), "", "")
  run_json = os.path.join(plan_lib.run_dir(str(tmp_path), SMOKE_RUNS[0][2]), "run.json")
  with open(run_json) as f:
    spec = json.load(f)
  plan_lib.write_json(run_json, {**spec, "overrides": {"pretrain.reg.dropout": 0.2}})
  with pytest.raises(RuntimeError, match="now resolves this run to config"):
    plan_lib.read_run(os.path.dirname(run_json))


def test_study_queues_each_run_once(plan, tmp_path):
  study = open_study(tmp_path)
  assert study.queue(plan.runs, ALL_STATES, never_finished, no_result) == 4
  assert study.queue(plan.runs, ALL_STATES, never_finished, no_result) == 0  # Waiting already.
  assert open_study(tmp_path).queue(plan.runs, ALL_STATES, never_finished, no_result) == 0  # Another command.
  assert study.tally(plan.runs, never_finished) == {"done": 0, "failed": 0, "running": 0, "waiting": 4, "lost": 0,
                                                    "new": 0}
  claimed = [study.claim() for _ in range(4)]
  assert [trial.user_attrs["run"] for trial, _ in claimed] == list(plan.runs)  # Lowest number first.
  assert study.claim() is None
  assert study.tally(plan.runs, never_finished)["running"] == 4


def test_a_half_done_study_resumes_where_it_stopped(plan, tmp_path):
  study = open_study(tmp_path)
  study.queue(plan.runs, ALL_STATES, never_finished, no_result)
  (done, done_id), (failed, failed_id), (lost, lost_id) = [study.claim() for _ in range(3)]
  study.complete(done_id, done.number, 0.5, {"seconds": 1.0})
  study.fail(failed_id, failed.number, {"error": "exit status 1\nValueError: a rate must be in [0, 1)"})
  study.fail(lost_id, lost.number, {})  # As fail_stale leaves a trial whose worker died: no error.
  again = open_study(tmp_path)  # The next sweep command.
  states = {h: s.state for h, s in again.statuses(plan.runs, never_finished).items()}
  assert list(states.values()) == ["done", "failed", "lost", "waiting"]
  assert again.queue(plan.runs, ("new", "lost"), never_finished, no_result) == 1  # --noretry_failed: the lost one.
  assert again.queue(plan.runs, ALL_STATES, never_finished, no_result) == 1  # Then the failed one.
  assert again.tally(plan.runs, never_finished) == {"done": 1, "failed": 0, "running": 0, "waiting": 3, "lost": 0,
                                                    "new": 0}
  runs = list(plan.runs)
  assert [t.user_attrs["run"] for t, _ in iter(again.claim, None)] == [runs[3], runs[2], runs[1]]  # By number.
  assert again.seconds_of_completed(plan.runs) == [1.0]


def test_finished_on_disk_is_recorded_not_queued(plan, tmp_path):
  first = list(plan.runs)[0]
  study = open_study(tmp_path, name="llmstages:new-store")  # A new storage: result.json files exist already.
  queued = study.queue(plan.runs, ALL_STATES, lambda h: h == first, lambda h: (0.25, {"final_x": 1.0}))
  assert queued == 3
  complete = [t for t in study.trials() if t.state.name == "COMPLETE"]
  assert [(t.user_attrs["run"], t.value, t.user_attrs["skipped"]) for t in complete] == [
      (first, 0.25, "result.json existed")]
  assert study.queue(plan.runs, ALL_STATES, lambda h: h == first, no_result) == 0


def test_a_duplicate_trial_of_a_run_is_refused(plan, tmp_path):
  study = open_study(tmp_path)
  study.queue(plan.runs, ALL_STATES, never_finished, no_result)
  first = list(plan.runs)[0]
  study.study.enqueue_trial({}, user_attrs={"run": first, "setting": "none", "seed": 0})  # A second command's.
  trials = [study.claim() for _ in range(5)]
  by_run = [(t.user_attrs["run"], study.duplicate_of(t)) for t, _ in trials]
  assert by_run[0] == (first, "") and by_run[4] == (first, f"duplicate of trial {trials[0][0].number} (run {first})")
  study.complete(trials[0][1], trials[0][0].number, 0.0, {})
  assert study.duplicate_of(trials[4][0]) == f"run {first} already finished in trial {trials[0][0].number}"


def test_a_run_whose_worker_died_is_failed_and_queued_again(plan, tmp_path):
  study = open_study(tmp_path, grace_period=1)
  study.queue(plan.runs, ALL_STATES, never_finished, no_result)
  trial, _ = study.claim()
  time.sleep(2.5)  # No heartbeat for longer than the grace period.
  study.fail_stale()
  assert study.statuses(plan.runs, never_finished)[trial.user_attrs["run"]].state == "lost"
  assert study.queue(plan.runs, ("lost",), never_finished, no_result) == 1


def test_run_lock_is_held_by_one_worker_at_a_time(tmp_path):
  seen = []

  def other_worker():
    with study_lib.run_lock(str(tmp_path)) as theirs:
      seen.append(theirs)

  with study_lib.run_lock(str(tmp_path)) as mine:
    other = threading.Thread(target=other_worker)
    other.start()
    other.join()
    assert mine and seen == [False]
  with study_lib.run_lock(str(tmp_path)) as mine:  # Released: free again.
    assert mine


def test_redact_hides_the_password():
  assert study_lib.redact("postgresql://me:secret@host/db") == "postgresql://me:***@host/db"
  assert study_lib.redact("postgresql://me@host/db") == "postgresql://me@host/db"
  assert study_lib.redact("sqlite:///x/optuna.db") == "sqlite:///x/optuna.db"
