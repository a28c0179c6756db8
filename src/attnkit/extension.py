"""Everything a third party needs to write a softmax variant with a Triton kernel, in one module.

A softmax variant is a block schedule plus a token mask on attnkit's fused engine
(docs/extending.md walks through a complete out-of-tree variant,
examples/chunked_attention.py):

* kernel side — ``@triton.jit`` hooks that the engine calls, with the variant's own
  arguments after the fixed ones:

  - ``kv_range(start_m, BLOCK_M, BLOCK_N, b, h, seqlen_q, seqlen_k, *args)`` -> a tuple of
    ``(lo, hi)`` key-block ranges, the first visited without the mask (full blocks),
    the others with it; ``q_range`` the same per key block for the dK/dV pass;
  - ``mask(q_pos, k_pos, b, h, seqlen_q, seqlen_k, *args)`` -> bool tile;

  or per-query-block lists of key blocks (:class:`BlockLists`, :func:`make_block_lists`);
* host side — a :class:`Schedule` naming the hooks and ``args`` (tensors, ints, floats,
  :class:`Const`), run by :func:`fused_attention` (forward, LSE, both backward passes,
  GQA, softcap, sink logits, score and mask mods, varlen);
* reference side — :func:`softmax_attend`, :func:`map_query_chunks`,
  :func:`query_chunk_rows`, :func:`expand_kv_heads`, :func:`bottom_right`,
  :func:`mod_positions`, :func:`bind_score_mod`, :func:`lse_dtype`;
* registration — :func:`softmax_variant` builds a :class:`Variant` with the options every
  softmax variant shares (``scale``, ``softcap``, ``score_mod``, ``return_lse``) and their
  checks;
* checks — :func:`check_schedule` compares a schedule with the dense mask it stands for,
  tile by tile and under several tilings; :func:`check_variant` compares the kernel with
  the reference (forward, LSE, gradients), under several tilings with ``tilings=TILINGS``;
  :func:`force_config` fixes the kernel tile.

Importing this module does not import triton.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from ._reference import (bind_score_mod, bottom_right, expand_kv_heads, lse_dtype, map_query_chunks, mod_positions,
                         query_chunk_rows, softmax_attend)
from .checks import (Shapes, check_flag, check_head_vector, check_int, check_qkv, check_scale, check_softcap,
                     check_tensor, check_varlen)
from .dispatch import attention, explain
from .engine import (MAX_HEAD_DIM, BlockLists, Const, Schedule, dense_to_lists, fused_attention, head_dim_blockers,
                     make_block_lists)
from .mods import MaskMod, Problem, ScoreMod
from .mods.core import check_mask_mod, check_score_mod
from .registry import Case, Variant, get_variant, register_variant, unregister_variant
from .testing import TILINGS, check_case, check_schedule, check_variant, schedule_segments

#: the options every softmax variant built by :func:`softmax_variant` has, with their defaults
SOFTMAX_OPTIONS: Dict[str, Any] = dict(scale=None, softcap=None, score_mod=None, return_lse=False)


@contextlib.contextmanager
def force_config(block_m: int, block_n: int, *, tma: bool = False) -> Iterator[None]:
    """Run every fused-engine kernel with these block sizes inside the ``with`` block (tests
    use it to cover several tilings; without it kernels autotune on a GPU and use 32 x 16
    under the interpreter). Block sizes are powers of two >= 16. ``tma=True`` reads the tiles
    through tensor descriptors (TMA on sm_90+; emulated by the interpreter), which need every
    row stride and base address of q, k, v, the output and its gradient 16-byte aligned."""
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val!r}")
    if not isinstance(tma, bool):
        raise TypeError(f"tma must be a bool, got {type(tma).__name__}")
    from .kernels.engine import force_config as engine_force_config

    with engine_force_config(block_m, block_n, tma=tma):
        yield


def softmax_score_mod(variant: str, q: torch.Tensor, k: torch.Tensor, score_mod: Any,
                      cu_seqlens_q: torch.Tensor | None = None,
                      cu_seqlens_k: torch.Tensor | None = None) -> Optional[ScoreMod]:
    """``score_mod`` checked and specialized for a (B, H, N, D) call of ``variant``, a packed
    batch (``cu_seqlens_q/k``) counting its sequences (None stays None)."""
    if score_mod is None:
        return None
    return check_score_mod("score_mod", score_mod, Problem.of(variant, q, k, cu_seqlens_q, cu_seqlens_k))


def softmax_variant(name: str, *, reference: Callable[..., Any], kernel: Optional[Callable[..., Any]],
                    options: Optional[Mapping[str, Any]] = None,
                    validate: Optional[Callable[..., None]] = None,
                    kernel_support: Optional[Callable[..., List[str]]] = None,
                    examples: Callable[[], Sequence[Case]] = lambda: (), doc: str = "",
                    demo: Optional[Callable[[int, int, int, int], Case]] = None, register: bool = True,
                    replace: bool = False, torch_impl: Optional[Callable[..., Any]] = None) -> Variant:
    """A softmax :class:`Variant` with the shared defaults, registered unless ``register=False``.

    The variant gets the options of :data:`SOFTMAX_OPTIONS` (``scale``, ``softcap``,
    ``score_mod``, ``return_lse``) on top of its own ``options``, the shared checks (q, k,
    v shapes, scale, softcap, score_mod, return_lse) before its own ``validate(q, k, v,
    options)``, the engine's head-dim limit before its own ``kernel_support``, and the
    LSE as extra output. A variant whose own options include ``cu_seqlens_q`` and
    ``cu_seqlens_k`` also gets the packed-batch checks (:func:`attnkit.checks.check_varlen`)
    and its score_mod specialized per sequence. ``reference`` and ``kernel`` take
    ``(q, k, v, **options)`` with every option, and return out or (out, lse) with
    ``return_lse``; so does ``torch_impl``, the optional fast PyTorch implementation
    (``backend="torch"``, the reference's semantics).

    Example::

        attnkit.extension.softmax_variant("chunked", reference=chunked_reference, kernel=chunked_kernel,
                                          options={"chunk_size": None}, validate=check_chunk_size,
                                          examples=lambda: [attnkit.Case((1, 2, 64, 32), (1, 2, 64, 32),
                                                                         (1, 2, 64, 32), {"chunk_size": 16})])
    """
    own = dict(options or {})
    clash = sorted(set(own) & set(SOFTMAX_OPTIONS))
    if clash:
        raise ValueError(f"options {clash} are shared softmax options; softmax_variant adds them itself")

    def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: Dict[str, Any]) -> Shapes:
        shapes = check_qkv(q, k, v)
        check_scale(opts["scale"], shapes.head_dim)
        check_softcap(opts["softcap"])
        check_flag("return_lse", opts["return_lse"])
        cu_q, cu_k = opts.get("cu_seqlens_q"), opts.get("cu_seqlens_k")
        check_varlen(shapes, cu_q, cu_k, q.device)  # before the score mod reads the offsets
        softmax_score_mod(name, q, k, opts["score_mod"], cu_q, cu_k)
        if validate is not None:
            validate(q, k, v, opts)
        return shapes

    def support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: Dict[str, Any]) -> List[str]:
        reasons = head_dim_blockers(q, v)
        if kernel_support is not None:
            reasons += list(kernel_support(q, k, v, opts))
        return reasons

    variant = Variant(name=name, reference=reference, kernel=kernel, options={**own, **SOFTMAX_OPTIONS},
                      validate=check, kernel_support=support, extra_outputs={"return_lse": "lse"},
                      examples=examples, status={"reference": True, "forward": kernel is not None,
                                                 "backward": kernel is not None},
                      doc=doc, demo=demo, torch_impl=torch_impl)
    return register_variant(variant, replace=replace) if register else variant


__all__ = [
    "BlockLists", "Case", "Const", "MAX_HEAD_DIM", "MaskMod", "Problem", "SOFTMAX_OPTIONS", "Schedule", "ScoreMod",
    "Shapes", "TILINGS", "Variant", "attention", "bind_score_mod", "bottom_right", "check_case", "check_flag",
    "check_schedule", "schedule_segments",
    "check_head_vector", "check_int", "check_mask_mod", "check_qkv", "check_scale", "check_score_mod",
    "check_softcap", "check_tensor", "check_variant", "dense_to_lists", "expand_kv_heads", "explain",
    "force_config", "fused_attention", "get_variant", "head_dim_blockers", "lse_dtype", "make_block_lists",
    "map_query_chunks", "mod_positions", "query_chunk_rows", "register_variant", "softmax_attend",
    "softmax_score_mod", "softmax_variant", "unregister_variant",
]
