"""write_rows_ (the cache write of the compiled decode step) against plain indexing, eager and compiled."""
import pytest
import torch

from nanokimi.ops.paged_write import write_rows_


@pytest.mark.parametrize("pool_shape, row_shape", [((7, 4, 5), (5,)), ((6, 3, 2, 3), (2, 3)), ((9, 2, 6), (2, 6))])
def test_written_rows_match_indexing_and_the_rest_is_untouched(pool_shape, row_shape):
    torch.manual_seed(0)
    pool = torch.randn(pool_shape, dtype=torch.float64)
    flat_rows = pool.numel() // torch.Size(row_shape).numel()
    rows = torch.randperm(flat_rows)[:3]
    values = torch.randn(3, *row_shape)  # float32 into a float64 pool: converted like index_copy_ after .to()
    want = pool.clone()
    want.view(-1, *row_shape)[rows] = values.double()
    write_rows_(pool, rows, values)
    assert torch.equal(pool, want)


def test_compiled_write_equals_the_eager_write():
    def step(pool, rows, x):  # a decode-step shape: project, write the new rows, read them back
        write_rows_(pool, rows, x * 2)
        return pool.view(-1, x.shape[-1]).index_select(0, rows).sum(-1) + x.sum(-1)

    torch.manual_seed(0)
    rows, x = torch.tensor([5, 0, 17]), torch.randn(3, 8)
    eager_pool = torch.randn(5, 4, 8)
    compiled_pool = eager_pool.clone()
    want = step(eager_pool, rows, x)
    got = torch.compile(step, dynamic=False)(compiled_pool, rows, x)
    assert torch.equal(compiled_pool, eager_pool)  # the rows written, nothing else touched
    torch.testing.assert_close(got, want)  # the read-back (fused sums may round differently)


def test_mismatched_values_are_rejected():
    with pytest.raises(RuntimeError):
        write_rows_(torch.zeros(4, 3), torch.tensor([0]), torch.zeros(1, 5))
