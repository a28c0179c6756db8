"""Attention dropout in the engine: the Triton twin of :mod:`attnkit.dropout`.

The keep bit of a pair is a hash of the call's key (seed, offset) and of the pair's
positions as mods see them (b, h, q_idx, kv_idx; see ``mod_positions``), so the forward
and both backward passes regenerate the same mask tile by tile and the reference
reproduces it. The arithmetic is uint32 (wrap-around multiplies, logical shifts), the
same operations as the PyTorch twin's; the multipliers are read from it.

``DROPOUT_ARGS`` (passed to the kernels when their ``DROPOUT`` flag is set) is
``(SEED, threshold, keep_scale)``: SEED an int64 (2,) tensor (seed, offset), a pair is
kept iff the top 31 bits of its hash are >= ``threshold``, and kept probabilities are
scaled by ``keep_scale`` = 1 / (1 - p).
"""

import triton
import triton.language as tl

from attnkit import dropout as _twin

from .common import mod_positions

MIX_A = tl.constexpr(_twin.MIX_A)
MIX_B = tl.constexpr(_twin.MIX_B)
COLUMN_SALT = tl.constexpr(_twin.COLUMN_SALT)


@triton.jit
def mix32(x):
    """One bijective uint32 mix (x uint32)."""
    x = x ^ (x >> 16)
    x = x * MIX_A
    x = x ^ (x >> 15)
    x = x * MIX_B
    return x ^ (x >> 15)


@triton.jit
def dropout_bits(seed, offset, b, h, q_idx, kv_idx):
    """32 random bits (uint32) per pair, broadcast over the arguments (integers; negative
    positions are taken modulo 2**32, as the PyTorch twin takes them): the head's base from
    (seed, offset, b, h), a word per row and per column, one mix per pair. Scalars and row
    or column vectors stay small: a tile costs one mix per row, one per column, one per pair."""
    base = mix32(seed.to(tl.uint32))
    base = mix32(base ^ offset.to(tl.uint32))
    base = mix32(base ^ b.to(tl.uint32))
    base = mix32(base ^ h.to(tl.uint32))
    row = mix32(base ^ q_idx.to(tl.uint32))
    column = mix32(mix32(base ^ COLUMN_SALT) ^ kv_idx.to(tl.uint32))
    return mix32(row ^ column)


@triton.jit
def dropout_keep(q_pos, k_pos, seq, VARIANT_ARGS, POSITIONS: tl.constexpr, DROPOUT_ARGS):
    """Which pairs of a tile keep their probability (bool, broadcast of q_pos and k_pos);
    pointwise, so the dK/dV pass may hand transposed position tiles."""
    SEED, threshold, _ = DROPOUT_ARGS
    b, h, q_idx, kv_idx = mod_positions(q_pos, k_pos, seq, VARIANT_ARGS, POSITIONS)
    bits = dropout_bits(tl.load(SEED), tl.load(SEED + 1), b, h, q_idx, kv_idx)
    return (bits >> 1).to(tl.int32) >= threshold
