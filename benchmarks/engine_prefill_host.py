"""Host time of one engine prefill step on the CPU: bench-kl-900m's layout (16 layers KDA,KDA,KDA,MLA x4,
MoE FFN) at tiny widths, so the arithmetic is negligible and what is timed is host work
(Python and operator dispatch), the part that makes a 4k-token prefill on an H100 take 175 ms of wall
for 17 ms of GPU work.

    python benchmarks/engine_prefill_host.py              # 1 x 4096, 4 x 1024, 16 x 256 tokens
    python benchmarks/engine_prefill_host.py --cprofile   # also print where the Python time goes
    python benchmarks/engine_prefill_host.py --scale 8    # 1 x 512, 4 x 128, 16 x 32, snapshots every 256
    python benchmarks/engine_prefill_host.py --device cuda --preset bench-kl-900m   # on a GPU, see below

The Engine runs with snapshot_interval 2048 (the default; --snapshot-interval) and max_step_tokens 4096; each
timed step prefills fresh prompts (no prefix hits) in one step. fla's delta rule is stood in for by one operator, taken through
the path CUDA takes (one chunk_kda call per round over the packed pieces, with cu_seqlens), since the
torch fallback the CPU would run costs far more operators than the kernel it replaces. Reported: the
step's thread CPU time (median; other processes on a shared machine do not inflate it), the operators
dispatched in one step (TorchDispatchMode), and the host syncs inside the model's forward (reads of
device values: item/tolist/bool/int, nonzero, masked_select, bool indexing, repeat_interleave without
output_size; on a GPU each one waits for the queue to drain). At 4,096 tokens the CPU's arithmetic is
still most of the step even at these widths (e.g. the 4,096 x 4,096 packed attention mask), so --scale 8
runs the same layouts at an eighth of the tokens, where the CPU time is mostly host work.

--device cuda runs the real kernels (fla, SDPA) in bf16 with no stand-ins, at the tiny widths or the full
`--preset` widths: host ms is then the wall time of the step (synchronized), and the syncs are counted by
torch.cuda.set_sync_debug_mode("warn"), each with the line that caused it. Both report the delta rule's calls
in a step (one per snapshot round, or per segment of a lone piece) and the host CPU time spent inside them: on a
GPU that is fla's Python and launches, the part of a hybrid's prefill its kernels' GPU time does not explain.
"""
import argparse
import collections
import cProfile
import pstats
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from perf_common import environment, print_table, results_path, write_results
from nanokimi.config import ModelConfig
from nanokimi.infer import Engine, SamplingParams
from nanokimi.model import build_model
from nanokimi.model import paged

CASES = {"1x4096": (1, 4096), "4x1024": (4, 1024), "16x256": (16, 256)}
# 8 experts (top 2) rather than 64 (top 6): the same operators (grouped_mm is one), far less routing arithmetic
TINY_WIDTHS = dict(vocab_size=256, hidden_size=32, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                   qk_rope_head_dim=8, v_head_dim=8, kda_num_heads=2, kda_head_dim=8, intermediate_size=32,
                   num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, max_position_embeddings=8192)
METADATA_OPS = {"aten::lift_fresh", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::chunk",
                "aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::empty_strided"}  # no kernel on a GPU
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
            "aten::unique_consecutive", "aten::item"}


def delta_rule_stand_ins(short_segments: bool = True) -> None:
    """fla's kernels (and the KDA slot kernel) replaced by one operator each (their host cost on a GPU is one
    launch), reached the way CUDA reaches them."""
    def varlen(q, k, v, g, beta, scale, initial_state, cu_seqlens, cu_seqlens_cpu):
        return v.clone(), initial_state

    def one_sequence(q, k, v, g, beta, initial_state=None, output_final_state=False):
        return v.clone(), initial_state

    def slot_kernel(q, k, v, g, beta, state, slots, scale, depths=None, rounds=1):
        return v.clone()

    paged.use_varlen_kda = lambda device: True
    paged.kda_fla_varlen_outside_compile = varlen
    paged.kda_outside_compile = one_sequence
    if short_segments:  # short segments (a prompt's last partial block) step through the slot kernel, as on CUDA
        paged.short_segment_step = lambda device: paged.kda_decode_slots_outside_compile
        paged.kda_decode_slots_outside_compile = slot_kernel


def attention_stand_in() -> None:
    """SDPA replaced by one operator of its output's shape: on a GPU it is one flash kernel, on the CPU its
    T^2 arithmetic (4096^2 scores per head) would be most of the step and hide the host work."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    torch.nn.functional.scaled_dot_product_attention = sdpa


class Counter(TorchDispatchMode):
    """Counts the operators dispatched, and those that read a device value on the host (a sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.ops, self.kernels, self.syncs, self.in_forward = 0, 0, collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not (func.is_view or func._schema.name in METADATA_OPS)
        if self.in_forward:
            name = func._schema.name
            bool_index = name == "aten::index" and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else []) or []
                if t is not None)
            no_size = name == "aten::repeat_interleave" and isinstance(args[-1] if args else None, torch.Tensor) \
                and (kwargs or {}).get("output_size") is None
            if name in SYNC_OPS or bool_index or no_size:
                self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


class DeltaRuleCalls:
    """The delta rule's calls in a step (fla's varlen call per round, or one call per segment; `chains`: rounds
    of short segments stepped by the KDA slot kernel) and the host time spent inside them (thread CPU time: the
    kernels' launches and fla's Python, not their GPU time)."""

    NAMES = ("kda_fla_varlen_outside_compile", "kda_outside_compile", "kda_decode_slots_outside_compile")

    def __init__(self):
        self.calls, self.chains, self.seconds, self.originals = 0, 0, 0.0, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = self.originals[name] = getattr(paged, name)

            def timed(*args, _fn=fn, **kwargs):
                started = time.thread_time()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.calls += 1
                    self.chains += _fn is self.originals["kda_decode_slots_outside_compile"]
                    self.seconds += time.thread_time() - started
            setattr(paged, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(paged, name, fn)


def engine_device(model) -> torch.device:
    return model.embed.weight.device


def count_step(engine: Engine, step) -> tuple[int, int, dict]:
    """(operators in one step, those of them that are not views or metadata (each a kernel launch on a GPU),
    host syncs inside the forward by kind)."""
    counter = Counter()
    model, hidden_states, tolist = engine.model, engine.model.hidden_states, torch.Tensor.tolist

    def counted_tolist(self):
        if counter.in_forward:
            counter.syncs["Tensor.tolist"] += 1
        return tolist(self)

    def forward(*args, **kwargs):
        counter.in_forward = True
        try:
            return hidden_states(*args, **kwargs)
        finally:
            counter.in_forward = False

    model.hidden_states, torch.Tensor.tolist = forward, counted_tolist
    try:
        with counter:
            step()
    finally:
        del model.hidden_states
        torch.Tensor.tolist = tolist
    return counter.ops, counter.kernels, dict(counter.syncs)


def cuda_syncs(step) -> dict:
    """The host syncs of one whole step on CUDA (the sampled tokens' read included), by the line that
    caused each."""
    where = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}"] += 1
    return dict(where)


def run_case(model, cfg, name: str, pieces: int, tokens: int, repeats: int, profile: bool, scale: int = 1,
             snapshot_interval: int = 2048) -> dict:
    cuda = engine_device(model).type == "cuda"
    tokens //= scale
    interval = snapshot_interval // scale
    engine = Engine(model, max_num_seqs=64, use_cuda_graph=False, max_step_tokens=4096, snapshot_interval=interval,
                    max_cache_tokens=4 * 4096 + 1024)
    g = torch.Generator().manual_seed(pieces)
    count = iter(range(10 ** 6))

    def step():
        for _ in range(pieces):
            engine.add_request(f"r{next(count)}", torch.randint(3, cfg.vocab_size, (tokens,), generator=g).tolist(),
                               SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter() if cuda else time.thread_time()
        engine.step()  # every prompt in one step: max_step_tokens 4096
        if cuda:
            torch.cuda.synchronize()
        took = (time.perf_counter() if cuda else time.thread_time()) - started
        if engine.has_unfinished():
            raise RuntimeError(f"{name}: the prompts did not prefill in one step")
        engine.reset_prefix_cache()
        return took

    step()
    times = [step() for _ in range(repeats)]
    with DeltaRuleCalls() as delta_rule:
        step()
    ops, kernels, syncs = count_step(engine, step)
    if cuda:
        syncs = cuda_syncs(step)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        step()
        profiler.disable()
        print(f"--- cProfile, {name} (cumulative, top 30)")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return dict(case=name if scale == 1 else f"{pieces}x{tokens}", pieces=pieces, tokens=tokens,
                snapshot_interval=interval, host_ms=round(statistics.median(times) * 1e3, 2),
                delta_rule_calls=delta_rule.calls, delta_rule_chain_calls=delta_rule.chains,
                delta_rule_host_ms=round(delta_rule.seconds * 1e3, 2),
                host_ms_min=round(min(times) * 1e3, 2), ops=ops, kernel_ops=kernels, syncs_in_forward=sum(syncs.values()),
                sync_kinds=syncs, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", help="cuda: this preset's own widths (e.g. bench-kl-900m) instead of the tiny ones")
    ap.add_argument("--scale", type=int, default=1, choices=[1, 2, 4, 8],
                    help="prompts and snapshot interval divided by this: the same step layout (pieces, snapshot "
                         "rounds) with 1/scale of the arithmetic, so the CPU time is mostly host work")
    ap.add_argument("--snapshot-interval", type=int, default=2048,
                    help="KDA snapshots every so many tokens (the engine's default 2048; 512 was the old one)")
    ap.add_argument("--short-segments", choices=["auto", "off"], default="auto",
                    help="off: a prompt's last partial block runs chunk_kda too (paged.SHORT_SEGMENTS), for the A/B")
    ap.add_argument("--label", help="the rows' name in the result file (default: the model's)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        if args.preset:
            raise SystemExit("--preset needs --device cuda (on the CPU the widths stay tiny)")
        delta_rule_stand_ins(args.short_segments != "off")
        attention_stand_in()
    paged.SHORT_SEGMENTS = args.short_segments
    cfg = ModelConfig.preset(args.preset) if args.preset else ModelConfig.preset("bench-kl-900m", **TINY_WIDTHS)
    model = build_model(cfg).eval()
    if device.type == "cuda":
        model = model.to(device, torch.bfloat16)
    rows = [run_case(model, cfg, c, *CASES[c], args.repeats, args.cprofile, args.scale, args.snapshot_interval)
            for c in args.cases.split(",")]
    time_kind = "wall ms" if device.type == "cuda" else "host ms"
    print_table(["prefill step", f"{time_kind} (median)", f"{time_kind} (min)", "operators", "not views",
                 "host syncs in forward" if device.type == "cpu" else "host syncs in step",
                 "delta-rule calls (chains)", "host ms in them"],
                [[r["case"], r["host_ms"], r["host_ms_min"], r["ops"], r["kernel_ops"], r["syncs_in_forward"],
                  f'{r["delta_rule_calls"]} ({r["delta_rule_chain_calls"]})', r["delta_rule_host_ms"]] for r in rows])
    name = "engine_prefill_host" if device.type == "cpu" else "engine_prefill_host_cuda"
    out = results_path(name, False) if args.out is None else Path(args.out)
    key = args.label or args.preset or "bench-kl-900m-tiny-widths"
    write_results(out, environment(device), {key: rows}, dict(benchmark="engine_prefill_host"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
