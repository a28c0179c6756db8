"""Hugging Face transformers integration.

``register()`` adds two attention implementations to transformers'
``AttentionInterface`` (and matching mask functions to ``AttentionMaskInterface``):

* ``"attnkit"`` — causal layers run ``attnkit.flash_attention``; layers that pass a
  ``sliding_window`` (Mistral, Gemma 2/3, gpt-oss sliding layers) run
  ``attnkit.sliding_window_attention`` with HF's convention (the last W keys,
  ``window=W``); ``softcap`` (Gemma 2) and ``s_aux`` (gpt-oss sink logits) are honoured.
* ``"attnkit_sliding_window"`` — every layer runs the sliding-window variant, with the
  layer's ``sliding_window`` or else ``config.sliding_window``.

Padding masks (and any mask transformers must materialize: packed sequences, custom
mask functions, static caches while decoding) go through
``attnkit.scaled_dot_product_attention``, i.e. torch's SDPA, with exact semantics.

    import attnkit.integrations.transformers as hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..dispatch import attention
from ..sdpa import scaled_dot_product_attention

NAMES = ("attnkit", "attnkit_sliding_window")


def attnkit_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None,
                 allow_is_causal_skip: bool = True, **kwargs):
    """transformers mask function: ``None`` (the kernel applies the causal or sliding mask
    itself) when there is no padding and the queries are the last tokens of the keys;
    otherwise the boolean 4-D mask of ``sdpa_mask``."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    no_padding = attention_mask is None or bool(attention_mask.all())
    if allow_is_causal_skip and no_padding and (q_length == 1 or q_length == kv_length):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def _forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
             is_causal: Optional[bool] = None, sliding_window: Optional[int] = None, softcap: Optional[float] = None,
             s_aux: Optional[torch.Tensor] = None, force_window: bool = False, **kwargs) -> Tuple[torch.Tensor, None]:
    """query (B, Hq, L, D), key/value (B, Hkv, S, D) -> ((B, L, Hq, D), None), as transformers expects."""
    if force_window and sliding_window is None:
        sliding_window = getattr(getattr(module, "config", None), "sliding_window", None)
        if sliding_window is None:
            raise ValueError("attn_implementation='attnkit_sliding_window' needs a sliding window: the layer passed "
                             "none and config.sliding_window is not set")
    if dropout and module.training:
        raise ValueError("attnkit kernels have no attention dropout; set attention_dropout=0 or use eval()")
    if attention_mask is not None:
        if softcap is not None or s_aux is not None:
            raise ValueError("a materialized attention mask (padding) together with softcap or sink logits is not "
                             "supported by the attnkit integration; use attn_implementation='eager'")
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                           enable_gqa=key.shape[1] != query.shape[1])
    else:
        causal = True if is_causal is None else bool(is_causal)
        causal = causal and getattr(module, "is_causal", True)
        sinks = None if s_aux is None else s_aux.to(torch.float32)
        if sliding_window is not None and causal:
            out = attention(query, key, value, "sliding_window", window=int(sliding_window), scale=scaling,
                            softcap=softcap, sink_logits=sinks)
        else:
            out = attention(query, key, value, "flash", causal=causal, scale=scaling, softcap=softcap,
                            sink_logits=sinks)
    return out.transpose(1, 2).contiguous(), None


def attnkit_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return _forward(module, query, key, value, attention_mask, **kwargs)


def attnkit_sliding_window_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return _forward(module, query, key, value, attention_mask, force_window=True, **kwargs)


def register() -> None:
    """Register "attnkit" and "attnkit_sliding_window" with transformers (idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("attnkit.integrations.transformers needs transformers (pip install 'attnkit[hf]')") from exc
    AttentionInterface.register("attnkit", attnkit_attention_forward)
    AttentionInterface.register("attnkit_sliding_window", attnkit_sliding_window_attention_forward)
    for name in NAMES:
        AttentionMaskInterface.register(name, attnkit_mask)
