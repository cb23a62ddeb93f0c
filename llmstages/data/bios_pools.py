"""The name and value pools of the `bios` corpus: synthetic syllable words for first, middle and last names,
cities, universities and employers, plus real majors; a function of the pool sizes only (see `bios`).
"""

from __future__ import annotations

import dataclasses
import random

_MAJORS = (
    "Accounting", "Aerospace Engineering", "African Studies", "Agricultural Science", "Anthropology",
    "Applied Mathematics", "Archaeology", "Architecture", "Art History", "Astronomy", "Biochemistry",
    "Bioengineering", "Biology", "Biomedical Engineering", "Biophysics", "Botany", "Business Administration",
    "Chemical Engineering", "Chemistry", "Civil Engineering", "Classics", "Cognitive Science",
    "Communications", "Comparative Literature", "Computer Engineering", "Computer Science", "Creative Writing",
    "Criminology", "Dance", "Data Science", "Dentistry", "Earth Sciences", "Ecology", "Economics", "Education",
    "Electrical Engineering", "English Literature", "Entomology", "Environmental Science", "Epidemiology",
    "Ethnomusicology", "Film Studies", "Finance", "Fine Arts", "Food Science", "Forestry", "French", "Genetics",
    "Geography", "Geology", "German", "Graphic Design", "Health Sciences", "History", "Hospitality Management",
    "Industrial Design", "Industrial Engineering", "Information Systems", "International Relations",
    "Journalism", "Kinesiology", "Landscape Architecture", "Linguistics", "Marine Biology", "Marketing",
    "Materials Science", "Mathematics", "Mechanical Engineering", "Medicine", "Meteorology", "Microbiology",
    "Music", "Neuroscience", "Nuclear Engineering", "Nursing", "Nutrition", "Oceanography", "Pharmacology",
    "Philosophy", "Physics", "Physiology", "Political Science", "Psychology", "Public Health",
    "Public Policy", "Religious Studies", "Robotics", "Social Work", "Sociology", "Software Engineering",
    "Spanish", "Statistics", "Supply Chain Management", "Theater", "Toxicology", "Urban Planning",
    "Veterinary Science", "Visual Arts", "Wildlife Biology", "Zoology")

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "fr", "gr", "kr", "pr", "sh", "st", "th", "tr", "bl", "gl", "sl", "sp")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "io")
_ENDINGS = {
    "first": ("a", "o", "en", "ie", "is", "an", "el", "ia", "on", "ar", "ine", "ette"),
    "middle": ("ley", "ric", "wyn", "ell", "ard", "ian", "ora", "isse", "ius", "ane"),
    "last": ("son", "ley", "er", "ton", "berg", "wood", "man", "ford", "ski", "ner", "well", "stein", "ridge"),
    "city": ("ton", "ville", "port", "field", "haven", "burg", "mouth", "dale", "bridge", "stead", "wick"),
    "univ": ("ia", "or", "um", "ell", "ack"),
    "employer": ("ex", "ix", "on", "ara", "ium", "ent", "ora"),
}
_UNIVERSITY_FORMS = ("University of {w}", "{w} University", "{w} Institute of Technology", "{w} College",
                     "{w} State University")
_EMPLOYER_FORMS = ("{w} Corporation", "{w} Industries", "{w} Labs", "{w} Systems", "{w} Group", "{w} Dynamics",
                   "{w} Holdings", "{w} Foods", "{w} Motors", "{w} Networks")


@dataclasses.dataclass(frozen=True)
class Pools:
  """Name and value pools; a function of the pool sizes only."""
  first: tuple[str, ...]
  middle: tuple[str, ...]
  last: tuple[str, ...]
  cities: tuple[str, ...]
  universities: tuple[str, ...]
  majors: tuple[str, ...]
  employers: tuple[str, ...]
  employer_city: tuple[int, ...]  # city index of each employer


def _words(kind: str, count: int, rng: random.Random, taken: set[str]) -> list[str]:
  """`count` distinct capitalized synthetic words of one flavour, disjoint from `taken` (updated)."""
  out: list[str] = []
  attempts = 0
  while len(out) < count:
    attempts += 1
    if attempts > 200 * count + 10000:
      raise ValueError(f"bios: cannot make {count} distinct {kind} words; use a smaller pool size")
    syllables = rng.choice((1, 2, 2, 2, 3)) if kind != "univ" else rng.choice((1, 2))
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    word = (word + rng.choice(_ENDINGS[kind])).capitalize()
    if word not in taken:
      taken.add(word)
      out.append(word)
  return out


def make_pools(cfg) -> Pools:
  """The pools for the sizes in `cfg` (a `bios.BiosConfig`; bios.py imports this module)."""
  rng = random.Random(f"bios-pools/{cfg.n_first}/{cfg.n_middle}/{cfg.n_last}/{cfg.n_cities}/"
                      f"{cfg.n_universities}/{cfg.n_majors}/{cfg.n_employers}")
  taken: set[str] = set()
  first = _words("first", cfg.n_first, rng, taken)
  middle = _words("middle", cfg.n_middle, rng, taken)
  last = _words("last", cfg.n_last, rng, taken)
  cities = _words("city", cfg.n_cities, rng, taken)
  univ_stems = _words("univ", cfg.n_universities, rng, taken)
  universities = [_UNIVERSITY_FORMS[i % len(_UNIVERSITY_FORMS)].format(w=w) for i, w in enumerate(univ_stems)]
  majors = list(_MAJORS[:cfg.n_majors])
  if cfg.n_majors > len(_MAJORS):
    majors += [f"{w} Studies" for w in _words("univ", cfg.n_majors - len(_MAJORS), rng, taken)]
  emp_stems = _words("employer", cfg.n_employers, rng, taken)
  employers = [_EMPLOYER_FORMS[i % len(_EMPLOYER_FORMS)].format(w=w) for i, w in enumerate(emp_stems)]
  employer_city = [rng.randrange(cfg.n_cities) for _ in range(cfg.n_employers)]
  return Pools(tuple(first), tuple(middle), tuple(last), tuple(cities), tuple(universities), tuple(majors),
               tuple(employers), tuple(employer_city))
