"""Decoding throughput of nanokimi beside Hugging Face transformers, and long-context decode cost of the
KDA hybrid against all-MLA. Random weights (speed does not depend on them); bf16 model.

    python benchmarks/generate.py                 # about 5 minutes on an H100, HF peers included
    python benchmarks/generate.py --no-peer --skip-long
    python benchmarks/generate.py --quick --out /tmp/g.json    # CPU smoke run in seconds

Short: bench-kl-900m and bench-dsv3-900m, batch 1 and 16, prompt 512, 128 new tokens, greedy.
  e2e tok/s = batch * 128 / wall time of the whole generate() call (prefill included; what the HF peer
  `peer_hf.py --generate --gen-batch N` reports). decode tok/s = batch / median time of one decode step.
  Variants: CUDA graph (default path), eager (no graph), CUDA graph + torch.compile (batch 16).
Long: the hybrid (bench-kl-900m, KKKA) and the same model with every layer MLA, at contexts 32k and
  128k, batch 1 and the largest batch whose cache fits in free memory. The cache is filled with random
  values instead of a real prefill (decode cost does not depend on the values), then the median of
  single CUDA-graph decode steps is taken: decode tok/s = batch / step time.
"""
import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from perf_common import (ROOT, environment, find_peer_script, free_memory, kernel_profile, median_ms, print_table, results_path,
                         run_peer, short_error, sync, write_results)
from nanokimi.config import ModelConfig
from nanokimi.infer import DecodeStep, generate, release_decode_graphs
from nanokimi.model import build_model
from nanokimi.model.info import model_info
from nanokimi.train.fast import describe_paths

SHORT = {"bench-kl-900m": dict(preset="bench-kl-900m", peer="kl"),
         "bench-dsv3-900m": dict(preset="bench-dsv3-900m", peer="dsv3")}
LONG = {"hybrid-KKKA": dict(preset="bench-kl-900m", overrides=dict(max_position_embeddings=262144)),
        "all-MLA": dict(preset="bench-kl-900m", overrides=dict(mixers="A", max_position_embeddings=262144))}
TINY = dict(vocab_size=512, num_layers=2, max_position_embeddings=512)
QUICK_SHORT = {"bench-kl-900m": dict(preset="tiny", overrides=dict(TINY, mixers="KA"), peer="kl"),
               "bench-dsv3-900m": dict(preset="tiny", overrides=dict(TINY, mixers="A", mla_rope=True), peer="dsv3")}
QUICK_LONG = {"hybrid-KKKA": dict(preset="tiny", overrides=dict(TINY, mixers="KA")),
              "all-MLA": dict(preset="tiny", overrides=dict(TINY, mixers="A"))}


def make_model(spec: dict, device, dtype):
    cfg = ModelConfig.preset(spec["preset"], **spec.get("overrides", {}))
    return build_model(cfg, device=device, dtype=dtype).eval(), cfg


def time_generate(model, ids, new, device, **kwargs) -> float:
    sync(device)
    t0 = time.perf_counter()
    generate(model, ids, new, temperature=0, **kwargs)
    sync(device)
    return time.perf_counter() - t0


def short_decode(model, cfg, B: int, args, device, variant: str) -> dict:
    """variant: 'graph', 'graph+compile' or 'eager'."""
    ids = torch.randint(3, cfg.vocab_size, (B, args.prompt), device=device)
    graph = variant != "eager" and device.type == "cuda"
    kwargs = dict(use_cuda_graph=graph, keep_graph=graph, compile=variant == "graph+compile",
                  fixed_shape=variant != "eager")
    try:
        time_generate(model, ids, args.new if graph else 4, device, **kwargs)  # warm: capture, compile, lazy init
        seconds = time_generate(model, ids, args.new, device, **kwargs)
        result = dict(variant=variant, batch=B, prompt=args.prompt, new=args.new, seconds=round(seconds, 4),
                      e2e_tokens_per_s=round(B * args.new / seconds, 1))
        if variant != "eager":
            key = (B, args.prompt + args.new, variant == "graph+compile")
            step = getattr(model, "_kept_decode_steps", {}).get(key)
            if step is None:  # no graph (CPU): time the fixed-shape step eagerly
                cache = model.new_cache(B, args.prompt + args.new)
                step = DecodeStep(model, cache)
            token = ids[:, -1]
            ms = median_ms(lambda: step(token, args.prompt), device, args.warmup, args.repeats)
            result.update(decode_step_ms=round(ms, 3), decode_tokens_per_s=round(B / ms * 1e3, 1),
                          cuda_graph=step.graph is not None)
            if args.profile and device.type == "cuda":
                result["profile"] = kernel_profile(lambda: step(token, args.prompt), 5)
                print(f"  profile {variant} b{B}: {json.dumps(result['profile'])[:1500]}", flush=True)
        return result
    except Exception as error:  # noqa: BLE001 - keep the other variants
        traceback.print_exc()
        return dict(variant=variant, batch=B, error=short_error(error))
    finally:
        release_decode_graphs(model)
        free_memory(device)


def hf_decode(spec, B, args, device) -> dict:
    if device.type != "cuda":
        return {"skipped": "the HF peer runs on CUDA only"}
    if args.no_peer:
        return {"skipped": "--no-peer"}
    free_memory(device)
    res = run_peer(find_peer_script(args.peer_script),
                   ["--layout", spec["peer"], "--generate", "--gen-batch", str(B), "--prompt", str(args.prompt),
                    "--new", str(args.new)], args.peer_timeout)
    gen = res.get("generate")
    if not gen:
        return res
    return dict(peer=res.get("peer"), batch=B, seconds=round(gen["seconds"], 3),
                e2e_tokens_per_s=round(gen["tokens_per_s"], 1))


def fill_random_(cache) -> None:
    for layer in cache.layers:
        for name, buffer in vars(layer).items():
            if buffer.is_floating_point():
                buffer.normal_()
                if name == "state":
                    buffer.mul_(0.01)


def cache_bytes_per_sequence(cfg: ModelConfig, length: int, dtype_bytes: int = 2) -> int:
    info = model_info(cfg, cache_dtype_bytes=dtype_bytes)
    scores = 16 * cfg.num_heads * length  # decode scores of one MLA layer (bf16 + fp32 copies), live one layer at a time
    return info["kv_cache_bytes_per_token"] * length + info["recurrent_state_bytes_per_sequence"] + scores


def long_decode(model, cfg, ctx: int, B: int, args, device) -> dict:
    cache = step = None
    try:
        cache = model.new_cache(B, ctx + 8)
        step = DecodeStep(model, cache, graph=device.type == "cuda")
        fill_random_(cache)
        token = torch.randint(3, cfg.vocab_size, (B,), device=device)
        ms = median_ms(lambda: step(token, ctx), device, args.warmup, args.repeats)
        return dict(context=ctx, batch=B, decode_step_ms=round(ms, 3), decode_tokens_per_s=round(B / ms * 1e3, 1),
                    cache_gb=round(cache.nbytes() / 1e9, 3), cuda_graph=step.graph is not None)
    finally:
        del cache, step
        free_memory(device)


def long_context(name, spec, args, device, dtype) -> dict:
    model, cfg = make_model(spec, device, dtype)
    out = {}
    try:
        for ctx in args.contexts:
            batches = [1]
            if device.type == "cuda":
                free_memory(device)
                free = torch.cuda.mem_get_info(device)[0]
                most = int(0.8 * free // cache_bytes_per_sequence(cfg, ctx + 8))
                batches.append(max(1, min(most, args.max_batch)))
            else:
                batches.append(2)
            for B in dict.fromkeys(batches):
                label = f"ctx{ctx}_b{'max' if B != 1 else 1}"
                for attempt in range(4):
                    try:
                        out[label] = long_decode(model, cfg, ctx, B, args, device)
                        break
                    except torch.cuda.OutOfMemoryError as error:
                        out[label] = dict(context=ctx, batch=B, error=short_error(error))
                        if B == 1:
                            break
                        B = max(1, B // 2)
                    except Exception as error:  # noqa: BLE001
                        traceback.print_exc()
                        out[label] = dict(context=ctx, batch=B, error=short_error(error))
                        break
                print(f"  {name} {label}: {json.dumps(out[label])}", flush=True)
    finally:
        del model
        free_memory(device)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny models (seconds)")
    ap.add_argument("--configs", nargs="+", choices=list(SHORT), default=list(SHORT))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--max-batch", type=int, default=256, help="cap of the long-context largest batch")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--skip-short", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the CUDA graph + torch.compile variant")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="GPU kernels of 5 decode steps by kind (into the JSON)")
    ap.add_argument("--variants", nargs="+", default=None, help="short-decode variants (default: all)")
    ap.add_argument("--peer-batches", nargs="+", type=int, default=None, help="HF peer batches (default: --batches)")
    ap.add_argument("--peer-script", help="path to peer_hf.py (default: .gpu/bench/, shared/bench/ or ../shared/bench/)")
    ap.add_argument("--peer-timeout", type=int, default=240)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None,
                   help="JSON file (default benchmarks/results/generate.json; --quick writes to a temp folder)")
    args = ap.parse_args()
    if args.out is None:
        args.out = results_path("generate", args.quick)
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: threads only contend
        device, dtype = torch.device("cpu"), torch.float32
        args.batches, args.prompt, args.new, args.contexts = [1, 2], 16, 4, [48]
        args.warmup, args.repeats, args.no_compile = 1, 2, True
        short_specs = {n: QUICK_SHORT[n] for n in args.configs}
        long_specs = QUICK_LONG
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run on a GPU, or pass --quick for the CPU smoke run.")
        device, dtype = torch.device("cuda"), torch.bfloat16
        short_specs = {n: SHORT[n] for n in args.configs}
        long_specs = LONG
    env = environment(device)
    out = Path(args.out)
    results, rows = {}, []
    for name, spec in ({} if args.skip_short else short_specs).items():
        print(f"== {name}", flush=True)
        entry = {}
        try:
            model, cfg = make_model(spec, device, dtype)
            entry["paths"] = describe_paths(model, device, dtype)
            for B in args.batches:
                variants = ["graph"]
                if B == max(args.batches):
                    variants += ["eager"] + ([] if args.no_compile else ["graph+compile"])
                for variant in [v for v in variants if args.variants is None or v in args.variants]:
                    entry[f"b{B}_{variant}"] = short_decode(model, cfg, B, args, device, variant)
                    print(f"  {json.dumps(entry[f'b{B}_{variant}'])}", flush=True)
            del model
            torch._dynamo.reset()
            free_memory(device)
            for B in args.peer_batches or args.batches:
                entry[f"b{B}_hf"] = hf_decode(spec, B, args, device)
                print(f"  {json.dumps(entry[f'b{B}_hf'])}", flush=True)
        except Exception as error:  # noqa: BLE001 - keep the other configs
            traceback.print_exc()
            entry["error"] = short_error(error)
        results[name] = entry
        write_results(out, env, {name: entry})
        for key, r in entry.items():
            if isinstance(r, dict):
                rows.append([name, key, r.get("batch"), r.get("e2e_tokens_per_s"), r.get("decode_tokens_per_s"),
                             r.get("decode_step_ms"), (r.get("error") or r.get("skipped") or "")[:60]])
    for name, spec in ({} if args.skip_long else long_specs).items():
        print(f"== long context: {name}", flush=True)
        try:
            entry = long_context(name, spec, args, device, dtype)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            entry = dict(error=short_error(error))
        results[f"long/{name}"] = entry
        write_results(out, env, {f"long/{name}": entry})
        for key, r in entry.items():
            if isinstance(r, dict):
                rows.append([f"long/{name}", key, r.get("batch"), None, r.get("decode_tokens_per_s"),
                             r.get("decode_step_ms"), (r.get("error") or "")[:60]])
    print(f"\n{env['device']}  torch {env['torch']}  commit {env['git_commit'][:10]}")
    print_table(["config", "run", "batch", "e2e tok/s", "decode tok/s", "step ms", "note"], rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
