"""flash-attn 2's functional interface on attnkit's kernels: swap one import line.

``from attnkit.compat.flash_attn import flash_attn_func`` takes the arguments, layouts and
semantics of ``flash_attn.flash_attn_func`` (flash-attn 2.x) and runs
:func:`attnkit.flash_attention` or :func:`attnkit.sliding_window_attention` with
``layout="bshd"`` (no transpose copy); the varlen forms pass ``cu_seqlens_q/k``, and
:func:`flash_attn_with_kvcache` runs :func:`attnkit.decode_attention`.

Semantics, as flash-attn's:

* tensors (batch, seqlen, nheads, headdim), or packed (total, nheads, headdim) for varlen;
  GQA/MQA by fewer kv heads;
* ``causal`` is aligned bottom-right (query i sits at key position i + Nk - Nq);
* ``window_size=(left, right)``, inclusive, -1 = unbounded; an extent that reaches past
  Nk (varlen: ``max_seqlen_k``) is unbounded, and ``causal`` sets right to 0;
* ``softcap`` > 0 caps the scaled scores (``softcap * tanh(s / softcap)``), 0 is off;
* ``alibi_slopes`` (nheads,) or (batch, nheads) adds ``-slope * |i + Nk - Nq - j|``;
* the LSE (``return_attn_probs``, ``return_softmax_lse``) is (batch, nheads, seqlen_q),
  or (nheads, total_q) for varlen, float32, natural log, **+inf** for a row that sees no
  key (flash-attn's convention; attnkit's own ops return -inf there). The output is 0
  there;
* outputs are contiguous, as flash-attn's (callers ``.view`` them): one copy of the
  output, where attnkit's own ``layout="bshd"`` ops return a view.

Not supported, with a clear error naming the argument: ``dropout_p > 0`` where the attnkit
op has no ``dropout_p``; ``return_attn_probs`` together with dropout (the dropout pattern
``S_dmask`` is not produced; without dropout it is None, as flash-attn returns it);
``block_table`` in ``flash_attn_varlen_func`` (paged prefill); ``cache_leftpad``;
``flash_attn_with_kvcache`` with ``causal=False``, several new queries and a window
whose right edge is not 0. Accepted and without effect: ``deterministic`` (attnkit's
backward is deterministic), ``max_seqlen_q`` (lengths come from ``cu_seqlens``).
docs/compat.md has the full table.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from ..checks import check_flag, checking_values
from ..decode import decode_attention
from ..dispatch import check_call
from ..flash import flash_attention
from ..mods import alibi
from ..sliding_window import sliding_window_attention
from ..sliding_window.window import _check_entry

#: the attnkit backend every function here runs with ("auto": the kernels on CUDA tensors they
#: support, the reference otherwise; "triton" insists on the kernels; see ``attnkit.explain``)
backend = "auto"

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


# ----------------------------------------------------------------------------- argument translation

def _window(window_size: object, seqlen_k: int, causal: bool) -> tuple[int, int]:
    """flash-attn's (left, right) as its kernels read it: causal sets right = 0, and an extent
    reaching past ``seqlen_k`` keys is unbounded (-1), as flash_api.cpp normalizes it."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                         f"got {window_size!r}")
    left = _check_entry("window_size[0] (left)", window_size[0])
    right = _check_entry("window_size[1] (right)", window_size[1])
    if causal:
        right = 0
    return (-1 if left >= seqlen_k else left), (-1 if right >= seqlen_k else right)


def _softcap(softcap: object) -> float | None:
    """flash-attn's softcap: > 0 caps, 0 (or less) is off."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or math.isnan(softcap):
        raise TypeError(f"softcap must be a float (0.0 = off), got {softcap!r}")
    return float(softcap) if softcap > 0 else None


def _takes(op: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(op).parameters


def _dropout(op: Callable[..., Any], dropout_p: object, return_attn_probs: bool) -> dict[str, Any]:
    """The dropout option for ``op``: none for dropout_p == 0; passed on (and checked there)
    when the op has attention dropout; NotImplementedError naming dropout_p otherwise."""
    if not isinstance(dropout_p, bool) and isinstance(dropout_p, (int, float)) and dropout_p == 0:
        return {}
    if not _takes(op, "dropout_p"):
        raise NotImplementedError(f"dropout_p={dropout_p!r}: attnkit.{op.__name__} has no attention dropout in "
                                  "this version; pass dropout_p=0.0 (as for evaluation)")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True with dropout_p > 0: attnkit does not return the "
                                  "dropout pattern S_dmask (flash-attn's testing-only output)")
    return {"dropout_p": dropout_p}


def flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """attnkit's LSE in flash-attn's convention: +inf instead of -inf for a row that sees no key."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _tensor(name: str, x: object, rank: int, shape: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    return x


def _unpack(name: str, x: object, rank: int, count: int, shape: str) -> tuple[torch.Tensor, ...]:
    """The q/k/v views of a packed qkv or kv tensor (no copy; gradients flow back into it)."""
    x = _tensor(name, x, rank, shape)
    axis = rank - 3
    if x.shape[axis] != count:
        raise ValueError(f"{name} must have shape {shape} (size {count} at dim {axis}), got {tuple(x.shape)}")
    return x.unbind(axis)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: object, softmax_scale: float | None,
            causal: bool, window_size: object, softcap: object, alibi_slopes: torch.Tensor | None,
            deterministic: bool, return_attn_probs: bool, seqlen_k: int,
            cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    """q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D/Dv) on flash or sliding_window attention with
    layout="bshd"; returns out (B, Nq, Hq, Dv) and, when asked, lse (B, Hq, Nq) in flash-attn's
    convention."""
    check_flag("causal", causal)
    check_flag("deterministic", deterministic)  # attnkit's backward is deterministic either way
    check_flag("return_attn_probs", return_attn_probs)
    left, right = _window(window_size, seqlen_k, causal)
    options: dict[str, Any] = {"scale": softmax_scale, "softcap": _softcap(softcap),
                               "return_lse": return_attn_probs, "layout": "bshd", "backend": backend}
    if cu_seqlens is not None:
        options.update(cu_seqlens_q=cu_seqlens[0], cu_seqlens_k=cu_seqlens[1])
    if left < 0 and right <= 0:  # dense (-1, -1) or causal (-1, 0)
        op: Callable[..., Any] = flash_attention
        options.update(causal=right == 0, alibi_slopes=alibi_slopes)
    else:
        op = sliding_window_attention
        options.update(window=(left, right), score_mod=None if alibi_slopes is None else alibi(alibi_slopes))
    options.update(_dropout(op, dropout_p, return_attn_probs))
    result = op(q, k, v, **options)
    # flash-attn returns a contiguous (B, Nq, Hq, Dv) tensor, which callers may .view(B, Nq, -1)
    if not return_attn_probs:
        return result.contiguous()
    out, lse = result
    return out.contiguous(), flash_lse(lse), None  # S_dmask: None without dropout, as flash-attn returns it


# ----------------------------------------------------------------------------- batched (B, S, H, D)

def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_func`` on attnkit.

    Args:
        q: (batch, seqlen_q, nheads, headdim). k: (batch, seqlen_k, nheads_k, headdim).
        v: (batch, seqlen_k, nheads_k, headdim_v); nheads_k divides nheads (GQA/MQA).
        dropout_p: attention dropout (training); > 0 needs an attnkit op with dropout.
        softmax_scale: default 1 / sqrt(headdim).
        causal: bottom-right aligned causal mask.
        window_size: (left, right) inclusive, -1 = unbounded (sliding window attention).
        softcap: > 0 caps the scores, 0 is off.
        alibi_slopes: (nheads,) or (batch, nheads) float32.
        deterministic: accepted; attnkit's backward is deterministic.
        return_attn_probs: also return the LSE (batch, nheads, seqlen_q) (+inf on rows that
            see no key) and S_dmask (None: only flash-attn's dropout testing path has it).

    Returns:
        out (batch, seqlen_q, nheads, headdim_v), or (out, softmax_lse, None).

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_func
        >>> q = torch.randn(2, 128, 8, 64); k = torch.randn(2, 128, 2, 64); v = torch.randn(2, 128, 2, 64)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 128, 8, 64])
        >>> out, lse, _ = flash_attn_func(q, k, v, window_size=(31, 0), return_attn_probs=True)
        >>> lse.shape
        torch.Size([2, 8, 128])
    """
    _tensor("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)")
    return _attend(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                   window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                   return_attn_probs=return_attn_probs, seqlen_k=k.shape[1])


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, nheads, headdim), read
    as three views (no copy). Other arguments and the result as :func:`flash_attn_func`.

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_qkvpacked_func
        >>> qkv = torch.randn(2, 64, 3, 4, 32)
        >>> flash_attn_qkvpacked_func(qkv, causal=True).shape
        torch.Size([2, 64, 4, 32])
    """
    q, k, v = _unpack("qkv", qkv, 5, 3, "(batch, seqlen, 3, nheads, headdim)")
    return _attend(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                   window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                   return_attn_probs=return_attn_probs, seqlen_k=k.shape[1])


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_kvpacked_func``: q (batch, seqlen_q, nheads, headdim), kv
    (batch, seqlen_k, 2, nheads_k, headdim). Other arguments and the result as
    :func:`flash_attn_func`.

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_kvpacked_func
        >>> q, kv = torch.randn(2, 16, 8, 32), torch.randn(2, 80, 2, 2, 32)
        >>> flash_attn_kvpacked_func(q, kv, causal=True).shape
        torch.Size([2, 16, 8, 32])
    """
    k, v = _unpack("kv", kv, 5, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _attend(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                   window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                   return_attn_probs=return_attn_probs, seqlen_k=k.shape[1])


# ----------------------------------------------------------------------------- varlen (total, H, D)

def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_k: int, **kwargs: Any) -> Any:
    """Packed (total, H, D) tensors as attnkit's B = 1 packed batch, (1, total, H, D) views."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x, 3, "(total, nheads, headdim)")
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int):
        raise TypeError(f"max_seqlen_k must be an int (the longest key sequence), got {type(max_seqlen_k).__name__}")
    result = _attend(q[None], k[None], v[None], seqlen_k=max_seqlen_k, cu_seqlens=(cu_seqlens_q, cu_seqlens_k),
                     **kwargs)
    if isinstance(result, tuple):
        return result[0][0], result[1][0], result[2]  # out (total, H, Dv) contiguous, lse (H, total)
    return result[0]


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: torch.Tensor | None = None) -> Any:
    """flash-attn's ``flash_attn_varlen_func`` on attnkit (packed sequences, no padding).

    Args:
        q: (total_q, nheads, headdim). k: (total_k, nheads_k, headdim). v: (total_k, nheads_k, headdim_v).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets of the sequences in q and k.
        max_seqlen_q: accepted (attnkit takes the lengths from cu_seqlens).
        max_seqlen_k: the longest key sequence; a window extent reaching past it is unbounded
            (flash-attn's rule).
        dropout_p, softmax_scale, causal, window_size, softcap, deterministic: as
            :func:`flash_attn_func`, per sequence (causal and windows bottom-right within it).
        alibi_slopes: (nheads,) or (batch, nheads), batch = the number of sequences.
        return_attn_probs: also return the LSE (nheads, total_q) and None.
        block_table: paged keys (flash-attn >= 2.6) are not supported: NotImplementedError.

    Returns:
        out (total_q, nheads, headdim_v), or (out, softmax_lse, None).

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_varlen_func
        >>> cu = torch.tensor([0, 100, 117, 180], dtype=torch.int32)   # three sequences
        >>> q, k, v = torch.randn(180, 8, 64), torch.randn(180, 2, 64), torch.randn(180, 2, 64)
        >>> flash_attn_varlen_func(q, k, v, cu, cu, 100, 100, causal=True).shape
        torch.Size([180, 8, 64])
    """
    if block_table is not None:
        raise NotImplementedError("block_table (paged keys) is not supported by attnkit's flash_attn_varlen_func; "
                                  "pass packed k, v, or use flash_attn_with_kvcache for paged decoding")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, dropout_p=dropout_p,
                   softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                     deterministic: bool = False, return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, nheads, headdim) and one
    ``cu_seqlens`` (batch + 1,) int32 for q and k. As :func:`flash_attn_varlen_func` otherwise.

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_varlen_qkvpacked_func
        >>> cu = torch.tensor([0, 5, 64], dtype=torch.int32)
        >>> flash_attn_varlen_qkvpacked_func(torch.randn(64, 3, 4, 32), cu, 59, causal=True).shape
        torch.Size([64, 4, 32])
    """
    q, k, v = _unpack("qkv", qkv, 4, 3, "(total, 3, nheads, headdim)")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                   causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                   deterministic=deterministic, return_attn_probs=return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                    deterministic: bool = False, return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, nheads, headdim), kv
    (total_k, 2, nheads_k, headdim). As :func:`flash_attn_varlen_func` otherwise.

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_varlen_kvpacked_func
        >>> cu_q = torch.tensor([0, 1, 2], dtype=torch.int32); cu_k = torch.tensor([0, 30, 70], dtype=torch.int32)
        >>> flash_attn_varlen_kvpacked_func(torch.randn(2, 8, 32), torch.randn(70, 2, 2, 32), cu_q, cu_k, 1, 40,
        ...                                 causal=True).shape
        torch.Size([2, 8, 32])
    """
    k, v = _unpack("kv", kv, 4, 2, "(total_k, 2, nheads_k, headdim)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, dropout_p=dropout_p,
                   softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs)


# ----------------------------------------------------------------------------- decoding with a KV cache

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """flash-attn's rotary embedding of x (B, S, H, D) at ``positions`` (B, S): the first
    rotary_dim = 2 * cos.shape[-1] dims turn by the angles tabulated in cos/sin (seqlen_ro,
    rotary_dim / 2); pairs (0, 1), (2, 3), ... when ``interleaved`` (GPT-J), else
    (i, i + rotary_dim / 2) (GPT-NeoX); the other dims pass unchanged. Computed in float32."""
    rotary_dim = 2 * cos.shape[-1]
    c, s = cos[positions].float()[:, :, None], sin[positions].float()[:, :, None]   # (B, S, 1, rotary_dim / 2)
    x_rot = x[..., :rotary_dim].float()
    if interleaved:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
        turned = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)
        first, second = x_rot.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    return torch.cat([(x_rot * c + turned * s).to(x.dtype), x[..., rotary_dim:]], dim=-1)


def _check_rotary(rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, head_dim: int, last_position: int,
                  device: torch.device) -> None:
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _tensor(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
        if not t.is_floating_point() or t.device != device:
            raise ValueError(f"{name} must be a floating tensor on {device}, got {t.dtype} on {t.device}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos {tuple(rotary_cos.shape)} and rotary_sin {tuple(rotary_sin.shape)} must have "
                         "the same shape (seqlen_ro, rotary_dim / 2)")
    if not 0 < 2 * rotary_cos.shape[1] <= head_dim:
        raise ValueError(f"rotary_cos has rotary_dim / 2 = {rotary_cos.shape[1]} columns: rotary_dim must be in "
                         f"[2, headdim = {head_dim}]")
    if last_position >= rotary_cos.shape[0]:
        raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions (seqlen_ro) but the new tokens reach "
                         f"position {last_position}")


def _pages_of_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The cache rows ``rows`` (B,) of contiguous (batch_cache, Nmax, Hkv, D) caches read as pages
    of the same memory (no copy): (k pages, v pages, block table (B, pages per row)). Pages hold
    the largest power of two <= 256 dividing Nmax (what the kernel reads), else Nmax. None when
    the caches cannot be viewed so."""
    n_max = k_cache.shape[1]
    page = next((p for p in (256, 128, 64, 32, 16) if n_max % p == 0), n_max)
    per_row = n_max // page if page else 0
    try:
        k_pages = k_cache.view(k_cache.shape[0] * per_row, page, *k_cache.shape[2:])
        v_pages = v_cache.view(v_cache.shape[0] * per_row, page, *v_cache.shape[2:])
    except RuntimeError:  # rows not laid out one after another: no page view of them
        return None
    table = rows.long()[:, None] * per_row + torch.arange(per_row, device=rows.device)
    return k_pages, v_pages, table.to(torch.int32)


def _append(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None,
            block_table: torch.Tensor | None) -> None:
    """Write new (B, Nnew, Hkv, D) into the cache at ``positions`` (B, Nnew), in place."""
    with torch.no_grad():
        if block_table is not None:
            page_size = cache.shape[1]
            pages = torch.gather(block_table.long(), 1, torch.div(positions, page_size, rounding_mode="floor"))
            cache[pages, positions % page_size] = new
        else:
            cache[rows.long()[:, None], positions] = new


def _check_new(name: str, x: object, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    x = _tensor(name, x, 4, "(batch, seqlen_new, nheads_k, headdim)")
    if x.shape[0] != q.shape[0] or x.shape[2:] != cache.shape[2:]:
        raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = ({q.shape[0]}, seqlen_new, "
                         f"{', '.join(map(str, cache.shape[2:]))}) to go into its cache, got {tuple(x.shape)}")
    if x.dtype != cache.dtype or x.device != cache.device:
        raise ValueError(f"{name} must have the cache's dtype and device ({cache.dtype} on {cache.device}), got "
                         f"{x.dtype} on {x.device}")
    return x


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: int | torch.Tensor | None = None,
                            cache_batch_idx: torch.Tensor | None = None, cache_leftpad: torch.Tensor | None = None,
                            block_table: torch.Tensor | None = None, softmax_scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: torch.Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False) -> Any:
    """flash-attn's ``flash_attn_with_kvcache`` on :func:`attnkit.decode_attention` (forward only).

    With ``k``, ``v`` the new keys and values are first written into the caches *in place* at
    positions ``cache_seqlens[b] + t`` (rotated first when ``rotary_cos/sin`` are given), then
    the queries attend over ``cache_seqlens + seqlen_new`` keys, as flash-attn does.

    Args:
        q: (batch, seqlen_q, nheads, headdim), the newest seqlen_q tokens.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or paged
            (num_blocks, page_block_size, nheads_k, headdim) with ``block_table``.
        k, v: optional (batch, seqlen_new, nheads_k, headdim) to append (needs ``cache_seqlens``).
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), with k and v: k is rotated
            at its positions, q at its own (causal or local) or all at ``cache_seqlens``.
        cache_seqlens: int or (batch,) int32, the tokens cached before this call (None: full).
        cache_batch_idx: (batch,) int32 cache rows of the batch entries (contiguous caches).
        cache_leftpad: not supported (NotImplementedError).
        block_table: (batch, max_blocks) int32 pages of each sequence.
        softmax_scale, window_size, softcap, alibi_slopes: as :func:`flash_attn_func`.
        causal: bottom-right causal; with seqlen_q = 1 it changes nothing. seqlen_q > 1 without
            causal needs a window whose right edge is 0 (else NotImplementedError).
        rotary_interleaved: GPT-J pairs (True) or GPT-NeoX halves (False).
        num_splits: 0 lets attnkit choose; n > 0 forces n key splits.
        return_softmax_lse: also return the LSE (batch, nheads, seqlen_q), +inf on empty rows.

    Returns:
        out (batch, seqlen_q, nheads, headdim_v), or (out, softmax_lse).

    Examples::

        >>> from attnkit.compat.flash_attn import flash_attn_with_kvcache
        >>> k_cache, v_cache = torch.zeros(2, 256, 2, 64), torch.zeros(2, 256, 2, 64)
        >>> lengths = torch.tensor([10, 37], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
        >>> flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, causal=True).shape
        torch.Size([2, 1, 8, 64])
    """
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad is not supported by attnkit's flash_attn_with_kvcache: keep each "
                                  "sequence's cache starting at position 0")
    q = _tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    k_cache = _tensor("k_cache", k_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim)")
    v_cache = _tensor("v_cache", v_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim)")
    check_flag("causal", causal)
    check_flag("rotary_interleaved", rotary_interleaved)
    check_flag("return_softmax_lse", return_softmax_lse)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: attnkit chooses), got {num_splits!r}")
    batch, seqlen_q = q.shape[:2]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos/rotary_sin rotate the new k (and q): pass k and v with them")
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx selects rows of contiguous caches; with block_table the table does that")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if cache_batch_idx is not None:
        _tensor("cache_batch_idx", cache_batch_idx, 1, "(batch,)")
        if cache_batch_idx.shape[0] != batch or cache_batch_idx.dtype != torch.int32:
            raise ValueError(f"cache_batch_idx must be an int32 tensor of shape ({batch},), got "
                             f"{cache_batch_idx.dtype} {tuple(cache_batch_idx.shape)}")
        if checking_values() and batch and not 0 <= int(cache_batch_idx.min()) <= int(cache_batch_idx.max()) \
                < k_cache.shape[0]:
            raise ValueError(f"cache_batch_idx must hold rows of the caches, in [0, {k_cache.shape[0]}), got "
                             f"{cache_batch_idx.tolist()}")
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    left, right = _window(window_size, capacity, causal)
    if seqlen_q > 1 and not causal and right != 0:
        raise NotImplementedError(f"causal=False with seqlen_q = {seqlen_q} new queries: attnkit's decoding is "
                                  "causal over the cache; pass causal=True (or window_size with right = 0), or "
                                  "one query per call")

    rows = cache_batch_idx if cache_batch_idx is not None else torch.arange(batch, device=q.device)
    lengths = cache_seqlens
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with k, v: the new tokens go at cache_seqlens[b] onwards")
        k, v = _check_new("k", k, k_cache, q), _check_new("v", v, v_cache, q)
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must hold the same number of new tokens, got {k.shape[1]} and {v.shape[1]}")
        new_positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=q.device)
        lengths = (cache_seqlens + k.shape[1]).to(torch.int32)
        if rotary_cos is not None:
            local = left >= 0 or right >= 0
            q_positions = (cache_seqlens.long()[:, None] + torch.arange(seqlen_q, device=q.device) if causal or local
                           else cache_seqlens.long()[:, None].expand(batch, seqlen_q))
            if checking_values():
                _check_rotary(rotary_cos, rotary_sin, q.shape[-1], int(torch.cat([new_positions, q_positions],
                                                                                 dim=1).max()), q.device)
            k = apply_rotary(k, rotary_cos, rotary_sin, new_positions, rotary_interleaved)
            q = apply_rotary(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
    elif lengths is None and cache_batch_idx is not None:
        lengths = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)

    k_read, v_read, table = k_cache, v_cache, block_table
    gather = False  # the batch's rows of the caches are read as pages of them (no copy), or gathered
    if cache_batch_idx is not None:
        pages = _pages_of_rows(k_cache, v_cache, cache_batch_idx)
        if pages is not None:
            k_read, v_read, table = pages
        else:  # stand-ins of the gathered rows' shape for the check (views, no copy)
            gather = True
            k_read, v_read = (x[:1].expand(batch, *x.shape[1:]) for x in (k_cache, v_cache))
    options: dict[str, Any] = {"block_table": table, "window": (left, 0) if left >= 0 else None,
                               "softcap": _softcap(softcap), "alibi_slopes": alibi_slopes, "scale": softmax_scale,
                               "num_splits": num_splits or None, "return_lse": return_softmax_lse,
                               "layout": "bshd", "backend": backend}
    # the whole call is checked before the caches change (as attnkit's own caches do)
    check_call(q, k_read, v_read, "decode", cache_seqlens=lengths, **options)
    if k is not None:
        _append(k_cache, k, new_positions, rows, block_table)
        _append(v_cache, v, new_positions, rows, block_table)
    if gather:
        k_read, v_read = k_cache.index_select(0, rows.long()), v_cache.index_select(0, rows.long())
    result = decode_attention(q, k_read, v_read, lengths, **options)
    if return_softmax_lse:
        return result[0].contiguous(), flash_lse(result[1])
    return result.contiguous()
