"""Triton kernels of MoBA (Mixture of Block Attention): key pooling, the top-k gate,
and the per-token selection mask the fused engine applies inside visited tiles.

* ``moba_pool_kernel``: mean of every complete key block, fp32, (B, Hkv, NB, D).
* ``moba_select_kernel``: for each query row, the top ``min(top_k - 1, NB)`` past blocks
  ranked by q . mean(K_block) in fp32 among the blocks wholly before the row's own
  block (ties: the lower block index first); written to a selection table
  (B, Hq, Nq, slots) int32, -1 where nothing is selected. The k-th pick is the best
  block strictly after the (k-1)-th in that order, so no sort and no score buffer
  is needed.
* Packed batches (``VARLEN``, cu_seqlens): "B" is the sequence and every length,
  block and row is the sequence's own, as in the engine (``sequence_bounds``): blocks
  start at the sequence's first key, the pooled keys are (S, Hkv, max NB, D) and the
  table (S, Hq, max Nq, slots) with rows from the sequence's first query, so the
  engine's ``moba_mask`` (which sees the sequence index and in-sequence positions)
  reads it unchanged.
* ``moba_mask``: the engine's token mask. A key is visible to query row i (key
  position p = i + seqlen_k - seqlen_q) when k_pos <= p and its block is the row's
  own block (p // block_size) or one of the row's selected blocks, read from the
  selection table. The variant's arguments: ``(SEL, stride_b, stride_h, block_size,
  slots)`` (the table's row stride is ``slots``).
"""

import triton
import triton.language as tl

from .engine.common import sequence_bounds


@triton.jit
def moba_pool_kernel(K, P, CU_Q, CU_K, stride_kb, stride_kh, stride_kn, stride_pb, stride_ph, stride_pn,
                     num_heads_kv, seqlen_k_arg, block_size,
                     VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    blk = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads_kv
    off_h = off_bh % num_heads_kv
    tensor_b, _, _, k_start, seqlen_k = sequence_bounds(off_b, 0, seqlen_k_arg, CU_Q, CU_K, VARLEN)
    if blk < seqlen_k // block_size:  # the grid covers the longest sequence's complete blocks
        offs_d = tl.arange(0, BLOCK_D)
        rows = tl.arange(0, CHUNK)
        base = K + tensor_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh \
            + (k_start + blk * block_size).to(tl.int64) * stride_kn
        acc = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        for start in range(0, block_size, CHUNK):
            r = start + rows
            ok = (r[:, None] < block_size) & (offs_d[None, :] < HEAD_DIM)
            acc += tl.load(base + r[:, None] * stride_kn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(acc, 0) / block_size
        out = P + off_b.to(tl.int64) * stride_pb + off_h.to(tl.int64) * stride_ph + blk.to(tl.int64) * stride_pn
        tl.store(out + offs_d, mean, mask=offs_d < HEAD_DIM)


@triton.jit
def moba_select_kernel(Q, P, SEL, CU_Q, CU_K, stride_qb, stride_qh, stride_qm, stride_pb, stride_ph, stride_pn,
                       stride_sb, stride_sh, stride_sm,
                       num_heads_q, groups, seqlen_q_arg, seqlen_k_arg, block_size, top_k,
                       VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_NB: tl.constexpr):
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads_q
    off_h = off_bh % num_heads_q
    off_hk = off_h // groups
    tensor_b, q_start, seqlen_q, _, seqlen_k = sequence_bounds(off_b, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K, VARLEN)
    first_row = tl.program_id(0) * ROWS
    if first_row < seqlen_q:  # the grid covers the longest sequence's rows
        n_blocks = seqlen_k // block_size
        n_pick = tl.minimum(top_k - 1, n_blocks)
        rows = first_row + tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < seqlen_q
        q = tl.load(Q + tensor_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                    + (q_start + rows[:, None]).to(tl.int64) * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
        pos = rows + (seqlen_k - seqlen_q)
        # blocks c < own are wholly before the row's block; rows before the first key (pos < 0) get none
        own = tl.where(pos >= 0, tl.maximum(pos, 0) // block_size, 0)
        p_base = P + off_b.to(tl.int64) * stride_pb + off_hk.to(tl.int64) * stride_ph
        s_base = SEL + off_b.to(tl.int64) * stride_sb + off_h.to(tl.int64) * stride_sh + rows.to(tl.int64) * stride_sm
        big = n_blocks + 1
        prev_s = tl.zeros([ROWS], dtype=tl.float32) + float("inf")
        prev_i = tl.zeros([ROWS], dtype=tl.int32) - 1
        for t in range(n_pick):
            best_s = tl.zeros([ROWS], dtype=tl.float32) + float("-inf")
            best_i = tl.zeros([ROWS], dtype=tl.int32) + big
            for c0 in range(0, n_blocks, BLOCK_NB):
                cols = c0 + tl.arange(0, BLOCK_NB)
                pooled = tl.load(p_base + cols[:, None].to(tl.int64) * stride_pn + offs_d[None, :],
                                 mask=(cols[:, None] < n_blocks) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                s = tl.dot(q, tl.trans(pooled), input_precision="ieee")  # [ROWS, BLOCK_NB] fp32 gate
                after_prev = (s < prev_s[:, None]) | ((s == prev_s[:, None]) & (cols[None, :] > prev_i[:, None]))
                ok = (cols[None, :] < own[:, None]) & after_prev
                s_ok = tl.where(ok, s, float("-inf"))
                m = tl.max(s_ok, 1)
                i = tl.min(tl.where(ok & (s_ok == m[:, None]), cols[None, :], big), 1)
                better = (m > best_s) | ((m == best_s) & (i < best_i))
                best_s = tl.where(better, m, best_s)
                best_i = tl.where(better, i, best_i)
            found = best_i < n_blocks
            tl.store(s_base + t, tl.where(found, best_i, -1), mask=row_ok)
            prev_s = tl.where(found, best_s, prev_s)
            prev_i = tl.where(found, best_i, prev_i)


@triton.jit
def moba_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, SEL, stride_b, stride_h, block_size, slots):
    pos = q_pos + (seqlen_k - seqlen_q)
    blk = k_pos // block_size
    keep = blk == tl.maximum(pos, 0) // block_size
    row = SEL + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h + q_pos.to(tl.int64) * slots
    q_ok = q_pos < seqlen_q
    for t in range(slots):
        keep = keep | (blk == tl.load(row + t, mask=q_ok, other=-1))
    return keep & (k_pos <= pos)
