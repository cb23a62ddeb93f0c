"""The experiment registry and the sweep runner: real smoke sweeps in subprocesses, killed, failing, on PostgreSQL."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from llmstages import experiments
from tests.helpers import free_port, made_once, one_device_env, shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "dropout_vs_facts:smoke"
STUDY = f"llmstages:{SMOKE}"


def _env() -> dict:
  env = one_device_env()  # One CPU device per run, as a plain machine has (conftest forces 8 in-process).
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
  return env


def sweep_cmd(workdir, cache, *extra, experiment=SMOKE) -> list[str]:
  return [sys.executable, "-m", "llmstages.sweep", f"--experiment={experiment}", f"--workdir={workdir}",
          "--heartbeat_interval=1", "--grace_period=3", "--progress_every=30", f"--compilation_cache={cache}",
          *extra]


def run_sweep(workdir, cache, *extra, experiment=SMOKE, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(sweep_cmd(workdir, cache, *extra, experiment=experiment), env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def trials(workdir, storage="", study=STUDY):
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  url = storage or f"sqlite:///{os.path.join(workdir, 'optuna.db')}"
  return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def completed_runs(all_trials) -> list[str]:
  return sorted(t.user_attrs["run"] for t in all_trials if t.state.name == "COMPLETE")


def attempts_started(run_dir: str) -> int:
  """How many times a run's process was started: one header per attempt in its stdout."""
  with open(os.path.join(run_dir, "stdout.txt")) as f:
    return sum(1 for line in f if line.startswith("=== "))


def _run_processes(workdir: str) -> list[int]:
  """Pids of run processes (ours only: their command line names this sweep's directory)."""
  pids = []
  for path in glob.glob("/proc/[0-9]*/cmdline"):
    with contextlib.suppress(OSError):
      with open(path, "rb") as f:
        cmd = f.read().decode(errors="replace")
      if "--run_dir=" in cmd and str(workdir) in cmd:
        pids.append(int(path.split("/")[2]))
  return pids


def _has_checkpoint(run_dir: str) -> bool:
  return any(name.isdigit() for name in os.listdir(os.path.join(run_dir, "pretrain", "checkpoints"))) \
      if os.path.isdir(os.path.join(run_dir, "pretrain", "checkpoints")) else False


def jax_cache(tmp_path_factory):
  """The compilation cache every sweep of the test session shares, whichever xdist worker runs it: the smoke
  sweep's programs are the PostgreSQL test's (concurrent processes share it as a sweep's own workers do)."""
  return shared_path(tmp_path_factory, "jax_cache")


def smoke_sweep(tmp_path_factory) -> tuple[str, dict]:
  """The 4-run smoke sweep with 2 workers, killed (kill -9) while a run is mid-way, then rerun to the end.

  Made once per test session (test_compare.py reads the same finished sweep); returns (workdir, record).
  """
  with made_once(tmp_path_factory, "smoke_sweep") as (base, done):
    if not done:
      _make_smoke_sweep(base, jax_cache(tmp_path_factory))
  return str(base / "sweep"), json.loads((base / "record.json").read_text())


def _make_smoke_sweep(base, cache):
  workdir, record_path = base / "sweep", base / "record.json"
  runs = {r.hash: r for r in experiments.load(SMOKE).runs()}
  proc = subprocess.Popen(sweep_cmd(workdir, cache, "--workers=2"), env=_env(), cwd=ROOT, start_new_session=True,
                          stdout=open(base / "first.log", "w"), stderr=subprocess.STDOUT)
  deadline = time.time() + 420
  finished, mid = [], []
  while time.time() < deadline and proc.poll() is None:
    dirs = {h: os.path.join(workdir, "runs", h) for h in runs}
    finished = [h for h, d in dirs.items() if os.path.exists(os.path.join(d, "result.json"))]
    mid = [h for h, d in dirs.items() if h not in finished and _has_checkpoint(d)]
    if finished and mid:
      break
    time.sleep(0.1)
  assert proc.poll() is None, f"the sweep ended before it could be killed:\n{(base / 'first.log').read_text()}"
  assert finished and mid, f"no finished run and run with a checkpoint in time:\n{(base / 'first.log').read_text()}"
  mtimes = {h: os.path.getmtime(os.path.join(workdir, "runs", h, "result.json")) for h in finished}
  os.killpg(proc.pid, signal.SIGKILL)  # The whole sweep command dies at once, as when its machine is lost.
  proc.wait()
  for _ in range(50):  # Its run processes follow it (PR_SET_PDEATHSIG): no orphan keeps writing.
    if not _run_processes(workdir):
      break
    time.sleep(0.1)
  orphans = _run_processes(workdir)
  second = run_sweep(workdir, cache, "--workers=2")
  (base / "second.log").write_text(second.stdout + second.stderr)
  record = {"finished_before_kill": finished, "mid_run_at_kill": mid, "mtimes": mtimes, "orphans": orphans,
            "returncode": second.returncode, "log": second.stdout + second.stderr}
  record_path.write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------------------
# The registry (no runs).

def test_sweep_helpers_build_plain_lists():
  assert experiments.grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  assert experiments.zip_({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  with pytest.raises(ValueError, match="equally long"):
    experiments.zip_({"a": [1, 2], "b": [3]})
  runs = experiments.product([experiments.setting("x", {"k": 1}), experiments.setting("y", {"k": 2})],
                             experiments.seeds(2))
  assert [(r["setting"], r["seed"]) for r in runs] == [("x", 0), ("x", 1), ("y", 0), ("y", 1)]


def test_registry_lists_every_experiment_and_smoke_shrinks_it():
  shipped = ("dropout_vs_facts", "capacity", "augmentation_extraction", "late_dropout", "alignment_diversity",
             "dropout_bits")
  assert set(shipped) <= set(experiments.names())
  for name in shipped:
    full, smoke = experiments.load(name), experiments.load(f"{name}:smoke")
    assert full.metrics and all("/" in m for m in full.metrics)
    assert len(smoke.runs()) <= 4 < len(full.runs())
    assert smoke.base_config().model.d_model == 32  # configs/quickstart.py:smoke size.
    assert full.baseline in {r.setting for r in full.runs()}
  exp = experiments.load("dropout_vs_facts")
  settings = {r.setting for r in exp.runs()}
  assert {"none", "dropout@pretrain", "mlp_dropout@cpt", "neftune@cpt", "weight_decay@pretrain"} <= settings
  assert all(sum(r.setting == s for r in exp.runs()) == experiments.DEFAULT_SEEDS for s in settings)  # Seeds each.
  one = next(r for r in exp.runs() if r.setting == "attn_dropout@cpt")
  assert one.config.cpt.reg.attn_dropout == 0.1 and one.config.pretrain.reg.attn_dropout is None
  out = subprocess.run([sys.executable, "-m", "llmstages.sweep", "--list"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == len(experiments.names()) and all("runs" in line and "ERROR" not in line for line in lines)


def test_people_arg_sets_every_bios_population():
  import re
  c = experiments.config_file("quickstart.py", "people=50")
  specs = [c.pretrain.data, c.cpt.data, c.sft.data, c.instruct.data, c.dpo.data, c.eval.bios, c.eval.stories,
           c.eval.perplexity_data]
  sizes = {m for s in specs for m in re.findall(r"(?:\bn|bios_n)=(\d+)", s)}
  assert sizes == {"50"}, specs
  assert "n_new=10" in c.cpt.data
  assert "n=64," in experiments.config_file("quickstart.py", "").pretrain.data  # The quick curriculum (issue #14).
  for bad, message in (("people=x", "not an integer"), ("peple=5", "unknown arg"), ("people=3", "at least 8")):
    with pytest.raises(ValueError, match=message):
      experiments.config_file("quickstart.py", bad)
  cap = experiments.config_file("capacity.py", "people=500")
  assert cap.pretrain.data == cap.eval.bios == "bios(n=500,format=multi_permute)"
  assert cap.pretrain.steps == experiments.config_module("capacity.py").steps_for_exposures(100, 500, 32, 128)


def test_reduced_sweeps_are_subsets_of_their_design():
  core = experiments.load("dropout_vs_facts:core").runs()
  assert len(core) == 6 * experiments.DEFAULT_SEEDS
  assert {r.seed for r in core} == set(range(experiments.DEFAULT_SEEDS)) == set(range(5))
  assert all(r.config.stages == ("pretrain",) for r in core)
  assert {r.setting for r in core} == {"none", "dropout@pretrain", "drop_path@pretrain", "neftune@pretrain",
                                       "label_smoothing@pretrain", "weight_decay@pretrain"}
  sites = experiments.load("dropout_vs_facts:sites").runs()
  assert len(sites) == 5 * 5 and all(r.config.stages == ("pretrain",) for r in sites)
  alone = {r.setting: r.config.pretrain.reg for r in sites if r.seed == 0}
  assert alone["none"].dropout == 0.0 and alone["none"].attn_dropout is None
  assert alone["attn_dropout@pretrain"].attn_dropout == 0.1 and alone["attn_dropout@pretrain"].dropout == 0.0
  at_cpt = experiments.load("dropout_vs_facts:cpt").runs()
  assert len(at_cpt) == 6 * 5 and all(r.config.stages == ("pretrain", "cpt") for r in at_cpt)
  neftune = next(r.config for r in at_cpt if r.setting == "neftune@cpt")
  assert (neftune.pretrain.reg.neftune_alpha, neftune.cpt.reg.neftune_alpha) == (0.0, 5.0)
  with pytest.raises(ValueError, match=r"args \['core', 'cpt'\] are different cuts of the design; give one"):
    experiments.load("dropout_vs_facts:core,cpt").runs()
  bits = experiments.load("dropout_bits").runs()  # The rates at size m, 100 exposures of 4000 people.
  assert {r.config.pretrain.reg.dropout for r in bits} == {0.0, 0.05, 0.1, 0.2} and len(bits) == 4 * 3
  assert {(r.config.model.d_model, r.config.eval.bios, r.config.pretrain.steps) for r in bits} == {
      (64, "bios(n=4000,format=multi_permute)", experiments.config_module("capacity.py").steps_for_exposures(
          100, 4000, 32, 128))}
  aligned = {(r.setting, r.seed): r.config for r in experiments.load("alignment_diversity").runs()}
  assert len(aligned) == 4 * 5  # dpo, ppo and the DPO route regularized in the supervised stages only.
  base, neft = aligned["dpo", 0], aligned["dpo_neftune", 0]
  assert neft.stages == base.stages and [neft[s].reg.neftune_alpha for s in neft.stages] == [0, 5, 5, 0, 0, 0]
  assert [aligned["dpo_dropout", 0][s].reg.dropout for s in base.stages] == [0, 0.1, 0.1, 0, 0, 0]
  assert len(experiments.load("dropout_bits:seeds=5").runs()) == 4 * 5
  cut = {r.hash: r.config.pretrain.reg.dropout for r in experiments.load("dropout_bits:cpu").runs()}
  assert sorted(set(cut.values())) == [0.0, 0.1, 0.2] and len(cut) == 3 * 3 and cut.keys() < {r.hash for r in bits}
  with pytest.raises(ValueError, match=r"dropout_bits.py: seeds='x'; give a positive whole number"):
    experiments.load("dropout_bits:seeds=x").runs()
  cpu = experiments.load("capacity:cpu").runs()
  assert len(cpu) == 4 * 5 and {r.config.model.d_model for r in cpu} == {16, 32}
  assert len(experiments.load("capacity:cpu,seeds=3").runs()) == 12
  with pytest.raises(ValueError, match=r"capacity.py: seeds=''; give a positive whole number"):
    experiments.load("capacity:cpu,seeds").runs()
  assert all(r.config.eval.bios == "bios(n=200,format=multi_permute)" for r in cpu)
  assert {r.config.pretrain.reg.dropout for r in cpu} == {0.0, 0.1}


def test_run_hash_is_the_resolved_config():
  exp = experiments.load(SMOKE)
  a, b = exp.runs()[:2]
  assert a.hash == exp.resolve({"setting": "other name", "seed": a.seed, **a.overrides}).hash
  assert a.hash != b.hash
  with pytest.raises(KeyError, match="dropuot"):
    exp.resolve({"pretrain.reg.dropuot": 0.1})  # A mistyped key fails when the sweep is planned.


# ---------------------------------------------------------------------------------------------------------------
# Sweeps.

def test_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path_factory):
  workdir, record = smoke_sweep(tmp_path_factory)
  assert record["returncode"] == 0, record["log"]
  assert not record["orphans"], "run processes outlived their killed sweep"
  runs = {r.hash: r for r in experiments.load(SMOKE).runs()}
  assert len(runs) == 4
  for h in runs:
    assert os.path.exists(os.path.join(workdir, "runs", h, "result.json"))
    for stage in ("pretrain", "cpt"):
      assert os.path.exists(os.path.join(workdir, "runs", h, stage, "eval.json"))
  for h in record["finished_before_kill"]:  # Not run again, not even started.
    assert attempts_started(os.path.join(workdir, "runs", h)) == 1
    assert os.path.getmtime(os.path.join(workdir, "runs", h, "result.json")) == record["mtimes"][h]
  for h in record["mid_run_at_kill"]:  # Started again in the same workdir, from where it was.
    rd = os.path.join(workdir, "runs", h)
    assert attempts_started(rd) == 2
    with open(os.path.join(rd, "stdout.txt")) as f:
      last_attempt = f.read().split("\n=== ")[-1]
    assert "resumed from checkpoint step" in last_attempt or "already finished" in last_attempt
  all_trials = trials(workdir)
  assert completed_runs(all_trials) == sorted(runs)  # The store holds each run exactly once.
  for t in all_trials:  # Other trials are the killed command's, failed by the missing heartbeat (no error).
    assert t.state.name == "COMPLETE" or (t.state.name == "FAIL" and "error" not in t.user_attrs), t
  assert "4/4 done" in record["log"] and "eta" in record["log"]
  again = run_sweep(workdir, jax_cache(tmp_path_factory), "--workers=2")
  assert again.returncode == 0 and "this command executed 0" in again.stdout, again.stdout + again.stderr
  assert completed_runs(trials(workdir)) == sorted(runs)


FAILING = '''"""Test experiment: one run whose config makes the pipeline raise, then one that finishes."""
from llmstages import experiments
METRICS = ("perplexity/loss",)
def get_config(arg):
  c = experiments.config_file("capacity.py", "smoke")
  c.pretrain.evals = ("perplexity",)
  return c
def get_sweep(arg):
  return [experiments.setting("bad", {"pretrain.reg.dropout": 1.5}, seed=0), experiments.setting("good", seed=0)]
'''


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path, tmp_path_factory):
  path = tmp_path / "failing.py"
  path.write_text(FAILING)
  workdir = tmp_path / "sweep"
  out = run_sweep(workdir, jax_cache(tmp_path_factory), "--workers=1", experiment=str(path))
  log = out.stdout + out.stderr
  assert out.returncode == 1, log
  assert "1 failed" in log and "FAILED bad seed 0" in log and "a rate must be in [0, 1), got 1.5" in log
  exp = experiments.load(str(path))
  by_setting = {r.setting: r.hash for r in exp.runs()}
  assert os.path.exists(os.path.join(workdir, "runs", by_setting["good"], "result.json"))
  assert not os.path.exists(os.path.join(workdir, "runs", by_setting["bad"], "result.json"))
  states = {t.user_attrs["setting"]: t for t in trials(workdir, study=f"llmstages:{exp.spec}")}
  assert states["good"].state.name == "COMPLETE"
  assert states["bad"].state.name == "FAIL"
  assert "a rate must be in [0, 1), got 1.5" in states["bad"].user_attrs["error"]
  assert "config.pretrain.reg.dropout" in states["bad"].user_attrs["error"]


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL.

def _postgres_bin() -> str:
  for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
    if os.path.exists(os.path.join(d, "initdb")):
      return d
  for tool in ("initdb", "pg_ctl"):
    found = shutil.which(tool)
    if found and os.path.exists(os.path.join(os.path.dirname(os.path.realpath(found)), "initdb")):
      return os.path.dirname(os.path.realpath(found))
  pytest.fail("PostgreSQL is not installed (initdb not found); .ci/run installs it: apt-get install -y postgresql")


@contextlib.contextmanager
def postgres_server():
  """A throwaway PostgreSQL server on 127.0.0.1; yields its URL. As root it runs as the `postgres` user."""
  bindir = _postgres_bin()
  root = tempfile.mkdtemp(prefix="llmstages_pg_")
  as_user = {}
  if os.geteuid() == 0:  # initdb and postgres refuse to run as root.
    try:
      pw = pwd.getpwnam("postgres")
    except KeyError:
      pw = pwd.getpwnam("nobody")
    os.chown(root, pw.pw_uid, pw.pw_gid)
    as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
  data, log, port = os.path.join(root, "data"), os.path.join(root, "server.log"), free_port()
  env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": root}

  def pg(*args, **kw):
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120, **as_user, **kw)

  try:
    out = pg(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N")
    assert out.returncode == 0, out.stdout + out.stderr
    out = pg(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "-o",
             f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    assert out.returncode == 0, out.stdout + out.stderr + (open(log).read() if os.path.exists(log) else "")
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
  finally:
    pg(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


def test_two_sweep_commands_on_postgres_finish_the_same_runs_once(tmp_path, tmp_path_factory):
  workdir, cache = tmp_path / "sweep", jax_cache(tmp_path_factory)
  expected = sorted(r.hash for r in experiments.load(SMOKE).runs())
  with postgres_server() as url:
    # Two commands started at once, each one worker, as on two machines sharing the study and the directory.
    procs = [subprocess.Popen(sweep_cmd(workdir, cache, "--workers=1", f"--storage={url}"), env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
      assert p.returncode == 0, log
    all_trials = trials(workdir, storage=url)
  assert completed_runs(all_trials) == expected
  for t in all_trials:  # Duplicates, if both queued a run, are pruned without running.
    assert t.state.name in ("COMPLETE", "PRUNED"), t
  for h in expected:
    assert attempts_started(os.path.join(workdir, "runs", h)) == 1
  executed = sum(int(log.rsplit("this command executed ", 1)[1].split()[0]) for log in logs)
  assert executed == 4 and all("this command executed 0" not in log for log in logs), logs
  sqlite_runs = completed_runs(trials(smoke_sweep(tmp_path_factory)[0]))
  assert sqlite_runs == expected  # The same runs as the SQLite sweep.
