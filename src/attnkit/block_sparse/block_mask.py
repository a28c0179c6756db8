"""``attnkit.BlockMask``: which (query block, key block) tiles an attention computes.

The canonical form is FlexAttention's (also FlashAttention 4's): for every
(batch, head, query block) a count and an ordered list of key-block indices,
int32. The batch and head dims may be 1, meaning "the same for every batch entry /
head". The transposed lists (for every key block, the query blocks that list it),
which the backward pass walks, are built once on first use and cached, as are the
engine's block lists for ``causal=False`` and ``causal=True``.

A BlockMask may carry a ``mask_mod`` (an :class:`attnkit.MaskMod`), as FlexAttention's
does: its lists are then split into *partial* tiles (``kv_num_blocks``/``kv_indices``,
computed with the mask_mod) and *full* tiles (``full_kv_num_blocks``/``full_kv_indices``,
computed whole), and the result is the exact token mask. :func:`create_block_mask`
builds one from a mask_mod. Without a mask_mod every pair of a listed tile attends.
The optional causal mask of :func:`attnkit.block_sparse_attention` applies on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..engine import dense_to_lists, make_block_lists
from ..mods import MaskMod, Problem

BlockSize = int | Sequence[int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pair(name: str, value: Any) -> tuple[int, int]:
    """An int or a pair of ints, each >= 1."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool")
    if isinstance(value, int):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        if x < 1:
            raise ValueError(f"{name} entries must be >= 1, got {tuple(value)}")
        out.append(int(x))
    return out[0], out[1]


def lists_to_dense(counts: torch.Tensor, index: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Counts (..., R) and indices (..., R, L) -> boolean (..., R, num_cols); entries past a count are ignored."""
    valid = torch.arange(index.shape[-1], device=index.device) < counts[..., None].long()
    target = torch.where(valid, index.long(), torch.full_like(index, num_cols, dtype=torch.long))
    dense = torch.zeros(*index.shape[:-1], num_cols + 1, dtype=torch.bool, device=index.device)
    dense.scatter_(-1, target, True)
    return dense[..., :num_cols]


def _check_list_tensors(count_name: str, index_name: str, kv_num_blocks: Any, kv_indices: Any) -> None:
    """Counts (B, H, R) and indices (B, H, R, L): integer tensors of matching shapes on one device."""
    for name, t, rank in ((count_name, kv_num_blocks, 3), (index_name, kv_indices, 4)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
        # the range checks read the values as int64, which must hold every value of the dtype
        # (uint64 does not: 2**63 would read as a negative block)
        if (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool
                or torch.iinfo(t.dtype).max > torch.iinfo(torch.int64).max):
            raise TypeError(f"{name} must be an integer tensor (int32, or an integer type int64 holds), "
                            f"got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} ({'(B, H, R)' if rank == 3 else '(B, H, R, L)'}), "
                             f"got shape {tuple(t.shape)}")
    if kv_indices.shape[:3] != kv_num_blocks.shape:
        raise ValueError(f"{index_name} {tuple(kv_indices.shape)} must be (B, H, R, L) with (B, H, R) = "
                         f"{count_name}.shape {tuple(kv_num_blocks.shape)}")
    if kv_indices.device != kv_num_blocks.device:
        raise ValueError(f"{index_name} is on {kv_indices.device} but {count_name} is on {kv_num_blocks.device}")


def _check_list_values(count_name: str, index_name: str, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                       cols: int) -> None:
    """Counts within the lists and listed key blocks in [0, cols), checked on the values as
    given (as int64), before any narrowing cast: int32(2**32) would be block 0."""
    capacity = kv_indices.shape[-1]
    counts64 = kv_num_blocks.long()
    if counts64.numel() and (int(counts64.min()) < 0 or int(counts64.max()) > capacity):
        raise ValueError(f"{count_name} holds counts in [{int(counts64.min())}, {int(counts64.max())}] but each "
                         f"list of {index_name} has {capacity} entries; counts must be in [0, {capacity}]")
    valid = torch.arange(capacity, device=kv_indices.device) < counts64[..., None]
    used = kv_indices[valid].long()
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= cols):
        raise ValueError(f"{index_name} holds key block {int(used.min()) if int(used.min()) < 0 else int(used.max())}"
                         f" out of range: there are {cols} key blocks (valid indices 0..{cols - 1})")


def _checked_lists(count_name: str, index_name: str, kv_num_blocks: Any, kv_indices: Any, rows: int, cols: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated int32 (counts, indices) and their boolean (Bm, Hm, R, C) tile map."""
    _check_list_tensors(count_name, index_name, kv_num_blocks, kv_indices)
    if 0 in kv_num_blocks.shape[:2]:
        raise ValueError(f"{count_name} must have batch and head dims >= 1, got {tuple(kv_num_blocks.shape)}")
    if kv_num_blocks.shape[2] != rows:
        raise ValueError(f"block sizes do not match the lists: the block size gives {rows} query blocks, but "
                         f"{count_name} has {kv_num_blocks.shape[2]} rows")
    _check_list_values(count_name, index_name, kv_num_blocks, kv_indices, cols)
    counts = kv_num_blocks.to(torch.int32).contiguous()
    index = kv_indices.to(torch.int32).contiguous()
    dense = lists_to_dense(counts, index, cols)
    if int(dense.sum()) != int(counts.long().sum()):
        raise ValueError(f"{index_name} lists the same key block twice in one row; each listed block must be distinct")
    return counts, index, dense


class BlockMask:
    """Block-sparsity structure of an attention problem (FlexAttention's canonical form).

    Attributes:
        kv_num_blocks: int32 (Bm, Hm, R): how many key blocks query block r lists;
            Bm is 1 or the batch size, Hm is 1 or the number of query heads. With a
            ``mask_mod`` these are the partial tiles (computed with it).
        kv_indices: int32 (Bm, Hm, R, L): the listed key-block indices, in order
            (entries past the count are padding).
        full_kv_num_blocks, full_kv_indices: the same for tiles computed whole without
            the mask_mod (None when there are none).
        mask_mod: the :class:`attnkit.MaskMod` of the partial tiles, or None.
        block_size: (BQ, BK), tokens per query block and per key block.
        seq_lens: (Nq, Nk), the sequence lengths the mask was built for;
            R = ceil(Nq / BQ) query blocks and C = ceil(Nk / BK) key blocks.
        q_num_blocks, q_indices: the transposed lists, int32 (Bm, Hm, C) and
            (Bm, Hm, C, L'): for each key block, the query blocks that list it
            (built on first use, cached).

    Build one with :func:`attnkit.create_block_mask` (exact, from a MaskMod),
    :meth:`from_dense`, :meth:`from_mask_fn`, :meth:`from_torch`, the builders in
    :mod:`attnkit.patterns`, or the constructor from lists. The constructor checks the
    lists (indices in range, counts within the list, no repeated block in a row, no
    tile both full and partial) and raises ValueError/TypeError naming the argument.
    """

    def __init__(self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: BlockSize,
                 seq_lens: Sequence[int], *, full_kv_num_blocks: torch.Tensor | None = None,
                 full_kv_indices: torch.Tensor | None = None, mask_mod: MaskMod | None = None):
        self.block_size = _pair("block_size", block_size)
        self.seq_lens = _pair("seq_lens", seq_lens)
        if mask_mod is not None and not isinstance(mask_mod, MaskMod):
            raise TypeError(f"mask_mod must be an attnkit.MaskMod, got {type(mask_mod).__name__}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        (bq, bk), (nq, nk) = self.block_size, self.seq_lens
        rows, cols = _cdiv(nq, bq), _cdiv(nk, bk)
        counts, index, dense = _checked_lists("kv_num_blocks", "kv_indices", kv_num_blocks, kv_indices, rows, cols)
        full_dense = torch.zeros_like(dense)
        self.full_kv_num_blocks = self.full_kv_indices = None
        if full_kv_num_blocks is not None:
            f_counts, f_index, full_dense = _checked_lists("full_kv_num_blocks", "full_kv_indices",
                                                           full_kv_num_blocks, full_kv_indices, rows, cols)
            if full_dense.shape[:2] != dense.shape[:2] or f_index.device != index.device:
                raise ValueError(f"full_kv_num_blocks {tuple(f_counts.shape)} must match kv_num_blocks "
                                 f"{tuple(counts.shape)} in shape and device")
            if bool((full_dense & dense).any()):
                raise ValueError("a tile is listed both as partial (kv_indices) and as full (full_kv_indices)")
            self.full_kv_num_blocks, self.full_kv_indices = f_counts, f_index
        self.kv_num_blocks = counts
        self.kv_indices = index
        self.mask_mod = mask_mod
        self._partial = dense
        self._full = full_dense
        self._dense = dense | full_dense
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._engine_cache: dict[Any, Any] = {}
        self._device_cache: dict[torch.device, BlockMask] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, block_bool: torch.Tensor, block_size: BlockSize,
                   seq_lens: Sequence[int] | None = None) -> BlockMask:
        """From a boolean block matrix.

        Args:
            block_bool: bool (R, C), (Hm, R, C) or (Bm, Hm, R, C); True where query block r
                computes key block c. Missing leading dims are 1 (broadcast).
            block_size: BQ or (BQ, BK), tokens per query / key block.
            seq_lens: (Nq, Nk); default (R * BQ, C * BK). R must be ceil(Nq / BQ) and
                C ceil(Nk / BK).
        """
        if not isinstance(block_bool, torch.Tensor) or block_bool.dtype != torch.bool:
            got = block_bool.dtype if isinstance(block_bool, torch.Tensor) else type(block_bool).__name__
            raise TypeError(f"block_bool must be a bool tensor, got {got}")
        if not 2 <= block_bool.dim() <= 4:
            raise ValueError(f"block_bool must have shape (R, C), (H, R, C) or (B, H, R, C), "
                             f"got {tuple(block_bool.shape)}")
        while block_bool.dim() < 4:
            block_bool = block_bool.unsqueeze(0)
        bq, bk = _pair("block_size", block_size)
        rows, cols = block_bool.shape[-2:]
        nq, nk = _pair("seq_lens", seq_lens) if seq_lens is not None else (rows * bq, cols * bk)
        if (rows, cols) != (_cdiv(nq, bq), _cdiv(nk, bk)):
            raise ValueError(f"block_bool has {rows} x {cols} blocks but seq_lens {(nq, nk)} with block_size "
                             f"{(bq, bk)} needs {_cdiv(nq, bq)} x {_cdiv(nk, bk)}")
        counts, index = dense_to_lists(block_bool)
        return cls(counts, index, (bq, bk), (nq, nk))

    @classmethod
    def from_mask_fn(cls, fn: Callable[..., torch.Tensor], B: int | None, H: int | None, Nq: int, Nk: int,
                     block_size: BlockSize, *, device: str | torch.device = "cpu",
                     chunk_elements: int = 1 << 24) -> BlockMask:
        """From a token mask function, at block granularity: a tile is listed when any of its pairs is
        True, and attention computes every pair of a listed tile (no mask_mod is kept; for
        token-exact FlexAttention semantics use :func:`create_block_mask` with a MaskMod).
        ``q_idx`` is the query row 0..Nq-1 (top-left, as FlexAttention's).

        ``fn(b, h, q_idx, kv_idx) -> bool tensor`` is called vectorized, with int64 tensors
        of shapes (Bm, 1, 1, 1), (1, Hm, 1, 1), (1, 1, Mq, 1) and (1, 1, 1, Mk), and must
        return a bool tensor broadcastable to (Bm, Hm, Mq, Mk) (FlexAttention mask_mods
        written with broadcasting ops such as ``q_idx >= kv_idx`` work as they are).
        ``B`` / ``H`` of None (or 1) build a mask shared by every batch entry / head
        (fn then sees b = 0 / h = 0). The (Nq, Nk) plane is evaluated in chunks of about
        ``chunk_elements`` pairs, so a 128k x 128k mask is never allocated.
        """
        bq, bk = _pair("block_size", block_size)
        bm = 1 if B is None else B
        hm = 1 if H is None else H
        for name, val in (("B", bm), ("H", hm), ("Nq", Nq), ("Nk", Nk)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(b, h, q_idx, kv_idx), got {type(fn).__name__}")
        rows, cols = _cdiv(Nq, bq), _cdiv(Nk, bk)
        dense = torch.zeros(bm, hm, rows, cols, dtype=torch.bool, device=device)
        b = torch.arange(bm, device=device).view(-1, 1, 1, 1)
        h = torch.arange(hm, device=device).view(1, -1, 1, 1)
        per_pair = bm * hm
        # key chunk of about sqrt(budget) tokens, query chunk filling the rest of the budget
        k_chunk = max(1, min(cols, math.isqrt(max(1, chunk_elements // per_pair)) // bk))
        q_chunk = max(1, min(rows, chunk_elements // (per_pair * k_chunk * bk * bq)))
        for r0 in range(0, rows, q_chunk):
            nr = min(q_chunk, rows - r0)
            q_idx = torch.arange(r0 * bq, (r0 + nr) * bq, device=device)
            q_ok = q_idx < Nq
            for c0 in range(0, cols, k_chunk):
                nc = min(k_chunk, cols - c0)
                k_idx = torch.arange(c0 * bk, (c0 + nc) * bk, device=device)
                k_ok = k_idx < Nk
                m = fn(b, h, q_idx.clamp(max=Nq - 1).view(1, 1, -1, 1), k_idx.clamp(max=Nk - 1).view(1, 1, 1, -1))
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                    raise TypeError("fn(b, h, q_idx, kv_idx) must return a bool tensor, got "
                                    f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
                target = (bm, hm, nr * bq, nc * bk)
                if m.dim() > 4 or any(n not in (1, t) for n, t in zip(m.shape[::-1], target[::-1])):
                    raise ValueError(f"fn(b, h, q_idx, kv_idx) returned shape {tuple(m.shape)}, which is not "
                                     f"broadcastable to (Bm, Hm, Mq, Mk) = {target} (this chunk's batch entries, "
                                     "heads, query and key positions); build the mask from its arguments with "
                                     "broadcasting operations, e.g. q_idx >= kv_idx")
                m = torch.broadcast_to(m, target) & q_ok[:, None] & k_ok[None, :]
                dense[:, :, r0:r0 + nr, c0:c0 + nc] = m.view(bm, hm, nr, bq, nc, bk).any(dim=5).any(dim=3)
        return cls.from_dense(dense, (bq, bk), (Nq, Nk))

    @classmethod
    def from_torch(cls, block_mask: Any) -> BlockMask:
        """From a ``torch.nn.attention.flex_attention.BlockMask``: its partial and full
        blocks are merged into one list. Its ``mask_mod`` is not kept: attnkit computes
        every pair of a listed tile (so the result equals FlexAttention with the same
        block structure and ``noop_mask``)."""
        if not all(hasattr(block_mask, a) for a in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths")):
            raise TypeError(f"block_mask must be a torch FlexAttention BlockMask, got {type(block_mask).__name__}")
        bq, bk = block_mask.BLOCK_SIZE
        nq, nk = block_mask.seq_lengths
        rows, cols = _cdiv(nq, bq), _cdiv(nk, bk)
        dense = None
        for kind in ("", "full_"):
            counts, index = getattr(block_mask, f"{kind}kv_num_blocks"), getattr(block_mask, f"{kind}kv_indices")
            if counts is None:
                continue
            names = f"block_mask.{kind}kv_num_blocks", f"block_mask.{kind}kv_indices"
            _check_list_tensors(*names, counts, index)
            # only the first ceil(Nq / BQ) rows are kept; in them, an index out of range would
            # be dropped silently (== C) or fail inside scatter_
            counts, index = counts[..., :rows], index[..., :rows, :]
            _check_list_values(*names, counts, index, cols)
            tiles = lists_to_dense(counts, index, cols)
            dense = tiles if dense is None else dense | tiles
        return cls.from_dense(dense.contiguous(), (int(bq), int(bk)), (int(nq), int(nk)))

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, Hm, R, C): batch and head dims of the lists (1 = broadcast), query and key blocks."""
        bm, hm, rows = self.kv_num_blocks.shape
        return bm, hm, rows, self.num_key_blocks

    @property
    def num_key_blocks(self) -> int:
        return _cdiv(self.seq_lens[1], self.block_size[1])

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def to_dense(self) -> torch.Tensor:
        """Boolean (Bm, Hm, R, C): True where a tile is computed."""
        return self._dense.clone()

    def sparsity(self) -> float:
        """Percentage of tiles not computed: 100 * (1 - listed / (Bm * Hm * R * C)), i.e. of the padded
        (R * BQ) x (C * BK) grid. torch's BlockMask.sparsity() divides by the unpadded Nq * Nk
        instead, so the two differ (torch's can be negative) when Nq or Nk is not a multiple
        of the block size."""
        bm, hm, rows, cols = self.shape
        return 100.0 * (1.0 - int(self._dense.sum()) / (bm * hm * rows * cols))

    def density(self) -> float:
        """Fraction of tiles computed, in [0, 1]."""
        return 1.0 - self.sparsity() / 100.0

    def _transpose(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._transposed is None:
            self._transposed = dense_to_lists(self._dense.transpose(-1, -2))
        return self._transposed

    @property
    def q_num_blocks(self) -> torch.Tensor:
        """int32 (Bm, Hm, C): for each key block, how many query blocks list it."""
        return self._transpose()[0]

    @property
    def q_indices(self) -> torch.Tensor:
        """int32 (Bm, Hm, C, L'): for each key block, the query blocks that list it (ascending)."""
        return self._transpose()[1]

    def to(self, device: str | torch.device) -> BlockMask:
        """This mask on ``device`` (cached; self when already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if device not in self._device_cache:
            moved = BlockMask.__new__(BlockMask)
            moved.block_size, moved.seq_lens, moved.mask_mod = self.block_size, self.seq_lens, self.mask_mod
            moved.kv_num_blocks = self.kv_num_blocks.to(device)
            moved.kv_indices = self.kv_indices.to(device)
            moved.full_kv_num_blocks = moved.full_kv_indices = None
            if self.full_kv_num_blocks is not None:
                moved.full_kv_num_blocks = self.full_kv_num_blocks.to(device)
                moved.full_kv_indices = self.full_kv_indices.to(device)
            moved._partial, moved._full, moved._dense = (t.to(device) for t in (self._partial, self._full, self._dense))
            moved._transposed = None
            moved._engine_cache, moved._device_cache = {}, {}
            self._device_cache[device] = moved
        return self._device_cache[device]

    def to_torch(self, causal: bool = False) -> Any:
        """This mask as a ``torch.nn.attention.flex_attention.BlockMask``.

        FlexAttention's semantics live in the ``mask_mod`` (its block lists only skip
        work), so the result carries a ``mask_mod`` that looks the tile up in this mask
        (and applies this mask's own mask_mod, through its PyTorch reference, and the
        bottom-right causal mask when ``causal``): ``flex_attention(q, k, v,
        block_mask=bm.to_torch(causal))`` equals ``block_sparse_attention(q, k, v, bm,
        causal=causal)`` for Nq == Nk (torch's positions are top-left; they are shifted
        to attnkit's bottom-right ones). Tiles that need no token mask are FlexAttention
        "full" blocks. Raises RuntimeError when this torch has no FlexAttention.
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
        except ImportError as exc:  # pragma: no cover - torch >= 2.5 has it
            raise RuntimeError(f"this torch ({torch.__version__}) has no FlexAttention BlockMask") from exc
        (bq, bk), (nq, nk) = self.block_size, self.seq_lens
        full, part = self.causal_split(causal)
        cols = self.num_key_blocks
        tiles = self._dense
        per_batch, per_head = tiles.shape[0] > 1, tiles.shape[1] > 1
        offset = nk - nq
        token_mask = None
        if self.mask_mod is not None:
            bm, hm = tiles.shape[:2]
            token_mask = self.mask_mod.specialize(Problem("block_sparse", bm, hm, nq, nk, self.device))

        def mask_mod(b, h, q_idx, kv_idx):
            keep = tiles[b if per_batch else 0, h if per_head else 0, q_idx // bq, kv_idx // bk]
            if token_mask is not None:
                keep = keep & token_mask.apply(b, h, q_idx + offset, kv_idx)
            return keep & (kv_idx <= q_idx + offset) if causal else keep

        return FlexBlockMask.from_kv_blocks(*dense_to_lists(part, capacity=cols), *dense_to_lists(full, capacity=cols),
                                            BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(nq, nk))

    def __repr__(self) -> str:
        bm, hm, rows, cols = self.shape
        return (f"BlockMask(shape=(B={bm}, H={hm}, {rows} x {cols} blocks), block_size={self.block_size}, "
                f"seq_lens={self.seq_lens}, sparsity={self.sparsity():.1f}%)")

    # ------------------------------------------------------------------ engine lists
    def causal_split(self, causal: bool, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (Bm, Hm, R, C) ``full`` and ``partial`` tiles for the engine.

        Tiles listed as partial need this mask's mask_mod; the others are full. With
        ``masked`` (another token mask applies on top, e.g. an explicit mask_mod) every
        listed tile is partial. With the bottom-right causal mask (query i sees keys
        j <= i + Nk - Nq) a full tile that crosses the diagonal becomes partial, and a
        tile wholly above it is dropped.
        """
        if self.mask_mod is None:
            full, part = self._dense, torch.zeros_like(self._dense)
        else:
            full, part = self._full, self._partial
        if masked:
            full, part = torch.zeros_like(full), full | part
        if not causal:
            return full, part
        (bq, bk), (nq, nk) = self.block_size, self.seq_lens
        _, _, rows, cols = self.shape
        offset = nk - nq
        dev = self.device
        row_first = torch.arange(rows, device=dev) * bq
        row_last = torch.clamp(row_first + bq, max=nq) - 1
        key_first = torch.arange(cols, device=dev) * bk
        key_last = torch.clamp(key_first + bk, max=nk) - 1
        whole = key_last[None, :] <= row_first[:, None] + offset      # every row sees every key
        some = key_first[None, :] <= row_last[:, None] + offset       # some row sees some key
        return full & whole, (part & some) | (full & some & ~whole)

    def engine_lists(self, causal: bool, masked: bool = False) -> Any:
        """The engine's ``BlockLists`` for this mask (cached per ``causal`` and ``masked``)."""
        key = (bool(causal), bool(masked))
        if key not in self._engine_cache:
            self._engine_cache[key] = make_block_lists(*self.block_size, *self.causal_split(*key))
        return self._engine_cache[key]


def create_block_mask(mask_mod: MaskMod, B: int | None, H: int | None, Nq: int, Nk: int, *,
                      block_size: BlockSize = 128, device: str | torch.device | None = None,
                      chunk_elements: int = 1 << 24) -> BlockMask:
    """A BlockMask whose tiles follow ``mask_mod`` exactly (FlexAttention's ``create_block_mask``).

    Tiles where the mask is False for every pair are dropped; tiles where it is True
    for every pair are *full* (computed without the mask); the rest are *partial* and
    carry ``mask_mod``, so attention with the result equals the exact token mask.

    Args:
        mask_mod: an :class:`attnkit.MaskMod` (e.g. ``attnkit.mods.causal()``).
        B, H: batch size and number of query heads, or None for a mask shared by every
            batch entry / head (the mask_mod then sees b = 0 / h = 0).
        Nq, Nk: sequence lengths. Positions are attnkit's: query row i has ``q_idx = i +
            Nk - Nq`` (FlexAttention's ``q_idx = i`` when Nq == Nk).
        block_size: BQ or (BQ, BK) (the kernel needs multiples of 16).
        device: where the mask lives; default the device of the mask_mod's tensors, else
            CUDA when available, else CPU.
        chunk_elements: token pairs evaluated at once (memory is bounded by this, never
            Nq x Nk): the mask_mod's reference runs one chunk of tiles at a time.

    Returns:
        a :class:`BlockMask` with ``mask_mod`` set.

    Examples::

        >>> mask = attnkit.mods.and_masks(attnkit.mods.causal(), attnkit.mods.document(doc_ids))
        >>> block_mask = attnkit.create_block_mask(mask, None, None, 4096, 4096, device="cuda")
        >>> out = attnkit.flex_attention(q, k, v, block_mask=block_mask)
    """
    if not isinstance(mask_mod, MaskMod):
        what = type(mask_mod).__name__
        hint = " (a score modification cannot build a block mask)" if what.endswith("ScoreMod") else ""
        raise TypeError(f"mask_mod must be an attnkit.MaskMod{hint}, got {what}")
    bq, bk = _pair("block_size", block_size)
    bm = 1 if B is None else B
    hm = 1 if H is None else H
    for name, val in (("B", bm), ("H", hm), ("Nq", Nq), ("Nk", Nk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1 (or None for B and H), got {val!r}")
    if device is None:
        device = mask_mod.tensors[0].device if mask_mod.tensors else (
            "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    mm = mask_mod.specialize(Problem("flex", bm, hm, Nq, Nk, device))
    for i, t in enumerate(mm.tensors):
        if t.device != device:
            raise ValueError(f"mask_mod ({mm.name}): tensors[{i}] is on {t.device} but device is {device}")
    rows, cols = _cdiv(Nq, bq), _cdiv(Nk, bk)
    some = torch.zeros(bm, hm, rows, cols, dtype=torch.bool, device=device)
    every = torch.zeros_like(some)
    b = torch.arange(bm, device=device).view(-1, 1, 1, 1)
    h = torch.arange(hm, device=device).view(1, -1, 1, 1)
    per_pair = bm * hm
    k_chunk = max(1, min(cols, math.isqrt(max(1, chunk_elements // per_pair)) // bk))
    q_chunk = max(1, min(rows, chunk_elements // (per_pair * k_chunk * bk * bq)))
    for r0 in range(0, rows, q_chunk):
        nr = min(q_chunk, rows - r0)
        q_rows = torch.arange(r0 * bq, (r0 + nr) * bq, device=device)
        q_ok = q_rows < Nq
        q_idx = q_rows.clamp(max=Nq - 1) + (Nk - Nq)
        for c0 in range(0, cols, k_chunk):
            nc = min(k_chunk, cols - c0)
            k_rows = torch.arange(c0 * bk, (c0 + nc) * bk, device=device)
            k_ok = k_rows < Nk
            keep = mm.apply(b, h, q_idx.view(1, 1, -1, 1), k_rows.clamp(max=Nk - 1).view(1, 1, 1, -1))
            keep = torch.broadcast_to(keep, (bm, hm, nr * bq, nc * bk))
            valid = q_ok[:, None] & k_ok[None, :]
            tiles = (keep & valid).view(bm, hm, nr, bq, nc, bk)
            some[:, :, r0:r0 + nr, c0:c0 + nc] = tiles.any(dim=5).any(dim=3)
            whole = (keep | ~valid).view(bm, hm, nr, bq, nc, bk)
            every[:, :, r0:r0 + nr, c0:c0 + nc] = whole.all(dim=5).all(dim=3)
    full = some & every
    partial = some & ~every
    counts, index = dense_to_lists(partial)
    full_counts, full_index = dense_to_lists(full)
    return BlockMask(counts, index, (bq, bk), (Nq, Nk), full_kv_num_blocks=full_counts, full_kv_indices=full_index,
                     mask_mod=mask_mod)
