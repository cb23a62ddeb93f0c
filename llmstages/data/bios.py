"""The `bios` corpus: N synthetic people with uniform, independent attributes (after Physics of LMs 3.1/3.3, bioS).

Owns the people table, biography rendering in three formats, QA pairs, the people groups (QA-train / QA-test /
new / never seen), a parser that reads facts back out of rendered text, the `LlmstagesBios` TFDS builder and its
source names (bios, bios_new, bios_qa, bios_qa_new, bios_qa_unseen). The name and value pools are `bios_pools`.

People. Names are first x middle x last, drawn without replacement from synthetic syllable pools of sizes
`n_first`, `n_middle`, `n_last` (N0 = their product). Each person has a pronoun (he/she) and six attributes:
birth date (month x day<=28 x year in 1900..1900+n_years-1), birth city, university, major, employer, and employer
city, which is a fixed function of the employer (so it carries no bits of its own). Values are uniform and
independent, so S0 = 12 * 28 * n_years * n_cities * n_universities * n_majors * n_employers * 2 (the last factor is
the pronoun). The pools depend only on their sizes, the people on `seed` as well.

Groups. People 0..n-1 are the pretraining people: the first half (by id; ids are random draws) are QA-train people,
the second half QA-test people. Then `n_new` people for continued pretraining and `n_unseen` people who never
appear in any training text (hallucination probes, and the LM validation split).

Formats. `simple`: one fixed biography per person (templates drawn once per person, canonical sentence order).
`multi_permute`: `variants` biographies per person (default 5), each with a fresh template per attribute and
shuffled sentence order; the name opens the first sentence and a pronoun starts the others. `fullname`: as
`multi_permute` with the full name in every sentence.

Splits. train: biographies of the n pretraining people. validation: biographies of the never-seen people.
new: biographies of the new people. qa_train / qa_test / qa_new / qa_unseen: one prompt/completion pair per
person of the group and attribute ("What is the birth city of F M L?" -> " Velmarton").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from llmstages.data import corpus, sources
from llmstages.data.bios_pools import Pools, make_pools

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")
# Attributes whose value carries bits (employer_city is a function of employer); pronoun is handled separately.
BIT_ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
FIRST_YEAR = 1900

# {S}: subject (full name or He/She); {P}: sentence-initial possessive (Name's / His / Her); {p}: his/her.
TEMPLATES = {
    "birth_date": ("{S} was born on {v}.", "{S} came into this world on {v}.", "{P} birthday is {v}.",
                   "{S} celebrates {p} birthday on {v}.", "{S} entered life on {v}.",
                   "{S} was brought into the world on {v}."),
    "birth_city": ("{S} was born in {v}.", "{S} spent {p} early years in {v}.", "{P} birthplace is {v}.",
                   "{S} was brought up in {v}.", "{S} hails from {v}.", "{S} originally comes from {v}."),
    "university": ("{S} studied at {v}.", "{S} graduated from {v}.", "{S} received {p} education at {v}.",
                   "{S} attended {v}.", "{P} alma mater is {v}.", "{S} completed {p} degree at {v}."),
    "major": ("{S} majored in {v}.", "{S} specialized in {v}.", "{P} field of study was {v}.",
              "{S} focused on {v} during {p} studies.", "{S} earned a degree in {v}.",
              "{S} completed a program in {v}."),
    "employer": ("{S} works for {v}.", "{S} is employed by {v}.", "{P} employer is {v}.",
                 "{S} has a job at {v}.", "{S} is on the staff of {v}.", "{S} earns a living at {v}."),
    "employer_city": ("{S} works in {v}.", "{S} is based in {v}.", "{P} workplace is located in {v}.",
                      "{S} commutes to work in {v}.", "{S} has {p} office in {v}.",
                      "{S} spends {p} working days in {v}."),
}
QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} study at?",
    "major": "What major did {name} study?",
    "employer": "Which company did {name} work for?",
    "employer_city": "Where did {name} work?",
}

@dataclasses.dataclass
class BiosConfig(tfds.core.BuilderConfig):
  n: int = 2000                  # pretraining people (QA-train + QA-test)
  seed: int = 0
  format: str = "simple"         # simple | multi_permute | fullname
  variants: int = -1             # biographies per person; -1: 1 for simple, 5 otherwise
  n_new: int = -1                # people for continued pretraining; -1: n // 4
  n_unseen: int = -1             # never-seen people; -1: max(1, n // 4)
  n_first: int = 400
  n_middle: int = 400
  n_last: int = 1000
  n_years: int = 200
  n_cities: int = 200
  n_universities: int = 300
  n_majors: int = 100
  n_employers: int = 263


def resolved_counts(cfg: BiosConfig) -> dict[str, int]:
  """Group sizes and variants with the -1 defaults filled in."""
  n_new = cfg.n // 4 if cfg.n_new < 0 else cfg.n_new
  n_unseen = max(1, cfg.n // 4) if cfg.n_unseen < 0 else cfg.n_unseen
  variants = (1 if cfg.format == "simple" else 5) if cfg.variants < 0 else cfg.variants
  return {"n": cfg.n, "n_new": n_new, "n_unseen": n_unseen, "variants": variants}


def value_counts(cfg: BiosConfig) -> dict[str, int]:
  return {"birth_month": 12, "birth_day": 28, "birth_year": cfg.n_years, "birth_city": cfg.n_cities,
          "university": cfg.n_universities, "major": cfg.n_majors, "employer": cfg.n_employers, "pronoun": 2}


def make_people(cfg: BiosConfig, pools: Pools | None = None) -> list[dict]:
  """The fact table: every person of every group, with attribute values as strings and indices."""
  if cfg.format not in ("simple", "multi_permute", "fullname"):
    raise ValueError(f"bios: format={cfg.format!r}; expected simple, multi_permute or fullname")
  pools = pools or make_pools(cfg)
  counts = resolved_counts(cfg)
  total = counts["n"] + counts["n_new"] + counts["n_unseen"]
  n0 = cfg.n_first * cfg.n_middle * cfg.n_last
  if total > n0:
    raise ValueError(f"bios: {total} people need at least that many names but N0 = {n0}")
  rng = np.random.default_rng([cfg.seed, 0xB105])
  name_ids = rng.choice(n0, size=total, replace=False)
  cols = {
      "month": rng.integers(12, size=total), "day": rng.integers(28, size=total),
      "year": rng.integers(cfg.n_years, size=total), "city": rng.integers(cfg.n_cities, size=total),
      "univ": rng.integers(cfg.n_universities, size=total), "major": rng.integers(cfg.n_majors, size=total),
      "employer": rng.integers(cfg.n_employers, size=total), "pronoun": rng.integers(2, size=total),
  }
  half = counts["n"] // 2
  people = []
  for pid in range(total):
    f, rest = divmod(int(name_ids[pid]), cfg.n_middle * cfg.n_last)
    m, l = divmod(rest, cfg.n_last)
    if pid < half:
      group = "qa_train"
    elif pid < counts["n"]:
      group = "qa_test"
    elif pid < counts["n"] + counts["n_new"]:
      group = "new"
    else:
      group = "unseen"
    month, day, year = int(cols["month"][pid]), int(cols["day"][pid]) + 1, FIRST_YEAR + int(cols["year"][pid])
    employer = int(cols["employer"][pid])
    people.append({
        "id": pid, "group": group,
        "name": f"{pools.first[f]} {pools.middle[m]} {pools.last[l]}",
        "first": pools.first[f], "middle": pools.middle[m], "last": pools.last[l],
        "pronoun": ("he", "she")[int(cols["pronoun"][pid])],
        "birth_date": f"{MONTHS[month]} {day}, {year}", "birth_month": month + 1, "birth_day": day,
        "birth_year": year,
        "birth_city": pools.cities[int(cols["city"][pid])],
        "university": pools.universities[int(cols["univ"][pid])],
        "major": pools.majors[int(cols["major"][pid])],
        "employer": pools.employers[employer],
        "employer_city": pools.cities[pools.employer_city[employer]],
    })
  return people


def _fill(template: str, person: dict, use_name: bool) -> str:
  he = person["pronoun"] == "he"
  subject = person["name"] if use_name else ("He" if he else "She")
  possessive = person["name"] + "'s" if use_name else ("His" if he else "Her")
  return (template.replace("{S}", subject).replace("{P}", possessive).replace("{p}", "his" if he else "her"))


def bio_sentences(person: dict, fmt: str, rng: random.Random) -> list[tuple[str, str]]:
  """(attribute, sentence) pairs of one biography of `person` in format `fmt`, in order, using `rng`."""
  choice = {a: rng.randrange(len(TEMPLATES[a])) for a in ATTRIBUTES}
  order = list(ATTRIBUTES)
  if fmt != "simple":
    rng.shuffle(order)
  return [(attr, _fill(TEMPLATES[attr][choice[attr]], person, use_name=(k == 0 or fmt == "fullname")))
          for k, attr in enumerate(order)]


def render_bio(person: dict, fmt: str, rng: random.Random) -> str:
  """One biography of `person` in format `fmt` using randomness from `rng`."""
  return " ".join(s.replace("{v}", person[attr]) for attr, s in bio_sentences(person, fmt, rng))


def bio_prefixes(person: dict, fmt: str, rng: random.Random) -> dict[str, str]:
  """attribute -> the biography `render_bio(person, fmt, rng)` up to that attribute's value (no trailing space)."""
  out, done = {}, []
  for attr, sentence in bio_sentences(person, fmt, rng):
    out[attr] = " ".join(done + [sentence.split("{v}", 1)[0]]).rstrip()
    done.append(sentence.replace("{v}", person[attr]))
  return out


def bio_rng(seed: int, person_id: int, variant: int) -> random.Random:
  return random.Random(f"bios-render/{seed}/{person_id}/{variant}")


def qa_pair(person: dict, attr: str) -> tuple[str, str]:
  """(prompt, completion) for one person and attribute; the completion starts with a space, no period."""
  return QUESTIONS[attr].format(name=person["name"]), " " + person[attr]


# --- reading facts back out of text ----------------------------------------------------------------------------
_NAME = r"[A-Z][a-z]+ [A-Z][a-z]+ [A-Z][a-z]+"


def _template_regex(template: str) -> re.Pattern:
  pattern = re.escape(template)
  pattern = (pattern.replace(re.escape("{S}"), rf"(?P<S>He|She|{_NAME})")
             .replace(re.escape("{P}"), rf"(?P<P>His|Her|{_NAME}'s)")
             .replace(re.escape("{p}"), r"(?P<p>his|her)")
             .replace(re.escape("{v}"), r"(?P<v>[^.]+)"))
  return re.compile("^" + pattern + "$")


_PARSERS = [(attr, _template_regex(t)) for attr in ATTRIBUTES for t in TEMPLATES[attr]]
_SENTENCE_SPLIT = re.compile(r"(?<=\.)\s+(?=[A-Z])")


def parse_sentence(sentence: str) -> list[dict]:
  """All readings of one bios-template sentence: dicts with attr, value, subject, and pronoun evidence."""
  readings = []
  for attr, regex in _PARSERS:
    m = regex.match(sentence.strip())
    if not m:
      continue
    groups = m.groupdict()
    subject = groups.get("S") or groups.get("P")
    pronouns = set()
    if subject in ("He", "His"):
      pronouns.add("he")
      subject = None
    elif subject in ("She", "Her"):
      pronouns.add("she")
      subject = None
    elif subject.endswith("'s"):
      subject = subject[:-2]
    if groups.get("p"):
      pronouns.add("he" if groups["p"] == "his" else "she")
    readings.append({"attr": attr, "value": groups["v"], "name": subject, "pronouns": pronouns})
  return readings


def split_sentences(text: str) -> list[str]:
  return [s for s in _SENTENCE_SPLIT.split(text.strip()) if s]


def check_bio(text: str, person: dict) -> list[str]:
  """Problems found when reading `text` as a biography of `person` (empty list: every fact agrees).

  Every sentence must parse as a bios template, name `person` or use a pronoun, state the table's value of its
  attribute, and use `person`'s pronoun; every attribute must be stated."""
  problems, seen = [], set()
  for sentence in split_sentences(text):
    readings = parse_sentence(sentence)
    if not readings:
      problems.append(f"unparsed sentence: {sentence!r}")
      continue
    good = [r for r in readings if r["value"] == person[r["attr"]]]
    if not good:
      problems.append(f"wrong value in {sentence!r}: table says "
                      + ", ".join(f"{r['attr']}={person[r['attr']]!r}" for r in readings))
      continue
    r = good[0]
    if r["name"] is not None and r["name"] != person["name"]:
      problems.append(f"wrong name in {sentence!r}")
    if r["pronouns"] - {person["pronoun"]}:
      problems.append(f"wrong pronoun in {sentence!r}")
    seen.add(r["attr"])
  missing = set(ATTRIBUTES) - seen
  if missing:
    problems.append(f"attributes not stated: {sorted(missing)}")
  return problems


class LlmstagesBios(corpus.CorpusBuilder):
  """Synthetic biographies and QA pairs (see the module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "metadata names the format and seed (evaluators re-render training biographies)"}
  CONFIG_CLASS = BiosConfig
  CONFIG_PREFIX = "{format}_n{n}_s{seed}"
  SPLITS = ("train", "validation", "new", "qa_train", "qa_test", "qa_new", "qa_unseen")

  @functools.cached_property
  def _people(self) -> list[dict]:
    return make_people(self.builder_config)

  def metadata(self) -> dict:
    return bios_info(self.builder_config, self._people)

  def split_records(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    counts = resolved_counts(cfg)
    people = self._people
    if split in ("train", "validation", "new"):
      group = {"train": ("qa_train", "qa_test"), "validation": ("unseen",), "new": ("new",)}[split]
      variants = 1 if split == "validation" else counts["variants"]
      index = 0
      for person in people:
        if person["group"] not in group:
          continue
        for v in range(variants):
          text = render_bio(person, cfg.format, bio_rng(cfg.seed, person["id"], v))
          yield corpus.record(index, format="text", text=text,
                              meta={"person": person["id"], "variant": v})
          index += 1
    else:
      group = {"qa_train": "qa_train", "qa_test": "qa_test", "qa_new": "new", "qa_unseen": "unseen"}[split]
      index = 0
      for person in people:
        if person["group"] != group:
          continue
        for attr in ATTRIBUTES:
          prompt, completion = qa_pair(person, attr)
          yield corpus.record(index, format="pc", prompt=prompt, completion=completion,
                              meta={"person": person["id"], "attr": attr})
          index += 1


def bios_info(cfg: BiosConfig, people: list[dict] | None = None) -> dict:
  """Everything an evaluator needs: fact table, N0, S0, value counts, groups, templates."""
  people = people if people is not None else make_people(cfg)
  counts = value_counts(cfg)
  n0 = cfg.n_first * cfg.n_middle * cfg.n_last
  s0 = math.prod(counts.values())
  return {
      "corpus": "bios", "N": cfg.n, "N0": n0, "S0": s0, "format": cfg.format, "seed": cfg.seed,
      "log2_N0": float(np.log2(n0)), "log2_S0": float(sum(np.log2(v) for v in counts.values())),
      "value_counts": counts, **{k: v for k, v in resolved_counts(cfg).items() if k != "n"},
      "attributes": list(ATTRIBUTES), "bit_attributes": list(BIT_ATTRIBUTES),
      "questions": dict(QUESTIONS), "templates": {a: list(t) for a, t in TEMPLATES.items()},
      "facts": people,
  }


sources.register_source("bios", LlmstagesBios, train="train", validation="validation",
                        doc="biographies of the N pretraining people; validation: never-seen people's biographies")
sources.register_source("bios_new", LlmstagesBios, train="new", validation="validation",
                        doc="biographies of the new people (continued pretraining)")
sources.register_source("bios_qa", LlmstagesBios, train="qa_train", validation="qa_test",
                        doc="QA prompt/completion pairs: QA-train people; validation: QA-test people (extraction)")
sources.register_source("bios_qa_new", LlmstagesBios, train="qa_new", validation="qa_new",
                        doc="QA pairs about the new people")
sources.register_source("bios_qa_unseen", LlmstagesBios, train="qa_unseen", validation="qa_unseen",
                        doc="QA pairs about never-seen people (hallucination probes)")
