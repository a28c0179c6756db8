"""Attention dropout, FlashAttention's: ``out = dropout(softmax(S)) V``.

The softmax probabilities P are dropped with probability ``p`` and the kept ones scaled
by ``1 / (1 - p)``, before they multiply V; the LSE is that of the undropped softmax.
Whether pair (q_idx, kv_idx) of head h in batch entry (or packed sequence) b is kept
is a pure function of a per-call key and of those positions (the ones score and mask
mods see, docs/mods.md), computed by a counter-based hash, so:

* the kernel needs no mask in memory: the forward and both backward passes regenerate
  the same keep bits tile by tile;
* the reference reproduces exactly the kernel's mask from the same key, so the two are
  compared as for any other option (``attnkit.testing``);
* the key is drawn from torch's default generator of the device (:func:`draw_seed`):
  ``torch.manual_seed`` reproduces a call's mask, and drawing it is a device op (no
  host synchronization; capturable in a CUDA graph).

The hash is written twice with the same uint32 arithmetic: here in PyTorch (int64
tensors masked with ``& 0xFFFFFFFF``, every product below 2**63) and in Triton
(``attnkit.kernels.engine.dropout``); tests/test_dropout.py checks that they agree bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import check_dropout

#: the multipliers of :func:`mix32` (a lowbias32-style integer mix); both are < 2**31, so a
#: uint32 times one of them fits an int64 exactly
MIX_A = 0x21F0AAAD
MIX_B = 0x735A2D97
#: keys the columns' chain apart from the rows' (no symmetry between q_idx and kv_idx)
COLUMN_SALT = 0x5851F42D
_U32 = 0xFFFFFFFF
#: a pair is kept iff the top 31 bits of its hash are >= round(p * 2**31)
THRESHOLD_ONE = 1 << 31

#: positions (b, h, q_idx, kv_idx) as :func:`attnkit._reference.mod_positions` shapes them
Positions = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def mix32(x: torch.Tensor) -> torch.Tensor:
    """One bijective uint32 mix; ``x`` int64 holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_A) & _U32
    x = x ^ (x >> 15)
    x = (x * MIX_B) & _U32
    return x ^ (x >> 15)


def _u32(x) -> torch.Tensor:
    # the low 32 bits, as the kernel's casts to uint32 take them (two's complement for negatives)
    return torch.as_tensor(x).to(torch.int64) & _U32


def dropout_bits(seed, offset, b, h, q_idx, kv_idx) -> torch.Tensor:
    """The 32 random bits of each pair, int64 in [0, 2**32), broadcast over the arguments.

    Every argument is an int or an integer tensor (negative positions allowed: a query
    before the first key, bottom-right aligned). A chain of :func:`mix32` over (seed,
    offset, b, h) gives the head's base; a row's word is mix(base ^ q_idx), a column's
    mix(mix(base ^ COLUMN_SALT) ^ kv_idx), and a pair's bits mix(row ^ column): a tile
    costs one mix per row, one per column and one per pair.
    """
    base = mix32(_u32(seed))
    for word in (offset, b, h):
        base = mix32(base ^ _u32(word))
    row = mix32(base ^ _u32(q_idx))
    column = mix32(mix32(base ^ COLUMN_SALT) ^ _u32(kv_idx))
    return mix32(row ^ column)


def dropout_threshold(p: float) -> int:
    """The integer threshold of a drop probability: keep iff ``bits >> 1 >= threshold``, so
    a pair is kept with probability 1 - threshold / 2**31 (p to within 2**-32)."""
    return min(round(p * THRESHOLD_ONE), THRESHOLD_ONE - 1)


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A call's key: int64 (2,) = (seed, offset), two words in [0, 2**31) drawn from torch's
    default generator of ``device`` (the same draw on every path, so a kernel and the
    reference called after the same ``torch.manual_seed`` drop the same pairs)."""
    return torch.randint(0, 1 << 31, (2,), dtype=torch.int64, device=device)


@dataclass(frozen=True, eq=False)  # eq=False: identity, not an elementwise tensor comparison
class Dropout:
    """The attention dropout of one call: drop probability ``p`` in (0, 1) and the key
    ``seed`` (int64 (2,) = (seed, offset) on the call's device, see :func:`draw_seed`)."""

    p: float
    seed: torch.Tensor

    @staticmethod
    def draw(p: object, device: torch.device | str) -> Dropout | None:
        """The dropout of a call with ``dropout_p = p``: None for 0 (no dropout, and nothing
        is drawn from the generator), else a fresh key from the device's generator."""
        p = check_dropout(p)
        return Dropout(p, draw_seed(device)) if p > 0 else None

    @property
    def threshold(self) -> int:
        return dropout_threshold(self.p)

    @property
    def keep_scale(self) -> float:
        """The factor of a kept probability, 1 / (1 - p)."""
        return 1.0 / (1.0 - self.p)

    def keep(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """Boolean keep-mask of the pairs, broadcast over the positions (as mods get them)."""
        bits = dropout_bits(self.seed[0], self.seed[1], b, h, q_idx, kv_idx)
        return (bits >> 1) >= self.threshold

    def apply(self, probs: torch.Tensor, positions: Positions) -> torch.Tensor:
        """``probs`` (B, H, M, L) with the dropped pairs zeroed and the kept ones scaled."""
        return torch.where(self.keep(*positions), probs * self.keep_scale, torch.zeros_like(probs))


def bind_dropout(dropout: Dropout | None, positions: Positions
                 ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``dropout`` bound to one chunk's positions, for :func:`attnkit._reference.softmax_attend`
    (None stays None)."""
    if dropout is None:
        return None
    return lambda probs: dropout.apply(probs, positions)


__all__ = ["Dropout", "bind_dropout", "draw_seed", "dropout_bits", "dropout_threshold", "mix32"]
