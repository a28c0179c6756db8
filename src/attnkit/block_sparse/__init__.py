"""Block-sparse attention: ``BlockMask``, static patterns, and MoBA top-k block gating.

* :class:`BlockMask` — FlexAttention's canonical block-sparse form (per batch, head
  and query block: a count and an ordered list of key blocks, with cached transposed
  lists), with converters from dense block matrices, mask functions and torch's
  FlexAttention ``BlockMask``.
* :func:`block_sparse_attention` — the ``block_sparse`` variant (fused engine, list mode).
* :mod:`attnkit.patterns` — BigBird/Longformer, strided Sparse Transformer, Radial.
* :func:`moba_attention` — the ``moba`` variant.
"""

import sys

from . import patterns
from .block_mask import BlockMask
from .moba import moba_attention
from .variant import block_sparse_attention

__all__ = ["BlockMask", "block_sparse_attention", "moba_attention", "patterns"]

# ``import attnkit.patterns`` / ``from attnkit.patterns import strided`` work as well as ``attnkit.patterns``.
sys.modules.setdefault(__name__.rsplit(".", 1)[0] + ".patterns", patterns)
