r"""The benchmark model: 4 layers, d_model 256, 4 heads, seq_len 256, batch 16, vocab 8192, float32.

  python -m llmstages.bench --config=configs/bench.py [--config.bench.rounds=5 ...]

Prints one JSON object per line: the measured matmul peak; our train step and the PyTorch (nanoGPT-style) train
step of the same model, timed alternately in one run, and their ratio; our KV-cache decoding against the PyTorch
reference's KV cache and transformers' `LlamaForCausalLM.generate`, alternately, and against full recompute. Then
the same pairs (no full recompute) for the quickstart's model (configs/quickstart.py: d_model 128, batch 16 x 128),
records marked "model": "quickstart". `--config.bench.also_quickstart=False` skips those.
"""

import ml_collections

from configs import pipeline
from llmstages import config as config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=768,
                      max_seq_len=512, dtype="float32"))
  c.stages = ("pretrain",)
  c.pretrain = config_lib.stage_config("pretrain", batch_size=16, seq_len=256, learning_rate=3e-4, warmup_steps=0)
  c.bench = ml_collections.ConfigDict()
  c.bench.rounds = 4  # Alternating rounds of JAX and PyTorch steps.
  c.bench.steps_per_round = 4
  c.bench.warmup = 2
  c.bench.peak_gflops = 0.0  # 0: measure a large matmul in the compute dtype.
  c.bench.torch = True  # Also time the PyTorch reference.
  c.bench.train = True
  c.bench.decode = True
  c.bench.decode_batch = 32
  c.bench.decode_prompt_len = 16
  c.bench.decode_new_tokens = 128
  c.bench.decode_repeats = 7  # Alternating rounds of ours, the PyTorch reference and transformers.
  c.bench.no_cache = True  # Also decode by full recompute (slow: ~1 s per token).
  c.bench.also_quickstart = True
  c.bench.quickstart = quickstart_shapes()
  if arg == "smoke":
    c.model.update(dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=64))
    c.pretrain.update(dict(batch_size=4, seq_len=32))
    c.bench.update(dict(rounds=1, steps_per_round=2, warmup=1, decode_batch=4, decode_new_tokens=8,
                        decode_repeats=1, also_quickstart=False))
  elif arg:
    raise ValueError(f"configs/bench.py: unknown arg {arg!r}; known: smoke")
  return config_lib.finalize(c)


def quickstart_shapes() -> ml_collections.ConfigDict:
  """The quickstart's model and pretraining batch shape, read from configs/pipeline.py (so they cannot drift)."""
  quick = pipeline.build({"quick"})
  return ml_collections.ConfigDict({"model": dict(quick.model), "batch_size": quick.pretrain.batch_size,
                                    "seq_len": quick.pretrain.seq_len})
