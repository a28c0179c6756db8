"""Score and mask mods: attnkit's ALiBi flash kernel and its document-masked flex kernel
against FlexAttention (compiled) on the same inputs.

Cases: ``alibi`` = causal attention with the bias ``-slope[h] * |i - j|`` (attnkit:
``flash_attention(..., alibi_slopes=...)``; flex: the equivalent score_mod and a causal
block mask); ``document`` = causal AND same-document over packed documents whose
boundaries fall inside 128-tiles (attnkit: ``flex_attention`` with its ``create_block_mask``;
flex: torch's ``create_block_mask`` over the same doc ids). Both masks are built once.
GPU: N in {4k, 16k} with 16k tokens per batch, H = 16, d = 128, bf16, forward and
forward+backward. TFLOP/s count only the visible pairs (causal pairs; for documents
sum L * (L + 1) / 2). The issue's target: attnkit's ms <= flex's ms (>= 1.0x) per row.
CPU: attnkit's reference against eager FlexAttention at small sizes (FlexAttention has
no backward on CPU, so its fwd+bwd rows are skipped there).
Run: ``python -m pytest benchmarks/test_flex.py --benchmark-only``.
"""

import pytest
import torch

import attnkit

from conftest import CUDA, DEVICE, attention_flops, causal_pairs, run, with_backward

BLOCK = 128
if CUDA:
    SEQLENS, HEAD_DIM, HEADS, DTYPE = [4096, 16384], 128, 16, torch.bfloat16
    PROVIDERS = ["attnkit", "flex"]
else:
    SEQLENS, HEAD_DIM, HEADS, DTYPE = [256, 512], 64, 4, torch.float32
    PROVIDERS = ["attnkit_reference", "flex"]
    # eager FlexAttention on CPU (compiling it takes tens of seconds there)
    pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def document_lengths(seqlen: int, seed: int = 0) -> list:
    """Deterministic packed-document lengths summing to ``seqlen``: max(3, N / 1024)
    documents cut at seeded random positions, none on a multiple of BLOCK (so the
    boundaries leave partial tiles)."""
    docs = max(3, seqlen // 1024)
    g = torch.Generator().manual_seed(seed)
    candidates = torch.arange(1, seqlen)
    candidates = candidates[candidates % BLOCK != 0]
    cuts = candidates[torch.randperm(len(candidates), generator=g)[:docs - 1]].sort().values
    return torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([seqlen])).tolist()


def document_ids(lengths: list) -> torch.Tensor:
    """(N,) document id of every position, on DEVICE."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE)


def make_call(provider, case, q, k, v, slopes, doc_ids):
    n = q.shape[2]
    if provider in ("attnkit", "attnkit_reference"):
        backend = "triton" if provider == "attnkit" else "reference"
        if case == "alibi":
            return lambda: attnkit.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, backend=backend)
        mods = attnkit.mods
        bm = attnkit.create_block_mask(mods.and_masks(mods.causal(), mods.document(doc_ids)), None, None, n, n,
                                       device=DEVICE)
        return lambda: attnkit.flex_attention(q, k, v, block_mask=bm, backend=backend)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False) if CUDA else flex_attention
        if case == "alibi":
            def alibi(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx).abs()

            mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, n, n, device=DEVICE)
            return lambda: flex(q, k, v, score_mod=alibi, block_mask=mask)

        def causal_document(b, h, i, j):
            return (j <= i) & (doc_ids[i] == doc_ids[j])

        mask = create_block_mask(causal_document, None, None, n, n, device=DEVICE)
        return lambda: flex(q, k, v, block_mask=mask)
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", ["alibi", "document"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_flex(benchmark, provider, seqlen, case, mode):
    if provider == "flex" and not CUDA and mode != "fwd":
        pytest.skip("FlexAttention has no backward on CPU")
    batch = max(1, 16384 // seqlen) if CUDA else 1
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, seqlen, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g,
                           requires_grad=mode != "fwd") for _ in range(3))
    slopes = attnkit.mods.alibi_slopes(HEADS).to(device=DEVICE, dtype=torch.float32)
    lengths = document_lengths(seqlen)
    doc_ids = document_ids(lengths)
    call = make_call(provider, case, q, k, v, slopes, doc_ids)
    pairs = causal_pairs(seqlen, seqlen) if case == "alibi" else sum(n * (n + 1) // 2 for n in lengths)
    flops = batch * HEADS * attention_flops(pairs, HEAD_DIM, HEAD_DIM, mode)
    info = dict(provider=provider, case=case, seqlen=seqlen, head_dim=HEAD_DIM, mode=mode)
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, flops, **info)
    else:
        run(benchmark, with_backward(call, torch.randn_like(q)), flops, **info)
