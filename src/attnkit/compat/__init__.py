"""Drop-in entry points with other libraries' signatures, running attnkit's kernels.

* :mod:`attnkit.compat.flash_attn` — flash-attn 2's functional interface
  (``flash_attn_func``, ``flash_attn_varlen_func``, the packed forms and
  ``flash_attn_with_kvcache``): swap ``from flash_attn import ...`` for
  ``from attnkit.compat.flash_attn import ...``. docs/compat.md lists what is and is not
  supported.
* :mod:`attnkit.compat.fla` — flash-linear-attention's chunk ops (``chunk_simple_gla``,
  ``chunk_gla``, ``chunk_gated_delta_rule``, ``chunk_linear_attn``,
  ``fused_recurrent_simple_gla``) in its (B, T, H, D) layout, on attnkit's linear variants.
"""

from . import fla, flash_attn

__all__ = ["fla", "flash_attn"]
