"""Process-wide switches that kernel code reads at run time.

Kernel code (``attnkit.kernels``) must not depend on the test harness, so the state
both share lives here: the harness (:func:`attnkit.testing.poison_outputs`) turns a
switch on, the kernels' output allocator (``attnkit.kernels.common.new_output``) reads
it. This module imports nothing from attnkit, so any layer may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_poison_outputs = False


def poison_outputs_enabled() -> bool:
    """True while kernel outputs must be allocated full of NaN (inside :func:`poison_outputs`)."""
    return _poison_outputs


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Kernels allocate their outputs full of NaN inside this context, so that an element a
    kernel forgets to write shows up as NaN instead of as stale memory. Contexts nest; the
    previous state is restored on exit."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous
