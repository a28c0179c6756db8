"""The fused softmax engine as differentiable PyTorch ops, shared by every softmax variant.

A variant describes how it plugs into the engine with a :class:`Schedule` (which key
blocks each query block visits, its token mask, and the arguments its hooks read)
and calls :func:`fused_attention`; GQA, softcap, sink logits, score and mask mods,
packed variable-length batches and attention dropout are handled here and in the
engine, once for all.

The forward and backward kernels are registered as the custom ops
``attnkit::fused_attention_fwd`` / ``attnkit::fused_attention_bwd`` (torch.library,
with fake implementations and an autograd formula), so models using attnkit compile
under ``torch.compile(fullgraph=True)`` without graph breaks. ``@triton.jit`` hooks
cannot cross the op boundary, so they travel as keys of a table that holds each hook
by **identity**: two functions with the same name are two hooks, and a redefined
function never runs its predecessor's code.

Nothing here imports triton until a kernel runs. docs/architecture.md (The fused softmax
engine) explains how schedules, hooks and mods fit together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .checks import constant_under_compile, first_order_only
from .dropout import Dropout
from .mods.core import MaskMod, ModKernel, ScoreMod

#: largest head dim (of q/k and of v) the fused engine's tiles and autotune tables cover
MAX_HEAD_DIM = 256


def head_dim_blockers(q: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons the fused engine cannot take these head dims (empty if it can); every
    softmax variant's ``kernel_support`` starts from this."""
    reasons = []
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the kernel")
    if v.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"value head dim {v.shape[-1]} > {MAX_HEAD_DIM} is not supported by the kernel")
    return reasons


# ----------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class BlockLists:
    """Per-query-block lists of key blocks (and the transposed lists for the dK/dV pass).

    Counts are int32 of shape (Bm, Hm, R) and indices int32 of shape (Bm, Hm, R, C),
    with Bm in {1, B} and Hm in {1, Hq} (broadcast by stride 0). ``kv_*`` lists key
    blocks of size ``block_k`` per query block of size ``block_q``; ``q_*`` lists query
    blocks per key block. ``full`` blocks skip the token mask; ``part`` blocks apply it.
    """

    block_q: int
    block_k: int
    kv_full_count: torch.Tensor
    kv_full_index: torch.Tensor
    kv_part_count: torch.Tensor
    kv_part_index: torch.Tensor
    q_full_count: torch.Tensor
    q_full_index: torch.Tensor
    q_part_count: torch.Tensor
    q_part_index: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv_full_count, self.kv_full_index, self.kv_part_count, self.kv_part_index,
                self.q_full_count, self.q_full_index, self.q_part_count, self.q_part_index]


#: what a variant may hand its hooks: tensors (as pointers), Python ints and floats (as
#: scalars), None, and ``Const(value)`` for a compile-time constant
ScheduleArg = Any


@dataclass(frozen=True)
class Const:
    """A compile-time constant among a schedule's ``args`` (a ``tl.constexpr`` in the hooks)."""

    value: Any


@dataclass(frozen=True)
class Schedule:
    """How a variant plugs into the fused engine.

    Attributes:
        mask: ``@triton.jit (q_pos, k_pos, b, h, seqlen_q, seqlen_k, *args) -> bool`` applied
            inside partial blocks (``q_pos``/``k_pos`` are tile rows/columns of the tensors;
            ``b`` the batch entry or packed sequence, ``h`` the query head), or None. It must
            be pointwise: the dK/dV pass hands it transposed tiles (``q_pos`` [1, BLOCK_M],
            ``k_pos`` [BLOCK_N, 1]). Rows past seqlen_q and keys past seqlen_k are masked by
            the engine itself.
        kv_range: range mode: ``@triton.jit (start_m, BLOCK_M, BLOCK_N, b, h, seqlen_q,
            seqlen_k, *args)`` returning a tuple of ``(lo, hi)`` key-block ranges for the
            query rows ``[start_m, start_m + BLOCK_M)``: the first range is visited without
            the token mask (full blocks: every pair visible), every other one with it
            (partial blocks). Ranges must not overlap and must cover every block with a
            visible pair; their number is fixed at compile time (a ``(0, 0)`` range is
            empty). :func:`attnkit.testing.check_schedule` checks all of this against a
            dense mask.
        q_range: the transposed range function (query blocks per key block ``start_n``)
            for the dK/dV pass, same convention.
        lists: list mode: the :class:`BlockLists` (then ``kv_range``/``q_range`` are unused).
        args: the variant's own arguments, handed to every hook after the fixed ones;
            tensors become pointers, ints and floats scalars, :class:`Const` constexprs.
        positions: optional ``@triton.jit (q_pos, k_pos, b, h, seqlen_q, seqlen_k, *args) ->
            (b, h, q_idx, kv_idx)``: the positions score/mask mods see. The default is the
            bottom-right convention ``q_idx = q_pos + seqlen_k - seqlen_q``, ``kv_idx = k_pos``;
            a variant that permutes tokens (neighborhood attention) maps them back.
    """

    mask: Any = None
    kv_range: Any = None
    q_range: Any = None
    lists: BlockLists | None = None
    args: tuple[ScheduleArg, ...] = ()
    positions: Any = None


class _HookTable:
    """Hooks by identity, so a custom op can carry them as strings.

    A hook is a @triton.jit function (keyed by the object: two functions with the same
    name are two hooks), an import path (keyed by the path, and resolved again at every
    launch, so a reloaded module runs its new code), or a tuple spec of a generated hook
    (keyed by its parts). ``get`` materializes it where the kernel launches.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, Any] = {}
        self._keys: dict[int, str] = {}

    def key(self, spec: Any) -> str:
        if spec is None:
            return ""
        if isinstance(spec, str):
            key = "path:" + spec
        elif isinstance(spec, tuple):
            parts = (repr(p) if isinstance(p, (int, bool)) else self.key(p) for p in _flatten(spec))
            key = "(" + ",".join(parts) + ")"
        else:
            key = self._keys.get(id(spec))
            if key is None:
                inner = getattr(spec, "fn", spec)
                key = f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', '?')}#{len(self._keys)}"
                self._keys[id(spec)] = key
        self._by_key.setdefault(key, spec)  # a strong reference: an id is never reused while its key exists
        return key

    def get(self, key: str) -> Any:
        if not key:
            return None
        # cheap: generated hooks are cached by their parts
        from .mods.core import materialize

        return materialize(self._by_key[key])


def _flatten(spec: tuple) -> list[Any]:
    out: list[Any] = []
    for part in spec:
        out.extend(_flatten(part) if isinstance(part, tuple) else [part])
    return out


HOOKS = _HookTable()


@constant_under_compile  # run eagerly while tracing: the key is a constant
def hook_key(fn: Any) -> str:
    """The key that stands for ``fn`` in a custom op call (one key per function object)."""
    return HOOKS.key(fn)


# ----------------------------------------------------------------------------- packing for the custom ops
# A schedule's args are a mix of tensors, ints, floats, None and Const: they travel as
# a kinds string plus one list per type, and are rebuilt in order on the other side.

def _pack_args(args: Sequence[ScheduleArg]) -> tuple[str, list[torch.Tensor], list[int], list[float]]:
    kinds, tensors, ints, floats = [], [], [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            kinds.append("t")
            tensors.append(a)
        elif isinstance(a, Const):
            if isinstance(a.value, bool) or not isinstance(a.value, int):
                raise TypeError(f"Const holds an int here, got {a.value!r}")
            kinds.append("c")
            ints.append(a.value)
        elif isinstance(a, (bool, int)):
            kinds.append("i")
            ints.append(int(a))
        elif isinstance(a, float):
            kinds.append("f")
            floats.append(a)
        elif a is None:
            kinds.append("n")
        else:
            raise TypeError(f"a schedule argument must be a tensor, int, float, None or Const, got {type(a).__name__}")
    return "".join(kinds), tensors, ints, floats


def _unpack_args(kinds: str, tensors: list[torch.Tensor], ints: list[int], floats: list[float]) -> tuple:
    t, i, f = iter(tensors), iter(ints), iter(floats)
    out: list[Any] = []
    for kind in kinds:
        if kind == "t":
            out.append(next(t))
        elif kind == "i":
            out.append(next(i))
        elif kind == "c":
            out.append(Const(next(i)))
        elif kind == "f":
            out.append(next(f))
        else:
            out.append(None)
    return tuple(out)


def _encode(schedule: Schedule, score: ModKernel | None, mask: ModKernel | None):
    """Everything a custom op needs to rebuild the schedule and the mods."""
    hooks = "|".join(hook_key(fn) for fn in (
        schedule.mask, schedule.kv_range, schedule.q_range, schedule.positions,
        score.kernel if score else None, score.derivative if score else None, score.tensor_grads if score else None,
        mask.kernel if mask else None))
    kinds, arg_tensors, ints, floats = _pack_args(schedule.args)
    lists: list[torch.Tensor] = []
    if schedule.lists is not None:
        ints = ints + [schedule.lists.block_q, schedule.lists.block_k]
        lists = schedule.lists.tensors()
    needs = list(score.needs_grad) if score else []
    return (hooks, kinds, arg_tensors, ints, floats, lists, list(score.tensors) if score else [],
            list(mask.tensors) if mask else [], needs, mask.full_blocks if mask else True)


def _decode(hooks: str, kinds: str, arg_tensors, ints, floats, lists, score_tensors, mask_tensors, needs,
            mask_full: bool = True):
    mask_fn, kv_range, q_range, positions, s_kernel, s_deriv, s_grads, m_kernel = (
        HOOKS.get(k) for k in hooks.split("|"))
    block_lists = None
    if lists:
        block_lists = BlockLists(ints[-2], ints[-1], *lists)
        ints = ints[:-2]
    schedule = Schedule(mask=mask_fn, kv_range=kv_range, q_range=q_range, lists=block_lists,
                        args=_unpack_args(kinds, arg_tensors, ints, floats), positions=positions)
    score = ModKernel(s_kernel, tuple(score_tensors), s_deriv, s_grads, tuple(needs)) if s_kernel else None
    mask = ModKernel(m_kernel, tuple(mask_tensors), full_blocks=mask_full) if m_kernel else None
    return schedule, score, mask


def _launcher():
    from .kernels import engine  # imported lazily: importing it imports triton

    return engine


def _dropout(p: float, seed: torch.Tensor | None) -> Dropout | None:
    """The Dropout a custom op's (dropout_p, dropout_seed) stand for (ops take plain values)."""
    return Dropout(p, seed) if seed is not None else None


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("attnkit::fused_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logits: torch.Tensor | None,
            hooks: str, kinds: str, arg_tensors: list[torch.Tensor], ints: list[int], floats: list[float],
            lists: list[torch.Tensor], score_tensors: list[torch.Tensor], mask_tensors: list[torch.Tensor],
            needs: list[bool], mask_full: bool, sm_scale: float, softcap: float | None,
            cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int,
            dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    schedule, score, mask = _decode(hooks, kinds, arg_tensors, ints, floats, lists, score_tensors, mask_tensors,
                                    needs, mask_full)
    sink = None if sink_logits is None else sink_logits.float().contiguous()
    return _launcher().attention_forward(
        q, k, v, schedule, sm_scale=sm_scale, softcap=softcap, sink_logits=sink, score_mod=score, mask_mod=mask,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        dropout=_dropout(dropout_p, dropout_seed))


@_fwd_op.register_fake
def _(q, k, v, sink_logits, hooks, kinds, arg_tensors, ints, floats, lists, score_tensors, mask_tensors, needs,
      mask_full, sm_scale, softcap, cu_q, cu_k, max_q, max_k, dropout_p=0.0, dropout_seed=None):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attnkit::fused_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, hooks: str, kinds: str, arg_tensors: list[torch.Tensor], ints: list[int],
            floats: list[float], lists: list[torch.Tensor], score_tensors: list[torch.Tensor],
            mask_tensors: list[torch.Tensor], needs: list[bool], mask_full: bool, sm_scale: float,
            softcap: float | None, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int,
            max_k: int, dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    schedule, score, mask = _decode(hooks, kinds, arg_tensors, ints, floats, lists, score_tensors, mask_tensors,
                                    needs, mask_full)
    dq, dk, dv, delta, tensor_grads = _launcher().attention_backward(
        do, q, k, v, o, lse, schedule, sm_scale=sm_scale, softcap=softcap, score_mod=score, mask_mod=mask,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        dropout=_dropout(dropout_p, dropout_seed))
    return dq, dk, dv, delta, tensor_grads


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, hooks, kinds, arg_tensors, ints, floats, lists, score_tensors, mask_tensors, needs,
      mask_full, sm_scale, softcap, cu_q, cu_k, max_q, max_k, dropout_p=0.0, dropout_seed=None):
    grads = [torch.empty_like(t) for t, n in zip(score_tensors, needs) if n]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(q.shape[:-1], dtype=torch.float32), grads)


def _setup_context(ctx, inputs, output):
    (q, k, v, sink_logits, hooks, kinds, arg_tensors, ints, floats, lists, score_tensors, mask_tensors, needs,
     mask_full, sm_scale, softcap, cu_q, cu_k, max_q, max_k, dropout_p, dropout_seed) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, sink_logits, cu_q, cu_k, dropout_seed, *arg_tensors, *lists,
                          *score_tensors, *mask_tensors)
    ctx.sizes = (len(arg_tensors), len(lists), len(score_tensors), len(mask_tensors))
    ctx.params = (hooks, kinds, ints, floats, needs, mask_full, sm_scale, softcap, max_q, max_k, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, sink_logits, cu_q, cu_k, dropout_seed, *rest = ctx.saved_tensors
    n_args, n_lists, n_score, n_mask = ctx.sizes
    arg_tensors, rest = rest[:n_args], rest[n_args:]
    lists, rest = rest[:n_lists], rest[n_lists:]
    score_tensors, mask_tensors = rest[:n_score], rest[n_score:n_score + n_mask]
    hooks, kinds, ints, floats, needs, mask_full, sm_scale, softcap, max_q, max_k, dropout_p = ctx.params
    # the forward's dropout key: the backward passes regenerate its mask
    dq, dk, dv, delta, tensor_grads = _bwd_op(do.contiguous(), q, k, v, o, lse, hooks, kinds, list(arg_tensors),
                                              ints, floats, list(lists), list(score_tensors), list(mask_tensors),
                                              needs, mask_full, sm_scale, softcap, cu_q, cu_k, max_q, max_k,
                                              dropout_p, dropout_seed)
    d_sink = None
    if sink_logits is not None and ctx.needs_input_grad[3]:
        # d sink_h = -sum_rows P_sink * rowsum(dO * O), with P_sink = exp(sink_h - lse)
        p_sink = torch.exp(sink_logits.float().view(1, -1, 1) - lse)
        d_sink = -(p_sink * delta).sum(dim=(0, 2)).to(sink_logits.dtype)
    grads = iter(tensor_grads)
    d_score = [next(grads) if n else None for n in needs] + [None] * (len(score_tensors) - len(needs))
    # The formula mirrors the inputs' structure: lists of tensors get lists of grads; a list of
    # numbers is one leaf (None), except an empty one, which stays an empty list.
    def numbers(x):
        return [] if len(x) == 0 else None

    result = (dq, dk, dv, d_sink, None, None, [None] * len(arg_tensors), numbers(ints), numbers(floats),
              [None] * len(lists), d_score, [None] * len(mask_tensors), numbers(needs), None, None, None, None,
              None, None, None, None, None)
    # under torch.compile the dispatcher drops trailing arguments equal to their defaults
    # (dropout_p, dropout_seed without dropout): one gradient per argument actually passed
    return result[:len(ctx.needs_input_grad)]


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_bwd_op, what="the fused softmax engine")


# ----------------------------------------------------------------------------- public helpers

def dense_to_lists(dense: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists from a tile map: boolean (..., R, C) -> counts int32 (..., R) and indices
    int32 (..., R, L), ascending.

    L is ``capacity`` or the largest count (at least 1, so no list is zero-sized);
    entries past a row's count are 0 and never read.
    """
    counts = dense.sum(dim=-1, dtype=torch.int32)
    if capacity is None:
        capacity = int(counts.max().item()) if counts.numel() else 0
    capacity = max(1, min(capacity, dense.shape[-1]))
    # a stable sort of "not listed" puts the listed columns first, in ascending order
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True)[..., :capacity]
    index = torch.where(torch.arange(capacity, device=dense.device) < counts[..., None], order,
                        torch.zeros_like(order))
    return counts.contiguous(), index.to(torch.int32).contiguous()


def make_block_lists(block_q: int, block_k: int, full: torch.Tensor, part: torch.Tensor) -> BlockLists:
    """The engine's :class:`BlockLists` from boolean (Bm, Hm, R, C) full and partial tile maps."""
    lists = [dense_to_lists(m) for m in (full, part, full.transpose(-1, -2), part.transpose(-1, -2))]
    return BlockLists(block_q, block_k, *(t for pair in lists for t in pair))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, *, sm_scale: float,
                    softcap: float | None = None, sink_logits: torch.Tensor | None = None,
                    score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None,
                    mask_mod_in_full_blocks: bool = True,
                    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                    dropout: Dropout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable fused attention with a variant's schedule.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hkv divides Hq.
        schedule: the variant's :class:`Schedule`.
        sm_scale: the score scale.
        softcap: scores s become softcap * tanh(s / softcap) (before the score mod).
        sink_logits: (Hq,) per-head logit in each row's denominator (differentiable).
        score_mod, mask_mod: already specialized mods (see :mod:`attnkit.mods`). Tensors
            of the score mod that require grad get their gradients from the Triton backward.
        mask_mod_in_full_blocks: the mask_mod also runs in the schedule's full blocks
            (default, always right). Pass False only when the schedule's full blocks were
            built from this very mask_mod, so it is True on every pair of them (a block mask
            from create_block_mask): then full blocks run without it.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 offsets of a packed batch (B = 1); the
            longest lengths are computed from them unless given.
        dropout: attention dropout (``attnkit.dropout.Dropout.draw(p, q.device)``; None: none):
            the probabilities of the pairs its hash drops are zeroed before P.V, the others
            scaled by 1 / (1 - p), keyed by the positions mods see (b, h, q_idx, kv_idx), so
            a reference reproduces the mask; the backward regenerates it.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32 (not differentiable;
        the undropped softmax's).
    """
    max_q, max_k = 0, 0
    if cu_seqlens_q is not None:
        max_q = max_seqlen_q if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        max_k = max_seqlen_k if max_seqlen_k is not None else int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    score = score_mod.kernel_view() if score_mod is not None else None
    mask = None
    if mask_mod is not None:
        view = mask_mod.kernel_view()
        mask = ModKernel(view.kernel, view.tensors, full_blocks=bool(mask_mod_in_full_blocks))
    return _fwd_op(q, k, v, sink_logits, *_encode(schedule, score, mask), sm_scale, softcap, cu_seqlens_q,
                   cu_seqlens_k, max_q, max_k, dropout.p if dropout is not None else 0.0,
                   dropout.seed if dropout is not None else None)
