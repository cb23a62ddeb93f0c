"""The OpenAI-compatible server, driven by the official `openai` client against `python -m llmstages.serve` on
127.0.0.1 (a free port), serving the chat-tuned tiny model of the `chat_run` fixture."""

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
ASK = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]
# Prompts of 17 to 32 tokens and max_tokens <= 16 share the sampler's shapes, so the server compiles few times.
PROMPT = "<|system|> You add numbers.<|end|><|user|> What is 2 + 3?<|end|><|assistant|>"


@pytest.fixture(scope="module")
def server(chat_run, tmp_path_factory):
  """(base URL, log path) of a server process; always stopped at the end."""
  _, workdir, _, _ = chat_run
  port = free_port()
  log = tmp_path_factory.mktemp("serve") / "server.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "llmstages.serve", f"--workdir={workdir}", "--stage=instruct",
                             f"--port={port}", "--batch_window_ms=20", "--max_tokens=48", "--max_n=4"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "LLMSTAGES_API_KEY": KEY},
                            stdout=out, stderr=subprocess.STDOUT)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 120
    while True:
      assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
      try:
        if httpx.get(f"{base}/health", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.time() < deadline, f"the server did not start: {log.read_text()[-3000:]}"
      time.sleep(0.25)
    yield base, log
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, **kw):
  return client.chat.completions.create(**{"model": "instruct", "messages": ASK, "max_tokens": 16, **kw})


def test_models_and_health(server, client):
  assert [m.id for m in client.models.list().data] == ["instruct"]
  health = httpx.get(f"{server[0]}/health").json()
  assert health["status"] == "ok" and health["model"] == "instruct"


def test_temperature_zero_is_repeatable_and_stops_at_the_end_of_turn(client):
  first, second = _chat(client, temperature=0), _chat(client, temperature=0)
  text = first.choices[0].message.content
  assert text and text == second.choices[0].message.content
  assert "<|end|>" not in text and first.choices[0].finish_reason == "stop"  # The model learned to end its turn.
  assert first.usage.prompt_tokens > 5 and 0 < first.usage.completion_tokens < 16


def test_n_choices_come_back_and_a_seed_repeats_them(client):
  runs = [_chat(client, n=4, temperature=1.5, seed=7) for _ in range(2)]
  assert [c.index for c in runs[0].choices] == [0, 1, 2, 3]
  assert [c.message.content for c in runs[0].choices] == [c.message.content for c in runs[1].choices]
  other = _chat(client, n=4, temperature=1.5, seed=8)
  assert [c.message.content for c in other.choices] != [c.message.content for c in runs[0].choices]


def test_streaming_equals_non_streaming_at_temperature_zero(client):
  whole = _chat(client, temperature=0)
  chunks = list(_chat(client, temperature=0, stream=True))
  assert len(chunks) > 3 and chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  plain = client.completions.create(model="instruct", prompt=PROMPT, max_tokens=12, temperature=0)
  streamed = client.completions.create(model="instruct", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
  assert plain.usage.completion_tokens == 12 or plain.choices[0].finish_reason == "stop"


def test_stop_strings_cut_the_reply(client):
  whole = _chat(client, temperature=0).choices[0].message.content
  stop = whole[2:4]
  cut = _chat(client, temperature=0, stop=[stop]).choices[0]
  assert cut.message.content == whole[:whole.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("kw, error, status, param", [
    (dict(model="gpt-4"), openai.NotFoundError, 404, "model"),
    (dict(n=5), openai.BadRequestError, 400, "n"),
    (dict(max_tokens=49), openai.BadRequestError, 400, "max_tokens"),
    (dict(messages=[{"role": "user", "content": "1 + 1 " * 80}]), openai.BadRequestError, 400, "messages"),
    (dict(temperature=3), openai.UnprocessableEntityError, 422, "temperature"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), openai.UnprocessableEntityError, 422, "messages.0.role"),
    (dict(messages=[]), openai.UnprocessableEntityError, 422, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(client, kw, error, status, param):
  with pytest.raises(error) as e:
    _chat(client, **kw)
  body = e.value.response.json()["error"]
  assert e.value.status_code == status and body["param"] == param and body["type"] == "invalid_request_error"
  assert body["message"]
  assert _chat(client, temperature=0, max_tokens=2).choices[0].message.content is not None


def test_raw_http_errors(server):
  base, headers = server[0], {"Authorization": f"Bearer {KEY}"}
  r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers=headers)
  assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
  r = httpx.get(f"{base}/v1/engines", headers=headers)
  assert r.status_code == 404 and "no route GET /v1/engines" in r.json()["error"]["message"]


def test_a_missing_or_wrong_key_gets_401(server):
  r = httpx.get(f"{server[0]}/v1/models")
  assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="not-the-key", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    wrong.chat.completions.create(model="instruct", messages=ASK)


def test_eight_concurrent_requests_are_all_answered_in_shared_batches(server, client):
  prompts = [[ASK[0], {"role": "user", "content": f"What is {i} + {i}?"}] for i in range(8)]
  alone = [_chat(client, messages=m, temperature=0).choices[0].message.content for m in prompts]
  calls_before = httpx.get(f"{server[0]}/health").json()["sampler_calls"]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = list(pool.map(lambda m: _chat(client, messages=m, temperature=0).choices[0].message.content, prompts))
  assert together == alone  # Batching with other requests changes no reply.
  assert httpx.get(f"{server[0]}/health").json()["sampler_calls"] - calls_before < 8


def test_text_pieces_join_to_the_text_and_never_split_a_character(chat_run):
  from llmstages import inputs
  from llmstages.openai_api import text_deltas
  tok = inputs.tokenizer_for(chat_run[0])
  text = " 2 + 3 = 5 ✓ café 日本"  # Characters the tiny vocabulary lacks come as several byte-fallback tokens.
  ids = tok.encode(text) + [tok.eos_id, 9, 9]
  assert len(ids) > len(text.split()) + 3
  pieces, finish, used = text_deltas(tok, ids, [], (tok.eos_id,), lstrip=True)
  assert "".join(pieces) == text[1:] and finish == "stop" and used == len(ids) - 2
  assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5
  pieces, finish, used = text_deltas(tok, ids, ["= 5"], (tok.eos_id,), lstrip=False)
  assert "".join(pieces) == " 2 + 3 " and finish == "stop" and tok.decode(ids[:used]).endswith("= 5")
