"""SHIM (drop at merge): core's branch creates the real module; this re-exports today's train.py functions and
gives train the two names of core's contract that the evals branch calls (build_context's keyword arguments,
mean_metrics)."""

from llmstages import train as _train
from llmstages.train import data_dir, make_batches, report_local_data, stage_mixture, tokenizer_for  # noqa: F401

_build_context = _train.build_context


def _build_context_with_inputs(config, name, mesh=None, *, tokenizer=None, frozen=None):
  ctx = _build_context(config, name, mesh)
  if tokenizer is not None:
    ctx.tokenizer = tokenizer
  if frozen is not None:
    ctx.frozen = frozen
  return ctx


_train.build_context = _build_context_with_inputs
_train.mean_metrics = _train.summarize
