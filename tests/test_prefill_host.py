"""The prefill step's batched host paths against the computations they replace: KDA state slot ops (zeros and
snapshot copies) batched per layer, and the packed delta rule (per piece with the state handed along, or in
rounds of one varlen call) against each piece's recurrence alone."""
import pytest
import torch

import nanokimi.model.paged as paged
from nanokimi.model.cache import RecurrentCache
from nanokimi.model.paged import PrefillPiece, apply_state_slot_ops
from nanokimi.ops.kda import kda, kda_recurrent


def slot_ops_in_order(layers, ops):
    """The reference: one op at a time, as the engine ran them."""
    for op in ops:
        for layer in layers:
            if op[0] == "zero":
                layer.conv[op[1]].zero_()
                layer.state[op[1]].zero_()
            else:
                layer.conv[op[2]].copy_(layer.conv[op[1]])
                layer.state[op[2]].copy_(layer.state[op[1]])


def test_state_slot_ops_batched_equal_the_ops_in_order():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        layers = [RecurrentCache(torch.randn(7, 3, 5, generator=g), torch.randn(7, 2, 4, 4, generator=g))
                  for _ in range(2)]
        expected = [RecurrentCache(layer.conv.clone(), layer.state.clone()) for layer in layers]
        ops = []
        for _ in range(int(torch.randint(1, 12, (), generator=g))):  # slots collide often: reads after writes
            a, b = torch.randint(0, 7, (2,), generator=g).tolist()
            ops.append(("zero", a) if torch.rand((), generator=g) < 0.4 else ("copy", a, b))
        apply_state_slot_ops(layers, ops)
        slot_ops_in_order(expected, ops)
        for got, want in zip(layers, expected):
            assert torch.equal(got.conv, want.conv) and torch.equal(got.state, want.state), (trial, ops)
    with pytest.raises(ValueError, match="state slot ops"):
        apply_state_slot_ops(layers, [("load", 1, 2)])


def varlen_on_the_cpu(q, k, v, g, beta, scale, initial_state, bounds, bounds_on_host):
    """fla's varlen chunk_kda stood in for by kda() per sequence (the same maths, sequence by sequence)."""
    assert bounds_on_host.device.type == "cpu" and torch.equal(bounds_on_host, bounds.cpu())
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        o, final = kda(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], scale=scale,
                       initial_state=initial_state[i:i + 1], output_final_state=True)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals)


@pytest.mark.parametrize("varlen,short", [(False, None), (True, None), (True, 4), (True, 16)])
@pytest.mark.parametrize("layout", ["snapshots", "one round"])
def test_packed_delta_rule_equals_each_piece_alone(varlen, short, layout, monkeypatch):
    """_kda_varlen over packed pieces (with interior snapshots: rounds where some pieces are done) gives each
    piece's outputs, final state and snapshot states of its own recurrence from its slot. short: rounds whose
    segments have at most this many tokens step through the slot kernel's chains (its torch reference)."""
    chain_calls = []
    if varlen:
        monkeypatch.setattr(paged, "use_varlen_kda", lambda device: True)
        monkeypatch.setattr(paged, "kda_fla_varlen_outside_compile", varlen_on_the_cpu)
    if short:
        reference = paged.kda_chains_reference

        def chains(*args, **kwargs):
            chain_calls.append(kwargs["rounds"])
            return reference(*args, **kwargs)
        monkeypatch.setattr(paged, "SHORT_SEGMENTS", "reference")
        monkeypatch.setattr(paged, "SHORT_SEGMENT", short)
        monkeypatch.setattr(paged, "kda_chains_reference", chains)
    else:
        monkeypatch.setattr(paged, "SHORT_SEGMENTS", "off")
    g = torch.Generator().manual_seed(1)
    H, D = 2, 4
    lengths = [9, 4, 13, 6]
    snapshots = ([[(3, 4), (7, 5)], [], [(5, 6)], [(2, 7)]] if layout == "snapshots" else [[], [], [], []])
    pieces, spans, offset = [], [], 0
    for i, (n, snaps) in enumerate(zip(lengths, snapshots)):
        pieces.append(PrefillPiece(offset, n, 0, torch.zeros(1, dtype=torch.long), i, snaps))
        spans.append((offset, offset + n))
        offset += n
    N = offset
    q = torch.nn.functional.normalize(torch.randn(1, N, H, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, N, H, D, generator=g), dim=-1)
    v = torch.randn(1, N, H, D, generator=g)
    gate = -torch.rand(1, N, H, D, generator=g)
    beta = torch.rand(1, N, H, generator=g)
    cache = RecurrentCache(torch.zeros(8, 3, 6), torch.randn(8, H, D, D, generator=g))
    initial = cache.state.clone()
    memo = {}
    for _ in range(2):  # the second call reuses the step's memo (every KDA layer of a step does)
        cache.state.copy_(initial)
        o = paged._kda_varlen(q, k, v, gate, beta, cache, pieces, spans, memo)
    for piece, (a, b) in zip(pieces, spans):
        s0 = initial[piece.state_slot:piece.state_slot + 1]
        want_o, want_state = kda_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], gate[:, a:b], beta[:, a:b],
                                           initial_state=s0, output_final_state=True)
        assert torch.allclose(o[:, a:b], want_o, atol=1e-5), piece
        assert torch.allclose(cache.state[piece.state_slot], want_state[0], atol=1e-5)
        for j, slot in piece.snapshots:
            _, at_j = kda_recurrent(q[:, a:a + j], k[:, a:a + j], v[:, a:a + j], gate[:, a:a + j],
                                    beta[:, a:a + j], initial_state=s0, output_final_state=True)
            assert torch.allclose(cache.state[slot], at_j[0], atol=1e-5), (piece, j)
    # which rounds were chains (twice: two calls): with snapshots, segments of 3,4,5,2 / 4,8,4 / 2 tokens;
    # one round: 9,4,13,6
    expected = {None: [], 4: [2], 16: [5, 8, 2]}[short] if layout == "snapshots" else \
        {None: [], 4: [], 16: [13]}[short]
    assert chain_calls == expected * 2


def test_engine_with_short_segments_in_chains_matches_plain_decoding_and_the_cache_off(monkeypatch):
    """The CUDA prefill path on the CPU (the varlen rounds, fla stood in for by kda() per sequence) with each
    prompt's last partial block (after its snapshot point) stepped as a chain: the tokens equal each prompt
    run alone, with prefix caching on and off, in float64; and the chains really ran."""
    from test_engine import GREEDY, greedy_alone, make_model, prompts, run_engine

    from nanokimi.infer import Engine

    reference, chain_calls = paged.kda_chains_reference, []

    def chains(*args, **kwargs):
        chain_calls.append(kwargs["rounds"])
        return reference(*args, **kwargs)

    monkeypatch.setattr(paged, "use_varlen_kda", lambda device: True)
    monkeypatch.setattr(paged, "kda_fla_varlen_outside_compile", varlen_on_the_cpu)
    monkeypatch.setattr(paged, "SHORT_SEGMENTS", "reference")
    monkeypatch.setattr(paged, "kda_chains_reference", chains)
    model = make_model("tiny")
    base = prompts(8, seed=6)
    second = base + [p + [11, 12, 13] for p in base]  # resent (hits), and extended (hits end mid-block)
    outputs = {}
    for caching in (False, True):
        engine = Engine(model, block_size=8, max_step_tokens=40, max_cache_tokens=4096, snapshot_interval=8,
                        enable_prefix_caching=caching)
        run_engine(engine, [(f"a{i}", p, GREEDY) for i, p in enumerate(base)])
        done = run_engine(engine, [(f"b{i}", p, GREEDY) for i, p in enumerate(second)], stagger=3)
        outputs[caching] = [done[f"b{i}"].outputs[0].token_ids for i in range(len(second))]
        assert (engine.stats()["prefix_cache_hit_tokens"] > 0) == caching
    assert chain_calls and max(chain_calls) <= paged.SHORT_SEGMENT
    assert outputs[True] == outputs[False]
    assert outputs[True][:len(base)] == [greedy_alone(model, p, GREEDY.max_tokens) for p in base]
