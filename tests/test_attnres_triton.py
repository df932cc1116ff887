"""The Triton kernels of block AttnRes (phase 1; accumulate + merge) against the naive reference: forward, lse
and every gradient.

Without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before any kernel is defined), which is
slow: sizes stay tiny (B * T <= 64, D <= 96, N <= 4 sources, S <= 3 queries).
"""
import copy
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from nanokimi.model.attn_res import AttentionResiduals  # noqa: E402
from nanokimi.ops.attnres import (EAGER, attnres_naive, attnres_stack_naive, attnres_stack_stored_naive,  # noqa: E402
                                  depth_attention, source_rstd)
from nanokimi.ops.attnres import triton_phase1, two_phase  # noqa: E402
from nanokimi.ops.attnres.launch import LaunchConfig, check_config  # noqa: E402
from nanokimi.ops.attnres.triton_kernels import triton_kernels  # noqa: E402
from nanokimi.ops.attnres.triton_phase1 import (phase1_backward, phase1_forward, phase1_norm_backward,  # noqa: E402
                                                phase1_norm_forward)
from nanokimi.ops.attnres.triton_phase2 import accumulate_merge, accumulate_merge_norm  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_attnres import (merge_norm_inputs, merge_then_norm, phase1_norm_inputs, run_merge_norm,  # noqa: E402
                          run_phase1_norm)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parents[1]
TRITON = triton_kernels(EAGER)


def rel(a, b):
    a, b = a.float(), b.float()
    if b.norm() == 0:
        return a.norm().item()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(N, S, B, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sources = [(torch.randn(B, T, D, generator=g) * (n + 1)).to(DEVICE, dtype).requires_grad_() for n in range(N)]
    queries = torch.randn(S, D, generator=g).to(DEVICE).requires_grad_()
    weights = (torch.rand(S, D, generator=g) + 0.5).to(DEVICE).requires_grad_()
    cotangent = torch.randn(S, B, T, D, generator=g).to(DEVICE)
    lse_cotangent = torch.randn(S, B, T, generator=g).to(DEVICE)
    return sources, queries, weights, cotangent, lse_cotangent


def reference(sources, queries, weights):
    """Naive mixtures [S, B, T, D] and lse [S, B, T] in fp32, from fp32 copies of the sources."""
    wide = [s.float() for s in sources]
    mixtures = torch.stack([attnres_naive(wide, queries[s], weights[s]) for s in range(len(queries))])
    keys = torch.nn.functional.rms_norm(torch.stack(wide), (wide[0].shape[-1],), eps=1e-6)
    lse = torch.logsumexp(torch.einsum("nbtd,sd->snbt", keys, queries * weights), dim=1)
    return mixtures, lse


def forward_and_grads(run, sources, queries, weights, cotangent, lse_cotangent):
    mixtures, lse = run(sources, queries, weights)
    ((mixtures * cotangent).sum() + (lse * lse_cotangent).sum()).backward()
    leaves = [*sources, queries, weights]
    grads = [p.grad.clone() for p in leaves]
    for p in leaves:
        p.grad = None
    return mixtures.detach(), lse.detach(), grads


def run_triton(sources, queries, weights):
    mixtures, lse = depth_attention(sources, queries, weights, kernels=TRITON)
    return torch.stack(mixtures), lse


@pytest.mark.parametrize("N,S,B,T,D", [(4, 3, 2, 13, 80), (1, 3, 1, 7, 96), (4, 1, 3, 5, 24), (2, 2, 1, 9, 33)])
def test_triton_phase1_matches_naive_fp32(N, S, B, T, D):
    inputs = make_inputs(N, S, B, T, D, torch.float32, seed=N * 100 + S * 10 + D)
    mixtures, lse, grads = forward_and_grads(run_triton, *inputs)
    mixtures_ref, lse_ref, grads_ref = forward_and_grads(reference, *inputs)
    assert mixtures.dtype == torch.float32 and mixtures.shape == (S, B, T, D) and lse.shape == (S, B, T)
    assert rel(mixtures, mixtures_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5
    for i, (a, b) in enumerate(zip(grads, grads_ref)):  # every source, then queries, then key weights
        assert rel(a, b) < 1e-5, i
    if N > 1:  # the sources are weighted unequally (they differ in scale), so the query gradient is not zero
        assert grads[N].abs().sum() > 0


@pytest.mark.parametrize("N,S", [(4, 3), (1, 1)])
def test_triton_phase1_bf16_sources(N, S):
    """bf16 sources stay bf16; mixtures and lse are fp32 (exact up to fp32 rounding against the naive maths on
    the same values); source gradients are fp32 sums rounded to bf16 once."""
    B, T, D = 2, 11, 80
    inputs = make_inputs(N, S, B, T, D, torch.bfloat16, seed=7 + N)
    mixtures, lse, grads = forward_and_grads(run_triton, *inputs)
    mixtures_ref, lse_ref, grads_ref = forward_and_grads(reference, *inputs)
    assert all(g.dtype == torch.bfloat16 for g in grads[:N])
    assert rel(mixtures, mixtures_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert rel(a, b) < 1e-2, i


@pytest.mark.parametrize("block_t,programs,chunk_d", [(1, 2, 16), (4, 2, 32), (8, 3, 0), (2, 1, 64)])
def test_triton_phase1_tilings_agree_with_stacked(block_t, programs, chunk_d):
    """Tiles of 1..8 tokens, a tail tile past the last token, backward programs looping over several tiles
    (the last program's extra tile lying wholly past the end), and the backward streaming D = 40 in chunks of
    16 (the last one half masked), 32, or all at once: the same numbers as the eager stacked kernels."""
    g = torch.Generator().manual_seed(block_t)
    N, S, M, D = 3, 3, 21, 40
    values = [torch.randn(M, D, generator=g).to(DEVICE) * 2 for _ in range(N)]
    rstds = [source_rstd(v) for v in values]
    qe = torch.randn(S, D, generator=g).to(DEVICE)
    grad_mixtures = [torch.randn(M, D, generator=g).to(DEVICE) for _ in range(S)]
    grad_lse = torch.randn(M, S, generator=g).to(DEVICE)

    config = LaunchConfig(block_t=block_t, num_warps=4, programs_per_sm=programs, chunk_d=chunk_d)  # programs: all
    mixtures, logits, lse = phase1_forward(qe, rstds, values, config=config)
    mixtures_ref, logits_ref, lse_ref = two_phase._phase1_forward_stacked(qe, rstds, values)
    assert rel(torch.stack(mixtures), torch.stack(mixtures_ref)) < 1e-5
    assert rel(logits, logits_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5
    got = phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, config=config)
    expected = two_phase._phase1_backward_stacked(qe, rstds, values, logits_ref, lse_ref, grad_mixtures, grad_lse)
    assert rel(got[0], expected[0]) < 1e-5
    for a, b in zip(got[1], expected[1]):
        assert rel(a, b) < 1e-5


def test_float64_falls_back_and_bad_inputs_say_why():
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    queries, weights = torch.randn(2, 16, dtype=torch.float64).to(DEVICE), torch.ones(2, 16, dtype=torch.float64)
    mixtures, lse = depth_attention(values, queries, weights.to(DEVICE), kernels=TRITON)
    expected, expected_lse = depth_attention(values, queries, weights.to(DEVICE), kernels=EAGER)
    assert mixtures[0].dtype == torch.float64 and rel(torch.stack(mixtures), torch.stack(expected)) < 1e-12
    with pytest.raises(ValueError, match="Triton phase-1 kernels need"):
        phase1_forward(torch.randn(2, 16, dtype=torch.float64), [source_rstd(v) for v in values], values)
    with pytest.raises(ValueError, match="block_t"):
        phase1_forward(torch.randn(2, 16).to(DEVICE), [source_rstd(v.float()) for v in values],
                       [v.float() for v in values], config=LaunchConfig(block_t=3, num_warps=4))


@pytest.mark.parametrize("dtype,out_dtype,has_partial,D", [
    (torch.float32, torch.float32, True, 33), (torch.float32, torch.bfloat16, True, 80),
    (torch.float32, torch.float32, False, 24), (torch.bfloat16, torch.bfloat16, True, 40)])
def test_triton_accumulate_merge_matches_naive(dtype, out_dtype, has_partial, D):
    """One sublayer's partial sum and the next input against attnres_naive over (sources + new partial sum):
    h, the new partial sum and the gradients of sources, partial, out, query and key weight (fp32 stream: 1e-5;
    bf16 stream or bf16 outputs: 1e-2). Phase 1 runs on the eager kernels, so this isolates the fused merge."""
    g = torch.Generator().manual_seed(D + 3 * has_partial)
    N, B, T = 3, 2, 7
    sources = [(torch.randn(B, T, D, generator=g) * (n + 1)).to(DEVICE, dtype).requires_grad_() for n in range(N)]
    partial = (torch.randn(B, T, D, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    out = torch.randn(B, T, D, generator=g).to(DEVICE, out_dtype).requires_grad_()
    query = torch.randn(D, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.rand(D, generator=g) + 0.5).to(DEVICE).requires_grad_()
    grad_h, grad_p = torch.randn(2, B, T, D, generator=g).to(DEVICE)
    leaves = [*sources, query, weight, out] + ([partial] if has_partial else [])

    def run(fast):
        if fast:
            mixture, lse = depth_attention(sources, query[None], weight[None], kernels=EAGER)
            new_partial, h = accumulate_merge(partial if has_partial else None, out, mixture[0], lse[0],
                                              query * weight, dtype, 1e-6)
        else:
            new_partial = partial + out.to(dtype) if has_partial else out.to(dtype)
            h = attnres_naive([s.float() for s in sources] + [new_partial.float()], query, weight)
        ((h.float() * grad_h).sum() + (new_partial.float() * grad_p).sum()).backward()
        grads = [p.grad.clone() for p in leaves]
        for p in leaves:
            p.grad = None
        return new_partial.detach(), h.detach(), grads

    new_partial, h, grads = run(fast=True)
    new_partial_ref, h_ref, grads_ref = run(fast=False)
    bound = 1e-5 if dtype == out_dtype == torch.float32 else 1e-2
    assert h.dtype == new_partial.dtype == dtype and grads[N + 2].dtype == out_dtype
    if DEVICE.type == "cuda" or dtype == torch.float32:
        assert torch.equal(new_partial, new_partial_ref)
    else:  # Triton's interpreter rounds fp32 -> bf16 toward zero, the GPU (and torch) to nearest: one bf16 ulp
        assert rel(new_partial, new_partial_ref) < 1e-2
    assert rel(h, h_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert rel(a, b) < bound, i
    assert grads[N].abs().sum() > 0  # the partial sum's logit moves the query


@pytest.mark.parametrize("block_t,programs,grad_of_partial", [(1, 2, True), (4, 3, False), (16, 2, True)])
def test_triton_accumulate_merge_tilings_agree_with_eager(block_t, programs, grad_of_partial):
    """Tiles of 1..16 tokens with a tail, backward programs looping over several tiles, and the new partial sum
    with or without a gradient of its own: the same numbers as two_phase's eager _accumulate_merge."""
    g = torch.Generator().manual_seed(block_t + programs)
    M, D = 21, 40
    partial = torch.randn(M, D, generator=g).to(DEVICE).requires_grad_()
    out = torch.randn(M, D, generator=g).to(DEVICE).requires_grad_()
    mixture = torch.randn(M, D, generator=g).to(DEVICE).requires_grad_()
    lse = torch.randn(M, generator=g).to(DEVICE).requires_grad_()
    qe = torch.randn(D, generator=g).to(DEVICE).requires_grad_()
    grad_h, grad_p = torch.randn(2, M, D, generator=g).to(DEVICE)
    leaves = [partial, out, mixture, lse, qe]
    results = []
    for fast in (True, False):
        args = (partial, out, mixture, lse, qe, torch.float32, 1e-6)
        config = LaunchConfig(block_t=block_t, num_warps=4, programs_per_sm=programs)
        new_partial, h = (accumulate_merge(*args, config=config) if fast
                          else two_phase._accumulate_merge(*args))
        loss = (h * grad_h).sum() + ((new_partial * grad_p).sum() if grad_of_partial else 0)
        loss.backward()
        results.append([new_partial.detach(), h.detach()] + [p.grad.clone() for p in leaves])
        for p in leaves:
            p.grad = None
    for i, (a, b) in enumerate(zip(*results)):
        assert rel(a, b) < 1e-5, i


@pytest.mark.parametrize("N,S,D,dtype", [(9, 4, 72, torch.float32), (5, 3, 45, torch.float32), (1, 2, 24, torch.float32),
                                         (7, 4, 50, torch.bfloat16), (3, 1, 33, torch.bfloat16)])
def test_triton_phase1_backward_in_chunks_matches_naive(N, S, D, dtype, monkeypatch):
    """The backward streaming D in chunks of 16 (D not a multiple of it, N up to 9 sources: N_PAD = 16, S up to 4)
    through depth_attention, with that config given to every phase-1 launch: forward and every gradient against
    the naive reference (fp32 1e-5, bf16 sources 1e-2)."""
    chunked = LaunchConfig(block_t=2, num_warps=4, programs_per_sm=3, chunk_d=16)
    monkeypatch.setattr(triton_phase1, "config_for", lambda *args: chunked)
    inputs = make_inputs(N, S, 2, 7, D, dtype, seed=N * 10 + D)
    mixtures, lse, grads = forward_and_grads(run_triton, *inputs)
    mixtures_ref, lse_ref, grads_ref = forward_and_grads(reference, *inputs)
    assert rel(mixtures, mixtures_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(grads, grads_ref)):  # every source, then queries, then key weights
        assert rel(a, b) < bound, i


@pytest.mark.parametrize("dtype,mask", [(torch.float32, (1, 0, 1)), (torch.bfloat16, (1, 1, 0)),
                                        (torch.float32, (1, 1, 1))])
def test_triton_phase1_backward_adds_into_gradient_sums(dtype, mask):
    """sums: each given sum gets its source's gradient added in place (the returned gradient is the same
    tensor); the other sources get fresh gradients. Against the kernel without sums, and the eager stacked
    kernel with the same sums (bf16: one bf16 rounding of the sum apart)."""
    g = torch.Generator().manual_seed(sum(mask) + (dtype == torch.bfloat16))
    N, S, M, D = 3, 2, 19, 33
    values = [(torch.randn(M, D, generator=g) * (n + 1)).to(DEVICE, dtype) for n in range(N)]
    rstds = [source_rstd(v) for v in values]
    qe = torch.randn(S, D, generator=g).to(DEVICE)
    grad_mixtures = [torch.randn(M, D, generator=g).to(DEVICE) for _ in range(S)]
    grad_lse = torch.randn(M, S, generator=g).to(DEVICE)
    sums = [torch.randn(M, D, generator=g).to(DEVICE, dtype) if keep else None for keep in mask]
    before = [None if s is None else s.clone() for s in sums]
    _, logits, lse = phase1_forward(qe, rstds, values)
    config = LaunchConfig(block_t=4, num_warps=4, programs_per_sm=2, chunk_d=16)  # D = 33: 3 chunks, 1 in the last

    fresh_qe, fresh = phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, config=config)
    eager_qe, eager = two_phase._phase1_backward_stacked(qe, rstds, values, logits, lse, grad_mixtures, grad_lse,
                                                         before)
    got_qe, got = phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, config=config)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got_qe, fresh_qe) < 1e-6 and rel(got_qe, eager_qe) < 1e-5
    for n, keep in enumerate(mask):
        assert got[n].dtype == dtype and (got[n] is sums[n]) == bool(keep)
        expected = fresh[n].float() + (before[n].float() if keep else 0)
        assert rel(got[n], expected) < bound and rel(got[n], eager[n]) < bound, n
    with pytest.raises(ValueError, match="gradient sum 1"):
        phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse,
                        [None, values[0].t(), None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_sources_sum_gradients_like_naive(dtype):
    """Four sources read by four phase-1 calls the way blocks read them (call k: sources 0..k, its own
    queries; odd D), through share_source: forward, lse and every gradient against the naive maths on fp32
    copies of the same values. Each source's gradient is summed by the kernels over its readers and reaches
    the source once (fp32: 1e-5; bf16 sources: the sum is kept in fp32 and rounded to bf16 once, when autograd
    hands it to the bf16 leaf, 1e-2)."""
    g = torch.Generator().manual_seed(21 + (dtype == torch.bfloat16))
    N, B, T, D = 4, 2, 7, 33
    sources = [(torch.randn(B, T, D, generator=g) * (n + 1)).to(DEVICE, dtype).requires_grad_() for n in range(N)]
    queries = [torch.randn(S, D, generator=g).to(DEVICE).requires_grad_() for S in (1, 3, 2, 1)]
    weights = (torch.rand(D, generator=g) + 0.5).to(DEVICE).requires_grad_()
    cotangents = [(torch.randn(len(q), B, T, D, generator=g).to(DEVICE),
                   torch.randn(len(q), B, T, generator=g).to(DEVICE)) for q in queries]
    leaves = [*sources, *queries, weights]

    given = []  # per phase-1 backward: which sources arrived with a gradient sum to add into

    def recording_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes):
        given.extend(s is not None for s in sums)
        assert all(dtype == torch.float32 for dtype in grad_dtypes)  # bf16 sources' gradients summed in fp32
        return TRITON.phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes)
    kernels = TRITON._replace(phase1_backward=recording_backward)

    def run(fast):
        shared = [two_phase.share_source(s) for s in sources] if fast else [s.float() for s in sources]
        loss = 0
        for k, (q, (cot, lse_cot)) in enumerate(zip(queries, cotangents)):
            if fast:
                mixtures, lse = two_phase.depth_attention_qe(shared[:k + 1], q * weights, kernels=kernels)
                mixtures, lse = torch.stack(mixtures), torch.stack(lse)
            else:
                mixtures, lse = reference(shared[:k + 1], q, weights.expand_as(q))
            loss = loss + (mixtures * cot).sum() + (lse * lse_cot).sum()
        loss.backward()
        grads = [p.grad.clone() for p in leaves]
        for p in leaves:
            p.grad = None
        return loss.detach(), grads

    (loss, grads), (loss_ref, grads_ref) = run(fast=True), run(fast=False)
    assert given.count(False) == N and given.count(True) == 1 + 2 + 3 + 4 - N  # one fresh gradient per source
    assert rel(loss, loss_ref) < 1e-5
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == leaves[i].dtype and rel(a, b) < bound, i


class ToyMixer(nn.Module):
    """fp32 weights whatever the stream's dtype (as under autocast the sublayers' outputs need not match it)."""

    def __init__(self, dim, generator):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, dim, generator=generator) / dim ** 0.5)

    def forward(self, h):
        return torch.tanh(self.proj(h.to(self.proj.weight.dtype)))


@pytest.mark.parametrize("D,L,num_blocks", [(24, 7, 4), (33, 6, 3), (17, 5, 5), (40, 8, 2)])
def test_module_with_triton_kernels_matches_stack_reference(D, L, num_blocks):
    """A whole block-AttnRes stream (fp32) on the triton set (phase 1, accumulate + merge, shared sources whose
    gradients the phase-1 kernels sum in place; final read included): output and every gradient (embedding,
    queries, key weights, sublayers) against the naive stack in float64, so the bounds measure the fp32 path's
    own rounding through up to 8 sublayers (gradients up to ~1.1e-5, the smallest, cancelling ones). bf16
    streams: test_shared_sources_sum_gradients_like_naive (a whole bf16 stream differs from a bf16 naive stack
    by rounding order alone by more than any useful bound)."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(11 + D + L)
    module = AttentionResiduals(D, L, mode="block", num_blocks=num_blocks)
    sublayers = nn.ModuleList(ToyMixer(D, g) for _ in range(L))
    with torch.no_grad():
        for q, w in zip(module.queries, module.key_weights):
            q.copy_(torch.randn(D, generator=g))
            w.copy_(torch.rand(D, generator=g) + 0.5)
    module_ref, sublayers_ref = copy.deepcopy(module).double(), copy.deepcopy(sublayers).double()
    module.to(DEVICE), sublayers.to(DEVICE)
    module.kernels = TRITON
    embedding_ref = torch.randn(2, 5, D, generator=g, dtype=torch.float64, requires_grad=True)
    embedding = embedding_ref.detach().to(DEVICE, dtype).requires_grad_()
    target = torch.randn(2, 5, D, generator=g, dtype=torch.float64)

    state = module.start(embedding)
    for l, f in enumerate(sublayers):
        state = module.add(state, l, f(module.sublayer_input(state, l)))
    final = module.finish(state)
    (final.float() * target.float().to(DEVICE)).sum().backward()
    expected = attnres_stack_naive(embedding_ref, list(sublayers_ref), list(module_ref.queries),
                                   list(module_ref.key_weights), block_size=module.block_size, eps=module.eps)
    (expected.double() * target).sum().backward()

    assert final.dtype == dtype and rel(final.cpu(), expected) < 1e-5
    got = [embedding, *module.parameters(), *sublayers.parameters()]
    want = [embedding_ref, *module_ref.parameters(), *sublayers_ref.parameters()]
    # Sublayer 0 reads the embedding alone: its softmax is constant, so its query's and key weight's gradients are
    # exactly 0 in the reference and in the interpreter; on a GPU the kernels' reductions run in other orders and
    # leave fp32 rounding there (5e-5 measured, against gradients of norm ~1-10 elsewhere).
    zero = [b.grad.norm() == 0 for b in want]
    assert zero[1] and zero[L + 2]  # queries[0], key_weights[0] (L + 1 queries)
    scale = max(b.grad.norm() for b in want).item()
    errors = [rel(a.grad.cpu().double(), b.grad) for a, b, z in zip(got, want, zero) if not z]
    assert max(errors) < 2e-5, errors
    stray = [a.grad.norm().item() for a, z in zip(got, zero) if z]
    assert max(stray) <= (1e-5 * scale if DEVICE.type == "cuda" else 0.0), (stray, scale)


def test_compile_kernels_picks_triton_on_cuda_only():
    module = AttentionResiduals(16, 4, mode="block", num_blocks=2).to(DEVICE)
    module.compile_kernels()
    on_triton = module.kernels.phase1_forward.func is phase1_forward if hasattr(
        module.kernels.phase1_forward, "func") else False
    assert on_triton == (DEVICE.type == "cuda")
    module.compile_kernels(triton=False)
    assert not hasattr(module.kernels.phase1_forward, "func")
    module.compile_kernels(triton=True)
    assert module.kernels.phase1_forward.func is phase1_forward
    assert module.kernels.merge is two_phase.compiled_kernels(None).merge
    assert module.kernels.accumulate_merge.func is accumulate_merge
    assert module.kernels.accumulate_merge_norm.func is accumulate_merge_norm
    fallback = module.kernels.accumulate_merge_norm.keywords["fallback"]
    assert fallback is two_phase.compiled_kernels(None).accumulate_merge_norm
    assert module.kernels.phase1_norm_forward.func is phase1_norm_forward
    assert module.kernels.phase1_norm_backward.func is phase1_norm_backward
    fallback = module.kernels.phase1_norm_backward.keywords["fallback"]
    assert fallback is two_phase.compiled_kernels(None).phase1_norm_backward


def test_tune_benchmark_quick(tmp_path):
    """benchmarks/attnres_tune.py --quick (the interpreter on the CPU): every kernel and dtype of the model's
    calls gets a measured best config, beside the heuristic's (the first config timed, flagged "default")."""
    from nanokimi.ops.attnres import launch
    out = tmp_path / "attnres_tune.json"
    script = ROOT / "benchmarks" / "attnres_tune.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert all(m["ms"] > 0 for m in report["measurements"]) and report["git_commit"]
    kernels = {(e["kernel"], e["dtype"]) for e in report["table"]}
    assert kernels == {(k, d) for k in launch.KERNELS for d in ("float32", "bfloat16")}
    heuristic = [m for m in report["measurements"] if m["default"]]
    assert heuristic and all(LaunchConfig(**m["config"]) == launch.config_for(
        m["kernel"], report["shape"]["hidden"], getattr(torch, m["dtype"]), m["S"], m["N"]) for m in heuristic)
    assert "with the heuristic's configs" in result.stdout


def test_tune_benchmark_kernels_option(tmp_path):
    """--kernels tunes only the named kernels (the JSON says which); an unknown name is refused with the list of
    known ones."""
    out = tmp_path / "attnres_tune.json"
    script = ROOT / "benchmarks" / "attnres_tune.py"
    command = [sys.executable, str(script), "--quick", "--dtypes", "float32", "--out", str(out), "--kernels"]
    result = subprocess.run(command + ["phase1_backward"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["kernels"] == ["phase1_backward"] and report["table"]
    assert {(e["kernel"], e["dtype"]) for e in report["table"]} == {("phase1_backward", "float32")}
    refused = subprocess.run(command + ["phase1_bwd"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "phase1_bwd" in refused.stderr and "phase1_backward" in refused.stderr


def test_tune_skips_a_config_that_fails(monkeypatch):
    """A config that cannot run is noted and skipped; the sweep goes on with the others."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when the script runs: perf_common beside it
    spec = importlib.util.spec_from_file_location("attnres_tune", ROOT / "benchmarks" / "attnres_tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    case = tune.Case("merge_forward", torch.float32)
    args = type("Args", (), dict(tokens=16, hidden=24, quick=True))
    default = tune.config_for("merge_forward", 24)
    notes = []
    rows = tune.measure(case, [default, LaunchConfig(block_t=3, num_warps=4), default._replace(num_warps=2)], args,
                        DEVICE, time.monotonic() + 60, notes)
    assert [r["config"] for r in rows] == [default, default._replace(num_warps=2)] and rows[0]["default"]
    assert len(notes) == 1 and "bt3 w4" in notes[0] and "block_t=3" in notes[0]


def model_size_inputs(N, S, M, D, dtype, seed):
    """Phase-1 inputs on the GPU at model sizes: N sources [M, D] of dtype (scales 1-3), their rstds, qe [S, D], a
    norm weight [D] near ones, S fp32 grad_mixtures and grad_lse [M, S]; and the generator, for more."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    values = [(torch.randn(M, D, generator=g, device="cuda") * (1 + n % 3)).to(dtype) for n in range(N)]
    return dict(values=values, rstds=[source_rstd(v) for v in values],
                qe=torch.randn(S, D, generator=g, device="cuda") / D ** 0.5,
                weight=1 + 0.1 * torch.randn(D, generator=g, device="cuda"),
                grad_mixtures=[torch.randn(M, D, generator=g, device="cuda") for _ in range(S)],
                grad_lse=torch.randn(M, S, generator=g, device="cuda"), generator=g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton at model sizes)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_phase1_at_model_sizes_on_gpu(dtype):
    """The benchmark's shapes (D = 1024, 4 queries, 9 sources: the last block's read) against the stacked kernels."""
    x = model_size_inputs(N=9, S=4, M=4096, D=1024, dtype=dtype, seed=0)
    values, rstds, qe, grad_mixtures, grad_lse = (x[k] for k in ("values", "rstds", "qe", "grad_mixtures", "grad_lse"))
    mixtures, logits, lse = phase1_forward(qe, rstds, values)
    mixtures_ref, logits_ref, lse_ref = two_phase._phase1_forward_stacked(qe, rstds, values)
    assert rel(torch.stack(mixtures), torch.stack(mixtures_ref)) < 1e-5 and rel(lse, lse_ref) < 1e-5
    got = phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse)
    expected = two_phase._phase1_backward_stacked(qe, rstds, values, logits_ref, lse_ref, grad_mixtures, grad_lse)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got[0], expected[0]) < 1e-4  # a sum over 4096 tokens in a different order
    for a, b in zip(got[1], expected[1]):
        assert rel(a, b) < bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton at model sizes)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_phase1_norm_at_model_sizes_on_gpu(dtype):
    """The last block's phase 1 with its first sublayer's norm at the benchmark's shapes (D = 1024, 4 queries, 8
    sources, the table's launch configs) against the stacked kernels: x0, the mixtures, and every gradient."""
    x = model_size_inputs(N=8, S=4, M=4096, D=1024, dtype=dtype, seed=1)
    values, rstds, qe, grad_mixtures, grad_lse = (x[k] for k in ("values", "rstds", "qe", "grad_mixtures", "grad_lse"))
    norm = (None, x["weight"], 1e-5, torch.float32)
    outputs, logits, lse = phase1_norm_forward(qe, rstds, values, *norm)
    outputs_ref, logits_ref, lse_ref = two_phase._phase1_norm_forward_stacked(qe, rstds, values, *norm)
    assert rel(torch.stack(outputs), torch.stack(outputs_ref)) < 1e-5 and rel(lse, lse_ref) < 1e-5
    got = phase1_norm_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, None, None, *norm)
    expected = two_phase._phase1_norm_backward_stacked(qe, rstds, values, logits_ref, lse_ref, grad_mixtures,
                                                       grad_lse, None, None, *norm)
    assert rel(got[0], expected[0]) < 1e-4 and rel(got[2], expected[2]) < 1e-4  # sums over 4096 tokens
    for a, b in zip(got[1], expected[1]):
        assert rel(a, b) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_triton_phase1_stores_mixtures_narrow_and_sums_bf16_gradients_in_fp32():
    """Storage "auto": phase 1 writes its mixtures in bf16 (the fp32 result rounded once), reads bf16 gradients of
    them as they are, and writes a bf16 source's gradient in the dtype asked for (fp32 for a shared source, whose
    sum is kept in fp32; a source of each kind here, so one launch writes gradients of two dtypes), against the
    eager stacked kernels on the same inputs (fp32: 1e-5). Triton's CPU interpreter rounds fp32 -> bf16 toward
    zero where the GPU and torch round to nearest: one bf16 step (< 2^-7 relative) apart there, equal on a GPU."""
    g = torch.Generator().manual_seed(41)
    N, S, M, D = 3, 2, 19, 33
    values = [(torch.randn(M, D, generator=g) * (n + 1)).to(DEVICE, torch.bfloat16) for n in range(N)]
    rstds = [source_rstd(v) for v in values]
    qe = torch.randn(S, D, generator=g).to(DEVICE)
    grad_mixtures = [torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16) for _ in range(S)]
    grad_lse = torch.randn(M, S, generator=g).to(DEVICE)
    config = LaunchConfig(block_t=4, num_warps=4, programs_per_sm=2, chunk_d=16)

    wide, logits, lse = phase1_forward(qe, rstds, values, config=config)
    narrow, logits_narrow, lse_narrow = phase1_forward(qe, rstds, values, torch.bfloat16, config=config)
    assert all(m.dtype == torch.bfloat16 for m in narrow) and torch.equal(logits, logits_narrow)
    for m, w in zip(narrow, wide):
        if DEVICE.type == "cuda":
            assert torch.equal(m, w.to(torch.bfloat16))
        else:
            assert ((m.float() - w).abs() <= w.abs() * 2 ** -7).all()

    grad_dtypes = [torch.float32, torch.bfloat16, torch.float32]
    sums = [torch.randn(M, D, generator=g).to(DEVICE), None, None]
    before = sums[0].clone()
    got_qe, got = phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes,
                                  config=config)
    eager_qe, eager = two_phase._phase1_backward_stacked(qe, rstds, values, logits, lse, grad_mixtures, grad_lse,
                                                         [before, None, None], grad_dtypes)
    assert got[0] is sums[0] and [t.dtype for t in got] == grad_dtypes
    assert rel(got_qe, eager_qe) < 1e-5
    for n, (a, b) in enumerate(zip(got, eager)):
        assert rel(a, b) < (1e-5 if grad_dtypes[n] == torch.float32 else 1e-2), n
    with pytest.raises(ValueError, match="gradient sum 0 .* in its gradient's dtype torch.float32"):
        phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, [values[0].clone(), None, None],
                        grad_dtypes)


def test_triton_accumulate_merge_reads_a_bf16_mixture():
    """The merge reads a bf16 mixture (storage "auto") and writes its gradient in bf16; against the eager
    _accumulate_merge on the same inputs: the new partial sum, h and the fp32 gradients to fp32 rounding (1e-5),
    the bf16 gradients (mixture's, out's) to one bf16 rounding (1e-2; the interpreter truncates)."""
    g = torch.Generator().manual_seed(43)
    M, D = 21, 33
    partial = torch.randn(M, D, generator=g).to(DEVICE).requires_grad_()
    out = torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    mixture = torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    lse = torch.randn(M, generator=g).to(DEVICE).requires_grad_()
    qe = torch.randn(D, generator=g).to(DEVICE).requires_grad_()
    grad_h, grad_p = torch.randn(2, M, D, generator=g).to(DEVICE)
    leaves = [partial, out, mixture, lse, qe]
    results = []
    for fast in (True, False):
        args = (partial, out, mixture, lse, qe, torch.float32, 1e-6)
        new_partial, h = (accumulate_merge(*args, config=LaunchConfig(block_t=4, num_warps=4, programs_per_sm=2))
                          if fast else two_phase._accumulate_merge(*args))
        ((h * grad_h).sum() + (new_partial * grad_p).sum()).backward()
        results.append([new_partial.detach(), h.detach()] + [p.grad.clone() for p in leaves])
        for p in leaves:
            p.grad = None
    assert results[0][4].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32
    for i, (a, b) in enumerate(zip(*results)):
        assert rel(a, b) < (1e-2 if b.dtype == torch.bfloat16 else 1e-5), i  # grads of mixture and out: bf16


@pytest.mark.parametrize("storage,D,L,num_blocks", [("auto-all", 33, 6, 3), ("auto", 17, 5, 5)])
def test_module_with_triton_kernels_and_bf16_storage(storage, D, L, num_blocks):
    """storage="auto" / "auto-all" under bf16 autocast on the triton set (bf16 sources, and mixtures with
    "auto-all"; fp32 partial sums and gradient sums): output and every gradient against attnres_stack_stored_naive, the naive maths with the
    same roundings (on a GPU 1e-4 / 2e-3, as the eager set: a few values cross a bf16 rounding boundary; in the
    interpreter, which truncates where torch rounds to nearest, 1e-2 / 5e-2), and against the fp32-storage triton
    path (bf16-fit: 2e-2 / 0.15, see test_attnres.py)."""
    g = torch.Generator().manual_seed(51 + D)
    module = AttentionResiduals(D, L, mode="block", num_blocks=num_blocks, storage=storage)
    sublayers = nn.ModuleList(ToyMixer(D, g) for _ in range(L))
    with torch.no_grad():
        for q, w in zip(module.queries, module.key_weights):
            q.copy_(torch.randn(D, generator=g) * 0.3)
            w.copy_(torch.rand(D, generator=g) + 0.5)
    fp32_storage = copy.deepcopy(module)
    fp32_storage.storage = "fp32"
    for m in (module, fp32_storage):
        m.to(DEVICE).kernels = TRITON
    sublayers.to(DEVICE)
    embedding = torch.randn(2, 5, D, generator=g).to(DEVICE)
    target = torch.randn(2, 5, D, generator=g).to(DEVICE)

    def run(m, stack=None):
        x = embedding.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            if stack is None:
                state = m.start(x)
                for l, f in enumerate(sublayers):
                    state = m.add(state, l, f(m.sublayer_input(state, l)))
                final = m.finish(state)
            else:
                final = stack(x)
        (final.float() * target).sum().backward()
        params = [x, *m.parameters(), *sublayers.parameters()]
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return final.detach().float(), grads

    final, grads = run(module)
    final_ref, grads_ref = run(module, lambda x: attnres_stack_stored_naive(
        x, list(sublayers), list(module.queries), list(module.key_weights), module.block_size, torch.bfloat16,
        module.eps, round_mixtures=storage == "auto-all"))
    final_32, grads_32 = run(fp32_storage)
    exact = DEVICE.type == "cuda"
    # gradients that are 0 in exact arithmetic (sublayer 0's query and key weight: one source) hold rounding noise
    # only; each gradient's error is taken relative to its own norm or a thousandth of the largest, if larger
    floor = 1e-3 * max(b.norm() for b in grads_ref).item()

    def error(a, b):
        return ((a - b).norm() / max(b.norm().item(), floor)).item()

    assert rel(final, final_ref) < (1e-4 if exact else 1e-2)
    assert max(error(a, b) for a, b in zip(grads, grads_ref)) < (2e-3 if exact else 5e-2)
    assert rel(final, final_32) < 2e-2
    assert max(error(a, b) for a, b in zip(grads, grads_32)) < 0.15


BF16 = torch.bfloat16


@pytest.mark.parametrize("dtype,mixture_dtype,out_dtype,has_partial,block_t", [
    (torch.float32, torch.float32, torch.float32, True, 4), (torch.float32, BF16, BF16, True, 4),
    (torch.float32, torch.float32, BF16, False, 16), (BF16, BF16, BF16, True, 2)])
def test_triton_accumulate_merge_norm_is_merge_then_rmsnorm(dtype, mixture_dtype, out_dtype, has_partial, block_t):
    """The Triton merge + norm kernels against the eager merge followed by the model's RMSNorm module (T = 63,
    D = 45: a tail tile, masked columns; backward programs looping over several tiles): the new partial sum, the
    normed input x and the gradients of partial, out, mixture, lse, qe and the norm weight. fp32 everything:
    1e-5 (fp32 rounding; sums in another order). A tensor stored in bf16 (the mixture and out of storage "auto"
    under autocast, and their gradients): 1e-2, one bf16 rounding (the interpreter truncates where the GPU rounds
    to nearest). A bf16 stream (h, the normalised h and their gradients rounded to bf16 as the unfused path
    rounds them): 3e-2 in the interpreter (measured 1.3e-2), 1e-2 on a GPU."""
    leaves, cotangents = merge_norm_inputs(63, 45, dtype, has_partial, seed=block_t + 7 * has_partial,
                                           mixture_dtype=mixture_dtype, out_dtype=out_dtype, device=DEVICE)
    config = LaunchConfig(block_t=block_t, num_warps=4, programs_per_sm=3)
    got = run_merge_norm(functools.partial(accumulate_merge_norm, config=config), leaves, cotangents, dtype)
    expected = run_merge_norm(merge_then_norm, leaves, cotangents, dtype)
    assert got[1].dtype == torch.float32  # the fp32 norm weight times the normed input
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and b.norm() > 0, i
        bound = (1e-5 if a.dtype == torch.float32 and dtype == torch.float32 else
                 1e-2 if dtype == torch.float32 or DEVICE.type == "cuda" else 3e-2)
        assert rel_err(a, b) < bound, (i, rel_err(a, b))


def test_triton_accumulate_merge_norm_saves_no_intermediate():
    """Backward recomputes h from what the merge saves anyway: of the [M, D] tensors, only the new partial sum
    and the mixture are saved (the unfused norm saves h and the normalised h as well)."""
    leaves, _ = merge_norm_inputs(21, 40, torch.float32, True, seed=3, device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        new_partial, x = accumulate_merge_norm(*leaves[:5], torch.float32, 1e-6, leaves[5], 1e-5)
    assert sum(t.shape == x.shape for t in saved) == 2
    assert any(t.data_ptr() == new_partial.data_ptr() for t in saved)
    assert any(t.data_ptr() == leaves[2].data_ptr() for t in saved)


def test_triton_accumulate_merge_norm_falls_back(monkeypatch):
    """Inputs the kernels do not take run the fallback (float64; D above MAX_D; CPU tensors without the
    interpreter), or say why without one."""
    from nanokimi.ops.attnres import triton_phase2
    calls = []

    def fallback(*args):
        calls.append(args[5])
        return two_phase._accumulate_merge_norm(*args)
    wide, _ = merge_norm_inputs(5, 16, torch.float64, True, seed=1, device=DEVICE)
    new_partial, x = accumulate_merge_norm(*wide[:5], torch.float64, 1e-6, wide[5], 1e-5, fallback=fallback)
    assert calls == [torch.float64] and x.dtype == torch.float64
    monkeypatch.setattr(triton_phase2, "MAX_D", 8)
    narrow, _ = merge_norm_inputs(5, 16, torch.float32, True, seed=2, device=DEVICE)
    accumulate_merge_norm(*narrow[:5], torch.float32, 1e-6, narrow[5], 1e-5, fallback=fallback)
    assert calls == [torch.float64, torch.float32]
    with pytest.raises(ValueError, match="norm weight"):
        accumulate_merge_norm(*narrow[:5], torch.float32, 1e-6, narrow[5], 1e-5)
    monkeypatch.setattr(triton_phase2, "MAX_D", 16384)
    assert triton_phase2.supports(*narrow[:3], torch.float32, narrow[5])
    assert not triton_phase2.supports(*narrow[:3], torch.float32, narrow[5][:8])  # not [D]
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_phase2.supports(*narrow[:3], torch.float32, narrow[5])


def test_merge_norm_launch_configs_are_the_merges():
    """The merge + norm kernels launch as the plain merges (they stream the same tiles)."""
    from nanokimi.ops.attnres import launch
    for D in (45, 1024):
        assert launch.config_for("merge_norm_backward", D, torch.float32) == launch.config_for("merge_backward", D)
        assert launch.config_for("merge_norm_forward", D, torch.float32) == launch.config_for("merge_forward", D)


def triton_with_config(config):
    """The triton set (over the eager one) with every phase-1 kernel launched with config."""
    return TRITON._replace(**{name: functools.partial(getattr(TRITON, name), config=config) for name in (
        "phase1_forward", "phase1_backward", "phase1_norm_forward", "phase1_norm_backward")})


@pytest.mark.parametrize("N,S,source_dtype,dtype,input_dtype,config", [
    (3, 2, torch.float32, None, torch.float32, LaunchConfig(block_t=4, num_warps=4, programs_per_sm=3, chunk_d=16)),
    (1, 3, torch.float32, None, torch.float32, LaunchConfig(block_t=1, num_warps=4, programs_per_sm=2, chunk_d=0)),
    (4, 1, BF16, None, torch.float32, LaunchConfig(block_t=2, num_warps=4, programs_per_sm=2, chunk_d=32)),
    (2, 3, BF16, BF16, torch.float32, LaunchConfig(block_t=8, num_warps=4, programs_per_sm=3, chunk_d=16)),
    (3, 2, BF16, None, BF16, LaunchConfig(block_t=4, num_warps=4, programs_per_sm=2, chunk_d=0)),
    (2, 2, torch.float32, None, BF16, LaunchConfig(block_t=2, num_warps=4, programs_per_sm=3, chunk_d=16))])
def test_triton_phase1_norm_is_phase1_then_rmsnorm(N, S, source_dtype, dtype, input_dtype, config):
    """The Triton phase 1 with the first query's norm against the Triton plain phase 1, then
    mixtures[0].to(stream dtype) and the model's RMSNorm module (M = 63 tokens, D = 45: a tail tile and masked
    columns; backward programs looping over several tiles, D streamed in chunks of 16 or 32 (the last one partly
    masked) or whole): x0, the other mixtures, lse and the gradients of the sources, queries, key weights and
    norm weight. fp32 everything: 1e-5 (measured up to 1.9e-7; h recomputed in backward as sum_n alpha[0, n] v_n,
    not by the forward's online softmax, and g_0 . v_n formed from g_n . v_n and h . v_n). Anything in bf16
    (sources, mixtures, stream): 1e-2, a bf16 rounding of h or a gradient landing on the other side (measured up
    to 5.3e-3 in the interpreter, which truncates where the GPU rounds to nearest)."""
    leaves, cotangents = phase1_norm_inputs(N, S, 3, 21, 45, source_dtype, seed=N + 10 * S, device=DEVICE)
    kernels = triton_with_config(config)
    got = run_phase1_norm(kernels, leaves, cotangents, dtype, input_dtype)
    expected = run_phase1_norm(kernels, leaves, cotangents, dtype, input_dtype, fused=False)
    assert got[0].dtype == torch.float32 and len(got) == len(expected) == S + 1 + N + 3
    narrow = BF16 in (source_dtype, dtype, input_dtype)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape and b.norm() > 0, i
        assert rel_err(a, b) < (1e-2 if narrow else 1e-5), (i, rel_err(a, b))


@pytest.mark.parametrize("source_dtype,chunk_d", [(torch.float32, 0), (BF16, 64), (torch.float32, 16)])
def test_phase1_backward_sums_in_registers_is_the_same_sum(source_dtype, chunk_d):
    """LaunchConfig.sums_in_registers: with one chunk over D (chunk_d 0 or 64 >= D = 45), each backward program sums
    its query gradient (and, with the first norm, the norm weight's) over its tiles in registers and writes it
    once; the additions are the per-tile read-add-writes' in the same order, so every output of phase 1's backward,
    with and without the norm, is the same bit for bit (3 programs over 32 tiles of 2 tokens). With chunk_d = 16
    (3 chunks) the option does not apply and the kernel is the per-tile one."""
    leaves, cotangents = phase1_norm_inputs(3, 2, 3, 21, 45, source_dtype, seed=11 + chunk_d, device=DEVICE)
    config = LaunchConfig(block_t=2, num_warps=4, programs_per_sm=3, chunk_d=chunk_d)
    for fused in (True, False):
        results = [run_phase1_norm(triton_with_config(config._replace(sums_in_registers=registers)), leaves,
                                   cotangents, None, torch.float32, fused=fused) for registers in (False, True)]
        assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="sums_in_registers"):
        check_config(config._replace(sums_in_registers="yes"))


def test_triton_phase1_norm_applies_its_eps_and_weight():
    """As test_attnres.py's test_phase1_norm_applies_its_eps_and_weight, on the Triton kernels."""
    leaves, cotangents = phase1_norm_inputs(3, 2, 3, 21, 45, torch.float32, seed=5, device=DEVICE)
    got = run_phase1_norm(TRITON, leaves, cotangents, None, torch.float32, norm_eps=0.3)
    same = run_phase1_norm(TRITON, leaves, cotangents, None, torch.float32, norm_eps=0.3, fused=False)
    key_norm_eps = run_phase1_norm(TRITON, leaves, cotangents, None, torch.float32, norm_eps=1e-6, fused=False)
    unit_weight = run_phase1_norm(TRITON, leaves, cotangents, None, torch.float32, norm_eps=0.3, fused=False,
                                  norm_weight=torch.ones_like(leaves[3]))

    def errors(other):  # x0, the first source's gradient, the norm weight's gradient
        return [rel_err(got[0], other[0]), rel_err(got[3], other[3])]
    assert max(errors(same) + [rel_err(got[-1], same[-1])]) < 1e-5
    assert min(errors(key_norm_eps)) > 1e-2 and min(errors(unit_weight)) > 1e-2


def test_triton_phase1_norm_falls_back(monkeypatch):
    """Inputs the kernels do not take run the fallback (float64 sources or stream; a norm weight that is not [D];
    CPU tensors without the interpreter), or say why without one."""
    from nanokimi.ops.attnres import triton_phase1
    leaves, cotangents = phase1_norm_inputs(2, 2, 1, 5, 16, torch.float64, seed=1, device=DEVICE)
    got = run_phase1_norm(TRITON, leaves, cotangents, None, torch.float64)
    expected = run_phase1_norm(EAGER, leaves, cotangents, None, torch.float64)
    assert got[0].dtype == torch.float64 and all(torch.equal(a, b) for a, b in zip(got, expected))
    values = [torch.randn(5, 16).to(DEVICE) for _ in range(2)]
    rstds, qe, weight = [source_rstd(v) for v in values], torch.randn(2, 16).to(DEVICE), torch.ones(16).to(DEVICE)
    assert triton_phase1.supports_first_norm(values, None, weight, torch.float32)
    assert not triton_phase1.supports_first_norm(values, None, weight[:8], torch.float32)
    assert not triton_phase1.supports_first_norm(values, None, weight, torch.float64)
    calls = []

    def fallback(*args):
        calls.append(args)
        return two_phase._phase1_norm_forward_stacked(*args)
    outputs, _, _ = phase1_norm_forward(qe, rstds, values, None, weight, 1e-5, torch.float64, fallback=fallback)
    assert len(calls) == 1 and outputs[0].dtype == torch.float64
    with pytest.raises(ValueError, match="norm weight \\(8,\\)"):
        phase1_norm_forward(qe, rstds, values, None, weight[:8], 1e-5, torch.float32)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_phase1.supports(qe, values)


def test_phase1_norm_launch_configs_are_phase1s():
    """Phase 1 with the norm launches as plain phase 1 (it streams the same tiles)."""
    from nanokimi.ops.attnres import launch
    for D, S, N in ((45, 3, 5), (1024, 4, 2)):
        for kind in ("forward", "backward"):
            assert launch.config_for(f"phase1_norm_{kind}", D, torch.float32, S, N) == launch.config_for(
                f"phase1_{kind}", D, torch.float32, S, N)


def test_phase1_backward_prefetch_is_a_hint():
    """LaunchConfig.prefetch (tiles ahead whose rows phase 1's backward asks into L2) changes no result: every output,
    with and without the first norm, is the same bit for bit (D = 48: rows of 16-byte multiples, so the GPU runs
    the prefetch where it has more tiles than programs; the interpreter ignores it). Bad values say what is
    expected, and a tensor the bulk prefetch cannot take (CPU, or a row start off a 16-byte boundary) turns it off."""
    from nanokimi.ops.attnres.triton_phase1 import can_prefetch
    leaves, cotangents = phase1_norm_inputs(3, 2, 3, 21, 48, BF16, seed=12, device=DEVICE)
    config = LaunchConfig(block_t=2, num_warps=4, programs_per_sm=1, chunk_d=0)
    for fused in (True, False):
        results = [run_phase1_norm(triton_with_config(config._replace(prefetch=distance)), leaves, cotangents, None,
                                   torch.float32, fused=fused) for distance in (0, 1, 2)]
        assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="prefetch"):
            check_config(config._replace(prefetch=bad))
    rows = torch.zeros(4, 48, dtype=BF16, device=DEVICE)
    assert not can_prefetch([rows.cpu()])
    assert not can_prefetch([rows.flatten()[1:145].view(3, 48)]) and not can_prefetch([rows[:, :44]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the bulk L2 prefetch)")
@pytest.mark.parametrize("dtype,first_norm", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)])
def test_phase1_backward_prefetch_on_gpu_changes_nothing(dtype, first_norm):
    """On the GPU, at the benchmark's width (D = 1024, 4 queries, 8 sources, 4099 tokens: a tail tile) with more
    tiles than programs (2 per SM), adding into gradient sums: prefetching 1 or 2 tiles ahead gives every output
    bit for bit as without, on sm_90+ where the prefetch runs; and on tensors it cannot take (a source starting 2
    bytes off a 16-byte boundary) it is left out and the results stay right."""
    from nanokimi.ops.attnres.triton_phase1 import can_prefetch
    N, M, D = 8, 4099, 1024
    x = model_size_inputs(N=N, S=4, M=M, D=D, dtype=dtype, seed=3)
    values, rstds, qe, grad_mixtures, grad_lse = (x[k] for k in ("values", "rstds", "qe", "grad_mixtures", "grad_lse"))
    sums = [torch.randn(M, D, generator=x["generator"], device="cuda").to(dtype) if n % 2 else None for n in range(N)]
    norm = (None, x["weight"], 1e-5, torch.float32)
    forward = phase1_norm_forward(qe, rstds, values, *norm) if first_norm else phase1_forward(qe, rstds, values)
    _, logits, lse = forward

    def backward(values, distance):
        config = LaunchConfig(block_t=1, num_warps=4, programs_per_sm=2, chunk_d=1024, prefetch=distance)
        args = (qe, rstds, values, logits, lse, grad_mixtures, grad_lse, [s if s is None else s.clone() for s in sums])
        if first_norm:
            grad_qe, grads, grad_weight = phase1_norm_backward(*args, None, *norm, config=config)
            return [grad_qe, grad_weight, *grads]
        grad_qe, grads = phase1_backward(*args, config=config)
        return [grad_qe, *grads]

    if torch.cuda.get_device_capability()[0] >= 9:
        assert can_prefetch(values + grad_mixtures)
    plain = backward(values, 0)
    for distance in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(plain, backward(values, distance))), distance
    buffer = torch.empty(M * D + 1, dtype=dtype, device="cuda")
    shifted = buffer[1:].view(M, D).copy_(values[0])
    assert not can_prefetch([shifted])
    got = backward([shifted] + values[1:], 1)
    assert all(torch.equal(a, b) for a, b in zip(plain, got))


def test_phase1_kernels_compile_for_hopper_without_layout_round_trips(tmp_path):
    """benchmarks/attnres_sass.py compiles phase 1's kernels for sm_90 on this machine (Triton's own ptxas): at the
    bench shape (D = 1024, S = 4, N = 8 bf16 sources) every row of D is loaded at least 4 elements a thread (no
    one-element bf16 loads) and a tile costs at most 40 barriers (forward 33, backward 18 now; 121 and 166 when
    each loaded tile went through shared memory to reach the 3-D layout), with 2 programs of 4 warps per SM."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton build ships no ptxas ({ptxas}), so nothing compiles for a GPU here")
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attnres_sass.py"), "--cases",
                             "phase1_backward w4,phase1_forward w4", "--json", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    for name, row in rows.items():
        assert row["barriers"] <= 40 and row["programs_per_sm"] >= 2, (name, row)
        assert "LDG.E.U16" not in row["memory"] and row["memory"].get("LDG.E.64", 0) >= 8, (name, row)
