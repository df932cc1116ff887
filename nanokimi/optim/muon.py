"""Muon with the Moonlight update scale (DESIGN.md §2.6, arXiv 2502.16982).

For each matrix W [A, B] with gradient G:
    M <- mu M + G                      momentum buffer (state["momentum_buffer"])
    U  = mu M + G if nesterov else M
    O  = NewtonSchulz(U)               ~ polar factor of U, singular values near 1
    W <- W - lr (0.2 sqrt(max(A, B)) O + wd W)
0.2 sqrt(max(A, B)) makes the update's RMS about 0.2, AdamW's typical RMS, so Muon reuses AdamW's lr and wd.
`muon_update` is this update for one stack of matrices, written out. A parameter may be cut into several matrices
(per head, per split piece, per expert: nanokimi.optim.blocks), each updated on its own.

`Muon.step` computes the same update for every block of every parameter, but executes it through
nanokimi.optim.muon_fast: one batched Newton-Schulz per block shape, compiled elementwise passes and CUDA streams
(tested equal to muon_update block by block).
"""
from collections import defaultdict

import torch

from nanokimi.ops.newton_schulz import COEFFICIENT_SETS, METHODS, coefficient_schedule, orthogonalize
from nanokimi.optim.blocks import MOONLIGHT_RMS, check_matrix_options, matrix_blocks, update_scale
from nanokimi.optim.muon_fast import ExecutionOptions, plan_key, plan_step, run_step

__all__ = ["MOONLIGHT_RMS", "Muon", "matrix_blocks", "muon_update"]


@torch.no_grad()
def muon_update(weight, grad, momentum_buffer, lr, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                coefficients="quintic", ns_dtype=torch.float32, eps=1e-7, ns_method="auto"):
    """One Muon step, in place, for a stack of matrices: weight, grad, momentum_buffer [..., A, B], each matrix on
    its own. The readable reference of what Muon.step computes per block."""
    momentum_buffer.mul_(momentum).add_(grad)  # M <- mu M + G
    update = grad + momentum * momentum_buffer if nesterov else momentum_buffer  # [..., A, B]
    orthogonal = orthogonalize(update, ns_steps, coefficients, ns_dtype, eps, ns_method)  # [..., A, B]
    weight.mul_(1 - lr * weight_decay).add_(orthogonal, alpha=-lr * update_scale(*weight.shape[-2:]))


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices (2-D, or 3-D stacked experts). See the module docstring for the update.

    Per-group options beyond the constructor's: heads (int or None), split (tuple of row sizes or None), see
    nanokimi.optim.blocks. ns_dtype is the Newton-Schulz compute dtype (None: bf16 on GPUs, fp32 on the CPU, where
    bf16 matmuls are an order of magnitude slower); eps guards the Frobenius normalisation. ns_method: "auto" (the
    Gram form where it needs fewer FLOPs, quintic only; see nanokimi.ops.newton_schulz), "classic" or "gram".

    How the step executes (constructor only; see nanokimi.optim.muon_fast; the defaults won their A/Bs, and
    OptimConfig's muon_* fields set them from a run config): fused: the two elementwise passes through
    torch.compile (None: on CUDA only; the CPU runs the same functions eagerly); combo_kernels: inductor's
    horizontal fusion for those compiled passes; side_stream, overlap_passes, stream_priorities: the CUDA streams.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                 coefficients="quintic", ns_dtype=None, eps=1e-7, heads=None, split=None, ns_method="auto",
                 fused=None, combo_kernels=True, side_stream=True, overlap_passes=True, stream_priorities=True):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(f"unknown coefficients {coefficients!r}; choose one of {COEFFICIENT_SETS}")
        for name, value in (("combo_kernels", combo_kernels), ("side_stream", side_stream),
                            ("overlap_passes", overlap_passes), ("stream_priorities", stream_priorities)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        coefficient_schedule(coefficients, ns_steps)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        coefficients=coefficients, ns_dtype=ns_dtype, eps=eps, heads=heads, split=split,
                        ns_method=ns_method)
        super().__init__(params, defaults)
        self.execution = ExecutionOptions(fused, combo_kernels, side_stream, overlap_passes, stream_priorities)
        self._step_plans = {}  # muon_fast.plan_key -> StepPlan

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("execution", ExecutionOptions())  # constructor options are not in the state dict
        self.__dict__.setdefault("_step_plans", {})
        for group in self.param_groups:
            group.setdefault("ns_method", "auto")  # state dicts saved before the option existed

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["split"] is not None:
            group["split"] = tuple(int(s) for s in group["split"])
        if group["coefficients"] not in COEFFICIENT_SETS:
            raise ValueError(f"unknown coefficients {group['coefficients']!r}; choose one of {COEFFICIENT_SETS}")
        if group["ns_method"] not in METHODS:
            raise ValueError(f"unknown ns_method {group['ns_method']!r}; choose one of {METHODS}")
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

    def last_methods(self):
        """{(rows, cols): "classic" | "gram"}: the Newton-Schulz form each block shape used in the last step."""
        return dict(getattr(self, "_last_methods", {}))

    def _plan(self, device, jobs):
        """The muon_fast.StepPlan of these (param, momentum buffer, group) jobs, made once per plan_key."""
        key = plan_key(device, jobs)
        if key not in self._step_plans:
            self._step_plans[key] = plan_step(device, jobs)
        return self._step_plans[key]

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step. A group's lr may be a float or a 0-d tensor on the params' device (the CUDA-graph
        step, nanokimi.optim.graphed, keeps it a tensor so a schedule reaches the captured kernels)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        jobs = defaultdict(list)  # device -> [(param, momentum buffer, group)]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p, buf in zip(params, self._momentum_buffers(params)):
                jobs[p.device].append((p, buf, group))
        self._last_methods = {}
        for device, device_jobs in jobs.items():
            self._last_methods.update(self._plan(device, device_jobs).methods)
            run_step(device, device_jobs, self.execution, self._plan)
        return loss
