"""decode_attention, the paged and evicting caches, and generation through every cache.

The contract test runs the decode variant's examples (kernel vs float64 reference: out, LSE,
key scores); this file checks the kernel and the reference against flash and sliding-window
attention on the gathered keys, the split count, page selection against the rule computed
here from its definition, key scores, the caches' bookkeeping, and bad input."""

import importlib.util
import pathlib
import sys

import pytest
import torch

import attnkit

from conftest import DEVICE

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ["reference", "triton", "torch"]


def make_cache(B, Hkv, lengths, D, Dv, layout, seed=0, dtype=torch.float32):
    """Keys/values of B sequences as a contiguous (B, Hkv, Nmax, D) cache, or paged with a shuffled
    block table; returns (k_cache, v_cache, block_table or None, seqlens, per-sequence keys/values)."""
    g = torch.Generator().manual_seed(seed)
    Nmax = max(lengths)
    k_seq = [torch.randn(Hkv, L, D, generator=g, dtype=dtype) for L in lengths]
    v_seq = [torch.randn(Hkv, L, Dv, generator=g, dtype=dtype) for L in lengths]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    if layout == "contiguous":
        k = torch.zeros(B, Hkv, Nmax, D, dtype=dtype)
        v = torch.zeros(B, Hkv, Nmax, Dv, dtype=dtype)
        for b in range(B):
            k[b, :, :lengths[b]], v[b, :, :lengths[b]] = k_seq[b], v_seq[b]
        return k.to(DEVICE), v.to(DEVICE), None, seqlens, k_seq, v_seq
    page = int(layout.replace("paged", ""))
    per_seq = -(-Nmax // page)
    pages = torch.randperm(B * per_seq, generator=g)
    table = pages.view(B, per_seq).to(torch.int32)
    k = torch.randn(B * per_seq, Hkv, page, D, generator=g, dtype=dtype)   # garbage where nothing is written
    v = torch.randn(B * per_seq, Hkv, page, Dv, generator=g, dtype=dtype)
    for b in range(B):
        for pos in range(lengths[b]):
            p = table[b, pos // page]
            k[p, :, pos % page], v[p, :, pos % page] = k_seq[b][:, pos], v_seq[b][:, pos]
    return k.to(DEVICE), v.to(DEVICE), table.to(DEVICE), seqlens, k_seq, v_seq


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged64"])
@pytest.mark.parametrize("Nq", [1, 4])
@pytest.mark.parametrize("Hq,Hkv", [(8, 1), (2, 2)], ids=["gqa8", "mha"])
def test_matches_flash_on_the_gathered_keys(backend, layout, Nq, Hq, Hkv):
    lengths = [max(Nq, 1), 17, 300]
    k, v, table, seqlens, k_seq, v_seq = make_cache(3, Hkv, lengths, 32, 24, layout)
    q = torch.randn(3, Hq, Nq, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    out, lse = attnkit.decode_attention(q, k, v, seqlens, block_table=table, return_lse=True, backend=backend)
    for b, L in enumerate(lengths):
        ref, ref_lse = attnkit.flash_attention(q[b:b + 1], k_seq[b][None].to(DEVICE), v_seq[b][None].to(DEVICE),
                                               causal=True, return_lse=True, backend="reference")
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[b:b + 1], ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(window=16, sinks=4),
    dict(window=(5, 0)),
    dict(window="per_head", sinks=2, softcap=3.0),
    dict(sink_logits=True, alibi=True),
], ids=["window_sinks", "left5", "per_head_softcap", "sink_logits_alibi"])
def test_windows_sinks_and_score_options(backend, options):
    Hq, Hkv, Nq, lengths = 4, 2, 3, [40, 90]
    k, v, table, seqlens, k_seq, v_seq = make_cache(2, Hkv, lengths, 32, 32, "paged16", seed=3)
    q = torch.randn(2, Hq, Nq, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    options = dict(options)
    if options.get("window") == "per_head":
        options["window"] = torch.tensor([[-1, 0], [7, 0], [0, 0], [20, 0]], device=DEVICE)
    if options.pop("sink_logits", False):
        options["sink_logits"] = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.tensor([0.1, 0.2, 0.05, 0.3], device=DEVICE)
    out = attnkit.decode_attention(q, k, v, seqlens, block_table=table, backend=backend, **options)
    for b in range(2):
        kb, vb = k_seq[b][None].to(DEVICE), v_seq[b][None].to(DEVICE)
        if "window" in options:
            ref = attnkit.sliding_window_attention(q[b:b + 1], kb, vb, backend="reference", **options)
        else:
            ref = attnkit.flash_attention(q[b:b + 1], kb, vb, causal=True, backend="reference", **options)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_the_number_of_splits_does_not_change_the_result():
    k, v, table, seqlens, _, _ = make_cache(2, 2, [300, 77], 32, 32, "paged16", seed=4)
    q = torch.randn(2, 4, 2, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    results = [attnkit.decode_attention(q, k, v, seqlens, block_table=table, num_splits=s, window=40, sinks=3,
                                        return_lse=True, return_key_scores=True, backend="triton") for s in (1, 2, 7)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def kept_pages_by_definition(q, keys, L, page, top_k):
    """The §8 rule, literally: per page the element-wise key bounds; a page's score is the largest,
    over queries and query heads, of sum_d max(q_d kmax_d, q_d kmin_d); first and newest page kept."""
    n_pages = -(-L // page)
    scores = []
    for p in range(n_pages):
        kp = keys[:, p * page:min(L, (p + 1) * page)]                    # (Hkv, rows, D)
        kmin, kmax = kp.amin(dim=1), kp.amax(dim=1)                        # (Hkv, D)
        # q (Hq, Nq, D) -> per kv head the queries of its group
        g = q.shape[0] // keys.shape[0]
        qq = q.view(keys.shape[0], g * q.shape[1], q.shape[2])
        bound = torch.maximum(qq * kmax[:, None], qq * kmin[:, None]).sum(-1)   # (Hkv, rows)
        scores.append(bound.amax(dim=1))
    scores = torch.stack(scores, dim=1)                                     # (Hkv, pages)
    kept = []
    for hk in range(keys.shape[0]):
        forced = {0, n_pages - 1}
        rest = sorted((p for p in range(n_pages) if p not in forced), key=lambda p: (-float(scores[hk, p]), p))
        kept.append(sorted(forced | set(rest[:max(0, top_k - len(forced))])))
    return kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_top_k(backend):
    page, lengths, Hq, Hkv = 16, [150, 70], 4, 2
    k, v, table, seqlens, k_seq, v_seq = make_cache(2, Hkv, lengths, 32, 32, f"paged{page}", seed=8)
    q = torch.randn(2, Hq, 1, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    full = attnkit.decode_attention(q, k, v, seqlens, block_table=table, backend=backend)
    everything = attnkit.decode_attention(q, k, v, seqlens, block_table=table, page_top_k=100, backend=backend)
    torch.testing.assert_close(everything, full, rtol=1e-5, atol=1e-6)
    top_k = 3
    out, scores = attnkit.decode_attention(q, k, v, seqlens, block_table=table, page_top_k=top_k,
                                           return_key_scores=True, backend=backend)
    for b, L in enumerate(lengths):
        kept = kept_pages_by_definition(q[b].cpu(), k_seq[b], L, page, top_k)
        for hk in range(Hkv):
            pos = torch.tensor([p for pg in kept[hk] for p in range(pg * page, min(L, (pg + 1) * page))])
            heads = slice(hk * (Hq // Hkv), (hk + 1) * (Hq // Hkv))
            ref = attnkit.flash_attention(q[b:b + 1, heads], k_seq[b][None, hk:hk + 1, pos].to(DEVICE),
                                          v_seq[b][None, hk:hk + 1, pos].to(DEVICE), backend="reference")
            torch.testing.assert_close(out[b:b + 1, heads], ref, rtol=1e-5, atol=1e-5)
            seen = (scores[b, heads] > 0).any(dim=0).nonzero().flatten().cpu()
            assert torch.equal(seen, pos), "key scores are non-zero exactly on the kept pages"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sinks", [False, True])
def test_key_scores_sum_to_one_minus_the_sink_share(backend, sinks):
    k, v, table, seqlens, _, _ = make_cache(2, 2, [33, 61], 16, 16, "contiguous", seed=10)
    q = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    sink = torch.tensor([0.0, 1.0, -1.0, 3.0], device=DEVICE) if sinks else None
    out, lse, scores = attnkit.decode_attention(q, k, v, seqlens, sink_logits=sink, return_lse=True,
                                                return_key_scores=True, backend=backend)
    expected = torch.full_like(lse, 1.0) if sink is None else 1 - torch.exp(sink.view(1, -1, 1) - lse)
    torch.testing.assert_close(scores.sum(-1), expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.all(scores[0, :, 33:] == 0), "nothing past the sequence's length"


# ---------------------------------------------------------------------------------------------
# PagedKVCache
# ---------------------------------------------------------------------------------------------
def test_paged_cache_append_free_reuse_with_interleaved_sequences():
    torch.manual_seed(0)
    cache = attnkit.PagedKVCache(12, 16, num_kv_heads=2, head_dim=16, head_dim_v=8, dtype=torch.float32,
                                 device=DEVICE)
    shadow = {}
    a, b = cache.add_sequence(), cache.add_sequence()
    for sid, n in ((a, 13), (b, 3)):
        k, v = torch.randn(1, 2, n, 16, device=DEVICE), torch.randn(1, 2, n, 8, device=DEVICE)
        cache.append([sid], k, v)
        shadow[sid] = (k[0], v[0])
    for step in range(6):                                   # interleaved single-token steps
        k, v = torch.randn(2, 2, 1, 16, device=DEVICE), torch.randn(2, 2, 1, 8, device=DEVICE)
        cache.append([b, a], k, v)
        for row, sid in enumerate((b, a)):
            shadow[sid] = (torch.cat([shadow[sid][0], k[row]], 1), torch.cat([shadow[sid][1], v[row]], 1))
    freed = set(cache._pages[a])
    cache.free(a)
    c = cache.add_sequence()
    k, v = torch.randn(1, 2, 20, 16, device=DEVICE), torch.randn(1, 2, 20, 8, device=DEVICE)
    cache.append([c], k, v)
    shadow[c] = (k[0], v[0])
    assert freed & set(cache._pages[c]), "a freed page is reused"
    assert cache.seqlens([b, c]).tolist() == [9, 20]
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    for backend in BACKENDS:
        out = cache.attend([c, b], q, backend=backend)
        for row, sid in enumerate((c, b)):
            ref = attnkit.flash_attention(q[row:row + 1], shadow[sid][0][None], shadow[sid][1][None], causal=True,
                                          backend="reference")
            torch.testing.assert_close(out[row:row + 1], ref, rtol=1e-5, atol=1e-5)
    # the bounds the cache maintains are those of the stored keys
    from attnkit.decode.selection import page_bounds

    kmin, kmax = page_bounds(cache.keys, cache.block_table([b, c]), cache.seqlens([b, c]))
    used = torch.tensor(cache._pages[b] + cache._pages[c])
    torch.testing.assert_close(cache.kmin[used], kmin[used])
    torch.testing.assert_close(cache.kmax[used], kmax[used])


def test_a_full_pool_raises_and_changes_nothing():
    cache = attnkit.PagedKVCache(4, 8, num_kv_heads=1, head_dim=16, dtype=torch.float32, device=DEVICE)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append([a, b], torch.randn(2, 1, 12, 16, device=DEVICE), torch.randn(2, 1, 12, 16, device=DEVICE))
    before = (cache.seqlens([a, b]).tolist(), cache.block_table([a, b]).tolist(), cache.num_free_pages,
              cache.keys.clone(), cache.kmin.clone())
    with pytest.raises(RuntimeError, match="the page pool is full"):
        cache.append([a, b], torch.randn(2, 1, 8, 16, device=DEVICE), torch.randn(2, 1, 8, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"k must have shape"):
        cache.append([a], torch.randn(1, 2, 1, 16, device=DEVICE), torch.randn(1, 2, 1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="not a live sequence"):
        cache.append([7], torch.randn(1, 1, 1, 16, device=DEVICE), torch.randn(1, 1, 1, 16, device=DEVICE))
    after = (cache.seqlens([a, b]).tolist(), cache.block_table([a, b]).tolist(), cache.num_free_pages)
    assert after == before[:3]
    assert torch.equal(cache.keys, before[3]) and torch.equal(cache.kmin, before[4])


# ---------------------------------------------------------------------------------------------
# Streaming heads and heavy hitters
# ---------------------------------------------------------------------------------------------
def steps(cache, q, k, v, chunks, **options):
    outs, start = [], 0
    for n in chunks:
        s = slice(start, start + n)
        outs.append(cache.attend(q[:, :, s], k[:, :, s], v[:, :, s], **options))
        start += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_heads_equal_sliding_window_with_per_head_windows(backend):
    g = torch.Generator().manual_seed(12)
    B, Hkv, Hq, N = 2, 3, 6, 40
    q = torch.randn(B, Hq, N, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(B, Hkv, N, 16, generator=g).to(DEVICE) for _ in range(2))
    cache = attnkit.StreamingHeadsCache(torch.tensor([True, False, False]), window=6, sinks=2)
    out = steps(cache, q, k, v, [9] + [1] * 31, backend=backend)
    ref = attnkit.sliding_window_attention(q, k, v, window=cache.per_head_windows(Hq).to(DEVICE), sinks=2,
                                           backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    full = attnkit.StreamingHeadsCache(torch.ones(Hkv, dtype=torch.bool), window=6)
    steps(full, q, k, v, [N], backend="reference")
    assert cache.memory_bytes() < full.memory_bytes()
    assert cache.streaming.keys.shape[2] == 2 + 6, "a streaming head keeps sinks + window slots"


def test_heavy_hitter_cache_follows_h2o():
    g = torch.Generator().manual_seed(13)
    B, Hkv, Hq, N, budget, recent = 1, 2, 4, 30, 10, 3
    q = torch.randn(B, Hq, N, 16, generator=g)
    k, v = torch.randn(B, Hkv, N, 16, generator=g), torch.randn(B, Hkv, N, 16, generator=g)
    cache = attnkit.HeavyHitterCache(budget, recent)
    chunks = [6] + [1] * 24
    out = steps(cache, q, k, v, chunks, backend="reference")
    # the policy, simulated per kv head from its definition
    start = 0
    kept = [list() for _ in range(Hkv)]
    acc = [dict() for _ in range(Hkv)]
    expected = []
    for n in chunks:
        rows = []
        for hk in range(Hkv):
            pos = kept[hk] + list(range(start, start + n))
            heads = slice(hk * 2, hk * 2 + 2)
            kk, vv = k[:, hk:hk + 1, pos], v[:, hk:hk + 1, pos]
            o, lse = attnkit.flash_attention(q[:, heads, start:start + n], kk, vv, causal=True, return_lse=True,
                                             backend="reference")
            s = (q[:, heads, start:start + n] @ kk.transpose(-1, -2)) / 4.0
            s = s.masked_fill(torch.arange(len(pos))[None, :] > torch.arange(n)[:, None] + len(pos) - n,
                              float("-inf"))
            probs = torch.exp(s - lse[..., None]).sum(dim=(0, 1, 2))           # over the group and the queries
            for j, p in zip(pos, probs.tolist()):
                acc[hk][j] = acc[hk].get(j, 0.0) + p
            if len(pos) > budget:
                older = sorted(pos[:len(pos) - recent], key=lambda j: (-acc[hk][j], j))[:budget - recent]
                pos = sorted(older + pos[len(pos) - recent:])
            kept[hk] = pos
            rows.append(o)
        expected.append(torch.cat(rows, dim=1))
        start += n
    torch.testing.assert_close(out, torch.cat(expected, dim=2), rtol=1e-5, atol=1e-5)
    assert cache.positions.tolist() == [kept]
    assert cache.keys.shape[2] == budget


# ---------------------------------------------------------------------------------------------
# Generation through every cache equals the full-sequence result, token by token
# ---------------------------------------------------------------------------------------------
def load_example():
    if "generate_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["generate_example"] = module      # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["generate_example"]


@pytest.mark.parametrize("kind", ["kv", "window", "streaming_heads", "heavy_hitter"])
def test_generation_through_every_cache_equals_the_full_sequence(kind):
    example = load_example()
    torch.manual_seed(1)
    prompt, steps_ = torch.randint(0, 64, (11,)).tolist(), 9
    if kind == "window":
        model = example.TinyLM(variant="sliding_window", window=6, sinks=2).eval()
        caches = [b["attn"].new_cache() for b in model.blocks]
        reference = model
    elif kind == "streaming_heads":
        model = example.TinyLM().eval()
        full_heads = torch.tensor([True, False])
        caches = [b["attn"].new_cache("streaming_heads", full_heads=full_heads, window=5, sinks=1)
                  for b in model.blocks]
        windows = caches[0].inner.per_head_windows(4)
        reference = example.TinyLM(variant="sliding_window", window=windows, sinks=1).eval()
        reference.load_state_dict(model.state_dict(), strict=False)
    else:
        model = example.TinyLM().eval()
        caches = [b["attn"].new_cache() if kind == "kv" else b["attn"].new_cache("heavy_hitter", budget=64, recent=4)
                  for b in model.blocks]
        reference = model
    assert example.generate_cached(model, prompt, steps_, caches) == example.generate_full(reference, prompt, steps_)


def test_paged_serving_example_equals_the_full_sequence():
    example = load_example()
    assert example.main(["--requests", "5", "--seed", "3"]) == 0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    k, v, table, seqlens, _, _ = make_cache(2, 2, [20, 30], 16, 16, "paged16")
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"block_table\[1\] holds page 99 out of range"):
        bad = table.clone()
        bad[1, 0] = 99
        attnkit.decode_attention(q, k, v, seqlens, block_table=bad)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 32\]"):
        attnkit.decode_attention(q, k, v, torch.tensor([20, 33], dtype=torch.int32, device=DEVICE), block_table=table)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in"):
        attnkit.decode_attention(q, k, v, torch.tensor([-1, 3], dtype=torch.int32, device=DEVICE), block_table=table)
    with pytest.raises(ValueError, match="q holds Nq = 3 new tokens but sequence 0 has only 2"):
        attnkit.decode_attention(torch.randn(2, 4, 3, 16, device=DEVICE), k, v,
                                 torch.tensor([2, 30], dtype=torch.int32, device=DEVICE), block_table=table)
    with pytest.raises(ValueError, match="k_cache has dtype torch.float16 but q has torch.float32"):
        attnkit.decode_attention(q, k.half(), v.half(), seqlens, block_table=table)
    with pytest.raises(ValueError, match="k_cache has head dim 8 but q has 16"):
        attnkit.decode_attention(q, k[..., :8], v, seqlens, block_table=table)
    kc, vc = torch.randn(2, 2, 30, 16, device=DEVICE), torch.randn(2, 2, 30, 16, device=DEVICE)
    with pytest.raises(ValueError, match="page_top_k selects pages of a paged cache"):
        attnkit.decode_attention(q, kc, vc, seqlens, page_top_k=4)
    with pytest.raises(ValueError, match="cache_seqlens is required with a paged cache"):
        attnkit.decode_attention(q, k, v, block_table=table)
    with pytest.raises(ValueError, match="page_top_k must be >= 2"):
        attnkit.decode_attention(q, k, v, seqlens, block_table=table, page_top_k=1)


def test_rejected_cache_calls_change_nothing():
    g = torch.Generator().manual_seed(14)
    q, k, v = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16,
                                                                                                       generator=g)
    for cache in (attnkit.StreamingHeadsCache(torch.tensor([True, False]), window=4),
                  attnkit.HeavyHitterCache(4, 1)):
        cache.attend(q, k, v, backend="reference")
        seen, memory = cache.seen, cache.memory_bytes()
        with pytest.raises(ValueError):
            cache.attend(q, k[..., :8], v, backend="reference")             # head dims differ
        with pytest.raises(ValueError):
            cache.attend(q[:, :, :1], k, v, backend="reference")             # token counts differ
        assert (cache.seen, cache.memory_bytes()) == (seen, memory)
