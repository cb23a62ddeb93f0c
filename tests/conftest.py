"""Test setup: 8 virtual CPU devices in every test process, so sharded and unsharded runs sit side by side."""

import os

# XLA:CPU's LLVM backend at -O1 (its default is -O2): the tests' tiny models spend more time compiling than running
# (measured side by side: test_post's accumulation tests 50 -> 36 s, test_post_direction 81 -> 68 s; -O0 slowed the
# training-heavy ones). Subprocesses keep it (`tests.helpers.one_device_env`); the shipped code is not affected.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import json  # noqa: E402

import pytest  # noqa: E402


def write_chat_file(path, n: int = 6):
  """OpenAI fine-tuning chat lines: a system prompt, a sum to do, and the answer as a sentence."""
  with open(path, "w") as f:
    for a in range(n):
      for b in range(n):
        f.write(json.dumps({"messages": [{"role": "system", "content": "You add numbers."},
                                         {"role": "user", "content": f"What is {a} + {b}?"},
                                         {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}) + "\n")
  return str(path)


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
  """A tiny model instruction-tuned on a chat JSONL file (`chat:PATH`): (config, workdir, chat file, stdout).
  test_chatdata checks what training printed and learned; test_serve serves it. Trained once per test session, by
  whichever pytest-xdist worker asks first."""
  import contextlib
  import io
  from llmstages import config as config_lib, pipeline
  from tests.helpers import made_once, one_device_mesh
  with made_once(tmp_path_factory, "chat_run") as (d, done):
    path = str(d / "train.jsonl") if done else write_chat_file(d / "train.jsonl")
    c = config_lib.base_config()
    c.data.dir = str(d / "data")
    c.model.update(dict(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=128))
    c.stages = ("instruct",)
    c.instruct = config_lib.stage_config("instruct", steps=60, batch_size=8, seq_len=64, warmup_steps=5,
                                         log_every=5, eval_every=0, checkpoint_every=1000, learning_rate=1e-2,
                                         data=f"chat:{path}")
    c.instruct.reg.weight_decay = 0.0
    c = config_lib.finalize(c)
    if not done:
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        pipeline.run(c, str(d / "run"), mesh=one_device_mesh())
      (d / "stdout.txt").write_text(out.getvalue())
  return c, str(d / "run"), path, (d / "stdout.txt").read_text()
