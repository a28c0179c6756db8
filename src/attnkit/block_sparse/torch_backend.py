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
from ..merge import merge_attention
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


#: query rows per call of MoBA's selected-block part: the rows that selected one key block
#: are cut into groups of this many (the last one padded)
MOBA_GROUP_ROWS = 256
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
    key block c are gathered in groups of :data:`MOBA_GROUP_ROWS` and attend block c in
    one batched call, so the work is the selected pairs. A packed batch runs its
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
    n_blocks = Nk // block_size
    slots = min(top_k - 1, n_blocks)
    if slots <= 0:
        return own_out, own_lse
    sel_out, sel_lse = _moba_selected(q, k, v, block_size, top_k, slots, sm_scale, dropout, first_batch)
    outs = [own_out] + [sel_out[:, :, :, s] for s in range(slots)]
    lses = [own_lse] + [sel_lse[:, :, :, s] for s in range(slots)]
    return merge_attention(outs, lses)


def _moba_own(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, sm_scale: float,
              dropout: Dropout | None, first_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query against its own block, causal: (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)).

    The queries are laid on the key axis (query i at key position p = i + Nk - Nq, rows
    with p < 0 see nothing) and cut into the blocks that hold one, so that block c's
    queries against block c's keys is a square, top-left causal attention; all blocks in
    one call. Padded keys (past Nk) come after every real query of their block: the causal
    mask hides them."""
    B, Hq, Nq = q.shape[:3]
    Nk, Dv = k.shape[2], v.shape[-1]
    bs = block_size
    skip = max(0, Nq - Nk)                   # rows before key 0
    p_first = max(0, Nk - Nq)                # key position of the first row that sees a key
    c0, c1 = p_first // bs, -(-Nk // bs)     # the blocks that hold a query
    nblk, lead = c1 - c0, p_first - c0 * bs
    qp = F.pad(q[:, :, skip:], (0, 0, lead, c1 * bs - Nk))
    kp = F.pad(k[:, :, c0 * bs:], (0, 0, 0, c1 * bs - Nk))
    vp = F.pad(v[:, :, c0 * bs:], (0, 0, 0, c1 * bs - Nk))

    def blocks(x: torch.Tensor) -> torch.Tensor:   # (B, H, nblk * bs, E) -> (B * nblk, H, bs, E)
        return x.reshape(B, x.shape[1], nblk, bs, x.shape[-1]).transpose(1, 2).reshape(B * nblk, x.shape[1], bs, -1)

    qb, kb, vb = blocks(qp), blocks(kp), blocks(vp)
    if dropout is None:
        out, lse = sdpa_with_lse(qb, kb, vb, causal=True, scale=sm_scale)
    else:  # explicit scores keyed by the reference's positions, a few blocks per call
        pos = torch.arange(bs, device=q.device)
        entry = torch.arange(B * nblk, device=q.device)
        start = ((c0 + entry % nblk) * bs).view(-1, 1, 1, 1)
        positions = ((entry // nblk + first_batch).view(-1, 1, 1, 1),
                     torch.arange(Hq, device=q.device).view(1, Hq, 1, 1),
                     start + pos.view(1, 1, bs, 1), start + pos.view(1, 1, 1, bs))
        causal = (pos[None, :] <= pos[:, None]).view(1, 1, bs, bs)
        per_call = max(1, SCORE_BUDGET // (Hq * bs * bs))
        parts = []
        for lo in range(0, B * nblk, per_call):
            sl = slice(lo, lo + per_call)
            call = (qb[sl], kb[sl], vb[sl], positions[0][sl], positions[2][sl], positions[3][sl])
            parts.append(_checkpointed(lambda qc, kc, vc, b, qi, ki: masked_attention(
                qc, kc, vc, causal, scale=sm_scale, dropout=dropout, positions=(b, positions[1], qi, ki)),
                tracked(q, k, v), *call))
        out, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    out = out.view(B, nblk, Hq, bs, Dv).transpose(1, 2).reshape(B, Hq, nblk * bs, Dv)[:, :, lead:lead + Nq - skip]
    lse = lse.view(B, nblk, Hq, bs).transpose(1, 2).reshape(B, Hq, nblk * bs)[:, :, lead:lead + Nq - skip]
    if skip:
        out = torch.cat([out.new_zeros(B, Hq, skip, Dv), out], dim=2)
        lse = torch.cat([lse.new_full((B, Hq, skip), -math.inf), lse], dim=2)
    return out, lse.to(lse_dtype(q))


def _checkpointed(fn, track: bool, *args):
    """``fn(*args)``, checkpointed when autograd tracks it (one call's scores alive in the backward)."""
    if track:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _moba_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int, slots: int,
                   sm_scale: float, dropout: Dropout | None, first_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query against the past blocks its gate selected: out (B, Hq, Nq, slots, Dv) and
    lse (B, Hq, Nq, slots), one slot per selected block (-inf where fewer were selected)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bs, dev, G = block_size, q.device, MOBA_GROUP_ROWS
    n_blocks = Nk // bs
    groups = Hq // Hkv
    # the gate, in row chunks: (B, Hq, Nq, NB) bool, the reference's selection
    k_heads = expand_kv_heads(k.detach(), Hq)
    rows = max(1, GATE_BUDGET // max(1, B * Hq * n_blocks))
    chosen = torch.cat([moba_gate(q_c, k_heads, block_size=bs, top_k=top_k, first_row=i * rows, seqlen_q=Nq)
                        for i, q_c in enumerate(q.detach().split(rows, dim=2))], dim=2)
    slot = (chosen.cumsum(-1) - 1).masked_fill(~chosen, 0)                       # the block's rank in its row
    # the selected (b, h, c, i), ordered by key block then row: rows of one key block are consecutive
    b_p, h_p, c_p, i_p = chosen.permute(0, 1, 3, 2).nonzero().unbind(1)
    per_block = chosen.sum(2).flatten()                                           # (B * Hq * NB,) rows per block
    n_groups = -(-per_block // G)
    block_key = (b_p * Hq + h_p) * n_blocks + c_p
    first_pair = torch.cumsum(per_block, 0) - per_block
    first_group = torch.cumsum(n_groups, 0) - n_groups
    rank = torch.arange(b_p.shape[0], device=dev) - first_pair[block_key]
    row_at = first_group[block_key] * G + rank                                    # pair -> row of the padded groups
    total = int(n_groups.sum()) * G
    # query rows of the groups (padding rows read row 0; their outputs are never read)
    q_flat = q.reshape(B * Hq * Nq, D)
    source = torch.zeros(total, dtype=torch.long, device=dev)
    source[row_at] = (b_p * Hq + h_p) * Nq + i_p
    # each group's key block: (b, kv head, c) of its first row
    firsts = rank % G == 0                                                        # each group's first pair
    kv_block = ((b_p * Hkv + h_p // groups) * n_blocks + c_p)[firsts]
    kb = k[:, :, :n_blocks * bs].reshape(B * Hkv * n_blocks, bs * D)
    vb = v[:, :, :n_blocks * bs].reshape(B * Hkv * n_blocks, bs * Dv)
    track = tracked(q, k, v)
    gather = _Gathers(track)
    n_g = kv_block.shape[0]
    qg = gather("q", q_flat, 0, source).view(n_g, 1, G, D)
    kg = gather("k", kb, 0, kv_block).view(n_g, 1, bs, D)
    vg = gather("v", vb, 0, kv_block).view(n_g, 1, bs, Dv)
    if dropout is None:
        out_g, lse_g = sdpa_with_lse(qg, kg, vg, scale=sm_scale)
    else:  # explicit scores keyed by the reference's positions (padding rows are dropped after)
        query_pos = torch.zeros(total, dtype=torch.long, device=dev)
        query_pos[row_at] = i_p + (Nk - Nq)
        positions = ((b_p[firsts] + first_batch).view(-1, 1, 1, 1), h_p[firsts].view(-1, 1, 1, 1),
                     query_pos.view(n_g, 1, G, 1),
                     (c_p[firsts] * bs).view(-1, 1, 1, 1) + torch.arange(bs, device=dev).view(1, 1, 1, bs))
        every = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
        per_call = max(1, SCORE_BUDGET // (G * bs))
        parts = []
        for lo in range(0, n_g, per_call):
            sl = slice(lo, lo + per_call)
            parts.append(_checkpointed(lambda qc, kc, vc, b, h, qi, ki: masked_attention(
                qc, kc, vc, every, scale=sm_scale, dropout=dropout, positions=(b, h, qi, ki)),
                track, qg[sl], kg[sl], vg[sl], *(p[sl] for p in positions)))
        out_g, lse_g = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    # back to (row, slot)
    target = ((b_p * Hq + h_p) * Nq + i_p) * slots + slot[b_p, h_p, i_p, c_p]
    pair_out = out_g.reshape(total, Dv).index_select(0, row_at)
    pair_lse = lse_g.reshape(total).index_select(0, row_at).to(lse_dtype(q))
    out = q.new_zeros(B * Hq * Nq * slots, Dv).index_copy(0, target, pair_out)
    lse = torch.full((B * Hq * Nq * slots,), -math.inf, dtype=lse_dtype(q), device=dev).index_copy(0, target, pair_lse)
    return out.view(B, Hq, Nq, slots, Dv), lse.view(B, Hq, Nq, slots)
