"""Evaluation metrics: hand-computed values, identities, and agreement with NLTK's BLEU (a test dependency)."""

import itertools
import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from llmstages.evals import metrics

TWO_TEXTS = ["the cat sat", "the cat ran"]


# ---------------------------------------------------------------------------------------------------------------
# Factual metrics.


@pytest.mark.parametrize("text, expected", [
    ("The  Cat!", "cat"),
    ("an apple a day", "apple day"),
    ("  Hello,\t  World. ", "hello world"),
    ("Theatre", "theatre"),  # Articles only as whole words.
    ("It's  the U.S.A.", "its usa"),
    ("1,000", "1000"),  # Thousands separator removed, as in SQuAD.
    ("-5", "-5"),  # Sign kept: "-5" must not equal "5".
    ("x = -5.", "x -5"),
    ("3.5", "3.5"),  # Decimal point kept: "3.5" must not equal "35".
    ("well-known", "wellknown"),
])
def test_normalize_answer(text, expected):
  assert metrics.normalize_answer(text) == expected


def test_exact_match():
  assert metrics.exact_match("The Eiffel Tower.", "eiffel tower")
  assert not metrics.exact_match("-5", "5")
  assert not metrics.exact_match("Paris", "Lyon")


def test_majority_vote_and_ties():
  assert metrics.majority_vote(["The Paris.", "paris", "London"]) == ("paris", pytest.approx(2 / 3))
  # 2-2 tie between "y" and "x": the answer voted first wins, whatever the order of later votes.
  assert metrics.majority_vote(["Y", "x", "y", "X"]) == ("y", 0.5)
  assert metrics.majority_vote(["x", "Y", "y", "X"]) == ("x", 0.5)
  # SQuAD normalization drops articles, so an answer that is only "A" votes as "".
  assert metrics.majority_vote(["A", "an", "b"]) == ("", pytest.approx(2 / 3))
  assert metrics.majority_vote(["x", "y", "z"]) == ("x", pytest.approx(1 / 3))
  with pytest.raises(ValueError):
    metrics.majority_vote([])


def _pass_at_k_enumerated(n, c, k):
  """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_and_closed_form():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        got = metrics.pass_at_k(n, c, k)
        assert got == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12)
        assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
  assert metrics.pass_at_k(200, 10, 1) == pytest.approx(10 / 200)  # pass@1 = c / n.
  # Large n, where the binomials overflow floats, stays finite and matches exact integer arithmetic.
  assert metrics.pass_at_k(5000, 3, 100) == pytest.approx(1 - math.comb(4997, 100) / math.comb(5000, 100))


def test_pass_at_k_rejects_bad_arguments():
  with pytest.raises(ValueError, match="n=3 < k=5"):
    metrics.pass_at_k(3, 1, 5)
  with pytest.raises(ValueError):
    metrics.pass_at_k(3, 4, 1)
  with pytest.raises(ValueError):
    metrics.pass_at_k(3, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Knowledge capacity. RESEARCH.md: p1 = mean over people of -ln q(name) summed over the name tokens after BOS. The
# model sees N distinct names, so sum_i q(name_i) <= 1 and, by Jensen, p1 = mean_i -ln q(name_i) >=
# -ln(mean_i q(name_i)) >= ln N; p2 >= 0 as a cross-entropy. Hence name_bits <= N log2(N0/N) and
# attr_bits <= N log2 S0, i.e. R <= R_max, with equality exactly at p1 = ln N (uniform over the N trained names: a
# perfect memorizer still cannot know which person comes next) and p2 = 0 (every attribute certain). p1 = p2 = 0 is
# not achievable for N > 1, which is why R at p1 = 0 would exceed R_max.


def test_knowledge_capacity_hand_values():
  # N = 1000, N0 = 2^20, S0 = 2^10, P = 1000, p1 = ln N, p2 = 0:
  # bits_max = 1000 (20 - log2 1000) + 1000 * 10 = 30000 - 1000 log2 1000 = 20034.2 bits -> R_max = 20.0342.
  n, p = 1000, 1000
  out = metrics.knowledge_capacity(math.log(n), 0.0, n, 2 ** 20, 2 ** 10, p)
  assert set(out) == {"bits", "bits_max", "R", "R_max", "name_bits", "attr_bits"}
  assert out["R_max"] == pytest.approx(30 - math.log2(1000))
  assert out["R"] == pytest.approx(out["R_max"], rel=1e-12)
  assert out["name_bits"] == pytest.approx(n * (20 - math.log2(n)))
  assert out["attr_bits"] == pytest.approx(n * 10)
  assert out["bits"] == pytest.approx(out["name_bits"] + out["attr_bits"])
  # A model that knows the names but is uniform over attribute values (p2 = ln S0) stores no attribute bits.
  assert metrics.knowledge_capacity(math.log(n), 10 * math.log(2), n, 2 ** 20, 2 ** 10, p)["attr_bits"] == (
      pytest.approx(0.0, abs=1e-9))


def test_knowledge_capacity_never_exceeds_max_for_normalized_models():
  rng = np.random.default_rng(0)
  n0, n = 500, 40
  value_counts = [12, 28, 50]
  s0 = math.prod(value_counts)
  for trial in range(200):
    names = rng.choice(n0, size=n, replace=False)
    # A normalized distribution over all N0 names, most of its mass (up to all of it) on the trained names.
    q_names = rng.dirichlet(np.full(n0, 0.05))
    q_names[names] += rng.uniform(0, 50) * rng.dirichlet(np.full(n, rng.uniform(0.1, 100)))
    q_names /= q_names.sum()
    p1 = float(np.mean(-np.log(q_names[names])))
    # Per person and attribute, a normalized distribution over values scored on the true value.
    p2 = 0.0
    for count in value_counts:
      truth = rng.integers(0, count, size=n)
      q = rng.dirichlet(np.full(count, rng.uniform(0.01, 1.0)), size=n)
      q[np.arange(n), truth] += rng.uniform(0, 1000)
      q /= q.sum(axis=1, keepdims=True)
      p2 += float(np.mean(-np.log(q[np.arange(n), truth])))
    out = metrics.knowledge_capacity(p1, p2, n, n0, s0, num_params=1234)
    assert out["R"] <= out["R_max"] + 1e-12, trial


def test_knowledge_capacity_untrained_model_stores_nothing():
  # Uniform over a V = 8192 vocabulary; a name is 3 tokens (first, middle, last) and N0 = 400*400*1000 <= V^3;
  # the bit-carrying values take 10 tokens and S0 = 12*28*200*200*300*100*2 <= V^10. So p1 = 3 ln V >= ln N0 and
  # p2 = 10 ln V >= ln S0, and both bit counts are <= 0.
  vocab = 8192
  n0 = 400 * 400 * 1000
  s0 = 12 * 28 * 200 * 200 * 300 * 100 * 2
  out = metrics.knowledge_capacity(3 * math.log(vocab), 10 * math.log(vocab), 10_000, n0, s0, num_params=52_000)
  assert out["name_bits"] <= 0 and out["attr_bits"] <= 0 and out["R"] <= 0
  assert out["R"] <= out["R_max"]


def test_knowledge_capacity_rejects_impossible_inputs():
  with pytest.raises(ValueError, match="p1_nats"):
    metrics.knowledge_capacity(-0.1, 0.0, 10, 100, 10, 100)
  with pytest.raises(ValueError, match="N0"):
    metrics.knowledge_capacity(1.0, 0.0, 10, 5, 10, 100)


# ---------------------------------------------------------------------------------------------------------------
# Diversity metrics.


def test_distinct_n_hand_values():
  # Tokens: [the cat sat], [the cat ran]; n-grams are taken within each text, then pooled.
  # n=1: 6 occurrences, unique {the, cat, sat, ran} = 4           -> 4/6
  # n=2: (the cat) (cat sat) (the cat) (cat ran) = 4, unique 3    -> 3/4 (a cross-text (sat the) would make it 4/5)
  # n=3: (the cat sat) (the cat ran) = 2, unique 2                -> 1
  # n=4: no 4-gram                                                -> 0
  assert metrics.distinct_n(TWO_TEXTS, 1) == pytest.approx(4 / 6)
  assert metrics.distinct_n(TWO_TEXTS, 2) == pytest.approx(3 / 4)
  assert metrics.distinct_n(TWO_TEXTS, 3) == 1.0
  assert metrics.distinct_n(TWO_TEXTS, 4) == 0.0
  assert metrics.distinct_n([], 1) == 0.0


def test_texts_as_strings_or_token_lists():
  tokenized = [t.split() for t in TWO_TEXTS]
  ids = [[1, 2, 3], [1, 2, 4]]  # Same structure as token ids.
  for n in (1, 2, 3):
    assert metrics.distinct_n(tokenized, n) == metrics.distinct_n(TWO_TEXTS, n) == metrics.distinct_n(ids, n)
  assert metrics.self_bleu(tokenized) == metrics.self_bleu(TWO_TEXTS) == metrics.self_bleu(ids)
  with pytest.raises(TypeError, match="single string"):
    metrics.distinct_n("the cat sat", 1)


def test_ead_hand_values():
  # Same counts as test_distinct_n_hand_values, V = 4; expected unique = V (1 - ((V-1)/V)^C).
  # n=1: C=6, U=4: 4 (1 - (3/4)^6) = 4 * 3367/4096 = 3367/1024  -> EAD = 4096/3367 = 1.21651...
  # n=2: C=4, U=3: 4 (1 - (3/4)^4) = 4 * 175/256   = 175/64     -> EAD = 192/175   = 1.09714...
  # n=3: C=2, U=2: 4 (1 - (3/4)^2) = 4 * 7/16      = 7/4        -> EAD = 8/7       = 1.14286...
  # n=4, 5: no n-gram -> 0.     ead_avg = (4096/3367 + 192/175 + 8/7) / 5 = 0.69130...
  assert metrics.ead(TWO_TEXTS, 1, 4) == pytest.approx(4096 / 3367, rel=1e-12)
  assert metrics.ead(TWO_TEXTS, 2, 4) == pytest.approx(192 / 175, rel=1e-12)
  assert metrics.ead(TWO_TEXTS, 3, 4) == pytest.approx(8 / 7, rel=1e-12)
  assert metrics.ead(TWO_TEXTS, 4, 4) == 0.0
  assert metrics.ead_avg(TWO_TEXTS, 4) == pytest.approx((4096 / 3367 + 192 / 175 + 8 / 7) / 5, rel=1e-12)
  # V = 10, n = 1: 10 (1 - 0.9^6) = 10 * 0.468559 = 4.68559 -> EAD = 4 / 4.68559 = 0.85368...
  assert metrics.ead(TWO_TEXTS, 1, 10) == pytest.approx(4 / 4.68559, rel=1e-12)
  # V = 1: every draw is the one item, so one unique item is expected.
  assert metrics.ead(TWO_TEXTS, 1, 1) == 4.0


def test_ead_tends_to_distinct_n_for_a_huge_vocabulary():
  # V (1 - ((V-1)/V)^C) -> C as V -> inf; a naive power of (V-1)/V would lose this to rounding at V = 1e12.
  for n in (1, 2, 3):
    assert metrics.ead(TWO_TEXTS, n, 10 ** 12) == pytest.approx(metrics.distinct_n(TWO_TEXTS, n), rel=1e-9)


BLEU_TEXTS = [
    "the cat sat on the mat",
    "the cat sat on a mat today",
    "a dog ran in the park",
    "the the the the",
    "cat",
    "on the mat the cat sat",
    "the cat sat on the mat",  # A duplicate of the first: its BLEU against the others is 1.
    "",
]


def _nltk_self_bleu(texts, max_n):
  tokens = [t.split() for t in texts]
  smoothing = SmoothingFunction(epsilon=0.1).method1
  weights = (1 / max_n,) * max_n
  return float(np.mean([
      nltk_sentence_bleu(tokens[:i] + tokens[i + 1:], hyp, weights, smoothing_function=smoothing)
      for i, hyp in enumerate(tokens)]))


@pytest.mark.parametrize("max_n", [1, 2, 4])
def test_self_bleu_matches_nltk(max_n):
  assert metrics.self_bleu(BLEU_TEXTS, max_n) == pytest.approx(_nltk_self_bleu(BLEU_TEXTS, max_n), abs=1e-6)
  rng = np.random.default_rng(0)
  for _ in range(30):
    texts = [" ".join(rng.choice(list("abcde"), size=rng.integers(0, 12))) for _ in range(rng.integers(2, 7))]
    assert metrics.self_bleu(texts, max_n) == pytest.approx(_nltk_self_bleu(texts, max_n), abs=1e-6)


def test_sentence_bleu_matches_nltk():
  smoothing = SmoothingFunction(epsilon=0.1).method1
  refs = [t.split() for t in BLEU_TEXTS[1:4]]
  for hyp in BLEU_TEXTS:
    want = nltk_sentence_bleu(refs, hyp.split(), smoothing_function=smoothing)
    assert metrics.sentence_bleu(hyp, refs) == pytest.approx(want, abs=1e-6)


def test_self_bleu_identities():
  assert metrics.self_bleu(["a b c d e"] * 3) == pytest.approx(1.0)
  assert metrics.self_bleu(["a b c d", "e f g h"]) == 0.0  # No shared unigram.
  assert math.isnan(metrics.self_bleu(["a b c d"]))
  assert math.isnan(metrics.self_bleu([]))


def test_ngram_entropy_hand_values():
  # "a b a b": unigrams a, b with p = 1/2 each -> ln 2 nats.
  # Bigrams (a b) x2, (b a) x1 -> -(2/3 ln 2/3 + 1/3 ln 1/3) = ln 3 - (2/3) ln 2.
  assert metrics.ngram_entropy(["a b a b"], 1) == pytest.approx(math.log(2))
  assert metrics.ngram_entropy(["a b a b"], 2) == pytest.approx(math.log(3) - 2 / 3 * math.log(2))
  assert metrics.ngram_entropy(["a a a"], 1) == 0.0
  assert metrics.ngram_entropy(["a"], 2) == 0.0


def test_token_entropy():
  vocab = 16
  uniform_TxV = np.full((5, vocab), -math.log(vocab))
  one_hot_TxV = np.full((5, vocab), -np.inf)
  one_hot_TxV[:, 3] = 0.0
  assert metrics.token_entropy(uniform_TxV) == pytest.approx(math.log(vocab))
  assert metrics.token_entropy(one_hot_TxV) == 0.0
  # Raw logits give the entropy of their softmax; a mask drops padding steps.
  logits_TxV = np.random.default_rng(0).normal(size=(7, vocab)) * 3
  logp_TxV = logits_TxV - np.log(np.exp(logits_TxV).sum(-1, keepdims=True))
  by_hand = float(np.mean(-(np.exp(logp_TxV) * logp_TxV).sum(-1)))
  assert metrics.token_entropy(logits_TxV) == pytest.approx(by_hand)
  both_2xTxV = np.stack([uniform_TxV, one_hot_TxV])
  assert metrics.token_entropy(both_2xTxV) == pytest.approx(math.log(vocab) / 2)
  assert metrics.token_entropy(both_2xTxV, mask=np.array([[1] * 5, [0] * 5])) == pytest.approx(math.log(vocab))
  # Ragged list of [T_i, V]: 5 uniform steps and 2 certain ones.
  assert metrics.token_entropy([uniform_TxV, one_hot_TxV[:2]]) == pytest.approx(5 / 7 * math.log(vocab))


def test_novelty():
  corpus = ["the cat sat on the mat", "a dog ran"]
  bigrams = metrics.build_ngram_set(corpus, 2)
  assert ("sat", "on") in bigrams and ("mat", "a") not in bigrams  # Not across documents.
  # Bigrams of "the cat ran on the mat": the-cat (seen), cat-ran (new), ran-on (new), on-the, the-mat (seen) -> 2/5.
  assert metrics.novelty(["the cat ran on the mat"], bigrams, 2) == pytest.approx(2 / 5)
  assert metrics.novelty(corpus, bigrams, 2) == 0.0
  # Whole outputs: compared token for token, so spacing does not matter.
  outputs = ["the cat   sat on the mat", "a dog sat", "a dog ran"]
  assert metrics.whole_output_novelty(outputs, set(corpus)) == pytest.approx(1 / 3)


def test_effective_diversity_and_validity():
  texts = ["a b", "a b", "c d"]
  valid = [True, False, True]
  # All texts: unigrams a b a b c d -> 4 unique / 6. Valid only: a b c d -> 4 / 4.
  assert metrics.distinct_n(texts, 1) == pytest.approx(4 / 6)
  assert metrics.effective_diversity(texts, valid, n=1) == 1.0
  assert metrics.effective_diversity(texts, valid, metrics.ead_avg, vocab_size=4) == (
      pytest.approx(metrics.ead_avg(["a b", "c d"], 4)))
  assert metrics.validity_rate(valid) == pytest.approx(2 / 3)
  assert metrics.effective_diversity(texts, [False] * 3, n=1) == 0.0
  with pytest.raises(ValueError, match="same length"):
    metrics.effective_diversity(texts, [True], n=1)


# ---------------------------------------------------------------------------------------------------------------
# Reporting.


def test_bootstrap_ci_contains_estimate_and_shrinks_with_data():
  rng = np.random.default_rng(0)
  small = rng.normal(1.0, 1.0, size=30)
  large = rng.normal(1.0, 1.0, size=3000)
  est_s, lo_s, hi_s = metrics.bootstrap_ci(small)
  est_l, lo_l, hi_l = metrics.bootstrap_ci(large)
  assert lo_s <= est_s <= hi_s and lo_l <= est_l <= hi_l
  assert est_s == pytest.approx(small.mean())
  assert hi_l - lo_l < (hi_s - lo_s) / 5  # Width ~ 1/sqrt(n): 10x the data -> ~ 1/10 the width here.
  assert metrics.bootstrap_ci(small, seed=3) == metrics.bootstrap_ci(small, seed=3)
  assert metrics.bootstrap_ci([2.0]) == (2.0, 2.0, 2.0)


def test_paired_bootstrap_diff():
  rng = np.random.default_rng(1)
  base = rng.normal(0.0, 5.0, size=40)  # Large per-item spread shared by both settings.
  better = base + 0.5 + rng.normal(0.0, 0.1, size=40)
  est, lo, hi = metrics.paired_bootstrap_diff(better, base)
  assert est == pytest.approx(np.mean(better - base))
  assert 0 < lo <= est <= hi  # Pairing removes the shared spread, so the 0.5 gain is resolved...
  _, lo_a, hi_a = metrics.bootstrap_ci(better)
  _, lo_b, hi_b = metrics.bootstrap_ci(base)
  assert lo_a < hi_b  # ...which two unpaired intervals cannot: they overlap.
  assert metrics.paired_bootstrap_diff(base, base) == (0.0, 0.0, 0.0)
