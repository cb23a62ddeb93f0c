"""Tests of the SentencePiece tokenizer: fixed special ids, chat tokens, byte fallback, vocab cap, caching."""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest

from llmstages import data, inputs, load
from tests.conftest import write_chat_file
from tests.helpers import free_port, one_device_env

BIOS = "bios(n=40,n_first=20,n_middle=20,n_last=30)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(data_dir):
    return data.get_tokenizer([BIOS], 1000, data_dir)


def test_special_ids_and_chat_tokens(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.id_to_piece(3) == "<unk>"
    ids = [tok.token_id(t) for t in data.CHAT_TOKENS]
    assert ids == [4, 5, 6, 7]
    text = data.format_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    encoded = tok.encode(text)
    assert encoded[0] == tok.token_id("<|user|>") and encoded[-1] == tok.token_id("<|end|>")
    assert tok.token_id("<|assistant|>") in encoded
    with pytest.raises(KeyError):
        tok.token_id("<|nope|>")


@pytest.mark.parametrize("text", ["Plain text.", "  two  spaces\nnewline\ttab", "Ünïcödé 日本語 🙂",
                                  "12345+678=", "<|user|> q<|end|><|assistant|> a<|end|>"])
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text


def test_digits_are_split(tok):
    assert len(tok.encode("1234")) == 4


def test_vocab_never_exceeds_request_and_cache(data_dir, tok):
    big = data.get_tokenizer([BIOS], 32000, data_dir)  # far more than this corpus supports
    assert 264 < big.vocab_size <= 32000
    assert tok.vocab_size <= 1000
    start = time.time()
    again = data.get_tokenizer([BIOS], 1000, data_dir)
    assert time.time() - start < 1.0 and again.path == tok.path and os.path.exists(tok.path)
    assert again.encode("Some text here.") == tok.encode("Some text here.")
    other = data.get_tokenizer([BIOS], 800, data_dir)
    assert other.path != tok.path


def test_the_tokenizer_does_not_depend_on_the_machines_core_count(data_dir, tok, tmp_path, monkeypatch):
    for cores in (1, 4):  # SentencePiece trained on 1 and 2 threads gives two models of the same text.
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        again = data.get_tokenizer([BIOS], 1000, str(tmp_path / f"cores{cores}"))
        assert again.model_proto == tok.model_proto


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_size == tok.vocab_size and clone.encode("He was born.") == tok.encode("He was born.")


def test_errors(data_dir):
    with pytest.raises(ValueError, match="too small"):
        data.get_tokenizer([BIOS], 100, data_dir)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.get_tokenizer(["nope"], 1000, data_dir)


def test_a_workdir_keeps_the_tokenizer_its_stages_were_trained_with(chat_run, tmp_path):
    """The pipeline pins its tokenizer in the workdir; later readers of the workdir use that copy even where the
    data directory would give another one (a data directory rebuilt from other sources or on another version)."""
    c, workdir, _, _ = chat_run
    pinned = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(workdir, "tokenizer")) for f in files]
    assert [os.path.basename(p) for p in pinned] == ["spm.model"]
    with open(pinned[0], "rb") as f:
        proto = f.read()
    assert inputs.tokenizer_for(c).model_proto == proto  # The one the stage trained with.
    moved = shutil.copytree(workdir, tmp_path / "run")
    copy = [os.path.join(d, f) for d, _, files in os.walk(moved / "tokenizer") for f in files][0]
    other = data.get_tokenizer([f"chat:{write_chat_file(tmp_path / 'other.jsonl', n=3)}"], c.model.vocab_size,
                               str(tmp_path / "data"))
    other.save(copy)  # As if this workdir's stages had been trained with another tokenizer.
    assert load.load_stage(str(moved), "instruct").tokenizer.model_proto == other.model_proto != proto
    elsewhere = c.copy_and_resolve_references()
    elsewhere.data.dir = str(tmp_path / "empty")
    assert inputs.tokenizer_for(elsewhere, workdir).model_proto == proto
    assert not os.path.exists(tmp_path / "empty")  # Read from the workdir: nothing rebuilt.


TWO_HOSTS = """
import hashlib, sys
from llmstages import data, inputs, partitioning
partitioning.maybe_initialize_distributed(sys.argv[1], 2, int(sys.argv[2]), cpu_devices_per_process=1)
print("sha", hashlib.sha256(inputs._process_zero_tokenizer(data.Tokenizer.load(sys.argv[3])).model_proto).hexdigest())
"""


def test_every_process_tokenizes_with_process_zeros_tokenizer(data_dir, tok, tmp_path):
    """Hosts with their own data directories could each train a tokenizer; all must use process 0's."""
    other = data.get_tokenizer([BIOS], 600, data_dir)
    assert other.model_proto != tok.model_proto
    paths = [str(tmp_path / f"{i}.model") for i in range(2)]
    tok.save(paths[0])
    other.save(paths[1])
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, f"127.0.0.1:{port}", str(i), paths[i]],
                              env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    want = hashlib.sha256(tok.model_proto).hexdigest()
    assert [[line.split()[1] for line in out.splitlines() if line.startswith("sha ")] for out in outs] == [[want]] * 2
