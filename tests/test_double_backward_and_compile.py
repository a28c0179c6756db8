"""Double backward: the Triton path refuses it with a clear error (its backward kernels
have no derivative of their own), the reference path supports it. torch.compile with
dynamic shapes: the reference paths compile once for every sequence length."""

import pytest
import torch

import attnkit

from conftest import DEVICE


def _leaves(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for _ in range(3)]


# --------------------------------------------------------------------------- double backward

SLOPES = torch.tensor([0.1, 0.3])
# One op per Triton entry point: the fused softmax engine (with and without sink logits,
# whose gradient is computed from the backward kernel's output) and the chunked linear engine.
DOUBLE_BACKWARD = {
    "flash": lambda q, k, v, b: attnkit.flash_attention(q, k, v, causal=True, backend=b),
    "flash_sinks": lambda q, k, v, b: attnkit.flash_attention(q, k, v, sink_logits=torch.zeros(2, device=q.device),
                                                              backend=b),
    "sliding_window": lambda q, k, v, b: attnkit.sliding_window_attention(q, k, v, window=8, backend=b),
    "linear": lambda q, k, v, b: attnkit.linear_attention(q, k, v, feature_map="elu+1", backend=b),
    "lightning": lambda q, k, v, b: attnkit.lightning_attention(q, k, v, SLOPES.to(q.device), backend=b),
}


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_triton_double_backward_raises_a_clear_error(name):
    q, k, v = _leaves(1, 2, 32, 16)
    out = DOUBLE_BACKWARD[name](q, k, v, "triton")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # first order still works
    with pytest.raises(NotImplementedError, match=r"double backward.*backend='reference'"):
        torch.autograd.grad(dq.square().sum(), (q, k, v))


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_triton_first_order_unaffected_by_create_graph(name):
    q, k, v = _leaves(1, 2, 32, 16)
    out = DOUBLE_BACKWARD[name](q, k, v, "triton")
    plain = torch.autograd.grad(out.square().sum(), (q, k, v), retain_graph=True)
    graphed = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_reference_double_backward_gradgradcheck(name):
    q, k, v = _leaves(1, 2, 5, 3, dtype=torch.float64)
    fn = DOUBLE_BACKWARD[name]
    assert torch.autograd.gradgradcheck(lambda q, k, v: fn(q, k, v, "reference"), (q, k, v))
