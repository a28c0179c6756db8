"""Context parallelism on torch.distributed (NCCL on GPUs, gloo on CPU).

When one device cannot hold a sequence, shard it across the ranks of a process group:

* :func:`shard_sequence` / :func:`unshard_sequence` - layouts "contiguous", "zigzag",
  "striped" (:mod:`.layout`).
* :func:`ring_attention` - K/V rotate around the ring by P2P; causal work balanced by
  the zigzag and striped layouts; GQA; sink logits; packed sequences; sliding windows
  and sinks on a chain that talks only to the ranks a window reaches; differentiable
  (:mod:`.ring`).
* :func:`ulysses_attention` - all-to-all sequence <-> heads around any registered
  variant (:mod:`.ulysses`).
* :func:`tree_decode` - decoding against a KV cache split across ranks with
  all-reduces, O(log W) steps (:mod:`.tree`).
* :func:`lasp2_linear_attention`, :func:`lasp2_lightning_attention` - LASP-2 for
  linear / lightning attention: one all-gather of the recurrent states (:mod:`.lasp2`).
* :func:`usp_attention` - USP: Ulysses inside one dimension of a 2-D device mesh, ring
  attention across the other (:mod:`.usp`).
* :func:`lasp2h_attention` - LASP-2H, the softmax layers of a linear/softmax hybrid:
  one all-gather of K/V (:mod:`.lasp2h`).
* :func:`token_ring_attention` - TokenRing: queries travel forward, partial outputs
  back, K/V stay home (:mod:`.token_ring`).
* :func:`star_attention` - Star Attention's two phases (long-context inference,
  approximate by design): blockwise context with an anchor prefix, then the query
  over every rank's cache (:mod:`.star`).

``python -m attnkit.distributed.costs`` prints the communication cost model
(docs/distributed.md). Every function also runs without an initialized process
group (one rank).
"""

from .lasp2 import lasp2_lightning_attention, lasp2_linear_attention
from .lasp2h import lasp2h_attention
from .layout import LAYOUTS, shard_sequence, unshard_sequence
from .ring import ring_attention
from .star import star_attention
from .token_ring import token_ring_attention
from .tree import tree_decode
from .ulysses import ulysses_attention
from .usp import usp_attention

__all__ = ["LAYOUTS", "lasp2_lightning_attention", "lasp2_linear_attention", "ring_attention", "shard_sequence",
           "tree_decode", "ulysses_attention", "unshard_sequence"]
__all__ += ["lasp2h_attention", "usp_attention"]
__all__ += ["star_attention", "token_ring_attention"]
