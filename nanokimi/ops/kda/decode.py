"""One KDA decode step per row, on a pool of state slots updated in place (the engine's decode rows).

Row s continues from state slot slots[s] of the pool [N, H, K, V] (fp32) with one token:
    S = Diag(exp(g_s)) S;  S = S + beta_s k_s (v_s - S^T k_s)^T;  o_s = S^T (scale q_s)
which is `kda_recurrent` with T = 1. `kda_decode_slots_reference` gathers the slots, runs that and
scatters them back; `kda_decode_slots` is a Triton kernel that reads and writes each slot in place (no
gathered copy of the states: at batch 128 the copies are 4x the state traffic of the step itself).
Rows that share a slot (the padded rows of a CUDA graph all use one spare slot) leave it undefined.

With `depths` (speculative verify rows in the graph step), rows form chains: a chain's rows are consecutive,
its first row (depth 0) continues from its slot, and the row at depth j > 0 from the state the row before it
(depth j - 1) wrote; every row writes the state after its token to its own slot. `rounds` bounds the depths.
The kernel keeps a chain's state in registers, so the rows of a chain may also share one slot (a prefill's
short segments: `kda_chains_reference`), which then ends holding the state after the chain's last token.
"""
import torch

from nanokimi.ops.kda.naive import kda_recurrent
from nanokimi.ops.paged_write import write_rows_


def kda_decode_slots_reference(q, k, v, g, beta, state, slots, scale: float, depths: torch.Tensor | None = None,
                               rounds: int = 1) -> torch.Tensor:
    """q, k, g [S, H, K]; v [S, H, V]; beta [S, H]; state [N, H, K, V] fp32 (updated); slots [S] long;
    depths [S] long or None -> o [S, H, V] in v's dtype. Chains run in `rounds` rounds over every row: in
    round r the rows at depth r step and write their slots, the others write back what their slots held."""
    if depths is None:
        rows = state.index_select(0, slots)
        o, final = kda_recurrent(*(t.unsqueeze(1) for t in (q, k, v, g, beta)), scale=scale, initial_state=rows,
                                 output_final_state=True)
        write_rows_(state, slots, final)
        return o[:, 0]
    reads = torch.where(depths == 0, slots, slots.roll(1))  # [S] the slot each row continues from
    o = None
    for r in range(rounds):
        active = depths == r  # [S]
        out, final = kda_recurrent(*(t.unsqueeze(1) for t in (q, k, v, g, beta)), scale=scale,
                                   initial_state=state.index_select(0, reads), output_final_state=True)
        write_rows_(state, slots, torch.where(active[:, None, None, None], final, state.index_select(0, slots)))
        o = out[:, 0] if o is None else torch.where(active[:, None, None], out[:, 0], o)
    return o


def kda_chains_reference(q, k, v, g, beta, state, slots, scale: float, depths: torch.Tensor,
                         rounds: int) -> torch.Tensor:
    """Chains whose rows all read and write their chain's one slot (a prefill's short segments: slots[s] is the
    sequence's slot, depths[s] the token's place in its segment); same arguments and result as
    kda_decode_slots_reference, whose rows each own a slot. `kda_decode_slots` computes both. Round r steps the
    rows at depth r (one per chain, so no slot is written twice in a round)."""
    o = torch.empty_like(v)
    for r in range(rounds):
        rows = (depths == r).nonzero().squeeze(1)  # [C] one row per chain still running
        chain_slots = slots.index_select(0, rows)
        out, final = kda_recurrent(*(t.index_select(0, rows).unsqueeze(1) for t in (q, k, v, g, beta)), scale=scale,
                                   initial_state=state.index_select(0, chain_slots), output_final_state=True)
        state.index_copy_(0, chain_slots, final.to(state.dtype))
        o.index_copy_(0, rows, out[:, 0].to(o.dtype))
    return o


def kda_decode_slots(q, k, v, g, beta, state, slots, scale: float, block_v: int = 32,
                     depths: torch.Tensor | None = None, rounds: int = 1) -> torch.Tensor:
    """The Triton form of kda_decode_slots_reference (same arguments and result); one program per
    (row, head, block of block_v value channels) keeps its [K, block_v] slice of the state in registers;
    with depths, a chain's first row's programs run the whole chain (up to `rounds` rows), the others none."""
    S, H, K = q.shape
    V = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("kda_decode_slots needs a contiguous fp32 state pool")
    # strided views are read as they are (the engine's q, k, v are slices of one projection): only a
    # non-contiguous last dimension is copied
    q, k, v, g = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, g))
    beta = beta if beta.stride(-1) == 1 else beta.contiguous()
    block_k = max(16, 1 << (K - 1).bit_length())
    block_v = min(block_v, max(16, 1 << (V - 1).bit_length()))
    o = torch.empty(S, H, V, device=v.device, dtype=v.dtype)
    slots = slots.contiguous()
    from nanokimi.ops.kda.decode_triton import kda_decode_slots_kernel

    kda_decode_slots_kernel[(S, H, -(-V // block_v))](
        q, k, v, g, beta, state, slots, slots if depths is None else depths.contiguous(), o, scale, S,
        1 if depths is None else rounds, H, K, V, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), g.stride(0), g.stride(1), beta.stride(0),
        CHAINS=depths is not None, BLOCK_K=block_k, BLOCK_V=block_v)
    return o
