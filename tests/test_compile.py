"""torch.compile(fullgraph=True): no graph breaks through dispatch, the reference, and the
kernels' custom ops (attnkit::fused_attention_fwd/bwd, with fake and autograd formulas)."""

import pytest
import torch

import attnkit

from conftest import DEVICE


def block(backend):
    torch.manual_seed(0)
    return attnkit.nn.Attention(32, num_heads=4, num_kv_heads=2, causal=True, backend=backend).to(DEVICE)


def check_compiled_equals_eager(module, compiler):
    x = torch.randn(2, 24, 32, device=DEVICE, requires_grad=True)
    eager = module(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad.clone(), None
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_reference_backend_compiles_fullgraph():
    check_compiled_equals_eager(block("reference"), "aot_eager")


def test_kernel_custom_ops_compile_fullgraph():
    check_compiled_equals_eager(block("triton"), "aot_eager")


@pytest.mark.parametrize("with_mods", [False, True])
def test_custom_ops_pass_torch_library_checks(with_mods):
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    from attnkit.engine import _encode, _fwd_op
    from attnkit.flash import flash_schedule

    score = mask = None
    if with_mods:  # tensor lists on both mod slots, one tensor needing its gradient
        problem = attnkit.mods.Problem.of("flash", q, k)
        slopes = torch.rand(2, device=DEVICE, requires_grad=True)
        score = attnkit.mods.alibi(slopes).specialize(problem).kernel_view()
        mask = attnkit.mods.prefix_lm(torch.tensor([5], device=DEVICE)).specialize(problem).kernel_view()
    encoded = _encode(flash_schedule(True), score, mask)
    torch.library.opcheck(_fwd_op, (q, k, v, None, *encoded, 0.25, None, None, None, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_kernels_compile_with_inductor_on_gpu():
    check_compiled_equals_eager(block("triton").to(torch.bfloat16).float(), "inductor")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lightning_compiles_fullgraph(backend):
    slopes = attnkit.lightning_slopes(4).to(DEVICE)

    def fn(q, k, v):
        out, state = attnkit.lightning_attention(q, k, v, slopes, return_state=True, backend=backend)
        return out.sum() + state.sum()

    q, k, v = (torch.randn(1, 4, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    eager = fn(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _inputs(*shape):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]


def _spatial(x):
    return x.view(1, 2, 8, 8, 16)


# built once, outside the compiled region, as a model would
BLOCK_MASK = attnkit.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), 32, (64, 64))
DOCS = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 30, 14])).to(DEVICE)
DOC_MASK = attnkit.create_block_mask(attnkit.mods.and_masks(attnkit.mods.causal(), attnkit.mods.document(DOCS)),
                                     None, None, 64, 64, block_size=32, device=DEVICE)
SLOPES = torch.tensor([0.25, 0.5], device=DEVICE, requires_grad=True)

# Variant calls documented (docs/integrations.md) to compile with fullgraph=True.
COMPILES = {
    ("flash", "reference"): lambda q, k, v, b: attnkit.flash_attention(q, k, v, causal=True, backend=b),
    ("flash", "triton"): lambda q, k, v, b: attnkit.flash_attention(q, k, v, causal=True, backend=b),
    ("sliding_window", "reference"): lambda q, k, v, b: attnkit.sliding_window_attention(q, k, v, window=8, sinks=2,
                                                                                       backend=b),
    ("sliding_window", "triton"): lambda q, k, v, b: attnkit.sliding_window_attention(q, k, v, window=8, sinks=2,
                                                                                    backend=b),
    ("linear", "reference"): lambda q, k, v, b: attnkit.linear_attention(q, k, v, feature_map="elu+1", backend=b),
    ("linear", "triton"): lambda q, k, v, b: attnkit.linear_attention(q, k, v, feature_map="elu+1", backend=b),
    ("block_sparse", "triton"): lambda q, k, v, b: attnkit.block_sparse_attention(q, k, v, BLOCK_MASK, causal=True,
                                                                                   backend=b),
    ("moba", "reference"): lambda q, k, v, b: attnkit.moba_attention(q, k, v, block_size=16, top_k=2, backend=b),
    ("neighborhood", "reference"): lambda q, k, v, b: attnkit.neighborhood_attention(
        _spatial(q), _spatial(k), _spatial(v), kernel_size=3, backend=b),
    ("flash_alibi", "triton"): lambda q, k, v, b: attnkit.flash_attention(q, k, v, causal=True, alibi_slopes=SLOPES,
                                                                          backend=b),
    ("flex", "reference"): lambda q, k, v, b: attnkit.flex_attention(
        q, k, v, score_mod=attnkit.mods.alibi(SLOPES), mask_mod=attnkit.mods.causal(), backend=b),
    ("flex", "triton"): lambda q, k, v, b: attnkit.flex_attention(
        q, k, v, score_mod=attnkit.mods.alibi(SLOPES), block_mask=DOC_MASK, backend=b),
}


@pytest.mark.parametrize("name,backend", list(COMPILES), ids=[f"{n}-{b}" for n, b in COMPILES])
def test_variant_compiles_fullgraph(name, backend):
    fn = COMPILES[(name, backend)]
    q, k, v = _inputs(1, 2, 64, 16)
    eager = fn(q, k, v, backend)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: fn(q, k, v, backend), fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
