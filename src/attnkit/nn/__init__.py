"""Drop-in modules built on the functional ops."""

from .attention import Attention

__all__ = ["Attention"]
