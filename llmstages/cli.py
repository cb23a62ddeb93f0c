"""What every command-line entry point shares: `run(main)`, absl's app.run with library logs kept at WARNING and
the host allocator told to keep freed memory (`keep_host_memory`).

Orbax, TFDS and absl log at INFO (orbax prints `Closing _NonBlockingMetadataStore(...)` around every checkpoint
read), which buries a command's own output. `run` sets absl's verbosity to WARNING unless the command line sets
`--verbosity` (`--verbosity=0` shows INFO again, `-v=1` debug lines); Python's root logger follows absl's level.
"""

from __future__ import annotations

import ctypes
import logging as py_logging
import os
from typing import Callable

from absl import app, flags, logging


def quiet_library_logs() -> None:
  """Library logs at WARNING unless `--verbosity` was given on the command line."""
  if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger().setLevel(py_logging.WARNING)


def keep_host_memory() -> bool:
  """Tells glibc's malloc to keep freed memory in the process: one arena, no mmap, no trimming.

  XLA:CPU allocates every large buffer of a step afresh. By default glibc serves allocations above 32 MiB (and,
  on worker threads, above 64 MiB whatever the threshold) with mmap and returns them at free, so each step
  page-faults its activations, logits and gradients in again: on the bench train step, 197k minor faults and
  0.5 s of kernel time per 1.5 s step on the 2-core CPU; with this, 33k and 0.08 s. The cost is that the
  process keeps its peak host memory until it exits. Linux with glibc only; `LLMSTAGES_KEEP_HOST_MEMORY=0`
  turns it off. Returns whether it was applied.
  """
  if os.environ.get("LLMSTAGES_KEEP_HOST_MEMORY", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # Not glibc (macOS, musl): leave the allocator alone.
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
  return bool(libc.mallopt(m_arena_max, 1) and libc.mallopt(m_mmap_max, 0)
              and libc.mallopt(m_trim_threshold, 2**31 - 1))


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, with `keep_host_memory()` and `quiet_library_logs()` applied once the flags are parsed."""
  keep_host_memory()

  def quiet_main(argv):
    quiet_library_logs()
    return main(argv)
  app.run(quiet_main)
