"""Checkpoints: an orbax CheckpointManager per stage, with the data-iterator position and metadata beside the state.

Saves are asynchronous; `close()` waits for them. A latest checkpoint that fails to restore is moved aside (never
deleted) to `<stage>/corrupt_checkpoints/`, with a warning, and the previous one is tried.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._async = async_save
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    return out.state, dict(out.meta)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that loads; corrupt ones are moved aside with a warning. None if none."""
    self.wait()
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # Orbax raises many types for unreadable files; all mean 'this one is unusable'.
        where = self._quarantine(step)
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"WARNING: checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: "
              f"{detail}); moved it to {where} and fell back to the previous checkpoint", flush=True)
    return None

  def _quarantine(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    dst = os.path.join(dst_dir, str(step))
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(dst_dir, exist_ok=True)
      n = 0
      while os.path.exists(dst):
        n += 1
        dst = os.path.join(dst_dir, f"{step}.{n}")
      shutil.move(src, dst)
    ocp_sync()
    self._manager.close()
    self._manager = self._make_manager()
    return dst

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def ocp_sync():
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("llmstages_checkpoint_quarantine")
