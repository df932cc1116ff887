"""Packed documents in the model (KDA state/conv reset, block-diagonal attention) and supervised fine-tuning."""
import json
import random

import pytest
import torch

from nanokimi.config import ModelConfig
from nanokimi.data import Tokenizer, load_tokenizer
from nanokimi.data.chat import DEFAULT_TEMPLATE, ChatTemplate, encode_conversation
from nanokimi.model import build_model
from nanokimi.model.packing import Documents
from nanokimi.ops.kda import kda
from nanokimi.post.sft import IGNORE, Conversation, Example, build_examples, collate, pack_rows

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
    assert mask[4].tolist() == [False, False, False, True, True]
    assert mask[2].tolist() == [True, True, True, False, False]


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
    assert (docs.ids[0, used - len(rows[0][-1].inputs):] == docs.ids[0, -1]).all()  # the padding joins the last
    assert docs.cu_seqlens.tolist()[:len(rows[0]) + 1] == [0, *torch.tensor([len(e.inputs) for e in rows[0]][:-1])
                                                           .cumsum(0).tolist(), 64]


CHAT_MESSAGES = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                 {"role": "assistant", "content": "Bye!"}]


def test_sft_targets_are_exactly_the_assistant_tokens(tmp_path):
    tok = Tokenizer.train(["Be short. Hi Hello! Bye Bye!"] * 5, vocab_size=300)
    template = ChatTemplate()
    examples, stats = build_examples([Conversation("test", "", CHAT_MESSAGES)], tok, template, seq_len=200)
    ids, mask = encode_conversation(tok, template, CHAT_MESSAGES)
    (e,) = examples
    assert e.inputs == ids[:-1]
    learned = [t for t in e.targets if t != IGNORE]
    assert learned == tok.encode_chat("Hello!<|im_end|>") + tok.encode_chat("Bye!<|im_end|>")
    assert [t != IGNORE for t in e.targets] == mask[1:]
    short, stats = build_examples([Conversation("test", "", CHAT_MESSAGES)], tok, template, seq_len=8)
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
    end = tokenizer.token_to_id("<|im_end|>")
    new = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0, eos_id=end)[0, len(ids):].tolist()
    return tokenizer.decode(new[:new.index(end)] if end in new else new)


SMALL_GQA = dict(preset="tiny-dense", hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
                 intermediate_size=256)
SMALL_K2 = dict(preset="tiny", mixers="A", num_layers=2, hidden_size=96, num_heads=4, mla_rope=True,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=256,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense=1)
SFT_SETTINGS = ["train.seq_len=96", "train.batch_size=4", "train.max_steps=80", "train.eval_every=40",
                "optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=5", "train.device=cpu"]


def write_chat_data(path):
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in QA] * 4 + [json.dumps({"prompt": q, "completion": a}) for q, a in QA] * 4
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny GQA model fine-tuned from random weights on QA (nanokimi's own tokenizer.json)."""
    from nanokimi.post.sft import run_sft

    root = tmp_path_factory.mktemp("sft")
    write_base_checkpoint(root / "base", SMALL_GQA)
    result = run_sft(str(root / "base"), str(write_chat_data(root / "chat.jsonl")), str(root / "run"),
                     [*SFT_SETTINGS, "sft.val_fraction=0.2"], progress=False)
    return root, result


def test_sft_learns_to_answer_in_the_template(sft_run):
    from nanokimi.checkpoint import load_model_checkpoint

    root, result = sft_run
    records = [json.loads(l) for l in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.25 * losses[0] and "val_loss" in records[-1]
    ckpt = result["checkpoint"]
    assert ckpt == str(root / "run" / "checkpoints" / "step-80")  # the step-N layout, with the chat files inside
    assert (root / "run" / "checkpoints" / "step-80" / "chat_template.jinja").is_file()
    model = load_model_checkpoint(ckpt).eval()
    tok, template = load_tokenizer(ckpt), ChatTemplate.load(ckpt)
    assert {q: greedy_reply(model, tok, template, q) for q, _ in QA} == dict(QA)


def test_sft_resume_and_bad_input(sft_run, tmp_path):
    from nanokimi.config import ConfigError
    from nanokimi.data import DataError
    from nanokimi.post.sft import run_sft
    from nanokimi.train.trainer import TrainingError

    root, _ = sft_run
    with pytest.raises(TrainingError, match="already holds a training run"):
        run_sft(str(root / "base"), str(root / "chat.jsonl"), str(root / "run"), SFT_SETTINGS, progress=False)
    with pytest.raises(ConfigError, match="section one of train, optim, sft"):
        run_sft(str(root / "base"), str(root / "chat.jsonl"), str(tmp_path / "x"), ["lr=3"], progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(DataError, match="line 1 must be"):
        run_sft(str(root / "base"), str(tmp_path / "bad.jsonl"), str(tmp_path / "y"), SFT_SETTINGS, progress=False)
    (tmp_path / "role.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"},
                                                                  {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="role.jsonl line 1: chat template: unknown role 'robot'"):
        run_sft(str(root / "base"), str(tmp_path / "role.jsonl"), str(tmp_path / "z"), SFT_SETTINGS, progress=False)
    more = run_sft(str(root / "base"), str(root / "chat.jsonl"), str(root / "run"),
                   [*SFT_SETTINGS, "train.max_steps=84", "sft.val_fraction=0.2"], resume=True, progress=False)
    assert more["step"] == 84


def test_chat_loop_commands_keep_the_conversation_and_survive_ctrl_c():
    from nanokimi.chat_cli import chat_loop

    seen = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        if messages[-1]["content"] == "interrupt me":
            yield "partial"
            raise KeyboardInterrupt
        yield "echo "
        yield str(len(messages))

    out = []
    lines = ["hello", "again", "interrupt me", "after", "/system Be kind.", "first", "/reset", "x", "/help", "",
             "/exit", "never"]
    messages = chat_loop(reply, lines, out.append, system="Be terse.")
    text = "".join(out)
    assert "echo 2\n" in text and "echo 4\n" in text and "partial [stopped]\n" in text
    assert seen[3][-2] == {"role": "assistant", "content": "partial"}  # the stopped reply stays in the conversation
    assert seen[4] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "first"}]
    assert seen[5] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "x"}]
    assert "commands:" in text and len(seen) == 6 and messages[-1]["content"] == "echo 2"


def test_chat_cli_streams_replies_from_the_fine_tuned_model(sft_run):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = sft_run
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanokimi.cli", "chat", str(root / "run"), "--temperature", "0",
                           "--max-new-tokens", "12", "--device", "cpu"],
                          input="Capital of France?\n/reset\nSay hi.\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(engine, " in proc.stderr  # nanokimi.infer.LLM's engine, not a scripted one
    assert "Paris.\n" in proc.stdout and "Hi there!\n" in proc.stdout and "(conversation cleared)" in proc.stdout


def test_convert_kimi_tiktoken_hf_dir_then_sft_and_chat(tmp_path):
    """A Kimi K2-style HF folder (DeepSeek-V3 layout, tiktoken.model + tokenizer_config.json with a chat template,
    generation_config.json naming <|im_end|>) -> convert --from-hf keeps the tokenizer -> fine-tune -> chat
    answers in the template -> convert --to-hf keeps the tokenizer files."""
    import argparse

    from test_chat import KIMI_SPECIALS, write_kimi_tokenizer

    from nanokimi.chat_cli import chat_loop, load_chat
    from nanokimi.data import TiktokenTokenizer
    from nanokimi.interop import save_hf
    from nanokimi.interop.cli import add_convert_args, run_convert
    from nanokimi.post.sft import run_sft

    k2_like = ("{%- if messages and messages[0]['role'] != 'system' -%}<|im_system|>system<|im_middle|>You are Kimi."
               "<|im_end|>{%- endif -%}" + DEFAULT_TEMPLATE)  # Kimi's own adds a default system prompt
    ranks = write_kimi_tokenizer(tmp_path / "tok", chat_template=k2_like)
    im_end = len(ranks) + KIMI_SPECIALS["<|im_end|>"]
    save_hf(tiny_model({**SMALL_K2, "vocab_size": len(ranks) + 256}), tmp_path / "hf")
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}))
    parser = add_convert_args(argparse.ArgumentParser())
    assert run_convert(parser.parse_args(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nk")])) == 0
    for name in ("tiktoken.model", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "nk" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    tok = load_tokenizer(tmp_path / "nk")
    assert isinstance(tok, TiktokenTokenizer) and im_end in tok.stop_ids

    result = run_sft(str(tmp_path / "nk"), str(write_chat_data(tmp_path / "chat.jsonl")), str(tmp_path / "run"),
                     [*SFT_SETTINGS, "train.max_steps=100", "sft.val_fraction=0"], progress=False)
    reply, what = load_chat(result["checkpoint"], device="cpu", temperature=0, max_new_tokens=12)
    assert "stored template" in what
    assert ChatTemplate.load(result["checkpoint"]).source == k2_like
    out = []
    chat_loop(reply, ["What do cows drink?", "/reset", "Name a fruit."], out.append)
    assert "".join(out) == "Water.\n(conversation cleared)\nApple.\n"

    assert run_convert(parser.parse_args(["--to-hf", result["checkpoint"], "--out", str(tmp_path / "back")])) == 0
    for name in ("tiktoken.model", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_export_of_a_nanokimi_tokenizer_chats_in_transformers(sft_run, tmp_path):
    """--to-hf of a nanokimi-trained checkpoint writes tokenizer_config.json and chat_template.jinja, so
    transformers' AutoTokenizer renders the same prompt and the same ids."""
    import argparse

    transformers = pytest.importorskip("transformers")
    from nanokimi.interop.cli import add_convert_args, run_convert

    from nanokimi.checkpoint import save_checkpoint

    root, _ = sft_run
    ours = load_tokenizer(root / "tokenizer.json")
    save_checkpoint(tmp_path / "ck", tiny_model({**SMALL_K2, "vocab_size": ours.vocab_size}),
                    tokenizer_file=root / "tokenizer.json")
    parser = add_convert_args(argparse.ArgumentParser())
    assert run_convert(parser.parse_args(["--to-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    template = ChatTemplate.load(tmp_path / "ck")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == template.render(messages, add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == ours.encode_chat(text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_varlen_equals_the_padded_torch_path_on_cuda():
    """fla's chunk_kda with cu_seqlens (what packed training runs on CUDA) against the CPU path's padded batch,
    outputs and gradients."""
    from nanokimi.ops.kda.fla_kernels import fla_status

    if not fla_status()[0]:
        pytest.skip(f"fla-core is needed on CUDA for this test: {fla_status()[1]}")
    torch.manual_seed(0)
    lengths, H, K = [37, 200, 1, 90, 64], 4, 64
    T = sum(lengths)
    q, k = (torch.nn.functional.normalize(torch.randn(1, T, H, K, device="cuda"), dim=-1) for _ in range(2))
    v, g = torch.randn(1, T, H, K, device="cuda"), -torch.rand(1, T, H, K, device="cuda") * 2
    beta = torch.rand(1, T, H, device="cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    results = []
    for impl in ("fla", "chunk"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        o, state = kda(*inputs, impl=impl, cu_seqlens=cu, output_final_state=True)
        (o * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum().backward()
        results.append((o, state, [t.grad for t in inputs]))
    (o_fla, s_fla, g_fla), (o_ref, s_ref, g_ref) = results
    torch.testing.assert_close(o_fla, o_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s_fla, s_ref, atol=2e-3, rtol=2e-3)
    for a, b in zip(g_fla, g_ref):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", [HYBRID, DENSE], ids=["hybrid", "gqa"])
def test_packed_loss_equals_unpacked_losses_on_cuda(spec):
    """The same equality as on the CPU, through CUDA's paths (fla varlen KDA when installed, masked SDPA)."""
    model = tiny_model(spec).cuda()
    examples = random_examples(9, random.Random(1))
    rows = pack_rows(examples, 64)
    inputs, targets, documents = collate(rows, 64, pad_id=0, pack=True, device="cuda")
    packed = model.loss(inputs, targets, documents=documents)
    total, count = 0.0, 0
    for e in examples:
        alone = model.loss(torch.tensor([e.inputs], device="cuda"), torch.tensor([e.targets], device="cuda"))
        n = sum(t != IGNORE for t in e.targets)
        total, count = total + alone.item() * n, count + n
    assert abs(packed.item() - total / count) < 2e-3


@pytest.mark.parametrize("spec", [HYBRID, DENSE], ids=["hybrid", "gqa"])
def test_qk_clip_max_logits_of_a_packed_batch_are_the_unpacked_maxima(spec):
    from nanokimi.optim.qk_clip import enable_qk_clip_recording

    model = tiny_model(spec)
    enable_qk_clip_recording(model)
    attention = [b.mixer for b in model.layers if hasattr(b.mixer, "record_max_logits")]
    examples = random_examples(7, random.Random(2))
    rows = pack_rows(examples, 64)
    inputs, _, documents = collate(rows, 64, pad_id=0, pack=True)
    with torch.no_grad():
        model(inputs, documents=documents)
        packed = [m.max_logits.clone() for m in attention]
        alone = None
        for row in rows:  # a row's padding (pad_id 0) belongs to its last conversation
            used = sum(len(e.inputs) for e in row)
            pieces = [e.inputs for e in row[:-1]] + [row[-1].inputs + [0] * (64 - used)]
            for piece in pieces:
                model(torch.tensor([piece]))
                maxima = [m.max_logits for m in attention]
                alone = maxima if alone is None else [torch.maximum(a, b) for a, b in zip(alone, maxima)]
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _sft_trainer(root, out, rank=0, world_size=1, extra=()):
    from nanokimi.checkpoint import load_model_checkpoint
    from nanokimi.post.sft import SFTTrainer, load_sft_config

    base = load_model_checkpoint(root / "base")
    run, sft = load_sft_config(base.config, str(root / "chat.jsonl"), [
        "train.seq_len=64", "train.batch_size=4", "train.max_steps=6", "train.device=cpu", "sft.val_fraction=0",
        *extra])
    return SFTTrainer(base, root / "base", run, sft, out, progress=False, rank=rank, world_size=world_size)


def _sft_worker(rank, world_size, port, root):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = _sft_trainer(root, root / "two", rank, world_size)
        losses = [trainer.train_step() for _ in range(6)]
        if rank == 0:
            torch.save(losses, root / "two.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sft_under_fsdp_on_two_ranks_matches_one_process(tmp_path):
    """2 ranks x 2 rows (FSDP2, distributed Muon, gloo) give the losses of one process accumulating 2 x 2 rows."""
    import socket

    import torch.multiprocessing as mp

    write_base_checkpoint(tmp_path / "base", dict(HYBRID, hidden_size=64, num_layers=2, mixers="KA"))
    write_chat_data(tmp_path / "chat.jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sft_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    one = _sft_trainer(tmp_path, tmp_path / "one", extra=["train.grad_accum=2"])
    losses = [one.train_step() for _ in range(6)]
    torch.testing.assert_close(torch.tensor(torch.load(tmp_path / "two.pt")), torch.tensor(losses),
                               rtol=2e-4, atol=2e-4)


def test_engine_replies_stream_the_engine_text_and_abort_on_ctrl_c():
    """The chat's adapter over nanokimi.infer's Engine (INTERFACES.md), driven by a scripted engine."""
    from types import SimpleNamespace

    from nanokimi.chat_cli import EngineReplies, chat_loop

    class ScriptedEngine:
        def __init__(self, text, interrupt_at=None):
            self.text, self.interrupt_at, self.request, self.steps, self.aborted = text, interrupt_at, None, 0, []

        def add_request(self, request_id, prompt_token_ids, params):
            self.request, self.steps, self.prompt = request_id, 0, prompt_token_ids

        def has_unfinished(self):
            return self.request is not None

        def step(self):
            self.steps += 1
            if self.steps == self.interrupt_at:
                raise KeyboardInterrupt
            text = self.text[:3 * self.steps]
            done = len(text) == len(self.text)
            ours = SimpleNamespace(request_id=self.request, outputs=[SimpleNamespace(text=text)], finished=done)
            if done:
                self.request = None
            other = SimpleNamespace(request_id="someone else", outputs=[SimpleNamespace(text="zz")], finished=False)
            return [other, ours]

        def abort(self, request_id):
            self.aborted.append(request_id)
            self.request = None

    engine = ScriptedEngine("Hello wo\ufffd!!!")  # step 3 ends inside a character: held back until step 4
    assert list(EngineReplies(SimpleNamespace(engine=engine), params=None)([1, 2])) == ["Hel", "lo ", "wo", "\ufffd!!!"]
    engine = ScriptedEngine("Fine, thanks!<|im_end|>")
    assert "".join(EngineReplies(SimpleNamespace(engine=engine), None)([1])) == "Fine, thanks!"
    assert engine.aborted == []
    engine = ScriptedEngine("A long answer that gets cut", interrupt_at=3)
    replies = EngineReplies(SimpleNamespace(engine=engine), None)
    out = []
    chat_loop(lambda messages: replies([1, 2, 3]), ["go"], out.append)
    assert "".join(out) == "A long [stopped]\n" and len(engine.aborted) == 1


def test_sft_step_loss_is_the_token_mean_of_the_whole_step(tmp_path):
    """Accumulating 2 micro batches of 2 rows gives the step (loss and update) of one batch of 4 rows: the loss is
    the mean over every learned token of the step, not a mean of micro-batch means."""
    import copy

    write_base_checkpoint(tmp_path / "base", dict(HYBRID, hidden_size=64, num_layers=2, mixers="KA"))
    write_chat_data(tmp_path / "chat.jsonl")
    whole = _sft_trainer(tmp_path, tmp_path / "whole", extra=["optim.name=adamw"])
    accumulated = _sft_trainer(tmp_path, tmp_path / "accumulated", extra=["optim.name=adamw", "train.grad_accum=2"])
    inputs, targets, documents, _ = next(copy.copy(whole.stream))  # the step's 4 rows, leaving the stream as it is
    expected = whole.model.loss(inputs, targets, documents=documents).item()
    assert abs(whole.train_step() - expected) < 1e-5
    assert abs(accumulated.train_step() - expected) < 1e-5
    for a, b in zip(whole.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cli_errors_are_one_line(sft_run, tmp_path, capsys):
    from nanokimi.cli import main

    root, _ = sft_run
    assert main(["sft", "--ckpt", str(root / "base"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nanokimi: error: SFT data" in capsys.readouterr().err
    assert main(["sft", "--ckpt", str(root / "base"), "--data", str(root / "chat.jsonl"), "--out", str(tmp_path / "o"),
                 "sft.epochs=0"]) == 2
    assert "sft.epochs > 0" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
