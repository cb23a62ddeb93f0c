"""The OpenAI-compatible HTTP API of a loaded stage (`create_app`), which `python -m llmstages.serve` runs.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (messages rendered with the model's chat template,
`llmstages.data.chat.format_chat`), `POST /v1/completions`, `GET /health`. Sampling: temperature, top_p,
max_tokens (or max_completion_tokens), n, stop, seed, stream (server-sent events, as OpenAI's). Requests go
through `llmstages.batching.Batcher`, which batches concurrent requests onto the KV-cache sampler.

With an API key every /v1 request needs `Authorization: Bearer KEY` (401 otherwise). Bounded: body size (1 MiB),
prompt tokens, max_tokens, n, and rows per sampler call. Errors are OpenAI-shaped,
`{"error": {"message", "type", "param", "code"}}`: 422 for a body that does not parse or fails the schema,
400 for values past the server's limits, 404 for an unknown model or route, 401 for a missing or wrong key.

Streaming sends one chunk per token in OpenAI's format, but the decode is one jitted loop, so the chunks leave
when the whole completion is done: time to first token equals the request's latency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from typing import Literal

import fastapi
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstages import batching
from llmstages.data import chat

MAX_BODY_BYTES = 1 << 20

class APIError(Exception):
  """An error the client caused (or a missing model), returned as OpenAI's JSON error."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(status, message, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
  return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# --- request schemas (fields OpenAI's clients send; unknown fields are ignored, as OpenAI's server does) -------
class Message(pydantic.BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str


class Sampling(pydantic.BaseModel):
  model: str
  temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  max_tokens: int | None = pydantic.Field(None, ge=1)
  n: int = pydantic.Field(1, ge=1)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False

  def stops(self) -> list[str]:
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
      raise APIError(400, "stop: up to 4 non-empty strings", "stop")
    return stops


class ChatRequest(Sampling):
  messages: list[Message] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=1)


class CompletionRequest(Sampling):
  prompt: str | list[str]
  max_tokens: int | None = pydantic.Field(16, ge=1)  # OpenAI's default for /v1/completions.


@dataclasses.dataclass(frozen=True)
class Limits:
  max_prompt_tokens: int
  max_tokens: int
  max_n: int = 8


# --- turning tokens into text -----------------------------------------------------------------------------------
def text_deltas(tok, ids: list[int], stops: list[str], end_ids: tuple[int, ...], lstrip: bool):
  """(text pieces, finish_reason, completion tokens used) of one generated row.

  The text ends at the first end token (EOS, or `<|end|>` for chat) or before the first stop string. It is then
  cut into one piece per token that completes more of it (a piece waits while a token ends inside a UTF-8
  character), so streamed chunks join to exactly the non-streamed text. `lstrip`: drop the one space the chat
  template puts before a reply."""
  strip = (lambda s: s[1:] if s.startswith(" ") else s) if lstrip else (lambda s: s)
  used, finish, counted = len(ids), "length", len(ids)
  for i, t in enumerate(ids):
    if t in end_ids:
      used, finish, counted = i, "stop", i + 1
      break
  text = strip(tok.decode(ids[:used]))
  cuts = [text.find(s) for s in stops if s in text]
  if cuts:
    text, finish = text[:min(cuts)], "stop"
  pieces, emitted = [], 0
  for i in range(1, used + 1):
    prefix = strip(tok.decode(ids[:i]))
    if cuts and any(s in prefix for s in stops):
      counted = i  # The token that completed the stop string.
      break
    if prefix.endswith("\ufffd"):
      continue
    k = min(len(prefix), len(text))
    if k > emitted:
      pieces.append(text[emitted:k])
      emitted = k
  if emitted < len(text):
    pieces.append(text[emitted:])
  return pieces, finish, counted


# --- the service ------------------------------------------------------------------------------------------------
class Service:
  """Request checks and generation for one loaded stage (the HTTP layer below only routes and shapes JSON)."""

  def __init__(self, loaded, limits: Limits, batcher: batching.Batcher):
    self.loaded, self.limits, self.batcher = loaded, limits, batcher
    self.tok = loaded.tokenizer
    self.model_id = loaded.stage
    self.context = loaded.sampler.cfg.max_seq_len
    self.chat_end_ids = (self.tok.eos_id, self.tok.token_id(chat.END))
    self.created = int(time.time())

  def check_model(self, model: str):
    if model != self.model_id:
      raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_id!r}", "model",
                     "model_not_found")

  def budget(self, ids: list[int], max_tokens: int | None, param: str) -> int:
    """The new-token budget of a prompt of `ids`, within the server's limits and the model's context."""
    if len(ids) > self.limits.max_prompt_tokens:
      raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                     f"{self.limits.max_prompt_tokens}", param, "context_length_exceeded")
    if max_tokens is not None and max_tokens > self.limits.max_tokens:
      raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {self.limits.max_tokens}",
                     "max_tokens")
    room = self.context - len(ids)
    wanted = max_tokens if max_tokens is not None else min(self.limits.max_tokens, room)
    if wanted > room or room < 1:
      raise APIError(400, f"the prompt's {len(ids)} tokens plus max_tokens={wanted} exceed the model's context of "
                     f"{self.context} tokens", param, "context_length_exceeded")
    return wanted

  async def generate(self, prompts: list[list[int]], req: Sampling, max_new: int) -> list[batching.Generation]:
    """n generations per prompt, prompt-major."""
    if req.n > self.limits.max_n:
      raise APIError(400, f"n={req.n} exceeds this server's limit of {self.limits.max_n}", "n")
    rows = [ids for ids in prompts for _ in range(req.n)]
    if len(rows) > self.batcher.max_rows:
      raise APIError(400, f"{len(prompts)} prompts x n={req.n} = {len(rows)} sequences exceed this server's "
                     f"limit of {self.batcher.max_rows} per request", "n")
    request = batching.Request(rows=rows, max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                               seed=req.seed)
    return await asyncio.wrap_future(self.batcher.submit(request))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _sse(chunks):
  for chunk in chunks:
    yield f"data: {json.dumps(chunk)}\n\n"
  yield "data: [DONE]\n\n"


def _chat_chunks(base: dict, outs):
  for i, (pieces, finish, _) in enumerate(outs):
    yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                "logprobs": None}]}
    for piece in pieces:
      yield {**base, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None,
                                  "logprobs": None}]}
    yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": finish, "logprobs": None}]}


def _completion_chunks(base: dict, outs):
  for i, (pieces, finish, _) in enumerate(outs):
    for piece in pieces:
      yield {**base, "choices": [{"index": i, "text": piece, "finish_reason": None, "logprobs": None}]}
    yield {**base, "choices": [{"index": i, "text": "", "finish_reason": finish, "logprobs": None}]}


def _install_errors(app: fastapi.FastAPI):
  @app.exception_handler(APIError)
  async def api_error(_, e: APIError):
    return error_response(e.status, e.message, e.param, e.code, e.type)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return error_response(422, f"{param or 'body'}: {first.get('msg')}", param, "invalid_value")

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, e: StarletteHTTPException):
    message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
    return error_response(e.status_code, message, None, "unknown_url" if e.status_code == 404 else None)

  @app.exception_handler(Exception)
  async def crash(_, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error")


def _install_guard(app: fastapi.FastAPI, api_key: str | None):
  """The API key check and the body-size cap of every /v1 request."""
  @app.middleware("http")
  async def guard(request: fastapi.Request, call_next):
    if request.url.path.startswith("/v1"):
      given = request.headers.get("authorization", "")
      if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return error_response(401, "missing or wrong API key: send Authorization: Bearer KEY", None,
                              "invalid_api_key")
      size = request.headers.get("content-length")
      if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        return error_response(413, f"request body of {size} bytes exceeds {MAX_BODY_BYTES}", None,
                              "request_too_large")
    return await call_next(request)


def create_app(loaded, limits: Limits, *, api_key: str | None = None, max_rows: int = 32,
               window_ms: float = 20.0) -> fastapi.FastAPI:
  """The FastAPI app serving `loaded` (a `llmstages.load.LoadedStage`)."""
  batcher = batching.Batcher(loaded.sampler, loaded.params, bos_id=loaded.tokenizer.bos_id, max_rows=max_rows,
                             window_ms=window_ms)
  svc = Service(loaded, limits, batcher)
  app = fastapi.FastAPI(title="llmstages", on_shutdown=[batcher.close])
  app.state.service = svc
  _install_errors(app)

  _install_guard(app, api_key)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": svc.model_id, "queued": batcher.pending(),
            "sampler_calls": sum(batcher.calls.values()), "shapes": len(batcher.calls)}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": svc.model_id, "object": "model", "created": svc.created,
                                        "owned_by": "llmstages"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest):
    svc.check_model(req.model)
    stops = req.stops()
    conversation = chat.format_chat([m.model_dump() for m in req.messages], add_generation_prompt=True)
    ids = chat.encode_prompt(svc.tok, conversation)
    max_new = svc.budget(ids, req.max_completion_tokens or req.max_tokens, "messages")
    gens = await svc.generate([ids], req, max_new)
    outs = [text_deltas(svc.tok, g.tokens, stops, svc.chat_end_ids, lstrip=True) for g in gens]
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.model_id}
    if req.stream:
      return StreamingResponse(_sse(_chat_chunks({**base, "object": "chat.completion.chunk"}, outs)),
                               media_type="text/event-stream")
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(p)}, "finish_reason": f,
                "logprobs": None} for i, (p, f, _) in enumerate(outs)]
    return {**base, "object": "chat.completion", "choices": choices,
            "usage": _usage(len(ids), sum(n for _, _, n in outs))}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest):
    svc.check_model(req.model)
    stops = req.stops()
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not texts:
      raise APIError(400, "prompt: give a string or a non-empty list of strings", "prompt")
    prompts = [chat.encode_prompt(svc.tok, t) for t in texts]
    max_new = min(svc.budget(ids, req.max_tokens, "prompt") for ids in prompts)
    gens = await svc.generate(prompts, req, max_new)
    outs = [text_deltas(svc.tok, g.tokens, stops, (svc.tok.eos_id,), lstrip=False) for g in gens]
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.model_id,
            "object": "text_completion"}
    if req.stream:
      return StreamingResponse(_sse(_completion_chunks(base, outs)), media_type="text/event-stream")
    choices = [{"index": i, "text": "".join(p), "finish_reason": f, "logprobs": None}
               for i, (p, f, _) in enumerate(outs)]
    return {**base, "choices": choices, "usage": _usage(sum(map(len, prompts)), sum(n for _, _, n in outs))}

  return app

