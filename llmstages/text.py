"""Answer text: where a short answer ends in a completion, SQuAD-style normalization, exact match, majority vote.

Pure Python, no JAX and no other llmstages module, so the evaluators, the rewards and the command-line tools all
judge an answer the same way. Where a chat reply ends (the template's end-of-turn token) is the caller's business:
cut the reply first, then take its answer here.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

# A period right after a capitalized word of one or two letters ("St", "Mt", the "D" of "D.C.") that is followed by
# more of the same name ("St. John's") abbreviates; any other period ends the sentence, and so the answer.
_ABBREVIATION = re.compile(r"(?:^|[\s.])[A-Z][a-z]?$")
_NAME_GOES_ON = re.compile(r"[A-Za-z]|\s+[A-Z]")


def answer_text(text: str) -> str:
  """The answer in a completion: its first line, up to the first period that ends a sentence, stripped.

  " March 18, 2047. She was" -> "March 18, 2047"; " St. John's. It lies" -> "St. John's"; " St. John's" ->
  "St. John's". An abbreviating period (see `_ABBREVIATION`) does not end the answer.
  """
  text = text.split("\n", 1)[0]
  for m in re.finditer(r"\.", text):
    if _ABBREVIATION.search(text, 0, m.start()) and _NAME_GOES_ON.match(text, m.end()):
      continue
    return text[:m.start()].strip()
  return text.strip()


# Punctuation, except a minus sign that starts a number and a decimal point between digits. SQuAD strips both, which
# would score "-5" as equal to "5" and "3.5" as equal to "35"; arithmetic answers need them kept.
_PUNCT_RE = re.compile(r"(?<!\S)-(?=\d)|(?<=\d)\.(?=\d)|([" + re.escape(string.punctuation) + r"])")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD-style answer normalization (Rajpurkar et al. 2016, official evaluate-v1.1.py).

  Lower-case, remove ASCII punctuation (`string.punctuation`), remove the articles a/an/the as whole words, and
  collapse runs of whitespace to one space. One deliberate difference from SQuAD: a minus sign that starts a number
  ("-5") and a decimal point between digits ("3.5") are kept, so signed and decimal answers stay distinct.
  A thousands separator is still removed ("1,000" -> "1000"), and an answer that is only an article ("A")
  normalizes to "", as in SQuAD.
  """
  text = text.lower()
  text = _PUNCT_RE.sub(lambda m: "" if m.group(1) else m.group(0), text)
  text = _ARTICLES_RE.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
  """EM: normalize_answer(prediction) == normalize_answer(reference)."""
  return normalize_answer(prediction) == normalize_answer(reference)


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float]:
  """maj@k (self-consistency, Wang et al. 2023): the most common normalized answer and its share of the votes.

  `answers` are the answers already extracted from the k samples (for arithmetic: the final number the verifier
  parses, not the scratchpad); None is a sample with no answer, which abstains but still counts in the share's
  denominator. Returns (answer in normalized form, count / len(answers)), or (None, 0.0) when every sample
  abstains. Ties go to the answer whose first vote came earliest in `answers`, so the result is deterministic.
  """
  if not answers:
    raise ValueError("majority_vote needs at least one answer")
  normalized = [normalize_answer(a) for a in answers if a is not None]
  if not normalized:
    return None, 0.0
  counts = collections.Counter(normalized)
  first_seen = {}
  for i, a in enumerate(normalized):
    first_seen.setdefault(a, i)
  best = min(counts, key=lambda a: (-counts[a], first_seen[a]))
  return best, counts[best] / len(answers)
