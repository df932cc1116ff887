"""Packed documents in the model (KDA state/conv reset, block-diagonal attention) and supervised fine-tuning."""
import json
import random

import pytest
import torch

from nanokimi.config import ModelConfig
from nanokimi.data import Tokenizer, load_tokenizer
from nanokimi.data.chat import ChatTemplate, encode_conversation
from nanokimi.model import build_model
from nanokimi.model.packing import Documents
from nanokimi.ops.kda import kda
from nanokimi.post.sft import IGNORE, Example, build_examples, collate, pack_rows

HYBRID = dict(preset="tiny", vocab_size=320)  # KDA + MLA + MoE
DENSE = dict(preset="tiny-dense", vocab_size=320, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32)
MLA_ROPE_BLOCK_ATTNRES = dict(preset="tiny", vocab_size=320, mixers="KA", num_layers=2, mla_rope=True,
                              attn_res="block", attn_res_blocks=2)


def tiny_model(spec, seed=0):
    spec = dict(spec)
    torch.manual_seed(seed)
    return build_model(ModelConfig.preset(spec.pop("preset"), **spec), device="cpu")


def random_examples(n, rng, max_len=40, vocab=320):
    out = []
    for _ in range(n):
        length = rng.randint(2, max_len)
        inputs = [rng.randrange(vocab) for _ in range(length)]
        targets = [rng.randrange(vocab) if rng.random() < 0.6 else IGNORE for _ in range(length)]
        targets[-1] = rng.randrange(vocab)
        out.append(Example(inputs, targets))
    return out


def test_documents_layout():
    docs = Documents.from_lengths([[3, 2], [5]])
    assert docs.ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]]
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 10]
    mask = docs.attention_mask()[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True] and mask[2].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_kda_varlen_equals_each_sequence_alone(impl):
    torch.manual_seed(0)
    lengths, H, K = [5, 19, 1, 12], 2, 8
    T = sum(lengths)
    q, k = (torch.nn.functional.normalize(torch.randn(1, T, H, K), dim=-1) for _ in range(2))
    v, g = torch.randn(1, T, H, K), -torch.rand(1, T, H, K)
    beta = torch.rand(1, T, H)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o, state = kda(q, k, v, g, beta, impl=impl, cu_seqlens=cu, output_final_state=True)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, state_n = kda(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], impl="naive",
                           output_final_state=True)
        torch.testing.assert_close(o[:, s:e], o_n, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[n], state_n[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [HYBRID, DENSE, MLA_ROPE_BLOCK_ATTNRES], ids=["hybrid", "gqa", "mla-rope-attnres"])
def test_packed_loss_equals_unpacked_losses(spec):
    """fp32: the packed batch's loss (mean over learned tokens) equals the per-conversation losses run alone,
    weighted by their learned tokens, to 1e-5; the per-token logits agree as well."""
    model = tiny_model(spec)
    rng = random.Random(1)
    examples = random_examples(9, rng)
    seq_len = 64
    rows = pack_rows(examples, seq_len)
    assert len(rows) < len(examples) and sum(len(r) for r in rows) == len(examples)
    inputs, targets, documents = collate(rows, seq_len, pad_id=0, pack=True)
    packed = model.loss(inputs, targets, documents=documents)
    total, count = 0.0, 0
    for e in examples:
        alone = model.loss(torch.tensor([e.inputs]), torch.tensor([e.targets]))
        n = sum(t != IGNORE for t in e.targets)
        total, count = total + alone.item() * n, count + n
    assert abs(packed.item() - total / count) < 1e-5
    logits = model(inputs, documents=documents)  # [B, T, V]
    row, start = 0, 0
    for e in rows[row]:
        alone = model(torch.tensor([e.inputs]))[0]
        torch.testing.assert_close(logits[row, start:start + len(e.inputs)], alone, atol=1e-5, rtol=1e-5)
        start += len(e.inputs)


def test_packing_is_rejected_with_a_cache_and_for_moba():
    model = tiny_model(dict(preset="tiny", vocab_size=320, mixers="KB", num_layers=2))
    docs = Documents.from_lengths([[4, 4]])
    with pytest.raises(ValueError, match="MoBA"):
        model(torch.zeros(1, 8, dtype=torch.long), documents=docs)
    dense = tiny_model(DENSE)
    with pytest.raises(ValueError, match="cache"):
        dense(torch.zeros(1, 8, dtype=torch.long), cache=dense.new_cache(1, 8), documents=docs)


def test_pack_rows_best_fit_and_collate():
    rng = random.Random(0)
    examples = random_examples(30, rng, max_len=50)
    rows = pack_rows(examples, 64)
    assert all(sum(len(e.inputs) for e in row) <= 64 for row in rows)
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in examples)
    assert len(rows) <= -(-sum(len(e.inputs) for e in examples) // 64) + 3  # close to the lower bound
    assert pack_rows(examples, 64, pack=False) == [[e] for e in examples]
    inputs, targets, docs = collate(rows[:2], 64, pad_id=7, pack=True)
    first = rows[0][0]
    assert inputs[0, :len(first.inputs)].tolist() == first.inputs
    assert targets[0, :len(first.targets)].tolist() == first.targets
    used = sum(len(e.inputs) for e in rows[0])
    assert (inputs[0, used:] == 7).all() and (targets[0, used:] == IGNORE).all()
    assert docs.ids[0, used - 1] != docs.ids[0, min(used, 63)] or used == 64


CHAT_MESSAGES = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                 {"role": "assistant", "content": "Bye!"}]


def test_sft_targets_are_exactly_the_assistant_tokens(tmp_path):
    tok = Tokenizer.train(["Be short. Hi Hello! Bye Bye!"] * 5, vocab_size=300)
    template = ChatTemplate()
    examples, stats = build_examples([("", CHAT_MESSAGES, None)], tok, template, seq_len=200)
    ids, mask = encode_conversation(tok, template, CHAT_MESSAGES)
    (e,) = examples
    assert e.inputs == ids[:-1]
    learned = [t for t in e.targets if t != IGNORE]
    assert learned == tok.encode_chat("Hello!<|im_end|>") + tok.encode_chat("Bye!<|im_end|>")
    assert [t != IGNORE for t in e.targets] == mask[1:]
    short, stats = build_examples([("", CHAT_MESSAGES, None)], tok, template, seq_len=8)
    assert stats["no_target"] == 1 and not short  # cut before any assistant token


QA = [("What color is the sky?", "Blue."), ("What is two plus two?", "Four."), ("Name a fruit.", "Apple."),
      ("Say hi.", "Hi there!"), ("What do cows drink?", "Water."), ("Capital of France?", "Paris.")]


def write_base_checkpoint(path, spec):
    from nanokimi.checkpoint import save_checkpoint

    texts = [f"{q} {a}" for q, a in QA] * 20
    tok = Tokenizer.train(texts, vocab_size=330)
    tok.save(path.parent / "tokenizer.json")
    model = tiny_model({**spec, "vocab_size": tok.vocab_size})
    save_checkpoint(path, model, tokenizer_file=path.parent / "tokenizer.json")
    return tok


def greedy_reply(model, tokenizer, template, question, max_new_tokens=16):
    from nanokimi.infer.generate import generate

    ids = tokenizer.encode_chat(template.render([{"role": "user", "content": question}], add_generation_prompt=True))
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0, eos_id=tokenizer.token_to_id("<|im_end|>"))
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new[:new.index(tokenizer.token_to_id("<|im_end|>"))] if tokenizer.token_to_id(
        "<|im_end|>") in new else new)


@pytest.mark.slow
def test_sft_learns_to_answer_in_the_template(tmp_path, capsys):
    from nanokimi.checkpoint import load_model_checkpoint
    from nanokimi.post.sft import run_sft

    spec = dict(preset="tiny-dense", hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
                intermediate_size=256)
    write_base_checkpoint(tmp_path / "base", spec)
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in QA] * 4 + [json.dumps({"prompt": q, "completion": a}) for q, a in QA] * 4
    data.write_text("\n".join(lines) + "\n")
    result = run_sft(str(tmp_path / "base"), str(data), str(tmp_path / "run"), [
        "train.seq_len=96", "train.batch_size=4", "train.max_steps=80", "train.eval_every=40", "optim.name=adamw",
        "optim.lr=3e-3", "optim.warmup_steps=5", "train.device=cpu", "sft.val_fraction=0"], progress=False)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.25 * losses[0]
    ckpt = result["checkpoint"]
    model = load_model_checkpoint(ckpt).eval()
    tok, template = load_tokenizer(ckpt), ChatTemplate.load(ckpt)
    assert (tmp_path / "run" / "checkpoint" / "chat_template.jinja").is_file()
    replies = {q: greedy_reply(model, tok, template, q) for q, _ in QA}
    assert replies == dict(QA)
