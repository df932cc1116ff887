"""NBCE: the combination is the formula computed by hand; one window with beta = 0 is plain greedy decoding
through LLM.generate; several windows of different lengths decode as a full-forward reference does; the
windows cover the context in order; bad parameters get one-line errors."""
import math
import random

import pytest
import torch

from nanokimi import ModelConfig, build_model
from nanokimi.infer import LLM, SamplingParams
from nanokimi.infer.nbce import nbce_combine, nbce_windows

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n->:"


class CharTokenizer:
    """One id per character; id 0 is the end of text."""
    eot_id = 0
    stop_ids = {0}
    vocab_size = len(ALPHABET) + 1

    def encode(self, text):
        return [ALPHABET.index(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i - 1] for i in ids if 0 < i <= len(ALPHABET))


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", hidden_size=64, num_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16, kda_num_heads=2, kda_head_dim=16,
                             intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                             vocab_size=64, num_layers=2, mixers="KA")
    torch.manual_seed(0)
    return build_model(cfg).double().eval()


def hand_combination(window_logits, empty_logits, beta, pooling):
    """The formula one number at a time, in plain Python."""
    def log_softmax(row):
        top = max(row)
        z = math.log(sum(math.exp(v - top) for v in row)) + top
        return [v - z for v in row]

    windows = [log_softmax(r) for r in window_logits]
    empty = log_softmax(empty_logits)
    if pooling == "min_entropy":
        entropies = [-sum(math.exp(v) * v for v in r) for r in windows]
        pooled = windows[entropies.index(min(entropies))]
    else:
        pooled = [sum(r[j] for r in windows) / len(windows) for j in range(len(empty))]
    return log_softmax([(beta + 1) * pooled[j] - beta * empty[j] for j in range(len(empty))])


@pytest.mark.parametrize("pooling", ["min_entropy", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.25, 1.5])
def test_combination_is_the_formula(pooling, beta):
    g = torch.Generator().manual_seed(3)
    windows = torch.randn(4, 7, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [3.0], [1.0], [2.0]])
    empty = torch.randn(7, generator=g, dtype=torch.float64)
    got = nbce_combine(windows.log_softmax(-1), empty.log_softmax(-1), beta, pooling)
    want = torch.tensor(hand_combination(windows.tolist(), empty.tolist(), beta, pooling), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    if pooling == "min_entropy":  # the sharpest window (scaled by 3) is the one taken
        sharpest = windows[1].log_softmax(-1).float()
        assert torch.allclose(nbce_combine(windows.log_softmax(-1), None, 0.0, pooling), sharpest)


def test_one_window_beta_zero_is_plain_greedy(model):
    tok = CharTokenizer()
    llm = LLM(model, tokenizer=tok, max_cache_tokens=512)
    prompt = "ab -> 3\ncd -> 7\nef -> 1\nab ->"
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    nbce = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, nbce_window=200,
                                                 nbce_beta=0.0), use_tqdm=False)
    assert nbce[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert nbce[0].text == plain[0].text and nbce[0].metrics["nbce_windows"] == 1
    ids = llm.generate(prompt_token_ids=[tok.encode(prompt)], sampling_params=SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, nbce_window=200, nbce_beta=0.0), use_tqdm=False)
    assert ids[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def reference_nbce_greedy(model, windows, query, beta, pooling, steps):
    """Every step a full forward (no cache) over each row and what was generated so far."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            device = model.embed.weight.device
            rows = [torch.tensor([row + out], device=device) for row in windows + [query]]
            logp = torch.stack([model(r)[0, -1].float().log_softmax(-1) for r in rows])
            out.append(int(nbce_combine(logp[:-1], logp[-1], beta, pooling).argmax()))
    return out


@pytest.mark.parametrize("pooling", ["min_entropy", "mean"])
def test_several_windows_match_full_forward_reference(model, pooling):
    tok = CharTokenizer()
    prompt = "ab -> 3\ncd -> 7\nefg -> 12\nh -> 1\nij -> 5\nklmn -> 9\nab ->"
    windows, query = nbce_windows(tok, prompt, 16)
    assert len(windows) >= 3 and len({len(w) for w in windows}) > 1  # rows of different lengths: several groups
    llm = LLM(model, tokenizer=tok, max_cache_tokens=512)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, nbce_window=16, nbce_beta=0.7,
                            nbce_pooling=pooling)
    got = llm.generate([prompt], params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == reference_nbce_greedy(model, windows, query, 0.7, pooling, 6)
    assert got.metrics["nbce_windows"] == len(windows)


def test_windows_cover_the_context_in_order():
    tok = CharTokenizer()
    lines = [f"k{i} -> {i % 7}\n" for i in range(30)] + ["verylongline" * 4 + "\n"]
    prompt = "".join(lines) + "k3 ->"
    windows, query = nbce_windows(tok, prompt, 24)
    assert tok.decode(query) == "k3 ->"
    assert all(len(w) <= 24 and w[-len(query):] == query for w in windows)
    assert "".join(tok.decode(w[:-len(query)]) for w in windows) == "".join(lines)
    assert len(windows[-1]) >= 24 - 9  # packed from the end: the last window is (nearly) full
    whole, _ = nbce_windows(tok, prompt, 10_000)
    assert whole == [tok.encode(prompt)]


def test_windows_with_a_bpe_tokenizer():
    """Real BPE (pieces counted one by one, windows encoded whole) and a piece longer than a window."""
    from nanokimi.data import Tokenizer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "x1", "yy", "the", "and"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) + "\n" for _ in range(400)]
    lines.insert(200, "word " * 300 + "\n")
    tok = Tokenizer.train(lines, vocab_size=300)
    windows, query = nbce_windows(tok, "".join(lines) + "what is alpha", 96)
    assert all(len(w) <= 96 and w[-len(query):] == query for w in windows)
    assert "".join(tok.decode(w[:-len(query)]) for w in windows) == "".join(lines)


def test_sampling_is_seeded(model):
    llm = LLM(model, tokenizer=CharTokenizer(), max_cache_tokens=512)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=2, nbce_window=12, ignore_eos=True)
    first, second = (llm.generate(["ab -> 3\ncd -> 7\nef -> 1\nab ->"], params, use_tqdm=False)[0] for _ in range(2))
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert len(first.outputs) == 2 and all(len(o.token_ids) == 8 for o in first.outputs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(nbce_window=1), "nbce_window"), (dict(nbce_window=8, nbce_beta=-1), "nbce_beta"),
    (dict(nbce_window=8, nbce_pooling="max"), "nbce_pooling"),
    (dict(nbce_window=8, nbce_separator=""), "nbce_separator"),
])
def test_bad_params_one_line(kwargs, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_prompts_one_line(model):
    llm = LLM(model, tokenizer=CharTokenizer(), max_cache_tokens=512)
    with pytest.raises(ValueError, match="decoded by LLM.generate"):  # the engine never decodes NBCE plainly
        llm.engine.add_request("x", [1, 2, 3], SamplingParams(nbce_window=8))
    with pytest.raises(ValueError, match="no query"):
        llm.generate(["ab -> 3\ncd -> 7\n"], SamplingParams(nbce_window=8), use_tqdm=False)
    with pytest.raises(ValueError, match="no room for context"):
        llm.generate(["ab -> 3\nthe query is long"], SamplingParams(nbce_window=8), use_tqdm=False)
    with pytest.raises(ValueError, match="no separator"):  # one long line: it would silently run past the window
        llm.generate(["the whole prompt is the query"], SamplingParams(nbce_window=8), use_tqdm=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate(["ab -> 3\nq"], SamplingParams(nbce_window=8, max_tokens=10 ** 6), use_tqdm=False)


def test_cli_generate_with_nbce(tmp_path, capsys):
    from nanokimi.checkpoint import save_checkpoint
    from nanokimi.cli import main
    from nanokimi.data import Tokenizer

    tok = Tokenizer.train(["ab -> 3\ncd -> 7\n"] * 20, vocab_size=280)
    tok.save(tmp_path / "tokenizer.json")
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, intermediate_size=64)
    save_checkpoint(tmp_path / "ckpt", build_model(cfg), tokenizer_file=tmp_path / "tokenizer.json")
    prompt = "ab -> 3\ncd -> 7\nab -> 3\ncd -> 7\nab ->"
    args = ["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "3",
            "--temperature", "0", "--nbce-window", "8"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt) and "nbce: " in captured.err
    assert main(args[:-1] + ["1"]) == 2
    assert "nbce_window must be" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("pooling", ["min_entropy", "mean"])
def test_nbce_on_cuda_matches_full_forward_reference(pooling):
    """The decoder's tensors live on the model's device: several windows on CUDA (float64 GQA: no near-ties)
    against full forwards, and sampling runs there."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = ModelConfig.preset("tiny-dense", vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                             head_dim=32, intermediate_size=128)
    torch.manual_seed(0)
    model = build_model(cfg).to("cuda", torch.float64).eval()
    tok = CharTokenizer()
    prompt = "ab -> 3\ncd -> 7\nefg -> 12\nh -> 1\nij -> 5\nklmn -> 9\nab ->"
    windows, query = nbce_windows(tok, prompt, 16)
    llm = LLM(model, tokenizer=tok, max_cache_tokens=512)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, nbce_window=16, nbce_beta=0.7,
                            nbce_pooling=pooling)
    got = llm.generate([prompt], params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == reference_nbce_greedy(model, windows, query, 0.7, pooling, 6)
    sampled = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, seed=3, nbce_window=16,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert len(sampled.outputs[0].token_ids) == 6
