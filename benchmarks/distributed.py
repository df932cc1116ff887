"""Data-parallel scaling: bench-kl-900m training tokens/s on 1 vs N GPUs (FSDP2 + distributed Muon).

The same global batch runs on 1 process and on N processes (two torchrun launches, started by this script),
through the Trainer's own train_step (forward/backward in bf16, grad clip, cross-rank statistics, Muon+AdamW
step, router-bias update, QK-Clip) on random tokens. The N-process launch measures each FSDP setting of
`--variants` in turn (model rebuilt, same process, so Triton's autotuning is paid once per launch).

The 1-process launch also runs one rank's share of the batch (global / N), for the weak-scaling baseline.
`--one-gpu-accum K` runs the 1-GPU global-batch row as K micro-batches (train.grad_accum=K): a global batch one
GPU cannot hold at once (with K = N its micro-batch is the N-GPU run's per-rank batch, the usual way a fixed
global batch is spread: more GPUs, fewer accumulation steps). Its phase breakdown is of one micro-batch.
Per setting: median step time over `--iters` steps after `--warmup`, tokens/s, scaling efficiency, strong
(tokens/s on N / (N x tokens/s on 1 at the same global batch)) and weak (over N x tokens/s on 1 at one rank's
share, the same per-GPU work), the optimizer step's share of the step, peak memory per GPU; then a
per-phase breakdown from `--phase-iters` more steps with a device sync between phases (so the phases do
not overlap and their sum exceeds the step time): forward, backward, statistics (loss all-reduce, MoE loads,
max logits), clip, optimizer, after (router bias, QK-Clip); and one profiled step: collectives issued, their
payload bytes and (CUDA) the GPU time of NCCL kernels, which overlaps compute. Prints one table and writes
benchmarks/results/distributed.json.

    python benchmarks/distributed.py                       # 1 vs 2 GPUs, eager
    python benchmarks/distributed.py --compile             # per-module torch.compile (after sharding)
    python benchmarks/distributed.py --variants default    # only the default FSDP setting
    python benchmarks/distributed.py --batch-size 64 --one-gpu-accum 2   # 32 per GPU; 1 GPU accumulates 2 x 32
    python benchmarks/distributed.py --quick               # tiny CPU smoke run (gloo), seconds
"""
import argparse
import collections
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from perf_common import ROOT, git_commit  # noqa: E402

from nanokimi.train.trainer import Trainer  # noqa: E402

QUICK_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.mixers=KA", "model.vocab_size=512"]
VARIANTS = {  # name -> train.* overrides
    "default": {},
    "reshard": {"fsdp_reshard": True},
    "bf16-reduce": {"fsdp_reduce_dtype": "bf16"},
}
PHASES = ("forward", "backward", "statistics", "clip", "optimizer", "after")
COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single",
               "all_reduce", "all_to_all_single")


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
        from nanokimi.train.trainer import pick_device

        self.run, self.rank, self.world_size, self.is_main = run, rank, world_size, rank == 0
        self.device = pick_device(run.train.device)
        torch.manual_seed(run.train.seed)
        t = run.train
        self.micro_batch = t.batch_size // t.grad_accum // world_size
        self.stream = RandomTokens(run.model.vocab_size, self.micro_batch, t.seq_len, rank, world_size, self.device)
        self._build_model_and_optimizer()
        self.step, self.tokens, self.last_good = 0, 0, None

    def phased_step(self) -> dict:
        """train_step's work (grad_accum 1) with a device sync after each phase; seconds per phase."""
        from nanokimi.model.moe import update_router_bias
        from nanokimi.optim.qk_clip import apply_qk_clip
        from nanokimi.train.distributed import sync_step_statistics

        t, o, times = self.run.train, self.run.optim, {}
        clock = Clock(self.device)
        inputs, targets = next(self.stream)
        with self.autocast():
            loss = self.loss_fn(inputs, targets)
        times["forward"] = clock.lap()
        loss.backward()
        times["backward"] = clock.lap()
        self._all_reduce_mean(loss.detach())
        if self.world_size > 1:
            sync_step_statistics(self.model)
        times["statistics"] = clock.lap()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        times["clip"] = clock.lap()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = clock.lap()
        if o.router_bias_rate > 0:
            update_router_bias(self.model, o.router_bias_rate)
        if o.qk_clip:
            apply_qk_clip(self.model, o.qk_clip_tau)
        times["after"] = clock.lap()
        self.step += 1
        return times


class Clock:
    """Seconds between laps, each lap after a device sync."""

    def __init__(self, device):
        self.device = device
        self.last = self.now()

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self):
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


class CollectiveLog:
    """Counts the torch.distributed collectives issued while active, with their payload bytes (the larger of
    input and output: the gathered tensor of an all-gather, the reduced one of a reduce-scatter)."""

    def __init__(self):
        self.calls, self.bytes = collections.Counter(), collections.Counter()
        self.originals = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in COLLECTIVES:
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self.originals[name]))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self.originals.items():
            setattr(dist, name, original)

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            tensors = [a for a in (*args[:2], *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.calls[name] += 1
            self.bytes[name] += max((t.numel() * t.element_size() for t in tensors), default=0)
            return original(*args, **kwargs)
        return counted


def profile_step(trainer) -> dict:
    """One train_step under the profiler and the collective log: calls, payload MB and NCCL kernel ms."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with CollectiveLog() as log, profile(activities=activities) as prof:
        trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
    nccl_us = sum(e.time_range.elapsed_us() for e in prof.events()
                  if e.device_type == DeviceType.CUDA and "nccl" in e.name.lower())
    return {"collective_calls": dict(log.calls), "collective_mb": {k: v / 2**20 for k, v in log.bytes.items()},
            "nccl_kernel_ms": nccl_us / 1e3 if trainer.device.type == "cuda" else None}


def measure(args, run, rank, world_size, batch_size) -> dict:
    """Median step time of train_step and of the optimizer step, the phase breakdown, one profiled step."""
    trainer = BenchTrainer(run, rank, world_size)
    optimizer_step, optimizer_times, optimizer_host_times = trainer.optimizer.step, [], []

    def timed_optimizer_step(closure=None):
        clock = Clock(trainer.device)
        optimizer_step(closure)
        optimizer_host_times.append(time.perf_counter() - clock.last)  # the host's part: before the sync
        optimizer_times.append(clock.lap())

    trainer.optimizer.step = timed_optimizer_step
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = []
    for _ in range(args.warmup + args.iters):
        clock = Clock(trainer.device)
        trainer.train_step()
        step_times.append(clock.lap())
    step, optimizer = statistics.median(step_times[args.warmup:]), statistics.median(optimizer_times[args.warmup:])
    optimizer_host = statistics.median(optimizer_host_times[args.warmup:])
    trainer.optimizer.step = optimizer_step
    phases = [trainer.phased_step() for _ in range(args.phase_iters)]
    profiled = profile_step(trainer)
    peak = torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None
    result = {"gpus": world_size, "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
              "step_ms": step * 1e3, "optimizer_ms": optimizer * 1e3,
              "optimizer_host_ms": optimizer_host * 1e3, "step_ms_all": [t * 1e3 for t in step_times[args.warmup:]],
              "batch_size": batch_size,
              "tokens_per_s": batch_size * args.seq_len / step, "optimizer_share": optimizer / step,
              "peak_gib": peak, "phase_ms": {k: statistics.median(p[k] for p in phases) * 1e3 for k in PHASES},
              **profiled}
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def worker(args) -> None:
    """One launch (under torchrun, or alone): every variant in turn; rank 0 writes the rows as JSON."""
    import torch.distributed as dist

    from nanokimi.train.config import load_run_config
    from nanokimi.train.distributed import close_distributed, init_distributed

    device_name = "cpu" if args.quick else "cuda"
    rank, world_size = init_distributed(device_name)
    # one GPU: the global batch (strong scaling) and one rank's share of it (weak scaling)
    names = args.variants if world_size > 1 else ["default", "per-rank-batch"]
    rows = []
    for name in names:
        settings = VARIANTS["default" if name == "per-rank-batch" else name]
        batch_size = args.rank_batch if name == "per-rank-batch" else args.batch_size
        accum = args.one_gpu_accum if world_size == 1 and name == "default" else 1
        overrides = [f"train.batch_size={batch_size}", f"train.grad_accum={accum}", f"train.seq_len={args.seq_len}",
                     f"train.device={device_name}", f"train.max_steps={10 ** 6}", f"train.compile={args.compile}",
                     "train.cuda_graph=false", "optim.cuda_graph=false",  # one GPU and N GPUs run the same kind of step
                     *(f"train.{k}={v}" for k, v in settings.items()), *(QUICK_MODEL if args.quick else [])]
        result = measure(args, load_run_config(args.preset, None, overrides), rank, world_size, batch_size)
        peak = result.pop("peak_gib")
        peaks = [peak]
        if world_size > 1:
            peaks = [None] * world_size
            dist.all_gather_object(peaks, peak)
        rows.append({"variant": name, **result, "grad_accum": accum, "peak_gib_per_gpu": peaks})
    if rank == 0:
        facts = {"nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
                 "p2p": torch.cuda.can_device_access_peer(0, 1) if torch.cuda.device_count() > 1 else None}
        Path(args.worker_out).write_text(json.dumps({"rows": rows, **facts}))
    close_distributed()
    # Leave without the interpreter's teardown: after the profiled steps, torch 2.13's CPU build at times aborts in a
    # C++ destructor at exit ("terminate called without an active exception", 3 of 8 two-rank --quick runs on a
    # 2-core CPU), which torchrun reports as a failed launch although the rows are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(args, nproc, out) -> dict:
    forwarded = [f"--preset={args.preset}", f"--rank-batch={args.batch_size // args.nproc}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}", f"--one-gpu-accum={args.one_gpu_accum}",
                 f"--warmup={args.warmup}", f"--iters={args.iters}", f"--phase-iters={args.phase_iters}",
                 f"--variants={','.join(args.variants)}", f"--worker-out={out}",
                 *(["--quick"] if args.quick else []), *(["--compile"] if args.compile else [])]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), *forwarded]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1")}  # the N-GPU launch reuses fla's autotuning
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def print_table(args, rows) -> None:
    mode = "torch.compile" if args.compile else "eager"
    print(f"{args.preset}: global batch {args.batch_size} x {args.seq_len} tokens, {mode}, median of {args.iters} steps")
    print(f"{'GPUs':>4} {'variant':<14} {'batch':>7} {'step ms':>8} {'tokens/s':>9} {'strong':>6} {'weak':>6} {'optim':>6} {'host':>5} {'share':>5} "
          f"{'peak GiB':>8} | {'fwd':>6} {'bwd':>6} {'stats':>6} {'clip':>6} {'optim':>6} {'after':>6} | "
          f"{'colls':>5} {'MB':>7} {'nccl ms':>7}")
    for r in rows:
        peak = max((p for p in r["peak_gib_per_gpu"] if p is not None), default=None)
        phases = " ".join(f"{r['phase_ms'][k]:>6.1f}" for k in PHASES)
        nccl = "-" if r["nccl_kernel_ms"] is None else f"{r['nccl_kernel_ms']:.1f}"
        batch = f"{r['batch_size']}" + (f"/{r['grad_accum']}" if r.get("grad_accum", 1) > 1 else "")
        print(f"{r['gpus']:>4} {r['variant']:<14} {batch:>7} {r['step_ms']:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['scaling_efficiency']:>6.2f} {r['weak_scaling_efficiency']:>6.2f} {r['optimizer_ms']:>6.1f} {r['optimizer_host_ms']:>5.1f} {r['optimizer_share']:>5.2f} "
              f"{'-' if peak is None else f'{peak:.1f}':>8} | {phases} | {sum(r['collective_calls'].values()):>5} "
              f"{sum(r['collective_mb'].values()):>7.0f} {nccl:>7}")
    print("batch: global sequences per step (/K: as K accumulated micro-batches); strong: tokens/s over (GPUs x 1 GPU on the same global batch); weak: over (GPUs x 1 GPU on one rank's "
          "share of the batch, the per-GPU work of the N-GPU run)")
    print("host: the optimizer step's host time before its device sync (near optim: the host is the limit)")
    print("phases: a separate run with a device sync after each (no overlap); colls/MB: collectives of one step "
          "and their payload; nccl ms: GPU time of NCCL kernels in one step (overlaps compute)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-kl-900m")
    parser.add_argument("--nproc", type=int, default=2, help="GPUs of the multi-GPU run (compared with 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="global sequences per step (16 x 2048: one H200 holds it; 8 x 2048 leaves each of 2 ranks too little work to scale)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--one-gpu-accum", type=int, default=1,
                        help="micro-batches of the 1-GPU global-batch row (train.grad_accum), for a global batch "
                             "one GPU cannot hold at once")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--phase-iters", type=int, default=3, help="steps of the per-phase breakdown")
    parser.add_argument("--compile", action="store_true", help="per-module torch.compile (nanokimi.train.fast)")
    parser.add_argument("--variants", default="default,reshard,bf16-reduce",
                        help=f"FSDP settings measured on N GPUs, comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (gloo), 2 steps")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/distributed.json; "
                        "--quick writes none unless given)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--rank-batch", type=int, help=argparse.SUPPRESS)  # the worker's per-rank-batch row
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        sys.exit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}.")
    if args.quick:
        args.preset, args.batch_size, args.seq_len, args.warmup, args.iters, args.phase_iters = "tiny", 4, 32, 1, 2, 1
    if args.worker_out:
        return worker(args)
    if not args.quick and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}. "
                 "Use --quick for a CPU smoke run.")

    with tempfile.TemporaryDirectory() as tmp:
        single = launch(args, 1, Path(tmp) / "1.json")
        multi = launch(args, args.nproc, Path(tmp) / f"{args.nproc}.json")
    rows = single["rows"] + multi["rows"]
    base = {r["variant"]: r["tokens_per_s"] for r in single["rows"]}
    for row in rows:  # strong: same global batch on 1 GPU; weak: 1 GPU running one rank's share of the batch
        row["scaling_efficiency"] = row["tokens_per_s"] / (row["gpus"] * base["default"])
        row["weak_scaling_efficiency"] = row["tokens_per_s"] / (row["gpus"] * base["per-rank-batch"])
    print_table(args, rows)
    result = {"benchmark": "distributed", "preset": args.preset, "quick": args.quick, "compile": args.compile,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "nccl": multi["nccl"], "p2p": multi["p2p"],
              "batch_size": args.batch_size, "one_gpu_accum": args.one_gpu_accum, "seq_len": args.seq_len, "warmup": args.warmup, "iters": args.iters,
              "rows": rows}
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "distributed.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
