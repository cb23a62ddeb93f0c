"""A pipeline's working directory: where each stage's final parameters, scalar head and LoRA adapters live, and
the I/O that writes and reads them (what `init_from`, frozen models and the evaluators load).

    <workdir>/<stage>/final_params   the language model (orbax)
    <workdir>/<stage>/final_head     a scalar head, if the stage has one (reward model, PPO value head)
    <workdir>/<stage>/final_lora     a LoRA stage's adapters and lora.json
    <workdir>/<stage>/final.json     the marker: the stage finished
    <workdir>/<stage>/final_eval.json   the loop's held-out evaluation at the last step, with the stage block it
                                        ran under (the `stage` evaluator reuses it only under the same block)
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from llmstages import checkpoint as ckpt_lib
from llmstages.model import split_head


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def final_params_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final_params")


def final_head_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final_head")


def final_marker(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final.json")


def _final_eval_path(stage_directory: str) -> str:
  return os.path.join(stage_directory, "final_eval.json")


def _block(stage_config) -> dict:
  """A stage's config block as plain JSON data, so that two blocks compare by value."""
  return json.loads(stage_config.to_json_best_effort(sort_keys=True))


def save_final_eval(stage_directory: str, step: int, stage_config, scalars: dict[str, float]) -> None:
  """The training loop's held-out `eval/` figures at its last step, with the stage's config block (process 0)."""
  if jax.process_index() != 0:
    return
  record = {"step": int(step), "stage_config": _block(stage_config),
            "metrics": {k: float(v) for k, v in scalars.items()}}
  path = _final_eval_path(stage_directory)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, sort_keys=True)
  os.replace(path + ".tmp", path)


def drop_final_eval(stage_directory: str) -> None:
  """Removes a kept final evaluation before a stage trains (again): its parameters are about to change, and with
  `eval_every` 0 no new one would replace it."""
  path = _final_eval_path(stage_directory)
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)


def load_final_eval(stage_directory: str, step: int, stage_config) -> dict[str, float] | None:
  """`save_final_eval`'s figures when they were made at `step` under this very stage block, else None."""
  path = _final_eval_path(stage_directory)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  same = record.get("stage_config") == _block(stage_config) and record.get("step") == int(step)
  return record["metrics"] if same else None


def stage_finished(workdir: str, stage: str) -> bool:
  return os.path.exists(final_marker(workdir, stage))


def save_final_params(workdir: str, stage: str, params, step: int) -> None:
  """Saves the language model to `final_params` and a scalar head, if any, apart in `final_head`, so every later
  stage and evaluator loads a plain language model."""
  path = final_params_dir(workdir, stage)
  lm, head = split_head(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), lm, force=True)
    if head:
      ckptr.save(os.path.abspath(final_head_dir(workdir, stage)), head, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(final_marker(workdir, stage), "w") as f:
      json.dump({"stage": stage, "step": int(step), "params": os.path.abspath(path)}, f)


def final_lora_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "final_lora")


def save_final_lora(workdir: str, stage: str, adapters, lora_config) -> None:
  """A LoRA stage's adapters, apart from the base (`final_params` holds the merged model every later stage and
  evaluator reads), with lora.json naming the rank, alpha and the stage they adapt (for `hf export --peft`)."""
  path = final_lora_dir(workdir, stage)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(path, "adapters")), adapters, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, "lora.json"), "w") as f:
      json.dump({"rank": int(lora_config.rank), "alpha": float(lora_config.alpha),
                 "dropout": float(lora_config.dropout), "targets": list(lora_config.targets)}, f, indent=1)


def load_final_lora(workdir: str, stage: str, abstract_adapters):
  """(adapters, lora.json) of a LoRA stage, restored onto the shardings of `abstract_adapters`."""
  path = final_lora_dir(workdir, stage)
  if not os.path.exists(os.path.join(path, "lora.json")):
    raise FileNotFoundError(f"stage {stage!r} in {workdir} has no LoRA adapters ({path}/lora.json is missing): "
                            f"was it trained with {stage}.lora.rank > 0?")
  with open(os.path.join(path, "lora.json")) as f:
    meta = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(os.path.join(path, "adapters")), abstract_adapters), meta


def _check_finished(workdir: str, stage: str, who: str, with_head: bool) -> None:
  if with_head and not os.path.isdir(final_head_dir(workdir, stage)) and stage_finished(workdir, stage):
    raise FileNotFoundError(f"{who}stage {stage!r} in {workdir} has no scalar head ({final_head_dir(workdir, stage)}"
                            f" is missing): it must be a stage with a head, such as a reward model")
  if not stage_finished(workdir, stage):
    ckdir = os.path.join(workdir, stage, "checkpoints")
    hint = (f"stage {stage!r} has checkpoints in {ckdir} but did not finish; rerun it first"
            if os.path.isdir(ckdir) and os.listdir(ckdir) else f"run stage {stage!r} first")
    raise FileNotFoundError(f"{who}no final checkpoint of stage {stage!r} in {workdir} "
                            f"(expected {final_marker(workdir, stage)}); {hint}")


def load_final_params(workdir: str, stage: str, abstract_params, needed_by: str = "", with_head: bool = False):
  """The final parameters of `stage` in `workdir`, restored onto the shardings of `abstract_params`.

  Head entries (model.HEAD_PARAMS) of `abstract_params` are restored from the stage's scalar head when
  `with_head`, and otherwise left out."""
  who = f"{needed_by}: " if needed_by else ""
  lm_abstract, head_abstract = split_head(abstract_params)
  _check_finished(workdir, stage, who, with_head)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = dict(ckptr.restore(os.path.abspath(final_params_dir(workdir, stage)), lm_abstract))
      if with_head:
        params.update(ckptr.restore(os.path.abspath(final_head_dir(workdir, stage)), head_abstract))
      return params
  except Exception as e:
    raise ckpt_lib.CheckpointError(f"{who}cannot restore the final parameters of stage {stage!r} from "
                                   f"{final_params_dir(workdir, stage)}: {type(e).__name__}: {e}") from e
