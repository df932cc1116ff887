"""Muon's step-cost options: square blocks in the Gram group (group_squares), inductor combo kernels for the
compiled passes (combo_kernels), and the cached step plan."""
import pytest
import torch
from torch import nn

import nanokimi.optim.muon as muon_module
from nanokimi.ops.newton_schulz import coefficient_schedule, newton_schulz, newton_schulz_group, orthogonalize_naive
from nanokimi.optim import Muon
from nanokimi.optim.muon import COMBO_KERNEL_OPTIONS, compiled_pass, inductor_options, squares_to_gram

from test_muon import direction_error, scalar_band, with_spectrum


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gpt2_like(d=12, layers=2):
    """GPT-2's four matrix kinds in miniature: qkv 3d x d, attn-out d x d, fc 4d x d, proj d x 4d."""
    return [shape for _ in range(layers) for shape in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def test_squares_to_gram_switches_only_free_squares_with_a_gram_side():
    q = (torch.float32, 5, "quintic", 1e-7)
    blocks = [((*q, "gram"), (24, 8), 2), ((*q, "classic"), (8, 8), 3), ((*q, "classic"), (9, 9), 1),
              ((*q, "classic"), (8, 8), 1), ((torch.bfloat16, 5, "quintic", 1e-7, "classic"), (8, 8), 1),
              ((*q, "classic"), (8, 20), 1)]
    free = [True, True, True, False, True, True]
    assert squares_to_gram(blocks, free) == [
        blocks[0], ((*q, "gram"), (8, 8), 3),  # square, free, side 8 has a gram block with equal settings
        blocks[2],  # no gram block of side 9
        blocks[3],  # the group asked for classic itself
        blocks[4],  # other dtype
        blocks[5]]  # not square


def test_distributed_plan_groups_squares_too():
    """DistributedMuon plans its owner's batches with the same rule (its constructor takes group_squares)."""
    from nanokimi.optim.dist_muon import DistributedMuon, _Job

    group = dict(heads=None, split=None, ns_steps=5, coefficients="quintic", eps=1e-7, ns_method="auto")
    mine = [_Job(torch.empty(s, device="meta"), group, 1) for s in ((24, 8), (8, 8), (8, 30))]
    sizes = (sum(j.numel_of(0) for j in mine),)
    for squares, methods in ((False, ["gram", "classic", "gram"]), (True, ["gram"] * 3)):
        plan = DistributedMuon._bucket_plan(mine, sizes, sizes, 1, False, squares)
        assert [settings[-1] for settings in plan.batch_settings] == methods


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


def test_group_squares_runs_the_squares_in_the_gram_group_fp32(monkeypatch):
    """fp32: the squares inside the 48-matrix Gram recursion give the classic result to rounding; one
    newton_schulz_group call holds every batch and no batch runs alone."""
    calls = []
    real = muon_module.newton_schulz_group
    monkeypatch.setattr(muon_module, "newton_schulz_group", lambda Xs, *args, **kw: calls.append(
        sorted(tuple(X.shape) for X in Xs)) or real(Xs, *args, **kw))
    d = 12
    apart, opt_apart = run(gpt2_like(d), ns_dtype=torch.float32)
    assert opt_apart.last_methods()[(d, d)] == "classic"
    calls.clear()
    joined, opt_joined = run(gpt2_like(d), ns_dtype=torch.float32, group_squares=True)
    assert calls == [sorted([(2, 3 * d, d), (2, d, d), (2, 4 * d, d), (2, d, 4 * d)])] * 2  # one call per step
    assert opt_joined.last_methods() == {(3 * d, d): "gram", (d, d): "gram", (4 * d, d): "gram", (d, 4 * d): "gram"}
    for a, b in zip(joined, apart):
        assert rel(a, b) < 1e-5


def test_group_squares_leaves_polar_express_and_explicit_classic_alone():
    d = 12
    params = [nn.Parameter(torch.randn(s)) for s in gpt2_like(d, layers=1)]
    opt = Muon([dict(params=params[:1] + params[2:]), dict(params=[params[1]], ns_method="classic")],
               ns_dtype=torch.float32, group_squares=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.last_methods()[(d, d)] == "classic"
    _, pe = run(gpt2_like(d, layers=1), steps=1, ns_dtype=torch.float32, group_squares=True,
                coefficients="polar_express")
    assert set(pe.last_methods().values()) == {"classic"}


def test_squares_in_the_group_bf16_match_classic_and_stay_in_the_band():
    """bf16, through newton_schulz_group beside tall matrices: the squares' result within bf16 rounding of the
    classic one, directions within the Gram form's bound of the fp32 reference, singular values in the quintic
    band (plus the bf16 output rounding classic shows too: 1.20 measured for both)."""
    g = torch.Generator().manual_seed(0)
    schedule = coefficient_schedule("quintic", 5)
    low, high = scalar_band("quintic", 5, 1e-2)
    squares = torch.stack([with_spectrum(64, 64, 1e-2, g)[0].float() for _ in range(3)])  # [3, 64, 64]
    tall = torch.randn(2, 160, 64, generator=g)
    grouped = newton_schulz_group([tall.bfloat16(), squares.bfloat16()], schedule, eps=1e-7)[1]
    classic = newton_schulz(squares.bfloat16(), schedule, "classic", eps=1e-7)
    reference = torch.stack([orthogonalize_naive(x) for x in squares])
    assert rel(grouped, classic) < 5e-2
    assert direction_error(grouped, squares, reference) < 3e-2
    sv = torch.linalg.svdvals(grouped.double())
    assert low - 0.02 < sv.min() and sv.max() < high + 0.09
    # fp32: the same grouping agrees with classic to rounding
    fp32 = newton_schulz_group([tall, squares], schedule, eps=1e-7)[1]
    assert rel(fp32, newton_schulz(squares, schedule, "classic", eps=1e-7)) < 1e-5


def count_plans(monkeypatch):
    made = []
    real = Muon._plan_step
    monkeypatch.setattr(Muon, "_plan_step", lambda self, *args: made.append(1) or real(self, *args))
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
    opt.group_squares = True
    assert step() == 10


def test_cached_plan_gives_the_replanned_result(monkeypatch):
    """Several steps with one plan == the same steps planning afresh every step (fp32, heads, split, experts)."""
    def run_steps(replan):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in ((18, 9), (2, 9, 20), (16, 6), (6, 6))]
        opt = Muon([dict(params=params[:2]), dict(params=[params[2]], split=(10, 6), heads=2)],
                   ns_dtype=torch.float32, group_squares=True)
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

    assert inductor_options(None) == {}
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

    monkeypatch.setattr(muon_module, "_compiled", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    for combo in (None, True, True, False):
        run([(12, 8), (8, 8)], steps=2, ns_dtype=torch.float32, fused=True, combo_kernels=combo)
    expected = []
    for options in (None, inductor_options(True), {"combo_kernels": False}):
        expected += [("momentum_and_stack", options), ("decay_and_update", options)]
    assert compiles == expected
    compiles.clear()
    run([(12, 8)], steps=1, ns_dtype=torch.float32, combo_kernels=True)  # CPU: eager passes
    assert compiles == []
    assert compiled_pass(muon_module.decay_and_update, True) is compiled_pass(muon_module.decay_and_update, True)


def test_torch_accepts_the_combo_options_and_compiles_each_setting_once():
    """torch.compile rejects unknown inductor options when it compiles: this torch takes ours. The same function
    under two settings is two graphs (dynamo checks the backend), each reused."""
    import torch._dynamo.utils as dynamo_utils

    def two_outputs(x, y):
        return x * 2, y + 1

    x, y = torch.randn(5), torch.randn(3)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for combo in (True, True, None, True, None):
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
    # the squares' Gram form rounds differently in bf16 (5e-2, as on the CPU); combo kernels: the same arithmetic
    for options, bound in ((dict(group_squares=True), 5e-2), (dict(combo_kernels=None), 1e-3),
                           (dict(side_stream=False), 1e-6), (dict(overlap_passes=False), 1e-6),
                           (dict(side_stream=False, overlap_passes=False), 1e-6),
                           (dict(stream_priorities=False), 1e-6), (dict(stream_priorities=(-2, -1, -3)), 1e-6)):
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
    from nanokimi.optim.muon import decay_and_update, momentum_and_stack, orthogonalize_batches, run_pass_groups

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
