"""One engine worker process of a disaggregated (or replicated) server (docs/disagg.md).

The coordinator (nanokimi/serve/disagg.py) starts one process per GPU running `worker_main`. A worker owns
one Engine and talks to the coordinator through two multiprocessing queues; prefill and decode workers
also join one `torch.distributed` group (NCCL on GPUs, gloo on the CPU) whose only traffic is cache
transfers, point to point from a prefill worker to a decode worker.

Coordinator -> worker (`inbox`):
    ("add", wid, prompt_ids, params, arrival, dest)   run it; dest: the decode rank (prefill role) or None
    ("incoming_stream", src, pieces)                  post receives for one prefill step's streamed pieces
    ("state", wid, state)                             the host state that completes a streamed request
    ("incoming", wid, src, state, layout)             post receives for a request moved after its step
    ("abort", wid) / ("peer_dead", rank) / ("stop",)
Worker -> coordinator (`outbox`, each message starts with the worker's rank):
    ("ready", info) / ("failed", message)             after start-up
    ("update", wid, Update)                           cumulative outputs (a prefill worker: the first token)
    ("error", wid, message)                           the engine refused or failed the request
    ("stream", dest, pieces)                          before a prefill forward: what it will send, per request
                                                      (wid, first block, total blocks, last piece?, layout)
    ("state", wid, dest, state)                       after that request's first token (None: it finished)
    ("transfer", wid, dest, state, layout)            a request moved after its step, before its isends
    ("imported", wid) / ("transfer_failed", wid, message)
    ("stats", stats)                                  heartbeat: load, step times, prefix-cache changes
    ("record", wid, side, tensors)                    record_transfers only: what was sent / written

A prefill worker streams a one-sample request's cache while computing its prompt (`_install_layer_streaming`:
per step and layer, the blocks that step filled; the KDA state with the last chunk), samples the first token
and sends the host state after it; other requests (several samples) are exported after the step that sampled
them (nanokimi/infer/transfer.py) and sent in layer order. A decode worker posts the matching irecvs when a
header arrives, imports the request once its last piece and host state are in, and decodes it.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

HEARTBEAT_S = 0.2
COUNTERS = ("prefill_tokens", "decode_tokens", "prefix_cache_queries", "prefix_cache_hit_tokens", "preemptions")


def as_bytes(tensors: dict) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Tensors as (dtype, shape, raw bytes): plain data through the queue (a torch tensor would be shared
    through its sender process, which may be dead by the time the coordinator reads it)."""
    return {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                   t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()) for name, t in tensors.items()}


class _Failed:
    """Stands in for a send/receive that could not be posted: finished, with an error."""

    def __init__(self, error: str):
        self.error = error

    def is_completed(self) -> bool:
        return True

    def wait(self) -> None:
        raise RuntimeError(self.error)


class Completions:
    """Which point-to-point works have finished. Gloo's send/recv works only report completion from wait(),
    so one helper thread per peer waits on them in order (works to one peer complete in order); NCCL's are
    polled with is_completed() on the worker's own thread."""

    def __init__(self, poll: bool):
        self.poll = poll
        self.queues: dict[int, queue.SimpleQueue] = {}

    def watch(self, peer: int, works: list) -> dict:
        entry = {"works": works, "done": threading.Event(), "error": None}
        if not self.poll:
            if peer not in self.queues:
                self.queues[peer] = queue.SimpleQueue()
                threading.Thread(target=self._wait, args=(self.queues[peer],), daemon=True).start()
            self.queues[peer].put(entry)
        return entry

    @staticmethod
    def _wait(entries: queue.SimpleQueue) -> None:
        while True:
            entry = entries.get()
            try:
                for work in entry["works"]:
                    work.wait()
            except Exception as e:  # noqa: BLE001 - the peer died: the transfer failed
                entry["error"] = f"{type(e).__name__}: {e}"
            entry["done"].set()

    def finished(self, entry: dict) -> bool:
        if self.poll and not entry["done"].is_set() and all(w.is_completed() for w in entry["works"]):
            try:
                for work in entry["works"]:  # completed: returns at once (NCCL: orders the current stream after it)
                    work.wait()
            except Exception as e:  # noqa: BLE001 - the peer died: the transfer failed
                entry["error"] = f"{type(e).__name__}: {e}"
            entry["done"].set()
        return entry["done"].is_set()


@dataclass
class WorkerSpec:
    rank: int
    role: str  # "prefill" | "decode" | "both"
    source: object  # a checkpoint path, or a picklable callable returning (model, tokenizer)
    device: str = "cpu"
    llm_kwargs: dict = field(default_factory=dict)  # dtype and Engine kwargs
    world_size: int = 0  # ranks in the transfer group (0: none, replicas)
    store_host: str = "127.0.0.1"
    store_port: int = 0
    backend: str = "gloo"
    record_transfers: bool = False
    warmup: bool = False


def worker_main(spec: WorkerSpec, inbox, outbox) -> None:
    """The process entry point (torch.multiprocessing spawn)."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    try:
        worker = Worker(spec, inbox, outbox)
    except BaseException as e:  # noqa: BLE001 - reported to the coordinator, which fails start()
        outbox.put((spec.rank, "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        _exit(outbox, 1)
        return
    worker.run()
    _exit(outbox, 0)


def _exit(outbox, code: int) -> None:
    """Flush the queue, then leave without tearing the process group down (a dead peer could hang it)."""
    outbox.close()
    outbox.join_thread()
    os._exit(code)


class Worker:
    def __init__(self, spec: WorkerSpec, inbox, outbox):
        from nanokimi.infer import LLM
        from nanokimi.infer.transfer import sample_layout
        from nanokimi.serve.admission import StepTimeModel

        self.spec, self.rank, self.role = spec, spec.rank, spec.role
        self.inbox, self.outbox = inbox, outbox
        device = spec.device
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if isinstance(spec.source, str):
            llm = LLM(spec.source, device=device, **spec.llm_kwargs)
        else:
            model, tokenizer = spec.source()
            llm = LLM(model, device=device, tokenizer=tokenizer, **spec.llm_kwargs)
        self.engine = llm.engine
        self.engine.stream_outputs = True
        self.model = StepTimeModel()
        self.samples: list[tuple[int, int, float]] = []  # (prefill tokens, decode tokens, seconds) per step
        if spec.warmup:
            self._warmup()
        if spec.world_size:
            import torch.distributed as dist
            store = dist.TCPStore(spec.store_host, spec.store_port, spec.world_size + 1, is_master=False,
                                  timeout=__import__("datetime").timedelta(seconds=120))
            dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size)
        self.baseline = {key: self.engine.stats()[key] for key in COUNTERS}  # the warm-up's work is not served
        self.completions = Completions(poll=spec.backend == "nccl")
        self.dest: dict[str, int] = {}  # prefill: request -> decode rank
        self.sending: list[tuple[int, dict, dict]] = []  # (dest, completion, tensors kept alive until sent)
        self.incoming: list[dict] = []  # decode: transfers being received, in arrival order
        self.streams: list[dict] = []  # this step's layer-streamed transfers (prefill role)
        self.streamed: dict[str, int] = {}  # request -> dest: cache sent while computed, state to follow
        self.stream_broken = False  # a step failed halfway through layer-streamed sends
        self.transfers = {"transfers_layer_streamed": 0, "transfers_after_step": 0, "transfer_pieces": 0}
        self.dead: set[int] = set()
        self.sent_blocks: set = set()
        self.sent_snapshots: set = set()
        self.stop = False
        self.stream_sent: dict[str, int] = {}  # request -> blocks already streamed (prompt still running)
        self.stream_records: dict[str, dict] = {}  # record_transfers: what was streamed, assembled
        self.state_names = {name for name, _, _ in sample_layout(self.engine, 1, "0.")} - \
            {name for name, _, _ in sample_layout(self.engine, 1, "0.", recurrent=False)}  # KDA fields, not blocks
        if self.role == "prefill" and spec.world_size:
            self._install_layer_streaming()
        stats = self.engine.stats()
        outbox.put((self.rank, "ready", {"pid": os.getpid(), "role": self.role,
                                         "cache_tokens_total": stats["cache_tokens_total"],
                                         "block_size": self.engine.block_size,
                                         "max_model_len": self.engine.max_model_len,
                                         "has_kda": self.engine.has_kda,
                                         "step_tokens": self.engine.scheduler.max_step_tokens,
                                         "prefix_caching": self.engine.prefix_caching,
                                         "samples": list(self.samples)}))
        self.samples = []

    def _warmup(self) -> None:
        """A few prompts of several lengths, for the step-time model the coordinator's admission uses."""
        from nanokimi.infer import SamplingParams

        vocab = self.engine.model.config.vocab_size
        budget = self.engine.scheduler.max_step_tokens
        longest = max(1, min(self.engine.max_model_len // 2, self.engine.stats()["cache_tokens_total"] // 8) - 8)
        for r, lengths in enumerate([(16, 16), (min(budget, longest), 64, 16, 16, 16, 16)]):
            for i, n in enumerate(lengths):
                ids = [(7 * j + 13 * i + 101 * r) % (vocab - 1) + 1 for j in range(min(n, longest))]
                self.engine.add_request(f"warmup-{r}-{i}", ids, SamplingParams(max_tokens=8, temperature=0.0,
                                                                               ignore_eos=True))
            while self.engine.has_unfinished():
                self._step(record=r > 0)
        self.engine.reset_prefix_cache()

    def run(self) -> None:
        last_beat = 0.0
        while not self.stop:
            # nothing to step: wait for a message (briefly while transfers are in flight, to poll them)
            self._drain(wait=0.0 if self.engine.has_unfinished() else 0.002 if self.incoming or self.sending
                        else 0.01)
            if self.stop:
                break
            self._receive()
            if self.engine.has_unfinished():
                self._deliver(self._step_or_fail())
            self._poll_sends()
            now = time.monotonic()
            if now - last_beat > HEARTBEAT_S:
                self._heartbeat()
                last_beat = now

    def _drain(self, wait: float) -> None:
        while True:
            try:
                message = self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            kind = message[0]
            if kind == "add":
                self._add(*message[1:])
            elif kind == "incoming":
                self._post_receives(*message[1:])
            elif kind == "incoming_stream":
                self._post_stream_receives(*message[1:])
            elif kind == "state":
                for transfer in self.incoming:
                    if transfer["wid"] == message[1] and transfer["state"] is None:
                        transfer["state"] = message[2]
                        transfer["aborted"] |= message[2] is None  # finished on the prefill worker
            elif kind == "abort":
                self.engine.abort(message[1])
                self.dest.pop(message[1], None)
                self.stream_sent.pop(message[1], None)
                self.stream_records.pop(message[1], None)
                for transfer in self.incoming:  # still received: the sender's tensors arrive in order
                    transfer["aborted"] |= transfer["wid"] == message[1]
            elif kind == "peer_dead":  # the coordinator re-runs the requests it held
                self.dead.add(message[1])
                self.sending = [s for s in self.sending if s[0] != message[1]]
                self.incoming = [t for t in self.incoming if t["src"] != message[1]]
            elif kind == "stop":
                self.stop = True
                return

    def _add(self, wid: str, prompt_ids: list[int], params, arrival: float, dest: int | None) -> None:
        try:
            self.engine.add_request(wid, prompt_ids, params, arrival_time=arrival)
        except ValueError as e:
            self.outbox.put((self.rank, "error", wid, str(e)))
            return
        if dest is not None:
            self.dest[wid] = dest

    def _step_or_fail(self) -> list:
        """One engine step; if it raises, the engine's requests fail with the error (as one engine's server
        does) and the worker goes on, unless sends were cut off mid-step: then the transfer stream to that
        decode worker is out of order, and the worker exits (the coordinator re-runs its requests)."""
        try:
            return self._step()
        except Exception as e:  # noqa: BLE001 - one bad step must not take the requests of other workers down
            traceback.print_exc()
            message = f"internal error in {self.role} worker {self.rank}: {type(e).__name__}: {e}"
            for wid in list(self.engine.requests):
                self.outbox.put((self.rank, "error", wid, message))
                self.engine.abort(wid)
                self.dest.pop(wid, None)
                self.streamed.pop(wid, None)
            if self.stream_broken:
                _exit(self.outbox, 1)
            return []

    def _step(self, record: bool = True):
        before = self.engine.stats()
        start = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - start
        after = self.engine.stats()
        prefill = after["prefill_tokens"] - before["prefill_tokens"]
        decode = after["decode_tokens"] - before["decode_tokens"]
        if record:
            self.model.observe(prefill, decode, seconds)
            self.samples.append((prefill, decode, seconds))
        return outputs

    def _deliver(self, outputs) -> None:
        from nanokimi.infer.transfer import export_request, ready_to_export, tensor_layout
        from nanokimi.serve.loop import _freeze

        for output in outputs:
            wid = output.request_id
            if wid in self.streamed:
                if output.finished or ready_to_export(self.engine, wid):
                    self._finish_stream(wid, output, self.streamed[wid])
                continue
            dest = self.dest.get(wid)
            if dest is None:
                self.outbox.put((self.rank, "update", wid, _freeze(output)))
                continue
            if output.finished:
                del self.dest[wid]
                self.outbox.put((self.rank, "update", wid, _freeze(output)))
                continue
            if not ready_to_export(self.engine, wid):
                continue
            del self.dest[wid]
            self.outbox.put((self.rank, "update", wid, _freeze(output)))  # the first token: TTFT ends here
            if dest in self.dead:
                self.engine.abort(wid)
                self.outbox.put((self.rank, "transfer_failed", wid, f"decode worker {dest} is unreachable"))
                continue
            state, tensors = export_request(self.engine, wid)
            if self.spec.record_transfers:
                self.outbox.put((self.rank, "record", wid, "sent", as_bytes(tensors)))
            self.outbox.put((self.rank, "transfer", wid, dest, state, tensor_layout(tensors)))
            self._isend(dest, tensors)
            self.transfers["transfers_after_step"] += 1

    def _install_layer_streaming(self) -> None:
        """Send the cache of one-sample requests bound for a decode worker while their prompt is computed: in
        each prefill step, right after a layer has run (a forward hook on each block's FFN, which runs after
        the block's mixer wrote its cache), that layer's blocks that this step filled (from the first one not
        sent yet, so a prefix-cache hit goes along with the first chunk); in the step that ends the prompt, the
        rest (its last, partial block) and the KDA state. Layer l travels while layer l+1 is computed. The
        runner is wrapped to find each step's rows."""
        run = self.engine.runner.run

        def run_streaming(rows):
            self.streams = self._plan_streams(rows)
            try:
                return run(rows)
            except BaseException:
                self.stream_broken = bool(self.streams)
                raise
            finally:
                for piece in self.streams:
                    self.sending.append((piece["dest"], self.completions.watch(piece["dest"], piece["works"]),
                                         piece["keep"]))
                    if self.spec.record_transfers:
                        self._record_piece(piece)
                self.streams = []
        self.engine.runner.run = run_streaming
        for index, block in enumerate(self.engine.model.layers):
            block.ffn.register_forward_hook(lambda module, args, output, index=index: self._send_layer(index))

    def _plan_streams(self, rows) -> list[dict]:
        """This step's pieces: (request, blocks [first, end), whether it ends the prompt); their headers go out
        now, before the forward, grouped per decode worker (whose irecvs follow the send order)."""
        from nanokimi.infer.transfer import sample_layout

        if not self.dest:
            return []
        by_table = {}
        for wid, dest in self.dest.items():
            request = self.engine.requests.get(wid)
            if request is not None and len(request.sequences) == 1 and dest not in self.dead:
                by_table[id(request.sequences[0].block_table)] = (wid, dest, request.sequences[0])
        pieces = []
        bs = self.engine.block_size
        for row in rows:
            found = by_table.get(id(row.block_table))
            if found is None:
                continue
            wid, dest, seq = found
            end = row.start + len(row.tokens)
            if len(seq.tokens) != seq.num_prompt or end > seq.num_prompt:
                continue  # a recompute after preemption that includes outputs: sent after its step instead
            total, final = -(-seq.num_prompt // bs), end == seq.num_prompt
            first = self.stream_sent.get(wid, 0)
            last = total if final else end // bs
            if last <= first and not final:
                continue
            pieces.append({"wid": wid, "dest": dest, "blocks": seq.block_table[first:last], "first": first,
                           "total": total, "final": final, "slot": seq.state_slot, "works": [], "keep": [],
                           "layout": sample_layout(self.engine, last - first, "0.", recurrent=final)})
            self.stream_sent[wid] = last
        groups: dict[int, list] = {}
        for piece in pieces:
            groups.setdefault(piece["dest"], []).append(piece)
        pieces = [piece for group in groups.values() for piece in group]
        for dest, group in groups.items():
            self.outbox.put((self.rank, "stream", dest, [(p["wid"], p["first"], p["total"], p["final"], p["layout"])
                                                         for p in group]))
        self.transfers["transfer_pieces"] += len(pieces)
        for piece in pieces:
            if piece["final"]:
                self.streamed[piece["wid"]] = piece["dest"]
                self.stream_sent.pop(piece["wid"])
                self.transfers["transfers_layer_streamed"] += 1
        return pieces

    def _send_layer(self, layer_index: int) -> None:
        import torch.distributed as dist

        from nanokimi.infer.transfer import layer_tensors

        for piece in self.streams:
            if piece["dest"] in self.dead:
                continue
            tensors = layer_tensors(self.engine, piece["blocks"], piece["slot"], "0.",
                                    range(layer_index, layer_index + 1), recurrent=piece["final"])
            piece["keep"].append(tensors)
            piece["works"].extend(self._p2p(dist.isend, t, piece["dest"]) for t in tensors.values())

    def _p2p(self, op, tensor, peer: int):
        """dist.isend / dist.irecv; if it raises (the peer's connection is gone), the peer counts as dead here
        and a finished stand-in is returned (the coordinator re-runs the requests involved)."""
        if peer not in self.dead:
            try:
                return op(tensor, peer)
            except Exception as e:  # noqa: BLE001 - a dead peer must not take this worker down
                traceback.print_exc()
                self._lost_peer(peer, f"{type(e).__name__}: {e}")
        return _Failed(f"peer {peer} is unreachable")

    def _lost_peer(self, peer: int, why: str) -> None:
        self.dead.add(peer)
        self.sending = [s for s in self.sending if s[0] != peer]
        for transfer in [t for t in self.incoming if t["src"] == peer]:
            self.outbox.put((self.rank, "transfer_failed", transfer["wid"], why))
        self.incoming = [t for t in self.incoming if t["src"] != peer]

    def _record_piece(self, piece: dict) -> None:
        """record_transfers: assemble what was sent for a request across its pieces; report it with the last."""
        from nanokimi.infer.transfer import empty_like_layout, sample_layout

        wid = piece["wid"]
        if wid not in self.stream_records:
            self.stream_records[wid] = empty_like_layout(sample_layout(self.engine, piece["total"], "0."), "cpu")
        whole = self.stream_records[wid]
        for part in piece["keep"]:
            for name, tensor in part.items():
                if name in self.state_names:
                    whole[name].copy_(tensor)
                else:
                    whole[name][piece["first"]:piece["first"] + tensor.shape[0]].copy_(tensor)
        if piece["final"]:
            self.outbox.put((self.rank, "record", wid, "sent", as_bytes(self.stream_records.pop(wid))))

    def _finish_stream(self, wid: str, output, dest: int) -> None:
        """After the step: the streamed request's host state follows its cache (or "discard" if it finished)."""
        from nanokimi.infer.transfer import export_request
        from nanokimi.serve.loop import _freeze

        del self.streamed[wid]
        self.dest.pop(wid, None)
        self.outbox.put((self.rank, "update", wid, _freeze(output)))
        if output.finished or dest in self.dead:
            self.outbox.put((self.rank, "state", wid, dest, None))
            if not output.finished:
                self.engine.abort(wid)
                self.outbox.put((self.rank, "transfer_failed", wid, f"decode worker {dest} is unreachable"))
            return
        state, _ = export_request(self.engine, wid, with_tensors=False)
        self.outbox.put((self.rank, "state", wid, dest, state))

    def _isend(self, dest: int, tensors: dict) -> None:
        import torch.distributed as dist

        works = [self._p2p(dist.isend, t, dest) for t in tensors.values()]  # layer by layer, in layer order
        self.sending.append((dest, self.completions.watch(dest, works), tensors))

    def _poll_sends(self) -> None:
        self.sending = [s for s in self.sending if not self.completions.finished(s[1])]

    def _post_receives(self, wid: str, src: int, state, layout) -> None:
        """Receives for a request moved after its step: all its tensors, in layer order."""
        import torch.distributed as dist

        from nanokimi.infer.transfer import empty_like_layout

        if src in self.dead:
            return
        buffers = empty_like_layout(layout, self.engine.device)
        works = [self._p2p(dist.irecv, t, src) for t in buffers.values()]
        self.incoming.append({"wid": wid, "src": src, "state": state, "buffers": buffers, "aborted": False,
                              "pieces": [self.completions.watch(src, works)], "final": True})

    def _post_stream_receives(self, src: int, group: list) -> None:
        """Receives for one prefill step's pieces, posted layer by layer across the pieces (the send order),
        each into its blocks' rows of the request's buffers (made with the first piece, for the whole prompt)."""
        import torch.distributed as dist

        from nanokimi.infer.transfer import empty_like_layout, sample_layout

        if src in self.dead:
            return
        posted = []
        for wid, first, total, final, layout in group:
            entry = next((t for t in self.incoming if t["wid"] == wid and t["src"] == src and not t["final"]), None)
            if entry is None:
                entry = {"wid": wid, "src": src, "state": None, "aborted": False, "pieces": [], "final": False,
                         "buffers": empty_like_layout(sample_layout(self.engine, total, "0."), self.engine.device)}
                self.incoming.append(entry)
            entry["final"] = final
            views = {}
            for name, shape, _ in layout:
                whole = entry["buffers"][name]
                views[name] = whole if name in self.state_names else whole[first:first + shape[0]]
            posted.append((entry, views, []))
        for layer_index in range(len(self.engine.runner.cache.layers)):
            for _, views, works in posted:
                works.extend(self._p2p(dist.irecv, view, src) for name, view in views.items()
                             if int(name.split(".")[1]) == layer_index)
        for entry, _, works in posted:
            entry["pieces"].append(self.completions.watch(src, works))

    def _receive(self) -> None:
        """Import the transfers whose tensors have all arrived, in order, while the engine has room."""
        from nanokimi.infer.transfer import can_import, import_request, layer_tensors

        keep = []
        blocked = False
        for transfer in self.incoming:
            if not all(self.completions.finished(piece) for piece in transfer["pieces"]):
                keep.append(transfer)
                continue
            error = next((piece["error"] for piece in transfer["pieces"] if piece["error"] is not None), None)
            if error is not None:  # the sender died mid-transfer
                if not transfer["aborted"]:
                    self.outbox.put((self.rank, "transfer_failed", transfer["wid"], error))
                continue
            if transfer["aborted"]:
                continue
            if not transfer["final"] or transfer["state"] is None:  # more pieces, or the host state, to come
                keep.append(transfer)
                continue
            if blocked or not can_import(self.engine, transfer["state"]):
                blocked = True  # first come, first imported
                keep.append(transfer)
                continue
            wid = transfer["wid"]
            import_request(self.engine, transfer["state"], transfer["buffers"])
            self.outbox.put((self.rank, "imported", wid))
            if self.spec.record_transfers:
                request = self.engine.requests.get(wid)
                written = {}
                for seq in request.sequences if request is not None else []:
                    if seq.status != "finished":
                        written.update(layer_tensors(self.engine, seq.block_table, seq.state_slot, f"{seq.index}."))
                self.outbox.put((self.rank, "record", wid, "received", as_bytes(written)))
        self.incoming = keep

    def _heartbeat(self) -> None:
        engine = self.engine
        stats = engine.stats()
        blocks = set(engine.pool.cached)
        snapshots = set(engine.slots.snapshots) if engine.slots is not None else set()
        message = {key: stats[key] for key in ("requests_running", "requests_waiting", "cache_blocks_free",
                                               "cache_blocks_total", "cache_tokens_total", "cache_blocks_cached")}
        message.update({key: stats[key] - self.baseline[key] for key in COUNTERS}, **self.transfers)
        message.update(num_waiting_prefill_tokens=stats["num_waiting_prefill_tokens"], incoming=len(self.incoming),
                       samples=self.samples, blocks_added=list(blocks - self.sent_blocks),
                       blocks_removed=list(self.sent_blocks - blocks),
                       snapshots_added=list(snapshots - self.sent_snapshots),
                       snapshots_removed=list(self.sent_snapshots - snapshots))
        self.samples = []
        self.sent_blocks, self.sent_snapshots = blocks, snapshots
        self.outbox.put((self.rank, "stats", message))
