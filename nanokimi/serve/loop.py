"""The engine thread: the one place that touches the Engine (it is not thread-safe).

HTTP handlers run on uvicorn's asyncio loop. `EngineLoop.submit` hands a request over through a queue and
returns an asyncio.Queue on which the engine thread posts, via `loop.call_soon_threadsafe`:

    ("rejected", Verdict)        refused by admission before any work (-> 429)
    ("error", message)           the engine refused the request (-> 400)
    ("accepted", None)           handed to the engine
    ("update", Update)           cumulative outputs after a step; the last one has finished=True

Admitted requests first wait in the server's own queue; each iteration hands the engine a step's worth of
prefill, preferring the request with the most cached prefix unless some request has waited longer than
`max_wait_s` (then the oldest goes first): cache-friendly order with bounded unfairness. A request whose prefix
is being computed by one in flight waits for that prefill to finish (within the same bound) and then reuses it.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from nanokimi.infer.params import TokenPrefix
from nanokimi.serve.admission import Admission, StepTimeModel, Verdict
from nanokimi.serve.metrics import ServerMetrics

log = logging.getLogger("nanokimi.serve")
COUNTERS = ("prefix_cache_queries", "prefix_cache_hit_tokens", "preemptions", "prefill_tokens", "decode_tokens")


@dataclass(frozen=True)
class Choice:
    index: int
    token_ids: TokenPrefix  # reads like a tuple of ints
    text: str
    finish_reason: str | None
    logprobs: TokenPrefix | None  # of dicts {token id: logprob}


@dataclass(frozen=True)
class Update:
    choices: tuple[Choice, ...]
    finished: bool
    num_cached_tokens: int


@dataclass(eq=False)
class Ticket:
    request_id: str
    prompt_ids: list[int]
    params: object  # SamplingParams
    sink: asyncio.Queue
    aio: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    uncached: int = 0
    hashes: list | None = None  # the prompt's block hashes, for repeated cache lookups
    dispatched: bool = False
    first_token: float | None = None
    last_token: float | None = None
    tokens_seen: int = 0

    def post(self, kind: str, payload) -> None:
        try:
            self.aio.call_soon_threadsafe(self.sink.put_nowait, (kind, payload))
        except RuntimeError:  # the HTTP side's loop is closed (shutdown): nobody is listening
            pass


def observe_tokens(metrics, ticket, produced: int, now: float) -> None:
    """Time to first token and inter-token latency of a request that has now produced `produced` tokens (per
    sample, the longest); `ticket` keeps arrival, first_token, last_token and tokens_seen."""
    if produced <= ticket.tokens_seen:
        return
    if ticket.first_token is None:
        ticket.first_token = now
        metrics.ttft.observe(now - ticket.arrival)
    else:
        gap = (now - ticket.last_token) / (produced - ticket.tokens_seen)
        for _ in range(produced - ticket.tokens_seen):
            metrics.itl.observe(gap)
    ticket.last_token, ticket.tokens_seen = now, produced


def _freeze(output) -> Update:
    """The update the HTTP side reads, taken in the engine's thread right after its step: token ids and logprobs
    are TokenPrefix views at their current length (the engine only appends to those lists, and never changes a
    logprob entry once made), so an update costs the same at the 10th token and the 10,000th."""
    choices = tuple(Choice(c.index, TokenPrefix(c.token_ids), c.text, c.finish_reason,
                           None if c.logprobs is None else TokenPrefix(c.logprobs))
                    for c in output.outputs)
    return Update(choices, bool(output.finished), int(output.num_cached_tokens or 0))


class EngineLoop:
    """Owns the engine and its thread. `engine` follows INTERFACES.md (add_request/abort/step/stats and
    `num_cached_tokens(prompt_ids)`); `sampling_params` builds the warm-up requests' SamplingParams."""

    def __init__(self, engine, sampling_params, vocab_size: int, max_model_len: int, step_tokens: int,
                 ttft_slo_s: float | None = None,
                 tbt_slo_s: float | None = None, slo_headroom: float = 0.8, max_wait_s: float = 2.0,
                 warmup: bool = True):
        self.engine = engine
        self.sampling_params = sampling_params
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.step_tokens = step_tokens
        self.max_wait_s = max_wait_s
        self.admission = Admission(ttft_slo_s, tbt_slo_s, step_tokens, StepTimeModel(), slo_headroom)
        self.metrics = ServerMetrics(self.snapshot)
        self.warmup = warmup
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._tickets: dict[str, Ticket] = {}
        self._pending: list[Ticket] = []  # admitted, not yet handed to the engine (arrival order)
        self._baseline = {key: 0 for key in COUNTERS}
        self._snapshot: dict = {}
        self._thread = threading.Thread(target=self._run, name="nanokimi-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self, timeout: float = 600.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the engine did not finish warming up within {timeout:.0f} s.")
        if self.error is not None:
            raise RuntimeError(f"the engine failed to start: {self.error}") from self.error

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def snapshot(self) -> dict:
        return self._snapshot

    def submit(self, request_id: str, prompt_ids: list[int], params, arrival: float | None = None) -> asyncio.Queue:
        """Called on the asyncio loop; arrival: time.perf_counter() when the request reached the server.
        The returned queue receives the messages listed in the module doc."""
        ticket = Ticket(request_id, prompt_ids, params, asyncio.Queue(), asyncio.get_running_loop())
        if arrival is not None:
            ticket.arrival = arrival
        self._inbox.put(("add", ticket))
        self._wake.set()
        return ticket.sink

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _run(self) -> None:
        try:
            if self.warmup:
                self._calibrate()
            self._baseline = {key: self.engine.stats().get(key, 0) for key in COUNTERS}
            self._refresh_snapshot(self.engine.stats())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        stats = self.engine.stats()
        busy_since = None  # end of the previous busy iteration: the model times whole iterations
        while not self._stop.is_set():
            self._drain_inbox()
            self._dispatch(stats)
            if not self.engine.has_unfinished():
                stats = self.engine.stats()  # aborts change it without a step
                self._refresh_snapshot(stats)
                busy_since = None
                if self._wake.wait(0.05):
                    self._wake.clear()
                continue
            start = time.perf_counter() if busy_since is None else busy_since
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {type(e).__name__}: {e}")
                busy_since = None
                continue
            after = self.engine.stats()
            self._deliver(outputs, time.perf_counter())
            self._refresh_snapshot(after)
            busy_since = time.perf_counter()
            self.admission.model.observe(after.get("prefill_tokens", 0) - stats.get("prefill_tokens", 0),
                                         after.get("decode_tokens", 0) - stats.get("decode_tokens", 0),
                                         busy_since - start)
            stats = after
        for ticket in list(self._tickets.values()):
            self._finish_aborted(ticket)

    def _calibrate(self) -> None:
        """Fit the step-time model before serving: a round that warms kernels up (discarded), then rounds of
        prompts of several lengths decoding together, so prefill size and batch size both vary."""
        rounds = [(self.step_tokens, 16, 16, 16)] + [(2 * self.step_tokens, self.step_tokens // 2, 16) + (8,) * k
                                                   for k in (3, 12)]
        stats = self.engine.stats()
        capacity = stats.get("cache_tokens_total", stats.get("cache_blocks_total", 0) * 16)
        longest = max(1, min(self.max_model_len // 2, capacity // 4) - 8)  # leaves room for the round's others
        for r, lengths in enumerate(rounds):
            before = len(self.admission.model.samples)
            for i, length in enumerate(lengths):
                length = min(length, longest)
                ids = [(7 * j + 13 * i + 101 * r) % (self.vocab_size - 1) + 1 for j in range(length)]
                params = self.sampling_params(max_tokens=8, temperature=0.0, ignore_eos=True)
                self.engine.add_request(f"warmup-{r}-{i}", ids, params)
            stats = self.engine.stats()
            for _ in range(1000):
                if not self.engine.has_unfinished():
                    break
                start = time.perf_counter()
                self.engine.step()
                seconds = time.perf_counter() - start
                after = self.engine.stats()
                self.admission.model.observe(after.get("prefill_tokens", 0) - stats.get("prefill_tokens", 0),
                                             after.get("decode_tokens", 0) - stats.get("decode_tokens", 0), seconds)
                stats = after
            if r == 0:  # first-call costs (allocation, kernel selection) are not the steady state
                for _ in range(len(self.admission.model.samples) - before):
                    self.admission.model.samples.pop()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._admit(item)
            elif kind == "abort":
                ticket = self._tickets.get(item)
                if ticket is not None:
                    if ticket.dispatched:
                        self.engine.abort(item)
                    else:
                        self._pending.remove(ticket)
                    self._finish_aborted(ticket)

    def _queue_state(self) -> tuple[int, int, list[int]]:
        """(uncached prompt tokens queued, requests queued, tokens left for each decoding request)."""
        queued = [t for t in self._tickets.values() if t.first_token is None]
        running = [t for t in self._tickets.values() if t.first_token is not None]
        left = [max(t.params.max_tokens - t.tokens_seen, 0) for t in running for _ in range(t.params.n)]
        return sum(t.uncached for t in queued), len(queued), left

    def _admit(self, ticket: Ticket) -> None:
        ticket.hashes = self.engine.prompt_hashes(ticket.prompt_ids)
        ticket.uncached = len(ticket.prompt_ids) - self.engine.num_cached_tokens(ticket.prompt_ids, ticket.hashes)
        queued_tokens, queued_requests, left = self._queue_state()
        verdict: Verdict = self.admission.decide(ticket.uncached, queued_tokens, left, queued_requests)
        if not verdict.admit:
            self.metrics.rejected.labels(verdict.reason).inc()
            ticket.post("rejected", verdict)
            return
        self._tickets[ticket.request_id] = ticket
        self._pending.append(ticket)

    def _dispatch(self, stats: dict) -> None:
        """Hand the engine up to one step of prefill tokens when its own queue is empty. A request whose next
        uncached blocks are being computed right now by a request in flight (same prefix, prefill not done) is
        held back until that prefill is done, so it reuses the blocks instead of computing them again."""
        if not self._pending or stats.get("requests_waiting", 0) > 0:
            return
        budget = self.step_tokens
        now = time.perf_counter()
        in_flight: dict[bytes, int] = {}  # prompt block hash of a request in prefill -> its prompt's full blocks
        if getattr(self.engine, "prefix_caching", False):
            for t in self._tickets.values():
                if t.dispatched and t.first_token is None:
                    in_flight.update(dict.fromkeys(t.hashes or (), len(t.hashes or ())))
        while self._pending and budget > 0:
            oldest = self._pending[0]
            if now - oldest.arrival > self.max_wait_s:
                ticket = oldest
            else:
                ready = []
                for t in self._pending[:32]:
                    cached = self.engine.num_cached_tokens(t.prompt_ids, t.hashes)
                    t.uncached = len(t.prompt_ids) - cached
                    if not self._worth_waiting(t, cached, in_flight):
                        ready.append(t)
                if not ready:
                    return
                ticket = min(ready, key=lambda t: (t.uncached - len(t.prompt_ids), t.arrival))
            self._pending.remove(ticket)
            try:
                self.engine.add_request(ticket.request_id, ticket.prompt_ids, ticket.params)
            except ValueError as e:
                del self._tickets[ticket.request_id]
                ticket.post("error", str(e))
                continue
            ticket.dispatched = True
            ticket.post("accepted", None)
            budget -= max(ticket.uncached, 1)
            if getattr(self.engine, "prefix_caching", False):
                in_flight.update(dict.fromkeys(ticket.hashes or (), len(ticket.hashes or ())))

    def _worth_waiting(self, ticket: Ticket, cached: int, in_flight: dict[bytes, int]) -> bool:
        """Whether the blocks right after `ticket`'s cached prefix are being computed by a request in flight, and
        waiting for them would let it reuse more. A hybrid (KDA) model reuses a prefix only up to a block whose
        state is snapshotted: every snapshot_interval tokens, and at the end of each prompt's full blocks."""
        block_size = getattr(self.engine, "block_size", 16)
        hashes, start = ticket.hashes or [], cached // block_size
        end = start
        while end < len(hashes) and hashes[end] in in_flight:
            end += 1
        if end == start:
            return False
        if not getattr(self.engine, "has_kda", False):
            return True
        interval = getattr(self.engine, "snapshot_interval", block_size)
        return end * block_size // interval > start * block_size // interval or in_flight[hashes[end - 1]] == end

    def _deliver(self, outputs, now: float) -> None:
        for output in outputs:
            ticket = self._tickets.get(output.request_id)
            if ticket is None:
                continue
            update = _freeze(output)
            observe_tokens(self.metrics, ticket, max((len(c.token_ids) for c in update.choices), default=0), now)
            ticket.post("update", update)
            if update.finished:
                del self._tickets[ticket.request_id]
                self.metrics.e2e.observe(now - ticket.arrival)
                reason = update.choices[0].finish_reason if update.choices else "abort"
                self.metrics.finished.labels(reason or "stop").inc()

    def _finish_aborted(self, ticket: Ticket) -> None:
        self._tickets.pop(ticket.request_id, None)
        self.metrics.finished.labels("abort").inc()
        ticket.post("update", Update((), True, 0))

    def _fail_all(self, message: str) -> None:
        for ticket in list(self._tickets.values()):
            if ticket.dispatched:
                self.engine.abort(ticket.request_id)
            else:
                self._pending.remove(ticket)
            self._tickets.pop(ticket.request_id)
            ticket.post("error", message)

    def _refresh_snapshot(self, stats: dict) -> None:
        snap = {key: stats.get(key, 0) - self._baseline[key] for key in COUNTERS}
        snap["prompt_tokens_computed"] = snap["prefill_tokens"]
        snap["requests_running"] = stats.get("requests_running", 0)
        snap["requests_waiting"] = stats.get("requests_waiting", 0) + len(self._pending)
        total, free = stats.get("cache_blocks_total", 0), stats.get("cache_blocks_free", 0)
        lower = stats.get("kv_tiers", {})
        gpu_hits = snap["prefix_cache_hit_tokens"] - sum(tier["hit_tokens"] for tier in lower.values())
        tiers = {"gpu": {"blocks_total": total, "blocks_free": free,
                         "blocks_cached": stats.get("cache_blocks_cached", 0),
                         "usage": (total - free) / total if total else 0.0, "hit_tokens": gpu_hits}, **lower}
        snap["tiers"] = tiers
        snap["raw"] = stats
        self._snapshot = snap
