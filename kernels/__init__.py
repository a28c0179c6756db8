"""Triton kernels of attnkit, installed as ``attnkit.kernels``.

``engine`` is the fused softmax-attention engine; each variant module (``flash``,
...) supplies only its block schedule and token mask as @triton.jit functions.
Importing this package imports triton: ``TRITON_INTERPRET=1`` must be set before.
``linear`` is the second engine (chunked linear attention) and ``decode`` the split-KV
decoding kernels; docs/architecture.md explains how the pieces fit.
"""
