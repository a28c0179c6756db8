"""The torch backend on CPU: every variant against torch's SDPA on the same tensors.

Always on CPU (also on a GPU machine): fp32, B = 1, H = 8, D = 64, attnkit with
``backend="auto"`` (which takes the ``"torch"`` backend on CPU tensors). Each test
times attnkit and its SDPA anchor as providers of one parametrized test, so the ratios
come from one run (docs/performance.md records them with the machine and command).
Targets (issue 16): flash causal at N = 4k forward <= 1.2x SDPA, forward+backward
<= 1.5x; with sink logits or softcap <= 2x SDPA without them; a tiny Llama forward
with ``attn_implementation="attnkit"`` within 1.3x of ``"sdpa"``. Run:
``python -m pytest benchmarks/test_cpu.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, with_backward

import attnkit

# A quick GPU round (python -m attnkit.bench --quick) spends its minutes on the GPU.
pytestmark = pytest.mark.skipif(QUICK and torch.cuda.is_available(),
                                reason="the --quick GPU round leaves the CPU benchmarks out (plain pytest runs them)")

BATCH, HEADS, HEAD_DIM = 1, 8, 64
DTYPE = torch.float32


def qkv(seqlen: int, heads: int = HEADS, kv_heads: int = HEADS, requires_grad: bool = False):
    """(1, heads, seqlen, 64) q and (1, kv_heads, seqlen, 64) k, v, fp32 on CPU, seeded."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, heads, seqlen, HEAD_DIM, generator=g, dtype=DTYPE)
    k = torch.randn(BATCH, kv_heads, seqlen, HEAD_DIM, generator=g, dtype=DTYPE)
    v = torch.randn(BATCH, kv_heads, seqlen, HEAD_DIM, generator=g, dtype=DTYPE)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run(benchmark, fn, **info) -> None:
    """Time ``fn`` on CPU (also on a GPU machine: conftest's ``run`` would time CUDA events)
    and record the median milliseconds in ``benchmark.extra_info``."""
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    benchmark.extra_info["ms"] = benchmark.stats.stats.median * 1e3


def timed(benchmark, forward, mode: str, grad_like: torch.Tensor | None, **info) -> None:
    """Time ``forward`` (no_grad) or forward+backward with a fixed output gradient."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        step = with_backward(forward, grad_like)
    run(benchmark, step, mode=mode, **info)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seqlen", [1024, 4096])
@pytest.mark.parametrize("provider", ["attnkit", "sdpa"])
def test_flash_causal(benchmark, provider, seqlen, mode):
    q, k, v = qkv(seqlen, requires_grad=mode != "fwd")
    if provider == "attnkit":
        def forward():
            return attnkit.flash_attention(q, k, v, causal=True)
    else:
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    timed(benchmark, forward, mode, torch.randn_like(q), provider=provider, seqlen=seqlen)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["attnkit-sink_logits", "attnkit-softcap", "sdpa-plain"])
def test_flash_sink_softcap(benchmark, provider, mode):
    """Sink logits and softcap against SDPA without them (target <= 2x), causal, N = 4k."""
    seqlen = 4096
    q, k, v = qkv(seqlen, requires_grad=mode != "fwd")
    sinks = torch.randn(HEADS, generator=torch.Generator().manual_seed(1)).requires_grad_(mode != "fwd")
    if provider == "attnkit-sink_logits":
        def forward():
            return attnkit.flash_attention(q, k, v, causal=True, sink_logits=sinks)
    elif provider == "attnkit-softcap":
        def forward():
            return attnkit.flash_attention(q, k, v, causal=True, softcap=30.0)
    else:
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    timed(benchmark, forward, mode, torch.randn_like(q), provider=provider, seqlen=seqlen)


@pytest.mark.parametrize("impl", ["attnkit", "sdpa"])
def test_llama_forward(benchmark, impl):
    """A tiny Llama (hidden 512, 8 heads of d = 64, 2 layers) forward on 1 x 1024 tokens,
    ``attn_implementation="attnkit"`` against ``"sdpa"`` (target: within 1.3x)."""
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (attnkit[hf])")
    import attnkit.integrations.transformers as hf

    hf.register()
    tokens, vocab = 1024, 1000
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HEADS * HEAD_DIM, intermediate_size=1376,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                      max_position_embeddings=2 * tokens, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=DTYPE).eval()
    ids = torch.randint(1, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.no_grad():
            return model(input_ids=ids).logits

    run(benchmark, step, impl=impl, tokens=tokens)


@pytest.mark.parametrize("provider", ["attnkit", "sdpa-causal"])
def test_sliding_window_long(benchmark, provider):
    """sliding_window at N = 32k, W = 512, 4 sinks, forward, against SDPA causal on the same
    tensors (target: >= 8x faster). The torch backend attends each 128-query chunk to one
    slab of 128 + 511 keys plus the sinks: memory O(N * W), never N x N."""
    seqlen = 32768
    q, k, v = qkv(seqlen)
    if provider == "attnkit":
        def forward():
            return attnkit.sliding_window_attention(q, k, v, window=512, sinks=4)
    else:
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    timed(benchmark, forward, "fwd", None, provider=provider, seqlen=seqlen)


@pytest.mark.parametrize("provider", ["attnkit", "sdpa-dense-mask"])
def test_neighborhood_2d(benchmark, provider):
    """2-D neighborhood attention on a 128 x 128 map, kernel 13, forward, against SDPA with the
    dense (N x N) neighborhood mask on the same tensors (target: >= 5x faster)."""
    from attnkit.neighborhood.geometry import neighbor_table, normalize

    side, kernel = 128, 13
    q, k, v = qkv(side * side)
    if provider == "attnkit":
        def forward():
            shape = (BATCH, HEADS, side, side, HEAD_DIM)
            return attnkit.neighborhood_attention(q.view(shape), k.view(shape), v.view(shape), kernel_size=kernel)
    else:
        idx, valid = neighbor_table(normalize((side, side), kernel, 1, False, 1))
        mask = torch.zeros(side * side, side * side, dtype=torch.bool)
        mask[torch.arange(side * side)[:, None].expand_as(idx)[valid], idx[valid]] = True

        def forward():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    timed(benchmark, forward, "fwd", None, provider=provider, side=side, kernel=kernel)


@pytest.mark.parametrize("provider", ["attnkit", "sdpa-dense"])
def test_block_sparse_90(benchmark, provider):
    """block_sparse at 90% sparsity, N = 8k, block 128 (a random per-head mask of density 10%
    with the diagonal, as benchmarks/test_block_sparse.py's), forward, against dense SDPA on the
    same tensors (target: >= 4x faster). The torch backend gathers only the listed key blocks."""
    seqlen, block = 8192, 128
    q, k, v = qkv(seqlen)
    blocks = seqlen // block
    dense = torch.rand(1, HEADS, blocks, blocks, generator=torch.Generator().manual_seed(0)) < 0.1
    dense |= torch.eye(blocks, dtype=torch.bool)
    mask = attnkit.BlockMask.from_dense(dense, block, (seqlen, seqlen))
    if provider == "attnkit":
        def forward():
            return attnkit.block_sparse_attention(q, k, v, mask)
    else:
        def forward():
            return F.scaled_dot_product_attention(q, k, v)
    timed(benchmark, forward, "fwd", None, provider=provider, seqlen=seqlen, density=round(mask.density(), 3))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["attnkit", "sdpa-causal"])
def test_moba(benchmark, provider, mode):
    """MoBA at N = 8k, block 512, top-k 3 against dense causal SDPA on the same tensors
    (target: >= 2x faster)."""
    seqlen = 8192
    q, k, v = qkv(seqlen, requires_grad=mode != "fwd")
    if provider == "attnkit":
        def forward():
            return attnkit.moba_attention(q, k, v, block_size=512, top_k=3)
    else:
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    timed(benchmark, forward, mode, torch.randn_like(q), provider=provider, seqlen=seqlen)


@pytest.mark.parametrize("seqlen", [1024, 4096, 16384, 65536])
def test_lightning_tokens_per_second(benchmark, seqlen):
    """Lightning attention, forward, at 64k tokens per call (B = 64k / N): tokens/s flat from
    N = 1k to 64k (target: within +-30%; compare ``tokens_per_s`` across N)."""
    tokens = 65536
    batch = tokens // seqlen
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, seqlen, HEAD_DIM, generator=g, dtype=DTYPE) for _ in range(3))
    slopes = attnkit.lightning_slopes(HEADS)

    def forward():
        return attnkit.lightning_attention(q, k, v, slopes)

    timed(benchmark, forward, "fwd", None, seqlen=seqlen, batch=batch)
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median
