"""attnkit: pluggable attention kernels for PyTorch.

Every variant shares one tensor interface (q (B, Hq, Nq, D), k (B, Hkv, Nk, D),
v (B, Hkv, Nk, Dv)), has a readable PyTorch reference and a Triton kernel tested
against it, and is reachable as a functional op, through ``attnkit.attention``
and as an ``nn.Module``.
"""

import sys as _sys

from . import checks, mods, testing
from .dispatch import Explanation, attention, explain
from .merge import merge_attention
from .mods import MaskMod, ScoreMod
from .registry import Case, Variant, get_variant, list_variants, register_variant, unregister_variant
from .sdpa import scaled_dot_product_attention, sdpa_route

# Variants register themselves on import, in this order.
from .flash import flash_attention  # noqa: E402
from .sliding_window import SlidingWindowCache, sliding_window_attention  # noqa: E402
from .block_sparse import BlockMask, block_sparse_attention, moba_attention, patterns  # noqa: E402
from .neighborhood import neighborhood_attention  # noqa: E402
from .linear import feature_maps, lightning_attention, lightning_slopes, linear_attention  # noqa: E402
from .gla import gated_linear_attention  # noqa: E402
from .flex import create_block_mask, flex_attention  # noqa: E402
from .decode import HeavyHitterCache, PagedKVCache, StreamingHeadsCache, decode_attention  # noqa: E402
from .delta_rule import delta_rule_attention  # noqa: E402

from . import extension, nn  # noqa: E402

# attnkit.feature_maps is attnkit.linear.feature_maps under its documented name, importable
# as such too: ``from attnkit.feature_maps import Hedgehog``.
_sys.modules[__name__ + ".feature_maps"] = feature_maps

__version__ = "0.1.0"

__all__ = [
    "BlockMask", "Case", "Explanation", "HeavyHitterCache", "MaskMod", "PagedKVCache", "ScoreMod",
    "SlidingWindowCache", "StreamingHeadsCache", "Variant", "attention",
    "block_sparse_attention", "checks", "create_block_mask", "decode_attention", "explain", "extension",
    "delta_rule_attention",
    "feature_maps",
    "flash_attention", "flex_attention", "gated_linear_attention", "get_variant", "lightning_attention",
    "lightning_slopes", "linear_attention", "list_variants", "merge_attention", "moba_attention", "mods",
    "neighborhood_attention", "nn", "patterns", "register_variant", "scaled_dot_product_attention", "sdpa_route",
    "sliding_window_attention", "testing", "unregister_variant",
]
