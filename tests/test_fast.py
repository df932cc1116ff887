import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from nanokimi import ModelConfig, build_model
from nanokimi.model.moe import Experts, grouped_matmul
from nanokimi.train.fast import compile_model, describe_paths, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def test_loss_in_one_piece_equals_chunked_loss_and_grads():
    model = build_model(ModelConfig.preset("tiny-dense", vocab_size=300, num_layers=2, mixers="G"))
    ids = torch.randint(0, 300, (2, 37))
    targets = torch.randint(0, 300, (2, 37))
    targets[0, :6] = -100
    results = []
    for chunk in (0, 11, 8192):
        loss = model.loss(ids, targets, chunk_tokens=chunk)
        results.append((loss, torch.autograd.grad(loss, [model.lm_head.weight, model.layers[0].mixer.q_proj.weight])))
    for loss, grads in results[1:]:
        assert rel_err(loss, results[0][0]) < 1e-6
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, results[0][1]))


def test_grouped_matmul_takes_the_autocast_dtype():
    x = torch.randn(12, 16)
    w = torch.randn(3, 16, 8)
    ends = torch.tensor([4, 4, 12])
    with torch.autocast("cpu", torch.bfloat16):
        y = grouped_matmul(x, w, ends)
    assert y.dtype == torch.bfloat16
    expected = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
    assert rel_err(y.float(), expected) < 2e-2


def test_expert_counts_match_bincount_including_empty_experts():
    experts = Experts(num_experts=7, hidden=8, inner=4)
    torch.nn.init.normal_(experts.gate_up)
    torch.nn.init.normal_(experts.down)
    indices = torch.tensor([[0, 3], [3, 6], [0, 6], [3, 0], [6, 3]])  # experts 1, 2, 4, 5 get nothing
    _, counts = experts(torch.randn(5, 8), torch.rand(5, 2), indices)
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=7))


def test_describe_paths_names_every_component():
    model = build_model(ModelConfig.preset("tiny"))
    line = describe_paths(model, "cpu", torch.float32)
    assert line.startswith("kda=") and "moe=grouped_mm" in line and "attention[mla" in line and "compile=off" in line
    dense = build_model(ModelConfig.preset("tiny-dense"))
    assert "moe=" not in describe_paths(dense, "cpu") and "attention[gqa qk=64 v=64]" in describe_paths(dense, "cpu")


def test_flops_formula_counts_attention_of_full_attention_layers_only():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import flops_per_token
    from nanokimi.model.info import model_info
    gpt = ModelConfig.preset("gpt-124m")
    assert flops_per_token(gpt, 1024) == 6 * model_info(gpt)["activated_params"] + 12 * 1024 * 12 * 768
    kl = ModelConfig.preset("bench-kl-900m")
    assert flops_per_token(kl, 4096) == 6 * model_info(kl)["activated_params"] + 12 * 4096 * 4 * 8 * (192 + 128) / 2


def test_make_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="adamw"):
        make_optimizer(torch.nn.Linear(2, 2), "sgd")


@pytest.mark.gpu
@pytest.mark.parametrize("preset,scope", [("tiny", "auto"), ("tiny", "module"), ("tiny-dense", "block")])
def test_compiled_model_matches_eager_on_gpu(preset, scope, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # fla's fp32 tl.dot calls name no precision, so on TF32 cards they run in tf32 unless Triton's default says
    # otherwise (fla's own fp32 tests set this too); the comparison is about our compile, not tf32's rounding
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    torch.manual_seed(0)
    eager = build_model(ModelConfig.preset(preset), device="cuda")
    compiled = build_model(ModelConfig.preset(preset), device="cuda")
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, scope=scope)
    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    # fp32: under bf16 autocast the two programs round differently and MoE top-k choices near ties differ
    assert_same_loss_and_grads(eager, compiled, ids, loss_bound=1e-4, grad_bound=1e-3)


def assert_same_loss_and_grads(eager, compiled, ids, loss_bound, grad_bound):
    """The two models' next-token losses on ids, and all their gradients, agree within relative bounds."""
    a, b = eager.loss(ids, ids), compiled.loss(ids, ids)
    assert rel_err(b, a) < loss_bound
    a.backward()
    b.backward()
    grads = [(p.grad.flatten(), q.grad.flatten()) for p, q in zip(eager.parameters(), compiled.parameters())
             if p.grad is not None]
    assert rel_err(torch.cat([q for _, q in grads]), torch.cat([p for p, _ in grads])) < grad_bound


@pytest.mark.gpu
def test_padded_value_attention_equals_unpadded_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from nanokimi.model.attention import causal_attention
    q, k = (torch.randn(2, 300, 4, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fast = causal_attention(q, k, v, 0.07, 0)  # padded, flash
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=0.07).transpose(1, 2)
    assert rel_err(fast, ref) < 1e-2
    grads = torch.autograd.grad(fast, [q, k, v], torch.ones_like(fast))
    assert all(g.isfinite().all() for g in grads)


def test_router_scores_stay_fp32_under_autocast():
    from nanokimi.model.moe import Router
    router = Router(ModelConfig.preset("tiny"))
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 256)
    plain = router(x)
    with torch.autocast("cpu", torch.bfloat16):
        autocast = router(x)
    assert torch.equal(plain[1], autocast[1]) and torch.equal(plain[0], autocast[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_its_formula(dtype):
    from nanokimi.model.norm import RMSNorm
    norm = RMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = (3 * torch.randn(5, 7, 48)).to(dtype)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert rel_err(norm(x), expected) < 1e-6


def test_capture_step_needs_cuda_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    from nanokimi.train.fast import capture_step
    with pytest.raises(RuntimeError, match="needs CUDA"):
        capture_step(lambda: torch.zeros(()))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_captured_training_step_equals_eager_steps_on_gpu(preset):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from nanokimi.model.moe import update_router_bias
    from nanokimi.train.fast import capture_step
    torch.manual_seed(0)
    models = [build_model(ModelConfig.preset(preset), device="cuda") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 4096, (2, 128), device="cuda")

    def make_step(model, cache_enabled):
        opt = make_optimizer(model, "adamw", lr=1e-3, capturable=True)

        def step():
            with torch.autocast("cuda", torch.bfloat16, cache_enabled=cache_enabled):
                loss = model.loss(ids, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_router_bias(model)
            return loss
        return step

    eager = make_step(models[0], True)
    eager_losses = [eager().item() for _ in range(6)]
    replay = capture_step(make_step(models[1], False), warmup=3)  # warm-up steps 1-3; the capture only records
    graph_losses = [replay().item() for _ in range(3)]  # steps 4, 5 and 6
    assert graph_losses == pytest.approx(eager_losses[3:], rel=1e-2)
    assert graph_losses[1] != graph_losses[0]  # the replay really trains


def test_compiled_moe_model_in_fp32_matches_eager():
    """Outside bf16 the MoE FFN runs its per-expert loop (grouped_mm is bf16-only under compile): the compiled
    model breaks the graph there instead of failing, and matches the eager model."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", mixers="A", num_layers=1, first_k_dense=0)
    eager, compiled = build_model(cfg), build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    assert_same_loss_and_grads(eager, compiled, ids, loss_bound=1e-5, grad_bound=1e-5)
