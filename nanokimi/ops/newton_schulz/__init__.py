"""Batched Newton-Schulz orthogonalisation (the core of Muon); `naive.py` holds the one-matrix fp32 reference.

Same-shape matrices go through the iteration together: three batched GEMMs per step, with the axpy terms
fused into the GEMM epilogue by `torch.baddbmm`. For wide X [N, a, b] (a <= b):
    gram = X X^T                                  [N, a, a]
    poly = b gram + c gram gram                   baddbmm(gram, gram, gram, beta=b, alpha=c)
    X    = a X + poly X                           baddbmm(X, poly, X, beta=a)
Tall X [N, b, a] uses gram = X^T X and X = a X + X poly: the same short-side cost with no transposed copy
(the GEMMs read transposed operands for free; elementwise kernels writing transposed views are slow).
Nothing elementwise is left between the GEMMs, so torch.compile has nothing to fuse here.
"""
import torch

from nanokimi.ops.newton_schulz.naive import COEFFICIENT_SETS, coefficient_schedule, orthogonalize_naive

__all__ = ["COEFFICIENT_SETS", "coefficient_schedule", "newton_schulz", "normalize_into", "orthogonalize",
           "orthogonalize_naive"]


def normalize_into(out, X, eps=1e-7):
    """Write X / (||X||_F + eps) (per matrix, norm in fp32) into `out` (any float dtype). X, out: [N, a, b]."""
    norms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)  # [N, 1, 1]
    torch.mul(X, (norms + eps).reciprocal(), out=out)
    return out


def newton_schulz(X, schedule):
    """X: [N, A, B], already normalised, in the compute dtype -> [N, A, B] in the same dtype.

    schedule: [(a, b, c)] per step (see coefficient_schedule). Works on the short side of either orientation.
    """
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in schedule:
        gram = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)  # [N, short, short]
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.baddbmm(X, X, poly, beta=a) if tall else torch.baddbmm(X, poly, X, beta=a)
    return X


def orthogonalize(G, steps=5, coefficients="quintic", dtype=torch.bfloat16, eps=1e-7):
    """Approximate polar factor U V^T of every matrix in G: [..., A, B] -> [..., A, B] in G's dtype.

    Each matrix is normalised by its own Frobenius norm (+ eps), iterated in `dtype` on its short side
    (X^T X for tall matrices, X X^T for wide ones), and all of them share one batched GEMM per product.
    coefficients: "quintic" (3.4445, -4.7750, 2.0315) or "polar_express" (arXiv 2505.16932, see naive.py).
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs matrices [..., A, B], got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"orthogonalize needs a floating-point tensor, got {G.dtype}")
    schedule = coefficient_schedule(coefficients, steps)
    A, B = G.shape[-2:]
    X = G.reshape(-1, A, B)
    X = normalize_into(torch.empty(X.shape, dtype=dtype, device=G.device), X, eps)  # [N, A, B]
    return newton_schulz(X, schedule).reshape(G.shape).to(G.dtype)
