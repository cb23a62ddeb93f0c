r"""Benchmarks, one JSON object per line.

  python -m llmstages.bench --config=configs/bench.py [--config.KEY=VALUE ...]

- `peak_matmul`: the machine's attainable matmul rate in the compute dtype (a large square matmul), the
  denominator of MFU unless `bench.peak_gflops` is given.
- `train_step`: our jitted, sharded train step (the very function `train/loop.py` runs) on random tokens.
- `train_step_torch`: the same model in plain PyTorch written the way nanoGPT is (`llmstages.torch_ref`), timed in
  alternating rounds with ours so both see the same machine state; `train_speedup` is the ratio of medians.
- `decode`: the KV-cache sampler (`llmstages.sampler`, greedy) on `bench.decode_batch` prompts of
  `bench.decode_prompt_len` tokens, `bench.decode_new_tokens` new tokens each, in alternating rounds with
  `decode_torch` (the PyTorch reference's preallocated KV cache) and `decode_hf` (transformers'
  `LlamaForCausalLM.generate` with its KV cache, same size); `decode_*_speedup` are ratios of medians.
  `decode_no_cache`: our model decoding by recomputing the whole forward pass per token (jitted). Tokens/s count
  generated tokens over the whole call, prefill included.
- With `bench.also_quickstart`, the train and decode pairs again at the quickstart's model size ("model":
  "quickstart" in the records).
MFU counts 6 * N + 12 * layers * seq_len * d_model FLOPs per token (N: parameters of every matmul, the output
projection included, the embedding lookup not; attention counted as if not causal, as PaLM does).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from llmstages import cli, partitioning, train
from llmstages import sampler as sampler_lib
from llmstages.inputs import TokenBatch
from llmstages.model import Decoder, ModelConfig
from llmstages.roofline import train_flops_per_token

try:  # torch is optional: without it the bench runs with bench.torch=False.
  from llmstages import torch_ref
except ImportError:
  torch_ref = None

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py", "Benchmark config.", lock_config=True)


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def measure_peak_gflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()}


class JaxTrainer:
  """Our train step on a fixed random batch; `run(n)` returns per-step seconds."""

  def __init__(self, config):
    self.ctx = train.build_context(config, "pretrain")
    stage_config = self.ctx.stage_config
    self.tokens_per_step = stage_config.batch_size * stage_config.seq_len
    rows = random_batch(config.model.vocab_size, stage_config.batch_size, stage_config.seq_len)
    self.batch = TokenBatch.from_dict(partitioning.global_batch(rows, self.ctx.mesh))
    self.step_values = jax.device_put(self.ctx.step_values_at(0), partitioning.replicated(self.ctx.mesh))
    t = time.perf_counter()
    self.step = self.ctx.compile_train_step()  # The very executable the training loop runs.
    self.compile_s = time.perf_counter() - t
    self.state = self.ctx.init_state()

  def run(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.step_values)
      metrics["loss_sum"].block_until_ready()
      times.append(time.perf_counter() - t)
    self.last_loss = float(metrics["loss_sum"] / metrics["count"])
    return times


class TorchTrainer:
  def __init__(self, mc, stage_config):
    import torch  # Optional heavy dependency, only for the PyTorch baseline.
    self.torch = torch
    self.threads = torch_ref.machine_cores()
    torch.set_num_threads(self.threads)
    torch.manual_seed(0)
    self.model = torch_ref.TorchDecoder(mc).train()
    self.opt = torch_ref.make_optimizer(self.model, stage_config.learning_rate, stage_config.reg.weight_decay,
                                        (stage_config.b1, stage_config.b2))
    self.step = torch_ref.train_step_fn(self.model, self.opt, grad_clip=stage_config.grad_clip)
    batch = random_batch(mc.vocab_size, stage_config.batch_size, stage_config.seq_len)
    self.x = torch.from_numpy(batch["inputs"]).long()
    self.y = torch.from_numpy(batch["targets"]).long()
    self.tokens_per_step = stage_config.batch_size * stage_config.seq_len
    self.fused = bool(self.opt.defaults.get("fused"))

  def run(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t = time.perf_counter()
      loss = self.step(self.x, self.y)
      times.append(time.perf_counter() - t)
    self.last_loss = float(loss)
    return times


def bench_train(config, peak_gflops: float, label: str = "bench") -> None:
  b = config.bench
  mc_flops = train_flops_per_token(_model_cfg(config), config.pretrain.seq_len)
  ours = JaxTrainer(config)
  ours.run(b.warmup)
  theirs = TorchTrainer(_model_cfg(config), config.pretrain) if b.torch else None
  if theirs:
    theirs.run(b.warmup)
  t_ours, t_theirs = [], []
  for _ in range(b.rounds):
    t_ours += ours.run(b.steps_per_round)
    if theirs:
      t_theirs += theirs.run(b.steps_per_round)

  def record(name, times, tokens, extra):
    med = statistics.median(times)
    tps = tokens / med
    return {"name": name, "model": label, "tokens_per_sec": round(tps, 1), "step_ms": round(1e3 * med, 2),
            "step_ms_min": round(1e3 * min(times), 2), "steps": len(times),
            "mfu": round(tps * mc_flops / (peak_gflops * 1e9), 4), **extra}

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.ctx.abstract_state.params))
  r_ours = record("train_step", t_ours, ours.tokens_per_step,
                  {"framework": f"jax {jax.__version__}", "params": n_params, "compile_s": round(ours.compile_s, 2),
                   "loss": round(ours.last_loss, 4), "devices": len(jax.devices()),
                   "batch_size": config.pretrain.batch_size, "seq_len": config.pretrain.seq_len,
                   "dtype": config.model.dtype, "flops_per_token": mc_flops})
  emit(r_ours)
  if theirs:
    r_theirs = record("train_step_torch", t_theirs, theirs.tokens_per_step,
                      {"framework": f"torch {theirs.torch.__version__} eager", "threads": theirs.threads,
                       "fused_adamw": theirs.fused, "loss": round(theirs.last_loss, 4)})
    emit(r_theirs)
    emit({"name": "train_speedup", "model": label,
          "ratio": round(r_ours["tokens_per_sec"] / r_theirs["tokens_per_sec"], 3), "target": 1.0})


def _race(fns: dict, rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each function, called in turn round after round (after one warm-up call each), so that
  all of them see the same machine state."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def bench_decode(config, label: str = "bench") -> None:
  """Our KV-cache sampler against the PyTorch reference's KV cache and transformers' `generate`, alternating;
  then our decoding by full recompute (once: it is slow)."""
  b = config.bench
  mc = _model_cfg(config)
  batch, plen, new = b.decode_batch, b.decode_prompt_len, b.decode_new_tokens
  prompts = np.random.default_rng(0).integers(3, mc.vocab_size, (batch, plen)).astype(np.int32)
  ctx = train.build_context(config, "pretrain")
  params = ctx.init_state().params  # Random init, in the training shardings.
  s = sampler_lib.Sampler(mc, eos_id=-1, pad_id=0, mesh=ctx.mesh, rules=ctx.rules)  # No EOS: full length.
  fns = {"decode": lambda: s.generate(params, prompts.tolist(), max_new_tokens=new)}
  if b.torch:
    import torch  # Optional heavy dependency, only for the PyTorch baselines.
    torch.set_num_threads(torch_ref.machine_cores())
    torch.manual_seed(0)
    tmodel = torch_ref.TorchDecoder(mc).eval()
    hf_model = torch_ref.hf_llama(mc)
    tprompt = torch.from_numpy(prompts).long()
    fns["decode_torch"] = lambda: torch_ref.generate(tmodel, tprompt, new)
    fns["decode_hf"] = lambda: torch_ref.hf_generate(hf_model, tprompt, new)
  times = _race(fns, b.decode_repeats)
  generated = batch * new
  frameworks = {"decode": f"jax {jax.__version__}", "decode_torch": "torch eager, preallocated KV cache (torch_ref)",
                "decode_hf": "transformers LlamaForCausalLM.generate, its KV cache, sdpa"}
  med = {name: statistics.median(t) for name, t in times.items()}
  for name, t in times.items():
    emit({"name": name, "model": label, "tokens_per_sec": round(generated / med[name], 1),
          "ms_per_token": round(1e3 * med[name] / new, 3), "ms_per_token_min": round(1e3 * min(t) / new, 3),
          "calls": len(t), "batch": batch, "prompt_len": plen, "new_tokens": new, "framework": frameworks[name]})
  for peer in ("decode_torch", "decode_hf"):
    if peer in med:
      emit({"name": f"{peer}_speedup", "model": label, "ratio": round(med[peer] / med["decode"], 3), "target": 1.5})
  if b.no_cache:
    model = Decoder(mc)
    no_cache = lambda: np.asarray(sampler_lib.generate_without_cache(params, jnp.asarray(prompts), model=model,
                                                                     new_tokens=new))
    t_full = _race({"no_cache": no_cache}, 1)["no_cache"][0]
    emit({"name": "decode_no_cache", "model": label, "tokens_per_sec": round(generated / t_full, 1),
          "ms_per_token": round(1e3 * t_full / new, 3), "cache_speedup": round(t_full / med["decode"], 2),
          "target": 10.0})


def _model_cfg(config):
  return ModelConfig.from_config(config.model)


def main(argv):
  del argv
  config = _CONFIG.value
  peak = config.bench.peak_gflops or measure_peak_gflops(config.model.dtype)
  emit({"name": "peak_matmul", "gflops": round(peak, 1), "dtype": config.model.dtype,
        "measured": not config.bench.peak_gflops, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind)})
  runs = [("bench", config)]
  if config.bench.also_quickstart:
    runs.append(("quickstart", quickstart_config(config)))
  for label, cfg in runs:
    if cfg.bench.train:
      bench_train(cfg, peak, label)
    if cfg.bench.decode:
      bench_decode(cfg, label)


def quickstart_config(config):
  """`config` with configs/quickstart.py's model and pretraining batch shape in place of the bench's."""
  quick = config.bench.quickstart
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model.update(dict(quick.model))
    out.pretrain.update(dict(batch_size=quick.batch_size, seq_len=quick.seq_len))
    out.bench.no_cache = False  # Once, at the bench size, is enough.
  return out


if __name__ == "__main__":
  cli.run(main)
