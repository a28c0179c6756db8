"""attnkit: pluggable attention kernels for PyTorch.

Every variant shares one tensor interface (q (B, Hq, Nq, D), k (B, Hkv, Nk, D),
v (B, Hkv, Nk, Dv)), has a readable PyTorch reference and a Triton kernel tested
against it, and is reachable as a functional op, through ``attnkit.attention``
and as an ``nn.Module``.
"""

from . import checks, testing
from .dispatch import Explanation, attention, explain
from .merge import merge_attention
from .sdpa import scaled_dot_product_attention, sdpa_route
from .registry import Case, Variant, get_variant, list_variants, register_variant, unregister_variant

# Variants register themselves on import.
from .flash import flash_attention  # noqa: E402
from .linear import feature_maps, lightning_attention, lightning_slopes, linear_attention  # noqa: E402

from . import nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Case", "Explanation", "Variant", "attention", "checks", "explain", "flash_attention", "get_variant",
    "feature_maps", "lightning_attention", "lightning_slopes", "linear_attention",
    "list_variants", "merge_attention", "nn", "scaled_dot_product_attention", "sdpa_route", "register_variant", "testing", "unregister_variant",
]
