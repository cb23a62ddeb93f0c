"""The `instructions` and `preferences` corpora: chat-format tasks built from bios, world, arith and stories.

Task kinds (drawn with weights `w_bios`, `w_world`, `w_arith`, `w_story`):
    bios   fact QA about a bios person: train uses QA-train people, validation QA-test people
    world  geographic QA (relation uniform, then a fact of it): train uses question templates 0-2,
           validation the held-out template 3
    arith  "What is A op B?" (answer) or "Show your work. What is A op B?" (scratchpad, a share
           `arith_scratchpad_fraction`, default 0.5); arith train/validation
    story  'Write a short story that begins: "OPENER"' -> the rest of a valid grammar story that opens with OPENER
           (the reply continues it); validation uses held-out openers
Some examples carry a system message, some a previous (answered) exchange. The bios people are those of
bios(n=bios_n, seed=bios_seed) with default pools: build instructions with the same bios n/seed as pretraining.

instructions: records of format 'chat' (text = the rendered conversation; loss on assistant turns only).
preferences: records of format 'pref': prompt = conversation up to and including `<|assistant|>`, completion
(chosen) = " ANSWER<|end|>", rejected = " WRONG<|end|>", where WRONG states another value of the same attribute
(of a person of the same QA group), a wrong sum, or the story's continuation with a goal left unresolved or a
false bios fact. As LM documents, preferences read as prompt + chosen. meta holds kind, answer and (preferences)
why the rejected one is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Iterator

import tensorflow_datasets as tfds

from llmstages.data import arith, bios, chat, corpus, sources, stories, world

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and accurately.",
                  "You are a knowledgeable and creative assistant.")
STORY_REQUESTS = ('Write a short story that begins: "{opener}"', 'Continue this story: "{opener}"',
                  'Tell me a story starting with "{opener}"')


@dataclasses.dataclass
class InstructionsConfig(tfds.core.BuilderConfig):
  seed: int = 0
  n_train: int = 5000
  n_validation: int = 500
  bios_n: int = 2000
  bios_seed: int = 0
  world_cities: int = 3000
  w_bios: float = 0.4
  w_world: float = 0.2
  w_arith: float = 0.2
  w_story: float = 0.2
  system_fraction: float = 0.3
  multi_turn_fraction: float = 0.2
  # The arith tasks' problems: those of arith(min_digits, max_digits, n_train, n_validation, ops) (train role: its
  # train split, held out: its validation split), so an evaluator on that arith corpus scores problems never trained.
  arith_min_digits: int = 2
  arith_max_digits: int = 3
  arith_n_train: int = 20000
  arith_n_validation: int = 1000
  arith_ops: str = "+-"
  # Share of arith tasks asked as "Show your work. ..." (scratchpad answer); the rest ask for the bare result.
  arith_scratchpad_fraction: float = 0.5


@dataclasses.dataclass
class Task:
  kind: str
  user: str
  answer: str
  wrong: str
  why_wrong: str
  meta: dict


class TaskMaker:
  """Draws tasks of each kind for one role ('train' or 'held_out')."""

  def __init__(self, cfg: InstructionsConfig, role: str):
    self.cfg, self.role = cfg, role
    people = bios.make_people(bios.BiosConfig(name="instructions", n=cfg.bios_n, seed=cfg.bios_seed))
    group = "qa_train" if role == "train" else "qa_test"
    self.people = [p for p in people if p["group"] == group]
    self.both_groups = [p for p in people if p["group"] in ("qa_train", "qa_test")]
    self.story_people = stories.bios_people(cfg.bios_n, cfg.bios_seed)
    # Relation first, then a fact of it: cities would otherwise dominate the country facts.
    self.world_items: dict[str, list[tuple[str, str]]] = {}
    for rel, subject, value in world.qa_items(world.WorldConfig(name="x", n_cities=cfg.world_cities)):
      self.world_items.setdefault(rel, []).append((subject, value))
    train, validation = _arith_problems(cfg.arith_min_digits, cfg.arith_max_digits, cfg.arith_n_train,
                                        cfg.arith_n_validation, cfg.arith_ops)
    self.problems = train if role == "train" else validation

  def make(self, kind: str, rng: random.Random) -> Task:
    return getattr(self, f"_{kind}")(rng)

  def _bios(self, rng):
    person = rng.choice(self.people)
    attr = rng.choice(bios.ATTRIBUTES)
    # Another person's value from the same group, so that no value says which group it came from; a group whose
    # people all share this value (a handful of people) borrows from the other group.
    pool = self.people if any(p[attr] != person[attr] for p in self.people) else self.both_groups
    if all(p[attr] == person[attr] for p in pool):
      raise ValueError(f"instructions: every bios person has {attr}={person[attr]!r}; a wrong answer needs another "
                       f"value (bios_n={self.cfg.bios_n} is too small)")
    wrong = person[attr]
    while wrong == person[attr]:
      wrong = rng.choice(pool)[attr]
    return Task("bios", bios.QUESTIONS[attr].format(name=person["name"]), person[attr], wrong,
                f"wrong {attr}", {"person": person["id"], "attr": attr})

  def _world(self, rng):
    rel = rng.choice(sorted(self.world_items))
    subject, value = rng.choice(self.world_items[rel])
    template = rng.choice((0, 1, 2)) if self.role == "train" else 3
    wrong = value
    while wrong == value:
      wrong = rng.choice(self.world_items[rel])[1]
    return Task("world", world.question(rel, subject, template), value, wrong, f"wrong {rel}",
                {"relation": rel, "subject": subject})

  def _arith(self, rng):
    a, op, b = rng.choice(self.problems)
    result = arith.solve(a, op, b)
    wrong_result = result + rng.choice((-10, -2, -1, 1, 2, 10, 100))
    if rng.random() >= self.cfg.arith_scratchpad_fraction:  # 0.5: the same draws as before the argument.
      user, answer = arith.prompt_text(a, op, b), str(result)
      wrong = str(wrong_result)
    else:
      user, answer = "Show your work. " + arith.prompt_text(a, op, b), arith.scratchpad(a, op, b)
      wrong = answer.rsplit("Answer: ", 1)[0] + f"Answer: {wrong_result}"
    return Task("arith", user, answer, wrong, "wrong result", {"a": a, "op": op, "b": b, "result": result})

  def _story(self, rng):
    openers = stories.TRAIN_OPENERS if self.role == "train" else stories.HELD_OUT_OPENERS
    opener, rest = stories.generate_story(rng, openers, self.story_people, 0.3)
    broken, why = _break_story(f"{opener} {rest}", rng, self.story_people)
    assert broken.startswith(opener + " "), (opener, broken)
    # The reply continues the opener the user gave rather than retelling it: a small model asked for a held-out
    # opener otherwise starts its reply with one of the openers it was trained on.
    return Task("story", rng.choice(STORY_REQUESTS).format(opener=opener), rest, broken[len(opener) + 1:], why,
                {"opener": opener})


@functools.lru_cache(maxsize=4)
def _arith_problems(min_digits: int = 2, max_digits: int = 3, n_train: int = 20000, n_validation: int = 1000,
                    ops: str = "+-"):
  return arith.problems(arith.ArithConfig(name="instructions", min_digits=min_digits, max_digits=max_digits,
                                          n_train=n_train, n_validation=n_validation, ops=ops))


def _break_story(story: str, rng: random.Random, people) -> tuple[str, str]:
  """The story with a false bios fact (if it states one) or with a goal left unresolved."""
  sentences = stories._SENTENCE.split(story)
  by_name = {p["name"]: p for p in people}
  for i, s in enumerate(sentences):
    readings = bios.parse_sentence(s) if i > 0 else []
    if readings and readings[0]["name"] in by_name:
      attr, value = readings[0]["attr"], readings[0]["value"]
      if all(p[attr] == value for p in people):
        continue  # Nobody has another value (a handful of people): another sentence, or a goal left open.
      wrong = value
      while wrong == value:
        wrong = rng.choice(people)[attr]
      sentences[i] = s.replace(value, wrong)
      return " ".join(sentences), "false bios fact"
  done = [i for i, s in enumerate(sentences) if stories._first_match(stories._DONE_RES, s)]
  del sentences[rng.choice(done)]
  return " ".join(sentences), "unresolved goal"


def _conversation(cfg: InstructionsConfig, maker: TaskMaker, rng: random.Random) -> tuple[list[dict], Task]:
  kinds = ("bios", "world", "arith", "story")
  weights = (cfg.w_bios, cfg.w_world, cfg.w_arith, cfg.w_story)
  messages = []
  if rng.random() < cfg.system_fraction:
    messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
  if rng.random() < cfg.multi_turn_fraction:
    earlier = maker.make(rng.choices(kinds, weights)[0], rng)
    messages += [{"role": "user", "content": earlier.user}, {"role": "assistant", "content": earlier.answer}]
  task = maker.make(rng.choices(kinds, weights)[0], rng)
  messages.append({"role": "user", "content": task.user})
  return messages, task


def _validate(cfg: InstructionsConfig):
  if min(cfg.w_bios, cfg.w_world, cfg.w_arith, cfg.w_story) < 0 or \
          cfg.w_bios + cfg.w_world + cfg.w_arith + cfg.w_story <= 0:
    raise ValueError("instructions: task weights w_bios, w_world, w_arith, w_story must be >= 0, sum > 0")
  if not 0.0 <= cfg.arith_scratchpad_fraction <= 1.0:
    raise ValueError(f"instructions: arith_scratchpad_fraction={cfg.arith_scratchpad_fraction} is not in [0, 1]")


def conversations(cfg: InstructionsConfig, split: str, salt: str) -> Iterator[tuple[list[dict], Task]]:
  _validate(cfg)
  role = "train" if split == "train" else "held_out"
  maker = TaskMaker(cfg, role)
  count = cfg.n_train if split == "train" else cfg.n_validation
  for i in range(count):
    yield _conversation(cfg, maker, random.Random(f"{salt}/{cfg.seed}/{split}/{i}"))


class LlmstagesInstructions(corpus.CorpusBuilder):
  """Chat-format instruction data (see the module docstring)."""

  # 1.1.0: a wrong bios value comes from the question's own people group. 1.2.0: a story reply continues the opener.
  VERSION = tfds.core.Version("1.2.0")

  CONFIG_CLASS = InstructionsConfig
  CONFIG_PREFIX = "n{n_train}_s{seed}_b{bios_n}"

  def metadata(self) -> dict:
    return {"corpus": "instructions", "chat_tokens": list(chat.CHAT_TOKENS), "arguments": self.kwargs}

  def split_records(self, split: str) -> Iterator[dict]:
    for i, (messages, task) in enumerate(conversations(self.builder_config, split, "instructions")):
      text = chat.format_chat(messages + [{"role": "assistant", "content": task.answer}])
      yield corpus.record(i, format="chat", text=text,
                          meta={"kind": task.kind, "answer": task.answer, **task.meta})


class LlmstagesPreferences(corpus.CorpusBuilder):
  """(prompt, chosen, rejected) triples (see the module docstring)."""

  # 1.1.0: a wrong bios value comes from the question's own people group. 1.2.0: a story reply continues the opener.
  VERSION = tfds.core.Version("1.2.0")

  CONFIG_CLASS = InstructionsConfig
  CONFIG_PREFIX = "n{n_train}_s{seed}_b{bios_n}"

  def metadata(self) -> dict:
    return {"corpus": "preferences", "chat_tokens": list(chat.CHAT_TOKENS), "arguments": self.kwargs}

  def split_records(self, split: str) -> Iterator[dict]:
    for i, (messages, task) in enumerate(conversations(self.builder_config, split, "preferences")):
      prompt = chat.format_chat(messages, add_generation_prompt=True)
      yield corpus.record(i, format="pref", prompt=prompt, completion=f" {task.answer}{chat.END}",
                          rejected=f" {task.wrong}{chat.END}",
                          meta={"kind": task.kind, "answer": task.answer, "why_rejected": task.why_wrong,
                                **task.meta})


sources.register_source("instructions", LlmstagesInstructions,
                        doc="chat tasks (fact QA, stories, arithmetic); loss on assistant")
sources.register_source("preferences", LlmstagesPreferences,
                        doc="(prompt, chosen, rejected); as LM documents prompt + chosen")
