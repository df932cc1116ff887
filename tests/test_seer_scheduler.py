"""Seer's scheduling options: context-aware admission (group probes first, then the longest expected rest),
a bounded wait however adversarial the arrivals, divided rollout (suspend at chunk ends, resume in place),
and none of it changes a greedy token, loses a request or runs one twice."""
import random

import pytest

from test_engine import make_model, prompts
from nanokimi.infer import Engine, SamplingParams


def drive(engine: Engine, arrivals: dict[int, list], max_steps: int = 10_000):
    """Add arrivals[step] before each step; return ({request_id: finished outputs}, {request_id: (added step,
    first scheduled step)}, number of finished outputs seen per request)."""
    finished, added, scheduled, seen = {}, {}, {}, {}
    step = 0
    while step < max_steps and (engine.has_unfinished() or any(s >= step for s in arrivals)):
        for request_id, ids, params in arrivals.get(step, []):
            engine.add_request(request_id, ids, params)
            added[request_id] = step
        for out in engine.step():
            if out.metrics["first_scheduled_time"] is not None:
                scheduled.setdefault(out.request_id, step)
            if out.finished:
                seen[out.request_id] = seen.get(out.request_id, 0) + 1
                finished[out.request_id] = [c.token_ids for c in out.outputs]
        step += 1
    return finished, {r: (added[r], scheduled.get(r)) for r in added}, seen


def group_requests(name: str, count: int, max_tokens: int, group: str):
    ids = prompts(1, seed=hash(group) % 1000)[0][:5]
    return [(f"{name}{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, group_id=group))
            for i in range(count)]


@pytest.mark.parametrize("scheduling", ["fcfs", "context_aware"])
def test_context_aware_admits_probes_then_the_longest_expected_group(scheduling):
    model = make_model("tiny-dense")
    engine = Engine(model, max_cache_tokens=2048, max_num_seqs=2, scheduling=scheduling)
    requests = group_requests("short", 3, 2, "s") + group_requests("long", 3, 12, "l")
    _, times, _ = drive(engine, {0: requests})
    first = {r: t[1] for r, t in times.items()}
    assert first["short0"] == first["long0"] == 0 if scheduling == "context_aware" else first["short0"] == 0
    if scheduling == "context_aware":
        # short0 finished after 2 tokens: its group is expected short, so the long group's unknown rest goes first
        assert first["long1"] < first["short1"] and first["long2"] < first["short1"]
    else:
        assert first["short1"] < first["long1"]


def test_bounded_wait_under_a_stream_of_higher_priority_arrivals():
    model = make_model("tiny-dense")
    wait = 6
    engine = Engine(model, max_cache_tokens=4096, max_num_seqs=1, scheduling="context_aware", max_wait_steps=wait)
    low = [(f"low{i}", prompts(1, seed=9)[0][:4], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                                                 group_id="low")) for i in range(3)]
    arrivals = {0: low}
    for step in range(1, 80, 4):  # the engine's whole capacity: a new group whose probe outranks the low group
        arrivals[step] = group_requests(f"high{step}-", 1, 4, f"high{step}")
    finished, times, seen = drive(engine, arrivals)
    service = 5  # steps a request holds the one batch place at most
    for request_id, (added, first) in times.items():  # an aged request goes ahead of every younger one
        assert first is not None and first - added <= wait + 2 * service, (request_id, added, first)
    assert set(seen) == set(times) and set(seen.values()) == {1}
    # without the bound the low group starves until the arrivals stop
    engine = Engine(model, max_cache_tokens=4096, max_num_seqs=1, scheduling="context_aware", max_wait_steps=10 ** 6)
    _, starved, _ = drive(engine, arrivals)
    assert max(first - added for added, first in starved.values()) > 60


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,graphs", [("tiny", "auto"), ("tiny", "static"), ("tiny-dense", "static")])
def test_random_rollouts_under_every_option_give_the_plain_tokens_exactly_once(seed, name, graphs):
    """Drafts verified eagerly (the hybrid on the CPU's "auto") or in the padded graph step (static graph buffers:
    the hybrid's KDA chains with scratch slots, the GQA model's attention)."""
    model = make_model(name)
    rng = random.Random(seed)
    requests = []
    for g in range(5):
        ids = prompts(1, seed=seed * 10 + g)[0][:rng.randint(3, 20)]
        for i in range(4):
            params = SamplingParams(max_tokens=rng.choice([2, 3, 6, 14]), temperature=0, ignore_eos=True,
                                    group_id=f"g{g}", n=rng.choice([1, 1, 2]))
            requests.append((f"g{g}r{i}", ids, params))
    arrivals = {}
    for request in requests:
        arrivals.setdefault(rng.randint(0, 6), []).append(request)
    plain, _, _ = drive(Engine(model, max_cache_tokens=4096, max_num_seqs=4), arrivals)
    engine = Engine(model, max_cache_tokens=192, block_size=4, max_num_seqs=4, scheduling="context_aware",
                    max_wait_steps=5, chunk_tokens=2, speculative="suffix", num_speculative_tokens=3,
                    enable_prefix_caching=seed == 0, use_cuda_graph=graphs)
    seer, times, seen = drive(engine, arrivals)
    assert seer == plain
    assert set(seen) == {r for r, _, _ in requests} and set(seen.values()) == {1}
    stats = engine.stats()
    assert stats["suspensions"] > 0 and stats["spec_verify_rows"] > 0
    assert engine.runner.verify_rows["graphed" if graphs == "static" else "eager"] == stats["spec_verify_rows"]
    assert engine.pool.num_free == engine.pool.num_usable
    if engine.slots is not None:  # every state slot is free or holds a snapshot
        slots = engine.slots
        assert sorted(slots.free + list(slots.snapshots.values())) == list(range(slots.num_slots))
    assert not engine.scheduler.groups and not engine.scheduler.suspended


def test_bad_seer_options_get_one_line_errors():
    model = make_model("tiny-dense")
    for kwargs, match in [(dict(scheduling="lifo"), "scheduling must be"), (dict(num_speculative_tokens=0),
                          "num_speculative_tokens"), (dict(chunk_tokens=-1), "chunk_tokens"),
                          (dict(max_wait_steps=0), "max_wait_steps")]:
        with pytest.raises(ValueError, match=match):
            Engine(model, max_cache_tokens=256, **kwargs)


def test_divided_rollout_suspends_in_place_without_recomputing_anything():
    model = make_model("tiny")  # hybrid: a suspended sequence keeps its KDA state slot too
    requests = group_requests("short", 2, 2, "s") + group_requests("long", 4, 12, "l") + \
        group_requests("mid", 3, 6, "m")
    plain_engine = Engine(model, max_cache_tokens=4096, max_num_seqs=2)
    plain, _, _ = drive(plain_engine, {0: requests})
    engine = Engine(model, max_cache_tokens=4096, max_num_seqs=2, scheduling="context_aware", chunk_tokens=2)
    divided, _, _ = drive(engine, {0: requests})
    stats = engine.stats()
    assert divided == plain
    assert stats["suspensions"] > 0 and stats["preemptions"] == 0
    assert stats["prefill_tokens"] == plain_engine.stats()["prefill_tokens"]  # nothing was computed twice


def test_context_aware_admits_in_priority_order_ranking_the_queue_once_per_step():
    """Filling 256 places from 1024 waiting sequences admits them in priority order (probes, then the rest)
    with one ranking of the queue, not a scan of every waiting sequence per admission (that took ~0.1 s of
    host time in a rollout's first step)."""
    engine = Engine(make_model("tiny-dense"), max_cache_tokens=8192, max_num_seqs=256, scheduling="context_aware")
    for g, ids in enumerate(prompts(64, seed=5, lengths=(2, 3))):
        for j in range(16):
            engine.add_request(f"{g}.{j}", ids, SamplingParams(max_tokens=8, group_id=str(g)))
    scheduler = engine.scheduler
    expected = sorted(scheduler.waiting, key=scheduler.priority)[:256]
    calls = []
    priority = scheduler.priority
    scheduler.priority = lambda seq: calls.append(seq) or priority(seq)
    admitted = [seq for seq, _ in scheduler.schedule()]
    assert admitted == expected
    probes = admitted[:64]
    assert all(seq.index == 0 for seq in probes) and len({s.request.params.group_id for s in probes}) == 64
    assert len(calls) <= 1024
