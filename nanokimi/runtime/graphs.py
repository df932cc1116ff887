"""The one CUDA-graph capture helper, used by the optimizer step, the whole training step and the decode steps.

    graph = capture(fn, warmup=3)         # fn() warm-up calls on a side stream, then one recorded call
    out = graph.replay()                  # runs the recorded kernels; returns what fn() returned at capture

A graph replays fixed kernels on fixed addresses: fn must read its inputs from tensors that stay where they are
(copy new values into them) and make no host syncs. Graphs that run one after another may share a memory pool
(`pool=graph_pool()`), so their intermediate buffers are not held twice.
"""
import torch


def run_on_side_stream(fn, times: int = 1) -> None:
    """Call fn() `times` times on a side CUDA stream, ordered after and before the current stream's work, as
    CUDA graphs want before a capture: lazy initialisation (cuBLAS workspaces, optimizer state, compilation,
    autotuning) happens there and not inside the capture."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    current.wait_stream(side)


def graph_pool():
    """A memory pool handle that several captures can share (`capture(..., pool=)`)."""
    return torch.cuda.graph_pool_handle()


class CapturedGraph:
    """A recorded call: `replay()` runs it again and returns `output`, the value the call returned at capture
    (its tensors are refreshed in place by every replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, output):
        self.graph, self.output = graph, output

    def replay(self):
        self.graph.replay()
        return self.output


def capture(fn, warmup: int = 0, pool=None, error_mode: str | None = None) -> CapturedGraph:
    """Run fn() `warmup` times on a side stream (lazy initialisation, compilation, autotuning), then record one
    call into a CUDA graph (recording runs no kernels) and return it. pool: a `graph_pool()` handle to share.
    error_mode: torch.cuda.graph's capture_error_mode ("thread_local" lets other threads run CUDA calls)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device; on the CPU call the function itself.")
    if warmup:
        run_on_side_stream(fn, warmup)
    graph = torch.cuda.CUDAGraph()
    options = {"pool": pool} if pool is not None else {}
    if error_mode is not None:
        options["capture_error_mode"] = error_mode
    with torch.cuda.graph(graph, **options):
        output = fn()
    return CapturedGraph(graph, output)
