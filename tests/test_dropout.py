"""Attention dropout (issue 14, item 3): the hash's two twins agree bit for bit, the kernel
drops exactly the reference's pairs for the same seed (forward and gradients), seeds
differ, the mean over seeds is the undropped output, dropout_p = 0 is no dropout, bad
values are named, and nn.Attention drops in train() only.

The kernel = reference comparisons of every softmax variant (GQA, varlen, sinks,
softcap, per-head windows, dilation groups, learnable mods) run in the contract test on
each variant's ``dropout_*`` example; these tests check what the harness cannot."""

import math

import pytest
import torch
import triton
import triton.language as tl
from attnkit.kernels.engine import dropout as kernel_dropout
from conftest import DEVICE

import attnkit
from attnkit.dropout import Dropout, dropout_bits, dropout_threshold
from attnkit.testing import check_case, relative_error

SOFTMAX_VARIANTS = ["flash", "sliding_window", "block_sparse", "moba", "neighborhood", "flex"]


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------- the hash: Triton twin == PyTorch twin


@triton.jit
def _bits_kernel(SEED, WORDS, Q, K, OUT, M: tl.constexpr, N: tl.constexpr):
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    q_idx = tl.load(Q + rows)[:, None]
    kv_idx = tl.load(K + cols)[None, :]
    bits = kernel_dropout.dropout_bits(tl.load(SEED), tl.load(SEED + 1), tl.load(WORDS), tl.load(WORDS + 1),
                                       q_idx, kv_idx)
    tl.store(OUT + rows[:, None] * N + cols[None, :], bits.to(tl.int64))


@pytest.mark.parametrize("seed,offset,b,h", [(0, 0, 0, 0), (123456789, 2**31 - 1, 3, 7), (2**31 - 1, 17, 65535, 1)])
def test_triton_and_pytorch_hashes_agree_bit_for_bit(seed, offset, b, h):
    # positions: negative (a query before the first key, bottom-right), small, and near int32's limit
    q_idx = torch.tensor([-2**31, -70000, -1, 0, 1, 2, 3, 17, 255, 4096, 65537, 10**6, 2**24 + 3, 10**9, 2**31 - 2,
                          2**31 - 1], dtype=torch.int32, device=DEVICE)
    kv_idx = torch.cat([torch.arange(8, dtype=torch.int32), torch.tensor([1000, 2**20, 2**30, 2**31 - 1, 77, 6000, 9, 12],
                                                                          dtype=torch.int32)]).to(DEVICE)
    out = torch.empty(16, 16, dtype=torch.int64, device=DEVICE)
    _bits_kernel[(1,)](torch.tensor([seed, offset], dtype=torch.int64, device=DEVICE),
                       torch.tensor([b, h], dtype=torch.int32, device=DEVICE), q_idx, kv_idx, out, M=16, N=16)
    expected = dropout_bits(seed, offset, b, h, q_idx.long()[:, None], kv_idx.long()[None, :])
    assert torch.equal(out, expected)
    assert int(expected.min()) >= 0 and int(expected.max()) < 2**32
    assert expected.unique().numel() == expected.numel()  # 256 draws of 32 bits: no repeats here


def test_hash_bits_are_balanced_and_independent_of_neighbours():
    # fixed seeds: deterministic, so the bounds below cannot flake; they are ~10 sigma wide
    q = torch.arange(-8, 120)[:, None]
    k = torch.arange(128)[None, :]
    for seed in range(4):
        bits = dropout_bits(seed * 7919, seed, seed % 2, seed % 3, q, k)
        keep = (bits >> 1) >= dropout_threshold(0.3)
        frac = keep.double().mean().item()
        assert abs(frac - 0.7) < 10 * math.sqrt(0.21 / keep.numel()), frac
        # neighbours along q and along k agree as often as two independent draws do
        for same in ((keep[1:] == keep[:-1]), (keep[:, 1:] == keep[:, :-1])):
            assert abs(same.double().mean().item() - 0.58) < 10 * math.sqrt(0.58 * 0.42 / same.numel())
        for bit in (0, 13, 31):  # every bit position is a fair coin
            ones = ((bits >> bit) & 1).double().mean().item()
            assert abs(ones - 0.5) < 10 * math.sqrt(0.25 / bits.numel())


def test_threshold_keeps_one_minus_p():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**30
    assert dropout_threshold(1 - 1e-12) == 2**31 - 1  # never drops everything by rounding


# ---------------------------------------------------------------- the kernel drops exactly the reference's pairs


def _one_hot_values(nk, heads_kv, dtype=torch.float32):
    # q = 0: every visible key gets probability 1/Nk; v = identity: out[i, j] = keep(i, j) * scale / Nk
    return torch.eye(nk, dtype=dtype, device=DEVICE).expand(2, heads_kv, nk, nk).contiguous()


@pytest.mark.parametrize("nq,nk", [(40, 32), (17, 48)])
def test_kernel_mask_is_the_reference_mask_pair_for_pair(nq, nk):
    B, Hq, Hkv, p = 2, 4, 2, 0.4
    q = torch.zeros(B, Hq, nq, 16, device=DEVICE)
    k = torch.zeros(B, Hkv, nk, 16, device=DEVICE)  # equal scores: the mask shows through unchanged
    v = _one_hot_values(nk, Hkv)
    out = seeded(5, attnkit.flash_attention, q, k, v, dropout_p=p, backend="triton")
    torch.manual_seed(5)
    dropout = Dropout.draw(p, DEVICE)
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(Hq).view(1, -1, 1, 1)
    q_idx = (torch.arange(nq) + nk - nq).view(1, 1, -1, 1)  # bottom-right: negative when Nq > Nk
    keep = dropout.keep(b, h, q_idx, torch.arange(nk).view(1, 1, 1, -1))
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / ((1 - p) * nk)))
    ref = seeded(5, attnkit.flash_attention, q, k, v, dropout_p=p, backend="reference")
    torch.testing.assert_close(out, ref)


def test_varlen_mask_restarts_per_sequence_as_the_reference():
    lengths = [9, 0, 23, 1]
    cu = torch.tensor([0, 9, 9, 32, 33], dtype=torch.int32, device=DEVICE)
    n = sum(lengths)
    q = torch.zeros(1, 2, n, 16, device=DEVICE)
    k = torch.zeros(1, 2, n, 16, device=DEVICE)
    v = torch.eye(n, device=DEVICE).expand(1, 2, n, n).contiguous()
    kw = {"causal": True, "dropout_p": 0.5, "cu_seqlens_q": cu, "cu_seqlens_k": cu}
    out = seeded(11, attnkit.flash_attention, q, k, v, backend="triton", **kw)
    ref = seeded(11, attnkit.flash_attention, q, k, v, backend="reference", **kw)
    assert torch.equal(out != 0, ref != 0)
    torch.testing.assert_close(out, ref)
    assert (out != 0).any() and (out == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_equals_reference_with_the_same_seed_outputs_and_gradients(dtype):
    q, k, v = rand(2, 4, 37, 32, seed=1, dtype=dtype), rand(2, 2, 45, 32, seed=2, dtype=dtype), \
        rand(2, 2, 45, 24, seed=3, dtype=dtype)
    do = rand(2, 4, 37, 24, seed=4, dtype=dtype)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = seeded(3, attnkit.flash_attention, *leaves, causal=True, softcap=5.0, dropout_p=0.25,
                          return_lse=True, backend=backend)
        out.backward(do)
        results[backend] = (out.detach(), lse, *(t.grad for t in leaves))
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], results["triton"], results["reference"]):
        assert relative_error(a.double(), b.double()) < tol, name
    # the LSE is the undropped softmax's
    lse_plain = attnkit.flash_attention(q, k, v, causal=True, softcap=5.0, return_lse=True, backend="reference")[1]
    torch.testing.assert_close(results["triton"][1], lse_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SOFTMAX_VARIANTS)
def test_every_softmax_variant_has_a_dropout_example_that_passes(name):
    cases = [c for c in attnkit.get_variant(name).examples() if c.options.get("dropout_p")]
    assert cases, f"{name} has no dropout example for the contract test"
    report = check_case(name, cases[0], dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)


def test_harness_runs_draw_the_same_key_and_leave_the_generator_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    case = next(c for c in attnkit.get_variant("flash").examples() if c.options.get("dropout_p"))
    report = check_case("flash", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)
    assert max(c.kernel_error for c in report.comparisons) < 1e-4  # same mask, not a 2x-the-noise pass
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- seeds, statistics, p = 0


def test_same_seed_same_output_different_seeds_differ():
    q, k, v = rand(1, 2, 33, 16, seed=1), rand(1, 2, 33, 16, seed=2), rand(1, 2, 33, 16, seed=3)
    for backend in ("triton", "reference"):
        a = seeded(1, attnkit.flash_attention, q, k, v, dropout_p=0.3, backend=backend)
        b = seeded(1, attnkit.flash_attention, q, k, v, dropout_p=0.3, backend=backend)
        c = seeded(2, attnkit.flash_attention, q, k, v, dropout_p=0.3, backend=backend)
        assert torch.equal(a, b)
        assert relative_error(a, c) > 0.1
    # and consecutive calls draw fresh keys
    torch.manual_seed(1)
    first = attnkit.flash_attention(q, k, v, dropout_p=0.3, backend="triton")
    second = attnkit.flash_attention(q, k, v, dropout_p=0.3, backend="triton")
    assert relative_error(first, second) > 0.1


def test_mean_over_seeds_approaches_the_undropped_output():
    q, k, v = rand(1, 2, 24, 16, seed=1), rand(1, 2, 40, 16, seed=2), rand(1, 2, 40, 16, seed=3)
    q, k, v = q.double(), k.double(), v.double()
    plain = attnkit.flash_attention(q, k, v, causal=True, backend="reference")
    n = 400
    draws = torch.stack([seeded(s, attnkit.flash_attention, q, k, v, causal=True, dropout_p=0.3,
                                backend="reference") for s in range(n)])
    one = relative_error(draws[0], plain)
    mean = relative_error(draws.mean(0), plain)
    # unbiased: the error of the mean shrinks as 1/sqrt(n) (a biased scale would stay at its bias);
    # seeds are fixed, so these bounds (several sigma wide) cannot flake
    assert one > 0.2
    assert mean < 2.5 * one / math.sqrt(n), (one, mean)


def test_dropout_p_zero_is_no_dropout_and_draws_nothing():
    q, k, v = rand(1, 2, 33, 16, seed=1), rand(1, 2, 33, 16, seed=2), rand(1, 2, 33, 16, seed=3)
    for backend in ("triton", "reference"):
        plain = attnkit.flash_attention(q, k, v, causal=True, backend=backend)
        state = torch.get_rng_state()
        zero = attnkit.flash_attention(q, k, v, causal=True, dropout_p=0.0, backend=backend)
        assert torch.equal(zero, plain)
        assert torch.equal(torch.get_rng_state(), state)
    assert Dropout.draw(0.0, DEVICE) is None and Dropout.draw(0, DEVICE) is None


# ---------------------------------------------------------------- bad input


def _call(name, dropout_p):
    q, k, v = rand(1, 2, 32, 16, seed=1), rand(1, 2, 32, 16, seed=2), rand(1, 2, 32, 16, seed=3)
    mask = attnkit.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, (32, 32))
    calls = {
        "flash": lambda: attnkit.flash_attention(q, k, v, dropout_p=dropout_p),
        "sliding_window": lambda: attnkit.sliding_window_attention(q, k, v, window=8, dropout_p=dropout_p),
        "block_sparse": lambda: attnkit.block_sparse_attention(q, k, v, mask, dropout_p=dropout_p),
        "moba": lambda: attnkit.moba_attention(q, k, v, block_size=16, top_k=2, dropout_p=dropout_p),
        "neighborhood": lambda: attnkit.neighborhood_attention(q, k, v, kernel_size=5, dropout_p=dropout_p),
        "flex": lambda: attnkit.flex_attention(q, k, v, dropout_p=dropout_p),
    }
    return calls[name]()


@pytest.mark.parametrize("name", SOFTMAX_VARIANTS)
@pytest.mark.parametrize("bad,error", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                       (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError),
                                       (None, TypeError)])
def test_bad_dropout_p_is_named(name, bad, error):
    with pytest.raises(error, match=r"dropout_p must be a float in \[0, 1\)"):
        _call(name, bad)


def test_a_tensor_dropout_p_is_refused():
    with pytest.raises(TypeError, match="dropout_p must be a float in .* got Tensor"):
        _call("flash", torch.tensor(0.1))


@pytest.mark.parametrize("name", SOFTMAX_VARIANTS)
def test_every_softmax_variant_drops(name):
    torch.manual_seed(0)
    plain = _call(name, 0.0)
    dropped = _call(name, 0.5)
    assert relative_error(dropped, plain) > 0.1


# ---------------------------------------------------------------- modules: dropout in train() only


def test_attention_module_drops_in_train_only():
    torch.manual_seed(0)
    block = attnkit.nn.Attention(32, num_heads=4, causal=True, dropout_p=0.5).to(DEVICE)
    plain = attnkit.nn.Attention(32, num_heads=4, causal=True).to(DEVICE)
    plain.load_state_dict(block.state_dict())
    x = rand(2, 24, 32, seed=1)
    block.eval()
    assert torch.equal(block(x), plain(x))
    block.train()
    a, b, c = seeded(1, block, x), seeded(1, block, x), seeded(2, block, x)
    assert torch.equal(a, b) and relative_error(a, plain(x)) > 0.1 and relative_error(a, c) > 0.1
    # train() passes dropout_p to the variant: the same as calling it with the same seed
    qkv = block.qkv(x).view(2, 24, 12, 8).transpose(1, 2)
    q, k, v = qkv.split([4, 4, 4], dim=1)
    out = seeded(1, attnkit.flash_attention, q, k, v, causal=True, dropout_p=0.5)
    torch.testing.assert_close(a, block.proj(out.transpose(1, 2).reshape(2, 24, 32)))
    assert "dropout_p=0.5" in repr(block)


def test_attention_module_refuses_dropout_it_cannot_apply():
    with pytest.raises(ValueError, match="dropout_p=0.1: variant 'linear' has no attention dropout"):
        attnkit.nn.Attention(32, num_heads=4, variant="linear", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        attnkit.nn.Attention(32, num_heads=4, dropout_p=1.0)
    block = attnkit.nn.Attention(32, num_heads=4, causal=True, dropout_p=0.1).to(DEVICE)
    cache = block.new_cache()
    with pytest.raises(ValueError, match=r"train\(\) mode with a decoding cache"):
        block(rand(1, 4, 32), cache=cache)
    block.eval()
    assert block(rand(1, 4, 32), cache=block.new_cache()).shape == (1, 4, 32)


# ---------------------------------------------------------------- custom ops


def test_custom_op_with_dropout_passes_torch_library_checks():
    from attnkit.engine import _encode, _fwd_op
    from attnkit.flash import flash_schedule

    q, k, v = (rand(1, 2, 20, 16, seed=s) for s in range(3))
    seed = torch.tensor([3, 4], dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(_fwd_op, (q, k, v, None, *_encode(flash_schedule(True), None, None), 0.25, None, None,
                                    None, 0, 0, 0.3, seed), test_utils=("test_schema", "test_faketensor"))


def test_compiled_dropout_equals_eager_with_the_same_seed():
    q, k, v = (rand(1, 2, 24, 16, seed=s).requires_grad_(True) for s in range(3))

    def fn(q, k, v):
        return attnkit.flash_attention(q, k, v, causal=True, dropout_p=0.2, backend="triton")

    eager = seeded(4, fn, q, k, v)
    grads = torch.autograd.grad(eager.sum(), (q, k, v))
    torch._dynamo.reset()
    compiled = seeded(4, torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), (q, k, v)), grads):
        torch.testing.assert_close(a, b)
