r"""Runs an experiment's sweep: each run in its own workdir and subprocess, bookkept in an Optuna study.

  python -m llmstages.sweep --list
  python -m llmstages.sweep --experiment=NAME[:ARG] --workdir=DIR [--workers=N] [--storage=URL]

Every run of the experiment (the module `experiments.NAME`, see llmstages/experiments.py) is queued up front as a
WAITING trial of the Optuna study 'llmstages:NAME[:ARG]'. The store is the SQLite file DIR/optuna.db unless
--storage names another Optuna storage URL (e.g. postgresql://USER@HOST/DB): then workers on several machines run
the same command against one study, with DIR on a filesystem they share. Each of the --workers pulls one trial at
a time and runs it as `python -m llmstages.sweep --run_dir=...` in a subprocess, so a crash stays in its run. A
run's workdir is DIR/runs/<hash>, the hash of its fully resolved config (seed included):

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

No run executes twice at once: claiming and queueing are atomic (see `study`), duplicates of a run are pruned,
and a worker holds a lock on the run's directory while the run executes. A worker with nothing left to pull waits
until no trial runs anywhere, then prints a summary; the exit status is non-zero when any run failed. Runs share a
JAX compilation cache (DIR/jax_cache) so that a sweep of identical shapes compiles once. The study's objective
value is the experiment's first metric at its last stage (0 where absent); each trial's user attributes hold its
run hash, setting, seed, seconds, host and, on failure, the end of stderr.

Modules, one job each: `plan` (which runs, their configs and hashes; sweep.json and run.json), `study` (the Optuna
bookkeeping and the file locks), `worker` (the worker threads, each run's subprocess and heartbeats, and the run's
own side), `report` (results, progress lines, the summary) and `__main__` (the flags and the command).
"""
