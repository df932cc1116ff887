"""Disaggregated prefill/decode (docs/disagg.md) on the CPU: worker processes joined by a gloo group.

Greedy outputs through prefill -> transfer -> decode equal one engine's token for token (hybrid KDA + MLA +
GQA and all-MLA models, float64); the cache a decode worker writes equals what the prefill worker sent byte
for byte; killing a decode worker mid-run leaves no request hanging; the HTTP server answers the openai
client. Routing and admission are tested on a coordinator with stand-in workers (no processes)."""
import asyncio
import os
import signal
import time

import pytest
import torch

from nanokimi import ModelConfig, build_model
from nanokimi.infer import LLM, Engine, SamplingParams
from nanokimi.infer.transfer import can_import, export_request, import_request, ready_to_export
from nanokimi.serve.admission import StepTimeModel
from nanokimi.serve.disagg import DisaggLoop, DisaggOptions, Ticket, WorkerInfo
from serve_util import TINY, make_checkpoint

ENGINE = dict(max_cache_tokens=4096, max_step_tokens=64, block_size=16)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompt(i: int, n: int) -> list[int]:
    return [(7 * j + 31 * i) % 500 + 1 for j in range(n)]


def requests(count: int, max_tokens: int = 12) -> list[tuple[list[int], SamplingParams]]:
    lengths = (5, 40, 17, 90, 33, 64, 16, 120)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [(prompt(i, lengths[i % len(lengths)]), params) for i in range(count)]


def reference(ckpt, reqs) -> list[list[int]]:
    llm = LLM(str(ckpt), device="cpu", dtype="float64", **ENGINE)
    outs = llm.generate(prompt_token_ids=[ids for ids, _ in reqs], sampling_params=[p for _, p in reqs],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


async def _collect(loop, reqs, timeout: float, on_update=None, prefix="r"):
    sinks = [loop.submit(f"{prefix}{i}", ids, params) for i, (ids, params) in enumerate(reqs)]

    async def one(i, sink):
        while True:
            kind, payload = await asyncio.wait_for(sink.get(), timeout)
            if kind in ("error", "rejected"):
                return kind, payload
            if kind == "update":
                if on_update is not None:
                    on_update(i, payload)
                if payload.finished:
                    return "done", [list(c.token_ids) for c in payload.choices]
    return await asyncio.gather(*(one(i, s) for i, s in enumerate(sinks)))


def generate(loop, reqs, timeout: float = 60.0, on_update=None, prefix: str = "r"):
    """[(kind, payload)] per request: ("done", token ids per choice) or ("error", message)."""
    return asyncio.run(_collect(loop, reqs, timeout, on_update, prefix))


def start(ckpt, **options) -> DisaggLoop:
    opts = DisaggOptions(device="cpu", record_transfers=True, warmup=False, **options)
    loop = DisaggLoop(str(ckpt), opts, TINY["vocab_size"], TINY["max_position_embeddings"],
                      dict(dtype="float64", **ENGINE))
    loop.start(timeout=120)
    return loop


def assert_records_equal(loop) -> int:
    """Every transfer's tensors as written on the decode worker equal what the prefill worker sent, bytes."""
    checked = 0
    for wid, record in loop.records.items():
        sent, received = record["sent"], record["received"]
        assert sent.keys() == received.keys(), wid
        for name in sent:  # (dtype, shape, raw bytes) on each side
            assert sent[name] == received[name], (wid, name)
            assert len(sent[name][2]) > 0
            checked += 1
    return checked


def wait_for_stats(loop, rank: int, ready, timeout: float = 10.0) -> dict:
    """The worker's heartbeat stats once `ready(stats)` holds (heartbeats come every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while not ready(loop.workers[rank].stats) and time.monotonic() < deadline:
        time.sleep(0.05)
    return loop.workers[rank].stats


@pytest.fixture(scope="module")
def hybrid_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("disagg-hybrid"))  # KDA + MLA + GQA, MoE


@pytest.fixture(scope="module")
def mla_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("disagg-mla"), mixers="A", num_layers=2)


def small_model(mixers: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = dict(num_layers=len(mixers), mixers=mixers)
    return build_model(ModelConfig(**{**TINY, **layers})).double().eval()


@pytest.mark.parametrize("mixers", ["KAG", "A"])
def test_a_request_moved_between_engines_continues_exactly(mixers):
    """In one process: prefill on engine a, export after the first token, import into b, decode there; the
    tokens (greedy, and seeded sampling with n=2) equal one engine's, and a's blocks all come back."""
    model = small_model(mixers)
    params = [GREEDY, SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2)]
    reqs = [(prompt(i, n), params[i % 2]) for i, n in enumerate((5, 40, 17, 33))]

    def engine():
        return Engine(model, None, max_cache_tokens=1024, block_size=8)
    single = engine()
    for i, (ids, p) in enumerate(reqs):
        single.add_request(str(i), ids, p)
    want, got = {}, {}
    while single.has_unfinished():
        want.update({o.request_id: [c.token_ids for c in o.outputs] for o in single.step() if o.finished})
    a, b = engine(), engine()
    for i, (ids, p) in enumerate(reqs):
        a.add_request(str(i), ids, p)
    with pytest.raises(ValueError, match="tokens still to compute"):
        export_request(a, "0")
    moved = 0
    while a.has_unfinished() or b.has_unfinished():
        got.update({o.request_id: [c.token_ids for c in o.outputs] for o in a.step() if o.finished})
        for rid in [r for r in a.requests if ready_to_export(a, r)]:
            state, tensors = export_request(a, rid)
            assert can_import(b, state)
            import_request(b, state, tensors)
            moved += 1
        got.update({o.request_id: [c.token_ids for c in o.outputs] for o in b.step() if o.finished})
    assert moved == len(reqs) and got == want
    assert a.pool.num_free == a.pool.num_usable and b.stats()["requests_running"] == 0


def reference_all(ckpt, reqs) -> list[list[list[int]]]:
    llm = LLM(str(ckpt), device="cpu", dtype="float64", **ENGINE)
    outs = llm.generate(prompt_token_ids=[ids for ids, _ in reqs], sampling_params=[p for _, p in reqs],
                        use_tqdm=False)
    return [[c.token_ids for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


def test_disagg_greedy_equals_one_engine_and_the_mla_cache_arrives_byte_for_byte(mla_ckpt):
    """One-sample requests stream their cache layer by layer during the prefill step (a seeded sampled one
    too: its random stream moves with it); the seeded n=2 request is exported after its step (both samples'
    blocks and random streams)."""
    reqs = requests(4) + [(prompt(8, 30), SamplingParams(max_tokens=10, temperature=0.8, seed=5)),
                          (prompt(7, 50), SamplingParams(max_tokens=10, temperature=0.8, seed=11, n=2))]
    want = reference_all(mla_ckpt, reqs)
    loop = start(mla_ckpt, prefill_workers=1, decode_workers=1)
    try:
        outs = generate(loop, reqs)
        assert [kind for kind, _ in outs] == ["done"] * len(reqs), outs
        assert [payload for _, payload in outs] == want
        assert assert_records_equal(loop) == (len(reqs) + 1) * 2 * 2  # samples x 2 layers x (c_kv, k_rope)
        prefill = wait_for_stats(loop, 0, lambda s: s.get("transfers_after_step") == 1)
        assert prefill["transfers_layer_streamed"] == len(reqs) - 1
        # the only prefill worker dies with a long prompt on its way: a clear error, the decode worker lives on
        os.kill(loop.workers[0].process.pid, signal.SIGKILL)
        (kind, message), = generate(loop, [(prompt(9, 150), GREEDY)], timeout=30, prefix="orphan")
        assert kind == "error" and "no live prefill worker" in message and "prefill worker 0" in message
        assert loop.workers[1].alive and loop.workers[1].process.is_alive()
        assert loop.error is not None  # /health: 503
    finally:
        loop.stop()


@pytest.fixture(scope="module")
def hybrid_cluster(hybrid_ckpt):
    loop = start(hybrid_ckpt, prefill_workers=1, decode_workers=2)
    yield loop
    loop.stop()


def test_disagg_greedy_equals_one_engine_on_the_hybrid_model_and_transfers_are_exact(hybrid_ckpt, hybrid_cluster):
    """Prompts longer than a step's budget (64 tokens) stream their blocks chunk by chunk, the KDA state last."""
    reqs = requests(8)
    outs = generate(hybrid_cluster, reqs)
    assert [payload[0] for _, payload in outs] == reference(hybrid_ckpt, reqs)
    assert assert_records_equal(hybrid_cluster) == len(reqs) * 6  # KDA conv+state, MLA c_kv+k_rope, GQA k+v
    prefill = wait_for_stats(hybrid_cluster, 0, lambda s: s.get("transfers_layer_streamed") == len(reqs))
    assert prefill["transfers_layer_streamed"] == len(reqs)
    assert prefill["transfer_pieces"] > len(reqs)  # prompts longer than a step went in several pieces
    routed = [w.routed for w in hybrid_cluster.workers]
    assert routed[0] == len(reqs) and routed[1] > 0 and routed[2] > 0  # both decode workers took some (by load)


def test_killing_a_decode_worker_mid_run_hangs_nothing(hybrid_ckpt, hybrid_cluster):
    """SIGKILL a decode worker once it has streamed tokens: every request still completes (re-run from the
    start on the live pair, same tokens as one engine, nothing sent twice), within a bounded time; after the
    last decode worker dies too, a new request fails with an error naming it."""
    loop = hybrid_cluster
    # each worker writes to a queue of its own: a worker killed while holding a shared queue's write lock
    # stopped the others' messages (and heartbeats) for good, and the coordinator then killed them too
    assert len({id(w.outbox) for w in loop.workers}) == len(loop.workers)
    reqs = requests(6, max_tokens=40)
    victim = loop.workers[1]
    killed = []
    streams: dict[int, list[int]] = {}

    def on_update(i, update):
        tokens = list(update.choices[0].token_ids)
        assert tokens[:len(streams.get(i, []))] == streams.get(i, [])  # a stream never goes back
        streams[i] = tokens
        on_victim = [t for t in loop._tickets.values() if t.decode == victim.rank and t.stage == "decode"]
        if not killed and on_victim and len(tokens) >= 3:
            os.kill(victim.process.pid, signal.SIGKILL)
            killed.append(time.monotonic())
    started = time.monotonic()
    outs = generate(loop, reqs, timeout=60, on_update=on_update, prefix="kill")
    assert killed, "the decode worker was never seen decoding"
    assert [payload[0] for _, payload in outs] == reference(hybrid_ckpt, reqs)
    assert time.monotonic() - started < 90
    assert not victim.alive
    os.kill(loop.workers[2].process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while loop.workers[2].alive and time.monotonic() < deadline:
        time.sleep(0.05)
    (kind, message), = generate(loop, requests(1), timeout=30, prefix="late")
    assert kind == "error" and "no live decode worker" in message and "decode worker 2" in message


def fake_worker(rank: int, role: str, free_blocks: int = 1000, kda: bool = False) -> WorkerInfo:
    class Process:
        pid = 1000 + rank
    ready = {"block_size": 16, "prefix_caching": True, "has_kda": kda, "step_tokens": 64,
             "cache_tokens_total": 16 * free_blocks}
    return WorkerInfo(rank, role, Process(), None, ready=ready, stats={"cache_blocks_free": free_blocks})


def fake_loop(workers, ttft_slo_s=None, tbt_slo_s=None) -> DisaggLoop:
    loop = DisaggLoop("unused", DisaggOptions(prefill_workers=1, decode_workers=1), 512, 512, {},
                      ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s, slo_headroom=1.0)
    loop.workers = workers
    return loop


def ticket(ids, max_tokens=8) -> Ticket:
    return Ticket("t", ids, SamplingParams(max_tokens=max_tokens), None, None)


def test_routing_weighs_the_cached_prefix_against_the_queue():
    p0, p1, d2, d3 = (fake_worker(0, "prefill"), fake_worker(1, "prefill"), fake_worker(2, "decode", 100),
                      fake_worker(3, "decode", 1000))
    loop = fake_loop([p0, p1, d2, d3])
    ids = prompt(0, 300)
    p1.blocks.update(loop._hashes(ids, 16)[:16])  # p1 holds the first 256 tokens
    prefill, decode, verdict = loop._route(ticket(ids))
    assert (prefill.rank, decode.rank, verdict.admit) == (1, 3, True)  # the prefix; the decode with free blocks
    queued = ticket(prompt(9, 280))
    queued.prefill, queued.stage, queued.uncached = 1, "prefill", 280
    loop._tickets["q"] = queued  # 280 uncached tokens ahead on p1: recomputing 300 on p0 is sooner
    assert loop._route(ticket(ids))[0].rank == 0
    for i in range(3):  # three sequences decoding on d3: d2 (enough free blocks) is less loaded
        busy = ticket(prompt(i, 10))
        busy.decode, busy.stage = 3, "decode"
        loop._tickets[f"b{i}"] = busy
    assert loop._route(ticket(ids))[1].rank == 2


def test_workers_are_compared_in_one_unit_while_a_step_time_model_is_still_empty():
    """One prefill worker has timed steps (seconds), the other holds the prefix but has none yet (token counts):
    the router must not rank seconds against token counts, which would always pick the timed worker."""
    p0, p1, d2 = fake_worker(0, "prefill"), fake_worker(1, "prefill"), fake_worker(2, "decode")
    loop = fake_loop([p0, p1, d2])
    model = StepTimeModel()
    for prefill, decode in ((64, 0), (32, 0), (0, 4), (0, 8), (16, 2)):
        model.observe(prefill, decode, 0.01 + 0.001 * prefill)
    p0.model = model
    ids = prompt(0, 300)
    p1.blocks.update(loop._hashes(ids, 16)[:16])  # p1 holds the first 256 tokens, and no step timings yet
    assert loop._route(ticket(ids))[0].rank == 1


def test_kda_prefixes_need_a_snapshot_and_admission_uses_the_pairs_predictions():
    p0, d1 = fake_worker(0, "prefill", kda=True), fake_worker(1, "decode")
    loop = fake_loop([p0, d1], ttft_slo_s=0.5, tbt_slo_s=0.05)
    ids = prompt(0, 100)
    hashes = loop._hashes(ids, 16)
    p0.blocks.update(hashes)
    p0.snapshots.add(hashes[2])
    assert loop._cached_tokens(p0, hashes) == 48  # the deepest block with the KDA state at its end
    for worker, (c0, cp, cd) in ((p0, (0.01, 0.001, 0.0)), (d1, (0.01, 0.0, 0.01))):
        model = StepTimeModel()
        for prefill, decode in ((64, 0), (32, 0), (0, 4), (0, 8), (16, 2)):
            model.observe(prefill, decode, c0 + cp * prefill + cd * decode)
        worker.model = model
    _, _, verdict = loop._route(ticket(ids))
    assert verdict.admit and 0.05 < verdict.ttft_s < 0.5
    loop.slos = (0.02, 0.05, 1.0)
    _, _, verdict = loop._route(ticket(ids))
    assert not verdict.admit and verdict.reason == "ttft"
    loop.slos = (None, 0.05, 1.0)
    for i in range(5):
        busy = ticket(prompt(i, 10), max_tokens=100)
        busy.decode, busy.stage = 1, "decode"
        loop._tickets[f"b{i}"] = busy
    _, _, verdict = loop._route(ticket(ids))
    assert not verdict.admit and verdict.reason == "tbt" and verdict.tbt_s == pytest.approx(0.07)


@pytest.mark.parametrize("options, message", [
    (dict(prefill_workers=1), "at least one prefill and one decode"),
    (dict(replicas=2, decode_workers=1), "do not combine"),
    (dict(), "give --prefill-workers"),
    (dict(prefill_workers=-1, decode_workers=1), "must be >= 0"),
])
def test_bad_worker_layouts_get_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as e:
        DisaggOptions(**options).check()
    assert "\n" not in str(e.value)


def test_replicas_route_by_cached_prefix_and_a_hung_replica_is_replaced(mla_ckpt):
    """--replicas 2: greedy outputs equal one engine's; a prompt extending an earlier one goes to the replica
    that cached it, although an idle tie would pick replica 0; when that replica stops answering, its
    request completes on the other."""
    loop = start(mla_ckpt, replicas=2)
    try:
        long_other, base = prompt(1, 150), prompt(2, 100)
        reqs = [(long_other, GREEDY), (base, GREEDY)]  # arrive together: the second goes to the idle replica 1
        outs = generate(loop, reqs)
        assert [payload[0] for _, payload in outs] == reference(mla_ckpt, reqs)
        assert [w.routed for w in loop.workers] == [1, 1]
        deadline = time.monotonic() + 10
        while not loop.workers[1].blocks and time.monotonic() < deadline:  # the heartbeat mirrors its cache
            time.sleep(0.05)
        extended = [(base + prompt(3, 20), GREEDY)]
        outs = generate(loop, extended, prefix="ext")
        assert [w.routed for w in loop.workers] == [1, 2]
        assert [payload[0] for _, payload in outs] == reference(mla_ckpt, extended)
        # a hung replica (stopped, so no heartbeats) is killed after the timeout and its request re-runs on the other
        loop.options.heartbeat_timeout_s = 1.0
        os.kill(loop.workers[1].process.pid, signal.SIGSTOP)
        again = [(base + prompt(4, 30), GREEDY)]
        outs = generate(loop, again, timeout=30, prefix="again")
        assert [w.routed for w in loop.workers] == [2, 3] and not loop.workers[1].alive
        assert [payload[0] for _, payload in outs] == reference(mla_ckpt, again)
    finally:
        loop.stop()


def test_the_http_server_with_one_prefill_and_one_decode_worker_answers_the_openai_client(hybrid_ckpt):
    openai = pytest.importorskip("openai", reason="the serve tests need the openai client (the test extra)")
    import httpx

    from nanokimi.serve.app import ServeOptions, create_app
    from nanokimi.serve.disagg import load_disagg_server
    from nanokimi.serve.run import BackgroundServer

    text = "def load(fp, *, cls=None"
    options = ServeOptions(device="cpu", max_cache_tokens=400, max_step_tokens=64)
    server = load_disagg_server(str(hybrid_ckpt), options,
                                DisaggOptions(prefill_workers=1, decode_workers=1))  # with the warm-up
    llm = LLM(str(hybrid_ckpt), device="cpu", max_cache_tokens=2048, max_step_tokens=64)
    want = llm.generate([text], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0].outputs[0]
    with BackgroundServer(create_app(server), startup_timeout=120) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=server.model_name, prompt=text, max_tokens=8, temperature=0)
        assert out.choices[0].text == want.text and out.usage.completion_tokens == len(want.token_ids)
        stop = want.text[len(want.text) // 2:][:2] or "a"  # the decode worker continues the detokenizer and stop rule
        cut = llm.generate([text], SamplingParams(max_tokens=8, temperature=0.0, stop=[stop]), use_tqdm=False)[0]
        out = client.completions.create(model=server.model_name, prompt=text, max_tokens=8, temperature=0,
                                        stop=[stop])
        assert out.choices[0].text == cut.outputs[0].text and out.choices[0].finish_reason == \
            cut.outputs[0].finish_reason
        chunks = list(client.chat.completions.create(model=server.model_name, max_tokens=6, temperature=0,
                                                     stream=True, messages=[{"role": "user", "content": "hi"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert httpx.get(bg.url + "/health").json() == {"status": "ok"}
        assert "nanokimi_time_to_first_token_seconds_count 3.0" in httpx.get(bg.url + "/metrics").text
        with pytest.raises(openai.BadRequestError, match="exceed a worker's whole cache"):
            client.completions.create(model=server.model_name, prompt=[1] * 300, max_tokens=200)


@pytest.mark.parametrize("argv, message", [
    (["--prefill-workers", "1"], "at least one prefill and one decode worker"),
    (["--replicas", "2", "--decode-workers", "1"], "do not combine it with"),
    (["--replicas", "2", "--kv-offload-gb", "1"], "--kv-offload-gb / --kv-disk are not supported"),
    (["--prefill-workers", "1", "--decode-workers", "1", "--device", "cuda:1"], "--device must be auto, cuda or cpu"),
])
def test_nanokimi_serve_refuses_bad_worker_flags_in_one_line(hybrid_ckpt, capsys, argv, message):
    from nanokimi.cli import main
    assert main(["serve", str(hybrid_ckpt), "--port", "0"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one per worker)")
def test_on_two_gpus_nccl_transfers_are_exact_and_outputs_equal_one_engine(hybrid_ckpt):
    """1 prefill GPU + 1 decode GPU over NCCL, requests one at a time (so every batch matches the single
    engine's, and greedy tokens can be compared exactly in float32)."""
    reqs = requests(4, max_tokens=16)
    engine = dict(ENGINE, max_cache_tokens=8192)
    llm = LLM(str(hybrid_ckpt), device="cuda:0", dtype="float32", **engine)
    want = [llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
            for ids, params in reqs]
    del llm
    opts = DisaggOptions(prefill_workers=1, decode_workers=1, device="cuda", record_transfers=True, warmup=False)
    loop = DisaggLoop(str(hybrid_ckpt), opts, TINY["vocab_size"], TINY["max_position_embeddings"],
                      dict(dtype="float32", **engine))
    loop.start(timeout=300)
    try:
        got = [generate(loop, [r], timeout=120, prefix=f"g{i}-")[0] for i, r in enumerate(reqs)]
        assert [payload[0] for _, payload in got] == want
        assert assert_records_equal(loop) == len(reqs) * 6
    finally:
        loop.stop()


POISON = 499


def poisoned_model():
    """A worker's model (built in the worker process) whose forward raises on token POISON."""
    model = small_model("A")
    forward = model.hidden_states

    def hidden_states(input_ids, *args, **kwargs):
        if (input_ids == POISON).any():
            raise RuntimeError("poisoned token")
        return forward(input_ids, *args, **kwargs)
    model.hidden_states = hidden_states
    return model, None


def test_a_failing_engine_step_fails_its_requests_and_the_worker_keeps_serving():
    loop = DisaggLoop(poisoned_model, DisaggOptions(replicas=1, device="cpu", warmup=False), TINY["vocab_size"],
                      TINY["max_position_embeddings"], dict(ENGINE))
    loop.start(timeout=120)
    try:
        (kind, message), = generate(loop, [(prompt(0, 20) + [POISON], GREEDY)], prefix="bad")
        assert kind == "error" and "internal error in both worker 0: RuntimeError: poisoned token" in message
        (kind, tokens), = generate(loop, [(prompt(0, 20), GREEDY)], prefix="good")
        assert kind == "done" and len(tokens[0]) == GREEDY.max_tokens and loop.workers[0].alive
    finally:
        loop.stop()


def test_a_send_to_a_vanished_peer_marks_it_dead_and_fails_its_transfers():
    """A p2p op that raises (the peer's connection is gone) does not raise in the worker: the peer counts as
    dead, its transfers are reported failed (the coordinator re-runs them), and the stand-in work reports the
    error to both completion trackers (gloo's waiting thread and NCCL's polling)."""
    import queue as queue_module

    from nanokimi.serve.worker import Completions, Worker

    worker = Worker.__new__(Worker)
    worker.rank, worker.dead, worker.outbox = 0, set(), queue_module.Queue()
    worker.sending = [(3, {}, {}), (2, {}, {})]
    worker.incoming = [{"wid": "a#0", "src": 3}, {"wid": "b#0", "src": 2}]

    def broken(tensor, peer):
        raise RuntimeError("Connection closed by peer")
    work = worker._p2p(broken, torch.zeros(1), 3)
    assert worker.dead == {3} and [s[0] for s in worker.sending] == [2]
    assert [t["wid"] for t in worker.incoming] == ["b#0"]
    assert worker.outbox.get_nowait()[1:3] == ("transfer_failed", "a#0")
    assert worker._p2p(broken, torch.zeros(1), 3).is_completed()  # a dead peer is not tried again
    for poll in (True, False):
        tracker = Completions(poll)
        entry = tracker.watch(3, [work])
        deadline = time.monotonic() + 5
        while not tracker.finished(entry) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tracker.finished(entry) and "unreachable" in entry["error"]
