"""The `stories` corpus: a probabilistic story grammar with a validity checker; held-out openers as creative prompts.

Grammar (each choice uniform unless noted):

    STORY    := OPENER [FACT] GOALS(main) [MEET GOALS(friend)] [CLOSING]
    OPENER   := opener template with an INTRO and a PLACE ("Once upon a time, there was a shy owl named Wren who
                lived in an old lighthouse.")
    INTRO    := "a ADJ KIND named NAME"  |  a bios person's full name (probability `bios_fraction`)
    FACT     := for a bios person, one true bios sentence about them ("Naan S P was born in Shoport.")
    GOALS(c) := GOAL OBSTACLE{1,2} RESOLUTION DONE, for one or two goals of character c
    MEET     := "One day, NAME met INTRO."

Every goal sentence names a goal from `GOALS`; its DONE sentence uses that goal's completed form ("wanted to
build a boat" ... "In the end, Pip built a sturdy boat."). `check_story(text)` accepts a text iff every sentence
parses under the grammar, the story starts with an opener, every character acting was introduced, every goal is
resolved by its own character after it was stated (and nothing else is resolved), and every bios fact is true.

Openers 0-5 are used in train; openers 6-7 are held out: they appear only in validation stories and in the
`prompts` split, the creative prompt set (prompt: the opener sentence; completion: the rest of a valid story).
Splits: train / validation (text), sft (prompt/completion, train openers), prompts (held-out openers).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from typing import Iterator

import tensorflow_datasets as tfds

from llmstages.data import bios, corpus, sources

OPENERS = (
    "Once upon a time, there was {intro} who lived in {place}.",
    "Long ago, in {place}, lived {intro}.",
    "In {place}, there lived {intro}.",
    "There once was {intro} from {place}.",
    "Not so long ago, {intro} made a home in {place}.",
    "Many years ago, {intro} settled in {place}.",
    # Held out: creative prompt set only.
    "Every morning in {place}, {intro} watched the sun rise.",
    "On a windy day in {place}, {intro} woke up early.",
)
TRAIN_OPENERS = (0, 1, 2, 3, 4, 5)
HELD_OUT_OPENERS = (6, 7)
ADJECTIVES = ("brave", "curious", "shy", "clever", "tired", "cheerful", "grumpy", "gentle", "stubborn", "tiny",
              "old", "young", "kind", "restless", "quiet")
KINDS = ("fox", "rabbit", "girl", "boy", "sailor", "baker", "robot", "dragon", "owl", "turtle", "painter",
         "farmer", "mouse", "bear", "knight", "witch", "goat", "poet")
NAMES = ("Pip", "Luna", "Milo", "Tess", "Bram", "Ivy", "Otto", "Nell", "Finn", "Zara", "Hugo", "Wren", "Juno",
         "Rex", "Mabel", "Ollie", "Poppy", "Sage", "Toby", "Vera", "Ezra", "Dot", "Kit", "Lark")
PLACES = ("a quiet village by the sea", "the edge of a dark forest", "a busy harbor town",
          "a small house on a hill", "a city of tall towers", "a farm near the river",
          "a cabin in the snowy mountains", "an old lighthouse", "a desert oasis", "a floating market",
          "the ruins of a castle", "a sunny island", "a valley of windmills", "a library under the ground",
          "a garden full of roses", "a crowded train station", "a forgotten mine", "a town of painted doors")
GOALS = (  # (goal, completed)
    ("find a lost key", "found the lost key"), ("build a boat", "built a sturdy boat"),
    ("learn to sing", "sang in front of the whole town"),
    ("climb the tallest mountain", "stood on top of the tallest mountain"),
    ("bake the perfect cake", "baked the perfect cake"), ("win the spring race", "won the spring race"),
    ("plant a garden", "planted a beautiful garden"), ("write a book", "finished writing a book"),
    ("make a new friend", "made a new friend"), ("fix the old clock", "fixed the old clock"),
    ("cross the wide river", "crossed the wide river"), ("paint the sunrise", "painted the sunrise"),
    ("find the hidden treasure", "found the hidden treasure"), ("fly a kite over the hills",
                                                                "flew a kite over the hills"),
    ("open a small shop", "opened a small shop"), ("catch the silver fish", "caught the silver fish"),
    ("see the northern lights", "saw the northern lights"), ("learn to read", "learned to read"),
    ("rescue a lost kitten", "rescued the lost kitten"), ("visit the king", "visited the king"))
OBSTACLES = ("a storm blew in from the west", "the path was blocked by a fallen tree",
             "nobody believed it was possible", "the only map was torn in half",
             "a grumpy troll guarded the bridge", "winter came early that year", "all the money had been spent",
             "the tools were old and broken", "a thick fog covered everything", "the road was long and steep")
RESOLUTIONS = ("asked an old friend for help", "worked every night by candlelight", "followed the stars",
               "traded a favorite book for a rope", "tried again and again", "drew a new map from memory",
               "made a deal with the troll", "waited patiently for spring", "saved every coin for a year",
               "found a clever shortcut")
GOAL_FORMS = ("{n} wanted to {g}.", "More than anything, {n} hoped to {g}.", "{n} had one wish: to {g}.")
OBSTACLE_FORMS = ("But {o}.", "Sadly, {o}.", "However, {o}.")
RESOLUTION_FORMS = ("So {n} {r}.", "Then {n} {r}.")
DONE_FORMS = ("In the end, {n} {d}.", "At last, {n} {d}.")
MEET_FORM = "One day, {n} met {intro}."
CLOSINGS = ("The end.", "And that is how it happened.")


@dataclasses.dataclass
class StoriesConfig(tfds.core.BuilderConfig):
  seed: int = 0
  n_train: int = 5000
  n_validation: int = 500
  bios_fraction: float = 0.3   # share of main characters who are bios people (with one true fact)
  bios_n: int = 2000           # the bios corpus the people come from: bios(n=bios_n, seed=bios_seed)
  bios_seed: int = 0


@functools.lru_cache(maxsize=4)
def bios_people(bios_n: int, bios_seed: int) -> tuple[dict, ...]:
  """Pretraining people (QA-train and QA-test groups) of bios(n=bios_n, seed=bios_seed), default pools."""
  people = bios.make_people(bios.BiosConfig(name="stories", n=bios_n, seed=bios_seed))
  return tuple(p for p in people if p["group"] in ("qa_train", "qa_test"))


def _character(rng: random.Random, used: set[str], people: tuple[dict, ...], bios_fraction: float):
  """(name, intro, person-or-None) of a fresh character."""
  if people and rng.random() < bios_fraction:
    person = rng.choice(people)
    return person["name"], person["name"], person
  name = rng.choice([n for n in NAMES if n not in used])
  return name, f"a {rng.choice(ADJECTIVES)} {rng.choice(KINDS)} named {name}", None


def _goal_block(name: str, rng: random.Random, goals_used: set[int]) -> list[str]:
  sentences = []
  for _ in range(rng.choice((1, 1, 2))):
    g = rng.choice([i for i in range(len(GOALS)) if i not in goals_used])
    goals_used.add(g)
    goal, done = GOALS[g]
    sentences.append(rng.choice(GOAL_FORMS).format(n=name, g=goal))
    for o in rng.sample(OBSTACLES, rng.choice((1, 2))):
      sentences.append(rng.choice(OBSTACLE_FORMS).format(o=o))
    sentences.append(rng.choice(RESOLUTION_FORMS).format(n=name, r=rng.choice(RESOLUTIONS)))
    sentences.append(rng.choice(DONE_FORMS).format(n=name, d=done))
  return sentences


def generate_story(rng: random.Random, openers=TRAIN_OPENERS, people: tuple[dict, ...] = (),
                   bios_fraction: float = 0.0) -> tuple[str, str]:
  """(opener sentence, rest of the story); the story is opener + ' ' + rest."""
  used: set[str] = set()
  name, intro, person = _character(rng, used, people, bios_fraction)
  used.add(name)
  opener = OPENERS[rng.choice(openers)].format(intro=intro, place=rng.choice(PLACES))
  sentences: list[str] = []
  if person is not None:
    attr = rng.choice(bios.ATTRIBUTES)
    template = rng.choice(bios.TEMPLATES[attr])
    sentences.append(bios._fill(template, person, use_name=True).replace("{v}", person[attr]))
  goals_used: set[int] = set()
  sentences += _goal_block(name, rng, goals_used)
  if rng.random() < 0.4:
    friend, intro2, _ = _character(rng, used, (), 0.0)
    sentences.append(MEET_FORM.format(n=name, intro=intro2))
    sentences += _goal_block(friend, rng, goals_used)
  if rng.random() < 0.5:
    sentences.append(rng.choice(CLOSINGS))
  return opener, " ".join(sentences)


def _slot_tokens(form: str, slot: str, fillers) -> set[str]:
  """Whitespace tokens of `form` with `{slot}` taken by each filler (other slots stay out of the tokens)."""
  out: set[str] = set()
  for filler in fillers:
    text = re.sub(r"\{\w+\}", "\0", form.replace("{" + slot + "}", filler))
    out.update(t for t in text.split() if "\0" not in t)
  return out


@functools.lru_cache(maxsize=8)
def word_vocabulary(bios_n: int, bios_seed: int, bios_fraction: float) -> frozenset[str]:
  """Every whitespace token (punctuation attached, as the diversity metrics split text) that the grammar can
  write: the V of EAD for story texts, fixed by the grammar and its bios people, not by what a model sampled."""
  people = bios_people(bios_n, bios_seed) if bios_fraction > 0 else ()
  names = list(NAMES) + [p["name"] for p in people]
  intros = [f"a {a} {k} named {n}" for a in ADJECTIVES for k in KINDS for n in NAMES] + [p["name"] for p in people]
  words: set[str] = set()
  for opener in OPENERS:
    words |= _slot_tokens(opener, "intro", intros) | _slot_tokens(opener, "place", PLACES)
  for form, slot, fillers in ((GOAL_FORMS, "g", [g for g, _ in GOALS]), (OBSTACLE_FORMS, "o", OBSTACLES),
                              (RESOLUTION_FORMS, "r", RESOLUTIONS), (DONE_FORMS, "d", [d for _, d in GOALS])):
    for f in form:
      words |= _slot_tokens(f, slot, fillers) | _slot_tokens(f, "n", names)
  words |= _slot_tokens(MEET_FORM, "n", names) | _slot_tokens(MEET_FORM, "intro", intros[:len(intros) - len(people)])
  for closing in CLOSINGS:
    words.update(closing.split())
  for person in people:  # The one true bios sentence about a bios main character.
    for attr in bios.ATTRIBUTES:
      for template in bios.TEMPLATES[attr]:
        words.update(bios._fill(template, person, use_name=True).replace("{v}", person[attr]).split())
  return frozenset(words)


# --- checking ---------------------------------------------------------------------------------------------------
def _alt(values) -> str:
  return "(?:" + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)) + ")"


_NAME = r"(?:[A-Z][a-z]+(?: [A-Z][a-z]+ [A-Z][a-z]+)?)"
_INTRO = rf"(?:a {_alt(ADJECTIVES)} {_alt(KINDS)} named (?P<gname>{_alt(NAMES)})|(?P<pname>{bios._NAME}))"


def _form_regex(form: str, **slots: str) -> re.Pattern:
  pattern = re.escape(form)
  for key, value in slots.items():
    pattern = pattern.replace(re.escape("{" + key + "}"), value)
  return re.compile("^" + pattern + "$")


_OPENER_RES = [_form_regex(o, intro=_INTRO, place=f"(?P<place>{_alt(PLACES)})") for o in OPENERS]
_GOAL_RES = [_form_regex(f, n=f"(?P<n>{_NAME})", g=f"(?P<g>{_alt(g for g, _ in GOALS)})") for f in GOAL_FORMS]
_OBSTACLE_RES = [_form_regex(f, o=_alt(OBSTACLES)) for f in OBSTACLE_FORMS]
_RESOLUTION_RES = [_form_regex(f, n=f"(?P<n>{_NAME})", r=_alt(RESOLUTIONS)) for f in RESOLUTION_FORMS]
_DONE_RES = [_form_regex(f, n=f"(?P<n>{_NAME})", d=f"(?P<d>{_alt(d for _, d in GOALS)})") for f in DONE_FORMS]
_MEET_RE = _form_regex(MEET_FORM, n=f"(?P<n>{_NAME})", intro=_INTRO)
_GOAL_OF_DONE = {d: g for g, d in GOALS}
_SENTENCE = re.compile(r"(?<=[.])\s+(?=[A-Z])")


def _first_match(regexes, sentence):
  for regex in regexes:
    m = regex.match(sentence)
    if m:
      return m
  return None


def story_problems(text: str, people=None) -> list[str]:
  """Why `text` is not a valid story (empty list: valid). `people`: bios fact table (list of dicts, or a
  dict name -> person); default: the pretraining people of bios(n=2000, seed=0)."""
  if people is None:
    people = bios_people(2000, 0)
  by_name = people if isinstance(people, dict) else {p["name"]: p for p in people}
  sentences = [s for s in _SENTENCE.split(text.strip()) if s]
  if not sentences:
    return ["empty story"]
  problems: list[str] = []
  m = _first_match(_OPENER_RES, sentences[0])
  if not m:
    return [f"does not start with an opener: {sentences[0]!r}"]
  characters = {m.group("gname") or m.group("pname")}
  open_goals: dict[tuple[str, str], bool] = {}
  n_goals = 0
  for s in sentences[1:]:
    if (m := _first_match(_GOAL_RES, s)):
      if m.group("n") not in characters:
        problems.append(f"unknown character in {s!r}")
      if (m.group("n"), m.group("g")) in open_goals:
        problems.append(f"goal stated twice: {s!r}")
      open_goals[(m.group("n"), m.group("g"))] = False
      n_goals += 1
    elif (m := _first_match(_DONE_RES, s)):
      key = (m.group("n"), _GOAL_OF_DONE[m.group("d")])
      if key not in open_goals or open_goals[key]:
        problems.append(f"resolves a goal that was not stated (or twice): {s!r}")
      else:
        open_goals[key] = True
    elif (m := _first_match(_RESOLUTION_RES, s)):
      if m.group("n") not in characters:
        problems.append(f"unknown character in {s!r}")
    elif _first_match(_OBSTACLE_RES, s) or s in CLOSINGS:
      pass
    elif (m := _MEET_RE.match(s)):
      if m.group("n") not in characters:
        problems.append(f"unknown character in {s!r}")
      characters.add(m.group("gname") or m.group("pname"))
    elif (readings := bios.parse_sentence(s)):
      names = {r["name"] for r in readings}
      reading = readings[0]
      person = by_name.get(reading["name"])
      if person is None:
        problems.append(f"fact about an unknown person: {s!r} ({sorted(map(str, names))})")
      elif not any(r["value"] == person[r["attr"]] and not (r["pronouns"] - {person["pronoun"]})
                   for r in readings):
        problems.append(f"false fact: {s!r}")
    else:
      problems.append(f"unparsable sentence: {s!r}")
  if n_goals == 0:
    problems.append("no goal")
  problems += [f"unresolved goal of {n}: {g!r}" for (n, g), done in open_goals.items() if not done]
  return problems


def check_story(text: str, people=None) -> bool:
  """True iff `text` parses under the story grammar, every goal is resolved, and every bios fact is true."""
  return not story_problems(text, people)


def opener_of(text: str) -> str:
  return _SENTENCE.split(text.strip(), maxsplit=1)[0]


class LlmstagesStories(corpus.CorpusBuilder):
  """Grammar stories (see the module docstring)."""

  CONFIG_CLASS = StoriesConfig
  CONFIG_PREFIX = "n{n_train}_s{seed}_b{bios_n}"
  SPLITS = ("train", "validation", "sft", "prompts")

  def metadata(self) -> dict:
    cfg = self.builder_config
    return {"corpus": "stories", "bios": {"n": cfg.bios_n, "seed": cfg.bios_seed},
            "train_openers": [OPENERS[i] for i in TRAIN_OPENERS],
            "held_out_openers": [OPENERS[i] for i in HELD_OUT_OPENERS],
            "checker": "llmstages.data.stories.check_story"}

  def split_records(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    people = bios_people(cfg.bios_n, cfg.bios_seed) if cfg.bios_fraction > 0 else ()
    held_out = split in ("validation", "prompts")
    count = cfg.n_validation if held_out else cfg.n_train
    stream = "train" if split in ("train", "sft") else "held_out"
    for i in range(count):
      rng = random.Random(f"stories/{cfg.seed}/{stream}/{split == 'sft'}/{i}")
      opener, rest = generate_story(rng, HELD_OUT_OPENERS if held_out else TRAIN_OPENERS, people,
                                    cfg.bios_fraction)
      if split in ("train", "validation"):
        yield corpus.record(i, format="text", text=f"{opener} {rest}")
      else:
        yield corpus.record(i, format="pc", prompt=opener, completion=" " + rest)


sources.register_source("stories", LlmstagesStories,
                        doc="grammar stories; validation: stories with held-out openers")
sources.register_source("stories_sft", LlmstagesStories, train="sft", validation="prompts",
                        doc="opener -> rest of story (prompt/completion); validation: held-out openers")
sources.register_source("stories_prompts", LlmstagesStories, train="prompts", validation="prompts",
                        doc="the creative prompt set: held-out openers (prompt) and a reference continuation")
