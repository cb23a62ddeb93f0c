"""Every partitioning decision: the mesh, logical-axis rules, parameter and batch shardings, multi-host setup.

Layers only name logical axes (`embed`, `heads`, `activation_batch`, ...); the rule table in `config.mesh.rules`
maps them to the mesh axes `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                                 cpu_devices_per_process: int = 0) -> None:
  """Starts `jax.distributed` when launched on several hosts.

  On TPU pods and SLURM/Cloud clusters `jax.distributed.initialize()` finds its peers by itself; elsewhere pass the
  coordinator, process count and id (the same command on every host, with its own id). On CPU it also sets up gloo
  collectives so several processes on one machine can test the multi-host path.
  """
  if cpu_devices_per_process:
    jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address or num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator_address or None,
                               num_processes=num_processes or None,
                               process_id=process_id if process_id >= 0 else None)
  elif os.environ.get("LLMSTAGES_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """Mesh of shape (data, fsdp, tensor) from `config.mesh`; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh: {len(devices)} devices do not divide by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {len(devices)} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  out = []
  for rule in rules:
    name, axes = rule
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


@contextlib.contextmanager
def activate(mesh, rules):
  """The context in which model code runs: the mesh and the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_sharding(boxed_tree, mesh, rules):
  """Shardings for a tree of (possibly `nn.Partitioned`-boxed) abstract values; unboxed leaves are replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles each host's rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def check_batch_divisible(batch_size: int, mesh, where: str) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"{where}: batch size {batch_size} must divide by data*fsdp = {shards} mesh shards")
  if batch_size % jax.process_count():
    raise ValueError(f"{where}: batch size {batch_size} must divide by the {jax.process_count()} processes")
