"""Device-side helpers for batches of sequences, shared by the linear-attention kernel families
(kernels/linear, kernels/gla.py, kernels/delta_rule.py)."""

import triton
import triton.language as tl


@triton.jit
def sequence_span(row, seqlen, CU_SEQLENS, VARLEN: tl.constexpr):
    """Where sequence ``row`` lies: (its tensor batch index, its first token row, its length),
    all int64 but the length (int32). Unpacked, ``row`` is a batch entry: (row, 0, seqlen). With
    VARLEN (B = 1, CU_SEQLENS (S + 1,) int32 offsets), ``row`` is a packed sequence:
    (0, CU_SEQLENS[row], CU_SEQLENS[row + 1] - CU_SEQLENS[row]). A token's address is then
    ``batch * stride_b + (first + t) * stride_n`` either way."""
    row = row.to(tl.int64)
    if VARLEN:
        first = tl.load(CU_SEQLENS + row).to(tl.int64)
        return row * 0, first, (tl.load(CU_SEQLENS + row + 1) - first).to(tl.int32)
    else:
        return row, row * 0, seqlen
