"""Static sparsity patterns, each returned as an :class:`attnkit.BlockMask`.

* :func:`local_global_random` — BigBird (Zaheer et al., 2020): a band of local
  blocks, global blocks that see and are seen by everything, and random blocks.
  :func:`longformer` is the same without random blocks (Beltagy et al., 2020).
* :func:`strided` — Sparse Transformer's strided pattern (Child et al., 2019) at
  block granularity: a local band plus every ``stride``-th block back.
* :func:`radial` — Radial Attention for video (Li et al., 2025): tokens of frames
  at temporal distance d attend within a spatial window that halves each time d
  doubles, so compute grows as O(n log n) in the number of frames.

All builders take sizes in tokens and blocks in tokens; masks are shared across
batch entries (batch dim 1) and, unless ``heads`` is given, across heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..checks import check_int
from .block_mask import BlockMask, _cdiv


def _causal_blocks(rows: int, cols: int, bq: int, bk: int, nq: int, nk: int) -> torch.Tensor:
    """(R, C) True where some query of block r may see some key of block c under the bottom-right causal mask."""
    row_last = torch.clamp(torch.arange(rows) * bq + bq, max=nq) - 1
    return torch.arange(cols)[None, :] * bk <= row_last[:, None] + (nk - nq)


def local_global_random(seqlen: int, block_size: int, *, window: int = 1, global_blocks: int = 1,
                        random_blocks: int = 0, causal: bool = False, heads: Optional[int] = None,
                        seqlen_k: Optional[int] = None, seed: int = 0) -> BlockMask:
    """BigBird's pattern: local band + global blocks + random blocks.

    Args:
        seqlen: Nq (and Nk unless ``seqlen_k`` is given), in tokens.
        block_size: BQ = BK, tokens per block.
        window: local band half-width in blocks: query block r sees key blocks
            r - window ... r + window (only up to r when ``causal``). Blocks are aligned
            on the diagonal r*BQ + Nk - Nq when Nq != Nk.
        global_blocks: the first ``global_blocks`` blocks are global: they see every key
            block and every query block sees them.
        random_blocks: extra key blocks per query block, drawn uniformly (per head when
            ``heads`` is given) with ``seed``.
        causal: drop blocks wholly above the bottom-right diagonal (use with
            ``block_sparse_attention(..., causal=True)``).
        heads: build one pattern per head (random blocks differ); None shares one.

    Returns:
        BlockMask with batch dim 1, head dim ``heads`` or 1.
    """
    nq = check_int("seqlen", seqlen, minimum=1)
    nk = nq if seqlen_k is None else check_int("seqlen_k", seqlen_k, minimum=1)
    bs = check_int("block_size", block_size, minimum=1)
    check_int("window", window, minimum=0)
    check_int("global_blocks", global_blocks, minimum=0)
    check_int("random_blocks", random_blocks, minimum=0)
    hm = 1 if heads is None else check_int("heads", heads, minimum=1)
    rows, cols = _cdiv(nq, bs), _cdiv(nk, bs)
    diag = (torch.arange(rows) * bs + (nk - nq)).div(bs, rounding_mode="floor")   # key block of each row's start
    c = torch.arange(cols)
    dense = ((c[None, :] - diag[:, None]).abs() <= window)[None].repeat(hm, 1, 1)   # (Hm, R, C)
    dense[:, :, :global_blocks] = True
    dense[:, :global_blocks, :] = True
    if random_blocks:
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(hm, rows, cols, generator=g)
        picks = scores.topk(min(random_blocks, cols), dim=-1).indices
        dense.scatter_(-1, picks, True)
    if causal:
        dense &= _causal_blocks(rows, cols, bs, bs, nq, nk)
    return BlockMask.from_dense(dense[None], bs, (nq, nk))


def longformer(seqlen: int, block_size: int, *, window: int = 1, global_blocks: int = 1, causal: bool = False,
               seqlen_k: Optional[int] = None) -> BlockMask:
    """Longformer's pattern: sliding band of ``window`` blocks each side plus ``global_blocks`` global blocks."""
    return local_global_random(seqlen, block_size, window=window, global_blocks=global_blocks, random_blocks=0,
                               causal=causal, seqlen_k=seqlen_k)


bigbird = local_global_random


def strided(seqlen: int, block_size: int, *, stride: int, local_blocks: Optional[int] = None,
            causal: bool = True) -> BlockMask:
    """Sparse Transformer's strided pattern (Child et al., 2019), in blocks.

    Query block r sees the ``local_blocks`` blocks ending at r (default ``stride``) and
    every block c with (r - c) a multiple of ``stride``; with ``causal=False`` the same
    holds in both directions (|r - c| < local_blocks or (r - c) % stride == 0).
    """
    n = check_int("seqlen", seqlen, minimum=1)
    bs = check_int("block_size", block_size, minimum=1)
    stride = check_int("stride", stride, minimum=1)
    local = stride if local_blocks is None else check_int("local_blocks", local_blocks, minimum=1)
    blocks = _cdiv(n, bs)
    r = torch.arange(blocks)[:, None]
    c = torch.arange(blocks)[None, :]
    dist = r - c
    dense = (dist.abs() < local) | (dist % stride == 0)
    if causal:
        dense &= dist >= 0
    return BlockMask.from_dense(dense, bs, (n, n))


def radial_mask_fn(frames: int, tokens_per_frame: int, *, dense_frames: int = 1, sink_frames: int = 1,
                   min_width: int = 1, decay_factor: float = 1.0):
    """Radial Attention's token mask as ``fn(b, h, q_idx, kv_idx)`` (for BlockMask.from_mask_fn).

    Token t is (frame t // T, spatial index t % T), T = tokens_per_frame, frame-major.
    Following the released implementation (mit-han-lab/radial-attention):

    * keys in the first ``sink_frames`` frames are seen by every query (an attention sink);
    * frames at temporal distance d <= ``dense_frames`` attend densely;
    * a farther frame falls in group g = bit_length(d) (d in [2^(g-1), 2^g)); its spatial
      band keeps |s_q - s_k| <= w with ``w = max(decay * decay_factor, min_width)`` and
      ``decay = 2^bit_length(T) / 2^g``: the band halves each time the distance doubles;
    * once ``decay < min_width`` the band stays ``min_width`` wide and only every
      ``floor(min_width / decay)``-th frame is kept, so compute keeps halving.

    Each query keeps O(T log frames) keys: the mask has O(n log n) pairs. The sizes are
    checked here, when the function is built (TypeError/ValueError naming the argument).
    """
    check_int("frames", frames, minimum=1)
    T = check_int("tokens_per_frame", tokens_per_frame, minimum=1)
    check_int("dense_frames", dense_frames, minimum=0)
    check_int("sink_frames", sink_frames, minimum=0)
    check_int("min_width", min_width, minimum=1)
    if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)):
        raise TypeError(f"decay_factor must be a float, got {type(decay_factor).__name__}")
    if not (math.isfinite(decay_factor) and decay_factor > 0):
        raise ValueError(f"decay_factor must be a finite number > 0, got {decay_factor}")
    top = float(1 << T.bit_length())

    def fn(b, h, q_idx, kv_idx):
        fq, sq = q_idx // T, q_idx % T
        fk, sk = kv_idx // T, kv_idx % T
        d = (fq - fk).abs()
        group = torch.floor(torch.log2(d.clamp(min=1).double())) + 1                       # bit_length(d)
        decay = top / torch.pow(2.0, group)
        width = torch.clamp(decay * decay_factor, min=float(min_width))
        split = torch.where(decay >= min_width, torch.ones_like(decay),
                            torch.floor(min_width / decay)).long()
        banded = ((sq - sk).abs().double() <= width) & (d % split == 0)
        return (d <= dense_frames) | (fk < sink_frames) | banded

    return fn


def radial(frames: int, tokens_per_frame: int, block_size: int, *, dense_frames: int = 1, sink_frames: int = 1,
           decay_factor: float = 1.0, causal: bool = False) -> BlockMask:
    """Radial Attention's O(n log n) video pattern (Li et al., 2025) at block granularity.

    The sequence is ``frames * tokens_per_frame`` tokens, frame-major; the token rule is
    :func:`radial_mask_fn` with the band never narrower than one block
    (``min_width=block_size``, as the released implementation does). A tile is listed
    when any of its token pairs is kept; choose ``block_size`` dividing
    ``tokens_per_frame`` to keep tiles inside frames. With ``causal`` keys of later
    frames are dropped block-wise.
    """
    bs = check_int("block_size", block_size, minimum=1)
    # radial_mask_fn checks the other arguments
    fn = radial_mask_fn(frames, tokens_per_frame, dense_frames=dense_frames, sink_frames=sink_frames, min_width=bs,
                        decay_factor=decay_factor)
    n = frames * tokens_per_frame
    if causal:
        base = fn

        def fn(b, h, q_idx, kv_idx):  # noqa: F811 - the causal restriction of the same mask
            return base(b, h, q_idx, kv_idx) & (kv_idx <= q_idx)
    return BlockMask.from_mask_fn(fn, None, None, n, n, bs)


__all__ = ["bigbird", "local_global_random", "longformer", "radial", "radial_mask_fn", "strided"]
