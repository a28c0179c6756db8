"""The contract test: every registered variant's kernel against its reference,
forward output, extra outputs (LSE, states) and gradients, on its example cases."""

import pytest

import attnkit
from attnkit.testing import check_case

from conftest import DEVICE, DTYPES

# a variant without a Triton kernel (backend="triton" refuses it) is checked by the torch
# backend's contract (tests/test_torch_backend.py) instead
CASES = [(name, case) for name in attnkit.list_variants() if attnkit.get_variant(name).kernel is not None
         for case in attnkit.get_variant(name).examples()]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{c.id}" for n, c in CASES])
def test_kernel_matches_reference(name, case, dtype):
    report = check_case(name, case, dtype=dtype, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    assert report.comparisons, "nothing was compared"


@pytest.mark.parametrize("name", attnkit.list_variants())
def test_variant_declares_examples_and_status(name):
    spec = attnkit.get_variant(name)
    assert spec.examples(), f"{name} has no example cases for the contract test"
    assert set(spec.status) == {"reference", "forward", "backward"}
