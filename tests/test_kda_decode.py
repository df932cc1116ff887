"""The in-place KDA decode kernel (ops.kda.decode) against its gathered reference (Triton's CPU interpreter
here), and inside the engine: the same greedy tokens as the plain forward."""
import pytest
import torch

from conftest import rel_err
from nanokimi.model.kda import l2_normalize
from nanokimi.ops.kda.decode import kda_chains_reference, kda_decode_slots, kda_decode_slots_reference
from nanokimi.ops.kda.naive import kda_recurrent
from nanokimi.ops.paged_mla import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")


def case(S, H, K, V, N, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(S, H, K, generator=g)).to(device, dtype)
    k = l2_normalize(torch.randn(S, H, K, generator=g)).to(device, dtype)
    v = torch.randn(S, H, V, generator=g).to(device, dtype)
    gate = (-torch.rand(S, H, K, generator=g) * 2).to(device)
    beta = torch.rand(S, H, generator=g).to(device)
    state = torch.randn(N, H, K, V, generator=g).to(device)
    slots = torch.randperm(N, generator=g)[:S].to(device)  # distinct slots, in any order
    return q, k, v, gate, beta, state, slots


@needs_triton
@pytest.mark.parametrize("S,H,K,V,N,block_v", [(5, 3, 16, 24, 9, 16), (2, 1, 32, 32, 2, 32), (4, 2, 20, 16, 6, 16)])
def test_kda_decode_kernel_equals_the_reference_and_touches_only_its_slots(S, H, K, V, N, block_v):
    q, k, v, gate, beta, state, slots = case(S, H, K, V, N)
    expected_state, got_state = state.clone(), state.clone()
    expected = kda_decode_slots_reference(q, k, v, gate, beta, expected_state, slots, 0.3)
    got = kda_decode_slots(q, k, v, gate, beta, got_state, slots, 0.3, block_v=block_v)
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got_state, expected_state) < 1e-5
    untouched = [i for i in range(N) if i not in slots.tolist()]
    assert torch.equal(got_state[untouched], state[untouched])
    assert not torch.equal(got_state[slots], state[slots])


def shared_slot_chains(seed=3):
    """Chains of 4, 1 and 3 tokens whose rows share their chain's slot (a prefill's short segments)."""
    q, k, v, gate, beta, state, _ = case(8, 2, 16, 24, 6, seed=seed)
    slots = torch.tensor([4, 4, 4, 4, 0, 2, 2, 2])
    depths = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2])
    return q, k, v, gate, beta, state, slots, depths


def test_shared_slot_chains_reference_equals_each_chain_as_one_recurrence():
    q, k, v, gate, beta, state, slots, depths = shared_slot_chains()
    got_state = state.clone()
    got = kda_chains_reference(q, k, v, gate, beta, got_state, slots, 0.3, depths, rounds=4)
    for a, b in ((0, 4), (4, 5), (5, 8)):
        slot = int(slots[a])
        o, final = kda_recurrent(*(t[None, a:b] for t in (q, k, v, gate, beta)), scale=0.3,
                                 initial_state=state[slot:slot + 1], output_final_state=True)
        assert rel_err(got[a:b], o[0]) < 1e-6 and rel_err(got_state[slot], final[0]) < 1e-6
    assert torch.equal(got_state[[1, 3, 5]], state[[1, 3, 5]])


@needs_triton
def test_kda_decode_kernel_steps_chains_that_share_a_slot():
    """The kernel keeps a chain's state in registers, so a chain whose rows all name one slot ends with the
    state after its last token there: kda_chains_reference's result (the prefill's short segments)."""
    q, k, v, gate, beta, state, slots, depths = shared_slot_chains()
    expected_state, got_state = state.clone(), state.clone()
    expected = kda_chains_reference(q, k, v, gate, beta, expected_state, slots, 0.3, depths, rounds=4)
    got = kda_decode_slots(q, k, v, gate, beta, got_state, slots, 0.3, block_v=16, depths=depths, rounds=4)
    assert rel_err(got, expected) < 1e-5 and rel_err(got_state, expected_state) < 1e-5


@needs_triton
def test_kda_decode_kernel_reads_strided_views_as_the_engine_passes_them():
    """q, k, v as slices of one projection [S, 3 H K] (the engine's layout), g and beta as views with a
    size-1 token dimension: read in place, the same result as the reference on contiguous copies."""
    S, H, K, N = 4, 2, 16, 6
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(S, 3 * H * K, generator=g)
    q, k, v = (t.reshape(S, H, K) for t in qkv.split(H * K, dim=-1))
    q, k = l2_normalize(q), l2_normalize(k)  # contiguous again: take strided slices of a wider tensor instead
    q, k = (torch.cat([t, t], dim=-1)[..., :K] for t in (q, k))
    assert not v.is_contiguous() and not q.is_contiguous()
    gate = -torch.rand(S, 1, H, K, generator=g)[:, 0]
    beta = torch.rand(S, 1, H, generator=g)[:, 0]
    state = torch.randn(N, H, K, K, generator=g)
    slots = torch.tensor([5, 1, 0, 3])
    expected_state, got_state = state.clone(), state.clone()
    expected = kda_decode_slots_reference(*(t.contiguous() for t in (q, k, v, gate, beta)), expected_state, slots, 0.25)
    got = kda_decode_slots(q, k, v, gate, beta, got_state, slots, 0.25, block_v=16)
    assert rel_err(got, expected) < 1e-5 and rel_err(got_state, expected_state) < 1e-5


@needs_triton
def test_engine_through_the_kda_decode_kernel(monkeypatch):
    """KDA decode rows on the kernel (KDA_DECODE="triton"), eagerly and in the padded graph step: the
    tokens of the plain forward."""
    import nanokimi.model.paged as paged
    from test_engine import GREEDY, greedy_alone, make_model, prompts, run_engine
    from nanokimi.infer import Engine

    monkeypatch.setattr(paged, "KDA_DECODE", "triton")
    model = make_model("tiny").float()
    batch = prompts(5, seed=44)
    expected = [greedy_alone(model, p, 5) for p in batch]
    for graphs in (False, "static"):
        engine = Engine(model, block_size=16, use_cuda_graph=graphs)
        assert "Triton in-place slot kernel" in engine.report
        done = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(batch)], stagger=2)
        assert [done[str(i)].token_ids for i in range(5)] == expected
    # verify rows in the graph step: each draft's chain stepped by the kernel, the accepted state copied back
    from test_speculative import OracleDrafter
    reference = {(str(i), 0): tokens for i, tokens in enumerate(expected)}
    engine = Engine(model, block_size=16, use_cuda_graph="static", num_speculative_tokens=3,
                    speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
    done = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(batch)], stagger=2)
    assert [done[str(i)].token_ids for i in range(5)] == expected
    assert engine.runner.verify_rows["graphed"] == engine.stats()["spec_verify_rows"] > 0


@pytest.mark.gpu
def test_kda_decode_kernel_on_cuda_bf16_and_its_start_up_check():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import nanokimi.model.paged as paged
    device = torch.device("cuda")
    q, k, v, gate, beta, state, slots = case(37, 8, 128, 128, 300, device="cuda", dtype=torch.bfloat16)
    expected_state, got_state = state.clone(), state.clone()
    expected = kda_decode_slots_reference(q, k, v, gate, beta, expected_state, slots, 128 ** -0.5)
    got = kda_decode_slots(q, k, v, gate, beta, got_state, slots, 128 ** -0.5)
    assert rel_err(got, expected) < 1e-2 and rel_err(got_state, expected_state) < 1e-3
    assert paged.check_kda_slot_kernel(device) and paged.use_kda_slot_kernel(device)


@needs_triton
@pytest.mark.slow
def test_compiled_static_decode_step_gives_the_tokens_of_the_plain_forward(monkeypatch):
    """compile=True compiles the padded decode step that CUDA graphs capture (on CUDA the default): the
    step torch.compile traces, with the KDA kernel, the block-table width marked dynamic and the inputs as
    views of one buffer, still gives the plain forward's tokens."""
    import nanokimi.model.paged as paged
    from test_engine import GREEDY, greedy_alone, make_model, run_engine
    from nanokimi.infer import Engine

    monkeypatch.setattr(paged, "KDA_DECODE", "triton")
    model = make_model("tiny").float()
    prompts = [[5, 17, 3, 99, 4, 250, 31], [8, 1, 2]]
    # a budget that the first compilation exhausts: the first bucket is compiled, the next one is not
    engine = Engine(model, block_size=16, use_cuda_graph="static", compile=True, compile_budget_s=1e-3)
    assert engine.runner.compiled and "torch.compile" in engine.report
    done = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts)], stagger=1)
    assert [done[str(i)].token_ids for i in range(2)] == [greedy_alone(model, p, 5) for p in prompts]
    assert engine.runner.compiled  # the compiled capture did not fall back
    stats = engine.stats()
    assert stats["cuda_graphs_compiled"] == 1 < stats["cuda_graphs"] and stats["compile_seconds"] > 0


def chains_case(seed=3):
    """Rows of chains of 3, 1 and 4 tokens (depths 0 1 2 | 0 | 0 1 2 3) and two padding rows on one spare slot;
    each row writes its own slot (a chain's first row: its sequence's slot; the others: scratch slots)."""
    depths = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 0, 0])
    slots = torch.tensor([7, 2, 9, 0, 4, 11, 3, 5, 12, 12])
    q, k, v, gate, beta, state, _ = case(len(depths), 2, 16, 24, 13, seed=seed)
    return q, k, v, gate, beta, state, slots, depths


def test_kda_decode_chains_reference_steps_each_chain_token_by_token():
    """The chains' rounds (kda_decode_slots_reference with depths) equal one recurrence per chain from its first
    slot: the outputs, and in each row's slot the state after that row's token; no other slot changes."""
    from nanokimi.ops.kda.naive import kda_recurrent
    q, k, v, gate, beta, state, slots, depths = chains_case()
    got_state = state.clone()
    got = kda_decode_slots_reference(q, k, v, gate, beta, got_state, slots, 0.3, depths=depths, rounds=5)
    for a, b in [(0, 3), (3, 4), (4, 8)]:
        s = state[slots[a]:slots[a] + 1]
        for t in range(a, b):
            o, s = kda_recurrent(*(x[t:t + 1, None] for x in (q, k, v, gate, beta)), scale=0.3, initial_state=s,
                                 output_final_state=True)
            assert torch.equal(got[t], o[0, 0]) and torch.equal(got_state[slots[t]], s[0])
    untouched = [i for i in range(13) if i not in slots.tolist()]
    assert torch.equal(got_state[untouched], state[untouched])


@needs_triton
def test_kda_decode_kernel_steps_chains_as_the_reference():
    """The kernel with depths (a chain's first row's programs step the whole chain) against the rounds of the
    reference, with more rounds than the longest chain."""
    q, k, v, gate, beta, state, slots, depths = chains_case(seed=5)
    expected_state, got_state = state.clone(), state.clone()
    expected = kda_decode_slots_reference(q, k, v, gate, beta, expected_state, slots, 0.3, depths=depths, rounds=5)
    got = kda_decode_slots(q, k, v, gate, beta, got_state, slots, 0.3, block_v=16, depths=depths, rounds=9)
    real = slice(0, 8)  # the padding rows share slot 12: undefined there
    assert rel_err(got[real], expected[real]) < 1e-5
    keep = [i for i in range(13) if i != 12]
    assert rel_err(got_state[keep], expected_state[keep]) < 1e-5


@needs_triton
def test_engine_prefill_short_segments_through_the_kernel(monkeypatch):
    """The CUDA prefill path (varlen rounds; fla stood in for by kda() per sequence) with the slot kernel taking
    each prompt's last partial block, after its check passed: the tokens of the plain forward, and the
    kernel stepped those segments."""
    import nanokimi.model.paged as paged
    from test_engine import GREEDY, greedy_alone, make_model, prompts, run_engine
    from test_prefill_host import varlen_on_the_cpu
    from nanokimi.infer import Engine

    kernel, rounds = paged.kda_decode_slots_outside_compile, []

    def counted(*args, **kwargs):
        rounds.append(kwargs.get("rounds", 1) if kwargs.get("depths") is not None else 0)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(paged, "KDA_DECODE", "triton")
    monkeypatch.setattr(paged, "use_varlen_kda", lambda device: True)
    monkeypatch.setattr(paged, "kda_fla_varlen_outside_compile", varlen_on_the_cpu)
    monkeypatch.setattr(paged, "kda_decode_slots_outside_compile", counted)
    monkeypatch.setattr(paged, "SHORT_SEGMENTS_CHECKED", {})
    model = make_model("tiny").float()
    batch = prompts(5, seed=45)
    expected = [greedy_alone(model, p, 5) for p in batch]
    engine = Engine(model, block_size=8, use_cuda_graph=False, snapshot_interval=16)
    done = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(batch)], stagger=2)
    assert [done[str(i)].token_ids for i in range(5)] == expected
    assert paged.SHORT_SEGMENTS_CHECKED == {"cpu": True}
    assert any(r > 1 for r in rounds)  # chains of several tokens: prefill segments (decode rows have none)


@needs_triton
def test_the_start_up_kernel_checks_pass_where_the_kernel_is_right():
    """The cases the engine's start-up checks run (check_kda_slot_kernel on CUDA, check_short_segments) are
    within their bound here, so a wrong check cannot quietly take the kernel away from a GPU."""
    import nanokimi.model.paged as paged

    cpu = torch.device("cpu")
    for depths in (None, [0, 1, 2, 0, 1]):
        assert paged._slot_kernel_error(cpu, [4, 0, 6, 1, 3], depths, 3, paged.kda_decode_slots_reference, 0) < 2e-2
    assert paged._slot_kernel_error(cpu, [3, 3, 3, 3, 0, 4, 4], [0, 1, 2, 3, 0, 0, 1], 4,
                                    paged.kda_chains_reference, 1) < 2e-2
