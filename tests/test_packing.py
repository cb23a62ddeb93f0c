"""Packing end to end: a real packed batch from the data pipeline through the model; documents stay apart."""

import numpy as np

from llmstages import data
from llmstages.model import Decoder
from tests.helpers import init_params, tiny


def test_changing_one_packed_document_leaves_the_others_logits(tmp_path):
  text = "\n\n".join(f"Doc {i} is {i * 7 % 13}." for i in range(40))
  path = tmp_path / "docs.txt"
  path.write_text(text)
  tok = data.get_tokenizer([f"file:{path}"], 320, str(tmp_path / "d"))
  it = data.make_iterator(f"file:{path}", tokenizer=tok, batch_size=4, seq_len=64, seed=0, data_dir=str(tmp_path))
  batch = next(it)
  seg = batch["segment_ids"]
  row = int(np.argmax(seg.max(axis=1)))
  assert seg[row].max() >= 2, "expected a row holding several documents"
  cfg = tiny(vocab_size=320, max_seq_len=64)
  params = init_params(cfg)
  model = Decoder(cfg)
  run = lambda b: np.asarray(model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"]).logits)
  before = run(batch)
  changed = {k: v.copy() for k, v in batch.items()}
  second = changed["segment_ids"][row] == 2
  changed["inputs"][row, second] = (changed["inputs"][row, second] + 5) % 300 + 8
  after = run(changed)
  others = seg[row] != 2
  np.testing.assert_array_equal(before[row, others], after[row, others])
  assert not np.allclose(before[row, second], after[row, second])
  # Positions restart at 0 for every packed document.
  for s in range(1, seg[row].max() + 1):
    pos = batch["positions"][row][seg[row] == s]
    np.testing.assert_array_equal(pos, np.arange(len(pos)))
