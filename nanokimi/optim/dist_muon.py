"""Muon for FSDP2-sharded parameters: every matrix is orthogonalised once, by one owner rank.

Parameters are DTensors sharded on dim 0 over a 1-D mesh (FSDP2's layout: rank r holds rows
[r c, (r + 1) c) with c = ceil(rows / world), the last ranks possibly fewer or none). Per step:
    1. on every shard, in one fused pass: M <- mu M + G and U = mu M + G (nesterov) cast to the Newton-Schulz
       dtype, packed in send order (the momentum buffer lives on the shard, as a DTensor beside its parameter)
    2. the matrices are cut into `buckets` pieces of about equal size (in parameter order; one by default,
       which measured fastest on 2 GPUs); per bucket, one
       all-to-all sends each shard of U to the rank that owns the whole matrix; owners are assigned greedily
       within the bucket, largest matrices first, to the rank with the least work so far
    3. each owner runs the batched Newton-Schulz over its matrices of a bucket as soon as they arrive, with
       the same blocks as Muon (per-head, split, per-expert), while the later buckets are still in flight
    4. per bucket, a second all-to-all sends each rank the rows of O that match its shard; then one fused
       pass: W <- W (1 - lr wd) - lr 0.2 sqrt(max(a, b)) O
On CUDA the two fused passes run through torch.compile (`fused=None` default; Muon's option).
So the Newton-Schulz work is split over ranks, never repeated, with several buckets its communication
overlaps it, and the
result is the single-process Muon's. Two all-to-alls per bucket, no other collective.
"""
import math
from collections import defaultdict

import torch
import torch.distributed as dist

from nanokimi.ops.newton_schulz import choose_method
from nanokimi.optim.muon import (MOONLIGHT_RMS, Muon, compiled_pass, group_learning_rates, matrix_blocks,
                                 momentum_updates, orthogonalize_batches, plan_batches)


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that `rank` holds under FSDP2's chunked Shard(0) layout."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def row_segments(shape, heads=None, split=None):
    """(start, stop, update scale) along a matrix's rows (dim -2): each split piece is cut into blocks of
    piece / heads rows, all of `cols` columns, so its scale is 0.2 sqrt(max(piece / heads, cols))."""
    cols, start = shape[-1], 0
    for piece in split or (shape[-2],):
        block_rows = piece // heads if heads else piece
        yield start, start + piece, MOONLIGHT_RMS * math.sqrt(max(block_rows, cols))
        start += piece


def size_buckets(jobs: list, count: int) -> list[list]:
    """Cut `jobs` (in order) into at most `count` consecutive runs of about equal total matrix size."""
    total = sum(math.prod(j.shape) for j in jobs)
    buckets, filled = [[]], 0
    for job in jobs:
        if buckets[-1] and filled >= total * len(buckets) / count:
            buckets.append([])
        buckets[-1].append(job)
        filled += math.prod(job.shape)
    return [b for b in buckets if b]


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each matrix: largest first, each to the rank with the least total size so far."""
    load, owners = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


class _Job:
    """One parameter's step: the parameter and its momentum buffer (DTensors), its group and who owns the
    whole matrix."""

    def __init__(self, param, buffer, group, world):
        self.param, self.buffer, self.group = param, buffer, group
        self.shape = tuple(param.shape)  # global [A, B] or [E, A, B]
        self.row_numel = math.prod(self.shape[1:])
        self.rows = [shard_rows(self.shape[0], world, r) for r in range(world)]
        self.owner = 0

    def numel_of(self, rank):
        start, stop = self.rows[rank]
        return (stop - start) * self.row_numel


class DistributedMuon(Muon):
    """Muon over DTensor parameters sharded on dim 0 (FSDP2). Same options and update as Muon; built by
    nanokimi.optim.build_optimizer when the model's parameters are DTensors. `buckets`: how many pieces
    the matrices are cut into so that communication overlaps the Newton-Schulz work (1, the default: no
    overlap, and the fastest measured on 2x H200 for bench-kl-900m: 38.9 vs 69.6 ms with 4)."""

    def __init__(self, params, buckets: int = 1, **options):
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        super().__init__(params, **options)
        self.buckets = buckets

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        jobs_by_dtype = defaultdict(list)
        mesh = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                mesh = self._check_layout(p, mesh)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                ns_dtype = group["ns_dtype"] or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                jobs_by_dtype[ns_dtype].append(_Job(p, state["momentum_buffer"], group, mesh.size()))
        for dtype, jobs in jobs_by_dtype.items():
            self._orthogonalise_and_apply(jobs, dtype, mesh.get_group(), mesh.get_local_rank(), mesh.size())
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

    def _orthogonalise_and_apply(self, jobs, dtype, group, rank, world):
        """Steps 1-4 over buckets of matrices. Step 1 is one fused pass (momentum, Nesterov, cast, packed in
        send order); every bucket's all-to-all is started at once (asynchronous), then each bucket's
        Newton-Schulz runs as soon as its shards have arrived, while later buckets are still in flight, and its
        results start back at once; step 4 (decay + update) is one fused pass when all are back."""
        buckets = size_buckets(jobs, self.buckets)
        send_order = []
        for bucket in buckets:
            for job, owner in zip(bucket, assign_owners([math.prod(j.shape) for j in bucket], world)):
                job.owner = owner
            send_order.append([j for o in range(world) for j in bucket if j.owner == o])
        index = {id(j): i for i, j in enumerate(jobs)}
        fused = self.fused if self.fused is not None else jobs[0].param.device.type == "cuda"
        pack = compiled_pass(momentum_and_pack) if fused else momentum_and_pack
        sends = pack([j.param.grad.to_local() for j in jobs], [j.buffer.to_local() for j in jobs],
                     [j.group["momentum"] for j in jobs], [j.group["nesterov"] for j in jobs],
                     tuple(tuple(index[id(j)] for j in order) for order in send_order), dtype)
        in_flight = []
        for bucket, send in zip(buckets, sends):
            mine = [j for j in bucket if j.owner == rank]
            send_sizes = [sum(j.numel_of(rank) for j in bucket if j.owner == o) for o in range(world)]
            recv_sizes = [sum(j.numel_of(r) for j in mine) for r in range(world)]
            received = send.new_empty(sum(recv_sizes))
            work = dist.all_to_all_single(received, send, recv_sizes, send_sizes, group=group, async_op=True)
            in_flight.append((bucket, mine, send_sizes, recv_sizes, send, received, work))
        returning = []
        for bucket, mine, send_sizes, recv_sizes, send, received, work in in_flight:
            work.wait()
            full = self._assemble(mine, received.split(recv_sizes), world)  # whole U of each matrix I own
            self._newton_schulz_(mine, full)  # U -> O in place
            back = torch.cat([O[slice(*j.rows[r])].flatten() for r in range(world) for j, O in zip(mine, full)]
                             or [send.new_empty(0)])
            orthogonal = send.new_empty(sum(send_sizes))
            work = dist.all_to_all_single(orthogonal, back, send_sizes, recv_sizes, group=group, async_op=True)
            returning.append((bucket, send_sizes, back, orthogonal, work))
        updates = [None] * len(jobs)  # each job's O rows for this rank's shard
        for bucket, send_sizes, back, orthogonal, work in returning:
            work.wait()
            for owner, chunk in enumerate(orthogonal.split(send_sizes)):
                owned = [j for j in bucket if j.owner == owner]
                for j, piece in zip(owned, chunk.split([j.numel_of(rank) for j in owned])):
                    updates[index[id(j)]] = piece.view(j.param.to_local().shape)
        lrs, lr_index = group_learning_rates([j.group for j in jobs], jobs[0].param.device, as_tensor=fused)
        update = compiled_pass(decay_and_apply) if fused else decay_and_apply
        update([j.param.to_local() for j in jobs], updates, lrs, lr_index, [j.group["weight_decay"] for j in jobs],
               tuple(tuple(self._local_segments(j, rank)) for j in jobs))

    @staticmethod
    def _assemble(mine, chunks, world):
        """Rank r's chunk holds its shard of each of my matrices in order; stack the shards row-wise."""
        pieces = [chunk.split([j.numel_of(r) for j in mine]) for r, chunk in enumerate(chunks)]
        full = []
        for i, j in enumerate(mine):
            shards = [pieces[r][i].view(j.rows[r][1] - j.rows[r][0], *j.shape[1:]) for r in range(world)]
            full.append(torch.cat(shards))  # [A, B] or [E, A, B]
        return full

    @staticmethod
    def _newton_schulz_(mine, full):
        """U -> O in place for the matrices this rank owns, batched as in Muon (plan_batches: blocks of equal
        sides and settings share a batch, tall and wide alike; orthogonalize_batches: gram batches of one short
        side share the s x s recursion)."""
        blocks, views = [], []
        for j, U in zip(mine, full):
            g = j.group
            for block in matrix_blocks(U, g["heads"], g["split"]):
                shape = tuple(block.shape[-2:])
                method = choose_method(shape, g["ns_steps"], g["ns_method"], g["coefficients"])
                blocks.append(((g["ns_steps"], g["coefficients"], g["eps"], method), shape,
                               math.prod(block.shape[:-2])))
                views.append(block)
        plan = plan_batches(blocks)
        stacks = [torch.cat([(views[b].mT if transposed else views[b]).reshape(-1, rows, cols)
                             for b, transposed in members]) for _, (rows, cols), members in plan]  # not normalised
        outputs = orthogonalize_batches(stacks, [settings for settings, _, _ in plan])
        for O, (_, (rows, cols), members) in zip(outputs, plan):
            start = 0
            for b, transposed in members:
                n = views[b].numel() // (rows * cols)
                piece = O[start:start + n]
                views[b].copy_((piece.mT if transposed else piece).view(views[b].shape))
                start += n

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


def momentum_and_pack(grads, bufs, momenta, nesterov, send_orders, dtype):
    """M <- mu M + G in place on every local shard, and per bucket one flat send buffer holding
    U = mu M + G (Nesterov) or M, cast to dtype, in the bucket's send order (job indices)."""
    updates = momentum_updates(grads, bufs, momenta, nesterov)
    return [torch.cat([updates[i].to(dtype).flatten() for i in order] or [grads[0].new_empty(0, dtype=dtype)])
            for order in send_orders]


def decay_and_apply(weights, updates, lrs, lr_index, decays, segments):
    """W <- W (1 - lr wd) - lr scale O on every local shard, each segment with its own scale.
    segments: per weight, (dim, lo, hi, scale) pieces covering the rows that have an update (all of them)."""
    for w, O, i, wd, pieces in zip(weights, updates, lr_index, decays, segments):
        lr = lrs[i]
        if w.numel() == 0:
            continue
        parts = [w.narrow(dim, lo, hi - lo) * (1 - lr * wd) - O.narrow(dim, lo, hi - lo) * (lr * scale)
                 for dim, lo, hi, scale in pieces]
        w.copy_(torch.cat(parts, dim=pieces[0][0]))
