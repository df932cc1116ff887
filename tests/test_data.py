"""Data layer: tokenizer round trip, prepare (folder, jsonl, text, stdlib), loader determinism, errors."""
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanokimi.data import (EOT, DataError, Manifest, TokenStream, Tokenizer, iter_documents, iter_eval, prepare,
                           split_of)
from nanokimi.data.cli import add_prepare_args, run_prepare
from nanokimi.data.cli import main as data_main

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (REPO / ".." / "shared" / "data", REPO / ".." / ".." / "shared" / "data") if p.is_dir()),
              REPO / ".." / "shared" / "data")  # a worktree lives one level deeper than the main checkout
TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. def f(x):\n    return x + 1\n"
              "Ünïcödé 漢字かな 😀🚀 \t\r\n") * 50


def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x00, 0x1F), (0x20, 0x7E), (0x80, 0x24F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xAC00, 0xD7A3),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def write_folder(root: Path, n_files: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(n_files):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(200 + 40 * i)) + "\n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "secret.txt").write_text("never read")
    (root / "empty.txt").write_text("   \n")
    return root


def read_split(out: Path, split: str) -> np.ndarray:
    m = Manifest.load(out)
    parts = [np.fromfile(out / s.file, dtype=s.dtype) for s in m.splits[split].shards]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def test_tokenizer_round_trip_arbitrary_unicode(tmp_path):
    tok = Tokenizer.train([TRAIN_TEXT], vocab_size=400)
    rng = random.Random(1)
    texts = [random_text(rng, rng.randint(0, 300)) for _ in range(50)]
    texts += ["", "\x00", "   leading and trailing   ", "a\r\nb\n\n\tc", "e\u0301 ﬁ Å", EOT, f"x{EOT}y"]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids  # literal "<|endoftext|>" stays text
        assert all(0 <= i < tok.vocab_size for i in ids)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == tok.vocab_size and loaded.eot_id == tok.eot_id
    assert loaded.encode(texts[3]) == tok.encode(texts[3])
    assert len(tok.encode(TRAIN_TEXT[:500])) < 250  # merges were learned: well under one token per byte


def test_val_threshold_keeps_both_splits_non_empty():
    from nanokimi.data.shards import _val_threshold
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 1000):
        hashes = [rng.random() for _ in range(n)]
        for fraction in (0.0, 0.005, 0.5, 0.99):
            t = _val_threshold(hashes, fraction)
            val = sum(h < t for h in hashes)
            assert (val == 0) if n == 1 else (1 <= val <= n - 1)
            assert val >= min(math.ceil(fraction * n), n - 1)


def test_split_of_is_stable_and_proportional():
    ids = [f"file{i}.txt" for i in range(20000)]
    val = sum(split_of(i, 0.1) == "val" for i in ids)
    assert 1700 < val < 2300
    assert [split_of(i, 0.1) for i in ids[:100]] == [split_of(i, 0.1) for i in ids[:100]]
    assert split_of("anything", 0.0) == "train"


def test_prepare_folder_shards_manifest_and_cache(tmp_path):
    src = write_folder(tmp_path / "src")
    out = tmp_path / "out"
    m = prepare(src, out, vocab_size=300, shard_tokens=500, val_fraction=0.2, progress=False)
    docs = list(iter_documents(src))
    assert len(docs) == 12 and all(d.id.startswith("part") for d in docs)  # binary, hidden, empty skipped
    tok = Tokenizer.load(out / "tokenizer.json")
    assert m.tokenizer["vocab_size"] == tok.vocab_size and m.dtype == "uint16"
    for split in ("train", "val"):
        info = m.splits[split]
        expected = [d for d in docs if split_of(d.id, m.val_threshold) == split]
        assert info.documents == len(expected) > 0
        assert info.bytes == sum(len(d.text.encode()) for d in expected)
        stream = read_split(out, split)
        assert len(stream) == info.tokens == sum(s.tokens for s in info.shards)
        assert all(s.tokens <= 500 for s in info.shards)
        packed = [tok.eot_id] + [t for d in expected for t in tok.encode(d.text) + [tok.eot_id]][:-1]
        assert stream.tolist() == packed  # every document preceded by <|endoftext|>, in corpus order
    assert len(m.splits["train"].shards) > 1

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.perf_counter()
    again = prepare(src, out, vocab_size=300, shard_tokens=500, val_fraction=0.2, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert again == m and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_prepare_jsonl_and_given_tokenizer(tmp_path):
    rows = [{"id": i, "body": f"record number {i}: " + "lorem ipsum " * (i % 7 + 1)} for i in range(40)]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    first = prepare(src, tmp_path / "a", vocab_size=300, text_field="body", progress=False)
    assert first.splits["train"].documents + first.splits["val"].documents == 40
    assert first.splits["val"].documents >= 1
    assert [d.id for d in iter_documents(src, text_field="body")][:2] == ["rows.jsonl:1", "rows.jsonl:2"]
    second = prepare(src, tmp_path / "b", tokenizer_path=tmp_path / "a" / "tokenizer.json", text_field="body",
                     progress=False)
    assert not second.tokenizer["trained"] and second.tokenizer["vocab_size"] == first.tokenizer["vocab_size"]
    assert np.array_equal(read_split(tmp_path / "a", "train"), read_split(tmp_path / "b", "train"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    src = write_folder(root / "src", n_files=8, seed=3)
    prepare(src, root / "out", vocab_size=300, shard_tokens=700, val_fraction=0.25, progress=False)
    return root / "out"


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_loader_batches_are_shifted_windows_and_deterministic(prepared):
    a = TokenStream(prepared, "train", batch_size=4, seq_len=16, seed=7)
    b = TokenStream(prepared, "train", batch_size=4, seq_len=16, seed=7)
    c = TokenStream(prepared, "train", batch_size=4, seq_len=16, seed=8)
    batches_a, batches_b, batches_c = take(a, 5), take(b, 5), take(c, 5)
    stream = read_split(prepared, "train")
    text = stream.tobytes()
    for (x, y), (x2, y2) in zip(batches_a, batches_b):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # each row is a real window of the packed stream
            window = np.concatenate([row_x.numpy(), row_y.numpy()[-1:]]).astype(stream.dtype).tobytes()
            assert window in text
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(batches_a, batches_c))


def test_loader_epoch_visits_every_window_once(prepared):
    seq_len, bs = 32, 1
    s = TokenStream(prepared, "train", batch_size=bs, seq_len=seq_len, seed=1)
    offset, order = s._epoch_windows(0)
    assert offset < seq_len and len(order) == (len(s.tokens) - 1 - offset) // seq_len
    stream = read_split(prepared, "train")
    expected = sorted(stream[offset + k * seq_len : offset + (k + 1) * seq_len].tobytes() for k in order)
    got = sorted(next(s)[0][0].numpy().astype(stream.dtype).tobytes() for _ in range(len(order)))
    assert got == expected and (s.epoch, s.index) == (1, 0)


def test_loader_resume_continues_with_the_same_batches(prepared):
    s = TokenStream(prepared, "train", batch_size=3, seq_len=256, seed=5)
    take(s, 4)
    state = s.state_dict()
    expected = take(s, 40)
    assert s.epoch >= 2  # the resumed stream must also cross epochs the same way
    resumed = TokenStream(prepared, "train", batch_size=3, seq_len=256, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for (x, y), (x2, y2) in zip(expected, take(resumed, 40)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(DataError, match="seq_len was 256, is now 16"):
        TokenStream(prepared, "train", batch_size=3, seq_len=16, seed=5).load_state_dict(state)


def test_rank_slices_concatenate_to_the_single_rank_batch(prepared):
    world, bs = 3, 2
    single = TokenStream(prepared, "train", batch_size=bs * world, seq_len=20, seed=2)
    ranks = [TokenStream(prepared, "train", batch_size=bs, seq_len=20, seed=2, rank=r, world_size=world)
             for r in range(world)]
    for _ in range(40):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    eval_single = list(iter_eval(prepared, "val", bs * world, 20, max_batches=3))
    eval_ranks = [list(iter_eval(prepared, "val", bs, 20, max_batches=3, rank=r, world_size=world))
                  for r in range(world)]
    assert len(eval_single) >= 1
    for b, (x, y) in enumerate(eval_single):
        assert torch.equal(x, torch.cat([eval_ranks[r][b][0] for r in range(world)]))
        assert torch.equal(y, torch.cat([eval_ranks[r][b][1] for r in range(world)]))


def test_iter_eval_is_fixed_and_spread(prepared):
    s = TokenStream(prepared, "train", batch_size=2, seq_len=16)
    first = list(s.iter_eval("val", max_batches=2))
    assert [torch.equal(a[0], b[0]) for a, b in zip(first, s.iter_eval("val", max_batches=2))] == [True] * len(first)
    full = list(iter_eval(prepared, "val", 2, 16))
    n_val = len(read_split(prepared, "val"))
    assert len(full) == ((n_val - 1) // 16) // 2
    stream = read_split(prepared, "val")
    assert np.array_equal(full[0][0][0].numpy(), stream[:16])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"'.*no/such/dir' does not exist"):
        prepare(tmp_path / "no" / "such" / "dir", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty.*text-like files under"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents with text"):
        prepare(tmp_path / "blank", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="empty.*matching"):
        prepare(str(tmp_path / "empty" / "*.txt"), tmp_path / "out", progress=False)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"line 2 has no field 'text'; its fields are \['answer', 'question'\]"):
        prepare(rows, tmp_path / "out", progress=False)
    from tokenizers import Tokenizer as HFTokenizer, models
    HFTokenizer(models.BPE()).save(str(tmp_path / "no_eot.json"))
    with pytest.raises(DataError, match=r"has no '<\|endoftext\|>' token"):
        prepare(rows, tmp_path / "out", tokenizer_path=tmp_path / "no_eot.json", progress=False)
    with pytest.raises(DataError, match="nope.json does not exist"):
        prepare(write_folder(tmp_path / "src"), tmp_path / "out", tokenizer_path=tmp_path / "nope.json",
                progress=False)


def test_existing_output_from_another_source_is_refused(tmp_path):
    out = tmp_path / "out"
    prepare(write_folder(tmp_path / "a", seed=1), out, vocab_size=300, progress=False)
    with pytest.raises(DataError, match="different source/tokenizer.*--overwrite"):
        prepare(write_folder(tmp_path / "b", seed=2), out, vocab_size=300, progress=False)
    with pytest.raises(DataError, match="different source/tokenizer.*train_vocab_size"):
        prepare(tmp_path / "a", out, vocab_size=320, progress=False)
    m = prepare(tmp_path / "b", out, vocab_size=300, overwrite=True, progress=False)
    assert m.source["spec"] == str(tmp_path / "b")


def test_corrupted_shard_is_detected(tmp_path):
    out = tmp_path / "out"
    m = prepare(write_folder(tmp_path / "src"), out, vocab_size=300, progress=False)
    shard = out / m.splits["train"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_000\.bin does not match its checksum.*Re-run"):
        TokenStream(out, "train", batch_size=2, seq_len=8)
    TokenStream(out, "train", batch_size=2, seq_len=8, verify=False)  # explicitly unchecked still opens
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="damaged"):
        TokenStream(out, "train", batch_size=2, seq_len=8, verify=False)


def test_cli_prepare_prints_error_without_traceback(tmp_path, capsys):
    import argparse
    parser = add_prepare_args(argparse.ArgumentParser())
    from nanokimi.cli import main
    missing = ["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    assert main(["data", "prepare", *missing]) == 2  # as every command: one line, exit code 2
    assert capsys.readouterr().err.startswith("nanokimi: error: Data source")
    assert data_main(missing) == 2
    assert capsys.readouterr().err.startswith("nanokimi: error: Data source")
    src = write_folder(tmp_path / "src")
    args = parser.parse_args(["--source", str(src), "--out", str(tmp_path / "o"), "--vocab-size", "300",
                              "--no-progress"])
    assert run_prepare(args) == 0
    assert "train" in capsys.readouterr().out


def test_tinyshakespeare_text_source(tmp_path):
    path = SHARED / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    m = prepare(path, tmp_path / "shakespeare", vocab_size=512, val_fraction=0.05, progress=False)
    docs = list(iter_documents(path))
    assert "".join(d.text for d in docs) == path.read_text()  # the chunks are the file, cut at blank lines
    assert m.splits["train"].bytes + m.splits["val"].bytes == path.stat().st_size
    assert m.splits["val"].documents >= 1 and m.splits["val"].tokens > 1000
    assert 1.5 < m.bytes_per_token("train") < 4.0  # 512 tokens: about 2 bytes each
    x, y = next(TokenStream(tmp_path / "shakespeare", "val", batch_size=2, seq_len=64))
    assert x.shape == (2, 64)


@pytest.mark.slow  # ~30-80 s on 2 cores: the default corpus of `nanokimi train`, prepared for real
def test_stdlib_prepare_default(tmp_path):
    t0 = time.perf_counter()
    m = prepare("stdlib", tmp_path / "stdlib", progress=False)
    seconds = time.perf_counter() - t0
    print(f"stdlib prepare: {seconds:.1f} s, phases {m.seconds}, "
          f"train {m.splits['train'].tokens} tokens, val {m.splits['val'].tokens} tokens")
    assert m.tokenizer["vocab_size"] == 4096 and m.splits["val"].tokens > 10_000
    assert m.source["files"] > 500 and not any("site-packages" in d.id for d in iter_documents("stdlib"))
    x, _ = next(iter_eval(tmp_path / "stdlib", "val", 4, 256))
    assert x.shape == (4, 256)


def test_text_without_blank_lines_is_cut_at_line_ends_and_long_lines_by_position():
    from nanokimi.data.corpus import DOC_CHARS, _chunk_documents

    lines = "".join(f"line {i} of a text that never leaves a blank line\n" for i in range(2000))
    one_line = "x" * (10 * DOC_CHARS)
    for text in (lines, one_line, lines[:5000] + one_line + lines[:3000]):
        docs = list(_chunk_documents("f.txt", text))
        assert "".join(d.text for d in docs) == text
        assert len(docs) >= 2 and all(len(d.text) < 4 * DOC_CHARS + 100 for d in docs)  # + one line
        assert len({d.id for d in docs}) == len(docs)


def test_touched_source_is_reused_and_an_edited_one_is_named(tmp_path):
    import os

    src = write_folder(tmp_path / "src")
    out = tmp_path / "out"
    first = prepare(src, out, vocab_size=300, progress=False)
    doc = next(src.rglob("doc00.txt"))
    os.utime(doc, (time.time() + 10, time.time() + 10))
    assert prepare(src, out, vocab_size=300, progress=False).created == first.created  # touched: same tokens
    doc.write_text("edited text " * 100)
    with pytest.raises(DataError, match=r"changed since .* was prepared.*--overwrite"):
        prepare(src, out, vocab_size=300, progress=False)
    again = prepare(src, out, vocab_size=300, progress=False, refresh_changed_source=True)
    assert again.splits["train"].tokens + again.splits["val"].tokens != \
        first.splits["train"].tokens + first.splits["val"].tokens


def test_max_chars_takes_a_fixed_sample_of_whole_documents(tmp_path):
    src = write_folder(tmp_path / "src", n_files=30)
    whole = prepare(src, tmp_path / "whole", vocab_size=300, progress=False)
    a = prepare(src, tmp_path / "a", vocab_size=300, max_chars=20_000, progress=False)
    b = prepare(src, tmp_path / "b", vocab_size=300, max_chars=20_000, progress=False)
    assert a.source["chars"] == whole.source["chars"] > a.source["chars_used"] >= 20_000
    assert a.source["chars_used"] < 20_000 + 8_000  # whole documents: at most one (< 8k chars) over the budget
    assert np.array_equal(read_split(tmp_path / "a", "train"), read_split(tmp_path / "b", "train"))
    assert a.splits["val"].documents >= 1 and a.splits["train"].tokens < whole.splits["train"].tokens
    assert "max_chars" not in prepare(src, tmp_path / "c", vocab_size=300, max_chars=10**9,
                                      progress=False).settings  # cannot cut: same settings as before
