"""Star Attention (Acharya et al. 2024): two-phase long-context inference.

A context of ``W L`` tokens is cut into W contiguous blocks of L tokens, block r on
rank r; the query tokens (the prompt's question, appended after the context) are on
every rank.

* Phase 1, context encoding, no communication but one broadcast: each rank attends
  causally over its block *prefixed by the anchor*, the first ``anchor_len`` tokens of
  the context (rank 0's): the block's queries see the anchor's keys and the keys of
  their own block up to themselves. The anchor's own outputs are not needed (the paper
  drops them), so only its K/V are used; rank 0's block starts with the anchor, so it
  is plain causal attention there. Without the anchor every block would look like the
  start of a sequence (its first tokens become attention sinks); with it the
  attention pattern stays close to that of full attention.
* Phase 2, query encoding: the query tokens attend every rank's K/V cache (all of
  the context) and themselves causally, exactly: each rank attends its own cache (the
  last rank also the query tokens), and the partial results are merged across ranks
  by :func:`~.tree.tree_merge` (tree decoding's two all-reduces).

So the query rows of one layer are exact; the context rows are the approximation
(block-local with an anchor). Through a stack of layers the approximate context
states feed the later layers' caches, so the query outputs drift too: see
docs/distributed.md for the error on a small example. :func:`star_reference` is the
single-process rule, as one dense masked softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._reference import expand_kv_heads, softmax_attend
from ..checks import check_int, check_qkv, check_scale, check_softcap
from ._blocks import block_forward
from ._comm import Field, agree, global_rank, input_fields, world
from .tree import tree_merge


def star_mask(context_len: int, query_len: int, world_size: int, anchor_len: int,
              device: torch.device | str | None = None) -> torch.Tensor:
    """The (N, N) boolean mask of Star Attention over a whole sequence of
    N = context_len + query_len tokens (True: query row may see key column).

    Context token p, in block b = p // (context_len / world_size), sees the keys of its
    own block up to p, and, when b > 0, the anchor: keys < anchor_len. A query token
    (p >= context_len) sees every context key and the query keys up to p.
    """
    block = context_len // world_size
    pos = torch.arange(context_len + query_len, device=device)
    qp, kp = pos[:, None], pos[None, :]
    causal = kp <= qp
    is_context = qp < context_len
    same_block = (qp // block) == (kp // block)
    anchor = (qp >= block) & (kp < anchor_len)
    return torch.where(is_context, (same_block & causal) | anchor, causal)


def star_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, world_size: int, anchor_len: int,
                   query_len: int, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Star Attention's rule in one process: dense softmax attention under :func:`star_mask`.

    q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv): the whole sequence, the
    context (N - query_len tokens, a multiple of ``world_size``) then the query tokens.
    Returns (B, Hq, N, Dv) in q's dtype: what :func:`star_attention` returns on the ranks,
    put together (each rank's context block, then the query rows once).
    """
    shapes = check_qkv(q, k, v)
    context = shapes.seqlen_q - query_len
    if context < world_size or context % world_size:
        raise ValueError(f"the context ({shapes.seqlen_q} rows - query_len {query_len} = {context} tokens) must split "
                         f"into world_size = {world_size} equal blocks of at least one token")
    mask = star_mask(context, query_len, world_size, anchor_len, q.device)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, _ = softmax_attend(q.to(compute), expand_kv_heads(k.to(compute), shapes.heads_q),
                            expand_kv_heads(v.to(compute), shapes.heads_q),
                            scale=check_scale(scale, shapes.head_dim), mask=mask, softcap=softcap)
    return out.to(q.dtype)


@torch.no_grad()
def star_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, anchor_len: int,
                   query_len: int, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Star Attention over a context split across the ranks of ``group`` (inference).

    Args:
        q: (B, Hq, L + Nq, D), k: (B, Hkv, L + Nq, D), v: (B, Hkv, L + Nq, Dv): on rank
            r, rows [0, L) are context block r (the context is W L tokens, cut into
            contiguous blocks: ``shard_sequence(context, layout="contiguous")``) and rows
            [L, L + Nq) the Nq = ``query_len`` query tokens that follow the context, the
            same on every rank. Hkv divides Hq (GQA/MQA).
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank: exact causal attention over context + query).
        anchor_len: how many tokens of the context's start (rank 0's block) prefix every
            block in phase 1, 0 <= anchor_len <= L (the paper uses a whole block, L).
        query_len: Nq >= 0, the query tokens at the end of every rank's rows.
        scale: score scale, default 1/sqrt(D). softcap: s <- softcap * tanh(s / softcap).

    Returns:
        (B, Hq, L + Nq, Dv) in q's dtype: rows [0, L) this rank's context block (phase 1),
        rows [L, L + Nq) the query tokens' output (phase 2), the same on every rank.
        Inference only: it runs without autograd (the output carries no gradient).

    Communication: one broadcast of the anchor's K/V (``anchor_len`` tokens, when W > 1)
    and tree decoding's two all-reduces of ``Hq Nq (Dv + 1)`` floats.

    Raises:
        ValueError/TypeError on every rank, before any transfer, when a rank's input is
        invalid (naming the rank) or when the ranks' shapes, dtypes, ``anchor_len``,
        ``query_len``, scale or softcap differ.

    Examples::

        >>> import attnkit.distributed as akd
        >>> blocks = [akd.shard_sequence(t, layout="contiguous") for t in (q_ctx, k_ctx, v_ctx)]
        >>> q, k, v = (torch.cat([b, t], dim=2) for b, t in zip(blocks, (q_query, k_query, v_query)))
        >>> out = akd.star_attention(q, k, v, anchor_len=blocks[0].shape[2], query_len=q_query.shape[2])
        >>> answer = out[:, :, -q_query.shape[2]:]                # (B, Hq, Nq, Dv), on every rank
    """
    rank, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        shapes = check_qkv(q, k, v)
        if shapes.seqlen_q != shapes.seqlen_k:
            raise ValueError(f"star attention needs q, k and v rows of the same tokens (a context block and the "
                             f"query), got {shapes.seqlen_q} query rows and {shapes.seqlen_k} key rows")
        n_query = check_int("query_len", query_len, minimum=0)
        n_anchor = check_int("anchor_len", anchor_len, minimum=0)
        block = shapes.seqlen_q - n_query
        if block < 1:
            raise ValueError(f"query_len ({n_query}) must leave at least one context token: q, k and v hold "
                             f"{shapes.seqlen_q} rows (the context block, then the query)")
        if n_anchor > block:
            raise ValueError(f"anchor_len must be at most the context block length L = {block} (the anchor is the "
                             f"start of rank 0's block), got {n_anchor}")
        options = (n_anchor, n_query, check_scale(scale, shapes.head_dim), check_softcap(softcap))
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, L + Nq, D, Dv)", sizes, "q, k and v", q)
        return options, [*fields, *map(Field, ("anchor_len", "query_len", "scale", "softcap"), options)]

    n_anchor, n_query, sm_scale, cap = agree("star_attention", check, group, size)
    block = q.shape[2] - n_query
    k_ctx, v_ctx = k[:, :, :block], v[:, :, :block]
    # phase 1: the block, prefixed by the anchor's K/V (rank 0's start, broadcast once)
    k1, v1 = k_ctx, v_ctx
    if size > 1 and n_anchor > 0:
        anchor = torch.cat([k_ctx[:, :, :n_anchor], v_ctx[:, :, :n_anchor]], dim=-1).contiguous()
        dist.broadcast(anchor, src=global_rank(group, 0), group=group)
        if rank > 0:
            k_anchor, v_anchor = anchor.split([k.shape[-1], v.shape[-1]], dim=-1)
            k1, v1 = torch.cat([k_anchor, k_ctx], dim=2), torch.cat([v_anchor, v_ctx], dim=2)
    out_ctx, _ = block_forward(q[:, :, :block], k1, v1, causal=True, scale=sm_scale, softcap=cap)
    if n_query == 0:
        return out_ctx.to(q.dtype)
    # phase 2: the query over this rank's cache (and itself, causally, on the last rank), merged over ranks
    k2, v2 = (k, v) if rank == size - 1 else (k_ctx, v_ctx)
    out_q, lse_q = block_forward(q[:, :, block:], k2, v2, causal=rank == size - 1, scale=sm_scale, softcap=cap)
    if size > 1:
        out_q = tree_merge(out_q, lse_q, group)
    return torch.cat([out_ctx.to(q.dtype), out_q.to(q.dtype)], dim=2)
