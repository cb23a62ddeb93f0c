r"""Serving benchmark: completion tokens/s and request latency (p50/p95) of `llmstages.serve` under 1 and 8
concurrent clients.

  python -m llmstages.bench_serve --workdir=DIR --stage=STAGE [--clients=1,8 --requests=32 --max_tokens=64
      --temperature=0.8 --prompt_tokens=24 --batch_window_ms=20]

Starts the server in this process on a free 127.0.0.1 port (the same app `python -m llmstages.serve` runs) and
drives it over HTTP: each client thread sends `/v1/completions` requests one after another, `--requests` in all
per concurrency level. One untimed round per level compiles that level's shapes first. Tokens/s counts the
completion tokens the server reports (`usage.completion_tokens`) over the wall time of the timed round; rows per
sampler call shows how much the batcher grouped.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import numpy as np
import uvicorn
from absl import app, flags

from llmstages import cli
from llmstages import load, openai_api

_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline's workdir.")
_STAGE = flags.DEFINE_string("stage", None, "The stage to serve.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8"], "Concurrency levels.")
_REQUESTS = flags.DEFINE_integer("requests", 32, "Timed requests per concurrency level.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "max_tokens of every request.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature of every request.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 24, "Roughly this many prompt tokens per request.")
_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 20.0, "The server's batching window (serve --batch_window_ms).")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
flags.mark_flags_as_required(["workdir", "stage"])


def start_server(fastapi_app) -> tuple[uvicorn.Server, threading.Thread, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(fastapi_app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  return server, thread, f"http://127.0.0.1:{port}"


def run_level(base: str, model: str, clients: int, requests: int, prompts: list[str]) -> dict:
  """Latencies and tokens of `requests` requests from `clients` threads, each sending one at a time."""
  body = {"model": model, "max_tokens": _MAX_TOKENS.value, "temperature": _TEMPERATURE.value}
  latencies, tokens = [], []
  lock = threading.Lock()

  def worker(k: int):
    with httpx.Client(base_url=base, timeout=600) as http:
      for i in range(k, requests, clients):
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json={**body, "prompt": prompts[i % len(prompts)]})
        r.raise_for_status()
        with lock:
          latencies.append(time.perf_counter() - t0)
          tokens.append(r.json()["usage"]["completion_tokens"])

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(worker, range(clients)))
  wall = time.perf_counter() - t0
  return {"clients": clients, "requests": requests, "completion_tokens": int(sum(tokens)), "seconds": wall,
          "tokens_per_s": sum(tokens) / wall, "p50_s": float(np.percentile(latencies, 50)),
          "p95_s": float(np.percentile(latencies, 95)), "mean_tokens": float(np.mean(tokens))}


def main(argv):
  del argv
  loaded = load.load_stage(_WORKDIR.value, _STAGE.value, needed_by="bench_serve")
  context = loaded.sampler.cfg.max_seq_len
  limits = openai_api.Limits(max_prompt_tokens=context - 1, max_tokens=context - 1, max_n=8)
  fastapi_app = openai_api.create_app(loaded, limits, window_ms=_WINDOW_MS.value)
  batcher = fastapi_app.state.service.batcher
  server, thread, base = start_server(fastapi_app)
  words = "the of a an to in is on at by for with".split()
  prompts = [" ".join(words[(i + j) % len(words)] for j in range(_PROMPT_TOKENS.value)) for i in range(64)]
  rows = []
  try:
    for c in map(int, _CLIENTS.value):
      run_level(base, loaded.stage, c, 2 * c, prompts)  # Compiles this level's shapes.
      calls, served = sum(batcher.calls.values()), batcher.rows_served
      row = run_level(base, loaded.stage, c, _REQUESTS.value, prompts)
      row["sampler_calls"] = sum(batcher.calls.values()) - calls
      row["rows_per_call"] = (batcher.rows_served - served) / max(row["sampler_calls"], 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
  finally:
    server.should_exit = True
    thread.join(timeout=30)
  mc = loaded.sampler.cfg
  print(f"\n{loaded.stage} of {_WORKDIR.value}: d_model={mc.d_model}, layers={mc.num_layers}, vocab={mc.vocab_size}; "
        f"max_tokens={_MAX_TOKENS.value}, temperature={_TEMPERATURE.value}, batch window {_WINDOW_MS.value} ms")
  print("| clients | requests | tokens/s | p50 latency (s) | p95 latency (s) | mean tokens | rows per sampler call |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
          f"{r['mean_tokens']:.1f} | {r['rows_per_call']:.1f} |")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
