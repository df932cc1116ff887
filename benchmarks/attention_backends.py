"""Which SDPA kernel trains MLA attention fastest: forward+backward time per backend, per head shape.

    python benchmarks/attention_backends.py            # GPU: MLA (qk 192, v 128) and GQA (64) shapes
    python benchmarks/attention_backends.py --quick    # CPU smoke run (math backend, tiny shapes)

MLA's queries and keys are 192 wide (128 NoPE + 64 RoPE) and its values 128. Flash attention needs equal
widths, so nanokimi pads the values to 192 for it; cuDNN and the memory-efficient kernel take 128-wide
values as they are. Each row is one causal self-attention call (B=4, T=4096, 8 heads unless given),
bf16, forward then backward, median of --repeats after warm-up; the backend is forced with sdpa_kernel.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from perf_common import environment, median_ms, print_table, results_path, short_error, write_results

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SHAPES = {"mla": (192, 128), "gqa": (64, 64)}


def time_backend(backend: str, B: int, T: int, H: int, dqk: int, dv: int, pad: bool, device, args) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k = (torch.randn(B, H, T, dqk, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, dv, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, H, T, dv, device=device, dtype=dtype)

    def step():
        with sdpa_kernel([BACKENDS[backend]]):
            vv = F.pad(v, (0, dqk - dv)) if pad else v
            o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)[..., :dv]
        o.backward(grad)

    return median_ms(step, device, args.warmup, args.repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (math backend, tiny shapes)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or results_path("attention_backends", args.quick)
    if args.quick:
        device, args.B, args.T, args.H, args.warmup, args.repeats = torch.device("cpu"), 1, 64, 2, 1, 1
        backends = ["math"]
    else:
        device, backends = torch.device("cuda"), ["flash", "cudnn", "efficient"]
    env = environment(device)
    results, rows = {}, []
    for shape, (dqk, dv) in SHAPES.items():
        for backend in backends:
            for pad in ([False, True] if dv < dqk else [False]):
                if backend == "flash" and dv < dqk and not pad:
                    continue  # flash cannot take unequal widths
                name = f"{shape}/{backend}" + ("/v padded" if pad else "")
                try:
                    ms = round(time_backend(backend, args.B, args.T, args.H, dqk, dv, pad, device, args), 3)
                    results[name] = dict(fwd_bwd_ms=ms)
                except Exception as error:  # noqa: BLE001 - a backend may not support a shape
                    results[name] = dict(error=short_error(error))
                rows.append([name, results[name].get("fwd_bwd_ms"), results[name].get("error", "")[:70]])
                print(rows[-1], flush=True)
    write_results(out, env, results, dict(B=args.B, T=args.T, H=args.H))
    print(f"\n{env['device']}  torch {env['torch']}  B={args.B} T={args.T} H={args.H}")
    print_table(["shape/backend", "fwd+bwd ms", "note"], rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
