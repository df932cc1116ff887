"""Attention backend probes: which SDPA kernel a shape takes on this GPU, and whether MLA's narrower values are
padded for flash. The model's attention asks these; it holds only the maths."""
import torch
import torch.nn.functional as F


def pad_v_for_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether to zero-pad values narrower than the queries to the query head size so SDPA can take the
    flash kernel (padding adds no error: the extra output columns are dropped). Only on CUDA in half
    precision, and not where cuDNN attention runs (Hopper and newer): cuDNN takes MLA's 128-wide values
    as they are, 1.5x faster than itself on padded values and 2x faster than flash (H100, B=4, T=4096,
    8 heads; benchmarks/results/attention_backends.json)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and v.shape[-1] < q.shape[-1] <= 256):
        return False
    return not cudnn_attention_runs(q.device.index if q.device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def cudnn_attention_runs(device_index: int) -> bool:
    """cuDNN SDPA is enabled and the GPU is Hopper or newer. A constant for torch.compile (decided when
    tracing; a later torch.backends.cuda.enable_cudnn_sdp call does not reach compiled graphs)."""
    return torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(device_index)[0] >= 9


def sdpa_backend(device: torch.device, head_dim_qk: int, head_dim_v: int, dtype=torch.bfloat16) -> str:
    """The SDPA backend a causal call with these head sizes takes: try each backend alone, in the
    priority order torch uses, on a tiny input."""
    if device.type != "cuda":
        return f"SDPA ({device.type})"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if hasattr(torch._C, "_get_sdp_priority_order"):
        try:
            ranked = [SDPBackend(int(i)) for i in torch._C._get_sdp_priority_order()]
            order = [b for b in ranked if b in order] or order
        except Exception:  # noqa: BLE001 - fall back to the documented order
            pass
    q = torch.randn(1, 2, 128, head_dim_qk, device=device, dtype=dtype)
    v = torch.randn(1, 2, 128, head_dim_v, device=device, dtype=dtype)
    for backend in order:
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, v, is_causal=True)
            return backend.name.lower()
        except RuntimeError:
            continue
    return "none"


def attention_backend(device: torch.device, head_dim_qk: int, head_dim_v: int, dtype=torch.bfloat16) -> str:
    """The report for one attention shape: the SDPA backend a causal training call takes, and whether values are
    padded for flash (MLA's qk 192 / v 128 off Hopper)."""
    probe = torch.empty(1, 1, 1, head_dim_qk, device=device, dtype=dtype)
    padded = pad_v_for_flash(probe, probe[..., :head_dim_v])
    backend = sdpa_backend(device, head_dim_qk, head_dim_qk if padded else head_dim_v, dtype)
    return backend + (f" (v padded {head_dim_v}->{head_dim_qk})" if padded else "")
