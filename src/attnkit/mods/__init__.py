"""Score and mask modifications for the programmable softmax engine.

* :class:`ScoreMod` / :class:`MaskMod` — the two contracts: a ``@triton.jit`` function
  for the kernel, a PyTorch function for the reference, and the tensors both read.
* The library: score mods :func:`alibi`, :func:`relative_position_bias` (T5),
  :func:`relative_position_bias_2d` (NATTEN's rpb), :func:`key_bias`, :func:`softcap`;
  masks :func:`causal`, :func:`sliding_window`, :func:`prefix_lm`, :func:`document`;
  combinators :func:`and_masks`, :func:`or_masks`, :func:`chain_score_mods`.

Every op of the softmax family takes ``score_mod=`` (flash, sliding_window,
block_sparse, neighborhood, flex); flex and block_sparse also take ``mask_mod=``, and
:func:`attnkit.create_block_mask` turns a mask into a BlockMask whose partial tiles
carry it. See docs/mods.md.
"""

from .core import MaskMod, Problem, ScoreMod, and_masks, chain_score_mods, or_masks
from .library import (alibi, alibi_slopes, causal, document, key_bias, prefix_lm, relative_position_bias,
                      relative_position_bias_2d, sliding_window, softcap, t5_bucket)

__all__ = ["MaskMod", "Problem", "ScoreMod", "alibi", "alibi_slopes", "and_masks", "causal", "chain_score_mods",
           "document", "key_bias", "or_masks", "prefix_lm", "relative_position_bias", "relative_position_bias_2d",
           "sliding_window", "softcap", "t5_bucket"]
