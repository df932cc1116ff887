"""SFT on GSM8K chats: packed rows (nanokimi's packing, documents kept apart) vs one conversation per row padded
to the longest of its batch (what transformers' padding collator does).

    python benchmarks/sft_packing.py                 # GPU: bench-kl-900m, rows of 1024 tokens, bf16
    python benchmarks/sft_packing.py --quick         # tiny model on the CPU (a smoke run, seconds)

Both modes train on the same conversations (question -> user turn, answer -> assistant turn, rendered in Kimi's
chat format, loss on the answer) with the same rows per step, so the padded peer's rows are shorter. A step is
forward + backward + AdamW. The epoch time is the median of a few steps (after two warm-up steps; the padded
peer's batches come in shuffled order, so their widths are a sample of the epoch's) times the steps in an epoch.
The table shows the share of row tokens that are conversation (not padding), learned (assistant) tokens per
second, and the time of one epoch. Writes
benchmarks/results/sft_packing.json (device, date, commit, torch version).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from perf_common import ROOT, environment, print_table, results_path, write_results
from nanokimi.config import ModelConfig
from nanokimi.data import Tokenizer
from nanokimi.data.chat import ChatTemplate
from nanokimi.model import build_model
from nanokimi.post.sft import IGNORE, Conversation, build_examples, collate, pack_rows

GSM8K = next((p for p in (ROOT / ".." / "shared", ROOT / ".." / ".." / "shared") if p.is_dir()),
             ROOT / ".." / "shared") / "data" / "gsm8k" / "train.jsonl"  # a worktree lives one level deeper


def load_chats(path: Path, limit: int):
    if not path.is_file():
        sys.exit(f"GSM8K is not at {path}; this benchmark needs it (../shared/data/gsm8k/train.jsonl).")
    chats = []
    for line in path.read_text().splitlines()[:limit]:
        record = json.loads(line)
        chats.append(Conversation("gsm8k", line, [{"role": "user", "content": record["question"]},
                                                  {"role": "assistant", "content": record["answer"]}]))
    return chats


def time_steps(model, optimizer, batches, device, warmup: int, steps: int) -> float:
    """Median seconds of one training step over `steps` batches after `warmup` ones."""
    times = []
    for i, (inputs, targets, documents) in enumerate(batches[:warmup + steps]):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(inputs, targets, documents=documents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None, help="rows per step")
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    preset = args.preset or ("tiny" if args.quick else "bench-kl-900m")
    seq_len = args.seq_len or (256 if args.quick else 1024)
    rows_per_step = args.rows or (4 if args.quick else 16)
    chats = load_chats(GSM8K, args.conversations if not args.quick else 200)

    tokenizer = Tokenizer.train((c.messages[0]["content"] + c.messages[1]["content"] for c in chats[:1000]),
                                vocab_size=4096)
    examples, _ = build_examples(chats, tokenizer, ChatTemplate(), seq_len)
    learned_total = sum(sum(t != IGNORE for t in e.targets) for e in examples)
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    results, table = {}, []
    for mode, pack in (("packed", True), ("one per row, padded", False)):
        rows = pack_rows(examples, seq_len, pack)
        if not pack:  # shuffled, as training would see them
            rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()]
        groups = [rows[i:i + rows_per_step] for i in range(0, len(rows), rows_per_step)]
        widths = [seq_len if pack else max(len(r[0].inputs) for r in g) for g in groups]
        batches = [collate(g, w, tokenizer.eot_id, pack, device) for g, w in zip(groups, widths)][:args.steps + 2]
        step_s = time_steps(model, optimizer, batches, device, warmup=2, steps=args.steps)
        fill = sum(len(e.inputs) for e in examples) / sum(len(g) * w for g, w in zip(groups, widths))
        epoch_s = step_s * len(groups)
        results[mode] = dict(rows=len(rows), fill=fill, step_ms=step_s * 1e3, epoch_s=epoch_s,
                             learned_tokens_per_s=learned_total / epoch_s)
        table.append([mode, len(rows), f"{fill:.1%}", f"{step_s * 1e3:.1f}", f"{learned_total / epoch_s:,.0f}",
                      f"{epoch_s:.1f}"])
    speedup = results["one per row, padded"]["epoch_s"] / results["packed"]["epoch_s"]
    print(f"{preset} on {environment(device)['device']}, {len(examples)} GSM8K chats, rows of {seq_len} tokens, "
          f"{rows_per_step} rows per step")
    print_table(["mode", "rows", "fill", "step ms", "learned tok/s", "epoch s"], table)
    print(f"packing: {speedup:.2f}x faster per epoch")
    write_results(results_path("sft_packing", args.quick), environment(device),
                  {f"{preset} {seq_len} {mode}": row for mode, row in results.items()},
                  {"preset": preset, "seq_len": seq_len, "rows_per_step": rows_per_step,
                   "conversations": len(examples), "speedup_per_epoch": speedup})


if __name__ == "__main__":
    main()
