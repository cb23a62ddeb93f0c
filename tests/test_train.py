"""The shared loop: determinism, accumulation, sharded == unsharded, resume == uninterrupted, signals, NaN, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llmstages import partitioning, pipeline, train
from llmstages import workdir as workdir_lib
from llmstages.inputs import TokenBatch
from tests.helpers import free_port, load_config, one_device_env, one_device_mesh, packed_batch, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def smoke(data_dir, **overrides):
  base = {"data.dir": data_dir, "stages": ("pretrain",), "pretrain.log_every": 1, "pretrain.eval_every": 0,
          "pretrain.batch_size": 8, "pretrain.steps": 10, "pretrain.evals": ()}
  return load_config("quickstart.py", "smoke", **{**base, **overrides})


def final_params(workdir, stage="pretrain"):
  cfg_path = os.path.join(workdir, "config.json")
  assert os.path.exists(cfg_path)
  import orbax.checkpoint as ocp
  path = os.path.abspath(workdir_lib.final_params_dir(workdir, stage))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.device_get(c.restore(path, target))


def test_reruns_are_deterministic_and_loss_falls(data_dir, tmp_path):
  cfg = smoke(data_dir, **{"pretrain.steps": 20, "pretrain.learning_rate": 1e-2})
  runs = []
  for i in range(2):
    pipeline.run(cfg, str(tmp_path / f"run{i}"), mesh=one_device_mesh())
    runs.append(read_metrics(str(tmp_path / f"run{i}"), "pretrain", "train/loss"))
  assert runs[0] == runs[1]
  losses = [runs[0][s] for s in sorted(runs[0])]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5  # It learns.


def test_grad_accumulation_equals_full_batch(data_dir):
  outs = []
  for accum in (1, 4):
    cfg = smoke(data_dir, **{"pretrain.grad_accum": accum})
    ctx = train.build_context(cfg, "pretrain", mesh=one_device_mesh())
    batch = packed_batch(batch=8, length=64, vocab=512, seed=3)
    batch["loss_mask"][0, :40] = 0  # Unequal token counts per micro-batch: a mean of means would differ.
    with ctx.activate():
      state, metrics = ctx.jit_train_step()(ctx.init_state(), TokenBatch.from_dict(batch), ctx.step_values_at(0))
    outs.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p4, m4) = outs
  assert m1["count"] == m4["count"]
  np.testing.assert_allclose(m1["loss_sum"], m4["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)


def test_params_are_sharded_on_the_mesh(data_dir):
  cfg = smoke(data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  ctx = train.build_context(cfg, "pretrain")
  assert dict(ctx.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  state = ctx.init_state()
  q = state.params["layers_0"]["attn"]["q"]["kernel"]  # [embed, heads, head_dim] -> (fsdp, tensor, None).
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])
  emb = state.params["embed"]["embedding"]  # [vocab, embed] -> (tensor, fsdp).
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)
  mu = state.opt_state[1].mu["layers_0"]["mlp"]["up"]["kernel"]  # Optimizer state follows its parameter.
  assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_sharded_equals_unsharded(data_dir, tmp_path):
  overrides = {"pretrain.steps": 20, "pretrain.reg.dropout": 0.0}
  one = smoke(data_dir, **overrides)
  pipeline.run(one, str(tmp_path / "one"), mesh=one_device_mesh())  # conftest gives 8 devices; use one.
  eight = smoke(data_dir, **overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  pipeline.run(eight, str(tmp_path / "eight"))
  a = read_metrics(str(tmp_path / "one"), "pretrain", "train/loss")
  b = read_metrics(str(tmp_path / "eight"), "pretrain", "train/loss")
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for s in a:
    assert abs(a[s] - b[s]) / abs(a[s]) < 1e-4, (s, a[s], b[s])


def _cli(workdir, *overrides, env_extra=None):
  env = one_device_env()  # One CPU device per process.
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "llmstages.main", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
         "--config.stages=('pretrain',)", *overrides]
  return cmd, env


def _run_cli(workdir, *overrides):
  cmd, env = _cli(workdir, *overrides)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _wait_for_checkpoint(proc, ckdir, timeout=120):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before its first checkpoint:\n{proc.stdout.read()}")
    time.sleep(0.02)
  raise AssertionError("no checkpoint appeared")


LONG = ("--config.pretrain.steps=120", "--config.pretrain.checkpoint_every=10", "--config.pretrain.eval_every=0",
        "--config.pretrain.reg.dropout=0.1", "--config.pretrain.reg.drop_path=0.1", "--config.pretrain.evals=()")


def test_resume_after_sigkill_is_bit_identical(data_dir, tmp_path):
  data = f"--config.data.dir={data_dir}"
  ref = _run_cli(tmp_path / "ref", data, *LONG)
  assert ref.returncode == 0, ref.stderr[-3000:]

  cmd, env = _cli(tmp_path / "killed", data, *LONG)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_checkpoint(proc, tmp_path / "killed" / "pretrain" / "checkpoints")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not workdir_lib.stage_finished(str(tmp_path / "killed"), "pretrain"), "killed too late to test resuming"

  resumed = _run_cli(tmp_path / "killed", data, *LONG)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint step" in resumed.stdout
  a, b = final_params(tmp_path / "ref"), final_params(tmp_path / "killed")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The metrics file holds each step once, with the uninterrupted run's values.
  assert read_metrics(tmp_path / "ref", "pretrain", "train/loss") == \
      read_metrics(tmp_path / "killed", "pretrain", "train/loss")


def test_sigterm_saves_a_checkpoint(data_dir, tmp_path):
  cmd, env = _cli(tmp_path / "w", f"--config.data.dir={data_dir}", *LONG)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckdir = tmp_path / "w" / "pretrain" / "checkpoints"
  _wait_for_checkpoint(proc, ckdir)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
  assert "saved checkpoint step" in out
  saved = int(out.split("saved checkpoint step ")[1].split()[0])
  assert saved % 10 != 0 or saved in {int(d) for d in os.listdir(ckdir) if d.isdigit()}
  assert saved in {int(d) for d in os.listdir(ckdir) if d.isdigit()}


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(data_dir, tmp_path):
  cfg = smoke(data_dir, **{"pretrain.learning_rate": 1e30, "pretrain.warmup_steps": 4, "pretrain.grad_clip": 0.0,
                           "pretrain.checkpoint_every": 1, "pretrain.steps": 10})
  with pytest.raises(train.TrainingError, match=r"loss is (nan|inf|-inf) at step \d+.*last good checkpoint is step"):
    pipeline.run(cfg, str(tmp_path))
  kept = os.listdir(tmp_path / "pretrain" / "checkpoints")
  assert "1" in kept
  assert not workdir_lib.stage_finished(str(tmp_path), "pretrain")


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path, capsys):
  cfg = smoke(data_dir, **{"pretrain.checkpoint_every": 4, "pretrain.steps": 8})
  pipeline.run(cfg, str(tmp_path))
  ref = final_params(tmp_path)
  os.remove(workdir_lib.final_marker(str(tmp_path), "pretrain"))  # Pretend the run stopped after step 8's save.
  state_dir = tmp_path / "pretrain" / "checkpoints" / "8" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\0garbage")
  pipeline.run(cfg, str(tmp_path))
  out = capsys.readouterr().out
  assert "checkpoint step 8" in out and "unreadable" in out and "resumed from checkpoint step 4" in out
  assert os.path.isdir(tmp_path / "pretrain" / "corrupt_checkpoints" / "8")  # Moved aside, not deleted.
  jax.tree.map(np.testing.assert_array_equal, ref, final_params(tmp_path))


def test_missing_init_from_checkpoint_is_named(data_dir, tmp_path):
  cfg = load_config("quickstart.py", "smoke", **{"data.dir": data_dir, "stages": ("cpt",), "cpt.batch_size": 8})
  with pytest.raises(ValueError, match=r"config.cpt.init_from='pretrain'.*neither runs before"):
    pipeline.run(cfg, str(tmp_path))
  os.makedirs(tmp_path / "pretrain" / "checkpoints" / "3")
  with pytest.raises(FileNotFoundError, match=r"config.cpt.init_from='pretrain': no final checkpoint.*did not finish"):
    train.run_stage(cfg, "cpt", str(tmp_path))


@pytest.mark.parametrize("flag,message", [
    ("--config.pretrain.stpes=5", "stpes"),
    ("--config.pretrain.steps=abc", "steps"),
    ("--config.pretrain.reg.dropout=x", "dropout"),
])
def test_bad_config_flags_are_named(tmp_path, flag, message):
  r = _run_cli(tmp_path, flag)
  assert r.returncode != 0
  assert message in r.stderr
  assert not os.path.exists(tmp_path / "config.json")  # Nothing written.


def test_bad_config_values_are_named(data_dir, tmp_path):
  for overrides, message in [({"pretrain.reg.dropout": 1.5}, "config.pretrain.reg.dropout"),
                             ({"pretrain.batch_size": 6, "pretrain.grad_accum": 4}, "grad_accum"),
                             ({"mesh.fsdp": 3}, "config.mesh"),
                             ({"pretrain.reg.schedule": "sometimes"}, "config.pretrain.reg.schedule")]:
    with pytest.raises(ValueError, match=message):
      pipeline.run(smoke(data_dir, **overrides), str(tmp_path))


def test_two_processes_equal_one_device(data_dir, tmp_path):
  """jax.distributed on 127.0.0.1: 2 processes x 2 CPU devices, mesh data=2 fsdp=2, vs one device.

  Both runs also evaluate (held-out loss, and facts by greedy decoding and sampling), so multi-host evaluation is
  exercised and compared."""
  steps = ("--config.pretrain.steps=12", "--config.pretrain.log_every=1", "--config.pretrain.batch_size=8",
           "--config.pretrain.eval_every=0", "--config.pretrain.checkpoint_every=6", f"--config.data.dir={data_dir}",
           "--config.pretrain.evals=('perplexity','bios_facts')")
  one = _run_cli(tmp_path / "one", *steps)
  assert one.returncode == 0, one.stderr[-3000:]
  port = free_port()
  procs = []
  for i in range(2):
    cmd, env = _cli(tmp_path / "two", *steps, "--config.mesh.data=2", "--config.mesh.fsdp=2",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                    "--cpu_devices_per_process=2")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  a = read_metrics(tmp_path / "one", "pretrain", "train/loss")
  b = read_metrics(tmp_path / "two", "pretrain", "train/loss")
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for s in a:
    assert abs(a[s] - b[s]) / abs(a[s]) < 1e-4, (s, a[s], b[s])
  with open(tmp_path / "one" / "pretrain" / "eval.json") as f1, open(tmp_path / "two" / "pretrain" / "eval.json") as f2:
    e1, e2 = json.load(f1)["metrics"], json.load(f2)["metrics"]
  assert e1.keys() == e2.keys()
  np.testing.assert_allclose(e1["perplexity/loss"]["value"], e2["perplexity/loss"]["value"], rtol=1e-4)
  pa, pb = final_params(tmp_path / "one"), final_params(tmp_path / "two")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), pa, pb)


def test_stage_keys_differ_for_every_name_incl_sft_a_and_sft_b():
  # The old hash (first 4 bytes of the name XOR its length) gave sft_a and sft_b one key, hence one dropout stream.
  from llmstages import config as config_lib
  from llmstages import seeds
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_seq_len=64))
  c.stages = ("sft_a", "sft_b")
  for name in c.stages:
    c[name] = config_lib.stage_config(name, kind="sft", steps=2, batch_size=8, seq_len=16)
  keys = {name: train.build_context(c, name, mesh=one_device_mesh()).seed_key for name in c.stages}
  masks = [np.asarray(jax.random.bernoulli(jax.random.fold_in(k, 0), 0.5, (256,))) for k in keys.values()]
  assert not np.array_equal(*masks)  # Step 0's dropout draws differ.
  names = ["pretrain", "cpt", "sft", "sft_a", "sft_b", "sft_c", "sft_1", "sft_2", "instruct", "reward", "dpo", "grpo",
           "ppo", "a", "b", "ab", "ba", "pretrain_long", "pretrain_lonG", ""]
  data = {n: tuple(np.asarray(jax.random.key_data(seeds.stage_key(0, n))).tolist()) for n in names}
  assert len(set(data.values())) == len(names)
  assert tuple(np.asarray(jax.random.key_data(seeds.stage_key(0, "sft_a"))).tolist()) == data["sft_a"]  # Stable.
  assert np.array_equal(jax.random.key_data(keys["sft_a"]), jax.random.key_data(seeds.stage_key(0, "sft_a")))
  assert data["sft"] != tuple(np.asarray(jax.random.key_data(seeds.stage_key(1, "sft"))).tolist())  # Run seed.
  host = {seeds.stage_seed(0, n, 1, step) for n in names for step in range(3)}  # The RL sampler's seeds.
  assert len(host) == 3 * len(names)
  assert seeds.name_words("sft_a") != seeds.name_words("sft_b") and len(seeds.name_words("x")) == 8
