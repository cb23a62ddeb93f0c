"""The plan of a sweep: which runs (an experiment's settings x seeds), each with its resolved config and hash,
and the files that record them: DIR/sweep.json (what `python -m llmstages.compare` reads) and each run's
DIR/runs/<hash>/run.json (what the run's own process resolves its config from)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

from llmstages import experiments


def run_dir(workdir: str, run_hash: str) -> str:
  return os.path.join(workdir, "runs", run_hash)


def is_finished(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "result.json"))


def write_json(path: str, obj) -> None:
  """Atomic: a reader sees the old file or the new one, never half of it."""
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every run of one experiment (at its arg), by hash, and what the report compares."""
  experiment: experiments.Experiment
  runs: dict[str, experiments.Run]  # Hash -> run, in the experiment's order.
  metrics: tuple[str, ...]
  stages: tuple[str, ...]  # The base config's stages; the last one's eval.json holds the objective.

  @classmethod
  def of(cls, experiment: experiments.Experiment) -> Plan:
    return cls(experiment=experiment, runs={r.hash: r for r in experiment.runs()}, metrics=experiment.metrics,
               stages=tuple(experiment.base_config().stages))

  @property
  def spec(self) -> str:
    return self.experiment.spec

  @property
  def study_name(self) -> str:
    return f"llmstages:{self.spec}"

  def to_json(self, storage: str, command: str) -> dict:
    """The content of sweep.json."""
    exp = self.experiment
    return {"experiment": exp.spec, "name": exp.name, "description": exp.description, "metrics": list(self.metrics),
            "pareto": list(exp.pareto) if exp.pareto else None, "baseline": exp.baseline,
            "stages": list(self.stages), "study": self.study_name, "storage": storage, "command": command,
            "runs": [r.to_json() for r in self.runs.values()]}

  def write(self, workdir: str, storage: str, command: str) -> None:
    """DIR/sweep.json and each run's run.json (kept if it exists); refuses a DIR holding another experiment."""
    path = os.path.join(workdir, "sweep.json")
    if os.path.exists(path):
      with open(path) as f:
        earlier = json.load(f).get("experiment")
      if earlier != self.spec:
        raise ValueError(f"--workdir={workdir} holds the sweep of {earlier!r}, not {self.spec!r}: give each "
                         f"experiment (and arg) its own directory")
    write_json(path, self.to_json(storage, command))
    for run in self.runs.values():
      directory = run_dir(workdir, run.hash)
      os.makedirs(directory, exist_ok=True)
      path = os.path.join(directory, "run.json")
      if not os.path.exists(path):
        write_json(path, {"experiment": self.spec, **run.to_json()})


def read_run(directory: str) -> tuple[dict, experiments.Run]:
  """(run.json, the run resolved again from its experiment); fails if the config no longer hashes the same."""
  with open(os.path.join(directory, "run.json")) as f:
    spec = json.load(f)
  exp = experiments.load(spec["experiment"])
  run = exp.resolve({**spec["overrides"], "seed": spec["seed"], "setting": spec["setting"]})
  if run.hash != spec["hash"]:
    raise RuntimeError(f"{directory}/run.json: the experiment {spec['experiment']} now resolves this run to config "
                       f"{run.hash}, not {spec['hash']}: its base config changed after the sweep queued it. Rerun "
                       f"the sweep command to plan the runs again.")
  return spec, run
