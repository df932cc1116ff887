"""FSDP2's Shard(0) layout: rank r of a world of W holds rows [r c, (r + 1) c) of dim 0, c = ceil(rows / W) (the
last ranks possibly fewer or none). Used by attention's QK-Clip (rescale a head's rows where this rank holds them)
and by distributed Muon (which rows of an orthogonalised matrix go back to which rank)."""
import torch


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that `rank` holds under FSDP2's chunked Shard(0) layout."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this process holds, the global index of its first row): a plain tensor is all of itself; a
    DTensor sharded on dim 0 over a 1-D mesh (FSDP2) is its local shard."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, 0
    if tuple(weight.placements) != (Shard(0),):
        raise NotImplementedError(f"only weights sharded on dim 0 over a 1-D mesh (FSDP2) are supported; got "
                                  f"placements {weight.placements}.")
    start, _ = shard_rows(weight.shape[0], weight.device_mesh.size(), weight.device_mesh.get_local_rank())
    return weight.to_local(), start


def scale_rows_(weight: torch.Tensor, factors: torch.Tensor) -> None:
    """weight[i] *= factors[i] for every row i this process holds (factors: [rows], global), in place, no host
    sync. A factor of exactly 1 leaves its row bit-identical."""
    local, start = local_rows(weight)
    if local.shape[0]:
        part = factors[start:start + local.shape[0]].to(local.device)
        local.mul_(part.view(-1, *([1] * (local.dim() - 1))))
