"""A batching queue in front of the KV-cache sampler: requests that arrive within a few milliseconds of each other
become one `Sampler.generate` call, padded to bucketed shapes so that serving does not recompile per request.

Shapes: the sampler already buckets prompt length (powers of two from 16). Here the row count is padded to 1 or
a power of two from 8 (padding rows are a lone BOS and are thrown away), and the decode loop is compiled for the
group's largest `max_new_tokens` rounded up to a power of two from 16 (capped by the model's context) but stops at
that largest count; each request's tokens are then cut at its own `max_new_tokens`. So a server sees a handful of
compiles (rows x prompt bucket x token bucket), all of them on the first few requests.

Grouping: one sampler call shares temperature, top-p and top-k (they are scalars of the jitted decode), so
requests are grouped by them. A request with an explicit seed at temperature > 0 runs alone, so that the same
seed gives the same samples whatever else is in flight; at temperature 0 (argmax) rows do not interact and
requests of any seed share a call.

Waiting: a round takes every queued request, then waits up to `window_ms` for more only while it holds fewer
requests than were in flight together during the last 16 rounds: a lone client never waits, and clients that
were just answered (about to send again) are regrouped with the rest instead of alternating in half batches.

One worker thread owns the sampler (JAX calls are not interleaved); callers get a `concurrent.futures.Future`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import random
import threading
import time

import numpy as np

from llmstages.sampler import bucket_length


def row_bucket(n: int) -> int:
  """Rows of a sampler call: 1 for a lone request, else a power of two from 8 (few shapes, each compiled once)."""
  return 1 if n == 1 else max(8, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class Request:
  """One client request: `rows` token prompts (a prompt repeated n times for n choices)."""
  rows: list[list[int]]
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

  @property
  def group_key(self):
    alone = self.seed is not None and self.temperature > 0
    return (self.temperature, self.top_p, self.top_k, id(self) if alone else None)


@dataclasses.dataclass
class Generation:
  """One row's generated tokens (EOS included if it stopped there) and whether it stopped at EOS."""
  tokens: list[int]
  stopped: bool


class Batcher:
  """Groups concurrent requests into sampler calls on one worker thread (see the module docstring)."""

  def __init__(self, sampler, params, *, bos_id: int, max_rows: int = 32, window_ms: float = 20.0):
    self.sampler, self.params, self.bos_id = sampler, params, bos_id
    self.max_rows, self.window_s = max_rows, window_ms / 1000.0
    self.context = sampler.cfg.max_seq_len
    self._queue: queue.Queue = queue.Queue()
    self._rng = random.Random(0)
    self._stopping = False
    # Requests submitted and not yet answered: the most seen during each of the last rounds. A round waits for
    # up to that many, so clients that were just answered (about to send again) are regrouped with the others.
    self._lock = threading.Lock()
    self._outstanding = self._peak = 0
    self._recent_peaks: collections.deque = collections.deque([1], maxlen=16)
    self.calls = collections.Counter()  # (rows, prompt bucket, token bucket) -> sampler calls: shapes seen.
    self.rows_served = 0  # Real (unpadded) rows over all calls.
    self._thread = threading.Thread(target=self._loop, name="llmstages-batcher", daemon=True)
    self._thread.start()

  def submit(self, request: Request) -> concurrent.futures.Future:
    if len(request.rows) > self.max_rows:
      raise ValueError(f"a request of {len(request.rows)} rows exceeds the batch limit of {self.max_rows} rows")
    with self._lock:
      self._outstanding += 1
      self._peak = max(self._peak, self._outstanding)
    request.future.add_done_callback(self._answered)
    self._queue.put(request)
    return request.future

  def _answered(self, _):
    with self._lock:
      self._outstanding -= 1

  def pending(self) -> int:
    return self._queue.qsize()

  def close(self):
    self._stopping = True
    self._queue.put(None)
    self._thread.join(timeout=30)

  def _collect(self, carry: list[Request]) -> list[Request]:
    """The requests of the next round: what was left over, then whatever arrives within the window."""
    batch = list(carry)
    if not batch:
      first = self._queue.get()
      if first is None:
        return []
      batch.append(first)
    deadline = time.monotonic() + self.window_s
    with self._lock:
      self._recent_peaks.append(self._peak)
      self._peak = self._outstanding
    expected = max(self._recent_peaks)
    # Take whatever is queued; then wait (up to the window) only while fewer requests are here than were in
    # flight together lately, so a lone client never waits.
    while sum(len(r.rows) for r in batch) < self.max_rows:
      remaining = deadline - time.monotonic() if len(batch) < expected else 0.0
      try:
        item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if item is None:
        self._stopping = True
        break
      batch.append(item)
    return batch

  def _loop(self):
    carry: list[Request] = []
    while True:
      batch = self._collect(carry)
      if not batch:
        return
      groups: dict = {}
      for r in batch:
        groups.setdefault(r.group_key, []).append(r)
      carry = []
      for group in groups.values():
        take, rows = [], 0
        for r in group:  # Requests past the row limit wait for the next round, in arrival order.
          if rows + len(r.rows) <= self.max_rows:
            take.append(r)
            rows += len(r.rows)
          else:
            carry.append(r)
        self._run(take)
      if self._stopping and not carry:
        while not self._queue.empty():  # Fail what can no longer run rather than leave callers waiting.
          item = self._queue.get()
          if item is not None:
            item.future.set_exception(RuntimeError("the server is shutting down"))
        return

  def _run(self, group: list[Request]):
    live = [r for r in group if r.future.set_running_or_notify_cancel()]
    if not live:
      return
    try:
      results = self._generate(live)
    except Exception as e:  # A failed call fails its requests, never the worker.
      for r in live:
        r.future.set_exception(e)
      return
    for r, res in zip(live, results):
      r.future.set_result(res)

  def _generate(self, group: list[Request]) -> list[list[Generation]]:
    rows = [row for r in group for row in r.rows]
    longest = max(len(row) for row in rows)
    most = max(r.max_new_tokens for r in group)
    room = self.context - longest
    new_tokens, token_bucket = min(most, room), min(bucket_length(most), room)
    padded = row_bucket(len(rows))
    prompts = rows + [[self.bos_id]] * (padded - len(rows))
    head = group[0]
    seed = head.seed if head.seed is not None else self._rng.randrange(1 << 31)
    self.calls[(padded, bucket_length(longest), token_bucket)] += 1
    self.rows_served += len(rows)
    out = self.sampler.generate(self.params, prompts, max_new_tokens=new_tokens, token_bucket=token_bucket,
                                temperature=head.temperature, top_k=head.top_k, top_p=head.top_p, seed=seed)
    results, r0 = [], 0
    for r in group:
      gens = []
      for i in range(r0, r0 + len(r.rows)):
        n = min(int(out.lengths[i]), r.max_new_tokens)
        toks = np.asarray(out.tokens[i, :n]).tolist()
        gens.append(Generation(tokens=toks, stopped=bool(toks) and toks[-1] == self.sampler.eos_id))
      results.append(gens)
      r0 += len(r.rows)
    return results
