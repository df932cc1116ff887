"""The matrices Muon orthogonalises ("blocks") and the update scale of each.

A parameter is cut into blocks:
    [A, B]                    one matrix
    [E, A, B]                 E matrices (per-expert Muon for stacked MoE experts)
    split=(a1, a2, ...)       rows cut into blocks a1, a2, ... (fused projections such as QKV); sum must be A
    heads=H                   each row block cut into H heads of A/H rows (per-head Muon for attention)
split and heads combine (split first, then heads within each piece). The scale 0.2 sqrt(max(a, b)) uses each
block's own shape, so every block's update RMS is 0.2.
"""
import math

import torch

MOONLIGHT_RMS = 0.2


def update_scale(rows, cols):
    """0.2 sqrt(max(rows, cols)): the factor that gives an orthogonal [rows, cols] update an RMS of about 0.2."""
    return MOONLIGHT_RMS * math.sqrt(max(rows, cols))


def matrix_blocks(t, heads=None, split=None):
    """Views of t ([A, B] or [E, A, B]) that are orthogonalised as separate matrices.

    Returns a list of views shaped [E, a, B] (no heads) or [E, H, a / H, B] (heads); E = 1 for 2-D t.
    Writing into a view writes into t.
    """
    T = t if t.ndim == 3 else t.unsqueeze(0)  # [E, A, B]
    pieces = list(T.split(list(split), dim=1)) if split else [T]
    if heads:
        pieces = [piece.unflatten(1, (heads, piece.shape[1] // heads)) for piece in pieces]
    return pieces


def join_blocks(blocks, shape):
    """Inverse of matrix_blocks: block tensors [E, a, B] or [E, H, a / H, B] -> one tensor of `shape`."""
    pieces = [b.flatten(1, 2) if b.ndim == 4 else b for b in blocks]  # [E, a_i, B]
    return (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]).reshape(shape)


def check_matrix_options(shape, heads=None, split=None, name="parameter"):
    """Raise ValueError, saying how to fix it, when `heads`/`split` cannot cut a tensor of `shape`."""
    if len(shape) not in (2, 3):
        raise ValueError(f"Muon takes 2-D [A, B] or 3-D [E, A, B] tensors; {name} has shape {tuple(shape)}. "
                         "Give 1-D/0-D and other tensors to AdamW (nanokimi.optim.build_optimizer does this).")
    rows = shape[-2]
    pieces = [rows]
    if split is not None:
        split = tuple(int(s) for s in split)
        if sum(split) != rows or any(s <= 0 for s in split):
            raise ValueError(f"split={split} must be positive sizes summing to the row count {rows} of {name} "
                             f"(shape {tuple(shape)})")
        pieces = list(split)
    if heads is not None:
        if heads < 1 or any(p % heads for p in pieces):
            raise ValueError(f"heads={heads} must divide every row block {pieces} of {name} (shape {tuple(shape)})")
