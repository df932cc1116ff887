"""The Triton kernel of nanokimi.ops.paged_mla (imported only when it runs: importing triton is slow)."""
import triton
import triton.language as tl


@triton.jit
def paged_mla_kernel(q_lat, q_rope, c_kv, k_rope, tables, positions, part_acc, part_max, part_sum, scale,
                      H, R, DR, MB, blocks_per_split,
                      BS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    heads = tl.arange(0, BLOCK_H)
    r_idx = tl.arange(0, BLOCK_R)
    d_idx = tl.arange(0, BLOCK_DR)
    keys_in_block = tl.arange(0, BS)
    q_l = tl.load(q_lat + row * H * R + heads[:, None] * R + r_idx[None, :],
                  mask=(heads[:, None] < H) & (r_idx[None, :] < R), other=0.0).to(tl.float32)  # [BH, BR]
    q_r = tl.load(q_rope + row * H * DR + heads[:, None] * DR + d_idx[None, :],
                  mask=(heads[:, None] < H) & (d_idx[None, :] < DR), other=0.0).to(tl.float32)  # [BH, BDR]
    last = tl.load(positions + row)
    first_block = split * blocks_per_split
    end_block = tl.minimum(first_block + blocks_per_split, last // BS + 1)
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for b in range(first_block, end_block):
        block = tl.load(tables + row * MB + b)
        token = block * BS + keys_in_block  # [BS] slots of this block
        ckv = tl.load(c_kv + token[:, None] * R + r_idx[None, :], mask=r_idx[None, :] < R,
                      other=0.0).to(tl.float32)  # [BS, BR]
        kr = tl.load(k_rope + token[:, None] * DR + d_idx[None, :], mask=d_idx[None, :] < DR,
                     other=0.0).to(tl.float32)  # [BS, BDR]
        scores = (tl.dot(q_l, tl.trans(ckv)) + tl.dot(q_r, tl.trans(kr))) * scale  # [BH, BS]
        key_pos = b * BS + keys_in_block
        scores = tl.where(key_pos[None, :] <= last, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p, ckv)
        running_max = new_max
    base = (row * splits + split) * BLOCK_H
    tl.store(part_max + base + heads, running_max)
    tl.store(part_sum + base + heads, running_sum)
    tl.store(part_acc + (base + heads[:, None]) * BLOCK_R + r_idx[None, :], acc)
