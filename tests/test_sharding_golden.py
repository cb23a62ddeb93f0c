"""Golden sharding: the partition spec and shape of every parameter and optimizer-state leaf of the bench and
quickstart configs, against a committed JSON (MaxText's sharding_compare_test habit), so a change to the rules,
the parameter tree or the optimizer shows up as a reviewed diff.

Regenerate after an intended change: LLMSTAGES_UPDATE_GOLDEN=1 python -m pytest -q tests/test_sharding_golden.py
"""

import json
import os

import jax
import pytest

from llmstages import partitioning, train
from tests.helpers import load_config

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
CASES = {"bench": ("bench.py", "", "pretrain"), "quickstart_pretrain": ("quickstart.py", "", "pretrain"),
         "quickstart_reward": ("quickstart.py", "", "reward")}  # The reward stage adds the scalar head.


def _layout(config_file: str, arg: str, stage: str) -> dict:
  config = load_config(config_file, arg)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices=jax.devices()[:8])
  ctx = train.build_context(config, stage, mesh=mesh)
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(ctx.abstract_state):
    spec = leaf.sharding.spec
    out[jax.tree_util.keystr(path)] = f"{leaf.dtype}{list(leaf.shape)} {tuple(spec)}"  # One line a leaf.
  return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_sharding_matches_the_golden_file(case):
  layout = _layout(*CASES[case])
  path = os.path.join(GOLDEN, f"sharding_{case}.json")
  if os.environ.get("LLMSTAGES_UPDATE_GOLDEN"):
    with open(path, "w") as f:
      json.dump(layout, f, indent=0, sort_keys=True)
      f.write("\n")
  with open(path) as f:
    golden = json.load(f)
  assert sorted(layout) == sorted(golden), "leaves added or removed: " + str(sorted(set(layout) ^ set(golden)))
  changed = {k: (golden[k], layout[k]) for k in golden if golden[k] != layout[k]}
  assert not changed, f"{len(changed)} leaves changed (golden, now): {dict(list(changed.items())[:5])}"
