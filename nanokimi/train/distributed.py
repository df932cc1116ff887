"""Data-parallel training over several processes: process groups, FSDP2 sharding, cross-rank statistics.

The Trainer stays the single-process loop; with world_size > 1 it calls into this module to shard the model
(`shard_model`), to sum the MoE load and take the max attention logits over ranks before the router-bias
update and QK-Clip (`sync_step_statistics`), and nanokimi.train.sharded_checkpoint saves and resumes it.

    torchrun --nproc_per_node 2 -m nanokimi.train [same arguments as `nanokimi train`]
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment): NCCL on CUDA, gloo on the CPU; each rank gets the GPU of its local rank.
    Without torchrun's environment it returns (0, 1) and starts nothing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}. "
                               "Start no more processes per node than there are GPUs (--nproc / --nproc_per_node).")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    return rank, world_size


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_model(model: nn.Module, device: torch.device, reshard_after_forward: bool = False,
                reduce_dtype: torch.dtype = torch.float32, prefetch: int = 1) -> nn.Module:
    """Shard `model` in place with FSDP2 (fully_shard): with the plain PreNorm residual every block is one
    unit (the Transformer calls the block, so its forward is what the unit's hooks wrap, and compile_model
    can compile the whole block between the hooks); with Attention Residuals, which call block.mixer and
    block.ffn directly, every token mixer and every FFN is its own unit. The root holds the embeddings,
    norms, residual weights and LM head. Parameters live as DTensors
    sharded on dim 0; the forward gathers one unit at a time in bf16 on CUDA (fp32 on the CPU) and
    gradients are reduce-scattered (averaged over ranks) in `reduce_dtype` on CUDA (fp32 on the CPU).

    reshard_after_forward=False keeps each unit's gathered weights until its backward, so a step gathers
    the weights once instead of twice (what a few GPUs of one host want: 900M params cost 1.8 GB of bf16
    per rank); True frees them after each unit's forward (less memory, one more all-gather per unit). The
    root (embeddings, head) always stays gathered through the step.
    prefetch: how many units ahead each unit's forward starts the next all-gathers, so they overlap this
    unit's compute even when the host waits on the GPU (0: FSDP's implicit order only).
    `model.loss` is registered as a forward method, so the Trainer's loss call gathers the root's
    parameters like `forward` does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    else:
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    from nanokimi.model.residual import PreNormResidual

    if isinstance(model.residual, PreNormResidual):
        units = list(model.layers)  # in forward order
    else:
        units = [part for block in model.layers for part in (block.mixer, block.ffn)]
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)  # the LM head is the backward's first need
    if prefetch > 0:
        order = [model, *units]
        for i, unit in enumerate(order[:-1]):
            unit.set_modules_to_forward_prefetch(order[i + 1:i + 1 + prefetch])
        if reshard_after_forward:  # otherwise the backward finds every unit still gathered
            for i, unit in enumerate(units[1:], start=1):
                unit.set_modules_to_backward_prefetch(units[max(0, i - prefetch):i][::-1])
    register_fsdp_forward_method(model, "loss")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    The same result as torch.nn.utils.clip_grad_norm_, computed on local tensors: for FSDP2 gradients
    (DTensors sharded on dim 0 over one mesh) each rank sums the squares of its shards and one all-reduce
    makes the sum global, instead of a DTensor reduction per gradient. Plain tensors: no communication."""
    from torch.distributed.tensor import DTensor, Shard

    parameters = list(parameters)  # a generator (model.parameters()) would be spent before the fallback below
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if sharded and (len(sharded) != len(grads) or any(tuple(g.placements) != (Shard(0),) or g.device_mesh.ndim != 1
                                                      or g.device_mesh != sharded[0].device_mesh for g in sharded)):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # mixed layouts: let DTensor reduce them
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    square_sum = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
    if sharded:
        dist.all_reduce(square_sum, group=sharded[0].device_mesh.get_group())
    total = square_sum.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@torch.no_grad()
def sync_step_statistics(model: nn.Module) -> None:
    """Make the per-rank statistics of this step global, so every rank applies the same update:
    MoE `expert_load` summed over ranks (router-bias balancing sees the whole batch) and attention
    `max_logits` maxed over ranks (QK-Clip clips the heads the whole batch pushed over tau)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from nanokimi.model.moe import MoE
    from nanokimi.optim.qk_clip import qk_clip_modules

    loads = [m.expert_load for m in model.modules() if isinstance(m, MoE)]
    if loads:
        flat = torch.cat(loads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for load, summed in zip(loads, flat.split([l.numel() for l in loads])):
            load.copy_(summed)
    logits = [m for _, m in qk_clip_modules(model) if getattr(m, "max_logits", None) is not None]
    if logits:
        flat = torch.cat([m.max_logits.float().reshape(-1) for m in logits])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        for module, maxed in zip(logits, flat.split([m.max_logits.numel() for m in logits])):
            module.max_logits = maxed.view_as(module.max_logits).to(module.max_logits.dtype)
