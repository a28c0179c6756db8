"""attnkit.nn.MultiheadAttention inside torch's Transformer modules (issue 14, item 6).

torch's TransformerEncoderLayer takes a fused fast path (``torch._transformer_encoder_layer_fwd``)
in eval mode under no_grad and never calls ``self_attn``; TransformerEncoder turns a padded batch
into a nested tensor first. attnkit's module must run in every case, give torch's outputs, and run
``key_padding_mask`` through the varlen kernels (unpad -> varlen -> pad), not torch's path.
"""

import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

import attnkit
from attnkit.nn import multihead

E, H = 32, 4


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


class Spy:
    """Counts the calls of attnkit's dispatch from the module and the packed (varlen) ones."""

    def __init__(self):
        self.calls, self.varlen = 0, 0
        self.real = multihead.attention

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.varlen += kwargs.get("cu_seqlens_q") is not None
        return self.real(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    spy = Spy()
    monkeypatch.setattr(multihead, "attention", spy)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("torch's fused encoder-layer fast path ran instead of attnkit")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", no_fast_path)
    return spy


def layers(seed=0, batch_first=True, **attnkit_options):
    """torch's encoder layer and the same layer (same weights) with attnkit's self_attn."""
    torch.manual_seed(seed)
    ours = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first).to(DEVICE)
    theirs = copy.deepcopy(ours)
    mha = attnkit.nn.MultiheadAttention(E, H, batch_first=batch_first, device=DEVICE, **attnkit_options)
    mha.load_state_dict(theirs.self_attn.state_dict())
    ours.self_attn = mha
    return ours, theirs


def padding(lengths, total, left=False):
    """(N, S) bool key_padding_mask, True = padding, on the right (or the left)."""
    pos = torch.arange(total)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    pad = pos < total - lengths if left else pos >= lengths
    return pad.to(DEVICE)


def valid_rows(out, pad):
    return out[~pad]


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_encoder_layer_eval_runs_attnkit(spy, grad_mode):
    ours, theirs = layers()
    ours.eval()
    theirs.eval()
    x = rand(2, 10, E, seed=1)
    with grad_mode():
        out = ours(x)
    assert spy.calls == 1
    expected = theirs(x)  # torch's own layer, slow path (grad enabled, its weights require grad)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


def test_encoder_layer_eval_no_grad_equals_torch_fast_path(monkeypatch):
    ours, theirs = layers()
    ours.eval()
    theirs.eval()
    x = rand(2, 10, E, seed=1)
    with torch.no_grad():
        expected = theirs(x)                       # torch's fused fast path (no spy installed yet)
    spy = Spy()
    monkeypatch.setattr(multihead, "attention", spy)
    with torch.no_grad():
        out = ours(x)
    assert spy.calls == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("left", [False, True])
def test_key_padding_mask_runs_varlen_on_attnkit(spy, left):
    ours, theirs = layers(seed=2)
    ours.eval()
    theirs.eval()
    x = rand(3, 12, E, seed=3)
    pad = padding([12, 7, 3], 12, left=left)
    with torch.no_grad():
        out = ours(x, src_key_padding_mask=pad)
    assert spy.calls == 1 and spy.varlen == 1
    with torch.enable_grad():  # torch's own layer, in its slow path (fast path is forbidden by the spy fixture)
        expected = theirs(x, src_key_padding_mask=pad)
    # torch's fused fast path also computes the padded query rows; both give them as torch's slow path does
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("left", [False, True])
def test_key_padding_mask_in_training_with_gradients(spy, left):
    ours, theirs = layers(seed=4)
    x = rand(3, 9, E, seed=5)
    pad = padding([9, 4, 1], 9, left=left)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(x1, src_key_padding_mask=pad), theirs(x2, src_key_padding_mask=pad)
    assert spy.varlen == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = rand(*out.shape, seed=6)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_encoder_nested_fast_path_runs_attnkit(monkeypatch):
    """TransformerEncoder packs a right-padded batch into a nested tensor in eval/no_grad."""
    ours, theirs = layers(seed=7)
    ours_enc = nn.TransformerEncoder(ours, 2, enable_nested_tensor=True)
    theirs_enc = nn.TransformerEncoder(theirs, 2, enable_nested_tensor=True)
    ours_enc.eval()
    theirs_enc.eval()
    x = rand(3, 11, E, seed=8)
    pad = padding([11, 6, 2], 11)
    with torch.no_grad():
        expected = theirs_enc(x, src_key_padding_mask=pad)     # torch: nested tensors and the fused layer
    spy = Spy()
    monkeypatch.setattr(multihead, "attention", spy)
    with torch.no_grad():
        out = ours_enc(x, src_key_padding_mask=pad)
    assert spy.calls == 2 and spy.varlen == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_transformer_uses_attnkit_everywhere(spy):
    torch.manual_seed(9)
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                           batch_first=True).to(DEVICE)
    reference = copy.deepcopy(model)
    for layer in list(model.encoder.layers) + list(model.decoder.layers):
        for name in ("self_attn", "multihead_attn"):
            if hasattr(layer, name):
                mha = attnkit.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
                mha.load_state_dict(getattr(layer, name).state_dict())
                setattr(layer, name, mha)
    model.eval()
    reference.eval()
    src, tgt = rand(2, 9, E, seed=10), rand(2, 5, E, seed=11)
    src_pad = padding([9, 4], 9)
    causal = nn.Transformer.generate_square_subsequent_mask(5, device=DEVICE)
    with torch.no_grad():
        out = model(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                    memory_key_padding_mask=src_pad)
    assert spy.calls == 3 and spy.varlen == 2
    with torch.enable_grad():
        expected = reference(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                             memory_key_padding_mask=src_pad)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


def test_module_key_padding_mask_bool_and_float_equal_torch(spy):
    torch.manual_seed(12)
    theirs = nn.MultiheadAttention(E, H, batch_first=True, bias=True, add_bias_kv=True).to(DEVICE)
    ours = attnkit.nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    q, kv = rand(2, 6, E, seed=13), rand(2, 10, E, seed=14)
    pad = padding([10, 3], 10, left=True)
    for mask in (pad, torch.zeros(2, 10, device=DEVICE).masked_fill(pad, float("-inf"))):
        out, weights = ours(q, kv, kv, key_padding_mask=mask, need_weights=False)
        expected, _ = theirs(q, kv, kv, key_padding_mask=mask, need_weights=False)
        assert weights is None
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert spy.varlen == 2


def test_key_padding_with_holes_and_sequence_first(spy):
    torch.manual_seed(15)
    theirs = nn.MultiheadAttention(E, H).to(DEVICE)                         # (L, N, E) layout
    ours = attnkit.nn.MultiheadAttention(E, H, device=DEVICE, softcap=None)
    ours.load_state_dict(theirs.state_dict())
    x = rand(8, 2, E, seed=16)
    pad = torch.zeros(2, 8, dtype=torch.bool, device=DEVICE)
    pad[0, [1, 4, 5]] = True                                                 # any key positions may be masked
    out, _ = ours(x, x, x, key_padding_mask=pad, need_weights=False)
    expected, _ = theirs(x, x, x, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert spy.varlen == 1


def test_additive_float_padding_mask_takes_torch_path(spy):
    torch.manual_seed(17)
    theirs = nn.MultiheadAttention(E, H, batch_first=True).to(DEVICE)
    ours = attnkit.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = rand(2, 5, E, seed=18)
    bias = rand(2, 5, seed=19)          # finite additive values: a bias, not padding, so torch's path computes it
    out, _ = ours(x, x, x, key_padding_mask=bias, need_weights=False)
    expected, _ = theirs(x, x, x, key_padding_mask=bias, need_weights=False)
    torch.testing.assert_close(out, expected)
    assert spy.calls == 0


def test_key_padding_mask_with_a_positional_variant_is_refused():
    mha = attnkit.nn.MultiheadAttention(E, H, batch_first=True, causal=True, device=DEVICE)
    x = rand(2, 5, E)
    with pytest.raises(ValueError, match="key_padding_mask.*causal=True"):
        mha(x, x, x, key_padding_mask=padding([5, 3], 5), need_weights=False)


def test_bad_key_padding_mask_shape_is_named():
    mha = attnkit.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    x = rand(2, 5, E)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 5\)"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool, device=DEVICE), need_weights=False)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating tensor"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64, device=DEVICE), need_weights=False)


@pytest.mark.parametrize("backend", ["triton"])
def test_key_padding_varlen_through_the_kernel(spy, backend):
    ours, theirs = layers(seed=20, backend=backend)
    ours.eval()
    theirs.eval()
    x = rand(2, 16, E, seed=21)
    pad = padding([16, 5], 16, left=True)
    with torch.no_grad():
        out = ours(x, src_key_padding_mask=pad)
    with torch.enable_grad():
        expected = theirs(x, src_key_padding_mask=pad)
    assert spy.varlen == 1
    torch.testing.assert_close(out, expected.detach(), rtol=2e-4, atol=2e-4)


def test_entry_with_every_key_padded_equals_torch_without_weights(spy):
    torch.manual_seed(22)
    theirs = nn.MultiheadAttention(E, H, batch_first=True).to(DEVICE)
    with torch.no_grad():
        theirs.out_proj.bias.uniform_(-1, 1)
        theirs.in_proj_bias.uniform_(-1, 1)
    ours = attnkit.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = rand(2, 6, E, seed=23)
    pad = padding([6, 0], 6)
    out, _ = ours(x, x, x, key_padding_mask=pad, need_weights=False)
    expected, _ = theirs(x, x, x, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)       # attention 0: the out_proj bias
    assert spy.varlen == 1
