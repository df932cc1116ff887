"""Batched Newton-Schulz orthogonalisation (the core of Muon); `naive.py` holds the one-matrix fp32 reference.

Same-shape matrices go through the iteration together, on their short side s (X [N, s, l] wide; a tall
[N, l, s] uses X^T X and X poly instead, the transposes being GEMM operand flags). Two exact rewritings of
the same iteration X <- a X + b (X X^T) X + c (X X^T)^2 X, chosen per shape by FLOP count (`method="auto"`):

classic: per step
    R = X X^T;  P = a I + b R + c R^2;  X = P X            2 s^2 l + 2 s^3 + 2 s^2 l FLOPs
Folding a into the small s x s P means the big GEMM has no additive input (baddbmm(X, P, X, beta=a) would
copy all of X into its output every step). P itself is computed with the square completed:
    a I + b R + c R^2 = c (R + h I)^2 + a2 I,   h = b / (2c),   a2 = a - c h^2
so it is one GEMM, c S S with S = R + h I (beta = 0: nothing read in the epilogue), between two small ops on the
diagonals only: S is made in place on R's diagonal (saved and restored where R is read again), and a2 is added
to P's. No pass over the whole s x s matrix (before: an elementwise op C = a I + b R, then C += c R R in place).
R's diagonal (~1/s) is far below |h| (1.18 for the quintic), so rounding S_ii in bf16 loses most of it: the
diagonal op also adds back c (2 x e + e^2), e the rounding error of x = R_ii + h, which makes P's diagonal
exact up to its own rounding (tests: within one bf16 ulp; without the fix-up ~1.5 ulp). Off the diagonal, P is
rounded once instead of twice, and on the CPU the whole iteration's bf16 directions came out as close or closer
to the fp32 reference than with the elementwise op (docs/muon.md).

gram: every iterate is X_k = Q_k X_0 with Q_k a polynomial in G = X_0 X_0^T (symmetric, commuting with G).
With R_k = X_k X_k^T and P_k = a I + b R_k + c R_k^2:
    Q_{k+1} = P_k Q_k,   R_{k+1} = P_k R_k P_k,   and at the end X = Q_K X_0
so the long side l is touched by two big GEMMs (G and Q X_0) and the steps in between are s x s products.
In bf16 the s x s recursion is not stable over many steps: rounding leaves R with small negative eigenvalues
(R is a square of X, so its noise floor is u ||R|| where X's is u ||X||), and an odd polynomial's
Gram-space map lambda -> lambda p(lambda)^2 sends those away from 0 instead of to 1. So the iteration restarts
from X every `segment` steps (X = Q X_0, R = X X^T): a segment of m steps costs 4 s^2 l + 2 s^3 (4m - 3)
FLOPs (m = 1 is exactly one classic step). Measured on the CPU in bf16 (docs/muon.md): with two-step
segments (GRAM_SEGMENT) and the quintic, the singular values stay in the classic band and the direction error
is at most ~1.4x the classic bf16 one; with Polar Express (steep first polynomial) it is up to ~4x and the
largest singular value reaches 1.27 (band 1.124), so "auto" uses gram only for the quintic set. Without
restarts both sets diverge on ill-conditioned inputs (singular values in the tens or thousands).

Cross-shape batches (`newton_schulz_group`): batches of different long sides but one short side s (tall or
wide) each compute their own G = X_0 X_0^T, into slices of one [N_1 + N_2 + ..., s, s] buffer, and their own
final Q X_0; the s x s recursion in between is one batched product per step over all the matrices. A batch
of 12 matrices of 768 x 768 leaves much of an H100's last GEMM wave empty; 36 fill it better.

Normalisation folds into the first polynomial: with n = sqrt(trace(X_0 X_0^T)) + eps = ||X_0||_F + eps
(trace summed in fp32), R_0 = G / n^2, and one op (_start) reads G once and writes the one GEMM operand of
P_0 / n = c T T + a2 / n I: T = (R_0 + h I) / sqrt(n). The recursion then goes on from G itself, since
(P_0 / n) G (P_0 / n) = P_0 R_0 P_0, and Q = P_{m-1} ... P_1 (P_0 / n) carries the 1 / n, so an unnormalised X
never needs a separate pass (pass `eps`). A zero matrix stays zero (n = eps, no NaN).
"""
import torch

from nanokimi.ops.newton_schulz.naive import COEFFICIENT_SETS, coefficient_schedule, orthogonalize_naive

__all__ = ["COEFFICIENT_SETS", "GRAM_SEGMENT", "METHODS", "coefficient_schedule", "choose_method",
           "newton_schulz", "newton_schulz_flops", "newton_schulz_group", "normalize_into", "orthogonalize",
           "orthogonalize_naive"]

METHODS = ("auto", "classic", "gram")
GRAM_SEGMENT = 2  # steps between restarts of the Gram recursion (see the module docstring)


def segments(steps, segment=GRAM_SEGMENT):
    """Lengths of the Gram segments: [2, 2, 1] for 5 steps and segment 2."""
    return [min(segment, steps - start) for start in range(0, steps, segment)]


def newton_schulz_flops(shape, steps, method="classic", segment=GRAM_SEGMENT):
    """GEMM FLOPs of `steps` iterations on one matrix of `shape` ([A, B]; the short side is iterated)."""
    s, l = sorted(shape[-2:])
    if method == "classic":
        return steps * (4 * s * s * l + 2 * s**3)
    if method == "gram":
        return sum(4 * s * s * l + 2 * s**3 * (4 * m - 3) for m in segments(steps, segment))
    raise ValueError(f"unknown method {method!r}; choose 'classic' or 'gram' (or 'auto' in newton_schulz)")


def choose_method(shape, steps, method="auto", coefficients="quintic", segment=GRAM_SEGMENT):
    """'classic' or 'gram': `method` itself unless it is 'auto'; then classic for Polar Express (gram is less
    accurate there in bf16), else whichever needs fewer FLOPs (gram for l > 1.5 s with two-step segments;
    square matrices stay classic)."""
    if method not in METHODS:
        raise ValueError(f"unknown Newton-Schulz method {method!r}; choose one of {METHODS}")
    if method != "auto":
        return method
    if coefficients != "quintic":
        return "classic"
    gram = newton_schulz_flops(shape, steps, "gram", segment)
    return "gram" if gram < newton_schulz_flops(shape, steps, "classic") else "classic"


def normalize_into(out, X, eps=1e-7):
    """Write X / (||X||_F + eps) (per matrix, norm in fp32) into `out` (any float dtype). X, out: [N, a, b]."""
    norms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)  # [N, 1, 1]
    torch.mul(X, (norms + eps).reciprocal(), out=out)
    return out


_compiled_small_ops = {}
# The small ops round on purpose (x.to(bf16).to(fp32) - x is a rounding error they correct for); inductor
# otherwise drops such down-and-up casts inside a fused kernel.
SMALL_OP_OPTIONS = {"emulate_precision_casts": True}


def _small_op(fn, X):
    """fn itself, or on CUDA fn through torch.compile: each small op (the start, the diagonal shift and fix) then
    runs as one kernel instead of several eager ones. Static shapes: one graph per (N, s, dtype) and per
    coefficient triple, so the recompile limit is raised (many block shapes)."""
    if X.device.type != "cuda" or torch.compiler.is_compiling():
        return fn
    if fn not in _compiled_small_ops:
        from nanokimi.runtime import compile_fn
        _compiled_small_ops[fn] = compile_fn(fn, fullgraph=True, dynamic=False, options=SMALL_OP_OPTIONS)
    return _compiled_small_ops[fn]


def _shift(a, b, c):
    """(h, a2) with a I + b R + c R^2 = c (R + h I)^2 + a2 I (completing the square; c != 0)."""
    if c == 0:
        raise ValueError(f"Newton-Schulz polynomial ({a}, {b}, {c}) has no R^2 term; this form needs c != 0")
    h = b / (2 * c)
    return h, a - c * h * h


def _diagonal_fix(x, error, a2, c):
    """What to add to the diagonal of c S S, whose S_ii = x + error was rounded from the exact x, so that it
    equals c x^2 + a2: a2 minus c ((x + error)^2 - x^2). fp32 (fp64 for fp64 operands)."""
    return a2 - c * error * (2 * x + error)


def _start(gram, eps, h, a2, c):
    """The first polynomial of the iteration, divided by the norm, from the raw Gram matrices G [N, s, s].

    n = sqrt(trace(G)) + eps (trace summed in fp32) and R_0 = G / n^2. Returns T = (R_0 + h I) / sqrt(n) in G's
    dtype, the one GEMM operand of P_0 / n = c T T + a2 / n I, and in fp32 [N, s] what the diagonal of c T T
    needs to become that: a2 / n minus c (2 x e + e^2), for the exact x = T_ii and its rounding error e (T_ii is
    about h / sqrt(n), far larger than R_ii / sqrt(n), so its rounding loses most of R_ii). Compiled, the
    identity is an index test, G is read once and T written once."""
    wide = torch.promote_types(gram.dtype, torch.float32)
    eye = torch.eye(gram.shape[-1], dtype=wide, device=gram.device)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=wide)  # [N]
    inv = (trace.clamp_min(0).sqrt() + eps).reciprocal()[:, None, None]  # [N, 1, 1]
    exact = (gram.to(wide) * inv.square() + h * eye) * inv.sqrt()  # T in fp32
    T = exact.to(gram.dtype)
    x = exact.diagonal(dim1=-2, dim2=-1)  # [N, s]
    error = T.diagonal(dim1=-2, dim2=-1).to(wide) - x
    return T, _diagonal_fix(x, error, a2 * inv[:, :, 0], c)


def _shift_diagonal(diagonal, h, a2, c, saved=None):
    """R -> S = R + h I in place on R's diagonal [N, s] (a view; the old values copied into `saved` first when
    given). Returns fp32 [N, s]: what the diagonal of c S S needs to become a I + b R + c R^2, i.e. a2 minus
    c (2 x e + e^2) for the exact x = R_ii + h and its rounding error e in R's dtype."""
    x = diagonal.to(torch.promote_types(diagonal.dtype, torch.float32)) + h
    error = x.to(diagonal.dtype).to(x.dtype) - x
    if saved is not None:
        saved.copy_(diagonal)
    diagonal.copy_(x)
    return _diagonal_fix(x, error, a2, c)


def _fix_diagonal(diagonal, add, restore=None, saved=None):
    """P's diagonal [N, s] (a view) += add (fp32 arithmetic, in place); with `restore`, R's diagonal gets back
    the `saved` values (R + h I -> R, exactly)."""
    diagonal.copy_(diagonal.to(add.dtype) + add)
    if restore is not None:
        restore.copy_(saved)


def _polynomial(R, a, b, c, keep_R):
    """a I + b R + c R^2 [N, s, s] as c S S + a2 I with S = R + h I (_shift): one GEMM (beta = 0, so nothing is
    read in its epilogue) between two small ops on the diagonals only (_shift_diagonal, _fix_diagonal), instead
    of an elementwise pass over the whole of R. keep_R: R is needed afterwards, so its diagonal is restored."""
    h, a2 = _shift(a, b, c)
    diagonal = R.diagonal(dim1=-2, dim2=-1)
    saved = torch.empty_like(diagonal) if keep_R else None
    add = _small_op(_shift_diagonal, R)(diagonal, h, a2, c, saved)
    P = torch.baddbmm(torch.empty_like(R), R, R, beta=0, alpha=c)
    _small_op(_fix_diagonal, R)(P.diagonal(dim1=-2, dim2=-1), add, diagonal if keep_R else None, saved)
    return P


def _segment_factor(R, steps, first=None):
    """Q = P_{m-1} ... P_1 P_0 of one segment of m steps from its starting R [N, s, s] (P_k = a I + b R_k + c R_k^2,
    R_{k+1} = P_k R_k P_k). R's diagonal is shifted in place and restored where R is read again; after the last
    step it is left shifted. first: _start's (T, diagonal fix) for P_0 / n = c T T + diag; R is then the raw
    Gram matrix G (P_0 / n G P_0 / n = P_0 R_0 P_0, since G = n^2 R_0), and Q carries the 1 / n."""
    Q = None  # [N, s, s]
    for i, (a, b, c) in enumerate(steps):
        last = i == len(steps) - 1
        if i == 0 and first is not None:
            T, add = first
            P = torch.baddbmm(torch.empty_like(T), T, T, beta=0, alpha=c)
            _small_op(_fix_diagonal, R)(P.diagonal(dim1=-2, dim2=-1), add)
        else:
            P = _polynomial(R, a, b, c, keep_R=not last)
        Q = P if Q is None else torch.bmm(P, Q)
        if not last:
            R = torch.bmm(torch.bmm(P, R), P)
    return Q


def newton_schulz(X, schedule, method="auto", eps=None, segment=GRAM_SEGMENT, ready=None, finished=None):
    """X: [N, A, B] in the compute dtype -> [N, A, B] in the same dtype.

    schedule: [(a, b, c)] per step (see coefficient_schedule). eps None: X is already normalised
    (||X||_F <= 1); a float: X is raw and each matrix is divided by its ||X||_F + eps inside, at no extra
    pass. method: "classic", "gram" or "auto" (fewer FLOPs for this shape; see the module docstring; callers
    that know the coefficient set should resolve "auto" with choose_method, which keeps Polar Express classic).
    ready (None or a CUDA event to wait for first) and finished (a list that gets an event after the output is
    written): as in newton_schulz_group, for one batch.
    """
    method = choose_method(X.shape[-2:], len(schedule), method, segment=segment)
    chunk = segment if method == "gram" else 1  # classic == gram with one-step segments
    return newton_schulz_group([X], schedule, eps, segment=chunk, ready=None if ready is None else [ready],
                               finished=finished)[0]


def newton_schulz_group(Xs, schedule, eps=None, segment=GRAM_SEGMENT, ready=None, finished=None):
    """The Gram form over several batches whose matrices share their short side s: a list of [N_i, s, l_i]
    (wide) or [N_i, l_i, s] (tall) tensors, l_i >= s, one dtype -> the list of outputs (same shapes, dtype).

    Each batch computes its own Gram matrix (X X^T, or X^T X when tall), written straight into its slice of one
    [N_1 + N_2 + ..., s, s] buffer, and its own final product with X_0; the s x s recursion in between
    (polynomials, P Q, P R P) runs once over all the matrices, so every s x s product is one larger batched
    GEMM instead of one per batch. Equal to newton_schulz(X, schedule, "gram", eps, segment) on each batch.

    For callers that prepare the batches and consume the outputs on another CUDA stream (Muon's overlap_passes):
    ready, per batch None or a CUDA event that the current stream waits for before that batch's first product;
    finished, a list that gets per batch a CUDA event recorded after the product that writes its output.
    """
    if not Xs:
        raise ValueError("newton_schulz_group needs at least one batch [N, A, B]")
    s = min(Xs[0].shape[-2:])
    for X in Xs:
        if X.ndim != 3 or min(X.shape[-2:]) != s or X.dtype != Xs[0].dtype or X.device != Xs[0].device:
            raise ValueError(f"newton_schulz_group needs [N, A, B] batches with one short side, dtype and device; "
                             f"got {[(tuple(X.shape), X.dtype, str(X.device)) for X in Xs]}. Group the batches by "
                             "min(A, B), dtype and device, or call newton_schulz per batch.")
    sizes = [X.shape[0] for X in Xs]
    tall = [X.shape[-2] > X.shape[-1] for X in Xs]
    gram = Xs[0].new_empty(sum(sizes), s, s)  # every batch's Gram matrices, one batch after another
    for start in range(0, len(schedule), segment):
        for i, (X, G, is_tall) in enumerate(zip(Xs, gram.split(sizes), tall)):
            if start == 0 and ready is not None and ready[i] is not None:
                torch.cuda.current_stream(X.device).wait_event(ready[i])
            torch.bmm(X.mT, X, out=G) if is_tall else torch.bmm(X, X.mT, out=G)
        first = None
        if start == 0 and eps is not None:
            first = _small_op(_start, gram)(gram, eps, *_shift(*schedule[0]), schedule[0][2])
        Q = _segment_factor(gram, schedule[start:start + segment], first)  # [sum N_i, s, s]
        last = start + segment >= len(schedule)
        outputs = []
        for X, q, is_tall in zip(Xs, Q.split(sizes), tall):
            outputs.append(torch.bmm(X, q) if is_tall else torch.bmm(q, X))
            if last and finished is not None:
                finished.append(torch.cuda.Event())
                finished[-1].record(torch.cuda.current_stream(X.device))
        Xs = outputs
    return Xs


def orthogonalize(G, steps=5, coefficients="quintic", dtype=torch.bfloat16, eps=1e-7, method="auto"):
    """Approximate polar factor U V^T of every matrix in G: [..., A, B] -> [..., A, B] in G's dtype.

    Each matrix is normalised by its own Frobenius norm (+ eps), iterated in `dtype` on its short side
    (X^T X for tall matrices, X X^T for wide ones), and all of them share one batched GEMM per product.
    coefficients: "quintic" (3.4445, -4.7750, 2.0315) or "polar_express" (arXiv 2505.16932, see naive.py).
    method: "classic", "gram" or "auto" (see newton_schulz).
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs matrices [..., A, B], got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"orthogonalize needs a floating-point tensor, got {G.dtype}")
    schedule = coefficient_schedule(coefficients, steps)
    A, B = G.shape[-2:]
    X = G.reshape(-1, A, B).to(dtype)  # [N, A, B]
    method = choose_method((A, B), steps, method, coefficients)
    return newton_schulz(X, schedule, method, eps=eps).reshape(G.shape).to(G.dtype)
