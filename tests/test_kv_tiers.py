import pytest
import torch

from nanokimi.infer.tiers import KVTierStore


def block(seed: int, with_state: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"1.c_kv": torch.randn(16, 24, generator=g), "1.k_rope": torch.randn(16, 8, generator=g).bfloat16()}
    if with_state:
        out["0.state"] = torch.randn(2, 16, 16, generator=g)
        out["0.conv"] = torch.randn(3, 64, generator=g)
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def entry_bytes(store: KVTierStore, tensors) -> int:
    probe = KVTierStore(1 << 30, pin=False)
    probe.offload(b"x", tensors)
    return probe._entry_bytes


def test_cpu_round_trip_with_and_without_kda_snapshot():
    store = KVTierStore(1 << 20, pin=False)
    store.offload(b"\x01" * 16, block(1))
    store.offload(b"\x02" * 16, block(2, with_state=True))
    assert same(store.fetch(b"\x01" * 16), block(1))
    assert same(store.fetch(b"\x02" * 16), block(2, with_state=True))
    assert store.fetch(b"\x03" * 16) is None
    assert store.contains(b"\x01" * 16) and not store.contains(b"\x03" * 16)
    c = store.counters
    assert (c["cpu_hits"], c["misses"], c["offloads"]) == (2, 1, 2)
    assert store.stats()["cpu"]["hit_tokens"] == 2 * 16


def test_lru_eviction_spills_to_disk_and_disk_hits_come_back(tmp_path):
    size = entry_bytes(KVTierStore(0), block(0))
    store = KVTierStore(3 * size, tmp_path, pin=False)
    for i in range(5):
        store.offload(bytes([i]) * 16, block(i))
    assert len(store.cpu) == 3 and len(store.disk) == 2  # blocks 0 and 1 were the least recently used
    assert store._reserved <= 3 * size
    assert same(store.fetch(bytes([0]) * 16), block(0))
    assert store.counters["disk_hits"] == 1
    assert bytes([0]).hex() * 16 in store.cpu  # promoted back into the CPU pool
    reopened = KVTierStore(3 * size, tmp_path, pin=False)  # a new process finds the files by hash
    assert same(reopened.fetch(bytes([1]) * 16), block(1))


def test_buffers_are_reused_and_mixed_sizes_stay_within_budget(tmp_path):
    small, large = entry_bytes(KVTierStore(0), block(0)), entry_bytes(KVTierStore(0), block(0, True))
    budget = 2 * large + small
    store = KVTierStore(budget, tmp_path, disk_bytes=4 * large, pin=False)
    for i in range(40):
        store.offload(i.to_bytes(16, "big"), block(i, with_state=i % 3 == 0))
        assert store._reserved <= budget
    assert sum(store.disk.values()) <= 4 * large  # the disk tier keeps its own budget, oldest files go
    assert len(list(store.disk_dir.glob("*.safetensors"))) == len(store.disk)
    assert store.stats()["cpu"]["usage"] == sum(e.buffer.numel() for e in store.cpu.values()) / budget
    for i in range(36, 40):  # the newest are in the CPU pool, intact
        got = store.fetch(i.to_bytes(16, "big"))
        assert got is not None and same(got, block(i, with_state=i % 3 == 0))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_serves_an_evicted_prefix_from_the_cpu_and_disk_tiers_exactly(tmp_path, device):
    """A GPU pool of 24 blocks cannot hold four 200-token prompts: the first one's blocks (and its KDA
    snapshot) are evicted, then a resend of it is served from the lower tier: same tokens as recomputing.
    On CUDA the CPU pool is pinned and the copies cross the bus (fp32 there too, so tokens compare exactly)."""
    from nanokimi.infer import LLM, SamplingParams
    from serve_util import make_checkpoint

    ckpt = make_checkpoint(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 500, (200,), generator=g).tolist() for _ in range(4)]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    roomy = LLM(str(ckpt), device=device, dtype="float32", max_cache_tokens=4096)  # nothing is ever evicted
    want = [o.outputs[0].token_ids for o in roomy.generate(prompt_token_ids=prompts, sampling_params=greedy,
                                                           use_tqdm=False)]
    hit = roomy.generate(prompt_token_ids=[prompts[0]], sampling_params=greedy, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 192  # the same resend, served from GPU blocks
    if device == "cpu":
        assert hit.outputs[0].token_ids == want[0]  # and on the CPU bit-equal to recomputing
    for name, store in (("cpu", KVTierStore(1 << 26)), ("disk", KVTierStore(0, tmp_path / "kv"))):
        llm = LLM(str(ckpt), device=device, dtype="float32", max_cache_tokens=24 * 16, kv_tiers=store)
        for p, w in zip(prompts, want):  # each prompt pushes the previous one out of the GPU pool
            out = llm.generate(prompt_token_ids=[p], sampling_params=greedy, use_tqdm=False)[0]
            assert out.outputs[0].token_ids == w
        assert llm.engine.num_cached_tokens(prompts[0]) == 192  # all in the lower tier now
        again = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=greedy, use_tqdm=False)[0]
        assert again.num_cached_tokens == 192 and again.outputs[0].token_ids == hit.outputs[0].token_ids
        tiers = llm.stats()["kv_tiers"]
        assert tiers[name]["hit_tokens"] == 192, tiers
        assert llm.stats()["cache_blocks_free"] == llm.stats()["cache_blocks_total"]


def test_a_snapshot_evicted_for_an_interior_one_goes_down_before_the_step_overwrites_it():
    """One snapshot slot: b's prefill takes it for an interior snapshot, evicting a's (to the CPU tier) in the
    step that writes b's state there. The tier must hold a's state, so an extension of a is exact (before, the
    eviction was copied down after the step, with b's state in it)."""
    from test_engine import GREEDY, greedy_alone, make_model, prompts, run_engine
    from nanokimi.infer import Engine

    model = make_model("tiny")
    a, b = prompts(2, seed=21, lengths=(20, 23))
    engine = Engine(model, block_size=4, max_cache_tokens=4096, max_num_seqs=1, num_state_snapshots=1,
                    snapshot_interval=10 ** 6, kv_tiers=KVTierStore(64 << 20, block_size=4))
    run_engine(engine, [("a", a, GREEDY)])
    run_engine(engine, [("b", b, GREEDY)])  # interior snapshot at 20 (its resend point) evicts a's at 20
    extended = a + [5, 6, 7, 8, 9]
    after_a = engine.prompt_hashes(extended)[len(a) // 4 - 1]
    assert after_a not in engine.slots.snapshots and engine.tiers.has_state(after_a)  # a's state is only down there
    done = run_engine(engine, [("c", extended, GREEDY)])["c"]
    assert done.num_cached_tokens == 20
    assert done.token_ids == greedy_alone(model, extended, GREEDY.max_tokens)


def test_clear_forgets_every_tier(tmp_path):
    store = KVTierStore(entry_bytes(KVTierStore(0), block(0)), tmp_path, pin=False)
    for i in range(3):
        store.offload(bytes([i]) * 16, block(i))
    assert len(store.cpu) == 1 and len(store.disk) == 2
    store.clear()
    assert not any(store.contains(bytes([i]) * 16) for i in range(3))
    assert not list(store.disk_dir.glob("*.safetensors"))
    store.offload(b"\x09" * 16, block(9))  # the freed buffer is reused
    assert same(store.fetch(b"\x09" * 16), block(9))


class FakeEvent:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(("host waits", self.name))


class FakeStream:
    """Stands in for the side CUDA stream: records what the store queues on it, in order."""

    def __init__(self, log: list):
        self.log, self.copies = log, 0

    def wait_event(self, event):
        self.log.append(("stream waits", event.name))

    def record_event(self):
        self.copies += 1
        self.log.append(("recorded", f"copy{self.copies}"))
        return FakeEvent(self.log, f"copy{self.copies}")


def packed(seeds, with_state=False):
    from nanokimi.infer.tiers import layout_of, unpack
    layout, nbytes = layout_of(block(0, with_state))
    rows = torch.empty(len(seeds), nbytes, dtype=torch.uint8)
    for row, seed in zip(rows, seeds):
        for name, view in unpack(row, layout).items():
            view.copy_(block(seed, with_state)[name])
    return rows, layout, nbytes


def test_packed_rows_round_trip_like_the_dict_path_and_count_what_the_tier_saved():
    rows, layout, nbytes = packed([1, 2, 3], with_state=True)
    store = KVTierStore(1 << 20, pin=False)
    store.offload_rows([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16], rows, layout)
    assert nbytes == entry_bytes(store, block(0, True))  # same entry format as offload(dict)
    for i in (1, 3, 3):
        assert same(store.fetch(bytes([i]) * 16), block(i, with_state=True))
    c = store.counters
    assert (c["offloads"], c["offloads_hit"], c["cpu_hits"], c["bytes_down"]) == (3, 2, 3, 3 * nbytes)
    assert c["copies_down"] == 1  # three neighbouring buffers of a fresh pool: one copy


def test_a_reused_buffer_is_rewritten_only_after_its_copies_and_read_only_after_them(tmp_path):
    """With copies queued on a stream, every buffer carries the event of its last copy: the stream waits for it
    before copying a new entry into a recycled buffer, the host waits for it before reading (fetch, spill to
    disk). The CPU copies here are real, so the bytes must also come out right."""
    log = []
    rows, layout, nbytes = packed([1, 2, 3])
    store = KVTierStore(2 * nbytes, tmp_path, pin=False)
    stream = FakeStream(log)
    store.offload_rows([b"\x01" * 16, b"\x02" * 16], rows[:2], layout, stream=stream)
    assert log == [("recorded", "copy1")]
    store.offload_rows([b"\x03" * 16], rows[2:], layout, stream=stream)  # evicts entry 1, reuses its buffer
    assert log == [("recorded", "copy1"), ("host waits", "copy1"),  # spill to disk reads entry 1: after its copy
                   ("stream waits", "copy1"), ("recorded", "copy2")]  # the new copy queues after the old one
    del log[:]
    assert same(store.fetch(b"\x03" * 16), block(3)) and log == [("host waits", "copy2")]
    assert same(store.fetch(b"\x01" * 16), block(1))  # from disk, intact
    assert store.counters["disk_hits"] == 1 and store.counters["offloads_hit"] == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_cpu_pool_smaller_than_the_evictions_recycles_buffers_and_stays_exact(tmp_path, device):
    """The CPU pool holds a handful of entries, so buffers are recycled while (on CUDA) earlier copies into and
    out of them may still be in flight; prompts come back in an order that hits the GPU, the CPU tier and
    neither. Every output equals recomputation."""
    from nanokimi.infer import LLM, SamplingParams
    from nanokimi.infer.tiers import TieredCache
    from serve_util import make_checkpoint

    ckpt = make_checkpoint(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 500, (200,), generator=g).tolist() for _ in range(4)]
    order = [0, 1, 2, 0, 3, 1, 0, 2]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    roomy = LLM(str(ckpt), device=device, dtype="float32", max_cache_tokens=4096)
    want = {i: roomy.generate(prompt_token_ids=[prompts[i]], sampling_params=greedy, use_tqdm=False)[0]
            .outputs[0].token_ids for i in range(4)}
    probe = TieredCache(KVTierStore(0), roomy.engine.runner.cache)
    store = KVTierStore(16 * probe.block_bytes + 2 * probe.state_bytes)
    llm = LLM(str(ckpt), device=device, dtype="float32", max_cache_tokens=24 * 16, kv_tiers=store)
    for i in order:
        out = llm.generate(prompt_token_ids=[prompts[i]], sampling_params=greedy, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want[i], (i, out.num_cached_tokens)
    c = store.counters
    assert c["offloads"] > len(store.cpu) + 16, c  # entries were evicted from the CPU pool: buffers recycled
    assert c["cpu_hits"] > 0 and c["bytes_up"] > 0, c
    assert llm.stats()["cache_blocks_free"] == llm.stats()["cache_blocks_total"]


def test_reserve_allocates_the_pool_up_front_and_carving_uses_it():
    size = entry_bytes(KVTierStore(0), block(0))
    store = KVTierStore(5 * size, pin=False)
    store.reserve()
    assert sum(c.numel() for c in store._ready) == 5 * size
    chunk = store._ready[0]
    for i in range(7):  # two past the budget: recycled, never a new allocation
        store.offload(bytes([i]) * 16, block(i))
    assert not store._ready and store._chunk is chunk and len(store.cpu) == 5
    assert same(store.fetch(bytes([6]) * 16), block(6))
