"""The evaluators (see RESEARCH.md for every definition). Settings come from `config.eval`.

- `perplexity`: held-out loss and perplexity of the stage's eval mixture.
- `bios_facts`: exact match per attribute on trained people's own biographies cut before the value
  (memorization), on QA prompts of QA-train and QA-test people (extraction) and of never-seen people (answer rate =
  hallucination rate, since no answer about them can be right); greedy, maj@k and pass@k.
- `world_facts`: geographic QA with the training and the held-out question templates.
- `arith`: arithmetic answers checked by `arith.verify` (scratchpad or answer-only, per `eval.arith`).
- `stage`: the stage's own held-out metrics (its loss on `eval_steps` validation batches): preference accuracy and
  margin of a reward model or DPO policy, mean reward of RL rollouts, next-token loss otherwise.
- `capacity`: knowledge capacity R and R_max in bits per parameter (Physics of LMs 3.3), deterministic losses.
- `diversity`: creative diversity of story continuations: per-input (k samples of one prompt) and across-input
  (one sample per prompt) distinct-n, EAD, self-BLEU, Ent-n, sampled-token entropy, novelty against the training
  stories, validity and effective diversity.

Greedy means temperature 0 (argmax); maj@k and pass@k draw `eval.samples` samples at `eval.temperature`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from llmstages.evals import metrics as M
from llmstages.evals.core import EvalContext, Metric, register


def _with_name(spec: str, name: str) -> str:
  """`bios(n=10)` -> `bios_qa(n=10)`: the same corpus arguments under another source name."""
  return name + spec[spec.index("("):] if "(" in spec else name


def _records(ctx: EvalContext, spec: str, split: str, limit: int) -> list[dict]:
  from llmstages import data
  src = data.open_source(spec, split, ctx.data_dir)
  return [src.record(i) for i in range(min(limit, len(src)))]


def answer_text(text: str) -> str:
  """The answer in a completion: the text before the first period or newline (values contain neither)."""
  for stop in (".", "\n"):
    text = text.split(stop, 1)[0]
  return text.strip()


def _score_prompts(ctx: EvalContext, prompts: Sequence[str], correct: Callable[[int, str], bool], prefix: str,
                   max_new_tokens: int | None = None, extract: Callable[[str], str] = answer_text) -> dict:
  """Greedy exact match, maj@k and pass@k over `prompts`; `correct(i, answer)` judges prompt i's answer."""
  ecfg = ctx.ecfg
  new = max_new_tokens or ecfg.max_new_tokens
  sampler = ctx.sampler()
  ids = [ctx.encode_prompt(p) for p in prompts]
  greedy = sampler.generate(ctx.params, ids, max_new_tokens=new, temperature=0.0)
  greedy_ok = [float(correct(i, extract(ctx.decode(seq)))) for i, seq in enumerate(greedy.sequences())]
  out = {f"{prefix}greedy": Metric.mean_of(greedy_ok)}
  k = ecfg.samples
  if k > 1:
    many = sampler.generate(ctx.params, ids, max_new_tokens=new, temperature=ecfg.temperature, num_samples=k,
                            seed=ctx.config.seed)
    answers = [extract(ctx.decode(seq)) for seq in many.sequences()]
    maj, passes = [], {kk: [] for kk in ecfg.pass_k if kk <= k}
    for i in range(len(prompts)):
      mine = answers[i * k:(i + 1) * k]
      vote, _ = M.majority_vote(mine)
      maj.append(float(correct(i, vote)))
      c = sum(correct(i, a) for a in mine)
      for kk in passes:
        passes[kk].append(M.pass_at_k(k, c, kk))
    out[f"{prefix}maj@{k}"] = Metric.mean_of(maj)
    for kk, vals in passes.items():
      out[f"{prefix}pass@{kk}"] = Metric.mean_of(vals)
  return out


@register("perplexity")
def perplexity(ctx: EvalContext) -> dict:
  """Next-token loss of the language model on `eval.perplexity_data` (validation split), or on the stage's own
  held-out mixture when that is empty (next-token stages only)."""
  import jax
  from llmstages import data, partitioning, stages, train
  tctx = ctx.train_ctx
  spec = ctx.ecfg.perplexity_data
  if not spec and not isinstance(tctx.stage, stages.NextTokenStage):
    raise ValueError(f"stage {ctx.stage!r} is not a next-token stage: set config.eval.perplexity_data to score "
                     f"its perplexity")
  it = train.make_batches(tctx, ctx.tokenizer, split="validation", mixture=data.parse_mixture(spec) if spec else None)
  lm_stage = stages.NextTokenStage()
  fn = jax.jit(lambda params, batch: dict(zip(("loss_sum", "count", "m"),
                                              lm_stage.loss(tctx.lm_model, params, batch, None, None, False))))
  sums = []
  with tctx.activate():
    for _ in range(ctx.ecfg.perplexity_batches):
      local = next(it, None)
      if local is None:
        break
      out = jax.device_get(fn(ctx.params, partitioning.global_batch(local, tctx.mesh)))
      sums.append({"loss_sum": out["loss_sum"], "count": out["count"], **out["m"]})
  if not sums:
    raise ValueError(f"stage {ctx.stage!r}: the perplexity data gave no validation batches")
  scalars = train.summarize(sums, "eval")
  n = int(scalars["eval/tokens"])
  return {"loss": Metric(scalars["eval/nll"], n), "perplexity": Metric(scalars["eval/perplexity"], n),
          "accuracy": Metric(scalars["eval/accuracy"], n)}


@register("stage")
def stage_metrics(ctx: EvalContext) -> dict:
  from llmstages import train
  tctx = ctx.train_ctx
  tctx.tokenizer = ctx.tokenizer
  tctx.load_frozen(ctx.workdir)
  with tctx.activate():
    scalars = train.evaluate(tctx, tctx.jit_eval_step(), ctx.stage_params, ctx.tokenizer)
  n = int(scalars.pop("eval/count", scalars.pop("eval/tokens", 0)))
  return {key.split("/", 1)[1]: Metric(value, n) for key, value in scalars.items()}


def _bios_info(ctx: EvalContext) -> dict:
  from llmstages import data
  if not ctx.ecfg.bios:
    raise ValueError(f"config.eval.bios is empty but stage {ctx.stage!r} lists a bios evaluator")
  return data.source_info(ctx.ecfg.bios, ctx.data_dir)


def _template_prompt(template: str, person: dict) -> str:
  """A bios template filled for `person` with the name as subject, cut just before the value."""
  from llmstages.data import bios
  return bios._fill(template, person, use_name=True).split("{v}", 1)[0].rstrip()


def _shot_prefix(ctx: EvalContext, spec: str) -> str:
  """`eval.shots` solved examples, one per line, from the end of `spec`'s train split: evaluators score the first
  `num_prompts` records of a split, so no shot is a scored prompt."""
  from llmstages import data
  k, n = ctx.ecfg.get("shots", 0), ctx.ecfg.num_prompts
  src = data.open_source(spec, "train", ctx.data_dir)
  if len(src) < k + n:
    raise ValueError(f"config.eval.shots={k}: {spec!r} has {len(src)} training records, fewer than shots + "
                     f"num_prompts = {k + n}, so shots would overlap the scored prompts")
  recs = [src.record(i) for i in range(len(src) - k, len(src))]
  return "".join(f"{r['prompt']}{r['completion']}\n" for r in recs)


def _score_with_shots(ctx: EvalContext, spec: str, prompts: Sequence[str], correct, prefix: str, **kw) -> dict:
  """`_score_prompts` as asked (0-shot), and with `eval.shots = K > 0` the same prompts after K solved examples of
  `spec`, under `{prefix}{K}shot/`: the prompting baseline fine-tuning has to beat."""
  out = _score_prompts(ctx, prompts, correct, prefix, **kw)
  k = ctx.ecfg.get("shots", 0)
  if k > 0:
    shots = _shot_prefix(ctx, spec)
    out.update(_score_prompts(ctx, [shots + p for p in prompts], correct, f"{prefix}{k}shot/", **kw))
  return out


@register("bios_facts")
def bios_facts(ctx: EvalContext) -> dict:
  info = _bios_info(ctx)
  n = ctx.ecfg.num_prompts
  trained = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")][:n]
  out = {}
  attrs = [a for a in info["questions"]]
  # Memorization: each person's first training biography, cut just before the value (the exact text trained on,
  # in every format; a template the person's biography never used would test extraction instead).
  from llmstages.data import bios
  prefixes = [bios.bio_prefixes(p, info["format"], bios.bio_rng(info["seed"], p["id"], 0)) for p in trained]
  for attr in attrs:
    prompts = [pre[attr] for pre in prefixes]
    values = [p[attr] for p in trained]
    res = _score_prompts(ctx, prompts, lambda i, a, v=values: M.exact_match(a, v[i]), f"memorization/{attr}/")
    out.update(res)
  out["memorization/mean_greedy"] = Metric.mean_of(
      [out[f"memorization/{a}/greedy"].value for a in attrs])
  # Extraction: QA on QA-train people (seen in QA data if a stage trained on it) and QA-test people.
  for split, name in (("train", "qa_train"), ("validation", "qa_test")):
    qa = _with_name(ctx.ecfg.bios, "bios_qa")
    recs = _records(ctx, qa, split, n)
    prompts = [r["prompt"] for r in recs]
    answers = [r["completion"] for r in recs]
    out.update(_score_with_shots(ctx, qa, prompts, lambda i, a, v=answers: M.exact_match(a, v[i]), f"{name}/"))
  # Never-seen people: any answer is invented.
  recs = _records(ctx, _with_name(ctx.ecfg.bios, "bios_qa_unseen"), "train", n)
  greedy = ctx.sampler().generate(ctx.params, [ctx.encode_prompt(r["prompt"]) for r in recs],
                                  max_new_tokens=ctx.ecfg.max_new_tokens, temperature=0.0)
  answered = [float(bool(answer_text(ctx.decode(s)))) for s in greedy.sequences()]
  out["unseen/answer_rate"] = Metric.mean_of(answered)
  return out


@register("world_facts")
def world_facts(ctx: EvalContext) -> dict:
  if not ctx.ecfg.world:
    raise ValueError(f"config.eval.world is empty but stage {ctx.stage!r} lists world_facts")
  out = {}
  for split, name in (("train", "train_templates"), ("validation", "heldout_templates")):
    qa = _with_name(ctx.ecfg.world, "world_qa")
    recs = _records(ctx, qa, split, ctx.ecfg.num_prompts)
    answers = [r["completion"] for r in recs]
    out.update(_score_with_shots(ctx, qa, [r["prompt"] for r in recs], lambda i, a, v=answers: M.exact_match(a, v[i]),
                                 f"{name}/"))
  return out


@register("arith")
def arith(ctx: EvalContext) -> dict:
  from llmstages.data import arith as arith_lib
  if not ctx.ecfg.arith:
    raise ValueError(f"config.eval.arith is empty but stage {ctx.stage!r} lists arith")
  recs = _records(ctx, ctx.ecfg.arith, "validation", ctx.ecfg.num_prompts)
  prompts = [r["prompt"] for r in recs]
  scratchpad = "scratchpad" in ctx.ecfg.arith
  new = ctx.ecfg.max_new_tokens * (4 if scratchpad else 1)
  keep_all = lambda text: text.split("\n", 1)[0].strip()  # The verifier finds the final answer itself.
  return _score_with_shots(ctx, ctx.ecfg.arith, prompts, lambda i, a: arith_lib.verify(prompts[i], a), "",
                           max_new_tokens=new, extract=keep_all)


@register("capacity")
def capacity(ctx: EvalContext) -> dict:
  """R = [N(log2 N0 - p1/ln2) + N(log2 S0 - p2/ln2)] / P (RESEARCH.md), no dropout, no smoothing.

  p1: summed cross-entropy of a person's name tokens right after BOS. p2: summed cross-entropy of the value tokens
  of every bit-carrying attribute given the name and the attribute's prompt, averaged over the attribute's
  templates, plus the pronoun (given "<name> spent", from the template that states it). Every trained person
  counts. P counts every parameter, embedding rows only for tokens that occur in the biographies.
  """
  info = _bios_info(ctx)
  tok = ctx.tokenizer
  people = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")]
  bos = [tok.bos_id]
  names = [tok.encode(p["name"]) for p in people]
  p1 = -ctx.sequence_logprobs([bos] * len(people), names)
  p2 = np.zeros(len(people))
  for attr in info["bit_attributes"]:
    templates = info["templates"][attr]
    per_template = []
    for template in templates:
      prefixes = [bos + tok.encode(_template_prompt(template, p)) for p in people]
      values = [tok.encode(" " + p[attr]) for p in people]
      per_template.append(-ctx.sequence_logprobs(prefixes, values))
    p2 += np.mean(per_template, axis=0)
  pronoun_template = next(t for t in info["templates"]["birth_city"] if "{p}" in t)
  head = pronoun_template.split("{p}", 1)[0].rstrip()
  prefixes = [bos + tok.encode(head.replace("{S}", p["name"])) for p in people]
  pronouns = [tok.encode(" " + ("his" if p["pronoun"] == "he" else "her")) for p in people]
  p2 += -ctx.sequence_logprobs(prefixes, pronouns)

  used = _used_token_ids(ctx, info)
  mc = ctx.model_cfg
  total = sum(int(np.prod(x.shape)) for x in _leaves(ctx.params))
  tables = 1 if mc.tie_embeddings else 2
  p_used = total - tables * (mc.vocab_size - len(used)) * mc.d_model
  p_nonembed = total - tables * mc.vocab_size * mc.d_model
  cap = M.knowledge_capacity(float(np.mean(p1)), float(np.mean(p2)), len(people), info["N0"], info["S0"], p_used)
  cap_ne = M.knowledge_capacity(float(np.mean(p1)), float(np.mean(p2)), len(people), info["N0"], info["S0"],
                                p_nonembed)
  n = len(people)
  return {"R": Metric(cap["R"], n), "R_max": Metric(cap["R_max"], n), "bits": Metric(cap["bits"], n),
          "bits_max": Metric(cap["bits_max"], n), "R_nonembedding": Metric(cap_ne["R"], n),
          "p1_nats": Metric.mean_of(p1), "p2_nats": Metric.mean_of(p2), "params_counted": Metric(p_used, 1),
          "params_nonembedding": Metric(p_nonembed, 1)}


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _used_token_ids(ctx: EvalContext, info: dict) -> set[int]:
  from llmstages import data
  src = data.open_source(ctx.ecfg.bios, "train", ctx.data_dir)
  used = {ctx.tokenizer.bos_id, ctx.tokenizer.eos_id}
  for i in range(len(src)):
    for text, _ in src.document(i):
      used.update(ctx.tokenizer.encode(text))
  return used


@register("diversity")
def diversity(ctx: EvalContext) -> dict:
  from llmstages import data
  from llmstages.data import stories as stories_lib
  ecfg = ctx.ecfg
  if not ecfg.stories:
    raise ValueError(f"config.eval.stories is empty but stage {ctx.stage!r} lists diversity")
  recs = _records(ctx, _with_name(ecfg.stories, "stories_prompts"), "validation", ecfg.num_prompts)
  openers = [r["prompt"] for r in recs]
  k = max(ecfg.samples, 2)
  sampler = ctx.sampler()
  out_ids = sampler.generate(ctx.params, [ctx.encode_prompt(o) for o in openers],
                             max_new_tokens=ecfg.story_tokens, temperature=ecfg.temperature, num_samples=k,
                             seed=ctx.config.seed)
  texts = [ctx.decode(s).strip() for s in out_ids.sequences()]
  toks = [t.split() for t in texts]
  groups = [toks[i * k:(i + 1) * k] for i in range(len(openers))]
  across = [g[0] for g in groups]
  vocab = max(len({w for t in toks for w in t}), 1)
  out = {}
  for n in (1, 2, 3):
    out[f"per_input/distinct_{n}"] = Metric.mean_of([M.distinct_n(g, n) for g in groups])
    out[f"across_input/distinct_{n}"] = Metric(M.distinct_n(across, n), len(across))
  out["per_input/ead"] = Metric.mean_of([M.ead_avg(g, vocab) for g in groups])
  out["across_input/ead"] = Metric(M.ead_avg(across, vocab), len(across))
  out["per_input/self_bleu4"] = Metric.mean_of([M.self_bleu(g) for g in groups])
  out["across_input/self_bleu4"] = Metric(M.self_bleu(across), len(across))
  out["across_input/ent_2"] = Metric(M.ngram_entropy(across, 2), len(across))
  lengths = np.maximum(out_ids.lengths, 1)
  out["token_nll"] = Metric.mean_of(-out_ids.logprobs.sum(axis=1) / lengths)  # Entropy estimate at T=1.
  train_src = data.open_source(_with_name(ecfg.stories, "stories"), "train", ctx.data_dir)
  corpus = [" ".join(text for text, _ in train_src.document(i)) for i in range(min(len(train_src), 5000))]
  for n in (4, 8):
    ref = M.build_ngram_set(corpus, n)
    out[f"novelty_{n}"] = Metric.mean_of([M.novelty([t], ref, n) for t in toks if len(t) >= n])
  full = [f"{openers[i // k]} {texts[i]}" for i in range(len(texts))]
  info = data.source_info(ecfg.bios, ctx.data_dir) if ecfg.bios else None
  people = info["facts"] if info else None
  valid = [stories_lib.check_story(t, people) for t in full]
  out["validity"] = Metric.mean_of([float(v) for v in valid])
  valid_across = [valid[i * k] for i in range(len(openers))]
  out["effective_distinct_2"] = Metric(M.effective_diversity(across, valid_across, n=2), int(sum(valid_across)))
  return out
