"""``attnkit.BlockMask``: which (query block, key block) tiles an attention computes.

The canonical form is FlexAttention's (also FlashAttention 4's): for every
(batch, head, query block) a count and an ordered list of key-block indices,
int32. The batch and head dims may be 1, meaning "the same for every batch entry /
head". The transposed lists (for every key block, the query blocks that list it),
which the backward pass walks, are built once on first use and cached, as are the
engine's block lists for ``causal=False`` and ``causal=True``.

Inside a listed tile every (query, key) pair attends; the optional causal mask of
:func:`attnkit.block_sparse_attention` is applied on top.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..engine import dense_to_lists

BlockSize = Union[int, Sequence[int]]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pair(name: str, value: Any) -> Tuple[int, int]:
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


class BlockMask:
    """Block-sparsity structure of an attention problem (FlexAttention's canonical form).

    Attributes:
        kv_num_blocks: int32 (Bm, Hm, R): how many key blocks query block r lists;
            Bm is 1 or the batch size, Hm is 1 or the number of query heads.
        kv_indices: int32 (Bm, Hm, R, L): the listed key-block indices, in order
            (entries past the count are padding).
        block_size: (BQ, BK), tokens per query block and per key block.
        seq_lens: (Nq, Nk), the sequence lengths the mask was built for;
            R = ceil(Nq / BQ) query blocks and C = ceil(Nk / BK) key blocks.
        q_num_blocks, q_indices: the transposed lists, int32 (Bm, Hm, C) and
            (Bm, Hm, C, L'): for each key block, the query blocks that list it
            (built on first use, cached).

    Build one with :meth:`from_dense`, :meth:`from_mask_fn`, :meth:`from_torch`,
    the builders in :mod:`attnkit.patterns`, or the constructor from lists. The
    constructor checks the lists (indices in range, counts within the list, no
    repeated block in a row) and raises ValueError/TypeError naming the argument.
    """

    def __init__(self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: BlockSize,
                 seq_lens: Sequence[int]):
        self.block_size = _pair("block_size", block_size)
        self.seq_lens = _pair("seq_lens", seq_lens)
        for name, t, rank in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")
            if t.dim() != rank:
                raise ValueError(f"{name} must have rank {rank} ({'(B, H, R)' if rank == 3 else '(B, H, R, L)'}), "
                                 f"got shape {tuple(t.shape)}")
        if kv_indices.shape[:3] != kv_num_blocks.shape:
            raise ValueError(f"kv_indices {tuple(kv_indices.shape)} must be (B, H, R, L) with (B, H, R) = "
                             f"kv_num_blocks.shape {tuple(kv_num_blocks.shape)}")
        if kv_indices.device != kv_num_blocks.device:
            raise ValueError(f"kv_indices is on {kv_indices.device} but kv_num_blocks is on {kv_num_blocks.device}")
        if 0 in kv_num_blocks.shape[:2]:
            raise ValueError(f"kv_num_blocks must have batch and head dims >= 1, got {tuple(kv_num_blocks.shape)}")
        (bq, bk), (nq, nk) = self.block_size, self.seq_lens
        rows, cols = _cdiv(nq, bq), _cdiv(nk, bk)
        if kv_num_blocks.shape[2] != rows:
            raise ValueError(f"block sizes do not match the lists: seq_lens[0]={nq} with block_size[0]={bq} gives "
                             f"{rows} query blocks, but kv_num_blocks has {kv_num_blocks.shape[2]} rows")
        counts = kv_num_blocks.to(torch.int32)
        index = kv_indices.to(torch.int32)
        capacity = index.shape[-1]
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > capacity):
            raise ValueError(f"kv_num_blocks holds counts in [{int(counts.min())}, {int(counts.max())}] but each "
                             f"list of kv_indices has {capacity} entries; counts must be in [0, {capacity}]")
        valid = torch.arange(capacity, device=index.device) < counts[..., None]
        used = index[valid]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= cols):
            raise ValueError(f"kv_indices holds key block {int(used.min()) if int(used.min()) < 0 else int(used.max())}"
                             f" out of range: seq_lens[1]={nk} with block_size[1]={bk} gives {cols} key blocks "
                             f"(valid indices 0..{cols - 1})")
        dense = lists_to_dense(counts, index, cols)
        if int(dense.sum()) != int(counts.sum()):
            raise ValueError("kv_indices lists the same key block twice in one row; each listed block must be distinct")
        self.kv_num_blocks = counts.contiguous()
        self.kv_indices = index.contiguous()
        self._dense = dense
        self._transposed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._engine_cache: Dict[Any, Any] = {}
        self._device_cache: Dict[torch.device, "BlockMask"] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, block_bool: torch.Tensor, block_size: BlockSize,
                   seq_lens: Optional[Sequence[int]] = None) -> "BlockMask":
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
    def from_mask_fn(cls, fn: Callable[..., torch.Tensor], B: Optional[int], H: Optional[int], Nq: int, Nk: int,
                     block_size: BlockSize, *, device: Union[str, torch.device] = "cpu",
                     chunk_elements: int = 1 << 24) -> "BlockMask":
        """From a token mask function, at block granularity: a tile is listed when any of its pairs is True.

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
                m = torch.broadcast_to(m, (bm, hm, nr * bq, nc * bk)) & q_ok[:, None] & k_ok[None, :]
                dense[:, :, r0:r0 + nr, c0:c0 + nc] = m.view(bm, hm, nr, bq, nc, bk).any(dim=5).any(dim=3)
        return cls.from_dense(dense, (bq, bk), (Nq, Nk))

    @classmethod
    def from_torch(cls, block_mask: Any) -> "BlockMask":
        """From a ``torch.nn.attention.flex_attention.BlockMask``: its partial and full
        blocks are merged into one list. Its ``mask_mod`` is not kept: attnkit computes
        every pair of a listed tile (so the result equals FlexAttention with the same
        block structure and ``noop_mask``)."""
        if not all(hasattr(block_mask, a) for a in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths")):
            raise TypeError(f"block_mask must be a torch FlexAttention BlockMask, got {type(block_mask).__name__}")
        bq, bk = block_mask.BLOCK_SIZE
        nq, nk = block_mask.seq_lengths
        cols = _cdiv(nk, bk)
        dense = lists_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, cols)
        if block_mask.full_kv_num_blocks is not None:
            dense = dense | lists_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, cols)
        rows = _cdiv(nq, bq)
        return cls.from_dense(dense[..., :rows, :].contiguous(), (int(bq), int(bk)), (int(nq), int(nk)))

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> Tuple[int, int, int, int]:
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
        """Percentage of the (R * BQ) x (C * BK) block grid that is skipped (FlexAttention's definition)."""
        bm, hm, rows, cols = self.shape
        return 100.0 * (1.0 - int(self.kv_num_blocks.sum()) / (bm * hm * rows * cols))

    def density(self) -> float:
        """Fraction of tiles computed, in [0, 1]."""
        return 1.0 - self.sparsity() / 100.0

    def _transpose(self) -> Tuple[torch.Tensor, torch.Tensor]:
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

    def to(self, device: Union[str, torch.device]) -> "BlockMask":
        """This mask on ``device`` (cached; self when already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if device not in self._device_cache:
            moved = BlockMask.__new__(BlockMask)
            moved.block_size, moved.seq_lens = self.block_size, self.seq_lens
            moved.kv_num_blocks = self.kv_num_blocks.to(device)
            moved.kv_indices = self.kv_indices.to(device)
            moved._dense = self._dense.to(device)
            moved._transposed = None
            moved._engine_cache, moved._device_cache = {}, {}
            self._device_cache[device] = moved
        return self._device_cache[device]

    def to_torch(self, causal: bool = False) -> Any:
        """This mask as a ``torch.nn.attention.flex_attention.BlockMask``.

        FlexAttention's semantics live in the ``mask_mod`` (its block lists only skip
        work), so the result carries a ``mask_mod`` that looks the tile up in this mask
        (and applies the bottom-right causal mask when ``causal``): ``flex_attention(q, k,
        v, block_mask=bm.to_torch(causal))`` equals ``block_sparse_attention(q, k, v, bm,
        causal=causal)``. Tiles that need no token mask are FlexAttention "full" blocks.
        Raises RuntimeError when this torch has no FlexAttention.
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

        def mask_mod(b, h, q_idx, kv_idx):
            keep = tiles[b if per_batch else 0, h if per_head else 0, q_idx // bq, kv_idx // bk]
            return keep & (kv_idx <= q_idx + offset) if causal else keep

        return FlexBlockMask.from_kv_blocks(*dense_to_lists(part, capacity=cols), *dense_to_lists(full, capacity=cols),
                                            BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(nq, nk))

    def __repr__(self) -> str:
        bm, hm, rows, cols = self.shape
        return (f"BlockMask(shape=(B={bm}, H={hm}, {rows} x {cols} blocks), block_size={self.block_size}, "
                f"seq_lens={self.seq_lens}, sparsity={self.sparsity():.1f}%)")

    # ------------------------------------------------------------------ engine lists
    def causal_split(self, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boolean (Bm, Hm, R, C) ``full`` and ``partial`` tiles for the engine.

        Without causal every listed tile is full. With the bottom-right causal mask
        (query i sees keys j <= i + Nk - Nq) a listed tile wholly below the diagonal is
        full, one crossing it is partial (the kernel applies the causal token mask), and
        one wholly above it is dropped.
        """
        if not causal:
            return self._dense, torch.zeros_like(self._dense)
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
        full = self._dense & whole
        part = self._dense & some & ~whole
        return full, part

    def engine_lists(self, causal: bool) -> Any:
        """The engine's ``BlockLists`` for this mask (cached per ``causal``)."""
        key = bool(causal)
        if key not in self._engine_cache:
            self._engine_cache[key] = make_block_lists(*self.block_size, *self.causal_split(key))
        return self._engine_cache[key]


def make_block_lists(block_q: int, block_k: int, full: torch.Tensor, part: torch.Tensor) -> Any:
    """The engine's ``BlockLists`` from boolean (Bm, Hm, R, C) full and partial tiles."""
    from ..kernels.engine import BlockLists

    lists = [dense_to_lists(m) for m in (full, part, full.transpose(-1, -2), part.transpose(-1, -2))]
    return BlockLists(block_q, block_k, *(t for pair in lists for t in pair))
