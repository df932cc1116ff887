"""Muon for FSDP2-sharded parameters: every matrix is orthogonalised once, by one owner rank.

Parameters are DTensors sharded on dim 0 over a 1-D mesh (FSDP2's layout: rank r holds rows
[r c, (r + 1) c) with c = ceil(rows / world), the last ranks possibly fewer or none). Per step:
    1. on every shard, in one fused pass: M <- mu M + G and U = mu M + G (nesterov) cast to the Newton-Schulz
       dtype, packed in send order (the momentum buffer lives on the shard, as a DTensor beside its parameter)
    2. one all-to-all sends each shard of U to the rank that owns the whole matrix; owners are assigned greedily,
       largest matrices first, to the rank with the least work so far
    3. each owner runs the batched Newton-Schulz over its matrices, with the same blocks and batches as Muon
       (per-head, split, per-expert; nanokimi.optim.muon_fast)
    4. a second all-to-all sends each rank the rows of O that match its shard; then one fused
       pass: W <- W (1 - lr wd) - lr 0.2 sqrt(max(a, b)) O
Besides the all-to-alls, every data movement is one of four passes over flat buffers: pack (step 1),
`unpack_owned` (shards -> whole matrices -> Newton-Schulz batches), `pack_returns` (results -> per-rank rows)
and `decay_and_apply` (step 4); on CUDA each runs through torch.compile (`fused=None` default; Muon's option),
so the host issues a few calls per step, not a few per matrix. Owners, sizes, offsets and batches are
planned once per set of parameters and options. So the Newton-Schulz work is split over ranks, never
repeated, and the result is the single-process Muon's. Two all-to-alls per step, no other collective.
(Cutting the matrices into several all-to-alls, so that communication overlaps Newton-Schulz, measured slower:
docs/perf-log.md.)
"""
import math
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanokimi.ops.newton_schulz import choose_method
from nanokimi.optim.blocks import MOONLIGHT_RMS, join_blocks, matrix_blocks
from nanokimi.optim.muon import Muon
from nanokimi.optim.muon_fast import compiled_pass, group_learning_rates, momentum_updates, orthogonalize_batches
from nanokimi.runtime.rows import shard_rows


def row_segments(shape, heads=None, split=None):
    """(start, stop, update scale) along a matrix's rows (dim -2): each split piece is cut into blocks of
    piece / heads rows, all of `cols` columns, so its scale is 0.2 sqrt(max(piece / heads, cols))."""
    cols, start = shape[-1], 0
    for piece in split or (shape[-2],):
        block_rows = piece // heads if heads else piece
        yield start, start + piece, MOONLIGHT_RMS * math.sqrt(max(block_rows, cols))
        start += piece


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each matrix: largest first, each to the rank with the least total size so far."""
    load, owners = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


class _Job:
    """One matrix parameter in the plan: its global shape, each rank's rows, its group and who owns the whole
    matrix."""

    def __init__(self, param, group, world):
        self.group = group
        self.shape = tuple(param.shape)  # global [A, B] or [E, A, B]
        self.row_numel = math.prod(self.shape[1:])
        self.rows = [shard_rows(self.shape[0], world, r) for r in range(world)]
        self.owner = 0

    def numel_of(self, rank):
        start, stop = self.rows[rank]
        return (stop - start) * self.row_numel


class _StepPlan(NamedTuple):
    """What one step needs, fixed while the parameters and their options are: the job indices in send order
    (owner by owner), the all-to-all sizes, the static layouts of `unpack_owned` and `pack_returns` (empty when
    this rank owns no matrix), the Newton-Schulz settings of each batch, and per job (offset, local shape,
    segments) for decay_and_apply."""
    send_order: tuple
    send_sizes: tuple
    recv_sizes: tuple
    unpack_layout: tuple  # (jobs, batches) for unpack_owned
    pack_layout: tuple  # jobs for pack_returns
    batch_settings: tuple  # per batch: (ns steps, coefficients, eps, method resolved for the shape)
    update_layout: tuple


class DistributedMuon(Muon):
    """Muon over DTensor parameters sharded on dim 0 (FSDP2). Same options and update as Muon; built by
    nanokimi.optim.build_optimizer when the model's parameters are DTensors.

    The step's layout (owners, sizes, offsets, batches) is planned once per set of parameters and options and
    reused, and every data movement besides the two all-to-alls is one of four passes over flat buffers
    (pack, unpack, pack returns, apply), compiled on CUDA, so the host issues a few calls per step instead of
    a few per matrix."""

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self._plans = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries_by_dtype = defaultdict(list)  # ns dtype -> [(param, group)]
        for group in self.param_groups:
            ns_dtype = group["ns_dtype"]
            for p in group["params"]:
                if p.grad is not None:
                    dtype = ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                    entries_by_dtype[dtype].append((p, group))
        for dtype, entries in entries_by_dtype.items():
            self._step_entries(entries, dtype)
        return loss

    @staticmethod
    def _check_layout(p, mesh):
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError("DistributedMuon takes DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2's "
                             f"fully_shard); got {type(p).__name__} {getattr(p, 'placements', '')}. Use Muon for "
                             "plain tensors.")
        if mesh is not None and p.device_mesh != mesh:
            raise ValueError("DistributedMuon needs all its parameters on one device mesh.")
        return p.device_mesh

    def _step_entries(self, entries, dtype):
        """Steps 1-4 (module docstring) for the (param, group) entries of one Newton-Schulz dtype."""
        key = (dtype, tuple((id(p), id(g), g["heads"], g["split"], g["ns_steps"], g["coefficients"],
                             g["eps"], g["ns_method"]) for p, g in entries))
        if key not in self._plans:
            self._plans[key] = self._plan(entries)
        plan, mesh = self._plans[key]
        group = mesh.get_group()
        buffers = [m.to_local() for m in self._momentum_buffers([p for p, _ in entries])]
        fused, combo = self.execution.fused, self.execution.combo_kernels
        fused = fused if fused is not None else entries[0][0].device.type == "cuda"
        pack = compiled_pass(momentum_and_pack, combo) if fused else momentum_and_pack
        unpack = compiled_pass(unpack_owned, combo) if fused else unpack_owned
        pack_back = compiled_pass(pack_returns, combo) if fused else pack_returns
        apply = compiled_pass(decay_and_apply, combo) if fused else decay_and_apply
        send = pack([p.grad.to_local() for p, _ in entries], buffers, [g["momentum"] for _, g in entries],
                    [g["nesterov"] for _, g in entries], plan.send_order, dtype)
        received = send.new_empty(sum(plan.recv_sizes))
        dist.all_to_all_single(received, send, list(plan.recv_sizes), list(plan.send_sizes), group=group)
        back = received.new_empty(0)
        if plan.pack_layout:  # this rank owns matrices
            inputs = unpack(received, plan.unpack_layout)  # [N, rows, cols] per batch, not yet normalised
            back = pack_back(orthogonalize_batches(inputs, plan.batch_settings), plan.pack_layout)
        orthogonal = received.new_empty(sum(plan.send_sizes))
        dist.all_to_all_single(orthogonal, back, list(plan.send_sizes), list(plan.recv_sizes), group=group)
        lrs, lr_index = group_learning_rates([g for _, g in entries], entries[0][0].device, as_tensor=fused)
        apply([p.to_local() for p, _ in entries], orthogonal, lrs, lr_index,
              [g["weight_decay"] for _, g in entries], plan.update_layout)

    def _plan(self, entries):
        """(_StepPlan, mesh) for these entries: owners, send order and every static layout."""
        mesh = None
        for p, _ in entries:
            mesh = self._check_layout(p, mesh)
        rank, world = mesh.get_local_rank(), mesh.size()
        jobs = [_Job(p, g, world) for p, g in entries]
        for job, owner in zip(jobs, assign_owners([math.prod(j.shape) for j in jobs], world)):
            job.owner = owner
        send_order = tuple(i for o in range(world) for i, j in enumerate(jobs) if j.owner == o)
        mine = [j for j in jobs if j.owner == rank]
        send_sizes = tuple(sum(j.numel_of(rank) for j in jobs if j.owner == o) for o in range(world))
        recv_sizes = tuple(sum(j.numel_of(r) for j in mine) for r in range(world))
        update_layout, offset = [None] * len(jobs), 0
        for i in send_order:  # where each job's returning rows land in the returned buffer
            update_layout[i] = (offset, (jobs[i].rows[rank][1] - jobs[i].rows[rank][0], *jobs[i].shape[1:]),
                                tuple(self._local_segments(jobs[i], rank)))
            offset += jobs[i].numel_of(rank)
        unpack_layout, pack_layout, batch_settings = self._owned_plan(mine, recv_sizes, world)
        return _StepPlan(send_order, send_sizes, recv_sizes, unpack_layout, pack_layout, batch_settings,
                         tuple(update_layout)), mesh

    @staticmethod
    def _owned_plan(mine, recv_sizes, world):
        """Layouts of the owned matrices: where each one's shards sit in the received buffer (rank r's chunk
        holds its shard of each owned matrix in order), which NS batch each block joins (blocks of equal shape
        and settings, as Muon), and where its result goes back. Returns (unpack layout, pack layout, settings per
        batch)."""
        starts = [sum(recv_sizes[:r]) for r in range(world)]
        unpack_jobs, batches = [], {}  # (settings, (rows, cols)) -> [(owned index, block index, block shape)]
        for i, j in enumerate(mine):
            g = j.group
            pieces = []
            for r in range(world):
                rows = j.rows[r][1] - j.rows[r][0]
                if rows:
                    pieces.append((starts[r], rows))
                    starts[r] += rows * j.row_numel
            unpack_jobs.append((j.shape, g["heads"], g["split"], tuple(pieces)))
            for k, block in enumerate(matrix_blocks(torch.empty(j.shape, device="meta"), g["heads"], g["split"])):
                shape = tuple(block.shape[-2:])
                method = choose_method(shape, g["ns_steps"], g["ns_method"], g["coefficients"])
                batches.setdefault(((g["ns_steps"], g["coefficients"], g["eps"], method), shape), []).append(
                    (i, k, tuple(block.shape)))
        sources = [[] for _ in mine]  # per owned matrix, per block: (batch, first matrix, block shape)
        for n, members in enumerate(batches.values()):
            first = 0
            for i, k, shape in members:
                sources[i].append((k, (n, first, shape)))
                first += math.prod(shape[:-2])
        pack_jobs = tuple((j.shape, tuple(source for _, source in sorted(sources[i])), tuple(tuple(r) for r in j.rows))
                          for i, j in enumerate(mine))
        batch_layout = tuple((shape, tuple((i, k) for i, k, _ in members)) for (_, shape), members in batches.items())
        return (tuple(unpack_jobs), batch_layout), pack_jobs, tuple(settings for settings, _ in batches)

    @staticmethod
    def _local_segments(job, rank):
        """(dim, lo, hi, scale) pieces of this rank's shard that share one update scale: row segments
        clipped to the shard for matrices, segments along dim 1 of every local expert for 3-D weights."""
        first, last = job.rows[rank]
        for start, stop, scale in row_segments(job.shape, job.group["heads"], job.group["split"]):
            if len(job.shape) == 3:  # dim 0 is experts: segments run along dim 1 of every local expert
                yield 1, start, stop, scale
            elif max(start, first) < min(stop, last):
                yield 0, max(start, first) - first, min(stop, last) - first, scale


def momentum_and_pack(grads, bufs, momenta, nesterov, send_order, dtype):
    """M <- mu M + G in place on every local shard, and one flat send buffer holding U = mu M + G (Nesterov) or
    M, cast to dtype, in send order (job indices)."""
    updates = momentum_updates(grads, bufs, momenta, nesterov)
    return torch.cat([updates[i].to(dtype).flatten() for i in send_order] or [grads[0].new_empty(0, dtype=dtype)])


def unpack_owned(received, layout):
    """The whole U of every matrix this rank owns, from the shards in `received` (flat, rank r's chunk holding
    its rows of each owned matrix in order), cut into blocks and stacked per Newton-Schulz batch.
    layout: (jobs, batches); jobs: per owned matrix (global shape, heads, split, ((offset, rows) per rank
    holding rows)); batches: per batch ((rows, cols), ((job, block), ...)). Returns [N, rows, cols] per batch."""
    jobs, batches = layout
    blocks = []
    for shape, heads, split, pieces in jobs:
        tail = shape[1:]
        shards = [received[start:start + rows * math.prod(tail)].view(rows, *tail) for start, rows in pieces]
        blocks.append(matrix_blocks(torch.cat(shards) if len(shards) > 1 else shards[0], heads, split))
    return [torch.cat([blocks[i][k].reshape(-1, rows, cols) for i, k in members]) for (rows, cols), members in batches]


def pack_returns(outputs, jobs):
    """One flat buffer of the Newton-Schulz results, ordered for the return all-to-all: for each rank r, its
    rows of every owned matrix in order. outputs: [N, rows, cols] per batch; jobs: per owned matrix (global
    shape, per block in block order (batch, first matrix, block shape), (start, stop) rows per rank)."""
    def block(k, first, shape):
        return outputs[k][first:first + math.prod(shape[:-2])].view(shape)

    whole = [join_blocks([block(*source) for source in sources], matrix_shape) for matrix_shape, sources, _ in jobs]
    world = len(jobs[0][2])
    return torch.cat([O[rows[r][0]:rows[r][1]].flatten() for r in range(world) for O, (_, _, rows) in zip(whole, jobs)])


def decay_and_apply(weights, orthogonal, lrs, lr_index, decays, layout):
    """W <- W (1 - lr wd) - lr scale O on every local shard, each segment with its own scale.
    orthogonal: the flat returned buffer; layout: per weight (offset, local shape, segments), segments being
    (dim, lo, hi, scale) pieces covering the rows that have an update (all of them)."""
    for w, i, wd, (offset, shape, pieces) in zip(weights, lr_index, decays, layout):
        lr = lrs[i]
        if w.numel() == 0:
            continue
        O = orthogonal[offset:offset + w.numel()].view(shape)
        parts = [w.narrow(dim, lo, hi - lo) * (1 - lr * wd) - O.narrow(dim, lo, hi - lo) * (lr * scale)
                 for dim, lo, hi, scale in pieces]
        w.copy_(torch.cat(parts, dim=pieces[0][0]))
