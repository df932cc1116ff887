"""The Trainer's step, and the choice of how it runs: the fastest path that is valid for the run, picked once.

    plan = choose_step(run, device, world_size)   # StepPlan: compile? whole-step CUDA graph? optimizer graph?
    model, optimizer = build_model_and_optimizer(run, device, plan)
    step = TrainStep(model, optimizer, run, plan, device, plan_loss(model, plan))
    loss = step(batches, lr_factor)               # one optimizer step over grad_accum micro batches -> 0-d tensor

`nanokimi train` (nanokimi.train.trainer.Trainer) and `benchmarks/train_step.py` both build their step here, so
the benchmark times the user's step. The paths, fastest first (docs/performance.md has the measurements):

    graph      CUDA, one process, fixed-shape batches: the whole step (forward, backward, gradient clipping, the
               optimizer, the router-bias update, QK-Clip) is recorded once in a CUDA graph and replayed, so the
               CPU issues one launch per step. The first WARMUP_STEPS steps run the same function eagerly on a
               side stream (compilation and autotuning happen there), the next is recorded and replayed.
    compiled   CUDA otherwise: the compiled model, eager step; with one process Muon's step is still one graph
               (optim.cuda_graph, nanokimi.optim.CapturedStep).
    eager      the CPU (and MPS): the model as written.

All three run the same function (`TrainStep.body`), so their numbers are the same up to kernel choice.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from nanokimi.config import ConfigError
from nanokimi.model import build_model
from nanokimi.model.attn_res import set_attnres_kernels
from nanokimi.model.moe import update_router_bias
from nanokimi.runtime.attnres import AttnResKernels
from nanokimi.runtime.graphs import capture, run_on_side_stream
from nanokimi.train.config import RunConfig

WARMUP_STEPS = 3
WHOLE_LOSS_BYTES = 4 << 30  # the loss in one piece (no recompute) while a micro batch's fp32 logits are at most a
# tenth of the GPU's memory (this many bytes where the size is not known)


@dataclass(kw_only=True)
class StepPlan:
    """How the step runs. compile: the model through nanokimi.train.fast.compile_model; graph: the whole step as
    one CUDA graph; optimizer_graph: the optimizer step alone as one (CapturedStep); loss_chunk: model.loss's
    chunk_tokens (0 = one piece); reasons: why a faster path was not taken."""
    device: str
    compile: bool
    graph: bool
    optimizer_graph: bool
    loss_chunk: int
    reasons: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "graph" if self.graph else "compiled" if self.compile else "eager"

    def describe(self) -> str:
        """One line for the `paths:` report, e.g. `step=graph (compiled, whole step in one CUDA graph, loss in one
        piece)` or `step=eager (cpu: compile and CUDA graphs are for CUDA)`."""
        parts = ["compiled" if self.compile else "not compiled"]
        if self.graph:
            parts.append("whole step in one CUDA graph")
        elif self.optimizer_graph:
            parts.append("optimizer step in one CUDA graph")
        parts.append("loss in one piece" if self.loss_chunk == 0 else f"loss in chunks of {self.loss_chunk} tokens")
        return f"step={self.name} ({', '.join(parts + self.reasons)})"


def _setting(value, name: str) -> bool | None:
    """True / False as set, None for "auto"."""
    if value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name}={value!r} must be true, false or auto.")


def choose_step(run: RunConfig, device: torch.device | str, world_size: int = 1, fixed_batches: bool = True,
                cuda: bool | None = None, memory: int | None = None) -> StepPlan:
    """The fastest valid path for `run` on `device`. train.compile / train.cuda_graph / optim.cuda_graph set to
    true or false are obeyed (true where invalid is an error); "auto" (the default) takes each where it is valid.
    fixed_batches: the step's batches always have one shape and the loss is model.loss (pretraining; not SFT's
    packed conversations). cuda: whether CUDA is usable (default: torch.cuda.is_available(); tests pass a fake);
    memory: the GPU's bytes (default: asked of the device)."""
    device = torch.device(device)
    t, o = run.train, run.optim
    on_cuda = device.type == "cuda" and (torch.cuda.is_available() if cuda is None else cuda)
    want_compile = _setting(t.compile, "train.compile")
    want_graph = _setting(t.cuda_graph, "train.cuda_graph")
    want_opt_graph = _setting(o.cuda_graph, "optim.cuda_graph")
    reasons = []
    compile_on = want_compile if want_compile is not None else on_cuda and fixed_batches
    blockers = []
    if not on_cuda:
        blockers.append(f"{device.type}: compile and CUDA graphs are for CUDA")
    if world_size > 1:
        blockers.append(f"{world_size} processes: the sharded step talks to the other ranks")
    if not fixed_batches:
        blockers.append("batches change shape (packed conversations)")
    if want_graph and blockers:
        raise ConfigError(f"train.cuda_graph=true cannot run here ({'; '.join(blockers)}); set train.cuda_graph="
                            "auto or false.")
    graph = want_graph if want_graph is not None else not blockers
    if not graph and want_graph is None:
        reasons.extend(blockers)
    if want_opt_graph and world_size > 1:
        raise ConfigError("optim.cuda_graph=true works in a single process only (the sharded step talks "
                            "to the other ranks); set optim.cuda_graph=false for multi-GPU runs.")
    if graph and want_opt_graph:
        raise ConfigError("optim.cuda_graph=true graphs the optimizer step alone, but the whole step is one CUDA "
                            "graph already (train.cuda_graph); set one of them to false or auto.")
    optimizer_graph = want_opt_graph if want_opt_graph is not None else (
        on_cuda and world_size == 1 and not graph and fixed_batches)
    micro_batch = t.batch_size // t.grad_accum // max(world_size, 1)
    if memory is None and on_cuda and cuda is None:
        memory = torch.cuda.get_device_properties(device).total_memory
    budget = memory // 10 if memory else WHOLE_LOSS_BYTES
    whole_loss = on_cuda and fixed_batches and micro_batch * t.seq_len * run.model.vocab_size * 4 <= budget
    return StepPlan(device=device.type, compile=compile_on, graph=graph, optimizer_graph=optimizer_graph,
                    loss_chunk=0 if whole_loss else 8192, reasons=reasons)


def build_model_and_optimizer(run: RunConfig, device: torch.device, plan: StepPlan, world_size: int = 1,
                              start_from=None):
    """The run's model (initial weights, `start_from(model)` for fine-tuning, sharded over ranks, compiled as the
    plan says) and its optimizer (Muon + AdamW by default; wrapped in CapturedStep for the optimizer graph), with
    QK-Clip's max-logit recording on when optim.qk_clip. Returns (model, optimizer)."""
    from nanokimi.optim import build_optimizer
    from nanokimi.optim.qk_clip import enable_qk_clip_recording

    t, o = run.train, run.optim
    model = build_model(run.model, device=device)
    set_attnres_kernels(model, AttnResKernels(storage=t.attn_res_storage, fuse_norm=t.attn_res_fuse_norm))
    if start_from is not None:
        start_from(model)
    if world_size > 1:
        from nanokimi.train.distributed import shard_model
        shard_model(model, device, reshard_after_forward=t.fsdp_reshard,
                    reduce_dtype=torch.bfloat16 if t.fsdp_reduce_dtype == "bf16" else torch.float32)
    model.train()
    if plan.compile:
        from nanokimi.train.fast import compile_model
        compile_model(model, fullgraph=device.type == "cuda")  # CPU fp32 MoE has a graph break
    optimizer = build_optimizer(model, name=o.name, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2),
                                momentum=o.momentum, muon_execution=o.muon_execution())
    if plan.optimizer_graph:
        from nanokimi.optim import CapturedStep
        optimizer = CapturedStep(optimizer)  # QK-Clip and router-bias updates stay in place, outside
    if o.qk_clip:
        enable_qk_clip_recording(model)
    return model, optimizer


def plan_loss(model, plan: StepPlan):
    """The pretraining loss as the plan runs it: (inputs, targets) -> model.loss with the plan's chunking."""
    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model.loss(inputs, targets, chunk_tokens=plan.loss_chunk)
    return loss


class TrainStep:
    """One optimizer step: the learning rate from the schedule, forward + backward over the micro batches, the
    gradients' mean over ranks, clipping, the optimizer, the router-bias update and QK-Clip; returns the mean
    loss as a 0-d device tensor (read it after the step is queued). With plan.graph the step is recorded once and
    replayed (see the module docstring); `graphed` says whether the next call replays."""

    def __init__(self, model, optimizer, run: RunConfig, plan: StepPlan, device: torch.device, loss_fn,
                 world_size: int = 1, warmup_steps: int = WARMUP_STEPS):
        self.model, self.optimizer, self.run, self.plan = model, optimizer, run, plan
        self.device, self.world_size = torch.device(device), world_size
        self.loss_fn = loss_fn  # the micro batch's arguments -> its loss (plan_loss(model, plan) for pretraining)
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.graph = None
        self.failed: str | None = None  # why the whole-step graph is off, once it is
        self.inputs: list[tuple[torch.Tensor, ...]] | None = None  # the tensors the graph reads each batch from
        # [groups] fp32 on the device: the lrs a graphed step reads
        self.lrs = torch.zeros(len(optimizer.param_groups), dtype=torch.float32, device=self.device)

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def autocast(self):
        if self.device.type == "cuda":  # no weight-cast cache: a captured step must cast inside the graph
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.plan.graph)
        return torch.autocast("cpu", enabled=False)

    def set_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def __call__(self, batches: list[tuple[torch.Tensor, ...]], factor: float) -> torch.Tensor:
        """batches: grad_accum micro batches, each the arguments of the loss; factor: the schedule's lr factor."""
        self.set_lr(factor)
        if not self.plan.graph or self.failed is not None:
            return self.body(batches)
        self._fill_inputs(batches)
        if self.graph is None and self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            result = []
            run_on_side_stream(lambda: result.append(self._with_tensor_lrs(self.body, self.inputs)))
            return result[0]
        if self.graph is None and not self._capture():
            return self.body(self.inputs)
        self._copy_lrs()
        return self.graph.replay()

    def body(self, batches) -> torch.Tensor:
        """The step itself, as every path runs it."""
        t, o = self.run.train, self.run.optim
        total = torch.zeros((), device=self.device)
        for batch in batches:
            with self.autocast():
                loss = self.loss_fn(*batch)
            (loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        if self.world_size > 1:
            import torch.distributed as dist

            from nanokimi.train.distributed import sync_step_statistics
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
            sync_step_statistics(self.model)
        if t.grad_clip > 0:
            from nanokimi.train.distributed import clip_grad_norm_
            clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if o.router_bias_rate > 0:
            update_router_bias(self.model, o.router_bias_rate)
        if o.qk_clip:
            from nanokimi.optim.qk_clip import clip_heads_
            clip_heads_(self.model, o.qk_clip_tau)
        return total

    def _fill_inputs(self, batches) -> None:
        if self.inputs is None:
            self.inputs = [tuple(x.clone() for x in batch) for batch in batches]
            return
        if len(batches) != len(self.inputs) or any(x.shape != y.shape for b, s in zip(batches, self.inputs)
                                                   for x, y in zip(b, s)):
            raise ValueError("a CUDA-graphed step needs batches of one shape; set train.cuda_graph=false.")
        for batch, static in zip(batches, self.inputs):
            for x, y in zip(static, batch):
                x.copy_(y, non_blocking=True)

    def _with_tensor_lrs(self, fn, *args):
        """fn(*args) with every group's lr a 0-d tensor of self.lrs (filled from the floats the schedule set),
        as the graph reads them; the floats are back in place afterwards."""
        from nanokimi.optim.graphed import make_capturable

        if self.device.type == "cuda":
            make_capturable(self.optimizer)
        groups = self.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        self._copy_lrs()
        try:
            for group, lr in zip(groups, self.lrs):
                group["lr"] = lr
            return fn(*args)
        finally:
            for group, lr in zip(groups, floats):
                group["lr"] = lr

    def _capture(self) -> bool:
        """Record the step (nothing runs) and replay it as this step. False, after one warning, if it fails."""
        if self.device.type == "cuda":  # the graph gets its own memory pool: hand back what the warm-up cached
            torch.cuda.empty_cache()
        try:
            graph = self._with_tensor_lrs(capture, lambda: self.body(self.inputs), 0, None, "thread_local")
        except Exception as error:  # noqa: BLE001 - the eager step computes the same thing
            first_line = (str(error).splitlines() or [""])[0]
            self.failed = f"capturing the whole step failed ({type(error).__name__}: {first_line})"
            warnings.warn(f"TrainStep: {self.failed}; running the step without the graph.", stacklevel=3)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.graph = graph
        return True

    def _copy_lrs(self) -> None:
        """Copy the schedule's float lrs into the tensors the graph reads."""
        self.lrs.copy_(torch.tensor([float(g["lr"]) for g in self.optimizer.param_groups], dtype=torch.float32),
                       non_blocking=True)
