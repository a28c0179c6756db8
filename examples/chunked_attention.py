"""Chunked attention as an out-of-tree attnkit variant, written with ``attnkit.extension`` only.

Chunked attention is the local attention of Llama 4's "iRoPE" layers: the keys are cut
into chunks of ``chunk_size`` positions and every query attends causally inside its own
chunk, never across a chunk boundary. With attnkit's bottom-right convention query row
``i`` of ``Nq`` sits at key position ``p = i + Nk - Nq`` and sees key ``j`` iff

    j // chunk_size == p // chunk_size   and   j <= p.

A query with ``p < 0`` (only possible when Nq > Nk) sees nothing: its output is 0 and
its log-sum-exp -inf.

The file is a complete variant, top to bottom:

1. kernel hooks (``@triton.jit``): the token mask and the two block schedules the
   fused engine calls (range mode);
2. ``chunked_kernel``: the Triton path, a :class:`attnkit.extension.Schedule` handed
   to :func:`attnkit.extension.fused_attention` (forward, LSE, backward, GQA, softcap
   and score mods come with the engine);
3. ``chunked_reference``: the plain PyTorch specification the kernel is tested against;
4. ``chunked_attention``: the public op, dispatching through ``attnkit.attention``;
5. registration with :func:`attnkit.extension.softmax_variant` and example problems;
6. ``main()``: checks the kernel against the reference with
   :func:`attnkit.testing.check_variant`, under several tilings.

Importing this module registers the variant ``"chunked"`` and nothing else. Run the
checks on a CPU with Triton's interpreter (docs/extending.md walks through this file)::

    TRITON_INTERPRET=1 python examples/chunked_attention.py
"""

import os
import sys
from typing import Any, Dict, List, Optional

import torch
import triton
import triton.language as tl

import attnkit
import attnkit.extension as ext

NAME = "chunked"


# ----------------------------------------------------------------------------- 1. kernel hooks
# Every hook gets the engine's fixed arguments first and the variant's own arguments
# (the Schedule's ``args``: here just ``chunk_size``) after them. Positions are tensor
# rows: q_pos in [0, seqlen_q), k_pos in [0, seqlen_k); the engine itself drops rows past
# seqlen_q and keys past seqlen_k, so the hooks need not care about ragged tiles.

@triton.jit
def chunked_mask(q_pos, k_pos, b, h, seqlen_q, seqlen_k, chunk_size):
    """Which (query, key) pairs of a partial block attend: same chunk, and causal."""
    pos = q_pos + (seqlen_k - seqlen_q)  # the query's position on the key axis
    # A row with pos < 0 fails ``k_pos <= pos`` (k_pos >= 0), so the rounding of a
    # negative ``pos // chunk_size`` never matters.
    return (k_pos <= pos) & (k_pos // chunk_size == pos // chunk_size)


@triton.jit
def chunked_kv_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, b, h, seqlen_q, seqlen_k,
                     chunk_size):
    """Key blocks of the query rows [start_m, start_m + BLOCK_M): ``(full, partial, partial)``.

    Row position p (>= 0) sees the keys [p - p % chunk_size, p]. The next row's interval
    starts at most one key past this row's end (at p + 1 when a new chunk starts), so the
    union over the tile's rows is the single interval [chunk start of the first row that
    sees anything, last row's position]: every block that meets it has a visible pair,
    none outside does (exact schedule).
    A key block is full (every pair visible) only when all rows lie in one chunk: it
    must then sit inside [chunk start, first row's position].
    """
    n_blocks = (seqlen_k + BLOCK_N - 1) // BLOCK_N
    offset = seqlen_k - seqlen_q
    p0 = start_m + offset                                     # first row's key position
    p1 = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + offset  # last (valid) row's key position
    # keys some row sees: [key_lo, p1]; empty when p1 < 0 (every row before the keys)
    first = tl.maximum(p0, 0)
    key_lo = (first // chunk_size) * chunk_size
    hi = (tl.maximum(p1 + 1, 0) + BLOCK_N - 1) // BLOCK_N
    lo = tl.minimum(key_lo // BLOCK_N, hi)
    # keys every row sees: [key_lo, p0] when p0 >= 0 and p0, p1 share a chunk
    one_chunk = (p0 >= 0) & (first // chunk_size == tl.maximum(p1, 0) // chunk_size)
    f_lo = (key_lo + BLOCK_N - 1) // BLOCK_N
    # the last block is ragged: it is whole if p0 reaches the last key
    f_hi = tl.where(p0 + 1 >= seqlen_k, n_blocks, tl.maximum(p0 + 1, 0) // BLOCK_N)
    f_lo = tl.where(one_chunk, tl.minimum(tl.maximum(f_lo, lo), hi), lo)
    f_hi = tl.where(one_chunk, tl.minimum(tl.maximum(f_hi, f_lo), hi), lo)
    # full first, then the two ragged edges: [lo, f_lo) and [f_hi, hi), never overlapping
    return (f_lo, f_hi), (lo, f_lo), (f_hi, hi)


@triton.jit
def chunked_q_range(start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, b, h, seqlen_q, seqlen_k,
                    chunk_size):
    """Query blocks that see a key of [start_n, start_n + BLOCK_N) (transposed schedule, dK/dV pass).

    Key j is seen by the positions [j, end of j's chunk]; over the block's keys that is
    the single interval [k0, end of k1's chunk], shifted to rows by -offset and clipped
    to [0, seqlen_q). A query block is full only when the block's keys share a chunk and
    all its rows lie in [k1, end of that chunk].
    """
    n_blocks = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    offset = seqlen_k - seqlen_q
    k0 = start_n
    k1 = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    chunk_end = (k1 // chunk_size + 1) * chunk_size  # one past the last position of k1's chunk
    # rows that see some key of the block: [row_lo, row_hi)
    row_hi = tl.minimum(tl.maximum(chunk_end - offset, 0), seqlen_q)
    row_lo = tl.minimum(tl.maximum(k0 - offset, 0), row_hi)
    hi = (row_hi + BLOCK_M - 1) // BLOCK_M
    lo = tl.minimum(row_lo // BLOCK_M, hi)
    # rows that see every key of the block: [k1 - offset, chunk_end - offset), if one chunk
    one_chunk = k0 // chunk_size == k1 // chunk_size
    f_lo = (tl.maximum(k1 - offset, 0) + BLOCK_M - 1) // BLOCK_M
    f_hi = tl.where(chunk_end - offset >= seqlen_q, n_blocks, tl.maximum(chunk_end - offset, 0) // BLOCK_M)
    f_lo = tl.where(one_chunk, tl.minimum(tl.maximum(f_lo, lo), hi), lo)
    f_hi = tl.where(one_chunk, tl.minimum(tl.maximum(f_hi, f_lo), hi), lo)
    return (f_lo, f_hi), (lo, f_lo), (f_hi, hi)


# ----------------------------------------------------------------------------- 2. the Triton path

def chunked_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int,
                   scale: Optional[float] = None, softcap: Optional[float] = None, score_mod: Any = None,
                   return_lse: bool = False):
    """The Triton path of :func:`chunked_attention` (same arguments, no dispatch, no checks:
    ``attnkit.attention`` has validated them)."""
    # Every position is < Nk, so a chunk longer than the keys is the same as one of Nk keys;
    # capping it keeps the hooks' int32 arithmetic in range for any chunk_size.
    schedule = ext.Schedule(mask=chunked_mask, kv_range=chunked_kv_range, q_range=chunked_q_range,
                            args=(min(chunk_size, k.shape[2]),))
    out, lse = ext.fused_attention(q, k, v, schedule, sm_scale=ext.check_scale(scale, q.shape[-1]), softcap=softcap,
                                   score_mod=ext.softmax_score_mod(NAME, q, k, score_mod))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- 3. the reference

def chunked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int,
                      scale: Optional[float] = None, softcap: Optional[float] = None, score_mod: Any = None,
                      return_lse: bool = False):
    """Chunked attention in plain PyTorch, in the dtype of the inputs (the specification).

    Queries are processed a slice at a time (``map_query_chunks``), so memory stays
    proportional to slice x keys rather than Nq x Nk.
    """
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    sm_scale = ext.check_scale(scale, q.shape[-1])
    mod = ext.softmax_score_mod(NAME, q, k, score_mod)
    k, v = ext.expand_kv_heads(k, Hq), ext.expand_kv_heads(v, Hq)
    key_pos = torch.arange(Nk, device=q.device)

    def attend(q_rows: torch.Tensor, first_row: int):
        pos = ext.bottom_right(first_row, q_rows.shape[2], Nq, Nk, q.device)  # (M,) key-axis positions
        same_chunk = torch.div(key_pos[None, :], chunk_size, rounding_mode="floor") == \
            torch.div(pos[:, None], chunk_size, rounding_mode="floor")
        mask = (key_pos[None, :] <= pos[:, None]) & same_chunk  # (M, Nk); a row with pos < 0 is all False
        positions = ext.mod_positions(B, Hq, pos, key_pos)
        return ext.softmax_attend(q_rows, k, v, scale=sm_scale, mask=mask, softcap=softcap,
                                  score_mod=ext.bind_score_mod(mod, positions))

    out, lse = ext.map_query_chunks(attend, q, ext.query_chunk_rows(B * Hq, Nk))
    lse = lse.to(ext.lse_dtype(q))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- 4. the public op

def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int,
                      scale: Optional[float] = None, softcap: Optional[float] = None, score_mod: Any = None,
                      return_lse: bool = False, backend: str = "auto"):
    """Chunked local attention (Llama 4's iRoPE local layers).

    The keys are cut into chunks of ``chunk_size`` positions. Query row i sits at key
    position p = i + Nk - Nq (bottom-right aligned) and sees key j iff
    ``j // chunk_size == p // chunk_size`` and ``j <= p``: causal attention that never
    crosses a chunk boundary. A row with p < 0 sees nothing (output 0, LSE -inf).

    Args:
        q: (B, Hq, Nq, D) queries.
        k: (B, Hkv, Nk, D) keys; Hkv divides Hq (GQA/MQA: query head h reads kv head
            h // (Hq // Hkv)).
        v: (B, Hkv, Nk, Dv) values.
        chunk_size: int >= 1, positions per chunk (Llama 4 uses 8192).
        scale: score scale, default 1/sqrt(D).
        softcap: if set, scores s become softcap * tanh(s / softcap) (after scaling).
        score_mod: an :class:`attnkit.ScoreMod` applied to every visible score after the
            softcap (e.g. ``attnkit.mods.alibi(slopes)``, slopes (Hq,)); see docs/mods.md.
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log.
        backend: "auto", "triton" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``, lse (B, Hq, Nq).

    Examples::

        >>> q = torch.randn(1, 8, 256, 64)
        >>> k, v = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
        >>> chunked_attention(q, k, v, chunk_size=64).shape
        torch.Size([1, 8, 256, 64])
        >>> out, lse = chunked_attention(q[:, :, -1:], k, v, chunk_size=64, return_lse=True)  # decode step
        >>> out.shape, lse.shape
        (torch.Size([1, 8, 1, 64]), torch.Size([1, 8, 1]))
        >>> out = attnkit.attention(q, k, v, "chunked", chunk_size=64)  # the same op through the registry
    """
    return attnkit.attention(q, k, v, NAME, backend, chunk_size=chunk_size, scale=scale, softcap=softcap,
                             score_mod=score_mod, return_lse=return_lse)


# ----------------------------------------------------------------------------- 5. registration

def check_chunk_size(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> None:
    """The variant's own checks (softmax_variant runs the shared ones first)."""
    if options["chunk_size"] is None:
        raise TypeError(f"{NAME} needs chunk_size=: an int >= 1, the number of key positions per chunk")
    ext.check_int("chunk_size", options["chunk_size"], minimum=1)


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> List[str]:
    """Reasons the kernel cannot run (softmax_variant adds the engine's head-dim limit)."""
    if q.shape[2] + 2 * k.shape[2] >= 2 ** 30:
        return ["Nq + 2 * Nk >= 2**30 overflows the hooks' int32 position arithmetic"]
    return []


def examples() -> List[ext.Case]:
    """Small problems for check_variant (and attnkit's contract test while the variant is
    registered): every alignment (Nq == Nk, Nq < Nk, Nq > Nk), batch > 1, GQA, odd head
    dims, chunk sizes on and off the 16-key tile grid, softcap and scale."""
    return [
        ext.Case((2, 1, 48, 32), (2, 1, 48, 32), (2, 1, 48, 32), {"chunk_size": 16}, name="square_b2_c16"),
        ext.Case((1, 4, 1, 32), (1, 2, 70, 32), (1, 2, 70, 32), {"chunk_size": 32}, name="decode_nq1_gqa_c32"),
        ext.Case((1, 4, 29, 40), (1, 2, 45, 40), (1, 2, 45, 24), {"chunk_size": 13}, name="nq<nk_gqa_d40_dv24_c13"),
        ext.Case((1, 2, 50, 16), (1, 2, 21, 16), (1, 2, 21, 16), {"chunk_size": 10}, name="nq>nk_empty_rows_c10"),
        ext.Case((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32), {"chunk_size": 20, "softcap": 3.0, "scale": 0.4},
                 name="softcap_scale_c20"),
    ]


VARIANT = ext.softmax_variant(
    NAME, reference=chunked_reference, kernel=chunked_kernel, options={"chunk_size": None},
    validate=check_chunk_size, kernel_support=kernel_support, examples=examples,
    doc="chunked local attention (Llama 4 iRoPE): causal inside chunks of chunk_size keys",
    replace=True)


# ----------------------------------------------------------------------------- 6. checks

def main() -> None:
    """Check the kernel against the reference on every example: float32 under every tiling
    of ``attnkit.extension.TILINGS``, float16 with the default tiling. Exits 1 on failure."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        print("no CUDA device: run with TRITON_INTERPRET=1 to check the kernel through Triton's interpreter",
              file=sys.stderr)
        raise SystemExit(2)
    device = "cpu" if interpret else "cuda"
    reports = attnkit.testing.check_variant(NAME, dtype=torch.float32, device=device, tilings=ext.TILINGS,
                                            raise_on_failure=False)
    reports += attnkit.testing.check_variant(NAME, dtype=torch.float16, device=device, raise_on_failure=False)
    for report in reports:
        print(report)
    # a range-mode variant runs at every tiling: a refused tiling (no comparisons) counts as a failure here
    bad = [r for r in reports if not r.ok or r.refused]
    print(f"{len(reports) - len(bad)} of {len(reports)} checks passed")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
