"""What every command-line entry point shares: `run(main)`, absl's app.run with library logs kept at WARNING.

Orbax, TFDS and absl log at INFO (orbax prints `Closing _NonBlockingMetadataStore(...)` around every checkpoint
read), which buries a command's own output. `run` sets absl's verbosity to WARNING unless the command line sets
`--verbosity` (`--verbosity=0` shows INFO again, `-v=1` debug lines); Python's root logger follows absl's level.
"""

from __future__ import annotations

import logging as py_logging
from typing import Callable

from absl import app, flags, logging


def quiet_library_logs() -> None:
  """Library logs at WARNING unless `--verbosity` was given on the command line."""
  if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger().setLevel(py_logging.WARNING)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, with `quiet_library_logs()` applied once the flags are parsed."""
  def quiet_main(argv):
    quiet_library_logs()
    return main(argv)
  app.run(quiet_main)
