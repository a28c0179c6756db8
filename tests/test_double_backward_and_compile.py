"""Double backward: the Triton path refuses it with a clear error (its backward kernels
have no derivative of their own), the reference path supports it. torch.compile with
dynamic shapes: the reference paths compile once for every sequence length."""

import warnings

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


# --------------------------------------------------------------------------- compile without recompiles

def _modules():
    """The modules whose reference path compiled once per sequence length (a tensor size
    specialized by a Python loop over it); each takes x (2, N, 32)."""
    def attention(variant, **options):
        return lambda: attnkit.nn.Attention(32, num_heads=4, num_kv_heads=2, variant=variant, backend="reference",
                                            **options)

    def neighborhood():
        module = attnkit.nn.NeighborhoodAttention1D(32, 4, kernel_size=3)
        module.backend = "reference"
        return module

    def multihead():
        module = attnkit.nn.MultiheadAttention(32, 4, backend="reference")
        # (L, N, E) layout, torch's default; need_weights=False takes attnkit's path
        return lambda x: module(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1),
                                need_weights=False)[0].transpose(0, 1)

    return {
        "flash": attention("flash", causal=True),
        "sliding_window": attention("sliding_window", window=4, sinks=1),
        "linear": attention("linear", feature_map="elu+1"),
        "moba": attention("moba", block_size=4, top_k=2),
        "multihead": multihead,
        "neighborhood1d": neighborhood,
    }


MODULES = _modules()


@pytest.mark.parametrize("name", list(MODULES))
def test_reference_compiles_once_for_every_length(name):
    torch.manual_seed(0)
    module = MODULES[name]()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, dynamic=True, backend=counting_backend)
    for n in (8, 12, 16, 20):
        x = torch.randn(2, n, 32, device=DEVICE)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1, f"{name}: {len(graphs)} graphs for 4 sequence lengths"


def test_neighborhood_reference_compiles_without_lru_cache_warning():
    module = MODULES["neighborhood1d"]()
    torch._dynamo.reset()
    compiled = torch.compile(module, dynamic=True, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(1, 10, 32, device=DEVICE))
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_distributed_local_block_refuses_double_backward():
    """The ring's and tree decoding's local block runs the engine's backward *kernel* on
    GPUs, which has no derivative: a second-order gradient must raise, not vanish."""
    from attnkit.distributed._blocks import LocalAttention

    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = LocalAttention.apply(q, k, v, False, 0.25, None)
    (dq,) = torch.autograd.grad(out.sum() + lse.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        torch.autograd.grad(dq.sum(), k)
