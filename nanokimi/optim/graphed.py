"""The whole optimizer step as one CUDA graph: the CPU launches one graph instead of hundreds of kernels.

Muon's step on GPT-2-124M is a few hundred small kernels (momentum, Nesterov, normalisation, Newton-Schulz
GEMMs, decay, update); launching them costs the CPU more time than the GPU spends running them.
`CapturedStep(optimizer)` runs `warmup_steps` eager steps (they create the optimizer state), captures
`optimizer.step()` into a `torch.cuda.CUDAGraph`, and from then on replays the graph. A graph replays fixed
kernels on fixed addresses, so everything that may change between steps is kept at a fixed address:

    gradients       the graph reads the `.grad` tensors that existed at capture. `zero_grad()` zeroes them in
                    place (it never sets them to None), so backward accumulates into them. If a `.grad` was
                    replaced anyway, it is copied into the captured one before replay (one _foreach_copy_).
    learning rates  every group's lr is a 0-d fp32 device tensor inside the graph; before each replay the
                    current `group["lr"]` floats are copied into those tensors, so per-step schedules just work.

Anything else that changes (weight decay, momentum, betas, which parameters have gradients) makes the next
step capture again; `load_state_dict()` drops the graph (the state tensors are new). Muon must be the
nanokimi one (it takes tensor lrs); AdamW groups are switched to `capturable=True`. On the CPU, or when the
capture fails, `step()` is the eager step, after a one-line warning.
"""
import warnings

import torch

from nanokimi.runtime.graphs import capture, run_on_side_stream

WARMUP_STEPS = 3


def make_capturable(optimizer) -> None:
    """capturable=True on every group of `optimizer` (an OptimizerSet, a CapturedStep or one torch optimizer) that
    has the option (Adam family), with its step counters moved to the device: what a CUDA graph of the step needs."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for opt in getattr(inner, "optimizers", {"optimizer": inner}).values():
        for group in opt.param_groups:
            if "capturable" not in group or group["capturable"]:
                continue
            group["capturable"] = True
            for p in group["params"]:
                state = opt.state.get(p, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(p.device)


class CapturedStep:
    """Wraps an OptimizerSet (or one torch optimizer) and replays its step as a CUDA graph.

    Same interface as the wrapped optimizer: step(), zero_grad(), param_groups, state_dict(), load_state_dict();
    `captured` says whether the next step replays a graph.
    """

    def __init__(self, optimizer, warmup_steps=WARMUP_STEPS):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (the eager steps create the optimizer state), "
                             f"got {warmup_steps}")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.failed = None  # why capturing is off, once it is
        self.graph = None
        self.graph_key = None  # what the graph baked in; a different key means capture again
        self.graph_params = []  # params with grads at capture, in group order
        self.graph_grads = []  # their grads at capture: the addresses the graph reads
        self.graph_lrs = None  # [groups] fp32 on the device: the lrs the graph reads

    @property
    def optimizers(self):
        return getattr(self.optimizer, "optimizers", {"optimizer": self.optimizer})

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def captured(self):
        return self.graph is not None

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)
        self._drop_graph()

    def describe(self):
        return self.optimizer.describe()

    def zero_grad(self, set_to_none=True):
        """Before capture: the wrapped zero_grad. After: grads are zeroed in place (set_to_none is ignored),
        so they stay at the addresses the graph reads."""
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
            return
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._can_capture():
            self.optimizer.step()
            return loss
        self._make_adamw_capturable()  # before the key: a loaded state_dict may have switched it off
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            self.optimizer.step()
            return loss
        key = self._graph_key(params)
        if self.graph is not None and key != self.graph_key:
            self._drop_graph()
            self.eager_steps = self.warmup_steps - 1  # one eager step creates any new state, then capture again
        if self.graph is None:
            if self.eager_steps < self.warmup_steps:
                self.eager_steps += 1
                self._warmup_step()
                return loss
            if not self._capture(params, key):
                self.optimizer.step()
                return loss
        self._replay()
        return loss

    def _warmup_step(self):
        run_on_side_stream(self.optimizer.step)

    def _can_capture(self):
        if self.failed is None:
            params = [p for group in self.param_groups for p in group["params"]]
            if not torch.cuda.is_available() or not params or not all(p.is_cuda for p in params):
                self._give_up("the parameters are not all on a CUDA device")
        return self.failed is None

    def _give_up(self, reason):
        self.failed = reason
        warnings.warn(f"CapturedStep: {reason}; using the eager optimizer step", stacklevel=3)

    def _graph_key(self, params):
        """Everything the graph bakes in besides lrs: each group's other settings and which params have grads."""
        groups = tuple(tuple((name, id(value) if isinstance(value, torch.Tensor) else value)
                             for name, value in sorted(group.items()) if name not in ("params", "lr", "initial_lr"))
                       for group in self.param_groups)
        return groups, tuple(id(p) for p in params)

    def _inner_optimizers(self):
        return list(self.optimizers.values())

    def _make_adamw_capturable(self):
        make_capturable(self.optimizer)

    def _capture(self, params, key):
        """Capture one step (nothing runs during capture). Returns False, warning once, if capture fails."""
        groups = self.param_groups
        floats = [group["lr"] for group in groups]
        lrs = torch.tensor([float(lr) for lr in floats], dtype=torch.float32, device=params[0].device)  # [groups]
        known = [{id(p) for p in opt.state} for opt in self._inner_optimizers()]
        try:
            for group, lr in zip(groups, lrs):
                group["lr"] = lr
            graph = capture(self.optimizer.step, error_mode="thread_local")
        except Exception as error:
            self._forget_new_state(known)
            first_line = (str(error).splitlines() or [""])[0]
            self._give_up(f"capturing the step failed ({type(error).__name__}: {first_line})")
            return False
        finally:
            for group, lr in zip(groups, floats):
                group["lr"] = lr
        if self._forget_new_state(known):  # state created inside a graph would be re-initialised every replay
            self.eager_steps = self.warmup_steps - 1
            return False
        self.graph, self.graph_key, self.graph_lrs = graph, key, lrs
        self.graph_params, self.graph_grads = params, [p.grad for p in params]
        return True

    def _forget_new_state(self, known):
        """Drop state entries that appeared since `known` (their tensors were never written); True if any did."""
        new = False
        for opt, before in zip(self._inner_optimizers(), known):
            for p in [p for p in opt.state if id(p) not in before]:
                del opt.state[p]
                new = True
        return new

    def _replay(self):
        lrs = torch.tensor([float(group["lr"]) for group in self.param_groups], dtype=torch.float32)
        self.graph_lrs.copy_(lrs, non_blocking=True)
        grads = [p.grad for p in self.graph_params]
        moved = [(old, new) for old, new in zip(self.graph_grads, grads) if old is not new]
        if moved:
            torch._foreach_copy_([old for old, _ in moved], [new for _, new in moved])
        self.graph.replay()

    def _drop_graph(self):
        self.graph, self.graph_key, self.graph_lrs = None, None, None
        self.graph_params, self.graph_grads = [], []
