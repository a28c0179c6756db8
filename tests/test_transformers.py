"""Hugging Face transformers integration: tiny models built from configs (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (attnkit[hf])")

import attnkit.integrations.transformers as hf  # noqa: E402

hf.register()


def tiny(kind: str, **overrides):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    common.update(overrides)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.MistralConfig(sliding_window=5, **common)


def logits(cfg, impl, input_ids, attention_mask=None):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("kind,impl", [("llama", "attnkit"), ("mistral", "attnkit"),
                                       ("mistral", "attnkit_sliding_window")])
def test_logits_equal_sdpa(kind, impl):
    cfg = tiny(kind)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(cfg, impl, ids), logits(cfg, "sdpa", ids), rtol=1e-4, atol=1e-4)


def test_the_sliding_window_is_really_applied():
    cfg = tiny("mistral")
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(1))
    full = tiny("llama")  # same weights shape, no window: must differ after position 5
    assert not torch.allclose(logits(cfg, "attnkit", ids)[:, 8:], logits(full, "attnkit", ids)[:, 8:], atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_padding_mask_equals_sdpa(kind):
    cfg = tiny(kind)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    got, want = logits(cfg, "attnkit", ids, mask), logits(cfg, "sdpa", ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generation_with_cache_equals_sdpa(kind):
    cfg = tiny(kind)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    out = {}
    for impl in ("attnkit", "sdpa"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
        out[impl] = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out["attnkit"], out["sdpa"])


def test_set_attn_implementation_switches_an_existing_model():
    cfg = tiny("llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.set_attn_implementation("attnkit")
        assert model.config._attn_implementation == "attnkit"
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_sliding_window_name_needs_a_window():
    cfg = tiny("llama")
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match="needs a sliding window"):
        logits(cfg, "attnkit_sliding_window", ids)
