import warnings

import pytest
import torch
import torch.nn.functional as F

from nanokimi.ops.moba import moba_attention, moba_backend, moba_mask_naive
from nanokimi.ops.moba.efficient import block_means, moba_attention_efficient

gpu = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(B, T, H, Hkv, Dk, Dv, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, d, generator=g).to(device, dtype).requires_grad_()
               for h, d in ((H, Dk), (Hkv, Dk), (Hkv, Dv)))
    return q, k, v


def run(fn, q, k, v, grad_out, q_rows=None, **kw):
    """Output and gradients of q, k, v for queries q[:, -q_rows:] (decode form) or all of q."""
    T = q.shape[1]
    n = T if q_rows is None else q_rows
    out = fn(q[:, T - n:], k, v, q_offset=T - n, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


CASES = [  # B, T, H, Hkv, Dk, Dv, block_size, topk
    (2, 63, 4, 2, 16, 8, 8, 3),  # GQA, Dk != Dv, T not a multiple of the block
    (1, 100, 2, 2, 8, 8, 16, 2),
    (1, 37, 4, 1, 8, 12, 5, 4),
    (1, 50, 2, 1, 8, 8, 8, 1),  # own block only
    (1, 61, 2, 2, 8, 8, 7, 9),  # topk == number of blocks
    (1, 300, 2, 1, 16, 8, 128, 3),  # block = flex tile, partial last block
]


@pytest.mark.parametrize("mode", ["tiles", "gather"])
@pytest.mark.parametrize("case", CASES)
def test_efficient_matches_naive(case, mode):
    B, T, H, Hkv, Dk, Dv, bs, topk = case
    q, k, v = inputs(B, T, H, Hkv, Dk, Dv, seed=T + bs)
    grad_out = torch.randn(B, T, H, Dv)
    ref = run(moba_attention, q, k, v, grad_out, block_size=bs, topk=topk, impl="naive")
    got = run(moba_attention_efficient, q, k, v, grad_out, block_size=bs, topk=topk, mode=mode)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


@pytest.mark.parametrize("q_rows", [1, 5, 17])
@pytest.mark.parametrize("impl", ["efficient", "naive"])
def test_decode_rows_equal_full_forward_rows(impl, q_rows):
    B, T, H, Hkv, Dk, Dv, bs, topk = 2, 70, 4, 2, 16, 8, 8, 3
    q, k, v = inputs(B, T, H, Hkv, Dk, Dv, seed=q_rows)
    with torch.no_grad():
        full = moba_attention(q, k, v, block_size=bs, topk=topk, impl=impl)
        last = moba_attention(q[:, -q_rows:], k, v, block_size=bs, topk=topk, q_offset=T - q_rows, impl=impl)
    assert rel(last, full[:, -q_rows:]) < 1e-5


def test_decode_gradients_match_naive():
    B, T, H, Hkv, Dk, Dv, bs, topk = 1, 90, 4, 2, 8, 8, 16, 3
    q, k, v = inputs(B, T, H, Hkv, Dk, Dv, seed=3)
    grad_out = torch.randn(B, 4, H, Dv)
    ref = run(moba_attention, q, k, v, grad_out, q_rows=4, block_size=bs, topk=topk, impl="naive")
    got = run(moba_attention, q, k, v, grad_out, q_rows=4, block_size=bs, topk=topk, impl="efficient")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


@pytest.mark.parametrize("impl", ["naive", "efficient"])
def test_topk_covering_all_blocks_is_causal_attention(impl):
    B, T, H, Hkv, D, bs = 1, 45, 4, 2, 16, 8
    q, k, v = inputs(B, T, H, Hkv, D, D, seed=5)
    out = moba_attention(q, k, v, block_size=bs, topk=6, impl=impl)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    assert rel(out, sdpa) < 1e-5


def test_mask_follows_the_rules():
    B, T, H, D, bs, topk = 1, 40, 2, 8, 8, 3
    q, k, _ = inputs(B, T, H, H, D, D, seed=7)
    mask = moba_mask_naive(q, k, block_size=bs, topk=topk)[0, 0]  # [Tq, Tk]
    blocks_seen = mask.view(T, T // bs, bs).any(-1)  # [Tq, blocks]
    for t in range(T):
        own = t // bs
        assert mask[t, own * bs:t + 1].all() and not mask[t, t + 1:].any()
        assert blocks_seen[t].sum() == min(topk, own + 1)
    assert not torch.equal(mask, torch.ones(T, T, dtype=torch.bool).tril())  # gating really drops blocks


def test_block_means_partial_last_block():
    k = torch.randn(2, 11, 3, 4)
    means = block_means(k, 4)
    assert means.shape == (2, 3, 3, 4)
    assert torch.allclose(means[:, 2], k[:, 8:].mean(1)) and torch.allclose(means[:, 0], k[:, :4].mean(1))


@pytest.mark.parametrize("case", CASES[:3] + CASES[5:])
def test_flex_forward_matches_naive_on_cpu(case):
    pytest.importorskip("torch.nn.attention.flex_attention")
    B, T, H, Hkv, Dk, Dv, bs, topk = case
    q, k, v = (x.detach() for x in inputs(B, T, H, Hkv, Dk, Dv, seed=T))
    ref = moba_attention(q, k, v, block_size=bs, topk=topk, impl="naive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = moba_attention(q, k, v, block_size=bs, topk=topk, impl="flex")
        last = moba_attention(q[:, -9:], k, v, block_size=bs, topk=topk, q_offset=T - 9, impl="flex")
    assert rel(out, ref) < 1e-5
    assert rel(last, ref[:, -9:]) < 1e-5


def test_bad_input_messages():
    q, k, v = inputs(1, 8, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        moba_attention(q, k, v, block_size=4, topk=2)
    q, k, v = inputs(1, 8, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="Tk=8"):
        moba_attention(q[:, -2:], k, v, block_size=4, topk=2)
    with pytest.raises(ValueError, match="impl="):
        moba_attention(q, k, v, block_size=4, topk=2, impl="fast")


def test_backend_choice():
    assert moba_backend("cpu")[0] == "efficient"
    assert moba_backend("cuda", block_size=100)[0] == "efficient"


def test_benchmark_quick_mode(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "moba.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "moba.py"), "--quick", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] in ("ok", "oom", "skipped", "estimated") for r in rows)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["flex", "efficient"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_matches_naive(impl, dtype, bound):
    B, T, H, Hkv, Dk, Dv, bs, topk = 2, 1000, 4, 2, 64, 32, 128, 3
    q, k, v = inputs(B, T, H, Hkv, Dk, Dv, device="cuda", dtype=dtype, seed=11)
    grad_out = torch.randn(B, T, H, Dv, device="cuda", dtype=dtype)
    ref = run(moba_attention, *(x.detach().float().requires_grad_() for x in (q, k, v)), grad_out.float(),
              block_size=bs, topk=topk, impl="naive")
    got = run(moba_attention, q, k, v, grad_out, block_size=bs, topk=topk, impl=impl)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel(a, b) < bound, (name, rel(a, b))
    for rows in (1, 200):
        last = run(moba_attention, q, k, v, grad_out[:, -rows:], q_rows=rows, block_size=bs, topk=topk, impl=impl)
        assert rel(last[0], got[0][:, -rows:]) < bound
