"""Muon's execution (nanokimi.optim.muon_fast): inductor combo kernels for the compiled passes (combo_kernels), the
cached step plan, the CUDA streams, and the step against the readable muon_update."""
import pytest
import torch
from torch import nn

import nanokimi.optim.muon_fast as muon_fast
from nanokimi.optim import Muon
from nanokimi.optim.blocks import matrix_blocks
from nanokimi.optim.muon import muon_update
from nanokimi.optim.muon_fast import COMBO_KERNEL_OPTIONS, compiled_pass, inductor_options


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gpt2_like(d=12, layers=2):
    """GPT-2's four matrix kinds in miniature: qkv 3d x d, attn-out d x d, fc 4d x d, proj d x 4d."""
    return [shape for _ in range(layers) for shape in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def run(shapes, steps=2, **options):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    opt = Muon(params, lr=0.05, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params], opt


def count_plans(monkeypatch):
    made = []
    real = muon_fast.plan_step
    monkeypatch.setattr("nanokimi.optim.muon.plan_step", lambda *args: made.append(1) or real(*args))
    return made


def test_step_plan_is_cached_and_invalidated_by_what_it_depends_on(monkeypatch):
    made = count_plans(monkeypatch)
    a, b, c = nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8, 20)), nn.Parameter(torch.randn(6, 6))
    opt = Muon([dict(params=[a, b]), dict(params=[c], lr=0.01)], ns_dtype=torch.float32)

    def step(grads=(a, b, c)):
        for p in (a, b, c):
            p.grad = torch.randn_like(p) if any(p is q for q in grads) else None
        opt.step()
        return len(made)

    assert step() == 1 and step() == 1
    for group in opt.param_groups:  # lr, momentum, weight decay, nesterov: read every step, not planned
        group.update(lr=0.3, momentum=0.5, weight_decay=0.0, nesterov=False)
    assert step() == 1
    assert step(grads=(a, c)) == 2  # another set of params with grads
    assert step() == 2  # back to the first set: its plan is still there
    opt.param_groups[0]["heads"] = 2  # a [12, 8] block becomes 2 x [6, 8] ([8, 20]: 2 x [4, 20])
    assert step() == 3 and (6, 8) in opt.last_methods()
    for option, value in (("split", (4, 2)), ("ns_steps", 4), ("ns_method", "classic"), ("eps", 1e-6),
                          ("coefficients", "polar_express"), ("ns_dtype", torch.float64)):
        before = len(made)
        opt.param_groups[1][option] = value
        assert step() == before + 1, option


def test_cached_plan_gives_the_replanned_result(monkeypatch):
    """Several steps with one plan == the same steps planning afresh every step (fp32, heads, split, experts)."""
    def run_steps(replan):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in ((18, 9), (2, 9, 20), (16, 6), (6, 6))]
        opt = Muon([dict(params=params[:2]), dict(params=[params[2]], split=(10, 6), heads=2)],
                   ns_dtype=torch.float32)
        g = torch.Generator().manual_seed(3)
        for i in range(3):
            for k, p in enumerate(params):
                p.grad = None if (i, k) == (1, 3) else torch.randn(p.shape, generator=g)
            if replan:
                opt._step_plans.clear()
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run_steps(False), run_steps(True)):
        assert torch.equal(a, b)


def test_inductor_options_per_combo_setting(monkeypatch):
    from torch._inductor import config

    assert inductor_options(False) == {"combo_kernels": False}
    on = inductor_options(True)
    assert on["combo_kernels"] is True and all(hasattr(config, name) for name in on)
    monkeypatch.setitem(COMBO_KERNEL_OPTIONS, "no_such_inductor_option", 1)  # e.g. an older torch
    assert "no_such_inductor_option" not in inductor_options(True) and inductor_options(True)["combo_kernels"]


def test_combo_kernels_reach_torch_compile_and_key_the_cache(monkeypatch):
    """compiled_pass hands torch.compile the combo options of the Muon that calls it, one compiled function per
    (pass, option); fused=False (the CPU default) never compiles."""
    compiles = []

    def fake_compile(fn, **kwargs):
        compiles.append((fn.__name__, kwargs.get("options")))
        return fn

    monkeypatch.setattr(muon_fast, "_compiled", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    for combo in (True, True, False):
        run([(12, 8), (8, 8)], steps=2, ns_dtype=torch.float32, fused=True, combo_kernels=combo)
    expected = []
    for options in (inductor_options(True), inductor_options(False)):
        expected += [("momentum_and_stack", options), ("decay_and_update", options)]
    assert compiles == expected
    compiles.clear()
    run([(12, 8)], steps=1, ns_dtype=torch.float32, combo_kernels=True)  # CPU: eager passes
    assert compiles == []
    assert compiled_pass(muon_fast.decay_and_update, True) is compiled_pass(muon_fast.decay_and_update, True)


def test_torch_accepts_the_combo_options_and_compiles_each_setting_once():
    """torch.compile rejects unknown inductor options when it compiles: this torch takes ours. The same function
    under two settings is two graphs (dynamo checks the backend), each reused."""
    import torch._dynamo.utils as dynamo_utils

    def two_outputs(x, y):
        return x * 2, y + 1

    x, y = torch.randn(5), torch.randn(3)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for combo in (True, True, False, True, False):
        a, b = compiled_pass(two_outputs, combo)(x, y)
        assert torch.equal(a, x * 2) and torch.equal(b, y + 1)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.gpu
def test_options_on_gpu_match_the_default():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    shapes = gpt2_like(d=64)

    def updates(**options):
        """The change of every param over two bf16 steps."""
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda") * 0.1) for s in shapes]
        start = [p.detach().clone() for p in params]
        opt = Muon(params, lr=0.05, **options)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach() - s for p, s in zip(params, start)]

    default = updates()
    # combo kernels: the same arithmetic, fused differently
    for options, bound in ((dict(combo_kernels=False), 1e-3),
                           (dict(side_stream=False), 1e-6), (dict(overlap_passes=False), 1e-6),
                           (dict(side_stream=False, overlap_passes=False), 1e-6),
                           (dict(stream_priorities=False), 1e-6)):
        for a, b in zip(updates(**options), default):
            assert rel(a, b) < bound, options


def test_side_stream_moves_the_classic_only_params():
    """side_stream's split (the CPU plans it too; only CUDA runs it): GPT-2's square attn-out matrices run classic
    Newton-Schulz and nothing else, so they take the second stream; a param with a Gram block stays."""
    shapes = gpt2_like(d=64) + [(64, 64), (128, 64)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = Muon(params, side_stream=True)
    opt.add_param_group({"params": [nn.Parameter(torch.randn(192, 64))], "split": (64, 128)})  # square + tall
    jobs = [(p, None, g) for g in opt.param_groups for p in g["params"]]
    plan = opt._plan(torch.device("cpu"), jobs)
    assert [tuple(jobs[i][0].shape) for i in plan.classic_only] == [s for s in shapes if s[0] == s[1]]
    assert opt._plan(torch.device("cpu"), jobs) is plan  # planned once


def test_pass_groups_run_apart_give_the_whole_step():
    """overlap_passes' plan (the CPU plans it; only CUDA runs it on streams): params that share a batch form one
    group (a split param joins its two batches), and running the momentum and update passes group by group, with
    each group's own indices, changes the params exactly as the one-pass step does."""
    from nanokimi.optim.muon_fast import decay_and_update, momentum_and_stack, orthogonalize_batches, run_pass_groups

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (32, 16), (16, 40), (16, 40), (40, 16)]
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    opt = Muon(params[1:], lr=0.05)
    opt.add_param_group({"params": [params[0]], "split": (16, 32)})  # a 16 x 16 block (joins param 1) and a 32 x 16
    for p in params:
        p.grad = torch.randn_like(p)
    jobs = [(p, torch.randn_like(p), g) for g in opt.param_groups for p in g["params"]]
    plan = opt._plan(torch.device("cpu"), jobs)
    order = [tuple(p.shape) for p, _, _ in jobs]
    grouped = [sorted(order[i] for i in group.params) for group in plan.pass_groups]
    assert sorted(grouped) == sorted([[(16, 16), (32, 16), (48, 16)], [(16, 40), (16, 40)], [(40, 16)]])
    assert sorted(k for group in plan.pass_groups for k in group.batch_ids) == list(range(len(plan.batches)))

    def run(grouped):
        params = [p.detach().clone() for p, _, _ in jobs]
        grads, bufs = [p.grad for p, _, _ in jobs], [m.clone() for _, m, _ in jobs]
        momenta, nesterov, decays = [0.95] * len(jobs), [True] * len(jobs), [0.1] * len(jobs)
        lr_index = [0] * len(jobs)
        if grouped:
            run_pass_groups(plan, momentum_and_stack, decay_and_update, params, grads, bufs, momenta, nesterov,
                            decays, [0.05], lr_index)
            return params, bufs
        stacked = momentum_and_stack(grads, bufs, momenta, nesterov, plan.layouts, plan.batches)
        decay_and_update(params, orthogonalize_batches(stacked, plan.settings), [0.05], lr_index, decays,
                         plan.sources)
        return params, bufs

    for a, b in zip(sum(run(True), []), sum(run(False), [])):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_side_stream_captured_matches_eager_default():
    """The classic batches on a second stream and the momentum/update passes on a third (overlap_passes), inside a
    CUDA-graph capture (the streams fork from and join the capturing stream), give the default eager step's
    result: the same kernels, only run beside each other."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from nanokimi.optim import CapturedStep

    shapes = gpt2_like(d=64)
    results = []
    for side, overlap, priorities, graphed in ((False, False, False, False), (True, False, True, True),
                                               (True, True, False, True), (True, True, True, True),
                                               (False, True, True, True)):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda") * 0.1) for s in shapes]
        start = [p.detach().clone() for p in params]
        opt = Muon(params, lr=0.05, side_stream=side, overlap_passes=overlap, stream_priorities=priorities)
        opt = CapturedStep(opt, warmup_steps=2) if graphed else opt
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        torch.cuda.synchronize()
        assert not graphed or opt.captured
        results.append([p.detach() - s for p, s in zip(params, start)])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert rel(a, b) < 1e-5


@pytest.mark.parametrize("nesterov", [True, False])
def test_step_equals_muon_update_block_by_block(nesterov):
    """The batched step (shared batches, a Gram group, heads, split, experts, two lrs) against the readable
    muon_update applied to each block alone, fp32, three steps: equal to fp32 rounding."""
    torch.manual_seed(0)
    shapes = gpt2_like(d=8, layers=1) + [(3, 16, 8), (24, 8)]
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    reference = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    layouts = [(None, None)] * 5 + [(2, (16, 8))]
    groups = [dict(params=params[:5]), dict(params=[params[5]], heads=2, split=(16, 8), lr=0.01)]
    opt = Muon(groups, lr=0.05, nesterov=nesterov, weight_decay=0.1, ns_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for w, grad, m, (heads, split), lr in zip(reference, grads, buffers, layouts, [0.05] * 5 + [0.01]):
            for blocks in zip(matrix_blocks(w, heads, split), matrix_blocks(grad, heads, split),
                              matrix_blocks(m, heads, split)):
                muon_update(*blocks, lr=lr, nesterov=nesterov, weight_decay=0.1, ns_dtype=torch.float32)
    for p, w in zip(params, reference):
        assert rel(p.detach(), w) < 1e-5
    for p, m in zip(params, buffers):
        assert torch.allclose(opt.state[p]["momentum_buffer"], m, atol=1e-6)


def test_execution_options_must_be_booleans():
    with pytest.raises(ValueError, match="stream_priorities must be True or False"):
        Muon([nn.Parameter(torch.zeros(4, 4))], stream_priorities=(-1, -1, 0))
