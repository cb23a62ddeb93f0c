"""Ahead-of-time compilation for TPU topologies (libtpu, no TPU): memory, FLOPs, the multi-host data layout."""

import copy
import importlib.util

import jax
import pytest

from llmstages import aot, partitioning, roofline, train
from tests.helpers import load_config


def smoke_config(wide: bool = True, **model):
  """The quickstart smoke config, its model widened to TPU tile-friendly sizes (multiples of 128 after sharding):
  at the smoke model's own widths (d_model 32) TPU layout padding of the tiny shards, not the state, fills the
  argument memory, and elementwise work rivals the matmuls."""
  c = copy.deepcopy(load_config("quickstart.py", "smoke"))
  c.unlock()
  if wide:
    model = dict(d_model=512, num_heads=4, num_kv_heads=2, mlp_dim=1024, vocab_size=1024, **model)
  c.model.update(model)
  c.pretrain.batch_size = 8
  return c


@pytest.fixture(scope="module")
def v5e_2x2():
  return aot.topology_devices("v5e:2x2")


def test_train_step_memory_and_flops_for_v5e_2x2(v5e_2x2):
  """The loop's own step compiled for 4 v5e chips: arguments are the fsdp shard of params + AdamW moments (plus the
  batch shard and a few replicated leaves), and XLA's FLOPs are the bench's model formula."""
  c = smoke_config()
  p = aot.plan(c, "pretrain", v5e_2x2, decode=True)
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and p["chip"].name == "v5e"
  ctx = train.build_context(c, "pretrain", partitioning.make_mesh(c.mesh, v5e_2x2))
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ctx.abstract_state.params))
  assert p["state_bytes"] >= 3 * params_bytes  # Params, mu and nu (f32), and the step counter.
  assert p["argument_bytes"] == pytest.approx(p["state_bytes"] / 4, rel=0.10)
  # Not replicated: a replicated state would be 4x the shard.
  assert p["argument_bytes"] < 0.3 * p["state_bytes"]
  tokens = c.pretrain.batch_size * c.pretrain.seq_len
  formula = roofline.train_flops_per_token(ctx.model_cfg, c.pretrain.seq_len) * tokens / 4
  assert p["flops"] == pytest.approx(formula, rel=0.15)
  assert p["fits"] and p["decode"]["fits"]
  r = p["roofline"]
  assert r.step_s == max(r.compute_s, r.memory_s) and 0 < r.mfu <= 1


def test_scanned_layers_cost_extrapolation_matches_unrolled(v5e_2x2):
  """XLA counts a scanned layer stack's body once; `step_costs` corrects that: scanned 4 layers = unrolled 4."""
  mesh = partitioning.make_mesh(smoke_config().mesh, v5e_2x2)
  costs, raw = {}, {}
  for scan in (False, True):
    c = smoke_config(wide=False, num_layers=4, scan_layers=scan)
    compiled = train.build_context(c, "pretrain", mesh).compile_train_step()
    raw[scan] = aot._costs(compiled)
    costs[scan] = aot.step_costs(c, "pretrain", mesh, compiled)
  assert raw[True][0] < 0.75 * raw[False][0]  # Uncorrected, the scanned step looks cheaper than it is.
  assert costs[True][0] == pytest.approx(costs[False][0], rel=0.02)
  assert costs[True][1] == pytest.approx(costs[False][1], rel=0.05)


def test_multi_host_data_layout_v5e_4x4():
  """v5e:4x4 is 16 chips on 4 hosts: each host's devices hold exactly the 8 rows its loader yields, each global row
  on one host, which `jax.make_array_from_process_local_data` needs to assemble the global batch."""
  c = smoke_config()
  c.pretrain.batch_size = 32
  devices = aot.topology_devices("v5e-16")
  ctx = train.build_context(c, "pretrain", partitioning.make_mesh(c.mesh, devices))
  layout = aot.host_data_layout(ctx)
  assert layout["hosts"] == 4 and layout["rows_per_host"] == 8
  assert layout["rows_match"], layout
  rows = sorted(r for spans in layout["rows_held"].values() for a, b in spans for r in range(a, b))
  assert rows == list(range(32))
  # Tensor parallelism across hosts: jax.make_mesh puts a tensor group of 4 chips on two hosts, so two hosts hold
  # the same rows and per-host loaders of distinct rows cannot feed the step. The layout check says so.
  c.mesh.fsdp, c.mesh.tensor = 4, 4
  crossed = aot.host_data_layout(train.build_context(c, "pretrain", partitioning.make_mesh(c.mesh, devices)))
  assert not crossed["rows_match"]


def test_without_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(SystemExit, match=r'pip install -e "\.\[tpu\]"'):
    aot.topology_devices("v5e-4")


def test_unknown_topology_is_named():
  with pytest.raises(ValueError, match="v9z-3"):
    aot.topology_devices("v9z-3")
