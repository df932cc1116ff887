"""KDA op: the chunk form and the dispatcher against the token-by-token reference, forward and gradients."""
import pytest
import torch
import torch.nn.functional as F

import nanokimi.ops.kda as kda_ops
from nanokimi.ops.kda import kda, kda_backend, kda_chunk, kda_recurrent
from nanokimi.ops.kda.fla_kernels import fla_status


def make_inputs(B, T, H, K, V, *, g_low=-1.0, with_state=True, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = g_low * torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen) if with_state else None
    inputs = [q, k, v, g, beta, state]
    return [None if x is None else x.to(device=device, dtype=dtype if x is not state else torch.float32)
            for x in inputs]


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    """Run fn, backprop random cotangents through o and the final state; return [o, state, grads...]."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, state = leaves
    o, final = fn(q, k, v, g, beta, initial_state=state, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen).to(final.device)).sum()
    loss.backward()
    return [o, final] + [x.grad for x in leaves if x is not None]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def assert_close_all(got, want, bound, names=("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dstate")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = rel_err(a, b)
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.0e}"


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_chunk_matches_recurrence(T, with_state):
    inputs = make_inputs(2, T, 3, 16, 24, with_state=with_state, seed=T)
    assert_close_all(outputs_and_grads(kda_chunk, inputs), outputs_and_grads(kda_recurrent, inputs), 1e-5)


def test_chunk_matches_recurrence_long_sequence():
    inputs = make_inputs(1, 1000, 2, 8, 12, seed=7)
    assert_close_all(outputs_and_grads(kda_chunk, inputs), outputs_and_grads(kda_recurrent, inputs), 1e-5)


@pytest.mark.parametrize("T", [40, 130])
def test_strong_decay_is_finite_and_matches(T):
    inputs = make_inputs(2, T, 2, 16, 8, g_low=-20.0, seed=T)
    got = outputs_and_grads(kda_chunk, inputs)
    assert all(torch.isfinite(x).all() for x in got)
    assert_close_all(got, outputs_and_grads(kda_recurrent, inputs), 1e-5)


def test_mixed_strong_and_weak_channels_match():
    """Weak channels keep state across chunks while strong ones wipe it: both must stay exact."""
    inputs = make_inputs(1, 150, 2, 16, 16, seed=3)
    g = inputs[3]
    weak = torch.arange(16) % 2 == 0
    inputs[3] = torch.where(weak, g * 0.01, g * 20.0)  # [-0.01, 0] and [-20, 0]
    assert_close_all(outputs_and_grads(kda_chunk, inputs), outputs_and_grads(kda_recurrent, inputs), 1e-5)


@pytest.mark.parametrize("chunk_size", [8, 16, 32])
def test_other_chunk_sizes(chunk_size):
    inputs = make_inputs(1, 50, 2, 8, 8, seed=chunk_size)
    got = outputs_and_grads(kda_chunk, inputs, chunk_size=chunk_size)
    assert_close_all(got, outputs_and_grads(kda_recurrent, inputs), 1e-5)


def test_explicit_scale_and_bf16_dtypes():
    q, k, v, g, beta, state = make_inputs(1, 20, 2, 8, 8, seed=5)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, scale=0.3, initial_state=state, output_final_state=True)
    o, s = kda_chunk(q, k, v, g, beta, scale=0.3, initial_state=state, output_final_state=True)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    bf16 = [x.bfloat16() for x in (q, k, v, g, beta)]
    o16, s16 = kda_chunk(*bf16, scale=0.3, initial_state=state, output_final_state=True)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    o16_ref, _ = kda_recurrent(*bf16, scale=0.3, initial_state=state)
    assert rel_err(o16, o16_ref) <= 1e-2


def test_final_state_is_none_unless_asked_and_empty_sequence():
    q, k, v, g, beta, state = make_inputs(1, 5, 1, 4, 4)
    assert kda_chunk(q, k, v, g, beta)[1] is None
    empty = [x[:, :0] for x in (q, k, v, g, beta)]
    o, s = kda_chunk(*empty, initial_state=state, output_final_state=True)
    assert o.shape == (1, 0, 1, 4) and torch.equal(s, state)


def test_bad_inputs_are_rejected_with_clear_messages():
    q, k, v, g, beta, state = make_inputs(1, 5, 2, 4, 6)
    with pytest.raises(ValueError, match="beta must be"):
        kda(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="g must all be"):
        kda(q, k, v, g[..., :2], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        kda(q, k, v, g, beta, initial_state=state.transpose(-1, -2))
    with pytest.raises(ValueError, match="impl must be one of"):
        kda(q, k, v, g, beta, impl="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        kda_chunk(q, k, v, g, beta, chunk_size=20)


def test_dispatcher_on_cpu_picks_torch_paths(monkeypatch):
    path, reason = kda_backend("cpu")
    assert path == "torch-chunk" and "CUDA" in reason
    calls = []
    monkeypatch.setattr(kda_ops, "kda_chunk", lambda *a: calls.append("chunk") or kda_chunk(*a))
    monkeypatch.setattr(kda_ops, "kda_recurrent", lambda *a: calls.append("naive") or kda_recurrent(*a))
    for T in (1, kda_ops.CHUNK_MIN_T - 1, kda_ops.CHUNK_MIN_T, 100):
        q, k, v, g, beta, state = make_inputs(1, T, 2, 8, 8, seed=T)
        o, s = kda(q, k, v, g, beta, initial_state=state, output_final_state=True)
        o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=state, output_final_state=True)
        assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    assert calls == ["naive", "naive", "chunk", "chunk"]
    with pytest.raises(RuntimeError, match="fla"):
        kda(q, k, v, g, beta, impl="fla")


def config_cost(config):
    """What a config asks of the GPU: pipeline stages, then block sizes, then warps (smaller is cheaper)."""
    blocks = sum(v for v in config.kwargs.values() if isinstance(v, int) and not isinstance(v, bool))
    return (config.num_stages or 0, blocks, config.num_warps or 0)


def cheapest(configs, count: int = 1):
    """The `count` configs that ask the least of the GPU, cheapest first."""
    return sorted(configs, key=config_cost)[:count]


def autotuners_in(modules):
    """The Triton autotuners these modules define, also those under other decorators: fla writes
    @triton.heuristics over @triton.autotune, so the module holds a Heuristics whose .fn is the Autotuner."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    found = {}
    for module in modules:
        for value in vars(module).values():
            while isinstance(value, KernelInterface) and not isinstance(value, Autotuner):
                value = getattr(value, "fn", None)
            if isinstance(value, Autotuner):
                found[id(value)] = value
    return list(found.values())


def test_autotuners_under_heuristics_are_found():
    """The pinning fixture below reaches every autotuner: a GPU run showed fla's KDA kernels (all under
    @triton.heuristics) going through full autotuning because only bare Autotuner attributes were pinned."""
    import types

    triton = pytest.importorskip("triton")

    def body(x, BLOCK: triton.language.constexpr):
        pass

    module = types.ModuleType("kernels")
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32)]
    module.bare = triton.autotune(configs, key=[])(triton.jit(body))
    module.wrapped = triton.heuristics({"EVEN": lambda args: True})(triton.autotune(configs, key=[])(triton.jit(body)))
    module.untuned = triton.jit(body)
    module.alias = module.bare
    tuners = autotuners_in([module])
    assert len(tuners) == 2 and module.bare in tuners and module.wrapped.fn in tuners


@pytest.fixture(scope="module")
def fla_pinned():
    """fla autotunes each Triton kernel over up to ~36 configs, compiling every one: minutes per dtype on a fresh
    machine (the first KDA step of a training run waits as long; README "KDA's first step"). These tests check
    numbers, not speed, so each autotuner takes one config from the ones fla itself would try (after fla's own
    pruning): one compile per kernel, no benchmarking. `run_pinned(fn)` runs fn and, if a pinned config does not
    compile or launch on this GPU (e.g. too much shared memory in fp32), pins the three cheapest instead (Triton's
    autotuner skips the ones that fail) and runs it again; only if that fails too does it unpin them all and run
    with fla's full autotuning (minutes on a cold cache)."""
    import sys

    import fla.ops.kda  # noqa: F401 - imports the kernels, so their autotuners exist

    tuners = autotuners_in([module for name, module in list(sys.modules.items()) if name.startswith("fla.") and module])
    originals = [(t, t.prune_configs) for t in tuners]

    def pin(count):
        for tuner, prune in originals:
            tuner.prune_configs = lambda kwargs, prune=prune: cheapest(prune(kwargs), count)
            tuner.cache.clear()

    def unpin():
        for tuner, prune in originals:
            tuner.prune_configs = prune
            tuner.cache.clear()

    def run_pinned(fn):
        for fallback in (lambda: pin(3), unpin, None):
            try:
                return fn()
            except Exception as error:  # noqa: BLE001 - only Triton's compile/launch errors are retried
                if not type(error).__module__.startswith("triton") or fallback is None:
                    raise
                fallback()

    pin(1)

    assert any(t.base_fn.__name__.startswith("chunk_kda") for t, _ in originals), "found no KDA autotuners to pin"
    yield run_pinned
    unpin()


def check_fla_against_recurrence(inputs, bound, run_pinned):
    want = outputs_and_grads(kda_recurrent, [None if x is None else x.float() for x in inputs])
    got = run_pinned(lambda: outputs_and_grads(kda, inputs, impl="fla"))
    assert got[0].dtype == inputs[2].dtype and got[1].dtype == torch.float32
    assert_close_all(got, want, bound)
    q, k, v, g, beta, state = inputs
    if state is None:
        return
    with torch.no_grad():  # decode path: fused_recurrent_kda
        o, s = run_pinned(lambda: kda(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], initial_state=state,
                                      output_final_state=True))
        o_ref, s_ref = kda_recurrent(*(x[:, :1].float() for x in (q, k, v, g, beta)),
                                     initial_state=state, output_final_state=True)
        assert rel_err(o, o_ref) <= bound and rel_err(s, s_ref) <= bound


needs_fla = pytest.mark.skipif(not torch.cuda.is_available() or not fla_status()[0], reason="needs CUDA and fla-core")


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("T, g_low, with_state", [(100, -1.0, False), (300, -20.0, True), (1, -1.0, True)])
def test_fla_matches_recurrence_on_gpu_in_training_dtypes(T, g_low, with_state, fla_pinned):
    """The dtypes the model hands fla under bf16 autocast (q, k, v bf16; g, beta fp32) at one KDA layer's head
    shape of the 900m configs (8 heads of 128): strong and weak decay, with and without a carried state."""
    assert kda_backend("cuda")[0] == "fla"
    inputs = make_inputs(1, T, 8, 128, 128, g_low=g_low, with_state=with_state, seed=T, device="cuda")
    inputs[:3] = [x.bfloat16() for x in inputs[:3]]
    check_fla_against_recurrence(inputs, 3e-2, fla_pinned)


@pytest.mark.gpu
@needs_fla
def test_fla_matches_recurrence_on_gpu_in_fp32(fla_pinned):
    inputs = make_inputs(2, 130, 2, 64, 64, g_low=-5.0, seed=130, device="cuda")
    check_fla_against_recurrence(inputs, 2e-3, fla_pinned)

