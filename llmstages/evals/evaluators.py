"""The evaluators (see docs/RESEARCH.md for every definition). Settings come from `config.eval`.

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

import re
from typing import Callable, Sequence

import numpy as np

from llmstages import text as text_lib
from llmstages.evals import metrics as M
from llmstages.evals.core import EvalContext, Metric, register
from llmstages.text import answer_text


def _with_name(spec: str, name: str) -> str:
  """`bios(n=10)` -> `bios_qa(n=10)`: the same corpus arguments under another source name."""
  return name + spec[spec.index("("):] if "(" in spec else name


def _records(ctx: EvalContext, spec: str, split: str, limit: int) -> list[dict]:
  from llmstages import data
  src = data.open_source(spec, split, ctx.data_dir)
  return [src.record(i) for i in range(min(limit, len(src)))]


def arith_answer(text: str) -> str | None:
  """The final number `arith.verify` reads in a completion (after the last 'Answer:', else the last integer), as
  text; None when there is none. maj@k votes on this, never on the scratchpad that leads to it."""
  from llmstages.data import arith as arith_lib
  value = arith_lib.final_answer(text.split("\n", 1)[0])
  return None if value is None else str(value)


def extract_answer(prompt: str, completion: str) -> str | None:
  """The answer a completion of `prompt` gives: the final number for an arithmetic problem, else the fact answer
  (`text.answer_text`). What `generate --vote` votes on; the evaluators pick the extractor by task instead."""
  from llmstages.data import arith as arith_lib
  return arith_answer(completion) if arith_lib.parse_prompt(prompt) else answer_text(completion)


def _score_prompts(ctx: EvalContext, prompts: Sequence[str], correct: Callable[[int, str | None], bool],
                   prefix: str, max_new_tokens: int | None = None,
                   extract: Callable[[str], str | None] = answer_text, questions: Sequence[str] | None = None,
                   continuation: bool = False) -> dict:
  """Greedy exact match, maj@k and pass@k over `prompts`; `correct(i, answer)` judges prompt i's answer.

  `extract` takes a reply to the answer that is judged and voted on. `questions` (default: the prompts) are posed
  in the stage's prompt format (`EvalContext.encode_question`); with `continuation`, as raw text to continue.
  """
  ecfg = ctx.ecfg
  new = max_new_tokens or ecfg.max_new_tokens
  sampler = ctx.sampler()
  encode = ctx.encode_prompt if continuation else ctx.encode_question
  ids = [encode(q) for q in (questions or prompts)]
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
      vote, _ = text_lib.majority_vote(mine)
      maj.append(float(vote is not None and correct(i, vote)))
      c = sum(bool(correct(i, a)) for a in mine)
      for kk in passes:
        passes[kk].append(M.pass_at_k(k, c, kk))
    out[f"{prefix}maj@{k}"] = Metric.mean_of(maj)
    for kk, vals in passes.items():
      out[f"{prefix}pass@{kk}"] = Metric.mean_of(vals)
  return out


def _matches(references: Sequence[str]) -> Callable[[int, str | None], bool]:
  return lambda i, answer: answer is not None and text_lib.exact_match(answer, references[i])


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
  if k > 0:  # The examples go before the question, inside the chat turn when there is one.
    shots = _shot_prefix(ctx, spec)
    questions = [shots + q for q in (kw.pop("questions", None) or prompts)]
    out.update(_score_prompts(ctx, prompts, correct, f"{prefix}{k}shot/", questions=questions, **kw))
  return out


@register("bios_facts")
def bios_facts(ctx: EvalContext) -> dict:
  info = _bios_info(ctx)
  n = ctx.ecfg.num_prompts
  trained = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")][:n]
  out = {}
  attrs = [a for a in info["questions"]]
  # Memorization: each person's first training biography, cut just before the value (the exact text trained on,
  # in every format; a template the person's biography never used would test extraction instead). The answer is
  # the rest of that sentence: the value, and the template's words after it ("Biology during his studies").
  from llmstages.data import bios
  render = lambda p: (info["format"], bios.bio_rng(info["seed"], p["id"], 0))
  prefixes = [bios.bio_prefixes(p, *render(p)) for p in trained]
  texts = [bios.render_bio(p, *render(p)) for p in trained]
  for attr in attrs:
    prompts = [pre[attr] for pre in prefixes]
    rests = [answer_text(full[len(pre):]) for full, pre in zip(texts, prompts)]
    # A biography is continued as it was trained, in every prompt format.
    out.update(_score_prompts(ctx, prompts, _matches(rests), f"memorization/{attr}/", continuation=True))
  out["memorization/mean_greedy"] = Metric.mean_of(
      [out[f"memorization/{a}/greedy"].value for a in attrs])
  # Extraction: QA on QA-train people (seen in QA data if a stage trained on it) and QA-test people.
  for split, name in (("train", "qa_train"), ("validation", "qa_test")):
    qa = _with_name(ctx.ecfg.bios, "bios_qa")
    recs = _records(ctx, qa, split, n)
    prompts = [r["prompt"] for r in recs]
    answers = [r["completion"] for r in recs]
    out.update(_score_with_shots(ctx, qa, prompts, _matches(answers), f"{name}/"))
  # Never-seen people: any answer is invented.
  recs = _records(ctx, _with_name(ctx.ecfg.bios, "bios_qa_unseen"), "train", n)
  greedy = ctx.sampler().generate(ctx.params, [ctx.encode_question(r["prompt"]) for r in recs],
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
    out.update(_score_with_shots(ctx, qa, [r["prompt"] for r in recs], _matches(answers), f"{name}/"))
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
  # In the chat template a worked answer is asked for as instruction tuning asks for it.
  ask = "Show your work. " if scratchpad and ctx.prompt_format == "chat" else ""
  solutions = [arith_lib.solve(*arith_lib.parse_prompt(p)) for p in prompts]
  return _score_with_shots(ctx, ctx.ecfg.arith, prompts, lambda i, a: a is not None and int(a) == solutions[i], "",
                           max_new_tokens=new, extract=arith_answer, questions=[ask + p for p in prompts])


@register("capacity")
def capacity(ctx: EvalContext) -> dict:
  """R = [N(log2 N0 - p1/ln2) + N(log2 S0 - p2/ln2)] / P (Physics of LMs 3.3, Def. 4.3), no dropout or smoothing.

  Both losses are read in the contexts the model trained on: each trained person's biographies exactly as the
  corpus rendered them (`bios_contexts`), cut into the stage's `seq_len` chunks as training cut them, averaged
  over those renderings. p1: the summed cross-entropy of the
  name tokens right after BOS. p2: the summed cross-entropy of the value tokens of every bit-carrying attribute,
  plus the first token that reveals the pronoun. Every trained person counts. P counts every parameter, embedding
  rows only for tokens that occur in the biographies.
  """
  info = _bios_info(ctx)
  people = [p for p in info["facts"] if p["group"] in ("qa_train", "qa_test")]
  contexts = bios_contexts(ctx.tokenizer, info, people)
  logprobs = _chunked_logprobs(ctx, [c["ids"] for c in contexts], ctx.config[ctx.stage].seq_len)
  p1, p2 = np.zeros(len(people)), np.zeros(len(people))
  for c, lp in zip(contexts, logprobs):
    # lp[t - 1] is log p(ids[t] | ids[:t]); a rendering counts 1/variants of its person's losses.
    p1[c["person"]] -= lp[c["name"] - 1].sum() / c["variants"]
    p2[c["person"]] -= lp[c["values"] - 1].sum() / c["variants"]

  used = {ctx.tokenizer.bos_id, ctx.tokenizer.eos_id}.union(*(c["ids"] for c in contexts))
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
          "params_nonembedding": Metric(p_nonembed, 1), "renderings_per_person": Metric(contexts[0]["variants"], n)}


def _chunked_logprobs(ctx: EvalContext, sequences: Sequence[Sequence[int]], seq_len: int) -> list[np.ndarray]:
  """Per-token log-probs of each sequence as training saw it: a document longer than `seq_len` pairs is cut into
  chunks of `seq_len` pairs, each trained without the chunks before it (`data.pipeline`)."""
  chunks, owners = [], []
  for i, ids in enumerate(sequences):
    for start in range(0, len(ids) - 1, seq_len):
      chunks.append(ids[start:start + seq_len + 1])
      owners.append(i)
  per_chunk = ctx.token_logprobs(chunks)
  out = [[] for _ in sequences]
  for i, lp in zip(owners, per_chunk):
    out[i].append(lp)
  return [np.concatenate(parts) for parts in out]


_PRONOUN = re.compile(r"\b(He|She|His|Her|his|her)\b")


def bios_contexts(tokenizer, info: dict, people: Sequence[dict]) -> list[dict]:
  """Every training biography of `people`, re-rendered as the corpus wrote it, with the token positions to score.

  One dict per (person, rendering): 'ids' (BOS + the biography's tokens, as the data pipeline tokenizes it),
  'name' (positions of the tokens of the opening name), 'values' (positions of the tokens that overlap a
  bit-carrying attribute's value, and of the first pronoun, which carries the gender bit), 'person' (index into
  `people`) and 'variants' (renderings per person). Positions count BOS as 0.
  """
  from llmstages.data import bios
  variants = info["variants"]
  out = []
  for index, person in enumerate(people):
    for v in range(variants):
      text, spans = "", []
      for attr, sentence in bios.bio_sentences(person, info["format"], bios.bio_rng(info["seed"], person["id"], v)):
        text += " " if text else ""  # As `bios.render_bio` joins the sentences.
        begin = len(text) + sentence.index("{v}")
        text += sentence.replace("{v}", person[attr])
        if attr in info["bit_attributes"]:
          spans.append((begin, begin + len(person[attr])))
      pronoun = _PRONOUN.search(text, len(person["name"]))
      if pronoun:
        spans.append(pronoun.span())
      ids, token_spans = tokenizer.encode_with_spans(text)
      overlaps = lambda lo, hi: [t + 1 for t, (a, b) in enumerate(token_spans) if a < hi and b > lo]
      if not text.startswith(person["name"]):
        raise ValueError(f"bios rendering {v} of person {person['id']} does not open with the name: {text[:60]!r}")
      out.append({"ids": [tokenizer.bos_id] + ids, "person": index, "variants": variants,
                  "name": np.asarray(overlaps(0, len(person["name"])), np.int64),
                  "values": np.asarray(sorted({t for lo, hi in spans for t in overlaps(lo, hi)}), np.int64)})
  return out


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _continuation(reply: str, opener: str) -> str:
  """A story reply without the opener it starts from (a chat reply retells it; a raw continuation does not)."""
  reply = reply.strip()
  return reply[len(opener):].strip() if reply.startswith(opener) else reply


def _story_vocabulary(ctx: EvalContext) -> frozenset[str]:
  """The word types the story grammar of `eval.stories` can write: EAD's V, the same whatever the model samples."""
  from llmstages import data
  from llmstages.data import stories as stories_lib
  args = data.source_info(_with_name(ctx.ecfg.stories, "stories"), ctx.data_dir)["arguments"]
  defaults = stories_lib.StoriesConfig(name="vocabulary")
  pick = lambda key: args.get(key, getattr(defaults, key))
  return stories_lib.word_vocabulary(int(pick("bios_n")), int(pick("bios_seed")), float(pick("bios_fraction")))


def diversity_scores(groups: Sequence[Sequence[Sequence[str]]], vocab: int) -> dict:
  """Per-input (the k samples of one prompt) and across-input (each prompt's first sample) diversity of tokenized
  samples grouped by prompt; `vocab` is EAD's V. A prompt's per-input scores depend on its own samples alone."""
  across = [g[0] for g in groups]
  out = {}
  for n in (1, 2, 3):
    out[f"per_input/distinct_{n}"] = Metric.mean_of([M.distinct_n(g, n) for g in groups])
    out[f"across_input/distinct_{n}"] = Metric(M.distinct_n(across, n), len(across))
  out["per_input/ead"] = Metric.mean_of([M.ead_avg(g, vocab) for g in groups])
  out["across_input/ead"] = Metric(M.ead_avg(across, vocab), len(across))
  out["per_input/self_bleu4"] = Metric.mean_of([M.self_bleu(g) for g in groups])
  out["across_input/self_bleu4"] = Metric(M.self_bleu(across), len(across))
  out["across_input/ent_2"] = Metric(M.ngram_entropy(across, 2), len(across))
  return out


@register("diversity")
def diversity(ctx: EvalContext) -> dict:
  from llmstages import data
  from llmstages.data import instructions, stories as stories_lib
  ecfg = ctx.ecfg
  if not ecfg.stories:
    raise ValueError(f"config.eval.stories is empty but stage {ctx.stage!r} lists diversity")
  recs = _records(ctx, _with_name(ecfg.stories, "stories_prompts"), "validation", ecfg.num_prompts)
  openers = [r["prompt"] for r in recs]
  k = max(ecfg.samples, 2)
  sampler = ctx.sampler()
  if ctx.prompt_format == "chat":  # The request instruction tuning taught; the reply retells the opener.
    ids = [ctx.encode_question(instructions.STORY_REQUESTS[0].format(opener=o)) for o in openers]
  else:
    ids = [ctx.encode_prompt(o) for o in openers]
  out_ids = sampler.generate(ctx.params, ids, max_new_tokens=ecfg.story_tokens, temperature=ecfg.temperature,
                             num_samples=k, seed=ctx.config.seed)
  texts = [_continuation(ctx.decode(s), openers[i // k]) for i, s in enumerate(out_ids.sequences())]
  toks = [t.split() for t in texts]
  groups = [toks[i * k:(i + 1) * k] for i in range(len(openers))]
  across = [g[0] for g in groups]
  vocab = ecfg.ead_vocab or len(_story_vocabulary(ctx))
  out = {"ead_vocab": Metric(float(vocab), 1), **diversity_scores(groups, vocab)}
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
