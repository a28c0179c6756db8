"""Drop-in modules built on the functional ops."""

from .attention import Attention, Gates, RotaryEmbedding
from .cache import (
           KVCache,
           PagedCache,
           RecurrentStateCache,
           StandaloneCache,
           WindowCache,
)
from .multihead import MultiheadAttention
from .neighborhood import (
           NeighborhoodAttention1D,
           NeighborhoodAttention2D,
           NeighborhoodAttention3D,
)

__all__ = ["Attention", "Gates", "KVCache", "MultiheadAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
           "NeighborhoodAttention3D", "PagedCache", "RecurrentStateCache", "RotaryEmbedding", "StandaloneCache",
           "WindowCache"]
