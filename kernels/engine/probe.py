"""A probe kernel that runs a variant's range function for every tile and writes the
segments down, so that a schedule can be checked on the host against a dense mask
(attnkit.testing.check_schedule)."""

import triton
import triton.language as tl


@triton.jit
def schedule_probe_kernel(OUT, seqlen_q, seqlen_k, ARGS, n_programs, RANGE_FN: tl.constexpr,
                          MAX_SEGMENTS: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """OUT (H, n_programs, MAX_SEGMENTS, 2) int32, pre-filled with 0: the (lo, hi) segments
    of program ``pid`` (a query block; a key block when TRANSPOSED) of head ``h``, batch 0."""
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    if TRANSPOSED:
        start = pid * BLOCK_N
    else:
        start = pid * BLOCK_M
    ranges = RANGE_FN(start, BLOCK_M, BLOCK_N, pid * 0, off_h, seqlen_q, seqlen_k, *ARGS)
    tl.static_assert(len(ranges) <= MAX_SEGMENTS, "the range function returned more segments than the probe holds")
    base = OUT + (off_h * n_programs + pid) * (2 * MAX_SEGMENTS)
    for i in tl.static_range(len(ranges)):
        tl.store(base + 2 * i, ranges[i][0])
        tl.store(base + 2 * i + 1, ranges[i][1])
