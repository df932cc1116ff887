"""The Triton kernel of nanokimi.ops.kda.decode (imported only when it runs: importing triton is slow)."""
import triton
import triton.language as tl


@triton.jit
def kda_decode_slots_kernel(q, k, v, g, beta, state, slots, o, scale, H, K, V,
                            q_row, q_head, k_row, k_head, v_row, v_head, g_row, g_head, beta_row,
                            BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    # q, k, v, g, beta may be strided views (their last dimension contiguous); state and o are contiguous
    row = tl.program_id(0)
    head = tl.program_id(1)
    v_block = tl.program_id(2)
    k_idx = tl.arange(0, BLOCK_K)
    v_idx = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = k_idx < K
    v_ok = v_idx < V
    q_t = tl.load(q + row * q_row + head * q_head + k_idx, mask=k_ok, other=0.0).to(tl.float32) * scale  # [BK]
    k_t = tl.load(k + row * k_row + head * k_head + k_idx, mask=k_ok, other=0.0).to(tl.float32)
    g_t = tl.load(g + row * g_row + head * g_head + k_idx, mask=k_ok, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * v_row + head * v_head + v_idx, mask=v_ok, other=0.0).to(tl.float32)  # [BV]
    b_t = tl.load(beta + row * beta_row + head).to(tl.float32)
    slot = tl.load(slots + row).to(tl.int64)
    tile = ((slot * H + head) * K + k_idx[:, None]) * V + v_idx[None, :]  # [BK, BV] of the slot's state
    tile_ok = k_ok[:, None] & v_ok[None, :]
    s = tl.load(state + tile, mask=tile_ok, other=0.0)
    s = s * tl.exp(g_t)[:, None]
    prediction = tl.sum(s * k_t[:, None], 0)  # [BV]
    s = s + (b_t * k_t)[:, None] * (v_t - prediction)[None, :]
    tl.store(state + tile, s, mask=tile_ok)
    tl.store(o + (row * H + head) * V + v_idx, tl.sum(s * q_t[:, None], 0).to(o.dtype.element_ty), mask=v_ok)
