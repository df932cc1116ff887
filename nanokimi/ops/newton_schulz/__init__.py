"""Batched Newton-Schulz orthogonalisation (the core of Muon); `naive.py` holds the one-matrix fp32 reference.

Same-shape matrices go through the iteration together. For wide X [N, s, l] (s <= l), each step is
    gram = X X^T                                  [N, s, s]   bmm
    poly = a I + b gram + c gram gram             [N, s, s]   baddbmm, then a added on the diagonal
    X    = poly X                                 [N, s, l]   bmm
Tall X [N, l, s] uses gram = X^T X and X = X poly (poly is symmetric): the same short-side cost, the
transposes are GEMM operand flags, never copies. Folding a into the small s x s poly means the big GEMM
has no additive input: baddbmm(X, poly, X, beta=a) would first copy all of X into its output, every step.
Measured on the CPU in bf16 against the fp32 reference: the direction error (off-diagonal of U^T O V) is
the same as with the unfolded form; rounding a + (poly)_ii to bf16 shifts the singular values by 2-3%,
well inside the quintic's [0.68, 1.13] band.
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
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
        X = torch.bmm(X, poly) if tall else torch.bmm(poly, X)
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
