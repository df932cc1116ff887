"""Newton-Schulz orthogonalisation of one matrix, fp32, written out plainly: the reference for the batched form.

Given G [A, B] with SVD U S V^T, the iteration pushes every singular value of X = G / ||G||_F towards 1
by applying an odd polynomial p(x) = a x + b x^3 + c x^5 to the singular values:
    X <- a X + b (X X^T) X + c (X X^T)^2 X
so the result approximates the polar factor U V^T. Working on the short side (X X^T is min(A, B) square)
keeps the cost at O(min(A, B)^2 max(A, B)).
"""
import torch

QUINTIC = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower; arXiv 2505.16932), Algorithm 1, degree 5: one polynomial per
# iteration, optimal in the sup norm for singular values in [1e-3, 1]. Iterations past the eighth repeat the last.
POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01
COEFFICIENT_SETS = ("quintic", "polar_express")


def _shrink(abc, s):
    """Coefficients of x -> p(x / s): the same polynomial applied to singular values shrunk by s."""
    a, b, c = abc
    return (a / s, b / s**3, c / s**5)


def coefficient_schedule(coefficients="quintic", steps=5):
    """The (a, b, c) used at each of `steps` iterations, as a list of tuples of floats.

    "quintic": Keller Jordan's (3.4445, -4.7750, 2.0315) every step; singular values end in about [0.7, 1.2].
    "polar_express": the paper's Algorithm 1 exactly: every polynomial but the last divided by the safety factor
    1.01 (p(x / 1.01)), and the paper's extra 1.01 in the input normalisation (X / (1.01 ||X||_F)) folded into
    the first polynomial, so the input is normalised by ||X||_F alone like the quintic set.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if coefficients == "quintic":
        return [QUINTIC] * steps
    if coefficients == "polar_express":
        safe = [_shrink(abc, POLAR_EXPRESS_SAFETY) for abc in POLAR_EXPRESS_RAW[:-1]] + [POLAR_EXPRESS_RAW[-1]]
        schedule = [safe[min(i, len(safe) - 1)] for i in range(steps)]
        schedule[0] = _shrink(schedule[0], POLAR_EXPRESS_SAFETY)
        return schedule
    raise ValueError(f"unknown coefficients {coefficients!r}; choose one of {COEFFICIENT_SETS}")


def orthogonalize_naive(G, steps=5, coefficients="quintic", eps=1e-7):
    """G: [A, B] -> approximate polar factor [A, B], fp32, one matrix at a time."""
    if G.ndim != 2:
        raise ValueError(f"orthogonalize_naive takes one matrix [A, B], got shape {tuple(G.shape)}")
    X = G.float()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T  # [B, A]: iterate on the short side
    X = X / (torch.linalg.matrix_norm(X) + eps)
    for a, b, c in coefficient_schedule(coefficients, steps):
        gram = X @ X.T  # [short, short]
        X = a * X + b * (gram @ X) + c * (gram @ (gram @ X))
    return X.T if tall else X
