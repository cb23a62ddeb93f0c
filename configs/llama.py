r"""Llama-shaped models at four sizes, with the mesh, remat and batch a TPU user would start from.

  python -m llmstages.aot --config=configs/llama.py:1b --topology=v5e-8          # plan: memory, FLOPs, roofline
  python -m llmstages.aot --table                                                 # the README's table
  python -m llmstages.main --config=configs/llama.py:125m --workdir=/tmp/llama  # train (on real hardware)

Sizes (arg before any comma) copy the shapes of public checkpoints; parameter counts are ours (tied embeddings
counted once):
- `125m`: SmolLM-135M (30 layers, d 576, 9 heads / 3 kv heads, mlp 1536, vocab 49152, tied), 134.5M parameters.
- `350m`: SmolLM-360M (32 layers, d 960, 15 / 5 heads, mlp 2560, vocab 49152, tied), 361.8M.
- `1b`: Llama-3.2-1B (16 layers, d 2048, 32 / 8 heads, mlp 8192, vocab 128256, tied), 1.24B.
- `8b`: Llama-3-8B (32 layers, d 4096, 32 / 8 heads, mlp 14336, vocab 128256, untied), 8.03B.
Only the shapes: Llama-3's RoPE frequency scaling is not modelled (it changes no shape or FLOP count).

The start: bfloat16 compute with float32 parameters and AdamW moments, scanned layers, full remat (recompute each
layer in the backward pass), sequences of 2048 tokens, an fsdp mesh over every chip (`mesh.fsdp=-1`), and a
global batch of `PER_CHIP_BATCH[size] * chips` sequences. `chips=N` (default 8, one v5e-8 or v6e-8 host) sets
the chip count the batch is sized for: pass the topology's (`configs/llama.py:8b,chips=16 --topology=v5e-16`);
`python -m llmstages.aot --table` does.
`accum=N` splits each step into N micro-batches (same global batch, less activation memory). Stages: `pretrain`,
then `sft`, `dpo` and `grpo` from it, so `--stage=` can plan each step kind. `data` is a placeholder mixture:
set `--config.<stage>.data=...` to your own for a real run.
"""

from llmstages import config as config_lib

# name: (d_model, num_layers, num_heads, num_kv_heads, mlp_dim, vocab_size, tie_embeddings, rope_theta)
SHAPES = {
    "125m": (576, 30, 9, 3, 1536, 49152, True, 10000.0),  # HuggingFaceTB/SmolLM-135M
    "350m": (960, 32, 15, 5, 2560, 49152, True, 10000.0),  # HuggingFaceTB/SmolLM-360M
    "1b": (2048, 16, 32, 8, 8192, 128256, True, 500000.0),  # meta-llama/Llama-3.2-1B
    "8b": (4096, 32, 32, 8, 14336, 128256, False, 500000.0),  # meta-llama/Meta-Llama-3-8B
}
# Sequences of 2048 tokens per chip per step, with full remat: fits 16 GiB v5e chips once fsdp spreads the f32
# state (1b needs >= 2 chips, 8b >= 16; see README's table).
PER_CHIP_BATCH = {"125m": 8, "350m": 4, "1b": 2, "8b": 1}
PEAK_LR = {"125m": 3e-3, "350m": 3e-3, "1b": 1e-3, "8b": 3e-4}
SEQ_LEN = 2048


def get_config(arg: str = "1b"):
  size, _, rest = arg.partition(",")
  if size not in SHAPES:
    raise ValueError(f"configs/llama.py: size {size!r} is not one of {sorted(SHAPES)} (e.g. configs/llama.py:1b)")
  _, values = config_lib.parse_args(rest, {"chips=N", "accum=N"}, "configs/llama.py")
  chips, accum = values.get("chips", 8), values.get("accum", 1)
  d, layers, heads, kv, mlp, vocab, tie, theta = SHAPES[size]
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                      mlp_dim=mlp, tie_embeddings=tie, rope_theta=theta, max_seq_len=SEQ_LEN, dtype="bfloat16",
                      scan_layers=True, remat="full"))
  batch = PER_CHIP_BATCH[size] * chips * accum
  lr = PEAK_LR[size]
  stage = config_lib.stage_config
  common = dict(batch_size=batch, seq_len=SEQ_LEN, grad_accum=accum, eval_every=1000, checkpoint_every=1000)
  c.stages = ("pretrain", "sft", "dpo", "grpo")
  c.pretrain = stage("pretrain", steps=100_000, learning_rate=lr, warmup_steps=2000, data="stories", **common)
  c.sft = stage("sft", steps=2000, learning_rate=lr / 10, warmup_steps=100, data="stories_sft",
                init_from="pretrain", **common)
  c.dpo = stage("dpo", steps=1000, learning_rate=lr / 100, warmup_steps=50, data="preferences",
                init_from="sft", **common)
  c.grpo = stage("grpo", steps=500, learning_rate=lr / 100, warmup_steps=20, data="preferences",
                 init_from="sft", **common)
  return config_lib.finalize(c)
