"""Chat, preference and prompt JSONL files: validation before training (file, line, problem), too-long examples,
the pre-training token report, and a stage that learns from a chat file."""

import json
import os
import subprocess
import sys

import pytest

from llmstages import data
from llmstages.data import jsonl
from tests.helpers import one_device_mesh, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(row if isinstance(row, str) else json.dumps(row))
      f.write("\n")
  return str(path)


@pytest.mark.parametrize("bad, problem", [
    ('{"messages": [', "malformed JSONL line, not JSON"),
    ({"text": "plain"}, "a text line where every line must be chat"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]: content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}]}, "'messages' has no assistant message"),
])
def test_a_bad_chat_line_names_file_line_and_problem(tmp_path, bad, problem):
  path = _write(tmp_path / "c.jsonl", [OK, OK, bad, OK])
  with pytest.raises(ValueError, match=rf"c.jsonl: 1 bad line\(s\) of 4; nothing was read:\n  .*c.jsonl:3: {problem}"):
    data.open_source(f"chat:{path}", "train", str(tmp_path))


def test_every_bad_line_is_listed_and_nothing_is_read(tmp_path):
  path = _write(tmp_path / "c.jsonl", [OK, {"messages": []}, OK, "nope", OK])
  with pytest.raises(ValueError) as e:
    jsonl.read_jsonl(path, "chat")
  assert "2 bad line(s) of 5" in str(e.value) and "c.jsonl:2:" in str(e.value) and "c.jsonl:4:" in str(e.value)


def test_chat_lines_render_with_the_chat_template_and_loss_on_assistant_only(tmp_path):
  path = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, *OK["messages"]]}])
  src = data.open_source(f"file:{path}", "train", str(tmp_path))  # Detected as chat.
  assert src.record(0)["text"] == "<|system|> Be brief.<|end|><|user|> hi<|end|><|assistant|> hello<|end|>"
  assert [(t, loss) for t, loss in src.document(0) if loss] == [(" hello<|end|>", True)]


def test_preference_lines_in_trl_format(tmp_path):
  rows = [{"prompt": "Pick:", "chosen": " a", "rejected": " b"},
          {"prompt": [{"role": "user", "content": "Pick"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]},
          {"chosen": [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "b"}]}]
  recs = data.open_source(f"file:{_write(tmp_path / 'p.jsonl', rows)}", "train", str(tmp_path))
  assert (recs.record(0)["prompt"], recs.record(0)["completion"], recs.record(0)["rejected"]) == ("Pick:", " a", " b")
  for i in (1, 2):  # Explicit and TRL's implicit prompt give the same chat-rendered pair.
    r = recs.record(i)
    assert r["format"] == "pref"
    assert (r["prompt"], r["completion"], r["rejected"]) == ("<|user|> Pick<|end|><|assistant|>", " a<|end|>",
                                                              " b<|end|>")
  bad = _write(tmp_path / "q.jsonl", [rows[0], {"prompt": "x", "chosen": " a"}])
  with pytest.raises(ValueError, match="q.jsonl:2: a preference line needs .* 'rejected' is missing"):
    data.open_source(f"file:{bad}", "train", str(tmp_path))


def test_prompt_lines_carry_answer_and_verifier_to_grpo(tmp_path):
  from llmstages.stages.rl import record_prompt
  from llmstages import rewards
  path = _write(tmp_path / "g.jsonl", [{"prompt": "What is 2 + 3?", "answer": 5, "verifier": "arith"},
                                       {"prompt": [{"role": "user", "content": "Capital of France?"}],
                                        "answer": "Paris"}])
  src = data.open_source(f"file:{path}", "train", str(tmp_path))
  p0, p1 = record_prompt(src.record(0), src), record_prompt(src.record(1), src)
  assert rewards.score(("arith", "facts"), " 5", p0, "t") == {"arith": 1.0, "facts": None}
  assert rewards.score(("arith", "facts"), " 4", p0, "t")["arith"] == 0.0
  assert p1.text.endswith("<|assistant|>") and rewards.score(("facts",), " Paris", p1, "t") == {"facts": 1.0}
  bad = _write(tmp_path / "h.jsonl", [{"prompt": "x", "answer": "y", "verifier": "judge"}])
  with pytest.raises(ValueError, match="h.jsonl:1: unknown verifier 'judge'"):
    data.open_source(f"file:{bad}", "train", str(tmp_path))


def test_validate_command(tmp_path):
  from tests.conftest import write_chat_file
  good = write_chat_file(tmp_path / "good.jsonl", n=3)
  bad = _write(tmp_path / "bad.jsonl", [OK, {"messages": [{"role": "user", "content": "q"}]}])
  run = lambda *a: subprocess.run([sys.executable, "-m", "llmstages.data.validate", *a], capture_output=True,
                                  text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  r = run(good, "--format=chat")
  assert r.returncode == 0, r.stderr
  assert "9 examples OK (9 chat)" in r.stdout and "messages per example: min 3, max 3" in r.stdout
  r = run(good, bad)
  assert r.returncode == 1 and "bad.jsonl:2: 'messages' has no assistant message" in r.stderr


def _chat_config(tmp_path, path, **stage):
  from llmstages import config as config_lib
  c = config_lib.base_config()
  c.data.dir = str(tmp_path / "data")
  c.model.update(dict(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64))
  c.stages = ("instruct",)
  c.instruct = config_lib.stage_config("instruct", steps=4, batch_size=4, warmup_steps=1, eval_every=0,
                                       data=f"chat:{path}", **stage)
  return config_lib.finalize(c)


def test_too_long_chat_examples_are_refused_before_training(tmp_path):
  from llmstages import pipeline
  from tests.conftest import write_chat_file
  path = write_chat_file(tmp_path / "c.jsonl", n=2)
  with pytest.raises(ValueError, match=r"config.instruct: 4 of 4 examples in chat:.*c.jsonl are longer than "
                     r"seq_len=8 tokens \(longest \d+; lines 1, 2, 3, 4\); raise config.instruct.seq_len"):
    pipeline.run(_chat_config(tmp_path, path, seq_len=8), str(tmp_path / "w"), mesh=one_device_mesh())
  assert not os.path.exists(tmp_path / "w" / "instruct" / "checkpoints")


def test_truncate_cuts_each_example_to_seq_len_where_chunk_splits_it(tmp_path):
  from llmstages import inputs, train
  from tests.conftest import write_chat_file
  path = write_chat_file(tmp_path / "c.jsonl", n=2)
  cfg = _chat_config(tmp_path, path, seq_len=8, too_long="truncate", pack=False)
  ctx = train.build_context(cfg, "instruct", mesh=one_device_mesh())
  tok = inputs.tokenizer_for(cfg)
  (line,) = inputs.report_local_data(ctx, tok)
  assert "4 examples" in line and "4 longer than seq_len=8 (truncated)" in line and "= 4.00 epochs" in line
  rows = next(iter(inputs.make_batches(ctx, tok)))["inputs"]
  assert (rows[:, 0] == tok.bos_id).all()  # Every row is the start of an example: nothing was chunked.
  ctx.stage_config.unlock()
  ctx.stage_config.too_long = "chunk"
  assert not (next(iter(inputs.make_batches(ctx, tok)))["inputs"][:, 0] == tok.bos_id).all()


def test_an_instruct_stage_learns_from_a_chat_file(chat_run):
  cfg, workdir, path, stdout = chat_run
  report = next(line for line in stdout.splitlines() if line.startswith("[instruct] data: "))
  assert f"chat:{path}: 36 examples" in report and "0 longer than seq_len=64 (none)" in report
  assert "epochs" in report and stdout.index(report) < stdout.index("compiled the train step")
  loss = read_metrics(workdir, "instruct", "train/loss")
  assert loss[max(loss)] < 0.5 * loss[min(loss)], loss
