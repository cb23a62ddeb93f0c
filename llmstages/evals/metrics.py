"""Evaluation metrics, as pure Python and numpy functions of decoded text, answers and host arrays (no JAX).

Owns the formulas docs/RESEARCH.md names, each with its source in its docstring:
- factual: `pass_at_k`, `knowledge_capacity` (`normalize_answer`, `exact_match` and `majority_vote` live in
  `llmstages.text`, shared with the rewards, and are re-exported here);
- diversity: `distinct_n`, `ead`, `ead_avg`, `sentence_bleu`, `self_bleu`, `ngram_entropy`, `token_entropy`,
  `build_ngram_set`, `novelty`, `whole_output_novelty`, `validity_rate`, `effective_diversity`;
- reporting: `bootstrap_ci`, `paired_bootstrap_diff` (over prompts); `t_interval`, `t_quantile`, `paired_t_diff`
  (over seeds), which live in `llmstages.evals.intervals` and are re-exported here.

Texts. A diversity metric takes a list of texts; each is either a string, split on whitespace, or an already
tokenized sequence (strings or token ids), used as is. Compare settings only under the same tokenization. N-grams
never cross the boundary between two texts.

Empty output. A diversity metric over texts that hold no n-gram at all returns 0.0, not nan: a collapsed model that
emits nothing has no diversity, and a nan would silently drop it out of an average. Self-BLEU, a similarity, is the
exception: with fewer than two texts it is undefined and returns nan.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from llmstages.evals.intervals import (bootstrap_ci, paired_bootstrap_diff, paired_t_diff,  # noqa: F401  (re-exported)
                                      t_interval, t_quantile)
from llmstages.text import exact_match, majority_vote, normalize_answer  # noqa: F401  (re-exported)

Text = str | Sequence[Hashable]
NGram = tuple[Hashable, ...]


# ----------------------------------------------------------------------------------------------------------------
# Tokens and n-grams.


def _tokens(text: Text) -> list[Hashable]:
  return text.split() if isinstance(text, str) else list(text)


def _token_lists(texts: Sequence[Text]) -> list[list[Hashable]]:
  # A bare string is itself a sequence (of characters); taking it for a list of one-character texts would give
  # plausible-looking nonsense, so refuse it.
  if isinstance(texts, str):
    raise TypeError("expected a list of texts, got a single string; wrap it in a list: [text]")
  return [_tokens(t) for t in texts]


def _check_order(n: int) -> None:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n-gram order n must be a positive integer, got {n!r}")


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[NGram]:
  return list(zip(*(tokens[i:] for i in range(n))))


def _pooled_ngram_counts(texts: Sequence[Text], n: int) -> collections.Counter:
  """N-gram counts summed over texts, each text's n-grams taken within that text only."""
  _check_order(n)
  counts = collections.Counter()
  for tokens in _token_lists(texts):
    counts.update(_ngrams(tokens, n))
  return counts


# ----------------------------------------------------------------------------------------------------------------
# Factual metrics.

def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021, Codex paper, Fig. 3).

  pass@k = 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials.
  Average over problems for the benchmark score. Raises ValueError when n < k (the estimator needs k <= n).
  """
  if k < 1:
    raise ValueError(f"pass@k needs k >= 1, got k={k}")
  if n < k:
    raise ValueError(f"pass@k needs at least k samples: n={n} < k={k}")
  if not 0 <= c <= n:
    raise ValueError(f"the number of correct samples must lie in [0, n={n}], got c={c}")
  if n - c < k:  # Every k-subset holds a correct sample.
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def knowledge_capacity(p1_nats: float, p2_nats: float, n_people: int, N0: float, S0: float,  # noqa: N803
                       num_params: int) -> dict[str, float]:
  """Stored knowledge in bits and bits per parameter (Allen-Zhu & Li, Physics of LMs 3.3, Def. 4.3).

  Inputs, as docs/RESEARCH.md defines them (losses un-smoothed, all noise off):
    p1_nats: mean over the N people of the summed cross-entropy (nats) of the name tokens right after BOS;
    p2_nats: mean over the N people of the summed cross-entropy (nats) of the value tokens of every bit-carrying
      attribute, given the name and the attribute prompt;
    N0: number of possible names (product of the name pools); S0: product of the attribute value counts;
    num_params: P (report it once with all parameters, once with non-embedding ones).

    name_bits = N (log2 N0 - p1 / ln 2)      attr_bits = N (log2 S0 - p2 / ln 2)
    R = (name_bits + attr_bits) / P          R_max = [N log2(N0 / N) + N log2 S0] / P

  Nothing is clamped. Checks a caller should make: R <= R_max, because for any normalized model scored on N
  distinct names, p1 >= ln N (Jensen/Gibbs: the mean of -ln q over N distinct names is at least -ln(sum q / N)
  >= ln N) and p2 >= 0, with equality exactly when the model is uniform over the N trained names and certain of
  every attribute; so R > R_max means a leak or an unnormalized loss. An untrained (uniform over V) model gives
  p1 = t_name ln V >= ln N0 and p2 = t_value ln V >= ln S0 whenever every name/value fits in its tokens, so R <= 0.
  The paper measures R ~ 2 at 1000 exposures; R above ~2.3 suggests leakage.
  """
  if n_people < 1:
    raise ValueError(f"n_people must be >= 1, got {n_people}")
  if N0 < n_people:
    raise ValueError(f"N0 (possible names, {N0}) must be at least n_people ({n_people})")
  if S0 < 1:
    raise ValueError(f"S0 (product of attribute value counts) must be >= 1, got {S0}")
  if num_params <= 0:
    raise ValueError(f"num_params must be positive, got {num_params}")
  for name, value in (("p1_nats", p1_nats), ("p2_nats", p2_nats)):
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"{name} is a cross-entropy and must be finite and >= 0, got {value}")
  n = n_people
  # math.log2 takes Python ints of any size, so S0 may be an exact product of value counts.
  name_bits = n * (math.log2(N0) - p1_nats / math.log(2))
  attr_bits = n * (math.log2(S0) - p2_nats / math.log(2))
  bits_max = n * (math.log2(N0) - math.log2(n)) + n * math.log2(S0)
  bits = name_bits + attr_bits
  return {"bits": bits, "bits_max": bits_max, "R": bits / num_params, "R_max": bits_max / num_params,
          "name_bits": name_bits, "attr_bits": attr_bits}


# ----------------------------------------------------------------------------------------------------------------
# Diversity metrics.


def distinct_n(texts: Sequence[Text], n: int) -> float:
  """distinct-n (Li et al. 2016): unique n-grams / total n-grams, both over the n-grams of all texts pooled.

  Denominator: the total count of n-gram occurrences summed over texts (sum of max(len - n + 1, 0)), not the
  number of texts or tokens. Per-input diversity: pass the k samples of one prompt; across-input: one sample per
  prompt. Returns 0.0 when there is no n-gram.
  """
  counts = _pooled_ngram_counts(texts, n)
  total = sum(counts.values())
  return len(counts) / total if total else 0.0


def _expected_unique(vocab_size: int, total: int) -> float:
  """V (1 - ((V-1)/V)^C): expected number of distinct items among C uniform draws from V."""
  if vocab_size == 1:
    return 1.0
  # -expm1(C log1p(-1/V)) keeps precision when V is large and ((V-1)/V)^C is within rounding of 1.
  return vocab_size * -math.expm1(total * math.log1p(-1.0 / vocab_size))


def ead(texts: Sequence[Text], n: int, vocab_size: int) -> float:
  """Expectation-Adjusted Distinct (Liu et al. 2022, "Rethinking and Refining the Distinct Metric").

  EAD-n = unique / (V (1 - ((V-1)/V)^C)), C = total n-grams (pooled as in `distinct_n`), V = `vocab_size`. The
  denominator is the number of distinct n-grams expected from C uniform draws over V, which removes distinct-n's
  bias toward short outputs. V is the same for every n, as in the authors' code and Kirk et al. 2024 (the
  tokenizer's vocabulary size). EAD can exceed 1 (texts more varied than uniform draws); as V -> inf it tends to
  distinct-n. Returns 0.0 when there is no n-gram.
  """
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
  counts = _pooled_ngram_counts(texts, n)
  total = sum(counts.values())
  return len(counts) / _expected_unique(vocab_size, total) if total else 0.0


def ead_avg(texts: Sequence[Text], vocab_size: int, max_n: int = 5) -> float:
  """Mean of EAD-n over n = 1..max_n (Kirk et al. 2024 report this with max_n = 5)."""
  _check_order(max_n)
  return float(np.mean([ead(texts, n, vocab_size) for n in range(1, max_n + 1)]))


def _bleu_from_stats(matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int,
                     epsilon: float) -> float:
  """BLEU from clipped matches and hypothesis n-gram totals per order, with NLTK's sentence_bleu edge cases."""
  if matches[0] == 0:  # No unigram in common: no higher order can match either; NLTK returns 0 here.
    return 0.0
  if hyp_len > ref_len:
    brevity = 1.0
  elif hyp_len == 0:
    brevity = 0.0
  else:
    brevity = math.exp(1.0 - ref_len / hyp_len)
  log_precisions = []
  for m, t in zip(matches, totals):
    denominator = max(1, t)  # An order longer than the hypothesis has no n-gram; NLTK counts it as one.
    log_precisions.append(math.log((m if m else epsilon) / denominator))
  return brevity * math.exp(math.fsum(log_precisions) / len(log_precisions))


def _closest_length(ref_lengths: Iterable[int], hyp_len: int) -> int:
  # The shorter reference wins a tie, as in NLTK and mteval.
  return min(ref_lengths, key=lambda r: (abs(r - hyp_len), r))


def sentence_bleu(hypothesis: Text, references: Sequence[Text], max_n: int = 4, epsilon: float = 0.1) -> float:
  """Smoothed sentence BLEU-max_n (Papineni et al. 2002) with uniform weights 1/max_n.

  BLEU = BP * exp(mean_n log p_n), p_n = clipped matches / hypothesis n-grams, a match clipped by the largest
  count of that n-gram in any one reference; BP = exp(1 - r/c) if c <= r else 1, c = hypothesis length, r = the
  reference length closest to c (the shorter on a tie). Smoothing: Chen & Cherry (2014) method 1, a zero match
  count becomes `epsilon` (NLTK `SmoothingFunction(epsilon=0.1).method1`). Matches NLTK's sentence_bleu with that
  smoothing, including its cases: 0 when no unigram matches, 0 for an empty hypothesis.
  """
  _check_order(max_n)
  hyp = _tokens(hypothesis)
  refs = _token_lists(references)
  if not refs:
    raise ValueError("sentence_bleu needs at least one reference")
  matches, totals = [], []
  for n in range(1, max_n + 1):
    hyp_counts = collections.Counter(_ngrams(hyp, n))
    ref_counts = [collections.Counter(_ngrams(r, n)) for r in refs]
    matches.append(sum(min(c, max(rc[g] for rc in ref_counts)) for g, c in hyp_counts.items()))
    totals.append(sum(hyp_counts.values()))
  ref_len = _closest_length((len(r) for r in refs), len(hyp))
  return _bleu_from_stats(matches, totals, len(hyp), ref_len, epsilon)


def self_bleu(texts: Sequence[Text], max_n: int = 4, epsilon: float = 0.1) -> float:
  """Self-BLEU (Zhu et al. 2018, Texygen): the mean over texts of `sentence_bleu(text, all other texts)`.

  Each text is scored against the others only, never itself (Texygen's parallel version; its serial version also
  kept the hypothesis among its references, which inflates the score). Lower means more diverse. Same smoothing
  as `sentence_bleu`. Fewer than two texts -> nan.

  Cost is linear in the total n-grams, not quadratic in the texts: for each n-gram we keep its largest count in
  any text, that text, and the second largest, so "the largest count among the others" is one lookup.
  """
  _check_order(max_n)
  token_lists = _token_lists(texts)
  if len(token_lists) < 2:
    return float("nan")
  lengths = np.array([len(t) for t in token_lists])
  per_order = []  # For each order: (per-text counters, ngram -> (best count, best text, second-best count)).
  for n in range(1, max_n + 1):
    counters = [collections.Counter(_ngrams(t, n)) for t in token_lists]
    top: dict[NGram, list[int]] = {}
    for i, counter in enumerate(counters):
      for g, c in counter.items():
        entry = top.setdefault(g, [0, -1, 0])
        if c > entry[0]:
          entry[:] = [c, i, entry[0]]
        elif c > entry[2]:
          entry[2] = c
    per_order.append((counters, top))
  scores = []
  for i, hyp in enumerate(token_lists):
    matches, totals = [], []
    for counters, top in per_order:
      matched = 0
      for g, c in counters[i].items():
        best, best_text, second = top[g]
        matched += min(c, second if best_text == i else best)
      matches.append(matched)
      totals.append(sum(counters[i].values()))
    others = np.delete(lengths, i)
    ref_len = _closest_length(others.tolist(), len(hyp))
    scores.append(_bleu_from_stats(matches, totals, len(hyp), ref_len, epsilon))
  return float(np.mean(scores))


def ngram_entropy(texts: Sequence[Text], n: int) -> float:
  """Ent-n (Zhang et al. 2018): entropy, in nats, of the empirical distribution of the pooled n-grams.

  H = -sum_g p(g) ln p(g), p(g) = count(g) / total n-grams. Divide by ln 2 for bits. Returns 0.0 with no n-gram.
  """
  counts = _pooled_ngram_counts(texts, n)
  total = sum(counts.values())
  if not total:
    return 0.0
  p = np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) / total
  return float(-np.sum(p * np.log(p)))


def token_entropy(logprobs: np.ndarray | Sequence[np.ndarray], mask: Any = None) -> float:
  """Mean entropy, in nats, of the model's next-token distributions: mean over steps t of -sum_v p_tv ln p_tv.

  `logprobs` is an array [..., V] of log-probabilities (e.g. [T, V] or [B, T, V]), or a list of [T_i, V] arrays of
  different lengths, which are pooled. Each row is renormalized with log-softmax first, so raw logits give the same
  result and rows with -inf entries are fine. `mask` (same leading shape, or a matching list) selects the real
  steps, e.g. to drop padding.
  """
  if isinstance(logprobs, np.ndarray):
    logits_XxV = np.asarray(logprobs, dtype=np.float64)
  else:
    logits_XxV = np.concatenate([np.asarray(x, dtype=np.float64) for x in logprobs], axis=0)
    if mask is not None:
      mask = np.concatenate([np.asarray(m) for m in mask], axis=0)
  logits_XxV = logits_XxV.reshape(-1, logits_XxV.shape[-1])
  keep_X = np.ones(logits_XxV.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
  if keep_X.shape[0] != logits_XxV.shape[0]:
    raise ValueError(f"mask has {keep_X.shape[0]} positions, logprobs has {logits_XxV.shape[0]}")
  logits_XxV = logits_XxV[keep_X]
  if logits_XxV.shape[0] == 0:
    raise ValueError("token_entropy got no (unmasked) positions")
  max_X1 = logits_XxV.max(axis=-1, keepdims=True)
  logp_XxV = logits_XxV - max_X1 - np.log(np.exp(logits_XxV - max_X1).sum(axis=-1, keepdims=True))
  p_XxV = np.exp(logp_XxV)
  with np.errstate(invalid="ignore"):  # 0 * -inf at impossible tokens; those terms are 0 by the limit p ln p -> 0.
    terms_XxV = np.where(p_XxV > 0, p_XxV * logp_XxV, 0.0)
  return float(np.mean(-terms_XxV.sum(axis=-1)))


def build_ngram_set(corpus_texts: Iterable[Text], n: int) -> set[NGram]:
  """All n-grams of a training corpus (each text's own n-grams), for `novelty`. Tokenize as the generations are."""
  _check_order(n)
  ngrams: set[NGram] = set()
  for text in corpus_texts:
    ngrams.update(_ngrams(_tokens(text), n))
  return ngrams


def novelty(texts: Sequence[Text], reference_ngrams: set[NGram], n: int) -> float:
  """Share of generated n-gram occurrences (pooled over texts) that never occur in the training corpus.

  novelty-n = #{generated n-gram occurrences g : g not in reference_ngrams} / total generated n-grams, with
  `reference_ngrams = build_ngram_set(corpus, n)`. docs/RESEARCH.md uses n = 4 and 8. Returns 0.0 with no n-gram.
  """
  counts = _pooled_ngram_counts(texts, n)
  total = sum(counts.values())
  if not total:
    return 0.0
  return sum(c for g, c in counts.items() if g not in reference_ngrams) / total


def _canonical(text: Text) -> str:
  return " ".join(str(t) for t in _tokens(text))


def whole_output_novelty(texts: Sequence[Text], corpus_texts_set: Iterable[Text]) -> float:
  """Share of outputs that are not, token for token, a document of the training corpus.

  Both sides are compared after whitespace tokenization (so spacing differences do not count as novelty). This
  is exact-document membership: when corpus documents contain the prompt, pass prompt + continuation as the
  output. Returns 0.0 for no texts.
  """
  token_lists = _token_lists(texts)
  if not token_lists:
    return 0.0
  corpus = {_canonical(t) for t in corpus_texts_set}
  return sum(_canonical(t) not in corpus for t in token_lists) / len(token_lists)


def validity_rate(valid: Sequence[bool]) -> float:
  """Share of outputs that pass the task's checker (story validity checker, verifiable answer)."""
  if len(valid) == 0:
    raise ValueError("validity_rate needs at least one output")
  return float(np.mean(np.asarray(valid, bool)))


def effective_diversity(texts: Sequence[Text], valid: Sequence[bool],
                        metric: Callable[..., float] = distinct_n, **metric_kwargs: Any) -> float:
  """A diversity metric over the valid outputs only (effective diversity, after Shypula et al. 2025).

  Invalid outputs are dropped before measuring, so degenerate text cannot pass as diversity. Report it beside
  `validity_rate`, since this number alone does not say how many outputs survived. `metric(valid_texts,
  **metric_kwargs)`, e.g. `effective_diversity(texts, valid, n=2)` or `effective_diversity(texts, valid, ead_avg,
  vocab_size=V)`. No valid output -> 0.0, like an empty output.
  """
  if len(texts) != len(valid):
    raise ValueError(f"texts ({len(texts)}) and valid ({len(valid)}) must have the same length")
  kept = [t for t, ok in zip(texts, valid) if ok]
  if not kept:
    return 0.0
  return float(metric(kept, **metric_kwargs))
