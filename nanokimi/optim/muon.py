"""Muon with the Moonlight update scale, batched over every same-shape matrix of every parameter group.

For each matrix W [A, B] with gradient G (Moonlight, arXiv 2502.16982):
    M <- mu M + G                      momentum buffer (state["momentum_buffer"])
    U  = mu M + G if nesterov else M
    O  = NewtonSchulz(U)               ~ polar factor of U, singular values near 1
    W <- W - lr (0.2 sqrt(max(A, B)) O + wd W)
0.2 sqrt(max(A, B)) makes the update's RMS about 0.2, AdamW's typical RMS, so Muon reuses AdamW's lr and wd.

A parameter is split into the matrices that get orthogonalised on their own ("blocks"):
    [A, B]                    one matrix
    [E, A, B]                 E matrices (per-expert Muon for stacked MoE experts)
    split=(a1, a2, ...)       rows cut into blocks a1, a2, ... (fused projections such as QKV); sum must be A
    heads=H                   each row block cut into H heads of A/H rows (per-head Muon for attention)
split and heads combine (split first, then heads within each piece). The scale 0.2 sqrt(max(a, b)) uses each
block's own shape, so every block's update RMS is 0.2. All blocks with the same shape [a, b] across all
parameters and groups share one batched Newton-Schulz call.
"""
import math
from collections import defaultdict

import torch

from nanokimi.ops.newton_schulz import COEFFICIENT_SETS, coefficient_schedule, newton_schulz

MOONLIGHT_RMS = 0.2


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


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices (2-D, or 3-D stacked experts). See the module docstring for the update.

    Per-group options beyond the constructor's: heads (int or None), split (tuple of row sizes or None).
    ns_dtype is the Newton-Schulz compute dtype (None: bf16 on GPUs, fp32 on the CPU, where bf16 matmuls
    are an order of magnitude slower); eps guards the Frobenius normalisation.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                 coefficients="quintic", ns_dtype=None, eps=1e-7, heads=None, split=None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(f"unknown coefficients {coefficients!r}; choose one of {COEFFICIENT_SETS}")
        coefficient_schedule(coefficients, ns_steps)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        coefficients=coefficients, ns_dtype=ns_dtype, eps=eps, heads=heads, split=split)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["split"] is not None:
            group["split"] = tuple(int(s) for s in group["split"])
        if group["coefficients"] not in COEFFICIENT_SETS:
            raise ValueError(f"unknown coefficients {group['coefficients']!r}; choose one of {COEFFICIENT_SETS}")
        for i, p in enumerate(group["params"]):
            check_matrix_options(p.shape, group["heads"], group["split"], name=f"param {i} of group "
                                 f"{len(self.param_groups) - 1}")

    def _momentum_buffers(self, params):
        """The momentum buffer of each param, created as zeros on its first step."""
        bufs = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step. A group's lr may be a float or a 0-d tensor on the params' device (the CUDA-graph
        step, nanokimi.optim.graphed, keeps it a tensor so a schedule reaches the captured kernels)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        batches = defaultdict(list)  # NS settings + block shape -> [(grad, momentum, weight blocks, group)]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = self._momentum_buffers(params)
            for p, buf in zip(params, bufs):  # one pass each; _foreach_mul_ + _foreach_add_ would read M twice
                torch.add(p.grad, buf, alpha=group["momentum"], out=buf)  # M <- mu M + G
            if group["weight_decay"] != 0:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            heads, split = group["heads"], group["split"]
            for p, buf in zip(params, bufs):
                for blocks in zip(matrix_blocks(p.grad, heads, split), matrix_blocks(buf, heads, split),
                                  matrix_blocks(p, heads, split)):
                    key = (tuple(blocks[0].shape[-2:]), p.device, group["ns_dtype"], group["ns_steps"],
                           group["coefficients"], group["eps"])
                    batches[key].append((*blocks, group))

        for ((rows, cols), device, ns_dtype, ns_steps, coefficients, eps), jobs in batches.items():
            count = sum(g.numel() // (rows * cols) for g, *_ in jobs)
            if ns_dtype is None:
                ns_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
            X = torch.empty(count, rows, cols, dtype=ns_dtype, device=device)  # [N, rows, cols]
            start = 0
            for g, m, _, group in jobs:
                n = g.numel() // (rows * cols)
                dst = X[start:start + n].view(g.shape)
                start += n
                if group["nesterov"]:
                    torch.add(g, m, alpha=group["momentum"], out=dst)  # U = mu M + G, cast to ns_dtype
                else:
                    dst.copy_(m)
            norms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)  # [N, 1, 1]
            X.mul_((norms + eps).reciprocal().to(ns_dtype))
            O = newton_schulz(X, coefficient_schedule(coefficients, ns_steps))  # [N, rows, cols]
            scale = MOONLIGHT_RMS * math.sqrt(max(rows, cols))
            start = 0
            for g, _, w, group in jobs:
                n = g.numel() // (rows * cols)
                update = O[start:start + n].view(g.shape)
                start += n
                if isinstance(group["lr"], torch.Tensor):
                    w.addcmul_(update, group["lr"] * -scale)  # the same W - lr scale O, lr read on the device
                else:
                    w.add_(update, alpha=-group["lr"] * scale)
        return loss
