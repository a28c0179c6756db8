"""Hugging Face transformers integration.

``register()`` adds two attention implementations to transformers'
``AttentionInterface`` (and a matching mask function to ``AttentionMaskInterface``):

* ``"attnkit"`` — layers run ``attnkit.flash_attention`` (causal or not, as the layer
  says); layers that pass a ``sliding_window`` W (Mistral, Qwen2, Gemma 2/3, gpt-oss
  sliding layers, ModernBERT's local layers) run ``attnkit.sliding_window_attention``
  with FlashAttention's convention, as transformers' flash-attention integration:
  ``window=(W - 1, 0)`` on causal layers, ``(W - 1, W - 1)`` on bidirectional ones;
  ``softcap`` (Gemma 2), ``s_aux`` (gpt-oss sink logits) and ``dropout`` (in training)
  are passed through.
* ``"attnkit_sliding_window"`` — every layer runs the sliding-window variant, with the
  layer's ``sliding_window`` or else ``config.sliding_window``.

Padded batches take the route of transformers' flash-attention integration: the mask
function hands the layers the 2-D padding mask (B, Nk) (``None`` without padding); the
layer unpads queries, keys and values to one packed sequence per batch row
(``cu_seqlens_q``/``cu_seqlens_k``), runs attnkit's varlen op and pads the output back
(zeros at padded queries). With a cache (Nq < Nk, left padding) each row's queries are
its newest tokens (bottom-right aligned). Padding-free batches (``cu_seq_lens_q/k``
from a data collator) run packed as they are. A mask the 2-D form cannot describe
(packed sequences in ``position_ids``, custom mask functions, a 4-D mask passed by the
caller) arrives as a 4-D mask: it runs packed too when it is exactly the padding (and
packing) of the layer's causal, windowed or full pattern; otherwise the integration
warns once, naming the reason, and runs torch's SDPA with the mask (or raises, when the
layer needs softcap or sink logits, which torch's SDPA cannot apply).

    import attnkit.integrations.transformers as hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..dispatch import attention
from ..registry import get_variant
from ..sdpa import scaled_dot_product_attention

NAMES = ("attnkit", "attnkit_sliding_window")

Window = tuple[int, int] | None

_warned: set = set()


def _warn_once(reason: str) -> None:
    """One warning per distinct reason for the life of the process (a model warns once,
    not once per layer and step)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, stacklevel=4)


def attnkit_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                 allow_is_causal_skip: bool = True, use_vmap: bool = False,
                 **kwargs: Any) -> torch.Tensor | None:
    """transformers mask function of ``"attnkit"`` and ``"attnkit_sliding_window"``.

    Returns, like transformers' ``flash_attention_mask``: ``None`` when no key is padding
    (the kernel applies the causal or window pattern itself), else the bool padding
    mask (B, kv_length) (True: a real token), which the layers unpad with. When the
    pattern is more than padding on top of the layer's own — a custom ``or``/``and``
    mask function, packed sequences or block ids (transformers then forbids skipping
    the causal mask) — the boolean 4-D mask (B, 1, q_length, kv_length) of
    ``sdpa_mask``, which the layers examine (see the module docstring).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if "allow_is_bidirectional_skip" in kwargs:  # create_bidirectional[_sliding_window]_mask
        padding_only = not use_vmap and bool(kwargs["allow_is_bidirectional_skip"])
    else:  # a causal mask: only a one-query step may ignore a refused skip (compiled decoding)
        padding_only = not use_vmap and (allow_is_causal_skip or q_length == 1)
    if padding_only:
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask.bool()
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                     use_vmap=use_vmap, **kwargs)


class _Packing:
    """Where the real tokens of a padded (B, N) batch go in the packed batch of attnkit's
    varlen ops: ``index_q``/``index_k`` (flat positions b * N + t of the real queries and
    keys, in order) and the int32 offsets ``cu_seqlens_q``/``cu_seqlens_k`` (S + 1,)."""

    def __init__(self, index_q: torch.Tensor, index_k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor) -> None:
        self.index_q, self.index_k = index_q, index_k
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """(S,) sequence lengths -> (S + 1,) int32 offsets starting at 0."""
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _packing(valid_q: torch.Tensor, valid_k: torch.Tensor, seq_q: torch.Tensor, seq_k: torch.Tensor,
             num_seqs: int) -> _Packing:
    """valid_q (B, Nq) / valid_k (B, Nk) bool: the real tokens; seq_q / seq_k: the sequence
    each belongs to, non-decreasing along the flattened batch, in [0, num_seqs)."""
    count_q = torch.bincount(seq_q[valid_q], minlength=num_seqs)
    count_k = torch.bincount(seq_k[valid_k], minlength=num_seqs)
    return _Packing(valid_q.flatten().nonzero().flatten(), valid_k.flatten().nonzero().flatten(),
                    _offsets(count_q), _offsets(count_k))


def _rows(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, length) with row b's index b: each batch row is one sequence."""
    return torch.arange(batch, device=device)[:, None].expand(batch, length)


def _query_tokens(key_mask: torch.Tensor, seqlen_q: int, self_attention: bool) -> torch.Tensor:
    """The real queries (B, Nq) given the real keys (B, Nk). A causal or windowed layer is
    self-attention: its queries are the newest Nq tokens of the keys (a prefill, or a
    decoding step, bottom-right aligned). A bidirectional layer without a window may be
    cross-attention (decoder tokens on encoder keys, possibly as many): every query is
    real, and a padded token's row is computed and ignored."""
    seqlen_k = key_mask.shape[1]
    if self_attention and seqlen_q <= seqlen_k:
        return key_mask[:, seqlen_k - seqlen_q:]
    return torch.ones(key_mask.shape[0], seqlen_q, dtype=torch.bool, device=key_mask.device)


def _contiguous(valid: torch.Tensor) -> bool:
    """Whether the real tokens of every row are one run (left or right padding, not holes):
    then a window measured in real tokens equals transformers' window in positions."""
    count = valid.sum(1)
    pos = torch.arange(valid.shape[1], device=valid.device)
    first = torch.where(valid, pos, valid.shape[1]).amin(1)
    last = torch.where(valid, pos, -1).amax(1)
    return bool(((count == 0) | (last - first + 1 == count)).all())


def _from_padding_mask(mask: torch.Tensor, seqlen_q: int, self_attention: bool) -> _Packing:
    """The packing of a 2-D padding mask (B, Nk) bool (transformers' ``_upad_input``)."""
    valid_q = _query_tokens(mask, seqlen_q, self_attention)
    batch = mask.shape[0]
    return _packing(valid_q, mask, _rows(batch, seqlen_q, mask.device), _rows(batch, mask.shape[1], mask.device),
                    batch)


def _packed_position_ids(position_ids: Any, batch: int, seqlen: int) -> torch.Tensor | None:
    """Sequence ids (1, N) when ``position_ids`` pack several sequences into batch row 0
    (each restart of the positions starts a sequence; transformers' packed format), else None."""
    if not isinstance(position_ids, torch.Tensor) or batch != 1 or seqlen == 1:
        return None
    position_ids = position_ids.reshape(-1, position_ids.shape[-1])[:1]
    if position_ids.shape[-1] != seqlen:
        return None
    first = position_ids[:, :1] - 1
    seq = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    return seq if bool(seq[0, -1] > 0) else None


def _expected_pattern(packing: _Packing, valid_q: torch.Tensor, valid_k: torch.Tensor, seq_q: torch.Tensor,
                      seq_k: torch.Tensor, causal: bool, window: Window) -> torch.Tensor:
    """(B, Nq, Nk) bool: what the varlen op lets each real query see (the same sequence,
    bottom-right aligned per sequence, the causal or window pattern)."""
    cu_q, cu_k = packing.cu_seqlens_q.long(), packing.cu_seqlens_k.long()
    rank_q = (valid_q.flatten().cumsum(0) - 1).view_as(valid_q) - cu_q[seq_q]
    rank_k = (valid_k.flatten().cumsum(0) - 1).view_as(valid_k) - cu_k[seq_k]
    shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])
    rel = rank_k[:, None, :] - (rank_q + shift[seq_q])[:, :, None]  # key - query on the key axis
    allowed = (seq_q[:, :, None] == seq_k[:, None, :]) & valid_q[:, :, None] & valid_k[:, None, :]
    if window is not None:
        allowed &= (rel >= -window[0]) & (rel <= window[1])
    elif causal:
        allowed &= rel <= 0
    return allowed


def _from_4d_mask(mask: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int, causal: bool, window: Window,
                  position_ids: Any) -> _Packing | str:
    """The packing of a 4-D mask (B | 1, 1 | H, Nq, Nk) (bool, or float with 0 for "attend"),
    or the reason it is not one: the mask must equal, on every real query, the layer's own
    pattern over the real tokens of each sequence. A key no query sees is padding; the
    real queries follow from the real keys as for a 2-D mask (:func:`_query_tokens`);
    batch row 0 splits into sequences where ``position_ids`` restart (packed sequences)."""
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | blocked).all()):
            return "the float attention mask adds scores other than 0 and -inf (a bias)"
        allowed = ~blocked
    else:
        return f"an attention mask of dtype {mask.dtype} (expected bool or float)"
    if allowed.shape[-2:] != (seqlen_q, seqlen_k) or allowed.shape[0] not in (1, batch):
        return (f"a 4-D attention mask of shape {tuple(mask.shape)} for a batch of {batch}, {seqlen_q} queries "
                f"and {seqlen_k} keys")
    if allowed.shape[1] > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return "the attention mask differs between heads"
        allowed = allowed[:, :1]
    allowed = allowed[:, 0].expand(batch, seqlen_q, seqlen_k)
    valid_k = allowed.any(1)
    valid_q = _query_tokens(valid_k, seqlen_q, causal or window is not None)
    if window is not None and not (_contiguous(valid_k) and _contiguous(valid_q)):
        return "the attention mask has padding between real tokens and the layer has a sliding window"
    seq_q, seq_k, num_seqs = _rows(batch, seqlen_q, mask.device), _rows(batch, seqlen_k, mask.device), batch
    if seqlen_q == seqlen_k:
        packed = _packed_position_ids(position_ids, batch, seqlen_q)
        if packed is not None:
            seq_q, seq_k, num_seqs = packed, packed, int(packed[0, -1]) + 1
    packing = _packing(valid_q, valid_k, seq_q, seq_k, num_seqs)
    want = _expected_pattern(packing, valid_q, valid_k, seq_q, seq_k, causal, window)
    if not bool((allowed == want)[valid_q].all()):
        return ("the attention mask is not padding or packing of the layer's "
                + ("windowed" if window is not None else "causal" if causal else "full") + " pattern "
                "(a custom mask function, block ids, or a 4-D mask of another shape)")
    return packing


def _unpad(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (1, H, T, D): the T tokens at flat positions ``index`` (b * N + t)."""
    batch, heads, seqlen, dim = x.shape
    flat = x.transpose(1, 2).reshape(batch * seqlen, heads, dim)
    return flat.index_select(0, index).transpose(0, 1).unsqueeze(0)


def _pad(out: torch.Tensor, index: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(1, H, T, Dv) -> (B, N, H, Dv) (transformers' layout), zeros where no query was real."""
    packed = out[0].transpose(0, 1)
    full = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    return full.index_copy(0, index, packed).view(batch, seqlen, *packed.shape[1:])


def _layer_window(module: torch.nn.Module, sliding_window: int | None, causal: bool,
                  force_window: bool) -> Window:
    """The layer's (left, right) window in attnkit's convention, or None."""
    if force_window and sliding_window is None:
        sliding_window = getattr(getattr(module, "config", None), "sliding_window", None)
        if sliding_window is None:
            raise ValueError("attn_implementation='attnkit_sliding_window' needs a sliding window: the layer passed "
                             "none and config.sliding_window is not set")
    if sliding_window is None:
        return None
    size = int(sliding_window)
    if size < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
    # FlashAttention's convention, as transformers' flash-attention integration passes it
    return (size - 1, 0) if causal else (size - 1, size - 1)


def _dropout_option(dropout: float, variant: str) -> dict:
    """``dropout_p`` for the variant, or a clear error where it has no attention dropout."""
    if not dropout:
        return {}
    if "dropout_p" not in get_variant(variant).options:
        raise ValueError(f"attention dropout={dropout} in training, but attnkit's {variant} variant has no "
                         f"dropout_p; set the model's attention dropout to 0 or call eval()")
    return {"dropout_p": float(dropout)}


def _forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, sliding_window: int | None = None, softcap: float | None = None,
             s_aux: torch.Tensor | None = None, force_window: bool = False,
             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, Hq, Nq, D), key (B, Hkv, Nk, D), value (B, Hkv, Nk, Dv) -> ((B, Nq, Hq, Dv), None),
    as transformers expects; ``attention_mask`` None, (B, Nk) bool (padding) or 4-D."""
    causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
    window = _layer_window(module, sliding_window, causal, force_window)
    variant = "flash" if window is None else "sliding_window"
    options: dict = {"scale": scaling, "softcap": softcap,
                         "sink_logits": None if s_aux is None else s_aux.to(torch.float32)}
    if window is None:
        options["causal"] = causal
    else:
        options["window"] = window
    if module.training:
        options.update(_dropout_option(dropout, variant))

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: _Packing | None = None) -> torch.Tensor:
        if packing is None:
            return attention(q, k, v, variant, **options)
        return attention(_unpad(q, packing.index_q), _unpad(k, packing.index_k), _unpad(v, packing.index_k),
                         variant, cu_seqlens_q=packing.cu_seqlens_q, cu_seqlens_k=packing.cu_seqlens_k, **options)

    batch, seqlen_q = query.shape[0], query.shape[2]
    if attention_mask is None:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is not None and cu_k is not None:  # a padding-free batch from a data collator
            flat = _Packing(torch.arange(batch * seqlen_q, device=query.device),
                            torch.arange(batch * key.shape[2], device=query.device),
                            cu_q.to(torch.int32), cu_k.to(torch.int32))
            return _pad(run(query, key, value, flat), flat.index_q, batch, seqlen_q), None
        packed = _packed_position_ids(kwargs.get("position_ids"), batch, seqlen_q)
        if packed is not None and seqlen_q == key.shape[2]:  # sequences packed in row 0, no mask built
            ones = torch.ones_like(packed, dtype=torch.bool)
            packing = _packing(ones, ones, packed, packed, int(packed[0, -1]) + 1)
            return _pad(run(query, key, value, packing), packing.index_q, batch, seqlen_q), None
        return run(query, key, value).transpose(1, 2).contiguous(), None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"the attnkit integration takes attention_mask as None, a (B, Nk) padding mask or a 4-D "
                        f"tensor mask, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:
        if attention_mask.shape[0] != batch:
            raise ValueError(f"the padding mask attention_mask has {attention_mask.shape[0]} rows for a batch of "
                             f"{batch}: expected (B, Nk)")
        mask = attention_mask.bool()
        if mask.shape[1] > key.shape[2]:  # the newest keys (a sliding cache keeps only those)
            mask = mask[:, -key.shape[2]:]
        elif mask.shape[1] < key.shape[2]:  # a static cache: the slots after the mask are unused
            key, value = key[:, :, :mask.shape[1]], value[:, :, :mask.shape[1]]
        if window is not None and not _contiguous(mask):
            raise ValueError("the padding mask has padding between real tokens, but the layer's sliding window is "
                             "measured in positions; attnkit's packed window counts real tokens (use left or right "
                             "padding, or attn_implementation='eager')")
        packing = _from_padding_mask(mask, seqlen_q, causal or window is not None)
        return _pad(run(query, key, value, packing), packing.index_q, batch, seqlen_q), None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be (B, Nk) or 4-D (B, 1, Nq, Nk), got shape "
                         f"{tuple(attention_mask.shape)}")
    packing = _from_4d_mask(attention_mask, batch, seqlen_q, key.shape[2], causal, window,
                            kwargs.get("position_ids"))
    if isinstance(packing, _Packing):
        return _pad(run(query, key, value, packing), packing.index_q, batch, seqlen_q), None
    reason = f"attnkit cannot run this attention mask: {packing}"
    if softcap is not None or s_aux is not None:
        raise ValueError(f"{reason}; the layer's softcap/sink logits rule out torch's SDPA too "
                         f"(use attn_implementation='eager')")
    _warn_once(f"{reason}; these layers run torch's scaled_dot_product_attention with the mask instead")
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                       dropout_p=float(dropout) if module.training else 0.0,
                                       enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def attnkit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``attn_implementation="attnkit"``: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D)
    -> ((B, Nq, Hq, D), None)."""
    return _forward(module, query, key, value, attention_mask, **kwargs)


def attnkit_sliding_window_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``attn_implementation="attnkit_sliding_window"``: as :func:`attnkit_attention_forward`,
    every layer windowed."""
    return _forward(module, query, key, value, attention_mask, force_window=True, **kwargs)


def register() -> None:
    """Register "attnkit" and "attnkit_sliding_window" with transformers (idempotent).

    Layers then get query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D) and a padding mask
    (B, Nk) or None, and return (B, Nq, Hq, D); padded batches run packed on attnkit.

    Examples::

        >>> import torch, transformers
        >>> import attnkit.integrations.transformers as hf
        >>> hf.register()
        >>> cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
        ...                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit").eval()
        >>> ids = torch.randint(1, 97, (2, 12))
        >>> mask = torch.ones(2, 12, dtype=torch.long); mask[1, :4] = 0   # row 1 left-padded
        >>> model(input_ids=ids, attention_mask=mask).logits.shape
        torch.Size([2, 12, 97])
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("attnkit.integrations.transformers needs transformers (pip install 'attnkit[hf]')") from exc
    AttentionInterface.register("attnkit", attnkit_attention_forward)
    AttentionInterface.register("attnkit_sliding_window", attnkit_sliding_window_attention_forward)
    for name in NAMES:
        AttentionMaskInterface.register(name, attnkit_mask)
