"""The Triton symmetric-product kernel (nanokimi/ops/newton_schulz/triton_symmetric.py) against torch: Gram
matrices, the polynomial's fused epilogue, products of commuting symmetric matrices; then newton_schulz_group and
Muon with it on against off.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), which is slow:
sizes stay small (s <= 100, l <= 300, a few matrices), and the small explicit configs (16 x 16 tiles) that cut
these sizes into several tile rows run on the smallest cases.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from nanokimi.ops.newton_schulz import (_polynomial, coefficient_schedule, newton_schulz,  # noqa: E402
                                       newton_schulz_group, orthogonalize_naive, resolve_products)
from nanokimi.ops.newton_schulz import triton_symmetric as sym  # noqa: E402
from nanokimi.ops.newton_schulz.naive import symmetric_product_naive  # noqa: E402
from nanokimi.optim import Muon  # noqa: E402
from test_muon import direction_error, scalar_band, with_spectrum  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parents[1]
SMALL = sym.SymmetricConfig(16, 16, 4, 2)  # several tile rows and K steps even at s = 45, l = 77
QUINTIC = coefficient_schedule("quintic", 1)[0]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def symmetric_input(N, s, dtype, seed):
    """R = X X^T / trace: symmetric, eigenvalues in [0, 1], like the recursion's R_0."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, s, 2 * s + 3, generator=g, dtype=torch.float64)
    G = X @ X.mT
    return (G / G.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]).to(DEVICE, dtype)


# bf16 outputs: the kernel and the reference round the same fp32 sums, summed in another order; a value that lands
# next to a rounding boundary then rounds the other way (one bf16 ulp, 2^-8 relative, on a few elements)
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("s,l,config", [(45, 77, SMALL), (45, 77, None), (100, 300, None)])
def test_gram_matches_torch_and_is_exactly_symmetric(s, l, config, tall, dtype):
    """G = X X^T (wide) or X^T X (tall) into a slice of a larger buffer: the full matrix equals torch's, the slice's
    neighbours are untouched, and G equals its transpose bit for bit."""
    g = torch.Generator().manual_seed(s + l + tall)
    X = torch.randn((3, l, s) if tall else (3, s, l), generator=g).to(DEVICE, dtype)
    buffer = torch.full((5, s, s), 7.0, device=DEVICE, dtype=dtype)
    G = sym.gram(X, out=buffer[1:4], config=config)
    assert G.data_ptr() == buffer[1].data_ptr()
    reference = symmetric_product_naive(*((X.mT, X) if tall else (X, X.mT)))
    assert rel(G, reference) < BOUNDS[dtype]
    assert torch.equal(G, G.mT)
    assert (buffer[0] == 7).all() and (buffer[4] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [45, 100])
def test_fused_polynomial_matches_the_current_polynomial(s, dtype):
    """P = scale (a I + b R + c R R) in one kernel against newton_schulz's _polynomial (compiled-on-CUDA elementwise op
    + in-place baddbmm), with and without the per-matrix scale, and against the fp32 reference. bf16: _polynomial
    rounds a I + b R and R scale to bf16 before its GEMM, the kernel rounds once at the end."""
    R = symmetric_input(3, s, dtype, seed=s)
    a, b, c = QUINTIC
    config = SMALL if s == 45 else None
    for scale in (None, torch.rand(3, 1, 1, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5):
        fused = sym.polynomial(R, a, b, c, scale, config=config)
        current = _polynomial(R, a, b, c, scale)
        reference = symmetric_product_naive(R, R, alpha=c, C=R, beta=b, shift=a,
                                            scale=None if scale is None else scale.reshape(-1))
        assert fused.dtype == dtype and torch.equal(fused, fused.mT)
        assert rel(fused, reference) < BOUNDS[dtype]
        assert rel(fused, current) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_of_commuting_symmetric_matrices(dtype):
    """P R, (P R) P and P Q (all polynomials in one R) equal torch's products; the kernel's are symmetric bit for bit
    although P R and R P round differently."""
    R = symmetric_input(3, 45, dtype, seed=3)
    P = sym.polynomial(R, *QUINTIC)
    Q = sym.polynomial(R, 1.5, -0.5, 0.0)
    for config in (SMALL, None):
        PR = sym.symmetric_matmul(P, R, config=config)
        for A, B, result in ((P, R, PR), (PR, P, sym.symmetric_matmul(PR, P, config=config)),
                             (P, Q, sym.symmetric_matmul(P, Q, config=config))):
            assert rel(result, symmetric_product_naive(A, B)) < BOUNDS[dtype]
            assert torch.equal(result, result.mT)


def test_scale_shapes_and_bad_arguments():
    R = symmetric_input(2, 20, torch.float32, seed=4)
    scale = torch.tensor([0.5, 2.0], device=DEVICE)
    assert torch.equal(sym.symmetric_matmul(R, R, scale=scale), sym.symmetric_matmul(R, R, scale=scale[:, None, None]))
    with pytest.raises(ValueError, match=r"A \[N, s, K\] and B \[N, K, s\]"):
        sym.symmetric_matmul(R, R[:, :10])
    with pytest.raises(ValueError, match="one dtype"):
        sym.symmetric_matmul(R, R.double())
    with pytest.raises(ValueError, match="out must be"):
        sym.symmetric_matmul(R, R, out=torch.empty(2, 20, 21, device=DEVICE))
    with pytest.raises(ValueError, match="one value per matrix"):
        sym.symmetric_matmul(R, R, scale=scale[:1])
    assert sym.symmetric_matmul(R[:0], R[:0]).shape == (0, 20, 20)


def test_launch_config_untimed_where_nothing_can_be_timed(monkeypatch):
    """Without an explicit config: the autotuner's pick once a key is tuned; in the interpreter (and while a CUDA graph
    is being captured) default_config by size, never a benchmark."""
    R = symmetric_input(1, 20, torch.bfloat16, seed=7)
    if DEVICE.type == "cpu":
        assert sym.launch_config("key", 768, R) == sym.CONFIGS[0]
        assert sym.launch_config("key", 100, R) == sym.CONFIGS[2]
        sym.polynomial(R, *QUINTIC)
        assert sym.last_config == sym.CONFIGS[2]
    monkeypatch.setitem(sym._chosen, "key", SMALL)
    assert sym.launch_config("key", 768, R) == SMALL
    assert sym.default_config(768, torch.float32) == sym.CONFIGS[2]
    assert sym.upper_tiles(768, 128) == 21 and sym.upper_tiles(100, 64) == 3


GROUP = [(3, 45, 77), (2, 300, 45), (1, 45, 45)]  # short side 45: wide, tall, square


def test_group_with_symmetric_products_fp32_equals_bmm():
    """fp32: the iteration with the kernel's products gives the bmm result to rounding, grouped and alone (the
    square batch also classic, one-step segments)."""
    g = torch.Generator().manual_seed(5)
    Xs = [torch.randn(shape, generator=g).to(DEVICE) for shape in GROUP]
    schedule = coefficient_schedule("quintic", 5)
    on = newton_schulz_group(Xs, schedule, eps=1e-7, products="triton_symmetric")
    for X, O, off in zip(Xs, on, newton_schulz_group(Xs, schedule, eps=1e-7)):
        assert O.shape == X.shape and rel(O, off) < 1e-5
    square = Xs[2]
    assert rel(newton_schulz(square, schedule, "classic", eps=1e-7, products="triton_symmetric"),
               newton_schulz(square, schedule, "classic", eps=1e-7)) < 1e-5


@pytest.mark.parametrize("s,l", [(45, 77), (100, 300)])
def test_group_with_symmetric_products_bf16_stays_in_the_band(s, l):
    """bf16, wide and tall in one group, inputs with singular values down to 1e-2: directions within the bound that
    the bmm products meet too (measured over 4 seeds: kernel 2.7-3.5e-2, bmm 2.1-4.0e-2, classic 1.3-1.5e-2),
    singular values in the quintic band plus bf16 rounding (as test_muon_options'; 1.20 measured for both), and
    within bf16 error of the bmm products' result."""
    g = torch.Generator().manual_seed(s)
    wide = torch.stack([with_spectrum(s, l, 1e-2, g)[0].float() for _ in range(2 if s < 64 else 1)])  # [n, s, l]
    tall = with_spectrum(l, s, 1e-2, g)[0].float()[None]  # [1, l, s]
    schedule = coefficient_schedule("quintic", 5)
    low, high = scalar_band("quintic", 5, 1e-2)
    inputs = [wide.to(DEVICE, torch.bfloat16), tall.to(DEVICE, torch.bfloat16)]
    on = [O.cpu() for O in newton_schulz_group(inputs, schedule, eps=1e-7, products="triton_symmetric")]
    off = [O.cpu() for O in newton_schulz_group(inputs, schedule, eps=1e-7)]
    for X, O, O_off in zip((wide, tall), on, off):
        reference = torch.stack([orthogonalize_naive(x) for x in X])
        for result in (O, O_off):
            assert direction_error(result.float(), X, reference) < 4.5e-2
            sv = torch.linalg.svdvals(result.double())
            assert low - 0.02 < sv.min() and sv.max() < high + 0.09
        assert rel(O, O_off) < 8e-2  # as test_muon's bf16 gram bound: where each singular value lands in the band


def test_products_fall_back_where_the_kernel_cannot_run(monkeypatch):
    X = torch.randn(2, 8, 20, dtype=torch.float64)
    assert resolve_products("triton_symmetric", X) == "bmm"  # fp64
    assert resolve_products("bmm", X.float()) == "bmm"
    with pytest.raises(ValueError, match="unknown Newton-Schulz products"):
        resolve_products("cutlass", X)
    schedule = coefficient_schedule("quintic", 5)
    assert torch.equal(newton_schulz_group([X], schedule, eps=1e-7, products="triton_symmetric")[0],
                       newton_schulz_group([X], schedule, eps=1e-7)[0])
    if DEVICE.type == "cpu":
        assert resolve_products("triton_symmetric", X.float()) == "triton_symmetric"  # the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert resolve_products("triton_symmetric", X.float()) == "bmm"
        assert Muon([nn.Parameter(torch.randn(8, 20))], symmetric_products=True)._products(DEVICE) == "bmm"


def muon_updates(shapes, steps=2, **options):
    """The change of every param over `steps` Muon steps, and the optimizer."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device=DEVICE) * 0.1) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.05, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
        opt.step()
    return [p.detach() - s for p, s in zip(params, start)], opt


MUON_SHAPES = [(60, 20), (20, 20), (80, 20), (20, 80), (2, 30, 17)]  # GPT-2's four kinds at d = 20, experts


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_muon_step_with_symmetric_products_agrees(monkeypatch, dtype, bound):
    """Muon(symmetric_products=True) runs the kernel for every Gram and s x s product, and its steps agree with the
    default's: to fp32 rounding, or within bf16 error (the bound muon_step.py's variants are checked to)."""
    calls = []
    real = sym.symmetric_matmul
    monkeypatch.setattr(sym, "symmetric_matmul", lambda *args, **kw: calls.append(args[0].shape) or real(*args, **kw))
    on, opt = muon_updates(MUON_SHAPES, ns_dtype=dtype, symmetric_products=True)
    assert opt.symmetric_products and calls and {shape[1] for shape in calls} == {17, 20}
    calls.clear()
    off, _ = muon_updates(MUON_SHAPES, ns_dtype=dtype)
    assert not calls
    for a, b in zip(on, off):
        assert rel(a, b) < bound


def test_symmetric_products_leave_the_state_dict_alone():
    """The option is the constructor's, not the state's: the state dict is the default's, loads into an optimizer
    with the option and continues as the uninterrupted run; an optimizer pickled before the option gets it off."""
    def run(opt, params, grads):
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            opt.step()

    torch.manual_seed(2)
    shapes = [(40, 16), (16, 16)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = Muon(params, lr=0.02, symmetric_products=True)
    run(opt, params, grads[:2])
    saved, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    assert "symmetric_products" not in str(saved["param_groups"])
    run(opt, params, grads[2:])
    resumed = [nn.Parameter(p.clone()) for p in saved_params]
    resumed_opt = Muon(resumed, lr=0.02, symmetric_products=True)
    resumed_opt.load_state_dict(saved)
    run(resumed_opt, resumed, grads[2:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    old = Muon(params)
    del old.__dict__["symmetric_products"]
    old.__setstate__({"state": old.state, "param_groups": old.param_groups})
    assert old.symmetric_products is False


@pytest.mark.gpu
def test_kernel_on_gpu_for_the_gpt2_shapes_and_every_config():
    """On CUDA, bf16, s = 768: Gram matrices (wide and tall) and the scaled polynomial against cuBLAS for every
    config, exactly symmetric."""
    wide = torch.randn(4, 768, 2304, device="cuda", dtype=torch.bfloat16)
    tall = torch.randn(4, 3072, 768, device="cuda", dtype=torch.bfloat16)
    R = symmetric_input(4, 768, torch.bfloat16, seed=6)
    scale = torch.rand(4, device="cuda") + 0.5
    for config in (*sym.CONFIGS, None):
        for G, reference in ((sym.gram(wide, config=config), torch.bmm(wide, wide.mT)),
                             (sym.gram(tall, config=config), torch.bmm(tall.mT, tall))):
            assert rel(G, reference) < 5e-3 and torch.equal(G, G.mT)
        P = sym.polynomial(R, *QUINTIC, scale, config=config)
        assert rel(P, _polynomial(R, *QUINTIC, scale[:, None, None])) < 2e-2 and torch.equal(P, P.mT)


@pytest.mark.gpu
def test_group_and_captured_muon_step_on_gpu_with_symmetric_products():
    """newton_schulz_group with the kernel inside a CUDA graph replays its eager result, and the captured Muon step
    with symmetric_products agrees with the default eager step within bf16 error."""
    from nanokimi.optim import CapturedStep

    Xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in ((3, 128, 320), (2, 400, 128))]
    schedule = coefficient_schedule("quintic", 5)
    eager = newton_schulz_group(Xs, schedule, eps=1e-7, products="triton_symmetric")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        newton_schulz_group(Xs, schedule, eps=1e-7, products="triton_symmetric")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = newton_schulz_group(Xs, schedule, eps=1e-7, products="triton_symmetric")
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert rel(a, b) < 1e-5

    shapes = [(192, 64), (64, 64), (256, 64), (64, 256)]
    results = []
    for options, graphed in (({}, False), ({"symmetric_products": True}, True)):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda") * 0.1) for s in shapes]
        start = [p.detach().clone() for p in params]
        opt = Muon(params, lr=0.05, **options)
        opt = CapturedStep(opt, warmup_steps=2) if graphed else opt
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        torch.cuda.synchronize()
        assert not graphed or opt.captured
        results.append([p.detach() - s for p, s in zip(params, start)])
    for a, b in zip(*results):
        assert rel(a, b) < 5e-2


def test_products_benchmark_quick_run_and_cpu_message(tmp_path):
    """benchmarks/newton_schulz_products.py: --quick checks and times every row in the interpreter and writes its
    JSON; without CUDA and without --quick it says so and exits 0."""
    out = tmp_path / "products.json"
    script = str(ROOT / "benchmarks" / "newton_schulz_products.py")
    result = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert {"device", "date", "commit"} <= set(written)
    cases = [r["case"] for r in written["rows"]]
    assert {"gram wide l=72", "gram tall l=96", "gram gpt2 group", "product P R", "polynomial", "polynomial scaled",
            "newton_schulz_group (5 steps)"} <= set(cases)
    for r in written["rows"][:-1]:
        assert r["symmetric"] and r["check_rel"] < 2e-2 and len(r["configs_ms"]) == len(sym.CONFIGS)
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "no CUDA device" in result.stdout
