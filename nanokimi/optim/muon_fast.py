"""How Muon's step runs fast: batched over every same-shape matrix, compiled, and spread over CUDA streams.

The update is `nanokimi.optim.muon.muon_update`'s, block by block; this module only changes how it is executed:

- **batches**: all blocks with the same shape and Newton-Schulz settings, across all parameters and groups, share
  one batched Newton-Schulz call, and Gram-form batches with the same short side s run their s x s recursion
  together (`orthogonalize_batches`, newton_schulz_group), tall and wide alike: GPT-2's qkv [2304, 768],
  fc [3072, 768] and proj [768, 3072] share every 768 x 768 product, 36 matrices per GEMM.
- **three passes over memory**: `momentum_and_stack` (reads G and M, writes M and the stacked Newton-Schulz
  inputs, one [N, rows, cols] per batch), the batched Newton-Schulz (GEMMs; the Frobenius normalisation folded
  into its first Gram matrix), and `decay_and_update` (reads W and O, writes W). On CUDA both elementwise passes
  run through torch.compile (`compiled_pass`; inductor's combo kernels fuse the per-parameter kernels
  horizontally), so each becomes a few kernels that the CUDA-graph step captures. The CPU runs them eagerly.
- **streams** (CUDA only; all forked from and joined back into the current stream, so a capture records them):
  the params whose blocks all run classic Newton-Schulz take their whole step on a side stream (side_stream);
  the others' momentum and update passes run per `PassGroup` on a second stream while their products run on a
  third (overlap_passes); the products and the passes run at a higher CUDA priority than the side stream
  (stream_priorities).
Every one of these won an A/B on an H100 (docs/muon.md, Measured); the options that lost are in docs/perf-log.md.
The plan of a step (which block goes to which batch, stream and pass group) is made once per set of shapes and
options (`plan_step`) and reused.
"""
import contextlib
import math
from typing import NamedTuple

import torch

from nanokimi.ops.newton_schulz import choose_method, coefficient_schedule, newton_schulz, newton_schulz_group
from nanokimi.optim.blocks import join_blocks, matrix_blocks, update_scale

# (Newton-Schulz products, elementwise passes, side-stream params) CUDA stream priorities; lower runs first
DEFAULT_STREAM_PRIORITIES = (-1, -1, 0)

# Inductor options of combo_kernels=True: independent kernels (one per parameter in both passes) become a few
# horizontally fused launches, up to 64 sub-kernels each (inductor's default cap is 8).
COMBO_KERNEL_OPTIONS = {"combo_kernels": True, "combo_kernel_max_num_nodes": 64}


class ExecutionOptions(NamedTuple):
    """How Muon's step is executed (Muon's constructor options of the same names; results do not depend on them
    beyond rounding). fused: the elementwise passes through torch.compile (None: on CUDA)."""
    fused: bool | None = None
    combo_kernels: bool = True
    side_stream: bool = True
    overlap_passes: bool = True
    stream_priorities: bool = True


class PassGroup(NamedTuple):
    """Params whose momentum and update passes run apart from the others' (overlap_passes): no batch mixes
    its params with other groups'. params, batch_ids: indices into the step's params and batches; batches and
    sources: the StepPlan fields for these params alone (param and batch indices local to the group)."""
    params: tuple
    batch_ids: tuple
    batches: tuple
    sources: tuple


class StepPlan(NamedTuple):
    """What the step on one device needs besides the tensors, fixed while the params with grads, their shapes
    and their groups' block and Newton-Schulz options are (plan_step)."""
    layouts: tuple  # (heads, split) per param
    batches: tuple  # ((rows, cols), dtype, ((param, block), ...)) per batch, for momentum_and_stack
    settings: tuple  # (steps, coefficients, eps, method) per batch, for orthogonalize_batches
    sources: tuple  # per param, per block (batch, start, block shape, scale), for decay_and_update
    methods: dict  # {(rows, cols): method} for Muon.last_methods
    classic_only: tuple  # indices of the params whose blocks all run classic Newton-Schulz (side_stream)
    pass_groups: tuple  # PassGroups (overlap_passes)


def plan_key(device, jobs):
    """What the step plan depends on: the device and, per (param, momentum buffer, group) job, the param's shape
    and its group's block and Newton-Schulz options (not lr, momentum or weight decay)."""
    return (device, tuple((tuple(p.shape), g["heads"], g["split"], g["ns_dtype"], g["ns_steps"], g["coefficients"],
                           g["eps"], g["ns_method"]) for p, _, g in jobs))


def plan_step(device, jobs):
    """StepPlan for these (param, buffer, group) jobs: blocks, Newton-Schulz batches (blocks of equal shape and
    settings, in first-appearance order) and where each block's result is read back."""
    batches = {}  # (NS settings, (rows, cols)) -> [(param index, block index, block shape)]
    layouts = []
    for i, (p, _, group) in enumerate(jobs):
        layouts.append((group["heads"], group["split"]))
        ns_dtype = group["ns_dtype"] or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        steps, coefficients = group["ns_steps"], group["coefficients"]
        for j, block in enumerate(matrix_blocks(p, *layouts[-1])):
            shape = tuple(block.shape[-2:])
            method = choose_method(shape, steps, group["ns_method"], coefficients)
            batches.setdefault(((ns_dtype, steps, coefficients, group["eps"], method), shape), []).append(
                (i, j, tuple(block.shape)))
    sources = [[None] * len(matrix_blocks(p, *layout)) for (p, _, _), layout in zip(jobs, layouts)]
    for k, ((_, (rows, cols)), members) in enumerate(batches.items()):
        start = 0
        for i, j, shape in members:
            sources[i][j] = (k, start, shape, update_scale(rows, cols))
            start += math.prod(shape[:-2])
    stack_batches = tuple((shape, settings[0], tuple((i, j) for i, j, _ in members))
                          for (settings, shape), members in batches.items())
    methods = [settings[-1] for settings, _ in batches]
    sources = tuple(tuple(s) for s in sources)
    return StepPlan(
        layouts=tuple(layouts),
        batches=stack_batches,
        settings=tuple(settings[1:] for settings, _ in batches),
        sources=sources,
        methods={shape: settings[-1] for settings, shape in batches},
        classic_only=tuple(i for i, param_sources in enumerate(sources)
                           if all(methods[k] == "classic" for k, *_ in param_sources)),
        pass_groups=tuple(pass_groups(stack_batches, sources)))


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
        for i, _ in members:
            root[find(i)] = find(members[0][0])
    groups = {}  # root -> batch indices, in batch order
    for k, (_, _, members) in enumerate(batches):
        groups.setdefault(find(members[0][0]), []).append(k)
    result = []
    for batch_ids in groups.values():
        params = sorted({i for k in batch_ids for i, _ in batches[k][2]})
        local_param, local_batch = {i: n for n, i in enumerate(params)}, {k: n for n, k in enumerate(batch_ids)}
        result.append(PassGroup(
            params=tuple(params), batch_ids=tuple(batch_ids),
            batches=tuple((shape, dtype, tuple((local_param[i], j) for i, j in members))
                          for shape, dtype, members in (batches[k] for k in batch_ids)),
            sources=tuple(tuple((local_batch[k], *rest) for k, *rest in sources[i]) for i in params)))
    return result


def momentum_updates(grads, bufs, momenta, nesterov):
    """M <- mu M + G in place for every buffer; returns each U = mu M + G (Nesterov) or M (not yet cast)."""
    updates = []
    for g, m, mu, nest in zip(grads, bufs, momenta, nesterov):
        m_new = torch.add(g, m, alpha=mu)  # M <- mu M + G
        m.copy_(m_new)
        updates.append(torch.add(g, m_new, alpha=mu) if nest else m_new)
    return updates


def momentum_and_stack(grads, bufs, momenta, nesterov, layouts, batches):
    """M <- mu M + G in place for every param, and the Newton-Schulz inputs stacked per batch.

    grads, bufs: [A, B] or [E, A, B] per param; momenta: floats; nesterov: bools; layouts: (heads, split) per
    param; batches: ((rows, cols), dtype, ((param index, block index), ...)) per batch.
    Returns one [N, rows, cols] tensor per batch holding U = mu M + G (Nesterov) or M, cast to dtype.
    """
    updates = momentum_updates(grads, bufs, momenta, nesterov)
    blocks = [matrix_blocks(u, *layout) for u, layout in zip(updates, layouts)]
    return [torch.cat([blocks[i][j].to(dtype).reshape(-1, rows, cols) for i, j in members])
            for (rows, cols), dtype, members in batches]


def orthogonalize_batches(stacks, settings, ready=None, finished=None):
    """Newton-Schulz of every stacked batch: stacks [N, rows, cols] in the compute dtype (raw, normalised
    inside), settings (steps, coefficients, eps, method) per batch with method resolved ("classic" or "gram").
    Gram batches with the same short side, dtype and settings go through one newton_schulz_group call (one
    s x s recursion for all their matrices); classic batches run alone. Returns the outputs in batch order.
    On CUDA, for inputs stacked and outputs read on another stream (overlap_passes): ready, per batch None
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


def decay_and_update(params, orthogonal, lrs, lr_index, decays, sources):
    """W <- W (1 - lr wd) - lr (0.2 sqrt(max(a, b)) O) in place, each block with its own scale.

    params: [A, B] or [E, A, B]; orthogonal: the [N, rows, cols] Newton-Schulz outputs per batch; lrs: one
    float or 0-d tensor per group (or a [groups] tensor); lr_index: each param's group; decays: floats per
    param; sources: per param, per block in block order (batch index, start, block shape, scale).
    """
    for w, i, wd, blocks in zip(params, lr_index, decays, sources):
        lr = lrs[i]
        pieces = [orthogonal[k][start:start + math.prod(shape[:-2])].view(shape) * (-lr * scale)
                  for k, start, shape, scale in blocks]
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


def inductor_options(combo_kernels):
    """The inductor config that compiled_pass hands torch.compile: COMBO_KERNEL_OPTIONS or combo kernels off,
    each key only where this torch's inductor has it."""
    from torch._inductor import config

    wanted = COMBO_KERNEL_OPTIONS if combo_kernels else {"combo_kernels": False}
    return {name: value for name, value in wanted.items() if hasattr(config, name)}


def compiled_pass(fn, combo_kernels=True):
    """fn through torch.compile (fullgraph, static shapes), made once per function and combo_kernels setting
    (horizontal fusion of independent kernels on/off, see inductor_options): it recompiles per new set of shapes,
    and its kernels are what a CUDA-graph capture of the step records."""
    key = (fn, bool(combo_kernels))
    if key not in _compiled:
        from nanokimi.runtime import compile_fn  # raises the recompile limit: each variant is one more graph of fn
        _compiled[key] = compile_fn(fn, fullgraph=True, dynamic=False, options=inductor_options(combo_kernels))
    return _compiled[key]


_streams = {}


def cuda_stream(device, index=0, priority=0):
    """Muon's extra CUDA streams on `device`: index 0 runs the classic-only params (side_stream), index 1 the
    momentum and update passes (overlap_passes), index 2 the Newton-Schulz products of the others
    (stream_priorities). priority: CUDA's stream priority (lower runs first; torch clamps to the device's range)."""
    key = (device, index, priority)
    if key not in _streams:
        _streams[key] = torch.cuda.Stream(device, priority=priority)
    return _streams[key]


def run_step(device, jobs, options, plan):
    """Muon's step of one device's (param, momentum buffer, group) jobs, planned by `plan(device, jobs)` (a cached
    plan_step). With stream_priorities on CUDA, all of it on a stream of the products' priority, forked from and
    joined back into the current one (CUDA graphs keep each kernel's stream priority)."""
    priorities = DEFAULT_STREAM_PRIORITIES if options.stream_priorities and device.type == "cuda" else (0, 0, 0)
    if priorities[0] == 0:
        _run_streams(device, jobs, options, plan, priorities)
        return
    current, stream = torch.cuda.current_stream(device), cuda_stream(device, 2, priorities[0])
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        _run_streams(device, jobs, options, plan, priorities)
    current.wait_stream(stream)


def _run_streams(device, jobs, options, plan, priorities):
    """With side_stream on CUDA, the classic-only params on a side stream (forked from and joined back into the
    current one), the rest on the current one."""
    if options.side_stream and device.type == "cuda":
        side = set(plan(device, jobs).classic_only)
        if 0 < len(side) < len(jobs):
            current, stream = torch.cuda.current_stream(device), cuda_stream(device, 0, priorities[2])
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                _run_passes(device, [job for i, job in enumerate(jobs) if i in side], options, plan, priorities)
            _run_passes(device, [job for i, job in enumerate(jobs) if i not in side], options, plan, priorities)
            current.wait_stream(stream)
            return
    _run_passes(device, jobs, options, plan, priorities)


def _run_passes(device, jobs, options, plan, priorities):
    """The three passes over these params (see the module docstring)."""
    step_plan = plan(device, jobs)
    compile_passes = options.fused if options.fused is not None else device.type == "cuda"
    stack = compiled_pass(momentum_and_stack, options.combo_kernels) if compile_passes else momentum_and_stack
    update = compiled_pass(decay_and_update, options.combo_kernels) if compile_passes else decay_and_update
    params, grads, bufs = [p for p, _, _ in jobs], [p.grad for p, _, _ in jobs], [m for _, m, _ in jobs]
    momenta, nesterov = [g["momentum"] for _, _, g in jobs], [g["nesterov"] for _, _, g in jobs]
    decays = [g["weight_decay"] for _, _, g in jobs]
    lrs, lr_index = group_learning_rates([g for _, _, g in jobs], device, as_tensor=compile_passes)
    if options.overlap_passes and device.type == "cuda" and len(step_plan.pass_groups) > 1:
        current, passes = torch.cuda.current_stream(device), cuda_stream(device, 1, priorities[1])
        passes.wait_stream(current)  # the grads and the lrs
        if isinstance(lrs, torch.Tensor):
            lrs.record_stream(passes)
        run_pass_groups(step_plan, stack, update, params, grads, bufs, momenta, nesterov, decays, lrs, lr_index,
                        passes)
        current.wait_stream(passes)
        return
    stacked = stack(grads, bufs, momenta, nesterov, step_plan.layouts, step_plan.batches)
    orthogonal = orthogonalize_batches(stacked, step_plan.settings)
    update(params, orthogonal, lrs, lr_index, decays, step_plan.sources)


def run_pass_groups(plan, stack, update, params, grads, bufs, momenta, nesterov, decays, lrs, lr_index, passes=None):
    """The step of a StepPlan's params with the momentum and update passes run per PassGroup (overlap_passes).
    passes: the CUDA stream they run on while the Newton-Schulz products run on the current one; each batch's
    first product then waits only for its own group's momentum pass and each group's update only for its own
    batches' last products. None: everything in order on the current stream (the CPU)."""
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
