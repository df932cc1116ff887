"""The fast Muon step: equal to the previous eager step, tensor lrs equal to float lrs, and the CUDA-graph
step (CapturedStep): eager fallback on the CPU and on a failed capture; captured == eager on a GPU."""
import copy
import math
import warnings
from collections import defaultdict

import pytest
import torch
from torch import nn

from nanokimi.ops.newton_schulz import coefficient_schedule
from nanokimi.optim import CapturedStep, Muon, build_optimizer, matrix_blocks
from nanokimi.optim.muon import MOONLIGHT_RMS


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def unfolded_newton_schulz(X, schedule):
    """The iteration before the fold: X <- a X + (b G + c G^2) X, with baddbmm's additive input."""
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in schedule:
        gram = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.baddbmm(X, X, poly, beta=a) if tall else torch.baddbmm(X, poly, X, beta=a)
    return X


@torch.no_grad()
def previous_step(opt):
    """Muon.step as it was before the CUDA-graph work (float lrs only, unfolded Newton-Schulz), as the reference."""
    batches = defaultdict(list)
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        bufs = []
        for p in params:
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            torch.add(p.grad, buf, alpha=group["momentum"], out=buf)
            bufs.append(buf)
        if not params:
            continue
        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        heads, split = group["heads"], group["split"]
        for p, buf in zip(params, bufs):
            for blocks in zip(matrix_blocks(p.grad, heads, split), matrix_blocks(buf, heads, split),
                              matrix_blocks(p, heads, split)):
                key = (tuple(blocks[0].shape[-2:]), group["ns_steps"], group["coefficients"], group["eps"])
                batches[key].append((*blocks, group))
    for ((rows, cols), ns_steps, coefficients, eps), jobs in batches.items():
        count = sum(g.numel() // (rows * cols) for g, *_ in jobs)
        X = torch.empty(count, rows, cols)
        start = 0
        for g, m, _, group in jobs:
            n = g.numel() // (rows * cols)
            dst = X[start:start + n].view(g.shape)
            start += n
            if group["nesterov"]:
                torch.add(g, m, alpha=group["momentum"], out=dst)
            else:
                dst.copy_(m)
        norms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
        X.mul_((norms + eps).reciprocal())
        O = unfolded_newton_schulz(X, coefficient_schedule(coefficients, ns_steps))
        scale = MOONLIGHT_RMS * math.sqrt(max(rows, cols))
        start = 0
        for g, _, w, group in jobs:
            n = g.numel() // (rows * cols)
            w.add_(O[start:start + n].view(g.shape), alpha=-group["lr"] * scale)
            start += n


def mixed_params():
    """Params and groups covering every block kind: plain, tall and wide of equal sides (24x10 / 10x24, 12x7 /
    7x12, per-head 8x40 blocks beside tall 40x8 experts), per-expert, split + heads, heads
    alone, no Nesterov, square, and a split param whose second block's batch (12x7) exists before its first
    block's (14x7)."""
    shapes = [(24, 10), (10, 24), (3, 12, 7), (12, 7), (18, 9), (7, 7), (7, 12), (26, 7), (16, 40), (3, 40, 8)]
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    groups = [dict(params=params[:4] + [params[6], params[9]]),
              dict(params=[params[4]], split=(12, 6), heads=3, lr=0.05),
              dict(params=[params[5]], nesterov=False, weight_decay=0.0), dict(params=[params[7]], split=(14, 12)),
              dict(params=[params[8]], heads=2)]
    return params, groups


def run_muon(steps, lrs, grads, step_fn=None, tensor_lr=False):
    torch.manual_seed(1)
    params, groups = mixed_params()
    opt = Muon(groups, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    start = [p.detach().clone() for p in params]
    for i in range(steps):
        for j, group in enumerate(opt.param_groups):
            lr = lrs[i] * (2.5 if j == 1 else 1.0)
            group["lr"] = torch.tensor(lr) if tensor_lr else lr
        for p, g in zip(params, grads[i]):
            p.grad = None if g is None else g.clone()
        (step_fn or Muon.step)(opt)
    buffers = [opt.state[p]["momentum_buffer"] for p in params]
    return [p.detach() - s for p, s in zip(params, start)], buffers


def random_grads(steps, seed=0, skip=None):
    torch.manual_seed(seed)
    params, _ = mixed_params()
    return [[None if (i, k) == skip else torch.randn_like(p) for k, p in enumerate(params)] for i in range(steps)]


def test_step_equals_previous_eager_step():
    grads = random_grads(5, skip=(1, 3))  # a param without a grad for one step
    lrs = [0.02, 0.015, 0.03, 0.01, 0.02]
    old, old_bufs = run_muon(5, lrs, grads, step_fn=previous_step)
    new, new_bufs = run_muon(5, lrs, grads)
    # the same arithmetic in the same order, except Newton-Schulz's folded polynomial: fp32 rounding apart
    for a, b in zip(new + new_bufs, old + old_bufs):
        assert rel(a, b) < 1e-5


def test_tensor_lr_matches_float_lr():
    grads = random_grads(4, seed=2)
    lrs = [0.03, 0.01, 0.02, 0.005]  # a schedule that changes every step
    floats, _ = run_muon(4, lrs, grads)
    tensors, _ = run_muon(4, lrs, grads, tensor_lr=True)
    for a, b in zip(tensors, floats):
        assert rel(a, b) < 1e-6
    other, _ = run_muon(4, [lr * 1.01 for lr in lrs], grads, tensor_lr=True)
    assert max(rel(a, b) for a, b in zip(other, floats)) > 1e-3  # the comparison sees a 1% lr change


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 8, bias=False)

    def forward(self, idx):
        return self.out(self.norm(torch.tanh(self.fc(self.embed(idx)))))


def train_steps(model, opt, lrs, seed=0):
    """Real forward/backward steps with a per-step lr schedule; zero_grad(set_to_none=True) like the trainer."""
    g = torch.Generator().manual_seed(seed)
    for lr in lrs:
        idx = torch.randint(0, 11, (4, 5), generator=g)
        target = torch.randn(4, 5, 8, generator=g)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr
        loss = nn.functional.mse_loss(model(idx), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_captured_step_on_cpu_is_the_eager_step_with_one_warning():
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    lrs = [1.0, 0.5, 0.8, 0.3, 0.9, 0.1]
    captured = CapturedStep(build_optimizer(model, "muon", lr=0.01))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, captured, lrs)
    messages = [str(w.message) for w in caught if "CapturedStep" in str(w.message)]
    assert len(messages) == 1 and "CUDA" in messages[0] and "\n" not in messages[0]
    assert not captured.captured
    plain = build_optimizer(twin, "muon", lr=0.01)
    train_steps(twin, plain, lrs)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    state = captured.state_dict()
    assert set(state) == {"muon", "adamw"} and len(captured.param_groups) == len(plain.param_groups)


def test_failed_capture_falls_back_to_eager_and_restores_float_lrs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12, bias=False), nn.Tanh(), nn.Linear(12, 8, bias=False))  # Muon only
    twin = copy.deepcopy(model)
    captured = CapturedStep(build_optimizer(model, "muon", lr=0.01), warmup_steps=2)
    captured._can_capture = lambda: captured.failed is None  # pretend we are on a GPU: the capture itself fails
    captured._warmup_step = captured.optimizer.step  # (the real one runs on a CUDA side stream)
    lrs = [1.0, 0.7, 0.4, 0.2, 0.1]
    x, y = torch.randn(6, 8), torch.randn(6, 8)

    def run(opt, m):
        for lr in lrs:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    with pytest.warns(UserWarning, match="capturing the step failed"):
        run(captured, model)
    assert captured.failed and not captured.captured
    assert all(isinstance(g["lr"], float) for g in captured.param_groups)
    run(build_optimizer(twin, "muon", lr=0.01), twin)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_state_created_during_a_capture_is_forgotten():
    # A capture records kernels without running them: state made inside it would hold unwritten memory
    # and be re-initialised on every replay, so CapturedStep drops it and takes one more eager step.
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5, 3))
    captured = CapturedStep(Muon([a, b], lr=0.01))
    known = [{id(p) for p in opt.state} for opt in captured._inner_optimizers()]
    a.grad = torch.randn_like(a)
    captured.optimizer.step()
    assert captured._forget_new_state(known) and len(captured.optimizer.state) == 0
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    captured.optimizer.step()
    known = [{id(p) for p in opt.state} for opt in captured._inner_optimizers()]
    captured.optimizer.step()
    assert not captured._forget_new_state(known) and len(captured.optimizer.state) == 2


def test_warmup_steps_must_be_positive():
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        CapturedStep(build_optimizer(SmallNet(), "muon"), warmup_steps=0)


@pytest.mark.gpu
def test_captured_step_matches_eager_on_gpu():
    torch.manual_seed(0)
    model = SmallNet().cuda()
    twin = copy.deepcopy(model)
    captured = CapturedStep(build_optimizer(model, "muon", lr=0.01))
    eager = build_optimizer(twin, "muon", lr=0.01)
    start = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(10):
        grads = [torch.randn(p.shape, device="cuda", generator=g) * 1e-2 for p in model.parameters()]
        for opt in (captured, eager):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1.0 - 0.08 * step)  # changes every step
                if step == 7:
                    group["weight_decay"] = 0.05  # baked into the graph: must recapture
        for p, q, grad in zip(model.parameters(), twin.parameters(), grads):
            q.grad = grad.clone()
            if step % 3 == 2 or p.grad is None:
                p.grad = grad.clone()  # a new grad tensor: copied into the captured one
            else:
                p.grad.copy_(grad)
        captured.step()
        eager.step()
        assert captured.captured == (step >= 3 and step != 7), step
    torch.cuda.synchronize()
    for p, q, s in zip(model.parameters(), twin.parameters(), start):
        assert rel(p.detach() - s, q.detach() - s) < 1e-5


def test_compiled_passes_equal_eager_on_cpu():
    """The torch.compile'd elementwise passes (what runs on CUDA) against the eager functions, through Muon:
    plain, tall/wide, per-expert, split + heads, no Nesterov, float then tensor lrs (one compile each)."""
    def run(fused):
        torch.manual_seed(0)
        params, groups = mixed_params()
        opt = Muon(groups, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, fused=fused)
        g = torch.Generator().manual_seed(1)
        for i in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            for group in opt.param_groups:
                group["lr"] = torch.tensor(0.01 * (i + 1)) if i == 2 else 0.01 * (i + 1)
            opt.step()
        return [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]

    import torch._dynamo.utils as dynamo_utils
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    compiled, eager = run(True), run(False)
    for a, b in zip(compiled, eager):
        assert rel(a, b) < 1e-6
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 2  # no recompile for tensor lrs


def test_compiled_small_ops_equal_eager_on_cpu():
    """Newton-Schulz's s x s small ops as torch.compile runs them on CUDA (_small_op: inductor with the casts
    kept), against eager: the start (operands of P_0 / n and their diagonal fix) and the in-place diagonal shift
    and fix, in bf16 and fp32. Compiled, the shift's rounding error must survive (inductor would drop the
    bf16 round trip it is computed from), and only the diagonals may change."""
    from nanokimi.ops.newton_schulz import SMALL_OP_OPTIONS, _fix_diagonal, _shift, _shift_diagonal, _start

    compile = lambda fn: torch.compile(fn, fullgraph=True, dynamic=False, options=SMALL_OP_OPTIONS)  # noqa: E731
    a, b, c = 3.4445, -4.7750, 2.0315
    h, a2 = _shift(a, b, c)
    g = torch.Generator().manual_seed(0)
    for dtype, bound in ((torch.bfloat16, 1e-6), (torch.float32, 1e-6)):
        X = torch.randn(3, 9, 20, generator=g)
        gram = (X @ X.mT).to(dtype)
        for compiled, eager in zip(compile(_start)(gram, 1e-7, h, a2, c), _start(gram, 1e-7, h, a2, c)):
            assert compiled.dtype == eager.dtype and rel(compiled, eager) < bound
        results = []
        for shift, fix in ((compile(_shift_diagonal), compile(_fix_diagonal)), (_shift_diagonal, _fix_diagonal)):
            R, P = gram.clone(), gram.clone() * 2
            saved = torch.empty(3, 9, dtype=dtype)
            add = shift(R.diagonal(dim1=-2, dim2=-1), h, a2, c, saved)
            shifted = R.clone()
            fix(P.diagonal(dim1=-2, dim2=-1), add, R.diagonal(dim1=-2, dim2=-1), saved)
            results.append((add, shifted, P))
            assert torch.equal(R, gram)  # restored exactly
        (add, shifted, P), (add_eager, shifted_eager, P_eager) = results
        off = ~torch.eye(9, dtype=torch.bool)
        assert torch.equal(shifted[:, off], gram[:, off]) and torch.equal(P[:, off], 2 * gram[:, off])
        assert torch.equal(shifted, shifted_eager) and rel(add, add_eager) < 1e-6 and rel(P, P_eager) < bound
        if dtype == torch.bfloat16:
            assert (add - a2).abs().max() > 1e-4  # the rounding correction is there, compiled too


def test_state_dict_saved_before_ns_method_still_loads():
    p = nn.Parameter(torch.randn(12, 30))
    opt = Muon([p], lr=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["ns_method"]
    fresh = Muon([p], lr=0.01)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["ns_method"] == "auto"
    fresh.step()
    assert fresh.last_methods() == {(12, 30): "gram"}
