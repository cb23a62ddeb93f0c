"""The few-shot baseline: eval.shots=K scores the same prompts after K solved training examples, and
`compare --baseline` puts each stage's 0-shot and K-shot scores side by side."""

import dataclasses
import json
import types

import ml_collections
import pytest

from llmstages import compare
from llmstages.evals import EvalConfig, answers


def _qa_file(path, n):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n")
  return f"file:{path}"


def test_shots_are_k_solved_training_examples_that_no_scored_prompt_is(tmp_path, monkeypatch):
  spec = _qa_file(tmp_path / "qa.jsonl", 10)
  seen = []
  monkeypatch.setattr(answers, "score_prompts",
                      lambda ctx, prompts, correct, prefix, **kw: seen.append(list(kw.get("questions") or prompts))
                      or {f"{prefix}greedy": 0})
  settings = EvalConfig.from_config(ml_collections.ConfigDict(dict(shots=3, num_prompts=5)))
  ctx = types.SimpleNamespace(settings=settings, data_dir=str(tmp_path))
  out = answers.score_with_shots(ctx, spec, ["Q0?", "Q1?"], None, "qa_test/")
  assert out == {"qa_test/greedy": 0, "qa_test/3shot/greedy": 0}
  zero, few = seen
  assert zero == ["Q0?", "Q1?"]
  assert few == ["Q7? A7.\nQ8? A8.\nQ9? A9.\nQ0?", "Q7? A7.\nQ8? A8.\nQ9? A9.\nQ1?"]
  ctx.settings = dataclasses.replace(settings, shots=6)  # 6 shots + 5 scored prompts > 10 records: they would overlap.
  with pytest.raises(ValueError, match=r"config.eval.shots=6: .* has 10 training records, fewer than shots \+ "
                     r"num_prompts = 11"):
    answers.score_with_shots(ctx, spec, ["Q0?"], None, "qa_test/")


def test_baseline_table_puts_zero_shot_k_shot_and_after_side_by_side(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"stages": ["sft", "instruct"], "eval": {"shots": 4}}))
  scores = {"sft": {"qa_test/greedy": 0.1, "qa_test/4shot/greedy": 0.3, "greedy": 0.2, "4shot/greedy": 0.25,
                    "qa_test/maj@4": 0.5},
            "instruct": {"qa_test/greedy": 0.5, "qa_test/4shot/greedy": 0.6, "greedy": 0.2, "4shot/greedy": 0.2}}
  for stage, metrics in scores.items():
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "eval.json").write_text(json.dumps({"metrics": {k: {"value": v, "n": 8}
                                                                        for k, v in metrics.items()}}))
  lines = compare.baseline_table(str(tmp_path)).splitlines()
  assert lines[0] == ("| metric | sft 0-shot | sft 4-shot | instruct 0-shot | instruct 4-shot | "
                      "instruct 0-shot - best earlier 4-shot |")
  rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
  assert set(rows) == {"greedy", "qa_test/greedy"}  # maj@4 has no 4-shot twin.
  assert rows["qa_test/greedy"].endswith("| +0.200 |") and rows["greedy"].endswith("| -0.050 |")
  (tmp_path / "config.json").write_text(json.dumps({"stages": ["sft", "instruct"], "eval": {"shots": 0}}))
  with pytest.raises(ValueError, match="no K-shot scores"):
    compare.baseline_table(str(tmp_path))
