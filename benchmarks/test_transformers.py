"""Hugging Face padded batches: tokens/s of a padded batched forward with
``attn_implementation="attnkit"`` (unpadded to cu_seqlens, attnkit's varlen kernels)
against ``"sdpa"`` (torch's SDPA with the padding mask) on the same model and batch.

GPU: a Llama-shaped model (hidden 2048, 16 heads of d = 128, GQA 4 kv heads, 4 layers),
bf16, 16 right-padded sequences of mixed lengths summing to 16k tokens (longest padded
to), full causal and with a sliding window of 1024 (a Mistral config); forward and
forward+backward. tokens/s counts the real tokens only. CPU: the same at a tiny size
(timings only show that the suite runs). Run:
``python -m pytest benchmarks/test_transformers.py --benchmark-only``.
"""

import pytest
import torch
from conftest import CUDA, DEVICE, mixed_lengths, run

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (attnkit[hf])")

import attnkit.integrations.transformers as hf

hf.register()

if CUDA:
    HIDDEN, HEADS, KV_HEADS, LAYERS, TOKENS, SEQS, WINDOW, DTYPE = 2048, 16, 4, 4, 16384, 16, 1024, torch.bfloat16
else:
    HIDDEN, HEADS, KV_HEADS, LAYERS, TOKENS, SEQS, WINDOW, DTYPE = 64, 4, 2, 2, 256, 4, 16, torch.float32
VOCAB = 32000 if CUDA else 97


def config(window):
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "max_position_embeddings": 2 * TOKENS, "pad_token_id": 0}
    if window is None:
        return transformers.LlamaConfig(**common)
    return transformers.MistralConfig(sliding_window=window, **common)


def padded_batch():
    """(SEQS, longest) token ids and the right-padding mask: SEQS mixed lengths, TOKENS real tokens."""
    lengths = mixed_lengths(TOKENS, SEQS)
    longest = max(lengths)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (SEQS, longest), generator=torch.Generator().manual_seed(0)) * mask
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("window", [None, WINDOW], ids=["causal", "window"])
@pytest.mark.parametrize("impl", ["attnkit", "sdpa"])
def test_padded_batch_forward(benchmark, impl, window, mode):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(window), attn_implementation=impl, dtype=DTYPE)
    model = model.to(DEVICE)
    ids, mask = padded_batch()

    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits
    else:
        model.train()

        def step():
            model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()

    run(benchmark, step, impl=impl, window=window, mode=mode, real_tokens=TOKENS, padded_tokens=ids.numel())
    benchmark.extra_info["tokens_per_s"] = TOKENS / benchmark.extra_info["ms"] * 1e3
