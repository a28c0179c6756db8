"""The chunk-parallel linear-attention engine (the library's second engine), shared by the
``linear``, ``lightning`` and ``gla`` (scalar gates) variants: a states pass and an output
pass (flash-linear-attention's two stages) for the forward pass and the backward passes,
and a recurrent kernel for decoding (docs/architecture.md, The chunked linear engine)."""

from .launch import (
    force_chunk,
    linear_backward,
    linear_forward,
    output_pass,
    plan_chunks,
    states_pass,
)

__all__ = ["force_chunk", "linear_backward", "linear_forward", "output_pass", "plan_chunks", "states_pass"]
