"""Training throughput of nanokimi beside its peers on one GPU: tokens/s, MFU, peak memory.

    python benchmarks/train_step.py                          # all configs, HF peers as subprocesses
    python benchmarks/train_step.py --configs bench-dsv3-900m bench-kl-900m --no-peer   # the trainer's step only
    python benchmarks/train_step.py --path compiled          # force a path (default auto: what `nanokimi train` runs)
    python benchmarks/train_step.py --quick --out /tmp/t.json  # CPU smoke run in seconds (tiny models)

nanokimi's step is the Trainer's own (nanokimi.train.step: choose_step -> build_model_and_optimizer ->
TrainStep), with the run defaults of `nanokimi train`: Muon + AdamW, QK-Clip, router-bias update, gradient
clipping, bf16 autocast, and the fastest valid path (whole-step CUDA graph, compiled model, loss in one piece
where it fits). Each timed step is what the Trainer does per step, `.item()` of the loss included; it sees the
same random batch each time. Step time is the median of --repeats steps after --warmup steps (at least the
graph's warm-up and capture). Random weights and tokens.

Configs: gpt-124m (B=32, T=1024) beside a minimal compiled GPT-2 written here ("plain compiled PyTorch
+ SDPA", fused AdamW); bench-kl-900m and bench-dsv3-900m (B=4, T=4096) beside Hugging Face transformers
(`peer_hf.py --layout kl|dsv3 --train`, run as a subprocess; AdamW). `--profile` adds the GPU time of the
trainer's step by kernel kind (torch.profiler) to the JSON: where a target is missed, it says why.

FLOPs per token (model FLOPs, the MFU convention of PaLM / nanoGPT, full not causal attention):
    6 * N_act  +  12 * T * sum over full-attention layers of d_attn
where N_act = activated non-embedding parameters per token (routed experts counted top-k, shared
experts, LM head included, embedding lookup excluded; nanokimi.model.info), T = sequence length,
d_attn = heads * (qk_head_dim + v_head_dim) / 2 (= heads * head_dim for GQA). KDA's chunked
delta-rule FLOPs are not counted (its projections are in N_act). MFU = tokens/s * FLOPs per token /
dense bf16 peak (989 TFLOP/s on H100 SXM).
"""
import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perf_common import (ROOT, environment, find_peer_script, free_memory, median_ms, peak_flops, print_table,
                         results_path, run_peer, short_error, write_results)
from perf_common import kernel_profile
from nanokimi.config import ModelConfig
from nanokimi.model.info import model_info
from nanokimi.train.config import load_run_config
from nanokimi.train.fast import describe_paths
from nanokimi.train.step import WARMUP_STEPS, TrainStep, build_model_and_optimizer, choose_step, plan_loss

CONFIGS = {
    "gpt-124m": dict(preset="gpt-124m", B=32, T=1024, peer="gpt2"),
    "bench-kl-900m": dict(preset="bench-kl-900m", B=4, T=4096, peer="kl"),
    "bench-dsv3-900m": dict(preset="bench-dsv3-900m", B=4, T=4096, peer="dsv3"),
}
TINY = dict(vocab_size=512, num_layers=2, max_position_embeddings=64)
QUICK = {
    "gpt-124m": dict(preset="tiny-dense", overrides=dict(TINY, num_kv_heads=4), B=2, T=32,
                     peer="gpt2", peer_dims=dict(vocab=512, d=128, layers=2, heads=4)),
    "bench-kl-900m": dict(preset="tiny", overrides=dict(TINY, mixers="KA"), B=2, T=32, peer="kl"),
    "bench-dsv3-900m": dict(preset="tiny", overrides=dict(TINY, mixers="A", mla_rope=True), B=2, T=32, peer="dsv3"),
}


def flops_per_token(cfg: ModelConfig, T: int) -> float:
    attn = 0
    for letter in cfg.layer_mixers:
        if letter == "G":
            attn += cfg.num_heads * cfg.head_dim
        elif letter in "AB":
            attn += cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    return 6 * model_info(cfg)["activated_params"] + 12 * T * attn


class PeerBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        x = x + self.proj(o.transpose(1, 2).reshape(B, T, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    """GPT-2 small as plain PyTorch (learned positions, LayerNorm, GELU MLP, tied head, no biases)."""

    def __init__(self, vocab=50304, d=768, layers=12, heads=12, max_len=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(PeerBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def flops_per_token(self, T: int) -> float:
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()  # tied wte counted once, as head
        return 6 * n + 12 * T * len(self.blocks) * self.wte.weight.shape[1]


def measure(step, device, args, tokens: int, flops_tok: float, peak, warmup: int | None = None) -> dict:
    free_memory(device)
    ms = median_ms(step, device, args.warmup if warmup is None else warmup, args.repeats)
    tok_s = tokens / ms * 1e3
    out = dict(step_ms=round(ms, 2), tokens_per_s=round(tok_s), flops_per_token=flops_tok)
    out["mfu"] = round(tok_s * flops_tok / peak, 4) if peak else None
    if device.type == "cuda":
        out["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return out


def first_working_mode(modes: list[str], attempt, device) -> dict:
    """attempt(mode) for each mode in turn until one returns a result; the errors of the modes that
    failed before it are kept in the result. Each attempt's model and compiled code are freed before the next."""
    errors = {}
    for mode in modes:
        try:
            torch._dynamo.reset()
            result = attempt(mode)
            if errors:
                result["fallback_errors"] = errors
            return result
        except Exception as error:  # noqa: BLE001 - try the next, simpler mode
            errors[mode] = short_error(error)
            traceback.print_exc()
        finally:
            torch._dynamo.reset()
            free_memory(device)
    return {"error": "every mode failed", "fallback_errors": errors}


PATHS = {"auto": [], "graph": ["train.cuda_graph=true"], "compiled": ["train.cuda_graph=false", "train.compile=true"],
         "eager": ["train.cuda_graph=false", "train.compile=false"]}


def build_trainer_step(spec: dict, device: torch.device, path: str = "auto", optimizer: str = "muon",
                       settings: tuple[str, ...] = ()) -> TrainStep:
    """The Trainer's step for `spec` (model preset + overrides, B, T), built the way `nanokimi train` builds it:
    the same run config defaults, the same choose_step / build_model_and_optimizer / TrainStep."""
    model = [f"model.{key}={value}" for key, value in spec.get("overrides", {}).items()]
    run = load_run_config(spec["preset"], None, [*model, f"train.batch_size={spec['B']}", f"train.seq_len={spec['T']}",
                                                 f"train.device={device.type}", f"optim.name={optimizer}",
                                                 *PATHS[path], *settings])
    plan = choose_step(run, device)
    torch.manual_seed(run.train.seed)
    model, opt = build_model_and_optimizer(run, device, plan)
    return TrainStep(model, opt, run, plan, device, plan_loss(model, plan))


def run_nanokimi(spec: dict, device, args, peak) -> dict:
    B, T = spec["B"], spec["T"]
    started = time.perf_counter()
    step = build_trainer_step(spec, device, args.path, args.optimizer, tuple(args.set))
    cfg = step.run.model
    print(f"  {spec['preset']}: {step.plan.describe()}", flush=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def trainer_step():
        return step([(ids, targets)], 1.0).item()  # the Trainer reads the loss after queueing the step

    warmup = max(args.warmup, WARMUP_STEPS + 1) if step.plan.graph else args.warmup
    result = measure(trainer_step, device, args, B * T, flops_per_token(cfg, T), peak, warmup)
    print(f"  {spec['preset']}: measured after {time.perf_counter() - started:.0f} s", flush=True)
    if step.plan.graph and not step.graphed:
        result["graph_failed"] = step.failed
    if args.profile and device.type == "cuda":
        try:
            result["profile"] = kernel_profile(trainer_step, 3)
        except Exception as error:  # noqa: BLE001 - keep the timing
            result["profile"] = {"error": short_error(error)}
    info = model_info(cfg)
    result.update(path=step.plan.describe(), optimizer=step.run.optim.name + (" + qk_clip" if step.run.optim.qk_clip
                                                                              else ""),
                  paths=describe_paths(step.model, device), params=info["total_params"],
                  activated_params=info["activated_params"])
    return result


def run_gpt_peer(spec: dict, device, args, peak) -> dict:
    dims = spec.get("peer_dims", {})
    B, T = spec["B"], spec["T"]

    def attempt(mode: str) -> dict:
        model = PeerGPT(max_len=T, **dims).to(device).train()
        forward = torch.compile(model) if mode == "compiled" else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                fused=device.type == "cuda")
        ids = torch.randint(0, model.wte.weight.shape[0], (B, T), device=device)

        def step():
            with torch.autocast(device.type, torch.bfloat16):
                loss = forward(ids, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        result = measure(step, device, args, B * T, model.flops_per_token(T), peak)
        result.update(peer="plain compiled PyTorch GPT-2 + SDPA", compile=mode)
        return result

    return first_working_mode(["compiled", "eager"] if device.type == "cuda" else ["eager"], attempt, device)


def run_hf_peer(spec: dict, device, args, cfg: ModelConfig, peak) -> dict:
    if device.type != "cuda":
        return {"skipped": "the HF peer runs on CUDA only"}
    if args.no_peer:
        return {"skipped": "--no-peer"}
    free_memory(device)
    res = run_peer(find_peer_script(args.peer_script),
                   ["--layout", spec["peer"], "--train", "--B", str(spec["B"]), "--T", str(spec["T"])], args.peer_timeout)
    train = res.get("train")
    if not train:
        return res
    flops_tok = flops_per_token(cfg, spec["T"])
    return dict(peer=res.get("peer"), step_ms=round(train["step_ms"], 2), tokens_per_s=round(train["tokens_per_s"]),
                peak_gb=round(train["peak_gb"], 2), flops_per_token=flops_tok,
                mfu=round(train["tokens_per_s"] * flops_tok / peak, 4) if peak else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny models (seconds)")
    ap.add_argument("--peer-script", help="path to peer_hf.py (default: .gpu/bench/, shared/bench/ or ../shared/bench/)")
    ap.add_argument("--no-peer", action="store_true", help="skip the HF subprocess peers")
    ap.add_argument("--peer-timeout", type=int, default=420)
    ap.add_argument("--path", choices=list(PATHS), default="auto",
                    help="the trainer's step path: auto (what `nanokimi train` picks), or force graph/compiled/eager")
    ap.add_argument("--optimizer", choices=["muon", "adamw"], default="muon", help="optim.name (the run default: muon)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="more run-config overrides, as on the `nanokimi train` command line, e.g. optim.qk_clip=false")
    ap.add_argument("--profile", action="store_true", help="add the step's GPU time by kernel kind to the JSON")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None,
                   help="JSON file (default benchmarks/results/train_step.json; --quick writes to a temp folder)")
    args = ap.parse_args()
    if args.out is None:
        args.out = results_path("train_step", args.quick)
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: threads only contend
        device = torch.device("cpu")
        args.warmup, args.repeats = 1, 2
        specs = {name: QUICK[name] for name in args.configs}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run on a GPU, or pass --quick for the CPU smoke run.")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        specs = {name: CONFIGS[name] for name in args.configs}
    env = environment(device)
    peak = peak_flops(env["device"])
    out = Path(args.out)
    results, rows = {}, []
    for name, spec in specs.items():
        print(f"== {name}", flush=True)
        try:
            cfg = ModelConfig.preset(spec["preset"], **spec.get("overrides", {}))
            ours = run_nanokimi(spec, device, args, peak)
            torch._dynamo.reset()  # the step, its graph and its compiled code go before the next model is built
            free_memory(device)
            peer = run_gpt_peer(spec, device, args, peak) if spec["peer"] == "gpt2" else run_hf_peer(spec, device, args, cfg, peak)
            entry = dict(B=spec["B"], T=spec["T"], nanokimi=ours, peer=peer)
            if ours.get("tokens_per_s") and peer.get("tokens_per_s"):
                entry["speedup"] = round(ours["tokens_per_s"] / peer["tokens_per_s"], 2)
        except Exception as error:  # noqa: BLE001 - keep the other configs
            traceback.print_exc()
            entry = dict(error=short_error(error))
        results[name] = entry
        print(json.dumps(entry, default=str), flush=True)
        write_results(out, env, {name: entry}, dict(peak_flops=peak, flops_formula=FLOPS_FORMULA))
        for who in ("nanokimi", "peer"):
            if who not in entry:
                continue
            r = entry[who]
            rows.append([name, who if who != "peer" else r.get("peer", "peer"), r.get("tokens_per_s"),
                         r.get("mfu"), r.get("step_ms"), r.get("peak_gb"),
                         r.get("compile") or r.get("path", "").split(" ")[0][5:],
                         (r.get("error") or r.get("skipped") or "")[:60]])
    print(f"\n{env['device']}  torch {env['torch']}  commit {env['git_commit'][:10]}")
    print_table(["config", "who", "tok/s", "MFU", "step ms", "peak GB", "path", "note"], rows)
    for name, entry in results.items():
        if "paths" in entry.get("nanokimi", {}):
            print(f"{name}: {entry['nanokimi']['paths']} | {entry['nanokimi']['path']}")
    print(f"wrote {out}")


FLOPS_FORMULA = ("6 * activated_non_embedding_params + 12 * T * sum_attn_layers(heads * (d_qk + d_v) / 2) "
                 "per token; KDA recurrence FLOPs not counted")

if __name__ == "__main__":
    main()
