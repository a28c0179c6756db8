"""Drop-in entry points with other libraries' signatures, running attnkit's kernels.

* :mod:`attnkit.compat.flash_attn` — flash-attn 2's functional interface
  (``flash_attn_func``, ``flash_attn_varlen_func``, the packed forms and
  ``flash_attn_with_kvcache``): swap ``from flash_attn import ...`` for
  ``from attnkit.compat.flash_attn import ...``. docs/compat.md lists what is and is not
  supported.
"""

from . import flash_attn

__all__ = ["flash_attn"]
