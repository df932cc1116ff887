import pytest
import torch

from conftest import rel_err
from nanokimi import ModelConfig, build_model
from nanokimi.model.attention import GroupedQueryAttention, MultiHeadLatentAttention
import nanokimi.model.moe as moe_module
from nanokimi.model.moe import Experts, MoE, Router, update_router_bias

SMALL = dict(vocab_size=97, hidden_size=64, num_layers=2, mixers="KA", num_heads=4, num_kv_heads=2, head_dim=16,
             kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, kda_num_heads=2,
             kda_head_dim=16, intermediate_size=96, num_experts=6, num_experts_per_tok=2,
             moe_intermediate_size=32, routed_scaling_factor=1.5, max_position_embeddings=256)

VARIANTS = {
    "gqa": dict(mixers="G"),
    "mha-dense": dict(mixers="G", num_kv_heads=4, num_experts=0),
    "mla-rope": dict(mixers="A"),
    "mla-nope": dict(mixers="A", mla_rope=False),
    "mla-qlora-yarn-interleave": dict(mixers="A", q_lora_rank=20, rope_interleave=True, yarn_factor=4.0,
                                      yarn_original_max_position=32, yarn_mscale_all_dim=1.0),
    "kda": dict(mixers="K"),
    "moba": dict(mixers="BA", moba_block_size=8, moba_topk=2),
    "attnres-full": dict(mixers="KA", attn_res="full"),
    "attnres-block": dict(mixers="GK", num_layers=4, attn_res="block", attn_res_blocks=3),
    "hybrid": dict(mixers="KKA", num_layers=3, n_group=3, topk_group=2),
}


def small_model(**overrides):
    model = build_model(ModelConfig(**{**SMALL, **overrides}))
    return model.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decoding_equals_full_forward(name):
    model = small_model(**VARIANTS[name])
    ids = torch.randint(0, 97, (2, 29))
    with torch.no_grad():
        full = model(ids)
        for pieces in ([29 * [1]], [[5, 1, 11, 2, 10]]):
            for sizes in pieces:
                cache = model.new_cache(batch_size=2, max_len=40)
                outs, start = [], 0
                for n in sizes:
                    outs.append(model(ids[:, start:start + n], cache=cache))
                    start += n
                assert cache.pos == 29
                assert rel_err(torch.cat(outs, 1), full) < 1e-5


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_presets_decode_in_uneven_chunks_fp32(preset):
    model = build_model(ModelConfig.preset(preset)).eval()
    ids = torch.randint(0, 4096, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=1, max_len=40)
        out = torch.cat([model(ids[:, :17], cache=cache), model(ids[:, 17:18], cache=cache),
                         model(ids[:, 18:], cache=cache)], dim=1)
    assert rel_err(out, full) < 1e-5


def test_mla_absorbed_decode_equals_expanded():
    model = small_model(mixers="A", q_lora_rank=20)
    ids = torch.randint(0, 97, (2, 12))
    results = []
    for absorb_max in (0, 64):  # 0: always expanded; 64: every cached call absorbed
        MultiHeadLatentAttention.absorb_max_tokens = absorb_max
        cache = model.new_cache(2, 12)
        with torch.no_grad():
            results.append(torch.cat([model(ids[:, :7], cache=cache), model(ids[:, 7:9], cache=cache),
                                      model(ids[:, 9:], cache=cache)], 1))
    MultiHeadLatentAttention.absorb_max_tokens = 16
    assert rel_err(results[1], results[0]) < 1e-5


@pytest.mark.parametrize("name", ["gqa", "mla-rope", "kda", "hybrid"])
def test_causality(name):
    model = small_model(**VARIANTS[name])
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert rel_err(a[:, :12], b[:, :12]) < 1e-6
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cache_overflow_has_a_clear_error():
    model = small_model(mixers="G")
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def make_router(**overrides):
    cfg = ModelConfig(**{**SMALL, "num_experts": 8, "num_experts_per_tok": 2, **overrides})
    router = Router(cfg).double()
    torch.nn.init.normal_(router.weight)
    return router


def test_router_selects_with_bias_but_weights_with_raw_scores():
    router = make_router(norm_topk_prob=False, routed_scaling_factor=1.0)
    x = torch.randn(50, 64, dtype=torch.float64)
    router.e_score_correction_bias[5] = 10.0  # forces expert 5 into every token's top-k
    weights, idx = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    assert (idx == 5).any(-1).all()
    torch.testing.assert_close(weights, scores.gather(1, idx).float())


def test_router_renormalises_and_scales():
    router = make_router(norm_topk_prob=True, routed_scaling_factor=2.5)
    weights, _ = router(torch.randn(30, 64, dtype=torch.float64))
    torch.testing.assert_close(weights.sum(-1), torch.full((30,), 2.5))


def test_group_limited_routing_picks_only_from_top_groups():
    router = make_router(n_group=4, topk_group=2, num_experts_per_tok=3)
    x = torch.randn(200, 64, dtype=torch.float64)
    _, idx = router(x)
    scores = torch.sigmoid(x @ router.weight.T).view(200, 4, 2)
    group_score = scores.topk(2, dim=-1).values.sum(-1)
    top_groups = group_score.topk(2, dim=-1).indices  # [N, 2]
    chosen_groups = idx // 2
    assert (chosen_groups.unsqueeze(-1) == top_groups.unsqueeze(1)).any(-1).all()
    assert len(set(chosen_groups.flatten().tolist())) == 4  # all groups are used by some token


def test_moe_matches_a_per_token_loop():
    cfg = ModelConfig(**SMALL)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 7, 64, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    flat = x.reshape(-1, 64)
    weights, idx = moe.router(flat)
    expected = []
    for t in range(flat.shape[0]):
        y = moe.shared(flat[t])
        for w, e in zip(weights[t], idx[t]):
            h = moe.experts.gate_up[e] @ flat[t]
            gate, up = h.chunk(2)
            y = y + w * (moe.experts.down[e] @ (torch.nn.functional.silu(gate) * up))
        expected.append(y)
    expected = torch.stack(expected).view(3, 7, 64)
    assert rel_err(out, expected) < 1e-12
    grad = torch.randn_like(out)
    g1 = torch.autograd.grad(out, [x, moe.experts.gate_up], grad)
    g2 = torch.autograd.grad(expected, [x, moe.experts.gate_up], grad)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(g1, g2))


def test_all_experts_on_few_rows_equal_the_routed_path(monkeypatch):
    """Outside bf16 a few rows run every expert, weighted by the routing (0 where a row did not choose the
    expert): the routed per-expert path's outputs, gradients (inputs, both weights, routing weights) and
    expert counts, in float64."""
    torch.manual_seed(0)
    experts = Experts(num_experts=6, hidden=12, inner=5).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    indices = torch.rand(9, 6).topk(2, dim=-1).indices
    weights = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, 12, dtype=torch.float64)
    results = []
    for limit in (moe_module.DENSE_EXPERTS_ELEMENTS, 0):  # the dense path, then the routed per-expert loop
        monkeypatch.setattr(moe_module, "DENSE_EXPERTS_ELEMENTS", limit)
        out, counts = experts(x, weights, indices)
        results.append((out, counts, torch.autograd.grad(out, [x, weights, experts.gate_up, experts.down], grad)))
    (dense, dense_counts, dense_grads), (routed, routed_counts, routed_grads) = results
    assert rel_err(dense, routed) < 1e-12 and torch.equal(dense_counts, routed_counts)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(dense_grads, routed_grads))


def test_moe_on_few_rows_outside_bf16_reads_nothing_on_the_host(monkeypatch):
    """A decode-sized MoE step in fp64 (as fp32/fp64 on CUDA) never reads expert counts on the host, so it can
    be captured in a CUDA graph; the per-expert loop it replaces did, once per grouped matmul."""
    moe = MoE(ModelConfig(**SMALL)).double().eval()
    x = torch.randn(1, 16, 64, dtype=torch.float64)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    with torch.no_grad():
        moe(x)
        assert reads == []
        monkeypatch.setattr(moe_module, "DENSE_EXPERTS_ELEMENTS", 0)
        moe(x)
    assert len(reads) == 2


def test_router_bias_update_moves_toward_balance():
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg).train()
    model(torch.randint(0, 97, (2, 16)))
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    load = moe.expert_load.clone()
    assert load.sum() == 2 * 16 * 2
    update_router_bias(model, rate=0.01)
    bias = moe.router.e_score_correction_bias
    assert torch.equal(bias, 0.01 * torch.sign(load.mean() - load))
    assert moe.expert_load.sum() == 0


@pytest.mark.parametrize("mixers, kv_heads", [("G", 4), ("G", 2), ("A", 4)])
def test_qk_clip_caps_logits_and_leaves_other_heads_alone(mixers, kv_heads):
    model = small_model(mixers=mixers, num_kv_heads=kv_heads, num_layers=1, num_experts=0, mla_rope=True)
    attn = model.layers[0].mixer
    with torch.no_grad():  # blow up head 1's query weights so its logits exceed tau
        q_weight = attn.q_proj.weight.view(4, -1, 64)
        q_weight[1] *= 300.0
    ids = torch.randint(0, 97, (2, 24))
    attn.record_max_logits = True
    model(ids)
    before = attn.max_logits.clone()
    tau = 0.5 * before[1].item()
    assert before[1] > tau and (before[[0, 2, 3]] < tau).all()
    snapshot = {k: v.clone() for k, v in attn.state_dict().items()}
    gamma = attn.qk_clip_(tau)
    assert gamma[1] < 1 and torch.equal(gamma[[0, 2, 3]], torch.ones(3, dtype=gamma.dtype))
    model(ids)
    after = attn.max_logits
    assert after[1] <= tau * (1 + 1e-4)
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    if mixers == "A":
        assert torch.equal(attn.kv_a_proj.weight, snapshot["kv_a_proj.weight"])  # shared k_rope untouched
        kvb = attn.kv_b_proj.weight.view(4, 16 + 12, -1)
        old = snapshot["kv_b_proj.weight"].view(4, 16 + 12, -1)
        assert torch.equal(kvb[1, 16:], old[1, 16:])  # value rows untouched
        assert torch.equal(kvb[[0, 2, 3]], old[[0, 2, 3]])


def test_moba_layer_shares_parameters_with_mla_and_equals_it_when_all_blocks_are_chosen():
    moba = small_model(mixers="B", moba_block_size=8, moba_topk=64)
    full = small_model(mixers="A")
    full.load_state_dict(moba.state_dict())  # same parameter names and shapes: checkpoints move freely
    ids = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        assert rel_err(moba(ids), full(ids)) < 1e-5
        sparse = small_model(mixers="B", moba_block_size=8, moba_topk=2)
        sparse.load_state_dict(moba.state_dict())
        assert rel_err(sparse(ids), full(ids)) > 1e-3  # with few blocks chosen it really is sparse


@pytest.mark.parametrize("B,T,C,K", [(2, 17, 12, 4), (1, 5, 7, 3), (3, 1, 9, 4)])
def test_shifted_sum_conv_equals_conv1d(B, T, C, K):
    from nanokimi.model.kda import causal_depthwise_conv
    window = torch.randn(B, K - 1 + T, C, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, 1, K, dtype=torch.float64, requires_grad=True)
    ours = causal_depthwise_conv(window, weight)
    reference = torch.nn.functional.conv1d(window.transpose(1, 2), weight, groups=C).transpose(1, 2)
    assert rel_err(ours, reference) < 1e-12
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (window, weight), grad), torch.autograd.grad(reference, (window, weight), grad)):
        assert rel_err(a, b) < 1e-12
