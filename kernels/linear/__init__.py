"""The chunked linear-attention engine (the library's second engine), shared by the
``linear`` and ``lightning`` variants: one Triton kernel for the forward pass and the
three backward passes (Lightning Attention-2's intra-chunk / inter-chunk split), and a
recurrent kernel for decoding (docs/architecture.md, The chunked linear engine)."""

from .launch import chunk_pass, force_chunk, linear_backward, linear_forward

__all__ = ["chunk_pass", "force_chunk", "linear_backward", "linear_forward"]
