"""The linear variants' PyTorch paths (the references and the torch backend) never build an
N x N tensor: their largest intermediate grows linearly with the sequence (O(N * D^2 / chunk +
N * chunk) per head), as the chunked algorithm promises. Measured with a dispatch mode that
sees every tensor an op makes, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


D = 16


def _call(variant: str, n: int, backend: str):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    gate = F.logsigmoid(torch.randn(1, 1, n, generator=g, dtype=torch.float64)).requires_grad_()
    if variant == "linear":
        return lambda: attnkit.linear_attention(q, k, v, backend=backend)
    if variant == "lightning":
        return lambda: attnkit.lightning_attention(q, k, v, torch.tensor([0.1], dtype=torch.float64),
                                                   backend=backend)
    if variant == "gla":
        return lambda: attnkit.gated_linear_attention(q, k, v, gate, backend=backend)
    beta = torch.rand(1, 1, n, generator=g, dtype=torch.float64).requires_grad_()
    return lambda: attnkit.delta_rule_attention(q, k, v, beta, g=gate, qk_l2norm=True, backend=backend)


def _largest(variant: str, n: int, backend: str) -> int:
    call = _call(variant, n, backend)
    with LargestTensor() as seen:
        call().sum().backward()
    return seen.numel


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("variant", ["linear", "lightning", "gla", "delta_rule"])
def test_largest_intermediate_grows_linearly(variant, backend):
    n = 1024
    small, large = _largest(variant, n, backend), _largest(variant, 2 * n, backend)
    assert large <= 2.25 * small, f"{variant}/{backend}: largest tensor {small} at N = {n}, {large} at N = {2 * n}"
    assert large < (2 * n) ** 2 / 16, f"{variant}/{backend}: a tensor of {large} elements at N = {2 * n}"
