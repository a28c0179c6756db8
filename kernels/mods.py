"""@triton.jit halves of the library mods in ``attnkit.mods`` (the PyTorch halves live there).

Signatures follow the mod contract: score mods ``(score, b, h, q_idx, kv_idx, *ptrs)``,
masks ``(b, h, q_idx, kv_idx, *ptrs)``, tensor-gradient hooks ``(dscore, score, b, h,
q_idx, kv_idx, *ptrs, *grad_ptrs)``. Every mod is pointwise. A mod's sizes and strides
travel in a small int32 ``META`` tensor built by its ``specialize`` on the call's
device; its learnable tensor is made contiguous there, so the tensor and its
gradient buffer share offsets. Gradient hooks reduce inside the tile first where the
parameter does not depend on the position (ALiBi, key bias), and otherwise add one
atomic per pair (relative-position tables).
"""

import triton
import triton.language as tl

from .engine.common import tanh


# ----------------------------------------------------------------------------- ALiBi
# tensors: SLOPES (Bs, Hq) float, contiguous; META = [batch stride of SLOPES (0 when shared)]

@triton.jit
def alibi_score(score, b, h, q_idx, kv_idx, SLOPES, META):
    slope = tl.load(SLOPES + b * tl.load(META) + h).to(tl.float32)
    return score - slope * tl.abs(q_idx - kv_idx).to(tl.float32)


@triton.jit
def alibi_grads(dscore, score, b, h, q_idx, kv_idx, SLOPES, META, D_SLOPES, D_META):
    # d out / d slope = -|q_idx - kv_idx|: one sum per tile, one atomic per (tile, head)
    g = tl.sum(tl.sum(dscore * tl.abs(q_idx - kv_idx).to(tl.float32), 1), 0)
    tl.atomic_add(D_SLOPES + b * tl.load(META) + h, -g)


# ----------------------------------------------------------------------------- T5 relative position bias
# tensors: TABLE (H, num_buckets) float, contiguous; BUCKETS int32 (2 * max_distance + 1,): the T5 bucket of
# every relative position kv_idx - q_idx in [-max_distance, max_distance] (beyond, the bucket is that of the
# bound); META = [num_buckets, max_distance]

@triton.jit
def _t5_offset(h, q_idx, kv_idx, BUCKETS, META):
    max_distance = tl.load(META + 1)
    rel = tl.minimum(tl.maximum(kv_idx - q_idx, -max_distance), max_distance) + max_distance
    return h * tl.load(META) + tl.load(BUCKETS + rel)


@triton.jit
def relative_position_bias_score(score, b, h, q_idx, kv_idx, TABLE, BUCKETS, META):
    return score + tl.load(TABLE + _t5_offset(h, q_idx, kv_idx, BUCKETS, META)).to(tl.float32)


@triton.jit
def relative_position_bias_grads(dscore, score, b, h, q_idx, kv_idx, TABLE, BUCKETS, META, D_TABLE, D_BUCKETS,
                                 D_META):
    tl.atomic_add(D_TABLE + _t5_offset(h, q_idx, kv_idx, BUCKETS, META), dscore)


# ----------------------------------------------------------------------------- NATTEN 2-D relative position bias
# tensors: TABLE (H, 2 Kx - 1, 2 Ky - 1) float, contiguous; META = [Y (second spatial size), dilation x,
# dilation y, Kx, Ky]. Positions are flat row-major indices over (X, Y).

@triton.jit
def _rpb_offset(h, q_idx, kv_idx, META):
    width = tl.load(META)
    kx = tl.load(META + 3)
    ky = tl.load(META + 4)
    # offsets in dilation-group units, clamped so pairs outside any window (masked) stay in the table
    ix = (kv_idx // width - q_idx // width) // tl.load(META + 1) + kx - 1
    iy = (kv_idx % width - q_idx % width) // tl.load(META + 2) + ky - 1
    ix = tl.minimum(tl.maximum(ix, 0), 2 * kx - 2)
    iy = tl.minimum(tl.maximum(iy, 0), 2 * ky - 2)
    return (h * (2 * kx - 1) + ix) * (2 * ky - 1) + iy


@triton.jit
def rpb_2d_score(score, b, h, q_idx, kv_idx, TABLE, META):
    return score + tl.load(TABLE + _rpb_offset(h, q_idx, kv_idx, META)).to(tl.float32)


@triton.jit
def rpb_2d_grads(dscore, score, b, h, q_idx, kv_idx, TABLE, META, D_TABLE, D_META):
    tl.atomic_add(D_TABLE + _rpb_offset(h, q_idx, kv_idx, META), dscore)


# ----------------------------------------------------------------------------- per-key bias
# tensors: BIAS (Bs, H, Nk) float, contiguous; META = [batch stride of BIAS (0 when shared), Nk]

@triton.jit
def key_bias_score(score, b, h, q_idx, kv_idx, BIAS, META):
    row = BIAS + b * tl.load(META) + h * tl.load(META + 1)
    return score + tl.load(row + kv_idx).to(tl.float32)


@triton.jit
def key_bias_grads(dscore, score, b, h, q_idx, kv_idx, BIAS, META, D_BIAS, D_META):
    # the dQ pass hands kv_idx as a [1, BLOCK_N] row: sum the tile's rows, one atomic per key
    row = D_BIAS + b * tl.load(META) + h * tl.load(META + 1)
    tl.atomic_add(row + kv_idx, tl.sum(dscore, axis=0, keep_dims=True))


# ----------------------------------------------------------------------------- softcap
# tensors: CAP float32 (1,)

@triton.jit
def softcap_score(score, b, h, q_idx, kv_idx, CAP):
    cap = tl.load(CAP)
    return cap * tanh(score / cap)


@triton.jit
def softcap_derivative(score, b, h, q_idx, kv_idx, CAP):
    t = tanh(score / tl.load(CAP))
    return 1.0 - t * t


# ----------------------------------------------------------------------------- masks

@triton.jit
def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# META = [left, right], -1 = unbounded
@triton.jit
def sliding_window_mask(b, h, q_idx, kv_idx, META):
    left = tl.load(META)
    right = tl.load(META + 1)
    return ((left < 0) | (kv_idx >= q_idx - left)) & ((right < 0) | (kv_idx <= q_idx + right))


# LENGTHS int32 (Bs,); META = [batch stride of LENGTHS (0 when shared)]
@triton.jit
def prefix_lm_mask(b, h, q_idx, kv_idx, LENGTHS, META):
    return (kv_idx < tl.load(LENGTHS + b * tl.load(META))) | (kv_idx <= q_idx)


# DOCS int32 (Bs, Nk); META = [batch stride of DOCS (0 when shared), global tokens]
@triton.jit
def document_mask(b, h, q_idx, kv_idx, DOCS, META):
    row = DOCS + b * tl.load(META)
    # a query before the first key (Nq > Nk) belongs to no document
    same = (tl.load(row + tl.maximum(q_idx, 0)) == tl.load(row + kv_idx)) & (q_idx >= 0)
    return same | (kv_idx < tl.load(META + 1))
