"""Where a training step's GPU time goes: kernels grouped by kind, per config and variant.

    python benchmarks/profile_step.py                                   # every config, default variants
    python benchmarks/profile_step.py --configs bench-kl-900m --variants module block qk-clip
    python benchmarks/profile_step.py --quick                           # CPU smoke run (tiny models)

For each config (the benchmark shapes of train_step.py) and variant, the step (bf16 autocast forward +
loss, backward, fused AdamW, router-bias update) is compiled and warmed up, timed (median of --repeats),
then run under torch.profiler for --profile-steps steps. Reported per step: wall ms, GPU busy ms (sum of
kernel times; the rest of the wall time is the GPU waiting for the CPU), and GPU ms per kernel kind:
GEMM, grouped GEMM (MoE), attention (flash / cuDNN / efficient), fla (KDA Triton kernels), fused
(Inductor's Triton kernels), copies, other ATen kernels, NCCL. The top kernels by GPU time go to the JSON.

Variants: auto, module, block (compile_model's scope), eager (no compile), qk-clip (auto, with QK-Clip's
max-logit recording on in every attention layer), no-cudnn (auto, with SDPA's cuDNN backend disabled),
graph (auto, the whole step captured in one CUDA graph by nanokimi.train.fast.capture_step).
"""
import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from perf_common import (environment, free_memory, kernel_times, kind_of, median_ms, print_table, results_path,
                         short_error, write_results)
from nanokimi.config import ModelConfig
from nanokimi.model import build_model
from nanokimi.model.moe import update_router_bias
from nanokimi.optim.qk_clip import enable_qk_clip_recording
from nanokimi.train.fast import capture_step, compile_model, describe_paths, make_optimizer

CONFIGS = {
    "bench-kl-900m": dict(preset="bench-kl-900m", B=4, T=4096),
    "bench-dsv3-900m": dict(preset="bench-dsv3-900m", B=4, T=4096),
    "gpt-124m": dict(preset="gpt-124m", B=32, T=1024),
}
QUICK = {
    "bench-kl-900m": dict(preset="tiny", overrides=dict(vocab_size=512, num_layers=2, mixers="KA"), B=2, T=32),
    "bench-dsv3-900m": dict(preset="tiny", overrides=dict(vocab_size=512, num_layers=2, mixers="A"), B=2, T=32),
    "gpt-124m": dict(preset="tiny-dense", overrides=dict(vocab_size=512, num_layers=2), B=2, T=32),
}
VARIANTS = ("auto", "module", "block", "eager", "qk-clip", "no-cudnn", "graph")
def build_step(spec: dict, variant: str, device: torch.device, compile: bool = True):
    cfg = ModelConfig.preset(spec["preset"], **spec.get("overrides", {}))
    model = build_model(cfg, device=device).train()
    if variant != "eager" and compile:
        scope = variant if variant in ("module", "block") else "auto"
        compile_model(model, fullgraph=device.type == "cuda", scope=scope)
    if variant == "qk-clip":
        enable_qk_clip_recording(model)
    graph = variant == "graph"
    opt = make_optimizer(model, "adamw", capturable=graph)
    ids = torch.randint(0, cfg.vocab_size, (spec["B"], spec["T"]), device=device)

    def step():
        with torch.autocast(device.type, torch.bfloat16, cache_enabled=not graph):
            loss = model.loss(ids, ids, chunk_tokens=0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.num_experts:
            update_router_bias(model)
        return loss

    return model, (capture_step(step) if graph else step)


def host_ms(step, device: torch.device, repeats: int = 3) -> float:
    """Median host time to issue one step (the GPU may still be working when it returns): the CPU's
    share. A step whose host time is near its wall time is bound by the CPU, not the GPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sorted(times)[len(times) // 2]


def profile_variant(spec: dict, variant: str, device: torch.device, args) -> dict:
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(variant != "no-cudnn" and cudnn_sdp)
    try:
        return _profile_variant(spec, variant, device, args)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


def _profile_variant(spec: dict, variant: str, device: torch.device, args) -> dict:
    model, step = build_step(spec, variant, device, compile=not args.quick)
    ms = median_ms(step, device, args.warmup, args.repeats)
    launch_ms = host_ms(step, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_step = {name: t / args.profile_steps / 1e3 for name, t in kernel_times(prof).items()  # ms
                if "#" not in name}  # "Optimizer.step#AdamW.step" is an annotation over kernels, not one
    kinds = {}
    for name, t in per_step.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + t
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]
    tokens = spec["B"] * spec["T"]
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]
    result = dict(step_ms=round(ms, 2), tokens_per_s=round(tokens / ms * 1e3), gpu_busy_ms=round(sum(per_step.values()), 2),
                  host_ms=round(launch_ms, 2),
                  top_cpu_ops=[[e.key[:120], round(e.self_cpu_time_total / args.profile_steps / 1e3, 3), e.count // args.profile_steps]
                               for e in cpu_ops],
                  kernels_per_step=round(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
                                         / args.profile_steps),
                  kinds_ms={k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                  top_kernels=[[name[:160], round(t, 3), kind_of(name)] for name, t in top],
                  paths=describe_paths(model, device))
    if device.type == "cuda":
        result["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        result["alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    del model, step
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["auto", "qk-clip"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny models (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or results_path("profile_step", args.quick)
    if args.quick:
        device, specs = torch.device("cpu"), {n: QUICK[n] for n in args.configs}
        args.warmup, args.repeats, args.profile_steps = 1, 1, 1
        args.variants = [v for v in args.variants if v in ("eager", "qk-clip")] or ["eager"]  # run uncompiled
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run on a GPU, or pass --quick for the CPU smoke run.")
        device, specs = torch.device("cuda"), {n: CONFIGS[n] for n in args.configs}
        torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    rows = []
    for name, spec in specs.items():
        entry = {}
        for variant in args.variants:
            print(f"== {name} / {variant}", flush=True)
            try:
                torch._dynamo.reset()
                entry[variant] = profile_variant(spec, variant, device, args)
            except Exception as error:  # noqa: BLE001 - keep the other variants
                traceback.print_exc()
                entry[variant] = dict(error=short_error(error))
            finally:
                torch._dynamo.reset()
                free_memory(device)
            r = entry[variant]
            print(json.dumps(r)[:3000], flush=True)
            kinds = r.get("kinds_ms", {})
            rows.append([name, variant, r.get("step_ms"), r.get("tokens_per_s"), r.get("gpu_busy_ms"), r.get("host_ms"),
                         " ".join(f"{k}={v}" for k, v in kinds.items()), (r.get("error") or "")[:50]])
        write_results(args.out, env, {name: dict(B=spec["B"], T=spec["T"], variants=entry)})
    print(f"\n{env['device']}  torch {env['torch']}  commit {env['git_commit'][:10]}")
    print_table(["config", "variant", "step ms", "tok/s", "GPU busy ms", "host ms", "GPU ms by kind", "note"], rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
