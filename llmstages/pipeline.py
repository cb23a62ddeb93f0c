"""Runs the stages named in `config.stages`, in order; each starts from its `init_from` stage's final parameters."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from llmstages import evals, inputs, train
from llmstages import stages as stages_lib
from llmstages import workdir as workdir_lib


def load_config(workdir: str):
  """The resolved config a pipeline wrote to `workdir/config.json`, as a locked ConfigDict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory a pipeline ran in")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


def write_resolved_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != text:
      # Keep the earlier config: a changed config in an old workdir is worth seeing, not silently overwriting.
      n = 1
      while os.path.exists(f"{path}.{n}"):
        n += 1
      os.replace(path, f"{path}.{n}")
      print(f"note: {path} differed from this run's config; the old one is kept as {path}.{n}", flush=True)
  with open(path, "w") as f:
    f.write(text)


def check_stages(config, workdir: str) -> None:
  """Fails, naming the config key, before anything is written: a bad stage block, an `init_from` or frozen model
  that neither runs earlier nor finished in `workdir`, an unknown evaluator or a bad config.eval."""
  for name in config.stages:
    train.validate_stage_config(config, name)
    init_from = config[name].init_from
    if init_from and init_from not in config.stages[:config.stages.index(name)] and \
        not workdir_lib.stage_finished(workdir, init_from):
      raise ValueError(f"config.{name}.init_from={init_from!r}: that stage neither runs before {name!r} in "
                       f"config.stages={config.stages} nor has a final checkpoint in {workdir}")
    earlier = config.stages[:config.stages.index(name)]
    stage = stages_lib.get(config[name].get("kind") or name, config[name], f"config.{name}")
    for role, (source, _) in stage.frozen_models().items():
      if source not in earlier and not workdir_lib.stage_finished(workdir, source):
        raise ValueError(f"config.{name}: its {role} model, stage {source!r}, neither runs before {name!r} in "
                         f"config.stages={config.stages} nor has a final checkpoint in {workdir}")
  for name in config.stages:
    evals.check(config, name)  # An unknown evaluator or a bad config.eval fails before anything is written.


def run(config, workdir: str, mesh=None) -> list[dict]:
  """Runs every stage of `config.stages` in `workdir`. Finished stages are skipped; an interrupted one resumes.

  `mesh` overrides the one `config.mesh` would build from all devices (tests pin runs to a subset).
  """
  check_stages(config, workdir)
  write_resolved_config(config, workdir)
  tokenizer = inputs.tokenizer_for(config, workdir)
  results = []
  for name in config.stages:
    results.append(train.run_stage(config, name, workdir, tokenizer=tokenizer, mesh=mesh))
    evals.evaluate_stage(config, name, workdir, tokenizer=tokenizer)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "pipeline.json"), "w") as f:
      json.dump({"stages": list(config.stages), "results": results}, f, indent=2)
    table = results_table(workdir, config.stages)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    print(f"Results ({os.path.join(workdir, 'results.md')}):\n{table}", flush=True)
  return results


# Headline metrics of the results table: (column, eval.json key, key of a fallback such as maj@k with another k).
HEADLINE = (("held-out loss", "perplexity/loss"), ("memorized facts", "bios_facts/memorization/mean_greedy"),
            ("new people", "bios_facts/new_people/mean_greedy"),
            ("QA train", "bios_facts/qa_train/greedy"), ("QA test", "bios_facts/qa_test/greedy"),
            ("arith greedy", "arith/greedy"), ("arith maj@k", "arith/maj@"), ("story EAD", "diversity/per_input/ead"),
            ("story valid", "diversity/validity"), ("bits/param", "capacity/R"),
            ("pref. acc.", "stage/accuracy"), ("reward", "stage/reward"))


def results_table(workdir: str, stages) -> str:
  """A Markdown table of each stage's headline metrics (from <stage>/eval.json); '-' where a stage lacks one."""
  rows = []
  for name in stages:
    path = os.path.join(workdir, name, "eval.json")
    metrics = {}
    if os.path.exists(path):
      with open(path) as f:
        metrics = json.load(f)["metrics"]
    cells = []
    for _, key in HEADLINE:
      found = [k for k in sorted(metrics) if k == key or (key.endswith("@") and k.startswith(key))]
      cells.append(f"{metrics[found[0]]['value']:.3g}" if found else "-")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  header = "| stage | " + " | ".join(c for c, _ in HEADLINE) + " |"
  return "\n".join([header, "|" + " --- |" * (len(HEADLINE) + 1)] + rows)
