"""What the AttnRes phase-1 Triton kernels compile to on a Hopper GPU, from any machine (no GPU needed).

Triton compiles a kernel ahead of time for a named target (here sm_90, the H100 / H200) with the ptxas it ships;
nvdisasm and cuobjdump (also shipped) read the machine code back. For phase 1's forward and backward at the
bench-kl-900m shape (D = 1024, S = 4 queries, N = 8 bf16 sources, fp32 gradients, one token per tile) this prints,
per kernel and warp count: registers per thread, the programs of 4 warps that fit an SM by registers, and per
tile the barriers (BAR.SYNC: a layout conversion through shared memory or a reduction across warps), the global
loads by width (LDG.E.128 / .64 vectorised, LDG.E / .U16 one element a thread), the TTGIR layout conversions and
the SASS length. The kernels are memory-bound, so what matters is how long one tile's chain of loads, barriers
and stores takes: fewer barriers and wider loads are the levers these numbers show (see docs/attnres.md).

    python benchmarks/attnres_sass.py                # the table
    python benchmarks/attnres_sass.py --json out.json

Pointer and size arguments are declared 16-divisible, as Triton's launcher specialises them at run time for
the model's tensors (without it the loads would not vectorise here, though they do on the GPU).
"""
import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path


import perf_common  # noqa: F401  (puts the repository root on the import path)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nanokimi.ops.attnres import triton_phase1  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_KINDS = re.compile(r"\b(LDG\.E(?:\.\w+)?|STG\.E(?:\.\w+)?|BAR\.SYNC)")


def _compile(kernel, arguments: dict, constants: dict, num_warps: int):
    """kernel compiled for TARGET: arguments maps each runtime argument to its Triton type (a tuple for a tuple
    argument), constants each constexpr to its value; pointers and integers are declared 16-divisible."""
    names = kernel.arg_names
    signature = dict(arguments, **{name: "constexpr" for name in constants})
    attrs = {}
    for name, kind in arguments.items():
        index = names.index(name)
        if isinstance(kind, tuple):
            attrs.update({(index, j): [["tt.divisibility", 16]] for j in range(len(kind))})
        elif kind.startswith("*") or kind == "i32":
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=3))


def phase1_backward(num_warps=4, N=8, S=4, D=1024, block_t=1, first_norm=False, prefetch=0, source="bf16"):
    arguments = dict(values=(f"*{source}",) * N, rstds=("*fp32",) * N, grad_mixtures=("*fp32",) * S,
                     qe_ptr="*fp32", logits_ptr="*fp32", lse_ptr="*fp32", grad_lse_ptr="*fp32",
                     grad_values=("*fp32",) * N, grad_qe_partial_ptr="*fp32", norm_weight_ptr="*fp32",
                     grad_norm_weight_partial_ptr="*fp32", M="i32", tiles="i32", norm_eps="fp32")
    constants = dict(N=N, S=S, D=D, S_PAD=triton.next_power_of_2(S), N_PAD=triton.next_power_of_2(N),
                     BLOCK_T=block_t, CHUNK_D=triton.next_power_of_2(D), ACCUMULATE=(1 << N) - 1,
                     FIRST_NORM=first_norm, MIXTURE_DTYPE=tl.float32, INPUT_DTYPE=tl.float32,
                     SUMS_IN_REGISTERS=False, PREFETCH=prefetch)
    return _compile(triton_phase1._phase1_backward_kernel, arguments, constants, num_warps)


def phase1_forward(num_warps=2, N=8, S=4, D=1024, block_t=1, first_norm=False, source="bf16"):
    arguments = dict(values=(f"*{source}",) * N, rstds=("*fp32",) * N, qe_ptr="*fp32", mixtures=("*fp32",) * S,
                     logits_ptr="*fp32", lse_ptr="*fp32", norm_weight_ptr="*fp32", M="i32", norm_eps="fp32")
    constants = dict(N=N, S=S, D=D, S_PAD=triton.next_power_of_2(S), BLOCK_T=block_t,
                     BLOCK_D=triton.next_power_of_2(D), FIRST_NORM=first_norm, MIXTURE_DTYPE=tl.float32,
                     INPUT_DTYPE=tl.float32)
    return _compile(triton_phase1._phase1_forward_kernel, arguments, constants, num_warps)


def inspect(compiled, num_warps: int) -> dict:
    """Registers, programs of num_warps per SM by registers, and the SASS counts of one compiled kernel."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    counts = collections.Counter(m.group(1) for line in sass.splitlines() if (m := SASS_KINDS.search(line)))
    return dict(registers=registers, programs_per_sm=REGISTERS_PER_SM // (registers * 32 * num_warps),
                barriers=counts.pop("BAR.SYNC", 0), conversions=compiled.asm["ttgir"].count("ttg.convert_layout"),
                sass_lines=len(sass.splitlines()), memory=dict(sorted(counts.items())))


CASES = {  # name: (builder, keyword arguments)
    "phase1_backward w4": (phase1_backward, dict(num_warps=4)),
    "phase1_backward w8": (phase1_backward, dict(num_warps=8)),
    "phase1_backward w4 prefetch 1": (phase1_backward, dict(num_warps=4, prefetch=1)),
    "phase1_norm_backward w4": (phase1_backward, dict(num_warps=4, first_norm=True)),
    "phase1_norm_backward w8": (phase1_backward, dict(num_warps=8, first_norm=True)),
    "phase1_forward w2": (phase1_forward, dict(num_warps=2)),
    "phase1_forward w4": (phase1_forward, dict(num_warps=4)),
    "phase1_norm_forward w2": (phase1_forward, dict(num_warps=2, first_norm=True)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, among: " + ", ".join(CASES))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose among: {', '.join(CASES)}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the GPU runs with; silences a warning
    rows = {}
    print(f"{'kernel (D=1024, S=4, N=8 bf16)':32} {'regs':>4} {'progs/SM':>8} {'barriers':>8} {'converts':>8} "
          f"{'sass':>5}  loads / stores")
    for name in names:
        builder, kwargs = CASES[name]
        row = inspect(builder(**kwargs), kwargs["num_warps"])
        rows[name] = row
        memory = " ".join(f"{kind.removeprefix('LDG.E').removeprefix('STG.E') or '.32'}"
                          f"{'L' if kind.startswith('LDG') else 'S'}x{count}" for kind, count in row["memory"].items())
        print(f"{name:32} {row['registers']:>4} {row['programs_per_sm']:>8} {row['barriers']:>8} "
              f"{row['conversions']:>8} {row['sass_lines']:>5}  {memory}")
    if args.json:
        args.json.write_text(json.dumps(dict(target="sm_90", triton=triton.__version__, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
