"""Writing new rows into a cache pool in place, as one operator that torch.compile does not rewrite.

    write_rows_(pool, rows, values):  pool.view(-1, *values.shape[1:])[rows] = values

Written as `index_copy_` inside a compiled function, the write is first made functional (a new pool with the
rows replaced) and then copied back into the pool; the compiler is meant to turn that back into a scatter, and
on an H100 it did not: the engine's compiled decode step copied its whole MLA latent pool twice per layer
call, 78 of its 81 ms at batch 16 with a 78 GiB cache. Declared as a custom operator that mutates `pool`, the
write reaches the compiled code as itself and stays a scatter of the given rows. Eager calls run the same
`index_copy_`, so it is also its own reference (tests compare it with plain indexing, eager and compiled).
"""
import torch


@torch.library.custom_op("nanokimi::write_rows_", mutates_args=("pool",))
def write_rows_(pool: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """pool [..., *row_shape] (contiguous), rows [S] long (flat row indices), values [S, *row_shape]."""
    pool.view(-1, *values.shape[1:]).index_copy_(0, rows, values.to(pool.dtype))


@write_rows_.register_fake
def _(pool, rows, values) -> None:
    return None
