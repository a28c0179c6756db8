"""Host-side helpers shared by every kernel family."""

import os

import torch
import triton

from attnkit.runtime import poison_outputs_enabled

#: kernels run through Triton's interpreter (read once, as triton.jit does, at import)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_dim(n: int) -> int:
    """Tile extent covering a head dim of ``n``: the next power of two, at least 16
    (tl.dot needs every operand dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; filled with NaN while attnkit.runtime.poison_outputs() is active
    (the harness turns it on), so that an element a kernel forgets to write fails the comparison."""
    if poison_outputs_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def ensure_allocator() -> None:
    """Tensor descriptors made inside a kernel (the engine's TMA configs) need a little global
    scratch memory per launch, which Triton asks its allocator for: set a torch-backed one
    unless the caller has set their own."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # a Triton without the allocator API has no device-side descriptors either
        return

    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(allocate)
