import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from nanokimi import ModelConfig, build_model
from nanokimi.infer import DecodeStep, generate, sample_next

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=97, hidden_size=64, num_layers=3, mixers="KAG", num_heads=4, num_kv_heads=2, head_dim=16,
             kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, kda_num_heads=2,
             kda_head_dim=16, intermediate_size=96, num_experts=6, num_experts_per_tok=2,
             moe_intermediate_size=32, routed_scaling_factor=1.5, max_position_embeddings=256)
VARIANTS = {
    "hybrid": dict(),
    "mla-rope-qlora": dict(mixers="A", num_layers=2, mla_rope=True, q_lora_rank=20),
    "gqa-mqa": dict(mixers="G", num_layers=2, num_kv_heads=1, num_experts=0),
}


def small_model(**overrides):
    return build_model(ModelConfig(**{**SMALL, **overrides})).eval()


def greedy_by_full_forward(model, ids, new):
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_greedy_generate_equals_argmax_of_full_forward(preset):
    model = build_model(ModelConfig.preset(preset)).eval()
    ids = torch.randint(0, 4096, (2, 9))
    expected = greedy_by_full_forward(model, ids, 5)
    assert torch.equal(generate(model, ids, 5, temperature=0, prefill_chunk=4), expected)
    assert torch.equal(generate(model, ids, 5, temperature=0, fixed_shape=True), expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_fixed_shape_decode_equals_plain_cached_decode(name):
    model = small_model(**VARIANTS[name])
    B, prompt, new = 3, 7, 6
    ids = torch.randint(0, 97, (B, prompt + new))
    with torch.no_grad():
        plain_cache = model.new_cache(B, prompt + new)
        plain = [model(ids[:, :prompt], cache=plain_cache)[:, -1]]
        fixed_cache = model.new_cache(B, prompt + new)
        step = DecodeStep(model, fixed_cache)  # the function a CUDA graph captures, run eagerly
        fixed = [model(ids[:, :prompt], cache=fixed_cache)[:, -1]]
        for t in range(prompt, prompt + new - 1):
            plain.append(model(ids[:, t:t + 1], cache=plain_cache)[:, -1])
            fixed.append(step(ids[:, t], t).clone())
    plain, fixed = torch.stack(plain, 1), torch.stack(fixed, 1)
    assert rel_err(fixed, plain) < 1e-5
    assert torch.equal(fixed.argmax(-1), plain.argmax(-1))


def test_fixed_shape_decode_ignores_stale_cache_entries():
    model = small_model()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        reference = model(ids)[:, -1]
        cache = model.new_cache(2, 16)
        for layer in cache.layers:  # garbage beyond the written positions must be masked out
            for buffer in vars(layer).values():
                if buffer.shape[1] == 16:
                    buffer.normal_()
        cache.reset()
        step = DecodeStep(model, cache)
        model(ids[:, :9], cache=cache)
        logits = step(ids[:, 9], 9)
    assert rel_err(logits, reference) < 1e-5


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = small_model(**VARIANTS["hybrid"])
    ids = torch.randint(0, 97, (4, 5))
    a = generate(model, ids, 12, temperature=1.0, seed=7)
    b = generate(model, ids, 12, temperature=1.0, seed=7)
    c = generate(model, ids, 12, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :5], ids)


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    logits = logits.repeat_interleave(400, dim=0)  # 400 draws per row
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_k=4, generator=g).view(3, 400)
    top4 = logits[::400].topk(4, dim=-1).indices
    assert all(set(drawn[r].tolist()) <= set(top4[r].tolist()) for r in range(3))
    assert all(len(set(drawn[r].tolist())) > 1 for r in range(3))

    probs = logits[::400].softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < 0.6  # nucleus: smallest prefix reaching 0.6
    drawn = sample_next(logits, temperature=1.0, top_p=0.6, generator=g).view(3, 400)
    for r in range(3):
        allowed = set(order[r][keep[r]].tolist())
        assert set(drawn[r].tolist()) <= allowed
        assert len(allowed) == 1 or len(set(drawn[r].tolist())) > 1
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_eos_rows_stay_finished():
    model = small_model(**VARIANTS["gqa-mqa"])
    ids = torch.randint(0, 97, (3, 4))
    free = generate(model, ids, 8, temperature=0)
    eos = int(free[0, 6])  # the token row 0 emits third
    out = generate(model, ids, 8, temperature=0, eos_id=eos)
    for row in out[:, 4:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == eos).all()
    assert (out[0, 6:] == eos).all()


def test_bad_arguments_have_clear_errors():
    model = small_model(**VARIANTS["gqa-mqa"])
    with pytest.raises(ValueError, match="prompt_len"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, top_p=0)
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, use_cuda_graph=True)


@pytest.mark.parametrize("script", ["train_step.py", "generate.py", "profile_step.py", "attention_backends.py"])
def test_benchmark_quick_mode_runs_on_cpu(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json
    result = json.loads(out.read_text())
    assert result["results"], result
    assert not [r for r in result["results"].values() if r.get("error")], result["results"]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_fp32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build_model(ModelConfig.preset("tiny-dense"), device="cuda").eval()
    ids = torch.randint(0, 4096, (4, 33), device="cuda")
    eager = generate(model, ids, 16, temperature=0, use_cuda_graph=False)
    graphed = generate(model, ids, 16, temperature=0, use_cuda_graph=True)
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
def test_cuda_graph_captures_the_bf16_moe_hybrid():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build_model(ModelConfig.preset("tiny"), device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 4096, (4, 33), device="cuda")
    eager = generate(model, ids, 8, temperature=0, use_cuda_graph=False)
    graphed = generate(model, ids, 8, temperature=0, use_cuda_graph=True)  # True: a failed capture raises
    assert torch.equal(eager[:, :34], graphed[:, :34])  # the first new token comes from the same prefill
    cache = model.new_cache(4, 48)
    step = DecodeStep(model, cache, graph=True)
    cache.reset()
    with torch.no_grad():
        plain_cache = model.new_cache(4, 48)
        model(ids, cache=plain_cache)
        model(ids, cache=cache)
        expected = model(ids[:, -1:], cache=plain_cache)[:, -1]
        got = step(ids[:, -1], 33)
    assert rel_err(got, expected) < 3e-2


def test_generate_cli_short_request_on_a_tokenizer_json_and_a_kimi_tiktoken_checkpoint(tmp_path, capsys):
    """`nanokimi generate --max-new-tokens 5` (prompt + new tokens shorter than one cache block) on a tiny
    checkpoint with tokenizer.json, and on one with Kimi's tiktoken.model + tokenizer_config.json."""
    from test_chat import write_kimi_tokenizer

    from nanokimi.checkpoint import save_checkpoint
    from nanokimi.cli import main
    from nanokimi.data import TiktokenTokenizer, Tokenizer, load_tokenizer
    from nanokimi.infer import LLM, SamplingParams

    Tokenizer.train(["hello world, the quick brown fox"] * 20, vocab_size=300).save(tmp_path / "tokenizer.json")
    write_kimi_tokenizer(tmp_path / "kimi")
    for name, source, files in (("hf", "tokenizer.json", ["tokenizer.json"]),
                                ("kimi", "kimi", ["kimi/tiktoken.model", "kimi/tokenizer_config.json"])):
        torch.manual_seed(0)
        model = small_model(vocab_size=load_tokenizer(tmp_path / source).vocab_size)
        ckpt = save_checkpoint(tmp_path / name / "ckpt", model)
        for file in files:
            (ckpt / Path(file).name).write_bytes((tmp_path / file).read_bytes())
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "hello", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert out.startswith("hello") and len(out.strip()) > len("hello")
        llm = LLM(str(ckpt), device="cpu")
        tokenizer = llm.tokenizer
        assert isinstance(tokenizer, TiktokenTokenizer if name == "kimi" else Tokenizer)
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "hello", "--max-new-tokens", "5",
                     "--temperature", "0", "--repetition-penalty", "0.2"]) == 0
        penalized = llm.generate("hello", SamplingParams(max_tokens=5, temperature=0, repetition_penalty=0.2),
                                 use_tqdm=False)[0]
        assert capsys.readouterr().out == "hello" + penalized.text + "\n"
        plain = llm.generate("hello", SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
        assert penalized.token_ids != plain.token_ids  # the flag reached the sampler
        assert tokenizer.encode("hello world") == load_tokenizer(ckpt).encode("hello world")
