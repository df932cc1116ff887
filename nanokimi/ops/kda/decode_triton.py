"""The Triton kernel of nanokimi.ops.kda.decode (imported only when it runs: importing triton is slow)."""
import triton
import triton.language as tl


@triton.jit
def kda_decode_slots_kernel(q, k, v, g, beta, state, slots, depths, o, scale, S, R, H, K, V,
                            q_row, q_head, k_row, k_head, v_row, v_head, g_row, g_head, beta_row,
                            CHAINS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    # q, k, v, g, beta may be strided views (their last dimension contiguous); state and o are contiguous.
    # CHAINS: the programs of a chain's first row (depth 0) step rows row .. row + R - 1 while their depths are
    # 0, 1, .., keeping the state in registers and storing it to each row's slot; other rows' programs do nothing.
    # Scalar conditions enter masks as blocks (tl.full(..) & condition), and scalar loads read a row clamped
    # into 0 .. S-1 rather than under a mask
    row = tl.program_id(0)
    head = tl.program_id(1)
    v_block = tl.program_id(2)
    k_idx = tl.arange(0, BLOCK_K)
    v_idx = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = k_idx < K
    v_ok = v_idx < V
    first = True
    if CHAINS:
        first = tl.load(depths + row) == 0
    slot = tl.load(slots + row).to(tl.int64)
    tile = ((slot * H + head) * K + k_idx[:, None]) * V + v_idx[None, :]  # [BK, BV] of the slot's state
    on_k = k_ok & (tl.full([BLOCK_K], 1, tl.int1) & first)
    on_v = v_ok & (tl.full([BLOCK_V], 1, tl.int1) & first)
    s = tl.load(state + tile, mask=on_k[:, None] & on_v[None, :], other=0.0)
    for t in range(0, R):
        r = row + t
        if CHAINS:
            here = tl.minimum(r, S - 1)
            active = first & (r < S) & (tl.load(depths + here) == t)
            on_k = k_ok & (tl.full([BLOCK_K], 1, tl.int1) & active)
            on_v = v_ok & (tl.full([BLOCK_V], 1, tl.int1) & active)
        else:
            here = r
        q_t = tl.load(q + here * q_row + head * q_head + k_idx, mask=on_k, other=0.0).to(tl.float32) * scale  # [BK]
        k_t = tl.load(k + here * k_row + head * k_head + k_idx, mask=on_k, other=0.0).to(tl.float32)
        g_t = tl.load(g + here * g_row + head * g_head + k_idx, mask=on_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + here * v_row + head * v_head + v_idx, mask=on_v, other=0.0).to(tl.float32)  # [BV]
        b_t = tl.load(beta + here * beta_row + head).to(tl.float32)  # an inactive step has k_t = 0: no update
        s = s * tl.exp(g_t)[:, None]
        prediction = tl.sum(s * k_t[:, None], 0)  # [BV]
        s = s + (b_t * k_t)[:, None] * (v_t - prediction)[None, :]
        slot = tl.load(slots + here).to(tl.int64)
        tile = ((slot * H + head) * K + k_idx[:, None]) * V + v_idx[None, :]
        tl.store(state + tile, s, mask=on_k[:, None] & on_v[None, :])
        tl.store(o + (here * H + head) * V + v_idx, tl.sum(s * q_t[:, None], 0).to(o.dtype.element_ty), mask=on_v)
