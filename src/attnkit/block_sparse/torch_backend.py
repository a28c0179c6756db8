"""The torch backend (``backend="torch"``) of ``block_sparse`` and ``moba``.

block_sparse: every (batch entry, head or head group, query block) is a *row* of the
BlockMask with its list of key blocks. Rows are grouped by how many blocks they list
(and by whether they need a token mask), and each group is one batched call of
torch's CPU flash kernel (:func:`attnkit.torch_backend.sdpa_with_lse`, or
:func:`attnkit.torch_backend.masked_attention` with a mask) on the query block
against its gathered key blocks. No padding of short lists, no N x N anything: the
work is the listed tiles. A mask shared by the heads gathers each kv head's blocks
once (GQA without copies per query head). Tiles wholly above the causal diagonal are
dropped; token masks (the causal diagonal, a ragged last key block, the BlockMask's
own mask_mod on its partial tiles, an explicit mask_mod) are built only for the rows
that cut a tile. Softcap, score mods and dropout take explicit scores on the same
gathered blocks (in chunks, checkpointed under autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .._reference import expand_kv_heads, lse_dtype
from ..checks import check_scale
from ..dropout import Dropout
from ..merge import merge_attention_rows
from ..mods import MaskMod, ScoreMod
from ..torch_backend import masked_attention, sdpa_with_lse
from .block_mask import BlockMask
from .reference import block_sparse_mods, moba_gate

#: gathered key/value elements per fused call (bounds the copies of the gathered blocks)
GATHER_BUDGET = 1 << 24
#: score elements per call of the explicit-score path (softcap, score mods, dropout)
SCORE_BUDGET = 1 << 22


def _listed(rows: torch.Tensor, count: int) -> torch.Tensor:
    """bool (n, C) rows with exactly ``count`` True each -> their column indices (n, count), ascending."""
    return torch.sort(rows.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :count]


class _Gathers:
    """Gathers of rows (``index_select``) into buffers reused from call to call when autograd
    does not track them: on CPU, a gather into fresh memory pays the page faults of that
    memory every time, several times the copy itself. Under autograd each gather is a new
    tensor (the backward keeps it)."""

    def __init__(self, track: bool):
        self.track = track
        self.buffers: dict[str, torch.Tensor] = {}

    def reserve(self, like: torch.Tensor, rows: int, widths: dict[str, int]) -> None:
        """Allocate the buffers ``name`` for ``rows`` rows of ``widths[name]`` elements at once
        (growing them call by call would fault in fresh memory again)."""
        if not self.track:
            for name, width in widths.items():
                self.buffers[name] = like.new_empty(rows * width)

    def __call__(self, name: str, table: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        if self.track:
            return table.index_select(dim, index)
        shape = list(table.shape)
        shape[dim] = index.numel()
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = table.new_empty(max(numel, 0 if buf is None else 2 * buf.numel()))
        return torch.index_select(table, dim, index, out=buf[:numel].view(shape))


def tracked(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a computation on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def block_sparse_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask,
                       causal: bool = False, scale: float | None = None, softcap: float | None = None,
                       score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None,
                       dropout_p: float = 0.0, return_lse: bool = False):
    """The torch path of :func:`attnkit.block_sparse_attention` (same arguments, no dispatch).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in q's
    dtype [, lse (B, Hq, Nq), float32 (float64 for float64)]; the reference's semantics.
    """
    sm_scale = check_scale(scale, q.shape[-1])
    dropout = Dropout.draw(dropout_p, q.device)
    block_mask = block_mask.to(q.device)
    score_mod, own_mask, extra_mask = block_sparse_mods(q, k, block_mask, score_mod, mask_mod)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = block_mask.block_size
    _, Hm, R, C = block_mask.shape
    offset = Nk - Nq  # bottom-right: query row i sits at key position i + offset
    dev = q.device
    per_head = Hm > 1     # each query head its own lists: rows per head; else per kv head, GQA stacked
    Hg = Hq if per_head else 1
    tiles = block_mask.to_dense().expand(B, Hg, R, C)
    row_first = torch.arange(R, device=dev) * bq + offset                  # key position of a block's first row
    row_last = torch.clamp(torch.arange(1, R + 1, device=dev) * bq, max=Nq) - 1 + offset
    key_first = torch.arange(C, device=dev) * bk
    key_last = torch.clamp(key_first + bk, max=Nk) - 1
    if causal:  # tiles wholly above the diagonal: no row sees a key of them
        tiles = tiles & (key_first[None, :] <= row_last[:, None])
    # rows whose tiles need a token mask
    need = torch.zeros(B, Hg, R, dtype=torch.bool, device=dev)
    if Nk % bk:
        need |= tiles[..., -1]
    if causal:
        need |= (tiles & (key_last[None, :] > row_first[:, None])).any(-1)
    partial = None
    if own_mask is not None:
        partial = block_mask._partial.expand(B, Hg, R, C)
        need |= (tiles & partial).any(-1)
    counts = tiles.sum(-1)
    if extra_mask is not None:
        need |= counts > 0
    explicit = softcap is not None or score_mod is not None or dropout is not None
    with_positions = explicit or own_mask is not None or extra_mask is not None

    # flat tables of blocks, so that a gather is one index_select of contiguous rows
    # (reshape: q, k, v may be strided views, e.g. layout="bshd")
    qb = F.pad(q, (0, 0, 0, R * bq - Nq)).reshape(B, Hq, R, bq * D)
    kb = F.pad(k, (0, 0, 0, C * bk - Nk)).reshape(B, Hkv, C, bk * D)
    vb = F.pad(v, (0, 0, 0, C * bk - Nk)).reshape(B, Hkv, C, bk * Dv)
    if per_head:  # rows (b, h, r); key blocks (b, kv head, c)
        qb, kb, vb = qb.reshape(B * Hq * R, -1), kb.reshape(B * Hkv * C, -1), vb.reshape(B * Hkv * C, -1)
    else:  # rows (b, r) with every query head; key blocks (kv head, (b, c))
        qb = qb.transpose(1, 2).reshape(B * R, Hq * bq * D)
        kb, vb = (x.transpose(0, 1).reshape(Hkv, B * C, -1) for x in (kb, vb))
    groups = Hq // Hkv
    flat_tiles = tiles.reshape(-1, C)
    flat_counts = counts.flatten()
    flat_need = need.flatten()
    key = flat_counts * 2 + flat_need.long()
    parts_out, parts_lse, parts_ids = [], [], []
    track = tracked(q, k, v, *(score_mod.tensors if score_mod is not None else ()))
    gather = _Gathers(track)

    def attend(ids: torch.Tensor, count: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = ids.shape[0]
        b_e, hg_e, r_e = ids // (Hg * R), (ids // R) % Hg, ids % R
        idx = _listed(flat_tiles[ids], count)                                 # (n, count)
        L = count * bk
        if per_head:
            q_g = gather("q", qb, 0, ids).view(n, 1, bq, D)
            blocks = (((b_e * Hkv + hg_e // groups) * C)[:, None] + idx).flatten()
            k_g = gather("k", kb, 0, blocks).view(n, 1, L, D)
            v_g = gather("v", vb, 0, blocks).view(n, 1, L, Dv)
            h = hg_e.view(n, 1, 1, 1)
        else:
            q_g = gather("q", qb, 0, b_e * R + r_e).view(n, Hq, bq, D)
            blocks = ((b_e * C)[:, None] + idx).flatten()
            # (Hkv, n, L, .) transposed: each (L, D) slab contiguous, no second copy
            k_g = gather("k", kb, 1, blocks).view(Hkv, n, L, D).transpose(0, 1)
            v_g = gather("v", vb, 1, blocks).view(Hkv, n, L, Dv).transpose(0, 1)
            h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
        if not masked and not explicit:
            return sdpa_with_lse(q_g, k_g, v_g, scale=sm_scale)
        kv_idx = (idx[:, :, None] * bk + torch.arange(bk, device=dev)).view(n, 1, 1, L)
        q_idx = (r_e[:, None] * bq + torch.arange(bq, device=dev) + offset).view(n, 1, bq, 1)
        # what mods and dropout see: the padding past the last query row and key (masked, or
        # dropped rows) takes the last position, so that mods index only real positions
        positions = (b_e.view(n, 1, 1, 1), h, q_idx.clamp(max=Nq - 1 + offset), kv_idx.clamp(max=Nk - 1)
                     ) if with_positions else None
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
        if masked:
            mask = kv_idx < Nk
            if causal:
                mask = mask & (kv_idx <= q_idx)
            if own_mask is not None:  # the block mask's mask_mod cuts its partial tiles only
                cut = torch.gather(partial.reshape(-1, C)[ids], 1, idx)
                cut = cut.repeat_interleave(bk, dim=1).view(n, 1, 1, L)
                mask = mask & (~cut | own_mask.apply(*positions))
            if extra_mask is not None:
                mask = mask & extra_mask.apply(*positions)
        return masked_attention(q_g, k_g, v_g, mask, scale=sm_scale, softcap=softcap, score_mod=score_mod,
                                dropout=dropout, positions=positions)

    # the calls: rows grouped by list length and by whether they need a token mask, each group
    # cut to the budget
    calls = []
    for value in torch.unique(key[flat_counts > 0]).tolist():
        count, masked = value // 2, bool(value % 2)
        ids_all = (key == value).nonzero().flatten()
        if explicit:
            per_call = max(1, SCORE_BUDGET // ((1 if per_head else Hq) * bq * count * bk))
        else:
            per_call = max(1, GATHER_BUDGET // ((1 if per_head else Hkv) * count * bk * max(D, Dv)))
        calls.extend((ids, count, masked) for ids in ids_all.split(per_call))
    gather.reserve(k, max((ids.shape[0] * count for ids, count, _ in calls), default=0) * bk
                   * (1 if per_head else Hkv), {"k": D, "v": Dv})
    for ids, count, masked in calls:
        if explicit and track:  # keep one call's scores alive in the backward, not all
            out, lse = torch.utils.checkpoint.checkpoint(attend, ids, count, masked, use_reentrant=False)
        else:
            out, lse = attend(ids, count, masked)
        parts_out.append(out)
        parts_lse.append(lse.to(lse_dtype(q)))
        parts_ids.append(ids)

    # back to row order; rows that list nothing get out 0 and lse -inf
    heads = 1 if per_head else Hq
    rows_total = B * Hg * R
    if track:  # differentiable: one concatenation read in row order (a shared sentinel row for the empty)
        parts_out.append(q.new_zeros(1, heads, bq, Dv))
        parts_lse.append(torch.full((1, heads, bq), -math.inf, dtype=lse_dtype(q), device=dev))
        where = torch.full((rows_total,), sum(p.shape[0] for p in parts_ids), dtype=torch.long, device=dev)
        if parts_ids:
            ids = torch.cat(parts_ids)
            where[ids] = torch.arange(ids.shape[0], device=dev)
        out = torch.cat(parts_out).index_select(0, where)                   # (rows, heads, bq, Dv)
        lse = torch.cat(parts_lse).index_select(0, where)
    else:
        out = q.new_zeros(rows_total, heads, bq, Dv)
        lse = torch.full((rows_total, heads, bq), -math.inf, dtype=lse_dtype(q), device=dev)
        for ids, o, o_lse in zip(parts_ids, parts_out, parts_lse):
            out.index_copy_(0, ids, o.to(out.dtype))
            lse.index_copy_(0, ids, o_lse)
    if per_head:
        out, lse = out.view(B, Hq, R * bq, Dv), lse.view(B, Hq, R * bq)
    else:
        out = out.view(B, R, Hq, bq, Dv).transpose(1, 2).reshape(B, Hq, R * bq, Dv)
        lse = lse.view(B, R, Hq, bq).transpose(1, 2).reshape(B, Hq, R * bq)
    out, lse = out[:, :, :Nq].to(q.dtype), lse[:, :, :Nq]
    return (out, lse) if return_lse else out


#: MoBA's selected-block part attends each key block once, with every query row (of every
#: query head sharing its kv head) that selected it as one query sequence; sequences are
#: padded to a multiple of this many rows and those of one padded length run in one call
MOBA_ROW_PAD = 64
#: gate scores (rows x blocks x heads) computed at once
GATE_BUDGET = 1 << 23


def moba_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, top_k: int,
               scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
               cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False):
    """The torch path of :func:`attnkit.moba_attention` (same arguments, no dispatch).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in q's
    dtype [, lse (B, Hq, Nq), float32 (float64 for float64)]; the reference's semantics.
    The gate is the reference's :func:`moba_gate` (same selection). Two parts merged by
    their LSEs: every query's own block, causal, as one flash call over all blocks (block
    c's queries against block c's keys); and the selected blocks: the rows that selected
    key block c (from every query head of its kv head) are gathered into one query
    sequence that attends block c, and the sequences of one padded length
    (:data:`MOBA_ROW_PAD`) run as one batched call, so the work is the selected pairs
    and each key block is read once. A packed batch runs its
    sequences one by one (each is its own MoBA problem).
    """
    sm_scale = check_scale(scale, q.shape[-1])
    dropout = Dropout.draw(dropout_p, q.device)
    if cu_seqlens_q is None:
        out, lse = _moba_one(q, k, v, block_size, top_k, sm_scale, dropout, 0)
    else:
        outs, lses = [], []
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for s in range(len(bounds_q) - 1):
            (q0, q1), (k0, k1) = bounds_q[s:s + 2], bounds_k[s:s + 2]
            o, o_lse = _moba_one(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], block_size, top_k, sm_scale,
                                 dropout, s)
            outs.append(o)
            lses.append(o_lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    return (out, lse.to(lse_dtype(q))) if return_lse else out


def _moba_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int, sm_scale: float,
              dropout: Dropout | None, first_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA of one (B, H, N, D) problem (or one packed sequence, batch ``first_batch``) -> (out, lse)."""
    B, Hq, Nq = q.shape[:3]
    Nk, Dv = k.shape[2], v.shape[-1]
    dev = q.device
    if min(Nq, Nk) == 0:  # no query, or no key to see: out 0, lse -inf
        return q.new_zeros(B, Hq, Nq, Dv), torch.full((B, Hq, Nq), -math.inf, dtype=lse_dtype(q), device=dev)
    own_out, own_lse = _moba_own(q, k, v, block_size, sm_scale, dropout, first_batch)
    slots = min(top_k - 1, Nk // block_size)
    if slots <= 0:
        return own_out, own_lse
    parts = _moba_selected(q, k, v, block_size, top_k, sm_scale, dropout, first_batch)
    out, lse = merge_attention_rows(own_out.reshape(-1, Dv), own_lse.reshape(-1), parts)
    return out.view(B, Hq, Nq, Dv), lse.view(B, Hq, Nq)


def _moba_own(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, sm_scale: float,
              dropout: Dropout | None, first_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query against its own block, causal: (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)).

    The queries are laid on the key axis (query i at key position p = i + Nk - Nq, rows
    with p < 0 see nothing) and cut into the blocks that hold one, so that block c's
    queries against block c's keys is a square, top-left causal attention; all blocks in
    one call, with the blocks of a kv head in the batch dim and its query heads as heads:
    for Nq = Nk, a multiple of the block, without GQA, every reshape is a view. Padded keys
    (past Nk) come after every real query of their block: the causal mask hides them."""
    B, Hq, Nq = q.shape[:3]
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups, bs = Hq // Hkv, block_size
    skip = max(0, Nq - Nk)                   # rows before key 0
    p_first = max(0, Nk - Nq)                # key position of the first row that sees a key
    c0, c1 = p_first // bs, -(-Nk // bs)     # the blocks that hold a query
    nblk, lead = c1 - c0, p_first - c0 * bs
    n = B * Hkv * nblk

    def pad(x: torch.Tensor, before: int) -> torch.Tensor:   # rows onto whole blocks c0 .. c1 - 1
        return F.pad(x, (0, 0, before, c1 * bs - Nk)) if before or c1 * bs > Nk else x

    qb = pad(q[:, :, skip:], lead).reshape(B, Hkv, groups, nblk, bs, -1).transpose(2, 3).reshape(n, groups, bs, -1)
    kb = pad(k[:, :, c0 * bs:], 0).reshape(n, 1, bs, -1)
    vb = pad(v[:, :, c0 * bs:], 0).reshape(n, 1, bs, Dv)
    if dropout is None:
        out, lse = sdpa_with_lse(qb, kb, vb, causal=True, scale=sm_scale)
    else:  # explicit scores keyed by the reference's positions, a few blocks per call
        pos = torch.arange(bs, device=q.device)
        entry = torch.arange(n, device=q.device).view(-1, 1, 1, 1)
        start = (c0 + entry % nblk) * bs
        heads = (entry // nblk % Hkv) * groups + torch.arange(groups, device=q.device).view(1, groups, 1, 1)
        positions = (entry // (Hkv * nblk) + first_batch, heads, start + pos.view(1, 1, bs, 1),
                     start + pos.view(1, 1, 1, bs))
        causal = (pos[None, :] <= pos[:, None]).view(1, 1, bs, bs)
        per_call = max(1, SCORE_BUDGET // (groups * bs * bs))
        parts = [_checkpointed(lambda qc, kc, vc, b, h, qi, ki: masked_attention(
            qc, kc, vc, causal, scale=sm_scale, dropout=dropout, positions=(b, h, qi, ki)), tracked(q, k, v),
            *(x[lo:lo + per_call] for x in (qb, kb, vb, *positions)))
            for lo in range(0, n, per_call)]
        out, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def unblock(x: torch.Tensor) -> torch.Tensor:   # (n, groups, bs, ...) -> (B, Hq, rows with a key, ...)
        x = x.reshape(B, Hkv, nblk, groups, bs, -1).transpose(2, 3).reshape(B, Hq, nblk * bs, -1)
        return x[:, :, lead:lead + Nq - skip]

    out, lse = unblock(out), unblock(lse.unsqueeze(-1)).squeeze(-1)
    if skip:
        out = torch.cat([out.new_zeros(B, Hq, skip, Dv), out], dim=2)
        lse = torch.cat([lse.new_full((B, Hq, skip), -math.inf), lse], dim=2)
    return out, lse.to(lse_dtype(q))


def _checkpointed(fn, track: bool, *args):
    """``fn(*args)``, checkpointed when autograd tracks it (one call's scores alive in the backward)."""
    if track:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _moba_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                   sm_scale: float, dropout: Dropout | None, first_batch: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each query against the past blocks its gate selected, as parts for
    :func:`attnkit.merge.merge_attention_rows`: per call, (out (P, Dv), lse (P,), rows (P,))
    with rows the flat (b, h, i) index of (B, Hq, Nq); padding rows have lse -inf.

    Each key block (b, kv head, c) that some row selected gets one query sequence: the
    rows that selected it, from every query head of that kv head, padded to a multiple of
    :data:`MOBA_ROW_PAD` rows (pad rows read query row 0; their outputs are never read).
    The sequences are laid out by padded length, so that each length is one batched call
    against its key blocks, gathered once each. Long query sequences also run faster on
    torch's CPU flash kernel, which tiles queries in larger blocks for longer sequences.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bs, dev = block_size, q.device
    n_blocks = Nk // bs
    groups = Hq // Hkv
    # the gate, in row chunks: (B, Hq, Nq, NB) bool, the reference's selection
    k_heads = expand_kv_heads(k.detach(), Hq)
    rows = max(1, GATE_BUDGET // max(1, B * Hq * n_blocks))
    chosen = torch.cat([moba_gate(q_c, k_heads, block_size=bs, top_k=top_k, first_row=i * rows, seqlen_q=Nq)
                        for i, q_c in enumerate(q.detach().split(rows, dim=2))], dim=2)
    # the selected pairs ordered by key block (b, kv head, c), then query head and row
    by_block = chosen.view(B, Hkv, groups, Nq, n_blocks).permute(0, 1, 4, 2, 3)    # (B, Hkv, NB, groups, Nq)
    b_p, kvh_p, c_p, g_p, i_p = by_block.nonzero().unbind(1)
    h_p = kvh_p * groups + g_p
    per_block = by_block.sum((3, 4)).flatten()                                    # (B * Hkv * NB,) rows per block
    padded = -(-per_block // MOBA_ROW_PAD) * MOBA_ROW_PAD
    # the key blocks in layout order: by padded length, those selected by no row left out
    order = torch.sort(padded, stable=True).indices
    order = order[padded[order] > 0]
    lengths = padded[order]
    seq_start = torch.zeros_like(padded)
    seq_start[order] = torch.cumsum(lengths, 0) - lengths                        # each block's first row
    block_key = (b_p * Hkv + kvh_p) * n_blocks + c_p
    rank = torch.arange(b_p.shape[0], device=dev) - (torch.cumsum(per_block, 0) - per_block)[block_key]
    row_at = seq_start[block_key] + rank                                          # pair -> row of the layout
    total = int(lengths.sum())
    source = torch.zeros(total, dtype=torch.long, device=dev)                  # layout row -> (b, h, i)
    source[row_at] = (b_p * Hq + h_p) * Nq + i_p
    padding = torch.ones(total, dtype=torch.bool, device=dev)
    padding[row_at] = False
    kb = k[:, :, :n_blocks * bs].reshape(B * Hkv * n_blocks, bs * D)
    vb = v[:, :, :n_blocks * bs].reshape(B * Hkv * n_blocks, bs * Dv)
    track = tracked(q, k, v)
    gather = _Gathers(track)
    qg = gather("q", q.reshape(B * Hq * Nq, D), 0, source)                        # (total, D)
    kg = gather("k", kb, 0, order)                                                # (sequences, bs * D)
    vg = gather("v", vb, 0, order)
    if dropout is not None:  # what dropout sees: each row's (b, h, query position), each block's keys
        row_pos = torch.zeros(3, total, dtype=torch.long, device=dev)
        row_pos[:, row_at] = torch.stack([b_p + first_batch, h_p, i_p + (Nk - Nq)])
        key_pos = (order % n_blocks * bs)[:, None] + torch.arange(bs, device=dev)  # (sequences, bs)
        every = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
    parts = []
    row0 = seq0 = 0
    seq_lengths, seq_counts = (x.tolist() for x in torch.unique_consecutive(lengths, return_counts=True))
    # one split per tensor, not a slice per call: under autograd each slice's backward would
    # write a zero tensor of the whole gather, a split's backward is one concatenation
    calls = zip(seq_lengths, seq_counts, qg.split([n * L for L, n in zip(seq_lengths, seq_counts)]),
                kg.split(seq_counts), vg.split(seq_counts))
    for L, n, qc, kc, vc in calls:
        qc, kc, vc = qc.view(n, 1, L, D), kc.view(n, 1, bs, D), vc.view(n, 1, bs, Dv)
        if dropout is None:
            o, o_lse = sdpa_with_lse(qc, kc, vc, scale=sm_scale)
        else:  # explicit scores keyed by the reference's positions, at most SCORE_BUDGET per piece
            pos = row_pos[:, row0:row0 + n * L].view(3, n, 1, L, 1)
            kpos = key_pos[seq0:seq0 + n].view(n, 1, 1, bs)
            step_s = max(1, SCORE_BUDGET // (L * bs))
            step_r = L if step_s > 1 else max(1, SCORE_BUDGET // bs)
            pieces = [[_checkpointed(lambda qx, kx, vx, b, h, qi, ki: masked_attention(
                qx, kx, vx, every, scale=sm_scale, dropout=dropout, positions=(b, h, qi, ki)),
                track, qc[s:s + step_s, :, r:r + step_r], kc[s:s + step_s], vc[s:s + step_s],
                *(p[s:s + step_s, :, r:r + step_r] for p in pos), kpos[s:s + step_s])
                for r in range(0, L, step_r)] for s in range(0, n, step_s)]
            o = torch.cat([torch.cat([p[0] for p in row], dim=2) for row in pieces])
            o_lse = torch.cat([torch.cat([p[1] for p in row], dim=2) for row in pieces])
        rows_c = slice(row0, row0 + n * L)
        parts.append((o.reshape(n * L, Dv), o_lse.reshape(n * L).masked_fill(padding[rows_c], -math.inf),
                      source[rows_c]))
        row0, seq0 = row0 + n * L, seq0 + n
    return parts
