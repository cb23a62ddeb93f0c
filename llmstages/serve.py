r"""An OpenAI-compatible HTTP server for a finished stage.

  python -m llmstages.serve --workdir=DIR --stage=STAGE [--host=127.0.0.1 --port=8000 --api_key=KEY]
      [--max_prompt_tokens=N --max_tokens=N --max_n=8 --max_batch_rows=32 --batch_window_ms=20]

Serves `llmstages.openai_api.create_app` (endpoints, limits, errors and streaming are described there) with
uvicorn: `/v1/models`, `/v1/chat/completions` (the model's chat template), `/v1/completions` and `/health`.

With `--api_key` (or env LLMSTAGES_API_KEY) every /v1 request needs `Authorization: Bearer KEY` (401 otherwise).
Limits: prompt tokens, max_tokens, n and rows per sampler call, below; the body is capped at 1 MiB.
"""

from __future__ import annotations

import os

import uvicorn
from absl import app as absl_app
from absl import flags

from llmstages import cli
from llmstages import load
from llmstages.openai_api import Limits, create_app

_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline's workdir (holds config.json and the stages).")
_STAGE = flags.DEFINE_string("stage", None, "Which stage's final parameters to serve (also the model id).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' (default: env "
                               "LLMSTAGES_API_KEY; unset: no key).")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 0, "Longest prompt accepted (0: the context minus 1).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "Largest max_tokens accepted (capped by the context).")
_MAX_N = flags.DEFINE_integer("max_n", 8, "Largest n accepted.")
_MAX_ROWS = flags.DEFINE_integer("max_batch_rows", 32, "Sequences per sampler call (and per request).")
_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 20.0, "How long the batcher waits for more requests.")


def main(argv):
  del argv
  if not _WORKDIR.value or not _STAGE.value:
    raise absl_app.UsageError("--workdir and --stage are required")
  loaded = load.load_stage(_WORKDIR.value, _STAGE.value, needed_by=f"serve --stage={_STAGE.value}")
  context = loaded.sampler.cfg.max_seq_len
  limits = Limits(max_prompt_tokens=min(_MAX_PROMPT.value or context - 1, context - 1),
                  max_tokens=min(_MAX_TOKENS.value, context - 1), max_n=_MAX_N.value)
  api_key = _API_KEY.value or os.environ.get("LLMSTAGES_API_KEY") or None
  app = create_app(loaded, limits, api_key=api_key, max_rows=_MAX_ROWS.value, window_ms=_WINDOW_MS.value)
  print(f"serving {loaded.stage!r} of {_WORKDIR.value} on http://{_HOST.value}:{_PORT.value}/v1 "
        f"({'API key required' if api_key else 'no API key'}; {limits})", flush=True)
  uvicorn.run(app, host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
  cli.run(main)
