"""Test set-up. Without CUDA the kernel tests run on CPU through Triton's interpreter,
which must be enabled before triton (and so attnkit's kernels) is first imported.
With CUDA they run natively on the GPU, bfloat16 included; set
ATTNKIT_TEST_INTERPRET=1 to force the interpreter there too."""

import os

import torch

NATIVE = torch.cuda.is_available() and os.environ.get("ATTNKIT_TEST_INTERPRET") != "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if NATIVE else "cpu"
# The interpreter computes tl.dot on bfloat16 wrongly (docs/index.md, Testing): bf16 only natively.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if NATIVE else [])


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def recurrent_launches(monkeypatch) -> list:
    """The grids of every launch of the linear engine's token-by-token (decoding) kernel."""
    from attnkit.kernels.linear import launch

    calls = []
    real = launch.linear_recurrent_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(launch, "linear_recurrent_kernel", Spy())
    return calls


def pytest_collection_modifyitems(config, items):
    if NATIVE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs natively there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
