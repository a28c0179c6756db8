"""Input checks shared by every variant (docs/index.md, The interface).

Every public op validates its tensors here, so that each variant reports a bad
argument with the same words: a ``ValueError`` or ``TypeError`` that names the
argument and says what was expected.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Shapes(NamedTuple):
    """Sizes of a (B, H, N, D) attention problem.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv).
    """

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 for MHA, Hq for MQA; 1 when both are 0)."""
        return self.heads_q // self.heads_kv if self.heads_kv else 1

    @property
    def empty(self) -> bool:
        """No batch entry, query head, query or key: nothing for a kernel to compute (dispatch
        answers from the reference: empty outputs, or zeros with LSE -inf when Nk = 0)."""
        return 0 in (self.batch, self.heads_q, self.seqlen_q, self.seqlen_k)


def constant_under_compile(fn):
    """Mark ``fn`` as ``torch._dynamo.assume_constant_result`` does (torch.compile calls it
    eagerly while tracing and treats the result as a constant) without importing
    torch._dynamo, which imports triton: attnkit's import must not import triton, so that
    TRITON_INTERPRET can still be set after ``import attnkit``."""
    fn._dynamo_marked_constant = True
    return fn


def checking_values() -> bool:
    """Whether checks that read tensor *values* (offsets, decay rates) run: not while
    torch.compile traces, where they would be data-dependent graph breaks."""
    return not torch.compiler.is_compiling()


def check_tensor(name: str, x: object, *, rank: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    return x


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All tensors share the device and dtype of the first one."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "all inputs must share one dtype")


def check_heads(heads_q: int, heads_kv: int, kv: str = "the number of key/value heads") -> None:
    """GQA/MQA: the kv heads divide the query heads. No query heads (an empty problem, as
    torch's SDPA allows) goes with any number of kv heads; query heads need at least one."""
    if heads_q and (heads_kv == 0 or heads_q % heads_kv != 0):
        raise ValueError(f"the number of query heads ({heads_q}) must be a multiple of {kv} ({heads_kv}) for GQA/MQA")


def check_qkv(q: object, k: object, v: object, *, spatial_dims: int = 1) -> Shapes:
    """Check the common (B, H, *spatial, D) interface and return the sizes.

    ``spatial_dims`` is 1 for sequence variants; neighborhood attention passes its
    number of spatial axes (1 to 3), and the returned ``seqlen_*`` are then the
    product of the spatial sizes.
    """
    rank = 3 + spatial_dims
    layout = "(B, H, N, D)" if spatial_dims == 1 else "(B, H, " + ", ".join(f"X{i}" for i in range(spatial_dims)) + ", D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != rank:  # type: ignore[union-attr]
            raise ValueError(f"{name} must have rank {rank} with layout {layout}, got shape {tuple(t.shape)}")  # type: ignore[union-attr]
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    check_same(("q", "k", "v"), (q, k, v))
    B, Hq = q.shape[0], q.shape[1]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has {B}, k has {k.shape[0]}, v has {v.shape[0]}")
    Hkv = k.shape[1]
    if v.shape[1] != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {v.shape[1]}")
    check_heads(Hq, Hkv)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2:-1] != v.shape[2:-1]:
        raise ValueError(f"k and v must have the same sequence/spatial sizes, got {tuple(k.shape[2:-1])} "
                         f"and {tuple(v.shape[2:-1])}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("head dims must be at least 1")
    # Empty batches, heads and sequences are allowed, as in torch's SDPA (Shapes.empty).
    return Shapes(B, Hq, Hkv, math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1]), q.shape[-1], v.shape[-1])


def check_scale(scale: object, head_dim: int) -> float:
    """Return the softmax scale; ``None`` means 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise TypeError("scale must be a Python number (or a one-element tensor)")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_softcap(softcap: object) -> Optional[float]:
    """``None`` (or 0) disables the cap; otherwise a finite value > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a finite number > 0 (or None), got {softcap}")
    return float(softcap)


def check_dropout(dropout_p: object) -> float:
    """Attention dropout probability (FlashAttention's ``dropout_p``): a float in [0, 1); 0
    disables dropout."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_head_vector(name: str, x: object, heads: int, like: torch.Tensor) -> torch.Tensor:
    """A per-head floating parameter of shape (heads,) on the inputs' device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({heads},), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if tuple(x.shape) != (heads,):
        raise ValueError(f"{name} must have shape ({heads},) (one value per query head), got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but q is on {like.device}")
    return x


def check_log_gates(name: str, g: object, shapes: Shapes, like: torch.Tensor, *,
                    per_channel: bool = False) -> torch.Tensor:
    """Log-gates of a gated linear recurrence (the state decays by exp(g_t) <= 1 at token t):
    (B, Hq, N), one per token and query head, or, with ``per_channel``, also (B, Hq, N, Dk),
    one per key channel. Floating, on q's device, finite and <= 0."""
    forms = [(shapes.batch, shapes.heads_q, shapes.seqlen_k)]
    if per_channel:
        forms.append(forms[0] + (shapes.head_dim,))
    spelled = " or ".join(f"{form} = {want}" for form, want in
                          zip(("(B, Hq, N)", "(B, Hq, N, Dk)"), forms))
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of log-gates of shape {spelled}, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of log-gates, got {g.dtype}")
    if g.device != like.device:
        raise ValueError(f"{name} is on {g.device} but q is on {like.device}")
    if tuple(g.shape) not in forms:
        raise ValueError(f"{name} must have shape {spelled}, got {tuple(g.shape)}")
    if checking_values() and g.numel():
        values = g.detach()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} must be finite (log-gates: the state decays by exp({name}) in (0, 1]), "
                             f"got {int((~torch.isfinite(values)).sum())} non-finite value(s)")
        if bool((values > 0).any()):
            raise ValueError(f"{name} must be <= 0 (log-gates: the state decays by exp({name}) <= 1), got a "
                             f"largest value of {values.max().item():g}")
    return g


def check_cu_seqlens(name: str, cu: object, total: int, device: torch.device) -> torch.Tensor:
    """Offsets of a packed batch: int32, 1-D, starts at 0, non-decreasing, ends at ``total``."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of offsets, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries (num_seqs + 1), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if not checking_values():
        return cu
    host = cu.tolist()
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {host[0]}")
    if any(b < a for a, b in zip(host, host[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {host}")
    if host[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {host[-1]}")
    return cu


def check_varlen(shapes: Shapes, cu_seqlens_q: object, cu_seqlens_k: object, device: torch.device) -> bool:
    """A packed variable-length batch's offsets, the same rules on every variant.

    Both or neither of ``cu_seqlens_q``/``cu_seqlens_k`` (S + 1,) int32 are given; when
    given, B must be 1 (the sequences are packed along N), each passes
    :func:`check_cu_seqlens` against Nq / Nk and both describe the same S sequences.
    Returns whether the batch is packed.
    """
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed variable-length batch)")
    if cu_seqlens_q is None:
        return False
    if shapes.batch != 1:
        raise ValueError(f"with cu_seqlens_q/k the sequences are packed along N and the batch size must be 1, "
                         f"got {shapes.batch}")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, shapes.seqlen_q, device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, shapes.seqlen_k, device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    return True


def first_order_only(backward_op: torch.library.CustomOpDef, *, what: str) -> None:
    """Give a Triton backward custom op an autograd formula that refuses double backward.

    The backward kernels compute gradients but not their derivatives, so a second-order
    gradient (``torch.autograd.grad(..., create_graph=True)`` and then a gradient of that
    gradient) cannot flow through them. Without a formula torch reports its own internal
    "no autograd formula was registered"; this says what to do instead. First-order
    gradients, with or without ``create_graph``, are unaffected: the formula runs only when
    a second-order gradient actually reaches the op.
    """
    def refuse(ctx, *grads):
        raise NotImplementedError(
            "double backward (a gradient of a gradient, e.g. through torch.autograd.grad(..., "
            f"create_graph=True)) is not supported by {what}'s Triton kernels: run the op with "
            "backend='reference' for second-order gradients")

    backward_op.register_autograd(refuse)


def check_cache_storage(name: str, x: torch.Tensor, held: torch.Tensor) -> None:
    """New entries ``x`` of a cache must have the dtype and device of its storage ``held``."""
    if x.device != held.device:
        raise ValueError(f"{name} is on {x.device} but the cache is on {held.device}")
    if x.dtype != held.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {held.dtype}")


def check_cache_entries(k: torch.Tensor, v: torch.Tensor, keys: Optional[torch.Tensor],
                        values: Optional[torch.Tensor]) -> None:
    """New keys k (B, Hkv, n, D) and values v (B, Hkv, n, Dv) of a decode cache must match its
    stored keys (B, Hkv, slots, D) and values (B, Hkv, slots, Dv) (nothing is checked before
    the cache stores anything). A cache decodes one batch of sequences from its first call
    to its last, so a batch of another size is refused rather than misread."""
    if keys is None or values is None:
        return
    if k.shape[0] != keys.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but the cache holds {keys.shape[0]} sequences: a cache "
                         "decodes one batch from its first call to its last; make a new cache for another batch")
    for name, x, held in (("k", k, keys), ("v", v, values)):
        for dim, what in ((1, "kv heads"), (3, "head dim")):
            if x.shape[dim] != held.shape[dim]:
                raise ValueError(f"k/v do not match the cache: {name} has {what} {x.shape[dim]}, the cache holds "
                                 f"{held.shape[dim]} (shapes {tuple(x.shape)} and {tuple(held.shape)})")
        check_cache_storage(name, x, held)
