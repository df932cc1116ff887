"""Speculative verify steps of a KDA hybrid: eager (num_verify_slots=0, the path before issue #27's graphed KDA
verify) against the graphed decode step (each draft a chain of one-token rows, states in scratch slots), beside
plain decoding, on one device.

    python benchmarks/kda_verify.py                  # CUDA: the tiny preset (KDA + MLA + MoE), bf16, CUDA graphs
    python benchmarks/kda_verify.py --compile        # the same with the graphed step torch.compiled
    python benchmarks/kda_verify.py --smoke          # CPU: a smaller tiny model, use_cuda_graph="static"

Per batch (sequences): a plain greedy run, then the same requests with drafts taken from that run (--drafts
right: every draft accepted, the adaptive draft length stays at --draft; partly: the first half right), verified
eagerly and in the graph step. Every engine generates twice and the second pass is timed (the first captures
the graphs of every shape it meets). Columns: steps and ms per step of the timed pass, generated tokens/s,
verify rows graphed (of all), and the share of sequences whose tokens equal the plain run's (1.0 in exact
arithmetic; in bf16 a near-tie may flip one). Writes benchmarks/results/kda_verify.json.
"""
import argparse
import time
from pathlib import Path

import torch

from perf_common import environment, print_table, results_path, sync, write_results
from nanokimi.config import ModelConfig
from nanokimi.infer import Engine, SamplingParams
from nanokimi.model import build_model

SMOKE = dict(hidden_size=64, num_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             kda_num_heads=2, kda_head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
             num_experts_per_tok=2, vocab_size=512)


class ReferenceDrafter:
    """Drafts the plain run's continuation ("right") or its first half and then other tokens ("partly")."""

    def __init__(self, reference: dict[str, list[int]], kind: str, vocab: int):
        self.reference, self.kind, self.vocab = reference, kind, vocab

    def track(self, seq):
        pass

    observe = release = track

    def propose(self, seq, limit):
        truth = self.reference[seq.request.request_id.split(":")[1]][seq.num_output:seq.num_output + limit]
        if self.kind == "right":
            return truth
        half = (len(truth) + 1) // 2
        return truth[:half] + [(t + 1) % self.vocab for t in truth[half:]]


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int, device) -> tuple[dict, float, int, str]:
    """Two passes of the same greedy requests; the second is timed: (tokens by request, seconds, steps, verify
    rows graphed of all in that pass)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for tag in ("warm", "timed"):
        for i, ids in enumerate(prompts):
            engine.add_request(f"{tag}:{i}", ids, params)
        out, steps, before = {}, 0, dict(engine.runner.verify_rows)
        sync(device)
        started = time.perf_counter()
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    out[o.request_id.split(":")[1]] = o.outputs[0].token_ids
            steps += 1
        sync(device)
        seconds = time.perf_counter() - started
        engine.reset_prefix_cache()
    graphed, eager = (engine.runner.verify_rows[k] - before[k] for k in ("graphed", "eager"))
    return out, seconds, steps, f"{graphed}/{graphed + eager}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, a smaller tiny model, static graph buffers")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", default=None, help="sequences per run (default 16,64,256; smoke 4,16)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128 (smoke 24)")
    ap.add_argument("--draft", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--drafts", default="right", choices=["right", "partly"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the graphed step (the engine's CUDA "
                    "default; off here: compiling every bucket of nine engines takes minutes)")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    batches = [int(b) for b in (args.batches or ("4,16" if args.smoke else "16,64,256")).split(",")]
    max_tokens = args.max_tokens or (24 if args.smoke else 128)
    cfg = ModelConfig.preset(args.preset, **(SMOKE if args.smoke else {}))
    torch.manual_seed(0)
    model = build_model(cfg).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    graphs = "static" if device.type == "cpu" else "auto"
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(3, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(batch)]
        cache = batch * (args.prompt + max_tokens + 2 * args.draft + 32)
        options = dict(max_num_seqs=batch, use_cuda_graph=graphs, compile=args.compile, max_cache_tokens=cache)
        plain, seconds, steps, _ = generate(Engine(model, **options), prompts, max_tokens, device)
        rows.append(dict(batch=batch, path="plain decode", steps=steps, seconds=seconds, verify_graphed=None,
                         equal_to_plain=1.0))
        for path, slots in (("verify eager", 0), ("verify graphed", None)):
            engine = Engine(model, **options, num_speculative_tokens=args.draft, num_verify_slots=slots,
                            speculative=ReferenceDrafter(plain, args.drafts, cfg.vocab_size))
            out, seconds, steps, verify = generate(engine, prompts, max_tokens, device)
            rows.append(dict(batch=batch, path=path, steps=steps, seconds=seconds, verify_graphed=verify,
                             equal_to_plain=sum(out[k] == plain[k] for k in plain) / len(plain),
                             scratch_slots=engine.num_scratch_slots))
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        row["ms_per_step"] = round(1e3 * row["seconds"] / row["steps"], 3)
        row["tokens_per_s"] = round(row["batch"] * max_tokens / row["seconds"], 1)
    print_table(["batch", "path", "steps", "ms/step", "tokens/s", "verify graphed", "equal to plain"],
                [[r["batch"], r["path"], r["steps"], r["ms_per_step"], r["tokens_per_s"], r["verify_graphed"],
                  r["equal_to_plain"]] for r in rows])
    out = results_path("kda_verify", args.smoke) if args.out is None else Path(args.out)
    name = f"{args.preset}{'-smoke' if args.smoke else ''} drafts {args.drafts} of {args.draft}"
    write_results(out, environment(device), {name: rows},
                  dict(prompt=args.prompt, max_tokens=max_tokens, dtype=str(next(model.parameters()).dtype),
                       compile=args.compile))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
