"""What Attention Residuals cost: training-step time with attn_res = none / block / full.

Two tables from one process (each model built once per mode, compiled once; the AttnRes kernels compiled
for the residual table are reused by the model table, whose residual stream has the same shapes):
  residual: the residual stream alone (D=1024, 32 sublayers, B=4, T=4096, fp32 stream under bf16 autocast with
            bf16 sublayer outputs, as in the model), each sublayer's pre-norm (RMSNorm, compiled with --compile as
            compile_model compiles it) and a cheap stand-in sublayer, so the time is the residual's and the
            norms' own forward + backward (the norms are in every row, PreNorm's too: fusing them is an option):
            PreNorm add vs block vs full AttnRes, one row per kernel set: eager, compiled (torch.compile of the
            fused kernels) and, on CUDA with triton, triton (Triton phase 1, the rest compiled).
  model:    a full training step (bf16 autocast forward + loss, backward, AdamW) of bench-kl-900m, B=4, T=4096,
            compiled with nanokimi.train.fast.compile_model (which also compiles the AttnRes kernels), per
            attn_res setting (T halves on OOM); its AttnRes kernels are what compile_model picks (triton on CUDA
            when triton imports), recorded per row as attnres_kernels.
Every AttnRes row is measured once per --storage (AttnResKernels.storage, a runtime setting applied with
set_attnres_kernels: "auto" = sources in bf16 under autocast, "auto-all" = mixtures too, "fp32") and once per
--fuse-norm (AttnResKernels.fuse_norm: "on" = each sublayer input
comes out of the kernel that computes it already normed, the merge's inside a block and phase 1's for a block's
first sublayer (every sublayer in full mode), "off" = h is written and the norm reads it), so one run compares
PreNorm, the storages and the fused norms.
Medians over timed steps after warm-up. Writes benchmarks/results/attnres_overhead.json (device, date, commit).

    python benchmarks/attnres_overhead.py            # GPU, a few minutes (fla autotune + compiles come first)
    python benchmarks/attnres_overhead.py --modes block --cuda-graph   # skip full; also whole-step CUDA graphs
    python benchmarks/attnres_overhead.py --quick    # CPU smoke run: tiny sizes, eager, 2 steps
    python benchmarks/attnres_overhead.py --storage fp32,auto,auto-all   # storages to compare (default auto,fp32)
    python benchmarks/attnres_overhead.py --modes block --cuda-graph --storage auto --fuse-norm on,off
                                                     # the fused pre-norm against the unfused one (default on,off)
    python benchmarks/attnres_overhead.py ... --skip-model / --skip-residual   # one table only
"""
import argparse
import datetime
import importlib.util
import json
from pathlib import Path

import torch

from perf_common import free_memory, git_commit, kernel_profile, median_ms, results_path, short_error  # noqa: E402

from nanokimi.model.attn_res import AttentionResiduals, set_attnres_kernels  # noqa: E402
from nanokimi.model.norm import RMSNorm  # noqa: E402
from nanokimi.model.residual import PreNormResidual  # noqa: E402

MODES = ("none", "block", "full")
from nanokimi.runtime.attnres import STORAGES, AttnResKernels  # noqa: E402
FUSE_NORM = {"on": True, "off": False}


def kernel_sets(args, device):
    """The AttnRes kernel sets the residual table measures: eager always; compiled and triton with --compile."""
    sets = ["eager"]
    if args.compile:
        sets.append("compiled")
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            sets.append("triton")
    return sets


def attnres_variants(args):
    """(mode, storage, fuse_norm) of every AttnRes row."""
    return [(mode, storage, fuse) for mode in args.modes if mode != "none" for storage in args.storage
            for fuse in args.fuse_norm]


def residual_rows(args, device):
    """Residual stream alone: per sublayer its RMSNorm and a stand-in out = tanh(x) * scale (one elementwise pass)."""
    B, T, D, L = args.batch, args.seq_len, args.hidden, args.sublayers
    rows = []
    variants = [("none", "-", "-", "-")] + [(mode, kernels, storage, fuse) for mode, storage, fuse in
                                            attnres_variants(args) for kernels in kernel_sets(args, device)]
    for mode, kernels, storage, fuse in variants:
        residual = PreNormResidual() if mode == "none" else AttentionResiduals(
            D, L, mode=mode, num_blocks=args.blocks, storage=storage, fuse_norm=fuse == "on").to(device)
        if kernels != "eager" and mode != "none":
            residual.compile_kernels(triton=kernels == "triton")
        norms = [RMSNorm(D).to(device) for _ in range(L)]
        if args.compile and kernels != "eager":  # as compile_model compiles each norm module
            for norm in norms:
                norm.compile(fullgraph=True)
        embedding = torch.randn(B, T, D, device=device, requires_grad=True)
        scales = torch.full((L,), 0.5, device=device, requires_grad=True)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):  # the sublayers' outputs are bf16, as in the model
                state = residual.start(embedding, norms[0])
                for l in range(L):
                    x = residual.normed_input(state, l, norms[l])
                    state = residual.add(state, l, (torch.tanh(x) * scales[l]).to(torch.bfloat16),
                                         norms[l + 1] if l + 1 < L else None)
                final = residual.finish(state)
            final.square().mean().backward()

        free_memory(device)
        ms = median_ms(step, device, args.warmup, args.steps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append(dict(table="residual", attn_res=mode, kernels=kernels, storage=storage, fuse_norm=fuse, B=B,
                         T=T, D=D, sublayers=L, median_ms=ms, peak_gib=peak))
        if args.profile and device.type == "cuda":
            rows[-1]["profile"] = kernel_profile(step, calls=2, top=12)
        print(f"residual {mode} kernels={kernels} storage={storage} fuse_norm={fuse}: {ms:.2f} ms", flush=True)
    return rows


def model_rows(args, device):
    """One training-step row per attn_res setting, all at the same T: the first T (halving from --seq-len) that fits."""
    from nanokimi.config import ModelConfig
    from nanokimi.model import build_model
    seq_len = args.seq_len
    while True:
        try:
            return [model_step_row(ModelConfig, build_model, args, device, mode, storage, fuse, seq_len)
                    for mode, storage, fuse in [("none", "-", "-")] + attnres_variants(args)]
        except torch.cuda.OutOfMemoryError:
            free_memory(device)
            if seq_len <= 512:
                print("model table skipped: out of memory even at T=512")
                return []
            seq_len //= 2
            print(f"out of memory: model rows rerun at T={seq_len}")


def model_step_row(ModelConfig, build_model, args, device, mode, storage, fuse, seq_len):
    from nanokimi.train.fast import capture_step, compile_model, make_optimizer
    overrides = dict(attn_res=mode, attn_res_blocks=args.blocks)
    settings = AttnResKernels(storage=storage if mode != "none" else "auto",
                              fuse_norm=FUSE_NORM[fuse] if fuse != "-" else True)
    if args.quick:
        overrides.update(vocab_size=512, num_layers=2, mixers="KA", max_position_embeddings=64)
    config = ModelConfig.preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = set_attnres_kernels(build_model(config, device=device), settings).train()
    compiled, error = False, None
    if args.compile:
        try:
            compile_model(model, fullgraph=True, loss=True)
            compiled = True
        except Exception as exc:  # noqa: BLE001 - measure eager rather than lose the row
            error = short_error(exc)
    graph = args.cuda_graph and device.type == "cuda"
    optimizer = make_optimizer(model, "adamw", capturable=graph)
    ids = torch.randint(0, config.vocab_size, (args.batch, seq_len), device=device)
    targets = torch.randint(0, config.vocab_size, (args.batch, seq_len), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph):
            loss = model.loss(ids, targets, chunk_tokens=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graph)
        return loss

    free_memory(device)
    try:
        ms = median_ms(step, device, args.warmup, args.steps)
    except torch.cuda.OutOfMemoryError:
        del model, optimizer
        raise
    except Exception as exc:  # noqa: BLE001 - a compiled step that fails is re-measured eager
        if not compiled:
            raise
        error, compiled = short_error(exc), False
        model = set_attnres_kernels(build_model(config, device=device), settings).train()
        optimizer = make_optimizer(model, "adamw")
        ms = median_ms(step, device, args.warmup, args.steps)
    graph_ms = None
    if graph and compiled:
        try:
            graph_ms = median_ms(capture_step(step), device, args.warmup, args.steps)
        except Exception as exc:  # noqa: BLE001 - keep the compiled row
            error = f"CUDA graph capture failed: {short_error(exc)}"
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    kernels = getattr(model.residual, "kernels", None)
    attnres_kernels = "-" if kernels is None else ("triton" if hasattr(kernels.phase1_forward, "func")
                                                   else "compiled" if compiled else "eager")
    row = dict(table="model", attn_res=mode, compiled=compiled, attnres_kernels=attnres_kernels, storage=storage,
               fuse_norm=fuse, preset=args.preset, B=args.batch, T=seq_len,
               median_ms=ms, tokens_per_s=args.batch * seq_len / ms * 1e3, peak_gib=peak,
               params=sum(p.numel() for p in model.parameters()))
    if graph_ms is not None:
        row.update(graph_ms=graph_ms, graph_tokens_per_s=args.batch * seq_len / graph_ms * 1e3)
    if error:
        row["compile_error"] = error
    print(f"model {mode} storage={storage} fuse_norm={fuse} compiled={compiled}: {ms:.1f} ms"
          + (f", graph {graph_ms:.1f} ms" if graph_ms else ""), flush=True)
    del model, optimizer
    free_memory(device)
    return row


def add_overheads(rows):
    """residual rows: extra ms over the PreNorm add, and that as a share of the model's attn_res=none step;
    model rows: step time over the attn_res=none step."""
    residual_base = next((r for r in rows if r["table"] == "residual" and r["attn_res"] == "none"), None)
    model_base = next((r for r in rows if r["table"] == "model" and r["attn_res"] == "none"), None)
    for r in rows:
        if r["table"] == "residual" and residual_base:
            r["extra_ms"] = r["median_ms"] - residual_base["median_ms"]
            if model_base:
                r["overhead_vs_none"] = r["extra_ms"] / model_base["median_ms"]
        if r["table"] == "model" and model_base and r["T"] == model_base["T"]:
            r["extra_ms"] = r["median_ms"] - model_base["median_ms"]
            r["overhead_vs_none"] = r["median_ms"] / model_base["median_ms"] - 1
            if r.get("graph_ms") and model_base.get("graph_ms"):
                r["graph_overhead_vs_none"] = r["graph_ms"] / model_base["graph_ms"] - 1


def print_table(rows):
    """overhead: extra ms as a share of the model's attn_res=none step (for residual rows as well); kernels: the
    AttnRes kernel set (residual rows), how the model step ran and its AttnRes kernels (model rows)."""
    header = (f"{'table':9} {'attn_res':8} {'kernels':8} {'storage':7} {'norm':4} {'B':>2} {'T':>5} "
              f"{'median ms':>10} {'extra ms':>9} {'overhead':>9} {'tok/s':>9} {'peak GiB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        extra = f"{r['extra_ms']:+.2f}" if "extra_ms" in r else "-"
        over = f"{100 * r['overhead_vs_none']:+.1f}%" if "overhead_vs_none" in r else "-"
        tok = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        kernels = r["kernels"] if r["table"] == "residual" else "eager" if not r["compiled"] else (
            "compiled" if r["attnres_kernels"] == "-" else r["attnres_kernels"])
        print(f"{r['table']:9} {r['attn_res']:8} {kernels:8} {r['storage']:7} {r['fuse_norm']:4} {r['B']:>2} "
              f"{r['T']:>5} {r['median_ms']:>10.2f} {extra:>9} {over:>9} {tok:>9} {peak:>8}")
    for r in rows:
        if r.get("graph_ms"):
            over = f", {100 * r['graph_overhead_vs_none']:+.1f}% over none" if "graph_overhead_vs_none" in r else ""
            print(f"model {r['attn_res']} storage={r['storage']} fuse_norm={r['fuse_norm']} in one CUDA graph: "
                  f"{r['graph_ms']:.1f} ms "
                  f"({r['graph_tokens_per_s']:.0f} tok/s{over})")
    for r in rows:
        if "compile_error" in r:
            print(f"model {r['attn_res']} storage={r['storage']} fuse_norm={r['fuse_norm']}: compile failed, "
                  f"measured eager: {r['compile_error']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, tiny sizes, 2 steps")
    parser.add_argument("--preset", default="bench-kl-900m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024, help="residual table: hidden size")
    parser.add_argument("--sublayers", type=int, default=32, help="residual table: number of sublayers")
    parser.add_argument("--blocks", type=int, default=8, help="attn_res_blocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager only (default: compiled AttnRes kernels in the residual table, compile_model "
                             "for the model table)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="attn_res settings to measure besides none (comma-separated: block,full)")
    parser.add_argument("--storage", default="auto,fp32",
                        help="attn_res_storage values to measure for every AttnRes row (comma-separated: "
                             "auto,auto-all,fp32)")
    parser.add_argument("--fuse-norm", default="on,off",
                        help="attn_res_fuse_norm values to measure for every AttnRes row (comma-separated: on = "
                             "each pre-norm computed in the kernel that computes its input, the merge's or phase "
                             "1's; off = h is written, the norm reads it)")
    parser.add_argument("--profile", action="store_true", help="residual table: GPU time by kernel kind per row")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="model table: also time the compiled step captured whole in one CUDA graph")
    parser.add_argument("--skip-model", action="store_true", help="only the residual table")
    parser.add_argument("--skip-residual", action="store_true",
                        help="only the model table (its rows then compile the AttnRes kernels themselves)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/attnres_overhead.json; --quick writes to a temp folder)")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.storage = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = [s for s in args.storage if s not in STORAGES]
    if unknown or not args.storage:
        parser.error(f"--storage: unknown {unknown or 'empty'}; choose from {', '.join(STORAGES)}")
    args.fuse_norm = [f.strip() for f in args.fuse_norm.split(",") if f.strip()]
    unknown = [f for f in args.fuse_norm if f not in FUSE_NORM]
    if unknown or not args.fuse_norm:
        parser.error(f"--fuse-norm: unknown {unknown or 'empty'}; choose from {', '.join(FUSE_NORM)}")
    if args.out is None:
        args.out = results_path("attnres_overhead", args.quick)
    if args.quick:
        args.preset, args.batch, args.seq_len, args.hidden, args.sublayers = "tiny", 1, 32, 64, 8
        args.warmup, args.steps, args.compile = 0, 2, False
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")

    rows = [] if args.skip_residual else residual_rows(args, device)
    if not args.skip_model:
        rows += model_rows(args, device)
    add_overheads(rows)
    print_table(rows)

    report = dict(
        benchmark="attnres_overhead",
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        quick=args.quick,
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
