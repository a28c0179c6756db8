"""Host-side helpers shared by every kernel family."""

import torch


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; filled with NaN while attnkit.testing.poison_outputs() is active,
    so that an element a kernel forgets to write fails the comparison."""
    from attnkit import testing  # late import: attnkit.testing imports torch only

    if testing.POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
