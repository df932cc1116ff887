import random

import pytest

from nanokimi.serve.admission import Admission, StepTimeModel


def fitted(c0=0.004, cp=2e-5, cd=3e-4, noise=0.0, n=300) -> StepTimeModel:
    rng = random.Random(0)
    model = StepTimeModel()
    for _ in range(n):
        p, d = rng.choice([0, 0, 64, 512, 2000]), rng.randint(0, 64)
        model.observe(p, d, (c0 + cp * p + cd * d) * (1 + noise * rng.uniform(-1, 1)))
    return model


def test_step_model_recovers_its_coefficients():
    c0, cp, cd = fitted().coefficients()
    assert c0 == pytest.approx(0.004, rel=1e-6) and cp == pytest.approx(2e-5, rel=1e-6)
    assert cd == pytest.approx(3e-4, rel=1e-6)
    noisy = fitted(noise=0.1).coefficients()
    assert noisy[1] == pytest.approx(2e-5, rel=0.1) and noisy[2] == pytest.approx(3e-4, rel=0.2)


def test_no_samples_means_admit_everything():
    admission = Admission(0.001, 0.001, 2048, StepTimeModel())
    assert admission.decide(10_000, 10_000, [100] * 50, 10).admit


def test_ttft_prediction_counts_queued_prefill_and_rejects_past_the_slo():
    admission = Admission(ttft_slo_s=0.2, tbt_slo_s=None, step_tokens=2048, model=fitted())
    ttft, _, steps = admission.predict(1000, 0, [], 0)
    assert steps == 1 and ttft == pytest.approx(2 * 0.004 + 2e-5 * 1000)  # its chunk + the step in flight
    ttft, _, steps = admission.predict(1000, 5000, [], 3)  # 6000 tokens ahead of the first token: 3 chunks
    assert steps == 3 and ttft == pytest.approx(4 * 0.004 + 2e-5 * 6000)
    assert admission.decide(1000, 0, [], 0).admit
    verdict = admission.decide(1000, 20_000, [], 10)
    assert not verdict.admit and verdict.reason == "ttft" and verdict.retry_after_s >= 1


def test_tbt_uses_the_decode_batch_when_the_prefill_finishes():
    admission = Admission(ttft_slo_s=None, tbt_slo_s=0.0045 + 3e-4 * 10, step_tokens=256, model=fitted())
    _, tbt, steps = admission.predict(100, 0, [1] * 40 + [50] * 9, 0)
    assert steps == 1  # the 40 almost-done sequences are gone by then: 9 left + this one
    assert tbt == pytest.approx(0.004 + 3e-4 * 10)
    assert admission.decide(100, 0, [1] * 40 + [50] * 9, 0).admit
    verdict = admission.decide(100, 0, [50] * 49, 0)
    assert not verdict.admit and verdict.reason == "tbt"


BURST_CLIENT = """
import asyncio, json, sys, time
import httpx

async def one(http, url, i):
    body = {"prompt": [(7 * i + 3 * j) % 500 + 1 for j in range(320)], "max_tokens": 4, "stream": True,
            "temperature": 0}
    start = time.perf_counter()
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "error": json.loads(await r.aread())["error"]}
        first = None
        async for line in r.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - start
        return {"status": 200, "ttft": first}

async def main(url):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        return await asyncio.wait_for(asyncio.gather(*(one(http, url, i) for i in range(40))), timeout=240)

print(json.dumps(asyncio.run(main(sys.argv[1]))))
"""


def test_a_burst_beyond_capacity_gets_early_429s_and_admitted_requests_meet_the_ttft_slo(tmp_path):
    """40 prompts of 320 uncached tokens at once, 64-token steps, TTFT SLO 400 ms: the server can prefill only a
    few in time. The client runs in its own process (as real clients do); TTFT is checked as the server measures
    it (arrival at the ASGI app -> first token); the client's view is in the failure message.
    Every burst must be refused early in part; the timing must hold in one of up to three bursts, because a
    shared 2-core CI machine can stall a whole process for longer than the SLO (seen at load average ~10)."""
    import json
    import subprocess
    import sys

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from nanokimi.serve.app import ServeOptions, Server, create_app
    from nanokimi.serve.run import BackgroundServer
    from serve_util import make_checkpoint

    def scrape(url):
        return {(s.name, s.labels.get("le"), s.labels.get("reason")): s.value
                for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                for s in family.samples}

    slo_s = 0.4
    server = Server.load(str(make_checkpoint(tmp_path)), ServeOptions(device="cpu", max_cache_tokens=8192,
                                                                      max_step_tokens=64, ttft_slo_ms=slo_s * 1000,
                                                                      slo_headroom=0.6))
    bursts = []
    with BackgroundServer(create_app(server)) as bg:
        for _ in range(3):
            before = scrape(bg.url)
            out = subprocess.run([sys.executable, "-c", BURST_CLIENT, bg.url], capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode == 0, out.stderr
            results, after = json.loads(out.stdout), scrape(bg.url)
            rejected = [r for r in results if r["status"] == 429]
            admitted = [r for r in results if r["status"] == 200]
            assert rejected and admitted and len(rejected) + len(admitted) == 40, results
            for r in rejected:
                assert r["error"]["code"] == "rate_limit_exceeded" and int(r["retry_after"]) >= 1
            key = ("nanokimi_requests_rejected_total", None, "ttft")
            assert after[key] - before[key] == len(rejected)

            def delta(k):
                return after[k] - before[k]
            count = delta(("nanokimi_time_to_first_token_seconds_count", None, None))
            within = delta(("nanokimi_time_to_first_token_seconds_bucket", str(slo_s), None))
            assert count == len(admitted)
            bursts.append((within, count, sorted(round(r["ttft"], 3) for r in admitted)))
            if within == count:
                break
    assert bursts[-1][0] == bursts[-1][1], f"(admitted within the SLO, admitted, client TTFTs) per burst: {bursts}"


def test_dispatch_prefers_the_most_cached_prompt_until_someone_waited_too_long(tmp_path):
    """The server's own queue: with the engine idle and room for one prompt per step, a later request whose
    prefix is cached goes first; once the oldest has waited max_wait_s, it goes first whatever is cached."""
    import asyncio

    from nanokimi.infer import LLM, SamplingParams
    from nanokimi.serve.loop import EngineLoop, Ticket
    from serve_util import make_checkpoint

    llm = LLM(str(make_checkpoint(tmp_path)), device="cpu", max_cache_tokens=4096)
    shared = [(5 * j) % 400 + 1 for j in range(96)]
    llm.generate(prompt_token_ids=[shared + [7]], sampling_params=SamplingParams(max_tokens=1), use_tqdm=False)
    cold, warm = [(3 * j) % 400 + 2 for j in range(97)], shared + [9] * 20
    aio = asyncio.new_event_loop()
    try:
        for max_wait_s, first in ((60.0, "warm"), (0.0, "cold")):
            loop = EngineLoop(llm.engine, SamplingParams, 512, 512, step_tokens=16, max_wait_s=max_wait_s,
                              warmup=False)
            for name, ids in (("cold", cold), ("warm", warm)):
                loop._admit(Ticket(name, ids, SamplingParams(max_tokens=1), asyncio.Queue(), aio))
            uncached = {t.request_id: t.uncached for t in loop._pending}
            assert uncached["cold"] == 97 and uncached["warm"] <= 20  # the shared 96 tokens are cached
            loop._dispatch(llm.engine.stats())
            assert [t.request_id for t in loop._pending] == [{"warm": "cold", "cold": "warm"}[first]]
            assert loop._tickets[first].dispatched
            while llm.engine.has_unfinished():
                llm.engine.step()
    finally:
        aio.close()


def test_one_off_stalls_do_not_poison_the_step_model():
    model = fitted()
    before = model.coefficients()
    for _ in range(5):
        model.observe(512, 8, 3.0)  # e.g. a CUDA graph capture: 3 s for a ~20 ms step
    assert model.coefficients() == pytest.approx(before)


def test_a_request_sharing_a_prefix_in_flight_waits_for_it_and_then_reuses_it(tmp_path):
    """Two requests with the same 96-token prefix, nothing cached (the hybrid model keeps a KDA snapshot at the
    first prompt's last full block, so the prefix is reusable): the first goes to the engine; the second is
    held back while the first's prefill runs (dispatching it would compute the same blocks twice), then goes
    with the prefix cached. With max_wait_s=0 nobody is held back, nor when the shared part would not be
    reusable anyway (it ends where the hybrid model keeps no state snapshot)."""
    import asyncio
    import time

    from nanokimi.infer import LLM, SamplingParams
    from nanokimi.serve.loop import EngineLoop, Ticket
    from serve_util import make_checkpoint

    shared = [(5 * j) % 400 + 1 for j in range(96)]
    aio = asyncio.new_event_loop()
    try:
        for max_wait_s in (60.0, 0.0):
            llm = LLM(str(make_checkpoint(tmp_path)), device="cpu", max_cache_tokens=4096)
            llm.engine.stream_outputs = True  # as the server runs it: every step reports its tokens
            loop = EngineLoop(llm.engine, SamplingParams, 512, 512, step_tokens=512, max_wait_s=max_wait_s,
                              warmup=False)
            # ignore_eos: a first token that happens to be the end id would finish "first" before the checks below
            for name, tail in (("first", [7]), ("second", [9] * 20)):  # first's last full block ends the prefix
                loop._admit(Ticket(name, shared + tail, SamplingParams(max_tokens=2, ignore_eos=True), asyncio.Queue(),
                                   aio))
            loop._dispatch(llm.engine.stats())
            if max_wait_s == 0.0:
                assert not loop._pending  # both went at once
                llm.engine.abort("first"), llm.engine.abort("second")
                loop._tickets.clear()
                # the hybrid model could not reuse a prefix ending mid-prompt (no KDA snapshot there): no waiting
                for name, ids in (("third", shared[:80] + [7] * 40), ("fourth", shared + [9] * 20)):
                    loop._admit(Ticket(name, ids, SamplingParams(max_tokens=2, ignore_eos=True), asyncio.Queue(), aio))
                loop.max_wait_s = 60.0
                loop._dispatch(llm.engine.stats())
                assert not loop._pending
                continue
            assert [t.request_id for t in loop._pending] == ["second"]
            loop._dispatch(llm.engine.stats())
            assert [t.request_id for t in loop._pending] == ["second"]  # still held: the prefix is in flight
            while loop._tickets["first"].first_token is None:
                loop._deliver(llm.engine.step(), time.perf_counter())
            assert llm.engine.num_cached_tokens(shared + [9] * 20) == 96
            loop._dispatch(llm.engine.stats())
            assert not loop._pending and loop._tickets["second"].uncached == 20
            while llm.engine.has_unfinished():
                loop._deliver(llm.engine.step(), time.perf_counter())
            assert llm.stats()["prefix_cache_hit_tokens"] == 96
    finally:
        aio.close()
