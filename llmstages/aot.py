r"""Compile the train step and the decode loop for a TPU topology on this machine (libtpu): memory, FLOPs and a
roofline per chip, before a TPU is booked.

  python -m llmstages.aot --config=configs/llama.py:1b --topology=v5e-8 [--stage=pretrain|sft|dpo|grpo]
  python -m llmstages.aot --table   # the README's configs x topologies table (markdown)

What is compiled is what the loop runs: `train.build_context` on a mesh of the topology's devices, then
`StageContext.compile_train_step` (the jitted step, its in/out shardings and donation), and `Sampler.lower` (the
KV-cache decode loop). `--config.KEY=VALUE` overrides work as in `llmstages.main`. A topology is a TPU name
(`v5e-8`, `v5p-64`: see TOPOLOGIES) or libtpu's own (`v5e:4x4`). Needs libtpu: `pip install -e ".[tpu]"`.

Figures are per chip. FLOPs and HBM bytes come from XLA's cost analysis, which counts a scanned (`lax.scan`)
layer stack's body as if it ran at most once, so with `model.scan_layers` they are taken from two more compiles,
of the same model unrolled at 1 and 2 layers: per-layer cost = f(2) - f(1), total = f(1) + (L - 1) * that. The
step time is a roofline prediction (see `roofline.Roofline`): no communication, perfect overlap.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llmstages import cli
from llmstages import partitioning, roofline, train
from llmstages.sampler import Sampler

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/llama.py:1b).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-8", "TPU topology: a name in TOPOLOGIES or libtpu's (v5e:4x4).")
_STAGE = flags.DEFINE_string("stage", "", "Stage whose train step to compile ('' = the config's first).")
_DECODE = flags.DEFINE_bool("decode", True, "Also compile the decode loop (stage batch rows, seq_len/2 + seq_len/2).")
_TABLE = flags.DEFINE_bool("table", False, "Print the README's table of configs x topologies instead.")
_COSTS = flags.DEFINE_bool("costs", True, "Count FLOPs and bytes for the roofline (2 more compiles with scanned "
                            "layers); --nocosts reports memory only.")
_ROWS = flags.DEFINE_list("rows", [], "With --table: only these rows, as size@topology (e.g. 1b@v5e-8).")

# Cloud TPU names -> (libtpu topology, chips per host, chip config). Chips per host as on the single-host VMs
# (v5e-8 / v6e-8: 8 chips, one host) and 2x2x1 on multi-host slices, as MaxText's accelerator_to_spec_map.
TOPOLOGIES = {
    "v5e-1": ("v5e:1x1", (1, 1, 1), "default"),
    "v5e-4": ("v5e:2x2", (2, 2, 1), "default"),
    "v5e-8": ("v5e:2x4", (2, 4, 1), "default"),
    "v5e-16": ("v5e:4x4", (2, 2, 1), "default"),
    "v5e-32": ("v5e:4x8", (2, 2, 1), "default"),
    "v6e-1": ("v6e:1x1", (1, 1, 1), "default"),
    "v6e-8": ("v6e:2x4", (2, 4, 1), "default"),
    "v6e-16": ("v6e:4x4", (2, 2, 1), "default"),
    "v5p-8": ("v5p:2x2x1", (2, 2, 1), "megacore"),
    "v5p-64": ("v5p:2x4x4", (2, 2, 1), "megacore"),
    "v4-8": ("v4:2x2x1", (2, 2, 1), "megacore"),
    "v4-32": ("v4:2x2x4", (2, 2, 1), "megacore"),
}
INSTALL_HINT = 'libtpu is not installed: pip install -e ".[tpu]" (or pip install libtpu), then rerun.'


def topology_devices(name: str) -> list:
  """The devices of a TPU topology, compiled for from this machine (libtpu needed, no TPU)."""
  if importlib.util.find_spec("libtpu") is None:
    raise SystemExit(INSTALL_HINT)
  # libtpu takes a lock file per machine; other JAX processes here may hold it (they load libtpu to probe for a
  # TPU). Describing a topology touches no TPU, so sharing is safe.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax.experimental.topologies as topologies  # Imported here: it loads libtpu.
  libtpu_name, per_host, chip_config = TOPOLOGIES.get(name, (name, None, None))
  kwargs = {"chips_per_host_bounds": per_host, "chip_config_name": chip_config} if per_host else {}
  try:
    return list(topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu", **kwargs).devices)
  except Exception as e:
    raise ValueError(f"--topology={name!r}: libtpu cannot describe it ({type(e).__name__}: {str(e)[:200]}); "
                     f"use one of {sorted(TOPOLOGIES)} or a libtpu name such as v5e:4x4") from e


def host_data_layout(ctx) -> dict:
  """How the loop's process-local batches become the step's global batch on this topology's hosts.

  Each host's loader yields b = batch_size / hosts rows (rows [p * b, (p + 1) * b) of its stream, see
  `data.loader`); `partitioning.global_batch` hands them to `jax.make_array_from_process_local_data`, which fills
  the shards of that host's devices with them, in order. That needs each host's devices to hold exactly b rows of
  the step's batch sharding, each row on one host (`rows_match`). `order_kept` says whether host p's rows are global
  rows [p * b, (p + 1) * b); when not (a mesh laid out along the chips' torus), the global batch is the same rows
  permuted between positions: a sum over rows is unchanged, and pairs (DPO) and groups (GRPO) stay together
  because every array of a batch is assembled the same way."""
  rows = ctx.stage_config.batch_size
  hosts = sorted({d.process_index for d in ctx.mesh.devices.flat})
  if rows % len(hosts):
    raise ValueError(f"config.{ctx.name}.batch_size={rows} must divide by the topology's {len(hosts)} hosts")
  per_host = rows // len(hosts)
  index_map = partitioning.batch_sharding(ctx.mesh).devices_indices_map((rows, ctx.stage_config.seq_len))
  held, owner, order_kept = {}, {}, True
  for p in hosts:
    spans = sorted({(idx[0].start or 0, idx[0].stop or rows) for d, idx in index_map.items() if d.process_index == p})
    held[p] = spans
    for a, b in spans:
      for r in range(a, b):
        owner.setdefault(r, set()).add(p)
    order_kept &= spans[0][0] == p * per_host and spans[-1][1] == (p + 1) * per_host
  rows_match = (all(sum(b - a for a, b in spans) == per_host for spans in held.values())
                and sorted(owner) == list(range(rows)) and all(len(o) == 1 for o in owner.values()))
  return {"hosts": len(hosts), "rows_per_host": per_host, "rows_held": held, "rows_match": rows_match,
          "order_kept": order_kept and rows_match}


def _costs(compiled) -> tuple[float, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _with_layers(config, layers: int):
  c = copy.deepcopy(config)
  c.unlock()
  c.model.num_layers, c.model.scan_layers = layers, False
  return c


def step_costs(config, stage: str, mesh, compiled) -> tuple[float, float]:
  """(FLOPs, HBM bytes) per chip of one train step; see the module docstring for scanned layer stacks.

  XLA counts a scanned stack's body once, and the scanned program's traffic outside the loop (the optimizer over
  the stacked parameters) grows with the layer count, so neither comes apart from one scanned compile: both are
  taken from the same model unrolled at 1 and 2 layers (tests/test_aot.py checks this against 4 unrolled layers)."""
  if not config.model.scan_layers or config.model.num_layers == 1:
    return _costs(compiled)
  f1, b1 = _costs(train.build_context(_with_layers(config, 1), stage, mesh).compile_train_step())
  f2, b2 = _costs(train.build_context(_with_layers(config, 2), stage, mesh).compile_train_step())
  extra = config.model.num_layers - 1
  return f1 + extra * (f2 - f1), b1 + extra * (b2 - b1)


def plan(config, stage: str, devices, decode: bool = True, costs_if_no_fit: bool = True, costs: bool = True) -> dict:
  """Compiles `stage`'s train step (and the decode loop) for `devices`; returns the per-chip figures.

  `costs=False` skips the FLOP and byte counts (more compiles), `costs_if_no_fit=False` those of a step that does
  not fit; the roofline is then NaN."""
  mesh = partitioning.make_mesh(config.mesh, devices)
  ctx = train.build_context(config, stage, mesh)
  chip = roofline.CHIPS.get(devices[0].device_kind)
  if chip is None:
    raise ValueError(f"no published figures for {devices[0].device_kind!r}; known: {sorted(roofline.CHIPS)}")
  layout = host_data_layout(ctx)
  t0 = time.time()
  compiled = ctx.compile_train_step()
  compile_s = time.time() - t0
  m = compiled.memory_analysis()
  # Donated state: outputs alias arguments, so the live peak is arguments + temporaries + unaliased outputs.
  peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  fits = peak <= chip.hbm_bytes
  counted = costs and (fits or costs_if_no_fit)
  flops, hbm_bytes = step_costs(config, stage, mesh, compiled) if counted else (np.nan, np.nan)
  stage_config = ctx.stage_config
  tokens = stage_config.batch_size * stage_config.seq_len
  model_flops = roofline.train_flops_per_token(ctx.model_cfg, stage_config.seq_len) * tokens / len(devices)
  out = dict(stage=stage, chips=len(devices), chip=chip, mesh=dict(mesh.shape), layout=layout,
             params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ctx.abstract_state.params)),
             batch=stage_config.batch_size, seq_len=stage_config.seq_len, grad_accum=stage_config.grad_accum,
             remat=config.model.remat,
             argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
             alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes, peak_bytes=peak,
             fits=fits, flops=flops, hbm_traffic=hbm_bytes, model_flops=model_flops,
             roofline=roofline.roofline(chip, flops, hbm_bytes, model_flops, tokens), compile_s=compile_s,
             state_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ctx.abstract_state)))
  if decode:
    out["decode"] = plan_decode(ctx, chip)
  return out


def plan_decode(ctx, chip) -> dict:
  """The decode loop for the stage's batch of prompts (half of seq_len prompt, half new tokens): memory per chip and
  a per-token lower bound, reading this chip's parameters and KV cache once per token (XLA's cost analysis does
  not count a while loop's trips)."""
  rows, half = ctx.stage_config.batch_size, ctx.stage_config.seq_len // 2
  sampler = Sampler(ctx.model_cfg, eos_id=1, pad_id=0, mesh=ctx.mesh, rules=ctx.rules)
  compiled = sampler.lower(ctx.abstract_lm_params(), rows, half, half).compile()
  m = compiled.memory_analysis()
  mc = ctx.model_cfg
  kv_bytes = 2 * mc.num_layers * rows * mc.num_kv_heads * 2 * half * mc.dim_per_head * mc.compute_dtype.itemsize
  token_s = (m.argument_size_in_bytes + kv_bytes / len(ctx.mesh.devices.flat)) / chip.hbm_bytes_per_s
  peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return dict(rows=rows, prompt=half, new_tokens=half, argument_bytes=m.argument_size_in_bytes,
              temp_bytes=m.temp_size_in_bytes, peak_bytes=peak, fits=peak <= chip.hbm_bytes, kv_bytes=kv_bytes,
              token_s=token_s, tokens_per_s=rows / token_s)


def _gib(b: float) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def report(p: dict, topology: str) -> str:
  chip, r = p["chip"], p["roofline"]
  lay = p["layout"]
  lines = [
      f"{topology}: {p['chips']} x {chip.name} chips on {lay['hosts']} host(s); mesh {p['mesh']}; stage {p['stage']}; "
      f"{p['params']:,} parameters; global batch {p['batch']} x {p['seq_len']} (grad_accum {p['grad_accum']}), "
      f"remat {p['remat']}; compiled in {p['compile_s']:.0f} s",
      f"per chip: arguments {_gib(p['argument_bytes'])} (state {_gib(p['state_bytes'] / p['chips'])} if evenly "
      f"sharded), outputs {_gib(p['output_bytes'])} ({_gib(p['alias_bytes'])} aliased to donated arguments), "
      f"temporaries {_gib(p['temp_bytes'])}; peak {_gib(p['peak_bytes'])} of {_gib(chip.hbm_bytes)} HBM: "
      f"{'fits' if p['fits'] else 'DOES NOT FIT'}",
      f"per chip per step: {p['flops'] / 1e9:,.1f} GFLOP compiled (model formula {p['model_flops'] / 1e9:,.1f}), "
      f"{p['hbm_traffic'] / 1e9:.1f} GB HBM traffic",
      f"PREDICTION (roofline, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s; "
      f"no communication): step >= {r.step_s * 1e3:.1f} ms ({r.bound}-bound; compute {r.compute_s * 1e3:.1f} ms, "
      f"memory {r.memory_s * 1e3:.1f} ms), MFU <= {100 * r.mfu:.1f}%, {r.tokens_per_s:,.0f} tokens/s",
      f"multi-host data path: {lay['hosts']} host(s) x {lay['rows_per_host']} rows each, assembled by "
      f"make_array_from_process_local_data: each host's devices hold exactly its rows: {lay['rows_match']}; global "
      f"row order kept: {lay['order_kept']}" + ("" if lay["rows_match"] else " -- MISMATCH: hosts share batch rows "
                                                "(a tensor or replica group spans hosts); per-host loaders of "
                                                "distinct rows cannot feed this mesh"),
  ]
  if "decode" in p:
    d = p["decode"]
    lines.append(f"decode ({d['rows']} prompts x {d['prompt']} tokens + {d['new_tokens']} new): arguments "
                 f"{_gib(d['argument_bytes'])}, temporaries {_gib(d['temp_bytes'])}, peak {_gib(d['peak_bytes'])}: "
                 f"{'fits' if d['fits'] else 'DOES NOT FIT'}; PREDICTION >= {d['token_s'] * 1e3:.2f} ms per token "
                 f"step, {d['tokens_per_s']:,.0f} tokens/s")
  return "\n".join(lines)


# (config size, topology) of the README's table. 8b fits no 8-chip slice: fsdp over 16 v5e chips (4 hosts) makes it
# fit, which compiles the multi-host data path too.
TABLE_ROWS = ("125m@v5e-1", "1b@v5e-8", "1b@v6e-8", "350m@v5e-8", "125m@v5e-8", "1b@v5e-1", "8b@v5e-8",
              "8b@v5e-16", "8b@v5p-64")


def llama_config(arg: str):
  """configs/llama.py:<arg>, imported by name from the `configs` package (the repository's, or the installed one)."""
  return importlib.import_module("configs.llama").get_config(arg)


def table_row(size: str, topology: str, costs: bool = True) -> str:
  devices = topology_devices(topology)
  arg = f"{size},chips={len(devices)}"
  try:
    p = plan(llama_config(arg), "pretrain", devices, decode=False, costs_if_no_fit=False, costs=costs)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler itself refuses a program that cannot fit HBM (CompileTimeHbmOom): report its words.
    return f"| {size} | {topology} | {len(devices)} | | **no** | {str(e).split(':', 3)[-1].split('. HLO')[0]} |"
  r = p["roofline"]
  shown = lambda x, fmt: "-" if np.isnan(x) else format(x, fmt)  # No costs counted (--nocosts, or no fit).
  return (f"| {size} | {topology} | {p['mesh']['fsdp']} | {p['batch']} x {p['seq_len']} | "
          f"{'yes' if p['fits'] else '**no**'} | {p['peak_bytes'] / 2**30:.1f} | {p['argument_bytes'] / 2**30:.1f} | "
          f"{p['temp_bytes'] / 2**30:.1f} | {shown(r.step_s * 1e3, ',.0f')} | {shown(100 * r.mfu, '.0f')}% | "
          f"{shown(r.tokens_per_s, ',.0f')} | {p['compile_s']:.0f} |")


def print_table(rows) -> None:
  print("| config | topology | fsdp | batch x seq | fits | peak GiB/chip | args GiB | temp GiB | "
        "predicted step ms | predicted MFU | predicted tokens/s | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    size, _, topology = row.partition("@")
    print(table_row(size, topology, costs=_COSTS.value), flush=True)


def main(argv):
  del argv
  if _TABLE.value:
    print_table(_ROWS.value or TABLE_ROWS)
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. --config=configs/llama.py:1b), or --table")
  config = _CONFIG.value
  devices = topology_devices(_TOPOLOGY.value)
  stage = _STAGE.value or config.stages[0]
  if stage not in config.stages:
    raise app.UsageError(f"--stage={stage!r} is not one of config.stages {tuple(config.stages)}")
  print(report(plan(config, stage, devices, decode=_DECODE.value), _TOPOLOGY.value), flush=True)


if __name__ == "__main__":
  cli.run(main)
