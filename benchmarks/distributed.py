"""Data-parallel scaling: bench-kl-900m training tokens/s on 1 vs 2 GPUs (FSDP2 + distributed Muon).

The same global batch runs on 1 process and on N processes (torchrun, started by this script), through the
Trainer's own train_step (forward/backward in bf16, grad clip, cross-rank statistics, Muon+AdamW step,
router-bias update, QK-Clip) on random tokens. Per setting: median step time over `--iters` steps after
`--warmup`, tokens/s, the optimizer step's share of the step, peak memory per GPU. Scaling efficiency =
tokens/s on N / (N x tokens/s on 1). Prints one table and writes benchmarks/results/distributed.json.

    python benchmarks/distributed.py              # GPUs: 1 vs 2 (--nproc N for more)
    python benchmarks/distributed.py --quick      # tiny CPU smoke run (gloo), seconds
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf_common import git_commit  # noqa: E402

from nanokimi.train.trainer import Trainer  # noqa: E402

QUICK_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.mixers=KA", "model.vocab_size=512"]


class RandomTokens:
    """Endless [micro_batch, T] batches of random tokens; rank r gets rows r*b..(r+1)*b of the global batch."""

    def __init__(self, vocab, micro_batch, seq_len, rank, world_size, device):
        self.shape, self.vocab, self.device = (micro_batch * world_size, seq_len + 1), vocab, device
        self.rows = slice(rank * micro_batch, (rank + 1) * micro_batch)
        self.generator = torch.Generator().manual_seed(0)

    def __next__(self):
        tokens = torch.randint(self.vocab, self.shape, generator=self.generator)[self.rows].to(self.device)
        return tokens[:, :-1], tokens[:, 1:]


class BenchTrainer(Trainer):
    """The Trainer without a data folder, output folder or checkpoints: what train_step needs, and only that."""

    def __init__(self, run, rank, world_size):
        from nanokimi.model import build_model
        from nanokimi.optim import build_optimizer, enable_qk_clip_recording
        from nanokimi.train.distributed import shard_model
        from nanokimi.train.trainer import pick_device

        self.run, self.rank, self.world_size, self.is_main = run, rank, world_size, rank == 0
        self.device = pick_device(run.train.device)
        torch.manual_seed(run.train.seed)
        t, o = run.train, run.optim
        self.micro_batch = t.batch_size // t.grad_accum // world_size
        self.stream = RandomTokens(run.model.vocab_size, self.micro_batch, t.seq_len, rank, world_size, self.device)
        self.model = build_model(run.model, device=self.device)
        if world_size > 1:
            shard_model(self.model, self.device)
        self.model.train()
        self.loss_fn = self.model.loss
        self.optimizer = build_optimizer(self.model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                         betas=(o.beta1, o.beta2), momentum=o.momentum)
        if o.qk_clip:
            enable_qk_clip_recording(self.model)
        self.step, self.tokens, self.last_good = 0, 0, None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args) -> None:
    """One rank (under torchrun, or alone): time train_step and the optimizer step; rank 0 writes JSON."""
    import torch.distributed as dist

    from nanokimi.train.config import load_run_config
    from nanokimi.train.distributed import close_distributed, init_distributed

    device_name = "cpu" if args.quick else "cuda"
    rank, world_size = init_distributed(device_name)
    overrides = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.device={device_name}",
                 f"train.max_steps={10 ** 6}", *(QUICK_MODEL if args.quick else [])]
    run = load_run_config(args.preset, None, overrides)
    trainer = BenchTrainer(run, rank, world_size)
    optimizer_step, optimizer_times = trainer.optimizer.step, []

    def timed_optimizer_step(closure=None):
        sync(trainer.device)
        start = time.perf_counter()
        optimizer_step(closure)
        sync(trainer.device)
        optimizer_times.append(time.perf_counter() - start)

    trainer.optimizer.step = timed_optimizer_step
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = []
    for i in range(args.warmup + args.iters):
        sync(trainer.device)
        start = time.perf_counter()
        trainer.train_step()
        sync(trainer.device)
        step_times.append(time.perf_counter() - start)
    step_times, optimizer_times = step_times[args.warmup:], optimizer_times[args.warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None
    peaks = [peak]
    if world_size > 1:
        peaks = [None] * world_size
        dist.all_gather_object(peaks, peak)
    if rank == 0:
        step = statistics.median(step_times)
        result = {"gpus": world_size, "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
                  "step_ms": step * 1e3, "optimizer_ms": statistics.median(optimizer_times) * 1e3,
                  "tokens_per_s": args.batch_size * args.seq_len / step,
                  "optimizer_share": statistics.median(optimizer_times) / step, "peak_gib_per_gpu": peaks}
        Path(args.worker_out).write_text(json.dumps(result))
    close_distributed()



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-kl-900m")
    parser.add_argument("--nproc", type=int, default=2, help="GPUs of the multi-GPU run (compared with 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (gloo), 2 steps")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/distributed.json; "
                        "--quick writes none unless given)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch_size, args.seq_len, args.warmup, args.iters = "tiny", 4, 32, 1, 2
    if args.worker_out:
        return worker(args)
    if not args.quick and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}. "
                 "Use --quick for a CPU smoke run.")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, args.nproc):
            out = Path(tmp) / f"{nproc}.json"
            forwarded = [f"--preset={args.preset}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}",
                         f"--warmup={args.warmup}", f"--iters={args.iters}", f"--worker-out={out}",
                         *(["--quick"] if args.quick else [])]
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       str(Path(__file__).resolve()), *forwarded]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            rows.append(json.loads(out.read_text()))
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["scaling_efficiency"] = row["tokens_per_s"] / (row["gpus"] * base)

    print(f"{args.preset}: global batch {args.batch_size} x {args.seq_len} tokens, median of {args.iters} steps")
    print(f"{'GPUs':>4} {'step ms':>9} {'tokens/s':>10} {'efficiency':>10} {'optim ms':>9} {'optim share':>11}  peak GiB/GPU")
    for r in rows:
        peaks = ", ".join("-" if p is None else f"{p:.1f}" for p in r["peak_gib_per_gpu"])
        print(f"{r['gpus']:>4} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} {r['scaling_efficiency']:>10.2f} "
              f"{r['optimizer_ms']:>9.1f} {r['optimizer_share']:>11.2f}  {peaks}")
    result = {"benchmark": "distributed", "preset": args.preset, "quick": args.quick,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "warmup": args.warmup, "iters": args.iters, "rows": rows}
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "distributed.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
