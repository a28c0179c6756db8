"""Autotune tables of the engine, with a prune filter (as in the Triton tutorials).

On a GPU every kernel autotunes over a small table. The prune filter drops, before
anything is timed, the configs that do not fit the problem — list block sizes they do
not divide, the device's shared memory per block (:func:`smem_limit`), large tiles at head dims above 128,
a config above the head dim it was measured spill-free at (the tables' fifth entry) — and then every config
whose compiled kernel spills registers (ptxas's count, read from the binary: register
pressure depends on the head dim, the dtype and the hooks, a score mod's included, so
it is measured, not guessed). Under the interpreter autotuning is meaningless and slow,
so one fixed small config is used (shrunk, in list mode, to a tile that divides the list's
block sizes); tests can force another with :func:`force_config`.

The tables hold 8-warp tiles next to the 4-warp ones: at head dim 128 on sm_90 the large
4-warp tiles spill (forward 128 x 64; dK/dV 64 x 64, whose accumulators and resident K/V
take most of a thread's 255 registers), while 8-warp tiles of the same size do not
(tools/aot_compile.py measures it; see docs/performance.md).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import triton

from ..common import INTERPRET

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, max head dim]). The order does not affect the
# choice (every kept config is timed); configs that rarely spill come first, so that the
# compile check (tools/aot_compile.py --configs first-clean) finds a spill-free one quickly,
# and the first uses Hopper's warpgroup MMA (the compile check requires it of flash's main
# launches). A max head dim is the largest BLOCK_D at which the config (and its TMA twin)
# compiled without register spills on sm_90 for flash's main launches — fp16, whole blocks,
# causal and not, Triton 3.6 and 3.9, measured with tools/aot_compile.py at head dims 64 and
# 128 (docs/performance.md, Static check); the prune filter drops it above. The 16 x 16 tiles
# (list block sizes of 16) come with 2 warps first: with 4 warps some compile to a few bytes
# of spills for MoBA with Triton 3.6 and 3.9.
_FWD = [
    (64, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3, 64), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 2), (32, 32, 4, 2), (16, 16, 2, 2), (16, 16, 4, 2),
]
# dK/dV pass: BLOCK_N keys owned by the program, BLOCK_M queries per step. 16 x 64 / 8 warps
# first: the 64 x 32 and 32 x 32 tiles do not use HGMMA (too few keys per warpgroup).
_DKDV = [
    (16, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2, 64), (32, 64, 4, 3),
    (64, 64, 4, 3, 64), (16, 64, 4, 2), (32, 32, 4, 2), (16, 16, 2, 2), (16, 16, 4, 2),
]
# dQ pass: BLOCK_M queries owned, BLOCK_N keys per step.
_DQ = [
    (64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3),
    (64, 16, 4, 2), (32, 32, 4, 2), (16, 16, 2, 2), (16, 16, 4, 2),
]
TABLES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}

_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
#: the smallest tile of the tables: list block sizes are multiples of it
MIN_TILE = min(min(row[:2]) for table in TABLES.values() for row in table)
_forced: dict[str, int] | None = None


@contextlib.contextmanager
def force_config(block_m: int, block_n: int, *, tma: bool = False) -> Iterator[None]:
    """Run every engine kernel with these block sizes (tests use it to cover several tilings);
    ``tma=True`` also takes the tensor-descriptor loads (under the interpreter, or on sm_90+)."""
    global _forced
    previous, _forced = _forced, {"BLOCK_M": block_m, "BLOCK_N": block_n, "TMA": tma}
    try:
        yield
    finally:
        _forced = previous


def _interpreter_tile(default: int, list_block: int) -> int:
    """The largest power of two <= ``default`` (and >= MIN_TILE) that divides ``list_block``."""
    tile = default
    while tile > MIN_TILE and list_block % tile:
        tile //= 2
    return tile


def fixed_config(list_block: tuple[int, int] | None = None) -> dict[str, int] | None:
    """The config to use without autotuning, or None to autotune.

    ``list_block``: the (BQ, BK) block sizes of a list-mode schedule, whose blocks a tile
    must divide (as the prune filter requires on a GPU). The interpreter's tile shrinks to
    divide them (BQ = 16 or 48 runs 16-row tiles); a forced config is returned as it is
    (the variant refuses block sizes it does not divide).
    """
    if _forced is not None:
        return dict(_forced)
    if INTERPRET:
        config = dict(_INTERPRETER_CONFIG)
        if list_block is not None:
            config["BLOCK_M"] = _interpreter_tile(config["BLOCK_M"], list_block[0])
            config["BLOCK_N"] = _interpreter_tile(config["BLOCK_N"], list_block[1])
        return config
    return None


#: shared memory a block may use (bytes, CUDA's opt-in maximum per block) by compute
#: capability, for when there is no GPU to ask (the AOT compile check, the CPU tests)
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
#: the architecture assumed without a GPU: Hopper (H100/H200)
DEFAULT_ARCH = 90


@functools.cache
def _device_smem(device: int) -> int:
    try:  # the driver's opt-in maximum (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        return int(triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"])
    except Exception:  # noqa: BLE001 -- an older or different driver API: torch's figure
        import torch

        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0)) or SMEM_PER_BLOCK[props.major * 10 + props.minor]


def smem_limit(arch: int | None = None) -> int:
    """Bytes of shared memory a kernel block may use: the table's figure for compute capability
    ``arch`` (e.g. 90) when given, else the current GPU's, else (no GPU) :data:`DEFAULT_ARCH`'s."""
    if arch is not None:
        if arch not in SMEM_PER_BLOCK:
            raise ValueError(f"arch: expected one of {sorted(SMEM_PER_BLOCK)}, got {arch}")
        return SMEM_PER_BLOCK[arch]
    if not INTERPRET:
        import torch

        if torch.cuda.is_available():
            return _device_smem(torch.cuda.current_device())
    return SMEM_PER_BLOCK[DEFAULT_ARCH]


def _smem_bytes(block_m: int, block_n: int, stages: int, block_d: int, block_dv: int, elem: int) -> int:
    # resident Q tile + pipelined K and V tiles
    return elem * (block_m * block_d + stages * block_n * (block_d + block_dv))


#: tensors the engine kernels read (or write) through descriptors in a TMA config
TMA_TENSORS = ("Q", "K", "V", "O", "DO")


def tma_support(args: dict, arch: int | None = None) -> bool:
    """Whether a launch can take the TMA configs: Triton has tensor descriptors, the GPU is
    sm_90+ (``arch``, else the current GPU; the interpreter emulates them), and every tensor of
    :data:`TMA_TENSORS` has a contiguous last dim and 16-byte aligned base and strides (the
    copy engine's rule). Arguments that are not tensors (the compile check's recorded
    launches) count as aligned."""
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if arch is None and not INTERPRET:
        import torch

        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    if arch is not None and arch < 90:
        return False
    for name in TMA_TENSORS:
        t = args.get(name)
        if hasattr(t, "data_ptr") and hasattr(t, "stride"):
            size = t.element_size()
            if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
                return False
    return True


def prune(configs: list[triton.Config], named_args: dict, kernel: Any = None, *, arch: int | None = None,
          **kwargs) -> list[triton.Config]:
    """The configs worth timing for this launch: those that fit (see the module docstring),
    then, on a GPU (``kernel`` given), those whose compiled kernel does not spill.
    ``arch``: the compute capability whose shared memory to fit (default: :func:`smem_limit`'s)."""
    budget = smem_limit(arch)
    args = dict(named_args)
    args.update(kwargs)
    block_d, block_dv = args["BLOCK_D"], args["BLOCK_DV"]
    elem = 4 if args.get("DOT_PRECISION") == "ieee" else 2
    list_bq, list_bk = args.get("LIST_BQ", 1), args.get("LIST_BK", 1)
    is_list = args.get("LISTS") is not None
    tma = tma_support(args, arch)
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if cfg.kwargs.get("TMA") and not tma:
            continue
        if is_list and (list_bq % bm or list_bk % bn):
            continue
        if _smem_bytes(bm, bn, cfg.num_stages, block_d, block_dv, elem) > budget:
            continue
        if max(block_d, block_dv) > 128 and bm * bn > 64 * 64:
            continue
        limit = getattr(cfg, "max_head_dim", None)
        if limit is not None and max(block_d, block_dv) > limit:  # it spills there (see the tables)
            continue
        kept.append(cfg)
    if not kept:  # always leave something that fits
        small = [c for c in configs if c.kwargs["BLOCK_M"] <= 16 and c.kwargs["BLOCK_N"] <= 16]
        kept = small[:1] or configs[-1:]
    if kernel is not None and not INTERPRET:
        kept = without_spills(kept, functools.partial(spilled_bytes, kernel, args))
    return kept


def spilled_bytes(kernel: Any, args: dict, config: triton.Config) -> int:
    """Bytes of registers a config's compiled kernel spills (compiles it: only on a GPU;
    the autotuner would compile it anyway, and the binary is cached for the timing).
    If Triton's API does not give the count, 0: the config is kept and timed as before."""
    try:
        compiled = kernel.warmup(grid=(1,), **args, **config.all_kwargs())
        if hasattr(compiled, "result"):  # asynchronous compilation
            compiled = compiled.result()
        compiled._init_handles()
        return int(compiled.n_spills)
    except Exception as exc:  # noqa: BLE001 -- whatever fails keeps the config; a compile error surfaces when timed
        warnings.warn(f"attnkit: could not read the register spills of {config} ({type(exc).__name__}: {exc}); "
                      "keeping it", stacklevel=2)
        return 0


def without_spills(configs: list[triton.Config], spills: Any) -> list[triton.Config]:
    """The configs for which ``spills(config)`` is 0; if every one spills, the one that spills least."""
    counted = [(spills(cfg), i, cfg) for i, cfg in enumerate(configs)]
    clean = [cfg for n, _, cfg in counted if n == 0]
    return clean or [min(counted)[2]]


def zero_tensor_grads(nargs: dict) -> None:
    """Config pre-hook of the dQ pass: a score mod's tensor gradients are accumulated with
    atomics, so every launch (autotuning benchmarks included) must start from zero."""
    for grad in nargs.get("SCORE_GRADS") or ():
        if grad is not None:
            grad.zero_()


#: tiles of at least this many scores also get a TMA twin (tensor-descriptor loads): the
#: large tiles, where the pointer path's address arithmetic costs the most registers
TMA_MIN_TILE = 64 * 64


def autotune_configs(kind: str) -> list[triton.Config]:
    """The table's configs with pointer loads, then the TMA twins of its large tiles (the
    prune filter drops those where :func:`tma_support` says no)."""
    hook = zero_tensor_grads if kind == "dq" else None
    table = TABLES[kind]
    pointer = [_config(row, False, hook) for row in table]
    twins = [_config(row, True, hook) for row in table if row[0] * row[1] >= TMA_MIN_TILE]
    return pointer + twins


def _config(row: tuple, tma: bool, hook: Any) -> triton.Config:
    """A table row as a Triton config; its largest head dim (None: any) as ``max_head_dim``,
    which :func:`prune` reads."""
    bm, bn, w, s, *limit = row
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TMA": tma}, num_warps=w, num_stages=s, pre_hook=hook)
    config.max_head_dim = limit[0] if limit else None
    return config


AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "RANGE_FN", "VARIANT_MASK", "POSITIONS", "SCORE_MOD", "MASK_MOD",
                "LIST_BQ", "LIST_BK", "VARLEN", "HAS_SOFTCAP", "DROPOUT", "DOT_PRECISION", "seqlen_q_arg",
                "seqlen_k_arg"]
