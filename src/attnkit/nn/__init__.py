"""Drop-in modules built on the functional ops."""

from .attention import Attention
from .multihead import MultiheadAttention

__all__ = ["Attention", "MultiheadAttention"]
