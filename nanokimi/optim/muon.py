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
block's own shape, so every block's update RMS is 0.2.

All blocks with the same shape and Newton-Schulz settings, across all parameters and groups, share one batched
Newton-Schulz call. Gram-form batches with the same short side s then run their s x s recursion together
(`orthogonalize_batches`, newton_schulz_group), tall and wide alike: GPT-2's qkv [2304, 768], fc [3072, 768] and
proj [768, 3072] share every 768 x 768 product, 36 matrices per GEMM. With merge_orientations=True, blocks of
equal sides {s, l} also share one batch (the polar factor of X^T is the transpose of X's: the minority
orientation is stacked transposed, `plan_batches`); off by default, because on an H100 the transposed writes
of the momentum pass cost more than the larger batch saves (GPT-2-124M set: 3.67 ms per captured step with it).

A step is three passes over memory: `momentum_and_stack` (reads G and M, writes M and the stacked bf16
Newton-Schulz inputs, one [N, rows, cols] per batch), the batched Newton-Schulz (GEMMs; the Frobenius
normalisation is folded into its first Gram matrix), and `decay_and_update` (reads W and O, writes W). Both
elementwise passes are plain eager functions; on CUDA they run through torch.compile (fullgraph, static
shapes), compiled on the first step, so each becomes a few fused kernels that the CUDA-graph step captures.
On CUDA the step spreads over three streams (all forked from and joined back into the current one): the params
that run classic Newton-Schulz alone take their whole step on one (side_stream), and the two elementwise passes
of the others run per `PassGroup` on another while their Newton-Schulz products run on a third (overlap_passes),
so memory-bound passes and GEMMs run side by side. The products and the passes run at a higher CUDA stream
priority than the side stream (stream_priorities).
"""
import contextlib
import math
from collections import defaultdict
from typing import NamedTuple

import torch

from nanokimi.ops.newton_schulz import (COEFFICIENT_SETS, METHODS, choose_method, coefficient_schedule, newton_schulz,
                                       newton_schulz_group)

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


def join_blocks(blocks, shape):
    """Inverse of matrix_blocks: block tensors [E, a, B] or [E, H, a / H, B] -> one tensor of `shape`."""
    pieces = [b.flatten(1, 2) if b.ndim == 4 else b for b in blocks]  # [E, a_i, B]
    return (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]).reshape(shape)


def momentum_updates(grads, bufs, momenta, nesterov):
    """M <- mu M + G in place for every buffer; returns each U = mu M + G (Nesterov) or M (not yet cast)."""
    updates = []
    for g, m, mu, nest in zip(grads, bufs, momenta, nesterov):
        m_new = torch.add(g, m, alpha=mu)  # M <- mu M + G
        m.copy_(m_new)
        updates.append(torch.add(g, m_new, alpha=mu) if nest else m_new)
    return updates


def plan_batches(blocks, merge_orientations=False):
    """Which blocks share a Newton-Schulz batch, and in which orientation each is stacked.

    blocks: (settings, (rows, cols), count) per block (count matrices of that shape; settings: anything hashable,
    e.g. dtype and the Newton-Schulz options). Blocks with equal settings and equal shapes form one batch. With
    merge_orientations, equal sides {short, long} suffice: the batch is stacked as [N, rows, cols] in the
    orientation (tall or wide) that most of its elements have, and the others go in transposed (the polar
    factor of X^T is the transpose of X's).
    Returns [(settings, (rows, cols), [(block index, transposed), ...])] per batch, in first-appearance order.
    """
    batches = {}  # (settings, sides) -> [(block index, is tall, elements)]
    for index, (settings, (rows, cols), count) in enumerate(blocks):
        sides = (min(rows, cols), max(rows, cols)) if merge_orientations else (rows, cols)
        batches.setdefault((settings, sides), []).append((index, rows > cols, count * rows * cols))
    plan = []
    for (settings, (a, b)), members in batches.items():
        if not merge_orientations:
            plan.append((settings, (a, b), [(index, False) for index, _, _ in members]))
            continue
        tall_elements = sum(n for _, is_tall, n in members if is_tall)
        tall = 2 * tall_elements > sum(n for _, _, n in members)  # a tie stays wide
        plan.append((settings, (b, a) if tall else (a, b), [(index, is_tall != tall) for index, is_tall, _ in members]))
    return plan


def squares_to_gram(blocks, free):
    """With Muon(group_squares=True): blocks as plan_batches takes them, settings ending in the resolved method;
    free: per block, whether that method was chosen by "auto" for the quintic (FLOPs alone, no accuracy reason).
    A free square s x s block that runs classic switches to gram when some gram block has short side s and the
    same other settings, so `orthogonalize_batches` runs it inside that block's s x s recursion: every s x s
    product then is one GEMM over all of them (GPT-2: 48 matrices instead of 36 + a classic batch of 12), at
    34 s^3 instead of 30 s^3 FLOPs over five steps (segments 2-2-1) for the squares. Returns the blocks, some
    switched."""
    gram_sides = {(settings[:-1], min(shape)) for settings, shape, _ in blocks if settings[-1] == "gram"}
    joins = [is_free and settings[-1] == "classic" and shape[0] == shape[1] and (settings[:-1], shape[0]) in gram_sides
             for (settings, shape, _), is_free in zip(blocks, free)]
    return [((*settings[:-1], "gram"), shape, count) if join else (settings, shape, count)
            for (settings, shape, count), join in zip(blocks, joins)]


_side_streams = {}


def side_stream(device, index=0, priority=0):
    """Muon's extra CUDA streams on `device`: index 0 runs the classic-only params (side_stream=True), index 1 the
    momentum and update passes (overlap_passes=True), index 2 the Newton-Schulz products of the others
    (stream_priorities). priority: CUDA's stream priority (lower runs first; torch clamps to the device's range)."""
    key = (device, index, priority)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device, priority=priority)
    return _side_streams[key]


# Muon(stream_priorities=True): (Newton-Schulz products, elementwise passes, side-stream params) priorities
DEFAULT_STREAM_PRIORITIES = (-1, -1, 0)


def check_stream_priorities(priorities):
    """The (products, passes, side) priority triple that stream_priorities stands for: None when off."""
    if priorities is None or priorities is False:
        return None
    if priorities is True:
        return DEFAULT_STREAM_PRIORITIES
    if (not isinstance(priorities, (tuple, list)) or len(priorities) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in priorities)):
        raise ValueError(f"stream_priorities must be True, False/None or three ints (Newton-Schulz products, "
                         f"elementwise passes, side-stream params; lower runs first, 0 is the default), "
                         f"got {priorities!r}")
    return tuple(priorities)


class PassGroup(NamedTuple):
    """Params whose momentum and update passes run apart from the others' (Muon's overlap_passes): no batch mixes
    its params with other groups'. params, batch_ids: indices into the step's params and batches; batches and
    sources: the StepPlan fields for these params alone (param and batch indices local to the group)."""
    params: tuple
    batch_ids: tuple
    batches: tuple
    sources: tuple


def pass_groups(batches, sources):
    """The finest PassGroups of a step: params joined when one batch holds blocks of both. batches, sources: as in
    StepPlan. Groups in the order of their first batch."""
    root = list(range(len(sources)))  # union-find over params

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for _, _, members in batches:
        for i, _, _ in members:
            root[find(i)] = find(members[0][0])
    groups = {}  # root -> batch indices, in batch order
    for k, (_, _, members) in enumerate(batches):
        groups.setdefault(find(members[0][0]), []).append(k)
    result = []
    for batch_ids in groups.values():
        params = sorted({i for k in batch_ids for i, _, _ in batches[k][2]})
        local_param, local_batch = {i: n for n, i in enumerate(params)}, {k: n for n, k in enumerate(batch_ids)}
        result.append(PassGroup(
            params=tuple(params), batch_ids=tuple(batch_ids),
            batches=tuple((shape, dtype, tuple((local_param[i], j, t) for i, j, t in members))
                          for shape, dtype, members in (batches[k] for k in batch_ids)),
            sources=tuple(tuple((local_batch[k], *rest) for k, *rest in sources[i]) for i in params)))
    return result


def orthogonalize_batches(stacks, settings, ready=None, finished=None):
    """Newton-Schulz of every stacked batch: stacks [N, rows, cols] in the compute dtype (raw, normalised
    inside), settings (steps, coefficients, eps, method) per batch with method resolved ("classic" or "gram").
    Gram batches with the same short side, dtype and settings go through one newton_schulz_group call (one
    s x s recursion for all their matrices); classic batches run alone. Returns the outputs in batch order.
    On CUDA, for inputs stacked and outputs read on another stream (Muon's overlap_passes): ready, per batch None
    or an event to wait for before its first product; finished, a list of one entry per batch that gets the
    event recorded after the batch's output is written."""
    outputs = [None] * len(stacks)
    ready = [None] * len(stacks) if ready is None else ready
    groups = {}  # (short side, dtype, steps, coefficients, eps) -> indices of gram batches
    for k, (X, (steps, coefficients, eps, method)) in enumerate(zip(stacks, settings)):
        if method == "gram":
            groups.setdefault((min(X.shape[-2:]), X.dtype, steps, coefficients, eps), []).append(k)
        else:
            events = None if finished is None else []
            outputs[k] = newton_schulz(X, coefficient_schedule(coefficients, steps), method, eps=eps,
                                       ready=ready[k], finished=events)
            if events:
                finished[k] = events[0]
    for (_, _, steps, coefficients, eps), members in groups.items():
        events = None if finished is None else []
        group_outputs = newton_schulz_group([stacks[k] for k in members], coefficient_schedule(coefficients, steps),
                                            eps=eps, ready=[ready[k] for k in members], finished=events)
        for n, (k, O) in enumerate(zip(members, group_outputs)):
            outputs[k] = O
            if events:
                finished[k] = events[n]
    return outputs


def momentum_and_stack(grads, bufs, momenta, nesterov, layouts, batches):
    """M <- mu M + G in place for every param, and the Newton-Schulz inputs stacked per batch.

    grads, bufs: [A, B] or [E, A, B] per param; momenta: floats; nesterov: bools; layouts: (heads, split) per
    param; batches: ((rows, cols), dtype, ((param index, block index, transposed), ...)) per batch.
    Returns one [N, rows, cols] tensor per batch holding U = mu M + G (Nesterov) or M, cast to dtype; a
    transposed member's blocks are stored as their transposes.
    """
    updates = momentum_updates(grads, bufs, momenta, nesterov)
    blocks = [matrix_blocks(u, *layout) for u, layout in zip(updates, layouts)]
    return [torch.cat([(blocks[i][j].mT if transposed else blocks[i][j]).to(dtype).reshape(-1, rows, cols)
                       for i, j, transposed in members])
            for (rows, cols), dtype, members in batches]


def decay_and_update(params, orthogonal, lrs, lr_index, decays, sources):
    """W <- W (1 - lr wd) - lr (0.2 sqrt(max(a, b)) O) in place, each block with its own scale.

    params: [A, B] or [E, A, B]; orthogonal: the [N, rows, cols] Newton-Schulz outputs per batch; lrs: one
    float or 0-d tensor per group (or a [groups] tensor); lr_index: each param's group; decays: floats per
    param; sources: per param, per block in block order (batch index, start, block shape, scale, transposed).
    """
    for w, i, wd, blocks in zip(params, lr_index, decays, sources):
        lr = lrs[i]
        pieces = []
        for k, start, shape, scale, transposed in blocks:
            O = orthogonal[k][start:start + math.prod(shape[:-2])]  # [n, rows, cols]
            pieces.append((O.mT if transposed else O).view(shape) * (-lr * scale))
        w.copy_(w * (1 - lr * wd) + join_blocks(pieces, w.shape))


def group_learning_rates(job_groups, device, as_tensor):
    """The distinct param groups of `job_groups` (one group per job, in job order): (lrs, lr_index), lr_index
    giving each job's position in lrs. as_tensor: lrs as one fp32 tensor on `device` (what the compiled passes
    take, so schedules change values, never the compiled code), float or 0-d tensor lrs alike; on CUDA copied
    from pinned memory without blocking (a plain host-to-device copy would wait for the GPU's queued work)."""
    groups = list({id(g): g for g in job_groups}.values())
    position = {id(g): k for k, g in enumerate(groups)}
    lrs = [g["lr"] for g in groups]
    if as_tensor:
        if any(isinstance(lr, torch.Tensor) for lr in lrs):
            lrs = torch.stack([torch.as_tensor(lr, dtype=torch.float32, device=device) for lr in lrs])
        elif device.type == "cuda":
            lrs = torch.tensor(lrs, dtype=torch.float32, pin_memory=True).to(device, non_blocking=True)
        else:
            lrs = torch.tensor(lrs, dtype=torch.float32, device=device)
    return lrs, tuple(position[id(g)] for g in job_groups)


_compiled = {}

# Inductor options of combo_kernels=True: independent kernels (one per parameter in both passes) become a few
# horizontally fused launches, up to 64 sub-kernels each (inductor's default cap is 8).
COMBO_KERNEL_OPTIONS = {"combo_kernels": True, "combo_kernel_max_num_nodes": 64}


def inductor_options(combo_kernels):
    """The inductor config that compiled_pass hands torch.compile: {} for None (inductor's own settings),
    combo_kernels False, or COMBO_KERNEL_OPTIONS, each key only where this torch's inductor has it."""
    if combo_kernels is None:
        return {}
    from torch._inductor import config

    wanted = COMBO_KERNEL_OPTIONS if combo_kernels else {"combo_kernels": False}
    return {name: value for name, value in wanted.items() if hasattr(config, name)}


def compiled_pass(fn, combo_kernels=None):
    """fn through torch.compile (fullgraph, static shapes), made once per function and combo_kernels option
    (None: inductor's settings; True/False: horizontal fusion of independent kernels on/off, see
    inductor_options): it recompiles per new set of shapes, and its kernels are what a CUDA-graph capture of the
    step records."""
    key = (fn, combo_kernels)
    if key not in _compiled:
        from nanokimi.runtime import raise_recompile_limits
        raise_recompile_limits()  # every variant (shapes, options, momentum values) is one more graph of fn
        options = inductor_options(combo_kernels)
        _compiled[key] = torch.compile(fn, fullgraph=True, dynamic=False, **({"options": options} if options else {}))
    return _compiled[key]


def run_pass_groups(plan, stack, update, params, grads, bufs, momenta, nesterov, decays, lrs, lr_index, passes=None):
    """The step of a StepPlan's params with the momentum and update passes run per PassGroup (Muon's
    overlap_passes). passes: the CUDA stream they run on while the Newton-Schulz products run on the current
    one; each batch's first product then waits only for its own group's momentum pass and each group's update
    only for its own batches' last products. None: everything in order on the current stream (the CPU)."""
    current = None if passes is None else torch.cuda.current_stream(passes.device)
    on_passes = (lambda: torch.cuda.stream(passes)) if passes is not None else contextlib.nullcontext
    stacked, ready = [None] * len(plan.batches), [None] * len(plan.batches)
    for group in plan.pass_groups:
        pick = lambda values: [values[i] for i in group.params]  # noqa: E731
        with on_passes():
            outputs = stack(pick(grads), pick(bufs), pick(momenta), pick(nesterov), pick(plan.layouts),
                            group.batches)
            stacked_event = None
            if passes is not None:
                stacked_event = torch.cuda.Event()
                stacked_event.record(passes)
        for k, X in zip(group.batch_ids, outputs):
            if passes is not None:
                X.record_stream(current)  # made on the pass stream, read on the current one
            stacked[k], ready[k] = X, stacked_event
    finished = None if passes is None else [None] * len(plan.batches)
    orthogonal = orthogonalize_batches(stacked, plan.settings, ready, finished)
    for group in plan.pass_groups:
        with on_passes():
            if passes is not None:
                for k in group.batch_ids:
                    passes.wait_event(finished[k])
                    orthogonal[k].record_stream(passes)  # made on the current stream, read on the pass stream
            update([params[i] for i in group.params], [orthogonal[k] for k in group.batch_ids], lrs,
                   [lr_index[i] for i in group.params], [decays[i] for i in group.params], group.sources)


class StepPlan(NamedTuple):
    """What Muon's step on one device needs besides the tensors, fixed while the params with grads, their shapes
    and their groups' block and Newton-Schulz options are (Muon._plan_step)."""
    layouts: tuple  # (heads, split) per param
    batches: tuple  # ((rows, cols), dtype, ((param, block, transposed), ...)) per batch, for momentum_and_stack
    settings: tuple  # (steps, coefficients, eps, method) per batch, for orthogonalize_batches
    sources: tuple  # per param, per block (batch, start, block shape, scale, transposed), for decay_and_update
    methods: dict  # {(rows, cols): method} for last_methods
    classic_only: tuple  # indices of the params whose blocks all run classic Newton-Schulz (Muon's side_stream)
    pass_groups: tuple  # PassGroups (Muon's overlap_passes)


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices (2-D, or 3-D stacked experts). See the module docstring for the update.

    Per-group options beyond the constructor's: heads (int or None), split (tuple of row sizes or None).
    ns_dtype is the Newton-Schulz compute dtype (None: bf16 on GPUs, fp32 on the CPU, where bf16 matmuls
    are an order of magnitude slower); eps guards the Frobenius normalisation. ns_method: "auto" (the Gram
    form where it needs fewer FLOPs, quintic only; see nanokimi.ops.newton_schulz), "classic" or "gram".
    fused: run the two elementwise passes through torch.compile (None: on CUDA only; the CPU runs the same
    functions eagerly). merge_orientations: batch tall and wide blocks of equal sides together, one of them
    stacked transposed (see the module docstring; off by default, slower on an H100). group_squares: square
    blocks that "auto" runs classic join the Gram recursion of the gram blocks with their side (squares_to_gram;
    same result to rounding, +1/6 of the squares' FLOPs, fuller GEMMs). combo_kernels: with fused passes, None
    keeps inductor's settings, True/False turns its horizontal fusion of the per-parameter kernels on/off
    (compiled_pass; on by default: 3.20 vs 3.36 ms per captured GPT-2-124M step on an H100). side_stream: on
    CUDA, the params whose blocks all run classic Newton-Schulz (GPT-2's square attn-out matrices) take their whole
    step (momentum, Newton-Schulz, update) on a second stream, beside the rest: two independent chains of kernels
    that fill each other's gaps and last GEMM waves (_step_device; on by default: 3.08 vs 3.22 ms).
    overlap_passes: on CUDA, the momentum and update passes run per PassGroup (for GPT-2: qkv, fc, proj) on one
    more stream, so the Newton-Schulz products of one batch start as soon as its own inputs are stacked and each
    group's update runs while the next batches' last products do (_run_overlapped).
    stream_priorities: on CUDA, CUDA stream priorities (lower runs first) for the three chains of kernels: True
    (DEFAULT_STREAM_PRIORITIES), False/None (all at the current stream's), or (products, passes, side) ints. When
    SMs free up, the GPU starts the waiting blocks of the higher-priority stream first, so the Newton-Schulz
    products, the longest chain, are not held up behind the side stream's GEMMs (_step_device).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                 coefficients="quintic", ns_dtype=None, eps=1e-7, heads=None, split=None, ns_method="auto",
                 fused=None, merge_orientations=False, group_squares=False, combo_kernels=True,
                 side_stream=True, overlap_passes=True, stream_priorities=True):
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
                        coefficients=coefficients, ns_dtype=ns_dtype, eps=eps, heads=heads, split=split,
                        ns_method=ns_method)
        super().__init__(params, defaults)
        self.fused = fused
        self.merge_orientations = merge_orientations
        self.group_squares = group_squares
        self.combo_kernels = combo_kernels
        self.side_stream = side_stream
        self.overlap_passes = overlap_passes
        self.stream_priorities = check_stream_priorities(stream_priorities)
        self._step_plans = {}  # Muon._plan_key -> StepPlan

    def __setstate__(self, state):
        super().__setstate__(state)
        for name, default in (("fused", None), ("merge_orientations", False), ("group_squares", False),
                              ("combo_kernels", True), ("side_stream", True),
                              ("overlap_passes", True), ("stream_priorities", DEFAULT_STREAM_PRIORITIES)):
            self.__dict__.setdefault(name, default)  # constructor options are not in Optimizer's pickled state
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
            self._step_device(device, device_jobs)
        return loss

    def _plan_key(self, device, jobs):
        """What the step plan depends on: the device, the constructor's batching options, and per param with a
        grad its shape and its group's block and Newton-Schulz options (not lr, momentum or weight decay)."""
        return (device, self.merge_orientations, self.group_squares,
                tuple((tuple(p.shape), g["heads"], g["split"], g["ns_dtype"], g["ns_steps"], g["coefficients"],
                       g["eps"], g["ns_method"]) for p, _, g in jobs))

    def _plan_step(self, device, jobs):
        """StepPlan for these (param, buffer, group) jobs: blocks, Newton-Schulz batches and where each block's
        result is read back."""
        blocks = []  # (NS settings, (rows, cols), count) per block
        free = []  # per block: whether "auto" chose its method on FLOPs alone (squares_to_gram)
        owners = []  # (param index, block index, block shape) per block
        layouts = []
        for i, (p, _, group) in enumerate(jobs):
            layouts.append((group["heads"], group["split"]))
            ns_dtype = group["ns_dtype"] or (torch.float32 if device.type == "cpu" else torch.bfloat16)
            steps, coefficients = group["ns_steps"], group["coefficients"]
            for j, block in enumerate(matrix_blocks(p, *layouts[-1])):
                shape = tuple(block.shape[-2:])
                method = choose_method(shape, steps, group["ns_method"], coefficients)
                blocks.append(((ns_dtype, steps, coefficients, group["eps"], method), shape,
                               math.prod(block.shape[:-2])))
                free.append(group["ns_method"] == "auto" and coefficients == "quintic")
                owners.append((i, j, tuple(block.shape)))
        if self.group_squares:
            blocks = squares_to_gram(blocks, free)
        plan = plan_batches(blocks, self.merge_orientations)
        sources = [[None] * len(matrix_blocks(p, *layout)) for (p, _, _), layout in zip(jobs, layouts)]
        for k, (_, (rows, cols), members) in enumerate(plan):
            start, scale = 0, MOONLIGHT_RMS * math.sqrt(max(rows, cols))
            for b, transposed in members:
                i, j, shape = owners[b]
                sources[i][j] = (k, start, shape, scale, transposed)
                start += math.prod(shape[:-2])
        batches = tuple((shape, settings[0], tuple((*owners[b][:2], transposed) for b, transposed in members))
                        for settings, shape, members in plan)
        sources = tuple(tuple(s) for s in sources)
        return StepPlan(
            layouts=tuple(layouts),
            batches=batches,
            settings=tuple(settings[1:] for settings, _, _ in plan),
            sources=sources,
            methods={shape: settings[-1] for settings, shape, _ in blocks},
            classic_only=tuple(i for i, param_sources in enumerate(sources)
                               if all(plan[k][0][-1] == "classic" for k, *_ in param_sources)),
            pass_groups=tuple(pass_groups(batches, sources)))

    def _step_device(self, device, jobs):
        """The step of one device's params. With stream_priorities on CUDA, all of it on a stream of the products'
        priority, forked from and joined back into the current one (so a CUDA-graph capture records it; graphs keep
        each kernel's stream priority)."""
        products = self._priority(0) if device.type == "cuda" else 0
        if products == 0:
            self._step_streams(device, jobs)
            return
        current, stream = torch.cuda.current_stream(device), side_stream(device, 2, products)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self._step_streams(device, jobs)
        current.wait_stream(stream)

    def _priority(self, chain):
        """The CUDA stream priority of chain 0 (Newton-Schulz products), 1 (passes) or 2 (side stream); 0 when
        stream_priorities is off."""
        return self.stream_priorities[chain] if self.stream_priorities else 0

    def _step_streams(self, device, jobs):
        """With side_stream on CUDA, the classic-only params on the second stream (forked from and joined back into
        the current one)."""
        if self.side_stream and device.type == "cuda":
            side = set(self._plan(device, jobs).classic_only)
            if 0 < len(side) < len(jobs):
                current, stream = torch.cuda.current_stream(device), side_stream(device, 0, self._priority(2))
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    self._run_passes(device, [job for i, job in enumerate(jobs) if i in side])
                self._run_passes(device, [job for i, job in enumerate(jobs) if i not in side])
                current.wait_stream(stream)
                return
        self._run_passes(device, jobs)

    def _plan(self, device, jobs):
        """The StepPlan of these jobs, made once per _plan_key."""
        key = self._plan_key(device, jobs)
        if key not in self._step_plans:
            self._step_plans[key] = self._plan_step(device, jobs)
        return self._step_plans[key]

    def _run_passes(self, device, jobs):
        """The three passes over these params (see the module docstring)."""
        plan = self._plan(device, jobs)
        self._last_methods.update(plan.methods)
        compile_passes = self.fused if self.fused is not None else device.type == "cuda"
        stack = compiled_pass(momentum_and_stack, self.combo_kernels) if compile_passes else momentum_and_stack
        update = compiled_pass(decay_and_update, self.combo_kernels) if compile_passes else decay_and_update
        params, grads, bufs = [p for p, _, _ in jobs], [p.grad for p, _, _ in jobs], [m for _, m, _ in jobs]
        momenta, nesterov = [g["momentum"] for _, _, g in jobs], [g["nesterov"] for _, _, g in jobs]
        decays = [g["weight_decay"] for _, _, g in jobs]
        lrs, lr_index = group_learning_rates([g for _, _, g in jobs], device, as_tensor=compile_passes)
        if self.overlap_passes and device.type == "cuda" and len(plan.pass_groups) > 1:
            self._run_overlapped(device, plan, stack, update, params, grads, bufs, momenta, nesterov, decays, lrs,
                                 lr_index, self._priority(1))
            return
        stacked = stack(grads, bufs, momenta, nesterov, plan.layouts, plan.batches)
        orthogonal = orthogonalize_batches(stacked, plan.settings)
        update(params, orthogonal, lrs, lr_index, decays, plan.sources)

    @staticmethod
    def _run_overlapped(device, plan, stack, update, params, grads, bufs, momenta, nesterov, decays, lrs, lr_index,
                        priority=0):
        """overlap_passes: run_pass_groups with the passes on a second stream (of that priority), forked from and
        joined back into the current one."""
        current, passes = torch.cuda.current_stream(device), side_stream(device, 1, priority)
        passes.wait_stream(current)  # the grads and the lrs
        if isinstance(lrs, torch.Tensor):
            lrs.record_stream(passes)
        run_pass_groups(plan, stack, update, params, grads, bufs, momenta, nesterov, decays, lrs, lr_index, passes)
        current.wait_stream(passes)
