"""Padded Hugging Face batches run on attnkit's varlen ops (issue 14, item 2).

Tiny randomly initialised models built from configs (no downloads): with left and right
padding, in eval and train mode, logits on the real tokens, greedy generation with the
cache and gradients equal ``attn_implementation="eager"``; every attention layer runs
attnkit's packed (cu_seqlens) op and torch's SDPA is never called.
"""

import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (attnkit[hf])")

import attnkit.integrations.transformers as hf

hf.register()

VOCAB, N, PAD = 97, 12, 4
DECODERS = ["llama", "mistral", "qwen2", "gemma2", "gpt_oss"]
ENCODERS = ["bert", "modernbert"]
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma2": "Gemma2Config",
           "gpt_oss": "GptOssConfig", "bert": "BertConfig", "modernbert": "ModernBertConfig"}


def tiny(kind: str, **overrides):
    """A two- or three-layer config of ``kind``; windows of 4-5 tokens, so they matter at N = 12."""
    name = CONFIGS[kind]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    size = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    decoder = {**size, "num_hidden_layers": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
               "pad_token_id": 0}
    args = {
        "llama": decoder,
        "mistral": {**decoder, "sliding_window": 5},
        "qwen2": {**decoder, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        "gemma2": {**decoder, "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                   "attn_logit_softcapping": 2.0, "final_logit_softcapping": None},
        "gpt_oss": {**decoder, "head_dim": 16, "sliding_window": 4, "num_local_experts": 4,
                    "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"]},
        "bert": {**size, "num_hidden_layers": 2, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0, "pad_token_id": 0},
        "modernbert": {**size, "num_hidden_layers": 3, "max_position_embeddings": 64, "local_attention": 4,
                       "global_attn_every_n_layers": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                       "cls_token_id": 1, "sep_token_id": 2, "mask_token_id": 3},
    }[kind]
    args = {**args, **overrides}
    return getattr(transformers, name)(**args)


def build(cfg, impl: str):
    torch.manual_seed(0)
    if isinstance(cfg, (transformers.BertConfig, getattr(transformers, "ModernBertConfig", ()))):
        model = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation=impl)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):  # gpt-oss: sink logits that matter
            with torch.no_grad():
                module.sinks.copy_(torch.randn(module.sinks.shape, generator=generator))
    return model


def batch(padding: str, seed: int = 2):
    """Two rows of N tokens: row 0 full, row 1 with PAD padding tokens on the left or right
    (or none)."""
    ids = torch.randint(4, VOCAB, (2, N), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, N, dtype=torch.long)
    if padding == "left":
        mask[1, :PAD] = 0
    elif padding == "right":
        mask[1, N - PAD:] = 0
    ids[mask == 0] = 0
    return ids, mask


class Spy:
    """Counts attnkit's packed (cu_seqlens) calls from the integration and the options they
    carried; torch's SDPA raises while it is installed."""

    def __init__(self, monkeypatch, backend: str = "auto"):
        self.packed, self.dense, self.options = 0, 0, []
        run = hf.attention

        def attention(q, k, v, variant="flash", **options):
            if options.get("cu_seqlens_q") is not None:
                self.packed += 1
            else:
                self.dense += 1
            self.options.append(dict(options, variant=variant))
            return run(q, k, v, variant, backend, **options)

        def no_sdpa(*args, **kwargs):
            raise AssertionError("torch's scaled_dot_product_attention ran instead of attnkit")

        monkeypatch.setattr(hf, "attention", attention)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)


def attention_layers(cfg) -> int:
    return cfg.num_hidden_layers


def run_model(model, ids, mask, grad: bool):
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        return model(input_ids=ids, attention_mask=mask).logits


def real(x, mask):
    return x[mask.bool()]


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("kind", DECODERS + ENCODERS)
def test_padded_logits_equal_eager_and_run_on_attnkit(kind, padding, monkeypatch):
    cfg = tiny(kind)
    ids, mask = batch(padding)
    want = run_model(build(cfg, "eager").eval(), ids, mask, grad=False)
    model = build(cfg, "attnkit").eval()
    spy = Spy(monkeypatch)
    got = run_model(model, ids, mask, grad=False)
    torch.testing.assert_close(real(got, mask), real(want, mask), rtol=1e-4, atol=1e-4)
    if padding == "none":  # no mask: the kernel applies the layer's pattern (ModernBERT's local window too)
        assert spy.dense == attention_layers(cfg) and spy.packed == 0
    else:
        assert spy.packed == attention_layers(cfg) and spy.dense == 0


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", DECODERS + ENCODERS)
def test_padded_gradients_in_train_mode_equal_eager(kind, padding, monkeypatch):
    cfg = tiny(kind)
    ids, mask = batch(padding, seed=3)
    weights = torch.randn(2, N, VOCAB, generator=torch.Generator().manual_seed(4))
    grads, logits = {}, {}
    for impl in ("eager", "attnkit"):
        model = build(cfg, impl).train()
        if impl == "attnkit":
            spy = Spy(monkeypatch)
        out = run_model(model, ids, mask, grad=True)
        (real(out * weights, mask)).sum().backward()  # a loss of the real tokens only
        logits[impl] = real(out.detach(), mask)
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(logits["attnkit"], logits["eager"], rtol=1e-4, atol=1e-4)
    assert grads["attnkit"].keys() == grads["eager"].keys()
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["attnkit"][name], grad, rtol=1e-3, atol=1e-4, msg=name)
    assert spy.packed == attention_layers(cfg) and spy.dense == 0


def generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)


STEPS = 7  # the prefill and six one-query decoding steps


@pytest.mark.parametrize("kind", DECODERS)
def test_left_padded_greedy_generation_with_cache_equals_eager(kind, monkeypatch):
    cfg = tiny(kind)
    ids, mask = batch("left", seed=6)
    ids, mask = ids[:, :8], mask[:, :8]
    want = generate(build(cfg, "eager").eval(), ids, mask)
    model = build(cfg, "attnkit").eval()
    spy = Spy(monkeypatch)
    assert torch.equal(generate(model, ids, mask), want)
    # every layer of the prefill and of each decoding step (Nq = 1 < Nk, bottom-right per
    # sequence) ran on attnkit: packed while padding is among the keys (a sliding cache
    # may have dropped it: then the keys are all real and the call is dense)
    assert spy.packed + spy.dense == attention_layers(cfg) * STEPS
    assert spy.packed >= attention_layers(cfg)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma2", "gpt_oss"])
def test_sliding_window_name_windows_every_layer_with_padding(kind, monkeypatch):
    """"attnkit_sliding_window" on a model with full layers equals eager on the same weights
    with every layer sliding (config.sliding_window), in generation with left padding."""
    cfg = tiny(kind)
    windowed = tiny(kind, layer_types=["sliding_attention"] * cfg.num_hidden_layers,
                    **({"max_window_layers": 0} if kind == "qwen2" else {}))
    ids, mask = batch("left", seed=7)
    ids, mask = ids[:, :8], mask[:, :8]
    want = generate(build(windowed, "eager").eval(), ids, mask)
    model = build(cfg, "attnkit_sliding_window").eval()
    spy = Spy(monkeypatch)
    assert torch.equal(generate(model, ids, mask), want)
    assert spy.packed + spy.dense == attention_layers(cfg) * STEPS
    assert spy.packed >= attention_layers(cfg)
    assert all(o["variant"] == "sliding_window" for o in spy.options)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_sequences_packed_in_position_ids_run_packed(kind, use_cache, monkeypatch):
    """Three sequences in one row (B = 1, no mask; positions restart at each): each attends
    only to itself, as run alone. Without a cache transformers builds the packed 4-D mask;
    with one it builds none and the layer reads position_ids (transformers' flash route)."""
    cfg = tiny(kind)
    lengths = (5, 3, 6)
    ids = torch.randint(4, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(8))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    eager = build(cfg, "eager").eval()
    with torch.no_grad():
        want = torch.cat([eager(input_ids=part).logits for part in ids.split(lengths, dim=1)], dim=1)
    model = build(cfg, "attnkit").eval()
    spy = Spy(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=position_ids, use_cache=use_cache).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert spy.packed == attention_layers(cfg) and spy.dense == 0
    assert all(o["cu_seqlens_q"].tolist() == [0, 5, 8, 14] for o in spy.options)


def test_padding_holes_without_a_window_equal_eager(monkeypatch):
    """Real tokens need not be one run when the layer has no window (causal order is kept)."""
    cfg = tiny("llama")
    ids, mask = batch("left")
    mask[0, 3:5] = 0
    want = run_model(build(cfg, "eager").eval(), ids, mask, grad=False)
    spy = Spy(monkeypatch)
    got = run_model(build(cfg, "attnkit").eval(), ids, mask, grad=False)
    torch.testing.assert_close(real(got, mask), real(want, mask), rtol=1e-4, atol=1e-4)
    assert spy.packed == attention_layers(cfg)


def test_padding_holes_with_a_sliding_window_are_refused():
    cfg = tiny("mistral")
    ids, mask = batch("left")
    mask[0, 3:5] = 0
    with pytest.raises(ValueError, match="padding between real tokens.*sliding window"):
        run_model(build(cfg, "attnkit").eval(), ids, mask, grad=False)


def test_a_4d_padding_mask_from_the_caller_runs_packed(monkeypatch):
    cfg = tiny("llama")
    ids, mask = batch("left")
    model = build(cfg, "attnkit").eval()
    want = run_model(model, ids, mask, grad=False)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    mask4 = causal[None, None] & mask.bool()[:, None, None, :]  # (B, 1, N, N), True: attend
    spy = Spy(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask4).logits
    torch.testing.assert_close(real(got, mask), real(want, mask), rtol=1e-5, atol=1e-5)
    assert spy.packed == attention_layers(cfg) and spy.dense == 0


class Layer(torch.nn.Module):
    """What transformers hands an attention function: the layer (is_causal, training)."""

    def __init__(self, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal


def qkv(batch_size=2, heads=4, seqlen=6, dim=8, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, heads, seqlen, dim, generator=g) for _ in range(3)]


def test_a_mask_attnkit_cannot_run_warns_once_and_runs_torch(monkeypatch):
    monkeypatch.setattr(hf, "_warned", set())
    q, k, v = qkv()
    bias = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(10))  # a learned-bias float mask
    layer = Layer(is_causal=False).eval()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
    with pytest.warns(UserWarning, match="attnkit cannot run this attention mask: the float attention mask adds"):
        out, _ = hf.attnkit_attention_forward(layer, q, k, v, bias)
    torch.testing.assert_close(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second layer does not warn again
        out, _ = hf.attnkit_attention_forward(layer, q, k, v, bias)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="softcap/sink logits rule out torch's SDPA"):
        hf.attnkit_attention_forward(layer, q, k, v, bias, softcap=5.0)


def test_cross_attention_keeps_every_query(monkeypatch):
    """A bidirectional layer with as many queries as (encoder) keys: a padded key position
    does not make the query at that index padding."""
    q, k, v = qkv()
    keys = torch.ones(2, 6, dtype=torch.bool)
    keys[1, :2] = False
    spy = Spy(monkeypatch)
    out, _ = hf.attnkit_attention_forward(Layer(is_causal=False).eval(), q, k, v, keys)
    monkeypatch.undo()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
    torch.testing.assert_close(out, want.transpose(1, 2))
    assert spy.packed == 1


def test_a_padding_free_batch_runs_packed(monkeypatch):
    """cu_seq_lens_q/k from a data collator (transformers' padding-free training), B = 1."""
    q, k, v = qkv(batch_size=1, seqlen=9)
    cu = torch.tensor([0, 4, 9])
    spy = Spy(monkeypatch)
    out, _ = hf.attnkit_attention_forward(Layer(is_causal=True).eval(), q, k, v, None, cu_seq_lens_q=cu,
                                          cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    monkeypatch.undo()
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)
                      for a, b, c in zip(q.split((4, 5), 2), k.split((4, 5), 2), v.split((4, 5), 2))], 2)
    torch.testing.assert_close(out, want.transpose(1, 2))
    assert spy.packed == 1


def test_bad_masks_and_windows_are_named():
    q, k, v = qkv()
    layer = Layer(is_causal=True).eval()
    with pytest.raises(TypeError, match="attention_mask as None, a \\(B, Nk\\) padding mask"):
        hf.attnkit_attention_forward(layer, q, k, v, [[1] * 6] * 2)
    with pytest.raises(ValueError, match="attention_mask has 3 rows for a batch of 2"):
        hf.attnkit_attention_forward(layer, q, k, v, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must be \\(B, Nk\\) or 4-D"):
        hf.attnkit_attention_forward(layer, q, k, v, torch.ones(2, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="sliding_window must be a positive number of keys, got 0"):
        hf.attnkit_attention_forward(layer, q, k, v, None, sliding_window=0)


def test_bert_trains_with_its_default_attention_dropout(monkeypatch):
    """BERT's attention dropout (0.1 by default) runs in attnkit's kernels in train(), not
    in eval(), where the logits equal eager's."""
    cfg = tiny("bert", attention_probs_dropout_prob=0.1)
    ids, mask = batch("right")
    want = run_model(build(cfg, "eager").eval(), ids, mask, grad=False)
    model = build(cfg, "attnkit")
    spy = Spy(monkeypatch)
    torch.manual_seed(11)
    first = run_model(model.train(), ids, mask, grad=True)
    first.sum().backward()
    torch.manual_seed(12)
    second = run_model(model, ids, mask, grad=False)
    assert not torch.allclose(real(first.detach(), mask), real(second, mask))
    assert [o.get("dropout_p") for o in spy.options] == [0.1] * (2 * attention_layers(cfg))
    spy.options.clear()
    got = run_model(model.eval(), ids, mask, grad=False)
    torch.testing.assert_close(real(got, mask), real(want, mask), rtol=1e-4, atol=1e-4)
    assert all("dropout_p" not in o for o in spy.options) and spy.packed == 3 * attention_layers(cfg)


def test_padded_gpt_oss_through_the_triton_kernel(monkeypatch):
    """One model through the kernel (Triton's interpreter on CPU): sink logits, a sliding
    and a full layer, left padding, train mode; logits and gradients equal eager's."""
    cfg = tiny("gpt_oss")
    ids, mask = batch("left", seed=13)
    ids, mask = ids[:, :8], mask[:, :8]
    grads, logits = {}, {}
    for impl in ("eager", "attnkit"):
        model = build(cfg, impl).train()
        if impl == "attnkit":
            spy = Spy(monkeypatch, backend="triton")
        out = run_model(model, ids, mask, grad=True)
        real(out, mask).sum().backward()
        logits[impl] = real(out.detach(), mask)
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(logits["attnkit"], logits["eager"], rtol=1e-4, atol=1e-4)
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["attnkit"][name], grad, rtol=1e-3, atol=1e-4, msg=name)
    assert spy.packed == attention_layers(cfg)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_left_padded_generation_with_a_static_cache_equals_eager(kind, monkeypatch):
    """A static cache hands the layers keys of its full length; the slots past the mask are
    unused (transformers' flash route slices them off)."""
    cfg = tiny(kind)
    ids, mask = batch("left", seed=14)
    ids, mask = ids[:, :8], mask[:, :8]
    out = {}
    for impl in ("eager", "attnkit"):
        model = build(cfg, impl).eval()
        if impl == "attnkit":
            spy = Spy(monkeypatch)
        with torch.no_grad():
            out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
                                       cache_implementation="static")
    assert torch.equal(out["attnkit"], out["eager"])
    assert spy.packed + spy.dense == attention_layers(cfg) * STEPS and spy.packed >= attention_layers(cfg)
