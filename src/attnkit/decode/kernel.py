"""Host side of the split-KV decode kernels (kernels/decode.py)."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from ..checks import check_scale
from ..mods import ScoreMod
from ..sliding_window.window import head_windows
from .reference import cache_lengths, decode_score_mod, decode_selection

#: (largest head dim, keys per block, most packed query rows per program, warps), checked with ptxas
#: for sm_90 to compile without register spills; a paged cache's page is read in page_size // keys blocks
TILES = ((64, 64, 64, 4), (128, 32, 64, 8), (256, 16, 32, 8))
_forced_splits: Optional[int] = None


def choose_num_splits(batch: int, heads_kv: int, row_blocks: int, max_blocks: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs to fill the GPU twice over, each with
    at least two key blocks; 1 when the grid is already full or the cache short."""
    if device.type == "cuda":
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 8
    wanted = math.ceil(programs / max(1, batch * heads_kv * row_blocks))
    return max(1, min(wanted, max_blocks // 2, 64))


def _lefts(window: Any, heads_q: int, capacity: int, seqlen_q: int) -> Optional[torch.Tensor]:
    """Per-query-head left extents, "unbounded" as a number past every position; None without a window."""
    if window is None:
        return None
    big = capacity + seqlen_q
    return torch.tensor([big if left < 0 else min(left, big) for left, _ in head_windows(window, heads_q)],
                        dtype=torch.int32)


def decode_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cache_seqlens: Optional[torch.Tensor] = None, *, block_table: Optional[torch.Tensor] = None,
                  window: Any = None, sinks: int = 0, sink_logits: Optional[torch.Tensor] = None,
                  softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                  score_mod: Optional[ScoreMod] = None, scale: Optional[float] = None,
                  page_top_k: Optional[int] = None, page_bounds: Optional[Tuple[torch.Tensor, ...]] = None,
                  num_splits: Optional[int] = None, return_lse: bool = False, return_key_scores: bool = False):
    """The Triton path of :func:`attnkit.decode_attention` (same arguments, no dispatch)."""
    from ..kernels import decode as kernels
    from ..kernels.common import block_dim, new_output
    from ..kernels.engine import configs

    B, Hq, Nq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[-1]
    groups = Hq // Hkv
    paged = block_table is not None
    block_n, max_rows, warps = next(tile[1:] for tile in TILES if block_dim(max(D, Dv)) <= tile[0])
    fixed = configs.fixed_config()
    if fixed is not None:
        block_n = fixed["BLOCK_N"]
    if paged:
        block_n = min(block_n, k_cache.shape[2])
    device = q.device
    capacity, seqlens = cache_lengths(q, k_cache, block_table, cache_seqlens)
    seqlens = seqlens.contiguous()
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    mod = decode_score_mod(q, capacity, alibi_slopes, score_mod)
    mod_view = mod.kernel_view() if mod is not None else None
    if mod_view is not None and mod_view.kernel is not None:
        from ..engine import HOOKS, hook_key

        mod_kernel = HOOKS.get(hook_key(mod_view.kernel))
    else:
        mod_kernel = None
    score_args = tuple(mod_view.tensors) if mod_view is not None else ()

    # windows: per-row left extents; the first key some row of a group can see, per (sequence, kv head)
    lefts = _lefts(window, Hq, capacity, Nq)
    per_head = lefts is not None and len(set(lefts.tolist())) > 1
    if lefts is not None:
        widest = lefts.view(Hkv, groups).amax(dim=1).to(device)                       # (Hkv,)
        key_lo = (seqlens[:, None].long() - Nq - widest[None, :].long()).clamp(min=0)  # (B, Hkv)
        key_lo = key_lo.to(torch.int32).contiguous()
        windows_arg = lefts.to(device).contiguous() if per_head else None
        left = 0 if per_head else int(lefts[0])
    else:
        key_lo, windows_arg, left = None, None, 0

    selected, counts = decode_selection(q, k_cache, block_table, seqlens, page_top_k, page_bounds)
    if selected is not None:
        selected = selected.view(B * Hkv, -1).contiguous()
        counts = counts.reshape(B * Hkv).contiguous()
        max_blocks = selected.shape[1] * (k_cache.shape[2] // block_n)
    else:
        max_blocks = -(-capacity // block_n)  # no device sync: the capacity bounds every sequence

    rows = groups * Nq
    block_m = min(max_rows, max(16, 1 << (rows - 1).bit_length()))
    row_blocks = -(-rows // block_m)
    splits = num_splits or _forced_splits or choose_num_splits(B, Hkv, row_blocks, max_blocks, device)

    o_part = new_output((B, Hkv, splits, rows, Dv), torch.float32, device)
    lse_part = new_output((B, Hkv, splits, rows), torch.float32, device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    common = dict(SCORE_MOD=mod_kernel, PAGED=paged, SELECTED=selected is not None, HAS_WINDOW=lefts is not None,
                  PER_HEAD_WINDOW=per_head, HAS_SOFTCAP=softcap is not None, HEAD_DIM=D, BLOCK_D=block_dim(D),
                  DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                  SUB=k_cache.shape[2] // block_n if paged else 1)
    table_stride = block_table.stride(0) if paged else 0
    sel_stride = selected.stride(0) if selected is not None else 0
    sm_scale = check_scale(scale, D)
    grid = (splits, B * Hkv, row_blocks)
    kernels.decode_split_kernel[grid](
        q, k_cache, v_cache, o_part, lse_part, seqlens, block_table, key_lo, selected, counts, windows_arg,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], table_stride, sel_stride,
        *o_part.stride()[:4], *lse_part.stride()[:3],
        Hkv, groups, Nq, splits, sm_scale, softcap if softcap else 1.0, sinks, left, score_args,
        HEAD_DIM_V=Dv, BLOCK_DV=block_dim(Dv), num_warps=warps, **common)

    out = new_output((B, Hq, Nq, Dv), q.dtype, device)
    lse = new_output((B, Hq, Nq), torch.float32, device)
    sink = None if sink_logits is None else sink_logits.float().contiguous()
    kernels.decode_merge_kernel[(B * Hkv, row_blocks)](
        o_part, lse_part, out, lse, sink, *o_part.stride()[:4], *lse_part.stride()[:3], *out.stride()[:3],
        *lse.stride()[:2], Hkv, groups, Nq, splits,
        HAS_SINK=sink is not None, HEAD_DIM_V=Dv, BLOCK_DV=block_dim(Dv), BLOCK_M=block_m, num_warps=4)

    result = (out,)
    if return_lse:
        result += (lse,)
    if return_key_scores:
        scores = torch.zeros((B, Hq, capacity), dtype=torch.float32, device=device)
        kernels.decode_key_scores_kernel[grid](
            q, k_cache, lse, scores, seqlens, block_table, key_lo, selected, counts, windows_arg,
            *q.stride()[:3], *k_cache.stride()[:3], table_stride, sel_stride, *lse.stride()[:2],
            *scores.stride()[:2], Hkv, groups, Nq, splits, sm_scale, softcap if softcap else 1.0, sinks, left,
            score_args, num_warps=warps, **common)
        result += (scores,)
    return result if len(result) > 1 else out
