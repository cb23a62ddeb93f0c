"""Answer extraction, voting and reward on final answers: every world fact, every bios value, arithmetic votes."""

import random

import pytest

from llmstages import rewards, text
from llmstages.data import arith, bios, stories, world
from llmstages.evals import diversity, metrics, prompts


@pytest.fixture(scope="module")
def world_values():
  return sorted({v for _, _, v in world.qa_items(world.WorldConfig(name="test"))})


def test_answer_text_cuts_at_the_period_that_ends_the_answer():
  assert text.answer_text(" Sledepriohaven") == "Sledepriohaven"
  assert text.answer_text(" March 18, 2047. She was") == "March 18, 2047"
  assert text.answer_text(" Paris\nMore") == "Paris"
  assert text.answer_text(" St. John's") == "St. John's"
  assert text.answer_text(" St. John's. It lies on the coast.") == "St. John's"
  assert text.answer_text(" Washington, D.C.") == "Washington, D.C"
  assert text.answer_text(" Paris. St. John's is elsewhere.") == "Paris"


def test_every_world_fact_answered_perfectly_scores_one(world_values):
  assert "St. John's" in world_values and "St. George's" in world_values  # The values with a period.
  for value in world_values:
    for completion in (f" {value}", f" {value}. More text follows.", f" {value}\nNext line"):
      assert text.exact_match(text.answer_text(completion), value), completion
    prompt = rewards.Prompt(text="Q", kind="world", answer=value, meta={}, source="world_qa", index=0)
    assert rewards.get("facts")(rewards.completion_text(f" {value}<|end|>"), prompt) == 1.0, value
  assert not text.exact_match(text.answer_text(" St. George's"), "St. John's")


def test_every_bios_sentence_continued_as_trained_gives_its_value():
  """The memorization answer is the rest of the training sentence: the value, then the template's own words."""
  cfg = bios.BiosConfig(name="test", n=50)
  tails = 0
  for person in bios.make_people(cfg):
    for attr in bios.ATTRIBUTES:
      pre = bios.bio_prefixes(person, "multi_permute", bios.bio_rng(0, person["id"], 0))[attr]
      full = bios.render_bio(person, "multi_permute", bios.bio_rng(0, person["id"], 0))
      rest = text.answer_text(full[len(pre):])
      assert rest.startswith(" ".join(person[attr].split())), (attr, rest)
      tails += rest != person[attr]
      for template in bios.TEMPLATES[attr]:
        if template.endswith("{v}."):  # The value ends the sentence: the answer is the value alone.
          continued = " " + person[attr] + ". He went on."
          assert text.exact_match(text.answer_text(continued), person[attr])
  assert tails > 0  # Some templates go on after the value ("... during his studies."): those count too.


def test_majority_vote_abstentions_count_in_the_share_only():
  assert text.majority_vote(["7", None, "7", "8"]) == ("7", 0.5)
  assert text.majority_vote([None, None]) == (None, 0.0)


def test_arith_votes_on_the_final_answer_not_the_scratchpad():
  prompt = "What is 389 - 354?"
  right = arith.scratchpad(389, "-", 354)  # Ends "Answer: 35".
  correct = [" " + right, " 9-4=5, write 5. 8-5=3, write 3. Answer: 35", " 9-4=5. Answer: 35"]
  wrong = [" 9-4=5, write 5. 8-5=3, write 3. 3-3=0, write 0. Answer: 931"] * 2
  samples = correct + wrong
  assert len({text.normalize_answer(s) for s in correct}) == 3  # Three different scratchpads ...
  answers = [prompts.arith_answer(s) for s in samples]
  assert answers == ["35", "35", "35", "931", "931"]
  vote, share = text.majority_vote(answers)  # ... outvote two identical wrong ones.
  assert (vote, share) == ("35", 0.6) and arith.verify(prompt, vote)
  assert [prompts.extract_answer(prompt, s) for s in samples] == answers  # What generate --vote votes on.
  assert prompts.extract_answer("What is the birth city of A B C?", " Velmarton. She") == "Velmarton"
  assert prompts.arith_answer(" no number here") is None


def test_story_vocabulary_is_fixed_and_covers_what_the_grammar_writes():
  vocab = stories.word_vocabulary(40, 0, 0.3)
  people = stories.bios_people(40, 0)
  seen = set()
  for i in range(500):
    opener, rest = stories.generate_story(random.Random(i), stories.TRAIN_OPENERS + stories.HELD_OUT_OPENERS,
                                          people, 0.3)
    seen.update(f"{opener} {rest}".split())
  assert seen <= vocab
  assert stories.word_vocabulary(40, 0, 0.0) < vocab  # Bios characters add their names and facts.


def test_per_input_ead_does_not_depend_on_the_other_prompts():
  group = [["the", "fox", "ran"], ["a", "fox", "sat"], ["the", "owl", "ran"], ["an", "owl", "flew"]]
  others = [[[f"w{i}{j}" for j in range(12)] for _ in range(4)] for i in range(3)]
  alone = diversity.diversity_scores([group], vocab=346)["per_input/ead"].value
  together = diversity.diversity_scores([group] + others, vocab=346)["per_input/ead"].value
  each = [diversity.diversity_scores([g], vocab=346)["per_input/ead"].value for g in others]
  assert together == pytest.approx((alone + sum(each)) / 4)  # The mean of scores each prompt earns alone.
  assert alone == pytest.approx(metrics.ead_avg(group, 346))
