"""Host time of the engine's decode step: the Python work of Engine.step() outside the model forward
(scheduling, block tables, input tensors, sampling, outputs), on the CPU with the tiny preset.

    python benchmarks/engine_host.py            # batches 16 and 128, prompt 512

The step runs use_cuda_graph="static" (the padded step a CUDA graph captures, the path CUDA decodes
take); the forward inside is timed separately and taken off. Times are this thread's CPU time
(time.thread_time), so other processes on a shared machine do not inflate them; the forward still
runs, so sampling sees real logits.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from perf_common import environment, print_table, results_path, write_results
from nanokimi.config import ModelConfig
from nanokimi.infer import Engine, SamplingParams
from nanokimi.infer import runner as runner_module
from nanokimi.model import build_model


def host_ms(model, batch: int, prompt: int, steps: int) -> dict:
    engine = Engine(model, max_num_seqs=max(256, batch), use_cuda_graph="static", max_step_tokens=8192,
                    max_cache_tokens=batch * (prompt + steps + 64))
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(3, model.config.vocab_size, (prompt,), generator=g).tolist(),
                           SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True))
    while engine.scheduler.waiting or engine.num_waiting_prefill_tokens() > 0:
        engine.step()
    for _ in range(3):
        engine.step()
    forward = []
    replay = runner_module.StaticReplay.replay

    def timed_replay(self):
        t0 = time.thread_time()
        replay(self)
        forward.append(time.thread_time() - t0)

    runner_module.StaticReplay.replay = timed_replay
    total = []
    try:
        for _ in range(steps):
            t0 = time.thread_time()
            engine.step()
            total.append(time.thread_time() - t0)
    finally:
        runner_module.StaticReplay.replay = replay
    host = [t - f for t, f in zip(total, forward)]
    return dict(batch=batch, prompt=prompt, steps=steps, host_ms=round(statistics.median(host) * 1e3, 3),
                forward_ms=round(statistics.median(forward) * 1e3, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,128")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=512, num_layers=2, mixers="KA", max_position_embeddings=2048)
    model = build_model(cfg).eval()
    rows = [host_ms(model, int(b), args.prompt, args.steps) for b in args.batches.split(",")]
    print_table(["batch", "host ms/step", "forward ms/step"],
                [[r["batch"], r["host_ms"], r["forward_ms"]] for r in rows])
    out = results_path("engine_host", False) if args.out is None else Path(args.out)
    write_results(out, environment(torch.device("cpu")), {"tiny-KA": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
