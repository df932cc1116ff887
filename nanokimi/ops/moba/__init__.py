"""Mixture of Block Attention (MoBA, arXiv 2502.13189): one dispatch over the naive, efficient and flex paths."""
import torch

from .efficient import block_means, moba_attention_efficient, select_history_blocks
from .naive import moba_attention_naive, moba_mask_naive

IMPLS = ("auto", "naive", "efficient", "flex")


def _flex_available():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def moba_backend(device, block_size=None):
    """Which path impl="auto" takes on `device` -> (name, reason)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "efficient", f"{device.type}: FlexAttention has no backward off CUDA; packed torch path"
    if not _flex_available():
        return "efficient", f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if block_size is not None and block_size % 128:
        return "efficient", f"block_size={block_size} is not a multiple of 128, which the flex kernel needs"
    return "flex", "CUDA with FlexAttention: block-sparse compiled kernels"


def _check(q, k, v, block_size, topk, q_offset, impl):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"moba_attention wants q [B, Tq, H, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv]; "
                         f"got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    B, Tq, H, Dk = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != Dk:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share [B, Tk, Hkv] and k must have "
                         f"q's batch {B} and head dim {Dk}.")
    if H % k.shape[2]:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={k.shape[2]} (GQA).")
    if k.shape[1] != q_offset + Tq:
        raise ValueError(f"keys must cover every position up to the last query: Tk={k.shape[1]} but "
                         f"q_offset + Tq = {q_offset} + {Tq}; pass the whole cache and q_offset = its length - Tq.")
    if block_size < 1 or topk < 1 or q_offset < 0:
        raise ValueError(f"need block_size >= 1, topk >= 1 and q_offset >= 0; got {block_size}, {topk}, {q_offset}.")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {IMPLS}.")


def moba_attention(q, k, v, *, block_size, topk, scale=None, q_offset=0, impl="auto"):
    """MoBA: causal attention where each query sees its own block plus its top-(topk - 1) earlier key blocks,
    ranked by <q, mean key of the block>.

    q: [B, Tq, H, Dk] at absolute positions q_offset .. q_offset + Tq - 1; k: [B, Tk, Hkv, Dk] and
    v: [B, Tk, Hkv, Dv] at 0 .. Tk - 1 with Tk = q_offset + Tq. Returns [B, Tq, H, Dv] in q's dtype.
    scale defaults to Dk ** -0.5. impl: "auto" (flex on CUDA, else efficient), "naive", "efficient", "flex".
    """
    _check(q, k, v, block_size, topk, q_offset, impl)
    if impl == "auto":
        impl = moba_backend(q.device, block_size)[0]
    kwargs = dict(block_size=block_size, topk=topk, scale=scale, q_offset=q_offset)
    if impl == "naive":
        return moba_attention_naive(q, k, v, **kwargs)
    if impl == "efficient":
        return moba_attention_efficient(q, k, v, **kwargs)
    from .flex import moba_attention_flex
    return moba_attention_flex(q, k, v, **kwargs)


__all__ = ["moba_attention", "moba_backend", "moba_attention_naive", "moba_attention_efficient", "moba_mask_naive",
           "block_means", "select_history_blocks"]
