"""Kernel tests run on CPU through Triton's interpreter: it must be enabled before
triton (and so attnkit's kernels) is first imported. On a CUDA machine set
ATTNKIT_TEST_NATIVE=1 to run the same tests natively on the GPU."""

import os

if os.environ.get("ATTNKIT_TEST_NATIVE") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

NATIVE = os.environ.get("ATTNKIT_TEST_NATIVE") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if NATIVE else "cpu"
# The interpreter computes tl.dot on bfloat16 wrongly (DESIGN.md §5): bf16 only natively.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if NATIVE else [])


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
