"""Tests of the bios corpus: determinism, facts in text agree with the fact table, groups, info."""

import dataclasses
import importlib
import math

import pytest

from llmstages import data
from llmstages.data import bios, corpus, sources

SMALL = "n=60,n_first=20,n_middle=20,n_last=30,n_cities=15,n_universities=12,n_majors=10,n_employers=9,n_years=20"


def _records(spec: str, data_dir, split: str) -> list[dict]:
    builder = sources.corpus_builder(sources.parse_source(spec), str(data_dir))
    return list(corpus.iter_split(builder, split))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bios")


def test_no_tensorflow_needed():
    with pytest.raises(ImportError):
        importlib.import_module("tensorflow")


def test_same_config_twice_gives_identical_records(tmp_path):
    spec = f"bios({SMALL},format=multi_permute)"
    for split in ("train", "qa_test", "validation"):
        first = _records(spec, tmp_path / "a", split)
        second = _records(spec, tmp_path / "b", split)
        assert first == second and first
    # The raw storage order (array_record shuffles at build time) is reproducible as well.
    raw = [sources.open_source(spec, "train", str(tmp_path / d)) for d in ("a", "b")]
    assert [raw[0].record(i) for i in range(len(raw[0]))] == [raw[1].record(i) for i in range(len(raw[1]))]


def test_other_seed_gives_other_people(data_dir):
    a = data.source_info(f"bios({SMALL},seed=0)", str(data_dir))["facts"]
    b = data.source_info(f"bios({SMALL},seed=1)", str(data_dir))["facts"]
    assert len(a) == len(b)
    assert [p["name"] for p in a] != [p["name"] for p in b]
    texts_a = [r["text"] for r in _records(f"bios({SMALL},seed=0)", data_dir, "train")]
    texts_b = [r["text"] for r in _records(f"bios({SMALL},seed=1)", data_dir, "train")]
    assert texts_a != texts_b


@pytest.mark.parametrize("fmt", ["simple", "multi_permute", "fullname"])
def test_every_fact_in_text_agrees_with_table(data_dir, fmt):
    spec = f"bios({SMALL},format={fmt})"
    info = data.source_info(spec, str(data_dir))
    people = {p["id"]: p for p in info["facts"]}
    variants = {"simple": 1}.get(fmt, 5)
    for split, group in (("train", {"qa_train", "qa_test"}), ("new", {"new"}), ("validation", {"unseen"})):
        records = _records(spec, data_dir, split)
        per_person = {}
        for rec in records:
            person = people[rec["meta"]["person"]]
            assert person["group"] in group
            assert bios.check_bio(rec["text"], person) == [], rec["text"]
            sentences = bios.split_sentences(rec["text"])
            assert len(sentences) == len(bios.ATTRIBUTES)
            names_in = sum(person["name"] in s for s in sentences)
            assert names_in == (len(sentences) if fmt == "fullname" else 1)
            per_person.setdefault(person["id"], []).append(rec["text"])
        expected_variants = 1 if split == "validation" else variants
        assert all(len(v) == expected_variants for v in per_person.values())
        assert len(per_person) == sum(p["group"] in group for p in people.values())
        if fmt != "simple" and split == "train":  # fresh templates / order per variant
            assert sum(len(set(v)) > 1 for v in per_person.values()) >= 0.9 * len(per_person)
    for split, group in (("qa_train", "qa_train"), ("qa_test", "qa_test"), ("qa_new", "new"),
                         ("qa_unseen", "unseen")):
        records = _records(spec, data_dir, split)
        assert len(records) == len(bios.ATTRIBUTES) * sum(p["group"] == group for p in people.values())
        for rec in records:
            person = people[rec["meta"]["person"]]
            assert person["group"] == group
            assert person["name"] in rec["prompt"]
            assert rec["completion"] == " " + person[rec["meta"]["attr"]]


def test_checker_catches_wrong_facts(data_dir):
    info = data.source_info(f"bios({SMALL})", str(data_dir))
    person, other = info["facts"][0], info["facts"][1]
    text = bios.render_bio(person, "multi_permute", bios.bio_rng(0, 0, 0))
    assert bios.check_bio(text, person) == []
    for attr in ("birth_city", "university", "employer", "birth_date"):
        if person[attr] != other[attr]:
            assert bios.check_bio(text.replace(person[attr], other[attr]), person)
    assert bios.check_bio(text.replace(person["name"], other["name"]), person)  # wrong name
    assert bios.check_bio(text + " He likes tea.", person)  # unparsable sentence
    first_sentence = bios.split_sentences(text)[0]
    assert bios.check_bio(text.replace(first_sentence, ""), person)  # an attribute missing


def test_groups_and_info(data_dir):
    info = data.source_info(f"bios({SMALL})", str(data_dir))
    people = info["facts"]
    groups = [p["group"] for p in people]
    assert groups.count("qa_train") == groups.count("qa_test") == 30
    assert groups.count("new") == 15 and groups.count("unseen") == 15
    assert len({p["name"] for p in people}) == len(people)  # every person has a distinct name
    assert info["N"] == 60 and info["N0"] == 20 * 20 * 30
    assert info["S0"] == 12 * 28 * 20 * 15 * 12 * 10 * 9 * 2
    assert math.isclose(info["log2_S0"], math.log2(info["S0"]))
    assert info["splits"]["train"] == 60 and info["splits"]["qa_train"] == 30 * 6
    # Employer city is a function of the employer.
    city_of = {}
    for p in people:
        assert city_of.setdefault(p["employer"], p["employer_city"]) == p["employer_city"]
    # Never-seen people's names occur in no training text.
    train_text = " ".join(r["text"] for r in _records(f"bios({SMALL})", data_dir, "train"))
    assert not any(p["name"] in train_text for p in people if p["group"] in ("unseen", "new"))


def test_values_are_uniform_over_pools():
    cfg = bios.BiosConfig(name="x", n=4000, n_cities=10, n_majors=5)
    people = bios.make_people(cfg)
    counts = {}
    for p in people:
        counts[p["birth_city"]] = counts.get(p["birth_city"], 0) + 1
    assert len(counts) == 10
    expected = len(people) / 10
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="unknown argument"):
        data.source_info("bios(n=10,colour=red)", str(data_dir))
    with pytest.raises(ValueError, match="format"):
        data.source_info("bios(n=10,format=poem)", str(data_dir))
    with pytest.raises(ValueError, match="N0"):
        bios.make_people(dataclasses.replace(bios.BiosConfig(name="x"), n=100, n_first=2, n_middle=2, n_last=2))


@pytest.mark.parametrize("fmt", ["simple", "multi_permute", "fullname"])
def test_memorization_prefixes_are_the_training_text(data_dir, fmt):
    # bios_facts' memorization prompts: a person's first training biography cut before each value.
    spec = f"bios({SMALL},format={fmt})"
    info = data.source_info(spec, str(data_dir))
    assert info["format"] == fmt and info["seed"] == 0
    facts = {p["id"]: p for p in info["facts"]}
    first = {r["meta"]["person"]: r["text"] for r in _records(spec, data_dir, "train") if r["meta"]["variant"] == 0}
    assert len(first) == 60
    for pid, text in first.items():
        person = facts[pid]
        prefixes = bios.bio_prefixes(person, info["format"], bios.bio_rng(info["seed"], pid, 0))
        assert set(prefixes) == set(bios.ATTRIBUTES)
        for attr, prefix in prefixes.items():
            assert text.startswith(prefix + " " + person[attr]), (attr, prefix, text)
            assert not prefix.endswith(" ")
