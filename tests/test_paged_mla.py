"""The Triton paged MLA decode kernel against its gathered PyTorch reference (Triton's CPU interpreter here)."""
import pytest
import torch

from conftest import rel_err
from nanokimi.ops.paged_mla import paged_mla_decode, paged_mla_decode_reference, triton_available


def case(S, H, R, DR, bs, num_blocks, max_blocks, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(S * 7 + H)
    c_kv = torch.randn(num_blocks, bs, R, generator=g).to(device, dtype)
    k_rope = torch.randn(num_blocks, bs, DR, generator=g).to(device, dtype)
    tables = torch.stack([torch.randperm(num_blocks - 1, generator=g)[:max_blocks] + 1 for _ in range(S)]).to(device)
    positions = torch.randint(0, max_blocks * bs, (S,), generator=g).to(device)
    positions[0] = 0  # a row that sees one key
    q_latent = torch.randn(S, H, R, generator=g).to(device, dtype)
    q_rope = torch.randn(S, H, DR, generator=g).to(device, dtype)
    return q_latent, q_rope, c_kv, k_rope, tables, positions


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("S,H,R,DR,bs,max_blocks,split", [(3, 4, 32, 8, 16, 5, 32), (2, 8, 24, 16, 16, 3, 512),
                                                          (4, 2, 16, 8, 32, 4, 64)])
def test_paged_mla_kernel_equals_reference(S, H, R, DR, bs, max_blocks, split):
    args = case(S, H, R, DR, bs, 12, max_blocks)
    expected = paged_mla_decode_reference(*args, scale=0.3)
    got = paged_mla_decode(*args, scale=0.3, split_tokens=split)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.gpu
def test_paged_mla_kernel_on_cuda_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = case(37, 8, 256, 64, 16, 600, 300, device="cuda", dtype=torch.bfloat16)
    expected = paged_mla_decode_reference(*args, scale=0.07)
    got = paged_mla_decode(*args, scale=0.07)
    assert rel_err(got, expected) < 1e-2
