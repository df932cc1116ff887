"""Speed machinery that knows nothing of the model (it sits below ops and model and never imports them):

    compile.py    the one place that calls torch.compile and sets dynamo's limits
    graphs.py     the one CUDA-graph capture helper (warm-up on a side stream, capture, memory pool, replay)
    rows.py       FSDP2's Shard(0) row arithmetic (attention's QK-Clip and distributed Muon)
    attention.py  attention backend probes (cuDNN / flash / SDPA backend reports)
    attnres.py    Attention Residuals kernel settings
    host.py       Python lists to CPU tensors fast (the engine's per-step inputs); the start-up GC freeze
"""
from nanokimi.runtime.compile import compile_fn, raise_recompile_limits

__all__ = ["compile_fn", "raise_recompile_limits"]
