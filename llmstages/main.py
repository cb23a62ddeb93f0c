r"""Runs a pipeline of stages from a config file.

  python -m llmstages.main --config=configs/quickstart.py[:smoke] --workdir=DIR [--config.KEY=VALUE ...]

On several hosts, run the same command on every host, adding
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(TPU pods and SLURM find their peers without these: pass --distributed=auto).
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

# Importing these initializes no JAX backend (nothing touches a device at import time), so `main` can still set
# up jax.distributed and the CPU device count before the first device query; keep it that way.
from llmstages import cli, partitioning, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with :ARG.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices_per_process", 0,
                                    "CPU only: devices per process (and gloo collectives), to test multi-process.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                                 "auto: jax.distributed.initialize() discovers the cluster (TPU pods, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value == "auto":
    os.environ["LLMSTAGES_DISTRIBUTED"] = "auto"
  partitioning.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                            _CPU_DEVICES.value)
  config = _CONFIG.value
  if jax.process_index() == 0:
    print("Resolved config:\n" + str(config), flush=True)
  pipeline.run(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print(f"Done. Results in {_WORKDIR.value}: config.json, and per stage <stage>/metrics.jsonl, "
          f"<stage>/tensorboard, <stage>/checkpoints, <stage>/final_params", flush=True)


if __name__ == "__main__":
  cli.run(main)
