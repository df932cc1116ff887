"""Disaggregated prefill and decode (Mooncake) across worker processes, with cache-aware routing.

    loop = DisaggLoop(ckpt, DisaggOptions(prefill_workers=1, decode_workers=1), ...)
    server = Server(loop, tokenizer, template, name, max_model_len)     # the same HTTP app as `nanokimi serve`

`DisaggLoop` stands where `EngineLoop` stands for one engine (same submit/abort/snapshot/metrics), but the
engines live in worker processes (nanokimi/serve/worker.py), one per GPU. Its thread is the coordinator:

- Routing (Mooncake's Conductor). A prefill worker is chosen by its predicted TTFT: the request's prompt
  tokens that worker would NOT find in its prefix cache (its block hashes, mirrored from heartbeats, plus the
  prompts routed to it and not yet prefilled) behind the uncached tokens already queued there, through the
  step-time model fit on that worker's own steps (nanokimi/serve/admission.py). A decode worker is chosen
  by predicted TBT (its running + incoming sequences), among those with free blocks for the request.
- Admission: the server's SLO rules on the chosen pair: refused (429) when the prefill worker's predicted
  TTFT or the decode worker's predicted TBT exceeds headroom x SLO.
- Transfers: the prefill worker sends a header through the coordinator, which forwards it to the decode
  worker (in order), then isends the cache; the decode worker posts the irecvs on the header.
- Failures: a worker whose process has exited, or that sent no heartbeat for `heartbeat_timeout_s`, is dead.
  Its requests are re-run from the start on live workers under a new internal id, with the seed pinned at
  admission (so the re-run repeats the same tokens); tokens the client already has are not sent again, and
  a re-run that disagrees with them fails the request. With no live worker of a needed role the request
  fails with an OpenAI error naming the dead worker.
- Replicas (`replicas=N`): N workers that each prefill and decode (the baseline); the same routing by
  cached prefix and load, no transfers.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from nanokimi.infer.block_manager import block_hash
from nanokimi.serve.admission import Admission, StepTimeModel, Verdict
from nanokimi.serve.loop import Update, observe_tokens
from nanokimi.serve.metrics import ServerMetrics
from nanokimi.serve.worker import WorkerSpec, worker_main

log = logging.getLogger("nanokimi.serve.disagg")
COUNTERS = ("prefix_cache_queries", "prefix_cache_hit_tokens", "preemptions", "prefill_tokens", "decode_tokens")


@dataclass
class DisaggOptions:
    prefill_workers: int = 0
    decode_workers: int = 0
    replicas: int = 0
    device: str = "auto"  # "auto": one CUDA device per worker when there are enough, else the CPU
    backend: str | None = None  # None: nccl on CUDA, gloo on the CPU
    heartbeat_timeout_s: float = 30.0
    max_reroutes: int = 2
    record_transfers: bool = False  # tests: workers report what they sent / wrote (nanokimi/serve/worker.py)
    warmup: bool = True

    def check(self) -> None:
        """One-line errors for impossible layouts (the CLI shows them as `nanokimi: error: ...`)."""
        p, d, r = self.prefill_workers, self.decode_workers, self.replicas
        if min(p, d, r) < 0:
            raise ValueError(f"worker counts must be >= 0, got --prefill-workers {p} --decode-workers {d} "
                             f"--replicas {r}.")
        if r and (p or d):
            raise ValueError("--replicas runs workers that both prefill and decode; do not combine it with "
                             "--prefill-workers / --decode-workers.")
        if not r and (p == 0) != (d == 0):
            raise ValueError(f"disaggregated serving needs at least one prefill and one decode worker, got "
                             f"--prefill-workers {p} --decode-workers {d}.")
        if not (r or p):
            raise ValueError("give --prefill-workers P --decode-workers D, or --replicas N.")

    @property
    def num_workers(self) -> int:
        return self.replicas or self.prefill_workers + self.decode_workers


def resolve_worker_devices(device: str, count: int) -> list[str]:
    """One device per worker: cuda:0 .. cuda:count-1 (or the CPU for all)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * count
    if device != "cuda":
        raise ValueError(f"--device must be auto, cuda or cpu with several workers, got {device!r} "
                         "(each worker takes one GPU: cuda:0, cuda:1, ...).")
    have = torch.cuda.device_count()
    if have < count:
        raise ValueError(f"{count} workers need {count} GPUs (one each); this machine has {have}. Use fewer "
                         "workers or --device cpu.")
    return [f"cuda:{i}" for i in range(count)]


@dataclass
class WorkerInfo:
    rank: int
    role: str
    process: object
    inbox: object
    outbox: object = None  # its own queue to the coordinator (see DisaggLoop._spawn)
    ready: dict | None = None
    alive: bool = True
    last_beat: float = field(default_factory=time.monotonic)
    stats: dict = field(default_factory=dict)
    model: StepTimeModel = field(default_factory=StepTimeModel)
    blocks: set = field(default_factory=set)  # mirrored prefix-cache block hashes
    snapshots: set = field(default_factory=set)  # KDA snapshots (hybrid models need one at a hit's end)
    expected: dict = field(default_factory=dict)  # hash -> count: prompts routed here, not yet prefilled
    routed: int = 0  # requests (attempts) sent here

    @property
    def prefills(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def decodes(self) -> bool:
        return self.role in ("decode", "both")

    def describe(self) -> str:
        return f"{self.role} worker {self.rank} (pid {self.process.pid})"


@dataclass(eq=False)
class Ticket:
    request_id: str
    prompt_ids: list[int]
    params: object
    sink: asyncio.Queue
    aio: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    arrival_monotonic: float = field(default_factory=time.monotonic)
    hashes: list | None = None
    wid: str = ""
    attempt: int = 0
    prefill: int | None = None
    decode: int | None = None
    stage: str = "prefill"  # prefill | transfer | decode
    uncached: int = 0
    first_token: float | None = None
    last_token: float | None = None
    tokens_seen: int = 0
    delivered: tuple = ()  # token ids per choice the client has been sent

    def post(self, kind: str, payload) -> None:
        try:
            self.aio.call_soon_threadsafe(self.sink.put_nowait, (kind, payload))
        except RuntimeError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DisaggLoop:
    """See the module docstring. source: a checkpoint path, or a picklable callable returning (model,
    tokenizer) in the worker (tests). llm_kwargs: dtype and Engine kwargs for every worker."""

    def __init__(self, source, options: DisaggOptions, vocab_size: int, max_model_len: int, llm_kwargs: dict,
                 ttft_slo_s: float | None = None, tbt_slo_s: float | None = None, slo_headroom: float = 0.8):
        options.check()
        self.source, self.options, self.llm_kwargs = source, options, dict(llm_kwargs)
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.step_tokens = self.llm_kwargs.get("max_step_tokens", 2048)
        self.slos = (ttft_slo_s, tbt_slo_s, slo_headroom)
        self.metrics = ServerMetrics(self.snapshot)
        self.workers: list[WorkerInfo] = []
        self.records: dict[str, dict] = {}  # wid -> {"sent": tensors, "received": tensors} (record_transfers)
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._tickets: dict[str, Ticket] = {}
        self._by_wid: dict[str, Ticket] = {}
        self._snapshot: dict = {}
        self._store = None
        self._thread = threading.Thread(target=self._run, name="nanokimi-coordinator", daemon=True)
        self._pump_threads: list[threading.Thread] = []

    def start(self, timeout: float = 600.0) -> None:
        if self._thread.is_alive():
            return
        self._spawn()
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"the workers did not start within {timeout:.0f} s.")
        if self.error is not None:
            self.stop()
            raise RuntimeError(f"a worker failed to start: {self.error}") from self.error

    def _spawn(self) -> None:
        import torch.multiprocessing as mp

        opts = self.options
        devices = resolve_worker_devices(opts.device, opts.num_workers)
        roles = (["both"] * opts.replicas if opts.replicas else
                 ["prefill"] * opts.prefill_workers + ["decode"] * opts.decode_workers)
        ctx = mp.get_context("spawn")
        world, port = 0, 0
        if not opts.replicas:
            import torch.distributed as dist

            from datetime import timedelta
            port = _free_port()
            world = len(roles)  # the coordinator holds the store (outlives any worker), outside the group
            self._store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=True, timeout=timedelta(seconds=120),
                                        wait_for_workers=False)
        backend = opts.backend or ("nccl" if devices[0].startswith("cuda") else "gloo")
        for rank, (role, device) in enumerate(zip(roles, devices)):
            spec = WorkerSpec(rank, role, self.source, device, self.llm_kwargs, world, "127.0.0.1", port, backend,
                              opts.record_transfers, opts.warmup)
            # a queue of its own each way: a process killed while its queue's feeder thread holds the queue's
            # write lock leaves that lock held, which on a shared outbox stopped every other worker's messages
            # (heartbeats included, so the coordinator then killed the live workers too)
            inbox, outbox = ctx.Queue(), ctx.Queue()
            process = ctx.Process(target=worker_main, args=(spec, inbox, outbox), daemon=True,
                                  name=f"nanokimi-{role}-{rank}")
            process.start()
            self.workers.append(WorkerInfo(rank, role, process, inbox, outbox))
            pump = threading.Thread(target=self._pump, args=(outbox,), name=f"nanokimi-worker-{rank}-messages",
                                    daemon=True)
            pump.start()
            self._pump_threads.append(pump)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for w in self.workers:
            if w.process.is_alive():
                w.inbox.put(("stop",))
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
        for pump in self._pump_threads:
            pump.join(timeout=5)
        for q in [w.inbox for w in self.workers] + [w.outbox for w in self.workers]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        for w in self.workers:  # dropped, so their semaphores are released before the interpreter exits
            w.inbox = w.outbox = None

    def snapshot(self) -> dict:
        return self._snapshot

    def submit(self, request_id: str, prompt_ids: list[int], params, arrival: float | None = None) -> asyncio.Queue:
        ticket = Ticket(request_id, list(prompt_ids), params, asyncio.Queue(), asyncio.get_running_loop())
        if arrival is not None:
            ticket.arrival = arrival
            ticket.arrival_monotonic = time.monotonic() - (time.perf_counter() - arrival)
        self._inbox.put(("add", ticket))
        return ticket.sink

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _run(self) -> None:
        try:
            self._wait_ready()
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self.error = e
            self._ready.set()
            return
        self._refresh_snapshot()
        self._ready.set()
        last_check = 0.0
        while not self._stop.is_set():
            try:
                kind, item = self._inbox.get(timeout=0.05)  # HTTP requests and worker messages, in arrival order
            except queue.Empty:
                kind = None
            if kind == "worker":
                try:
                    self._handle(*item)
                except Exception:  # noqa: BLE001 - one bad message must not stop the coordinator
                    log.exception("handling %s from worker %s failed", item[1], item[0])
            elif kind == "add":
                self._admit(item)
            elif kind == "abort":
                ticket = self._tickets.get(item)
                if ticket is not None:
                    self._release(ticket)
                    self._finish(ticket, Update((), True, 0), "abort")
            now = time.monotonic()
            if now - last_check > 0.05:
                self._check_liveness(now)
                self._refresh_snapshot()
                last_check = now
        for ticket in list(self._tickets.values()):
            self._finish(ticket, Update((), True, 0), "abort")

    def _wait_ready(self) -> None:
        pending = {w.rank for w in self.workers}
        early = []  # requests submitted before the workers were ready: queued again afterwards, in order
        while pending:
            try:
                source, item = self._inbox.get(timeout=0.5)
                if source != "worker":
                    early.append((source, item))
                    continue
                rank, kind, *payload = item
            except queue.Empty:
                dead = [w for w in self.workers if w.rank in pending and not w.process.is_alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].describe()} exited with code {dead[0].process.exitcode} "
                                       "while starting")
                if self._stop.is_set():
                    raise RuntimeError("stopped while starting")
                continue
            if kind == "failed":
                raise RuntimeError(f"worker {rank}: {payload[0]}")
            if kind == "ready":
                worker = self.workers[rank]
                worker.ready, worker.last_beat = payload[0], time.monotonic()
                for sample in payload[0]["samples"]:
                    worker.model.observe(*sample)
                pending.discard(rank)
        for entry in early:
            self._inbox.put(entry)

    def _live(self, predicate) -> list[WorkerInfo]:
        return [w for w in self.workers if w.alive and predicate(w)]

    def _cached_tokens(self, worker: WorkerInfo, hashes: list[bytes]) -> int:
        """Prompt tokens the worker would reuse, by its mirrored prefix cache (the engine's prefix_of rule)."""
        if not worker.ready["prefix_caching"]:
            return 0
        n = 0
        for h in hashes:
            if h not in worker.blocks and h not in worker.expected:
                break
            n += 1
        if worker.ready["has_kda"]:
            while n and hashes[n - 1] not in worker.snapshots and hashes[n - 1] not in worker.expected:
                n -= 1
        return n * worker.ready["block_size"]

    def _load(self, worker: WorkerInfo) -> tuple[int, int, list[int]]:
        """(uncached prompt tokens queued, requests queued, tokens left per decoding sequence) on a worker."""
        queued = [t for t in self._tickets.values() if t.prefill == worker.rank and t.stage == "prefill"]
        decoding = [t for t in self._tickets.values() if t.decode == worker.rank and  # a decode worker's incoming
                    (t.stage != "prefill" or worker.role == "decode")]
        left = [max(t.params.max_tokens - t.tokens_seen, 1) for t in decoding for _ in range(t.params.n)]
        return sum(t.uncached for t in queued), len(queued), left

    def _predict(self, worker: WorkerInfo, uncached: int, timed: bool = True) -> tuple[float, float]:
        """(TTFT, TBT) on this worker for a request with `uncached` prompt tokens, in seconds from its step-time
        model; token and sequence counts instead when the model has no data yet or `timed` is False (so workers
        are compared in one unit: seconds only when every candidate's model is ready)."""
        queued_tokens, queued_requests, left = self._load(worker)
        admission = Admission(None, None, worker.ready["step_tokens"], worker.model)
        if not (timed and worker.model.ready):
            return float(queued_tokens + uncached), float(len(left) + queued_requests + 1)
        ttft, tbt, _ = admission.predict(uncached, queued_tokens, left, queued_requests)
        return ttft, tbt

    def _route(self, ticket: Ticket) -> tuple[WorkerInfo, WorkerInfo, Verdict] | str:
        """The (prefill, decode) pair and the admission verdict, or why no pair exists."""
        prefills = self._live(lambda w: w.prefills)
        if not prefills:
            return self._none_left("prefill")
        if ticket.hashes is None:
            ticket.hashes = self._hashes(ticket.prompt_ids, prefills[0].ready["block_size"])
        ranked = []
        timed = all(w.model.ready for w in prefills)
        for w in prefills:
            uncached = len(ticket.prompt_ids) - self._cached_tokens(w, ticket.hashes)
            ttft, tbt = self._predict(w, uncached, timed)
            ranked.append((ttft, uncached, self._load(w)[1], w.rank, w, tbt))
        ttft, uncached, _, _, prefill, tbt = min(ranked, key=lambda r: r[:4])
        if not timed and prefill.model.ready:  # the chosen worker's prediction in seconds, for admission
            ttft, tbt = self._predict(prefill, uncached)
        ticket.uncached = uncached
        if prefill.role == "both":
            decode = prefill
        else:
            decodes = self._live(lambda w: w.decodes)
            if not decodes:
                return self._none_left("decode")
            bs = decodes[0].ready["block_size"]
            need = -(-(len(ticket.prompt_ids) + ticket.params.max_tokens) // bs) * ticket.params.n

            timed_decodes = all(w.model.ready for w in decodes)

            def score(w):
                _, tbt_w = self._predict(w, 0, timed_decodes)
                free = w.stats.get("cache_blocks_free", w.ready["cache_tokens_total"] // bs)
                return (free < need, tbt_w, -free, w.rank)
            decode = min(decodes, key=score)
            tbt = self._predict(decode, 0)[1] if decode.model.ready else 0.0
        ttft_slo, tbt_slo, headroom = self.slos
        ready = prefill.model.ready and (prefill is decode or decode.model.ready)
        if ready and ttft_slo is not None and ttft > headroom * ttft_slo:
            return prefill, decode, Verdict(False, ttft, tbt, "ttft", max(1, math.ceil(ttft)))
        if ready and tbt_slo is not None and tbt > headroom * tbt_slo:
            return prefill, decode, Verdict(False, ttft, tbt, "tbt", max(1, math.ceil(tbt * ticket.params.max_tokens)))
        return prefill, decode, Verdict(True, ttft if ready else 0.0, tbt if ready else 0.0)

    def _none_left(self, role: str) -> str:
        dead = [w.describe() for w in self.workers if not w.alive and (w.prefills if role == "prefill" else w.decodes)]
        return (f"no live {role} worker is left to serve this request" +
                (f" ({', '.join(dead)} died)" if dead else "") + "; restart the server.")

    @staticmethod
    def _hashes(ids: list[int], bs: int) -> list[bytes]:
        hashes = []
        for i in range((len(ids) - 1) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else None, ids[i * bs:(i + 1) * bs]))
        return hashes

    def _admit(self, ticket: Ticket) -> None:
        capacity = min(w.ready["cache_tokens_total"] for w in self.workers)
        total = len(ticket.prompt_ids) + ticket.params.max_tokens
        if total > capacity:
            ticket.post("error", f"prompt ({len(ticket.prompt_ids)} tokens) + max_tokens ({ticket.params.max_tokens}) "
                        f"= {total} tokens exceed a worker's whole cache ({capacity} tokens); lower max_tokens.")
            return
        if ticket.params.seed is None:  # pinned, so a re-run after a worker dies repeats the same tokens
            ticket.params = dataclasses.replace(ticket.params, seed=secrets.randbits(62))
        routed = self._route(ticket)
        if isinstance(routed, str):
            ticket.post("error", routed)
            return
        prefill, decode, verdict = routed
        if not verdict.admit:
            self.metrics.rejected.labels(verdict.reason).inc()
            ticket.post("rejected", verdict)
            return
        self._tickets[ticket.request_id] = ticket
        self._send(ticket, prefill, decode)
        ticket.post("accepted", None)

    def _send(self, ticket: Ticket, prefill: WorkerInfo, decode: WorkerInfo) -> None:
        ticket.wid = f"{ticket.request_id}#{ticket.attempt}"
        self._by_wid[ticket.wid] = ticket
        ticket.prefill, ticket.decode, ticket.stage = prefill.rank, decode.rank, "prefill"
        prefill.routed += 1
        decode.routed += prefill is not decode
        for h in ticket.hashes:
            prefill.expected[h] = prefill.expected.get(h, 0) + 1
        dest = None if prefill is decode else decode.rank
        prefill.inbox.put(("add", ticket.wid, ticket.prompt_ids, ticket.params, ticket.arrival_monotonic, dest))

    def _forget_expected(self, ticket: Ticket) -> None:
        if ticket.prefill is None or ticket.hashes is None:
            return
        worker = self.workers[ticket.prefill]
        for h in ticket.hashes:
            count = worker.expected.get(h, 0) - 1
            if count > 0:
                worker.expected[h] = count
            else:
                worker.expected.pop(h, None)

    def _release(self, ticket: Ticket) -> None:
        """Tell the ticket's workers to drop its current attempt."""
        if ticket.stage == "prefill":
            self._forget_expected(ticket)
        for rank in {ticket.prefill, ticket.decode} - {None}:
            if self.workers[rank].alive:
                self.workers[rank].inbox.put(("abort", ticket.wid))
        self._by_wid.pop(ticket.wid, None)

    def _pump(self, outbox) -> None:
        """Move one worker's messages into the coordinator's queue, so one blocking get serves every worker and
        the HTTP side."""
        while not self._stop.is_set():
            try:
                message = outbox.get(timeout=0.1)
            except queue.Empty:
                continue
            except Exception:  # noqa: BLE001 - a message its dying sender could not finish; the rest go on
                log.exception("unreadable message from a worker")
                continue
            self._inbox.put(("worker", message))

    def _handle(self, rank: int, kind: str, *payload) -> None:
        worker = self.workers[rank]
        worker.last_beat = time.monotonic()
        if kind == "stats":
            self._observe(worker, payload[0])
            return
        if kind == "transfer":  # forwarded even when stale: the receiver must match the sender's isends
            wid, dest, state, layout = payload
            target = self.workers[dest]
            if target.alive:
                target.inbox.put(("incoming", wid, rank, state, layout))
            ticket = self._by_wid.get(wid)
            if ticket is None:
                if target.alive:
                    target.inbox.put(("abort", wid))
                return
            ticket.stage = "transfer"
            self._forget_expected(ticket)
            return
        if kind == "stream":  # headers of the transfers a prefill step is about to send layer by layer
            dest, group = payload
            target = self.workers[dest]
            if target.alive:
                target.inbox.put(("incoming_stream", rank, group))
            for wid, *_ in group:
                ticket = self._by_wid.get(wid)
                if ticket is None and target.alive:
                    target.inbox.put(("abort", wid))
            return
        if kind == "state":  # the host state that completes a layer-streamed transfer (None: dropped)
            wid, dest, state = payload
            if self.workers[dest].alive:
                self.workers[dest].inbox.put(("state", wid, state))
            return
        if kind == "record":
            wid, side, tensors = payload
            self.records.setdefault(wid, {})[side] = tensors
            return
        wid = payload[0]
        ticket = self._by_wid.get(wid)
        if ticket is None or rank not in (ticket.prefill, ticket.decode):
            return
        if kind == "imported":
            ticket.stage = "decode"
        elif kind == "update":
            self._deliver(ticket, payload[1])
        elif kind == "error":
            self._release(ticket)
            self._fail(ticket, payload[1])
        elif kind == "transfer_failed":
            self._reroute(ticket, f"a cache transfer of {worker.describe()} failed ({payload[1]})")

    def _observe(self, worker: WorkerInfo, stats: dict) -> None:
        for sample in stats.pop("samples"):
            worker.model.observe(*sample)
        worker.blocks.difference_update(stats.pop("blocks_removed"))
        worker.blocks.update(stats.pop("blocks_added"))
        worker.snapshots.difference_update(stats.pop("snapshots_removed"))
        worker.snapshots.update(stats.pop("snapshots_added"))
        worker.stats = stats

    def _deliver(self, ticket: Ticket, update: Update) -> None:
        """Post an update unless it repeats what the client has (a re-run catching up); fail on divergence."""
        if ticket.stage == "prefill":
            self._forget_expected(ticket)
            ticket.stage = "transfer" if ticket.prefill != ticket.decode else "decode"
        delivered = ticket.delivered
        for choice in update.choices:
            before = delivered[choice.index] if choice.index < len(delivered) else ()
            common = min(len(before), len(choice.token_ids))
            if tuple(choice.token_ids[:common]) != tuple(before[:common]):
                self._release(ticket)
                self._fail(ticket, "a worker died and the re-run of this request produced different tokens "
                           "from those already sent; retry the request.")
                return
        caught_up = all(len(c.token_ids) >= len(delivered[c.index]) for c in update.choices
                        if c.index < len(delivered))
        if not caught_up and not update.finished:
            return
        now = time.perf_counter()
        observe_tokens(self.metrics, ticket, max((len(c.token_ids) for c in update.choices), default=0), now)
        ticket.delivered = tuple(tuple(c.token_ids) for c in update.choices)
        if update.finished:
            self.metrics.e2e.observe(now - ticket.arrival)
            reason = update.choices[0].finish_reason if update.choices else "abort"
            self._finish(ticket, update, reason or "stop")
        else:
            ticket.post("update", update)

    def _finish(self, ticket: Ticket, update: Update, reason: str) -> None:
        self._tickets.pop(ticket.request_id, None)
        self._by_wid.pop(ticket.wid, None)
        self.metrics.finished.labels(reason).inc()
        ticket.post("update", update)
        self._refresh_snapshot()

    def _fail(self, ticket: Ticket, message: str) -> None:
        self._tickets.pop(ticket.request_id, None)
        self._by_wid.pop(ticket.wid, None)
        ticket.post("error", message)

    def _check_liveness(self, now: float) -> None:
        for worker in self.workers:
            if not worker.alive:
                continue
            if not worker.process.is_alive():
                self._on_death(worker, f"exited with code {worker.process.exitcode}")
            elif now - worker.last_beat > self.options.heartbeat_timeout_s:
                worker.process.kill()
                self._on_death(worker, f"sent no heartbeat for {now - worker.last_beat:.0f} s (killed)")

    def _on_death(self, worker: WorkerInfo, how: str) -> None:
        worker.alive = False
        log.error("%s %s; re-routing its requests", worker.describe(), how)
        for role, serves in (("prefill", lambda w: w.prefills), ("decode", lambda w: w.decodes)):
            if not self._live(serves):  # /health answers 503 from now on
                self.error = RuntimeError(self._none_left(role))
        for other in self._live(lambda w: True):
            other.inbox.put(("peer_dead", worker.rank))
        for ticket in [t for t in self._tickets.values() if worker.rank in (t.prefill, t.decode)]:
            self._reroute(ticket, f"{worker.describe()} {how}")

    def _reroute(self, ticket: Ticket, why: str) -> None:
        self._release(ticket)
        ticket.attempt += 1
        if ticket.attempt > self.options.max_reroutes:
            self._fail(ticket, f"{why}; gave up after {self.options.max_reroutes} re-runs of this request.")
            return
        routed = self._route(ticket)
        if isinstance(routed, str):
            self._fail(ticket, f"{why}: {routed}")
            return
        prefill, decode, _ = routed  # already admitted: a re-run is not refused
        log.warning("request %s re-runs on prefill %d / decode %d (%s)", ticket.request_id, prefill.rank,
                    decode.rank, why)
        self._send(ticket, prefill, decode)

    def _refresh_snapshot(self) -> None:
        live = self._live(lambda w: w.ready is not None)
        stats = [w.stats for w in live]
        snap = {key: sum(s.get(key, 0) for s in stats) for key in COUNTERS}
        snap["prompt_tokens_computed"] = snap["prefill_tokens"]
        snap["requests_running"] = sum(1 for t in self._tickets.values() if t.stage == "decode" or
                                       (t.first_token is not None))
        snap["requests_waiting"] = len(self._tickets) - snap["requests_running"]
        total = sum(s.get("cache_blocks_total", 0) for s in stats)
        free = sum(s.get("cache_blocks_free", 0) for s in stats)
        snap["tiers"] = {"gpu": {"blocks_total": total, "blocks_free": free,
                                 "blocks_cached": sum(s.get("cache_blocks_cached", 0) for s in stats),
                                 "usage": (total - free) / total if total else 0.0,
                                 "hit_tokens": snap["prefix_cache_hit_tokens"]}}
        capacity = min((w.ready["cache_tokens_total"] for w in self.workers if w.ready), default=0)
        snap["raw"] = {"cache_tokens_total": capacity}
        snap["workers"] = [{"rank": w.rank, "role": w.role, "alive": w.alive, "pid": w.process.pid,
                            "routed": w.routed, **w.stats}
                           for w in self.workers]
        self._snapshot = snap


def load_disagg_server(ckpt: str, options, disagg: DisaggOptions):
    """A `Server` (nanokimi/serve/app.py) whose engine loop is a DisaggLoop over worker processes that each load
    the checkpoint. options: ServeOptions (KV tiers and speculative decoding are single-engine features)."""
    from nanokimi.checkpoint import load_model_config, resolve_checkpoint
    from nanokimi.data.chat import ChatTemplate
    from nanokimi.infer.llm import load_checkpoint_tokenizer
    from nanokimi.serve.app import Server, default_model_name

    disagg.check()
    if options.kv_offload_gb > 0 or options.kv_disk:
        raise ValueError("--kv-offload-gb / --kv-disk are not supported with --prefill-workers/--decode-workers/"
                         "--replicas yet; drop them.")
    if options.speculative:
        raise ValueError("--speculative is not supported with --prefill-workers/--decode-workers/--replicas yet; "
                         "drop it.")
    path = resolve_checkpoint(ckpt)
    cfg = load_model_config(path)
    tokenizer = load_checkpoint_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.json or tiktoken.model); the server needs one.")
    disagg.device = options.device if disagg.device == "auto" else disagg.device
    resolve_worker_devices(disagg.device, disagg.num_workers)  # bad --device / too few GPUs: fail before serving
    llm_kwargs = dict(max_cache_tokens=options.max_cache_tokens, block_size=options.block_size,
                      max_num_seqs=options.max_num_seqs, max_step_tokens=options.max_step_tokens,
                      enable_prefix_caching=options.enable_prefix_caching)
    loop = DisaggLoop(str(path), disagg, cfg.vocab_size, cfg.max_position_embeddings, llm_kwargs,
                      ttft_slo_s=None if options.ttft_slo_ms is None else options.ttft_slo_ms / 1000,
                      tbt_slo_s=None if options.tbt_slo_ms is None else options.tbt_slo_ms / 1000,
                      slo_headroom=options.slo_headroom)
    name = options.served_model_name or default_model_name(path)
    return Server(loop, tokenizer, ChatTemplate.load(path), name, cfg.max_position_embeddings, options.max_body_bytes)
