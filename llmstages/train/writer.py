"""The training loop's metric sinks: JSON lines and TensorBoard event files (process 0 only), and console progress
(a tqdm bar on a terminal, log lines otherwise)."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from tqdm.auto import tqdm


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to `<dir>/metrics.jsonl` and the same scalars to TensorBoard."""

  def __init__(self, directory: str, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(directory, "metrics.jsonl")
    self._tb = None
    if not self.active:
      return
    os.makedirs(directory, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # Event files without TensorFlow.
    self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    """Drops lines logged after the checkpoint we resume from: those steps are about to be redone."""
    with open(self.path) as f:
      lines = f.readlines()
    kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


_CONSOLE_KEYS = ("loss", "accuracy", "grad_norm", "lr", "tokens_per_sec", "reward", "margin", "kl")


class Progress:
  """A tqdm bar with ETA on a terminal; plain log lines otherwise (`mode`: auto | bar | log)."""

  def __init__(self, name: str, start: int, total: int, mode: str = "auto"):
    self.name, self.total = name, total
    self.enabled = jax.process_index() == 0
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self._bar = None
    self._t0, self._s0 = time.time(), start
    if self.enabled and use_bar:
      self._bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)

  def update(self, step: int, scalars: dict[str, float] | None = None) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if scalars:
        self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()
                               if k in ("train/loss", "eval/loss", "train/lr")})
    elif scalars:
      scalars = {k: v for k, v in scalars.items() if k.split("/")[-1] in _CONSOLE_KEYS}
      rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
      eta = (self.total - step) / rate if rate > 0 else float("nan")
      text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
      print(f"[{self.name}] step {step}/{self.total} eta {eta:.0f}s {text}", flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
