"""Autotune tables of the engine, with a prune filter (as in the Triton tutorials).

On a GPU every kernel autotunes over a small table, pruned by head dim, shared
memory and (for block lists) by divisibility of the list's block sizes. Under the
interpreter autotuning is meaningless and slow, so one fixed small config is used;
tests can force another with :func:`force_config`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import triton

from ..common import INTERPRET


# (BLOCK_M, BLOCK_N, num_warps, num_stages)
_FWD = [
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2),
]
# dK/dV pass: BLOCK_N keys owned by the program, BLOCK_M queries per step.
_DKDV = [
    (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2), (16, 16, 4, 2),
]
# dQ pass: BLOCK_M queries owned, BLOCK_N keys per step.
_DQ = [
    (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 2), (16, 16, 4, 2),
]
TABLES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}

_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
_forced: Optional[Dict[str, int]] = None


@contextlib.contextmanager
def force_config(block_m: int, block_n: int) -> Iterator[None]:
    """Run every engine kernel with these block sizes (tests use it to cover several tilings)."""
    global _forced
    previous, _forced = _forced, {"BLOCK_M": block_m, "BLOCK_N": block_n}
    try:
        yield
    finally:
        _forced = previous


def fixed_config() -> Optional[Dict[str, int]]:
    """The config to use without autotuning, or None to autotune."""
    if _forced is not None:
        return dict(_forced)
    if INTERPRET:
        return dict(_INTERPRETER_CONFIG)
    return None


def _smem_bytes(block_m: int, block_n: int, stages: int, block_d: int, block_dv: int, elem: int) -> int:
    # resident Q tile + pipelined K and V tiles
    return elem * (block_m * block_d + stages * block_n * (block_d + block_dv))


def prune(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    args = dict(named_args)
    args.update(kwargs)
    block_d, block_dv = args["BLOCK_D"], args["BLOCK_DV"]
    elem = 4 if args.get("DOT_PRECISION") == "ieee" else 2
    list_bq, list_bk = args.get("LIST_BQ", 1), args.get("LIST_BK", 1)
    is_list = args.get("LISTS") is not None
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if is_list and (list_bq % bm or list_bk % bn):
            continue
        if _smem_bytes(bm, bn, cfg.num_stages, block_d, block_dv, elem) > 200 * 1024:
            continue
        if max(block_d, block_dv) > 128 and bm * bn > 64 * 64:
            continue
        kept.append(cfg)
    if not kept:  # always leave something that fits
        small = [c for c in configs if c.kwargs["BLOCK_M"] <= 16 and c.kwargs["BLOCK_N"] <= 16]
        kept = small[:1] or configs[-1:]
    return kept


def zero_tensor_grads(nargs: Dict) -> None:
    """Config pre-hook of the dQ pass: a score mod's tensor gradients are accumulated with
    atomics, so every launch (autotuning benchmarks included) must start from zero."""
    for grad in nargs.get("SCORE_GRADS") or ():
        if grad is not None:
            grad.zero_()


def autotune_configs(kind: str) -> List[triton.Config]:
    hook = zero_tensor_grads if kind == "dq" else None
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook)
            for bm, bn, w, s in TABLES[kind]]


AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "RANGE_FN", "VARIANT_MASK", "POSITIONS", "SCORE_MOD", "MASK_MOD",
                "LIST_BQ", "LIST_BK", "VARLEN", "HAS_SOFTCAP", "DOT_PRECISION", "seqlen_q_arg", "seqlen_k_arg"]
