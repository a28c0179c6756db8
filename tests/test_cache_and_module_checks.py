"""Caches change nothing when a call is rejected; nn modules check their input when called and
their options when built; nn.Attention's lightning blocks take the standard slopes."""

import copy

import pytest
import torch

import attnkit
from attnkit.nn import (
    KVCache,
    PagedCache,
    RecurrentStateCache,
    StandaloneCache,
    WindowCache,
)

B, HQ, HKV, D = 2, 4, 2, 16


def _qkv(n, seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HQ, n, D, generator=g), torch.randn(batch, HKV, n, D, generator=g),
            torch.randn(batch, HKV, n, D, generator=g))


def _state(obj):
    """Everything a cache holds, tensors as their exact bytes (uninitialized slots included)."""
    if isinstance(obj, torch.Tensor):
        return (obj.dtype, tuple(obj.shape), str(obj.device), obj.detach().cpu().contiguous().view(torch.uint8)
                .flatten().tolist())
    if isinstance(obj, dict):
        return {key: _state(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_state(value) for value in obj]
    if hasattr(obj, "__dict__"):
        return (type(obj).__name__, _state(vars(obj)))
    return obj


def _softmax_call(cache, q, k, v, backend="reference", **options):
    if isinstance(cache, (KVCache, WindowCache, StandaloneCache, PagedCache)):
        return cache.attend(q, k, v, options, backend)
    return cache.attend(q, k, v, backend=backend, **options)


def _paged():
    paged = attnkit.PagedKVCache(16, 16, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, device="cpu")
    return PagedCache(paged, [paged.add_sequence() for _ in range(B)])


SOFTMAX_CACHES = {
    "SlidingWindowCache": lambda: attnkit.SlidingWindowCache(4, sinks=1),
    "SlidingWindowCache_per_head": lambda: attnkit.SlidingWindowCache(torch.tensor([[2, 0], [3, 0], [1, 0], [3, 0]])),
    "StreamingHeadsCache": lambda: attnkit.StreamingHeadsCache(torch.tensor([True, False]), window=3, sinks=1),
    "HeavyHitterCache": lambda: attnkit.HeavyHitterCache(6, recent=2),
    "nn.KVCache": lambda: KVCache(),
    "nn.KVCache_sliding_window": lambda: KVCache("sliding_window"),
    "nn.WindowCache": lambda: WindowCache(4, sinks=1),
    "nn.StandaloneCache": lambda: StandaloneCache(attnkit.HeavyHitterCache(6, recent=2)),
    "nn.PagedCache": _paged,
}

#: calls every cache must reject: (q, k, v) -> (q, k, v, options)
BAD_CALLS = {
    "head_dim": lambda q, k, v: (q[..., :8], k[..., :8], v, {}),
    "batch": lambda q, k, v: (q[:1], k[:1], v[:1], {}),
    "kv_heads": lambda q, k, v: (q, k[:, :1], v[:, :1], {}),
    "dtype": lambda q, k, v: (q.double(), k.double(), v.double(), {}),
    "device": lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta"), {}),
    "tokens": lambda q, k, v: (q, torch.cat([k, k], 2), torch.cat([v, v], 2), {}),
    "sink_logits": lambda q, k, v: (q, k, v, {"sink_logits": torch.zeros(HQ + 1)}),
    "scale": lambda q, k, v: (q, k, v, {"scale": "large"}),
    "backend": lambda q, k, v: (q, k, v, {"backend": "fastest"}),
}


#: what an empty cache refuses (it takes any shape, dtype and device until it stores a key)
FRESH_BAD_CALLS = ("tokens", "sink_logits", "scale", "backend")
STAGES = [("fresh", bad) for bad in FRESH_BAD_CALLS] + [("after_prefill", bad) for bad in BAD_CALLS]


@pytest.mark.parametrize("stage,bad", STAGES, ids=[f"{stage}-{bad}" for stage, bad in STAGES])
@pytest.mark.parametrize("name", list(SOFTMAX_CACHES))
@pytest.mark.parametrize("n", [1, 3], ids=["decode_step", "chunk"])
def test_a_rejected_call_changes_nothing(name, bad, n, stage):
    cache = SOFTMAX_CACHES[name]()
    if stage == "after_prefill":
        _softmax_call(cache, *_qkv(6, seed=1))  # the ring of the window caches wraps
    twin = copy.deepcopy(cache)
    before = _state(cache)
    q, k, v, options = BAD_CALLS[bad](*_qkv(n, seed=2))
    with pytest.raises((ValueError, TypeError)):
        _softmax_call(cache, q, k, v, **options)
    assert _state(cache) == before
    # the calls that follow give what they give without the rejected one
    for step, n_next in enumerate((n, 1, 2)):
        q, k, v = _qkv(n_next, seed=3 + step)
        assert torch.equal(_softmax_call(cache, q, k, v), _softmax_call(twin, q, k, v))
    assert getattr(cache, "seen", None) == getattr(twin, "seen", None)


# (a float64 step over a float32 state is a valid call: states are kept in float32)
RECURRENT_BAD_CALLS = {name: BAD_CALLS[name] for name in ("head_dim", "batch", "device", "backend")}


@pytest.mark.parametrize("bad", list(RECURRENT_BAD_CALLS))
def test_a_rejected_call_leaves_the_recurrent_state(bad):
    options = {"slopes": attnkit.lightning_slopes(HQ)}
    cache = RecurrentStateCache("lightning")
    cache.attend(*_qkv(5, seed=1), options, "reference")
    twin, before = copy.deepcopy(cache), _state(cache)
    q, k, v, extra = RECURRENT_BAD_CALLS[bad](*_qkv(1, seed=2))
    match = "q has batch 1 but the cache holds the state of 2 sequences" if bad == "batch" else None
    with pytest.raises((ValueError, TypeError), match=match):
        cache.attend(q, k, v, options, extra.get("backend", "reference"))
    assert _state(cache) == before
    q, k, v = _qkv(1, seed=3)
    assert torch.equal(cache.attend(q, k, v, options, "reference"), twin.attend(q, k, v, options, "reference"))


@pytest.mark.parametrize("name", ["nn.KVCache", "nn.WindowCache", "nn.PagedCache", "HeavyHitterCache",
                                  "StreamingHeadsCache"])
def test_a_batch_that_changes_size_is_named(name):
    cache = SOFTMAX_CACHES[name]()
    _softmax_call(cache, *_qkv(3, seed=1))
    with pytest.raises(ValueError, match="batch"):
        _softmax_call(cache, *_qkv(1, seed=2, batch=3))


def test_a_rejected_paged_attend_changes_nothing():
    cache = attnkit.PagedKVCache(8, 16, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, device="cpu")
    ids = [cache.add_sequence() for _ in range(B)]
    q, k, v = _qkv(5, seed=1)
    cache.append(ids, k, v)
    before = _state(cache)
    with pytest.raises(TypeError):
        cache.append(ids, k.double(), v.double())
    with pytest.raises(ValueError):
        cache.append(ids, k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError):
        cache.attend(ids, q[..., :8], backend="reference")
    assert _state(cache) == before


# ---------------------------------------------------------------------------- nn modules: input checks


def test_attention_names_x_and_its_shape():
    block = attnkit.nn.Attention(32, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 32\), got \(5, 32\)"):
        block(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 32\), got \(1, 2, 5, 32\)"):
        block(torch.randn(1, 2, 5, 32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        block([[0.0] * 32])


def test_attention_cache_with_a_new_batch_size():
    block = attnkit.nn.Attention(32, 4, causal=True, rope=True, backend="reference")
    cache = block.new_cache()
    with torch.no_grad():
        block(torch.randn(2, 4, 32), cache=cache)
        with pytest.raises(ValueError, match="k has batch 3 but the cache holds 2 sequences"):
            block(torch.randn(3, 1, 32), cache=cache)
    assert cache.seen == 4


@pytest.mark.parametrize("query,match", [
    (torch.randn(2, 3, 5, 16), r"query must have shape \(L, N, 16\) .* or \(L, 16\) .* got \(2, 3, 5, 16\)"),
    (torch.randn(16), r"query must have shape .* got \(16,\)"),
    (torch.randn(5, 2, 8), r"query must have shape \(L, N, 16\) .* got \(5, 2, 8\)"),
])
def test_multihead_attention_names_query(query, match):
    block = attnkit.nn.MultiheadAttention(16, 2)
    with pytest.raises(ValueError, match=match):
        block(query, query, query, need_weights=False)


def test_multihead_attention_names_key_and_value():
    block = attnkit.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"key must have shape \(N, S, 16\) = \(2, S, 16\).* got \(3, 5, 16\)"):
        block(x, torch.randn(3, 5, 16), x, need_weights=False)
    with pytest.raises(ValueError, match=r"value must have shape \(N, S, 16\) = \(2, 5, 16\).* got \(2, 4, 16\)"):
        block(x, x, torch.randn(2, 4, 16), need_weights=False)
    with pytest.raises(ValueError, match="key must have shape"):
        block(x, x[0], x[0], need_weights=False)


# ---------------------------------------------------------------------------- nn modules: options at build


@pytest.mark.parametrize("kwargs,error,match", [
    ({"variant": "sliding_window", "window": -3}, ValueError, "window as an int W .* must be >= 1, got -3"),
    ({"variant": "sliding_window"}, TypeError, "sliding_window needs window="),
    ({"variant": "sliding_window", "window": (2, -5)}, ValueError, r"window\[1\] \(right\) must be >= -1"),
    ({"variant": "sliding_window", "window": torch.tensor([[1, 0]] * 3)}, ValueError, r"\(Hq, 2\) = \(4, 2\)"),
    ({"variant": "sliding_window", "window": 4, "sinks": -1}, ValueError, "sinks must be >= 0"),
    ({"variant": "flash", "causal": "yes"}, TypeError, "causal must be a bool"),
    ({"variant": "flash", "softcap": -1.0}, ValueError, "softcap must be a finite number > 0"),
    ({"variant": "flash", "sink_logits": torch.zeros(3)}, ValueError, r"sink_logits must have shape \(4,\)"),
    ({"variant": "moba", "top_k": 2}, TypeError, "block_size is required"),
    ({"variant": "moba", "block_size": 0, "top_k": 2}, ValueError, "block_size must be >= 1"),
    ({"variant": "linear", "feature_map": "nope"}, ValueError, "feature_map"),
    ({"variant": "linear", "causal": False, "decay": torch.ones(4)}, ValueError, "decay needs causal=True"),
    ({"variant": "lightning", "slopes": -torch.ones(4)}, ValueError, "slopes must be >= 0"),
    ({"variant": "neighborhood", "kernel_size": 0}, ValueError, "kernel_size must be >= 1"),
    ({"variant": "neighborhood", "kernel_size": 3, "stride": 4}, ValueError, "stride must be <= kernel_size"),
])
def test_attention_options_are_checked_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        attnkit.nn.Attention(32, 4, **kwargs)


def test_attention_options_that_depend_on_the_input_wait_for_it():
    # a 1-D neighborhood of 7 fits a sequence of 9, whatever the build knew
    block = attnkit.nn.Attention(32, 4, variant="neighborhood", kernel_size=7, backend="reference")
    assert block(torch.randn(1, 9, 32)).shape == (1, 9, 32)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        block(torch.randn(1, 5, 32))
    # a packed batch's offsets describe the input
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    block = attnkit.nn.Attention(32, 4, variant="flash", cu_seqlens_q=cu, cu_seqlens_k=cu, backend="reference")
    assert block(torch.randn(1, 8, 32)).shape == (1, 8, 32)


def test_multihead_attention_options_are_checked_when_built():
    with pytest.raises(ValueError, match="must be >= 1, got -3"):
        attnkit.nn.MultiheadAttention(16, 2, variant="sliding_window", window=-3)
    with pytest.raises(TypeError, match="block_size is required"):
        attnkit.nn.MultiheadAttention(16, 2, variant="moba", top_k=2)


@pytest.mark.parametrize("cls,kwargs,error,match", [
    (attnkit.nn.NeighborhoodAttention1D, {"kernel_size": 0}, ValueError, "kernel_size must be >= 1"),
    (attnkit.nn.NeighborhoodAttention2D, {"kernel_size": (3, 0)}, ValueError, "kernel_size must be >= 1"),
    (attnkit.nn.NeighborhoodAttention2D, {"kernel_size": 3, "dilation": 0}, ValueError, "dilation must be >= 1"),
    (attnkit.nn.NeighborhoodAttention1D, {"kernel_size": 3, "stride": 5}, ValueError, "stride must be <= kernel_size"),
    (attnkit.nn.NeighborhoodAttention3D, {"kernel_size": 3, "causal": (True, 1, False)}, TypeError,
     "causal must be a bool"),
    (attnkit.nn.NeighborhoodAttention1D, {"kernel_size": 2.5}, TypeError, "kernel_size must be an int"),
])
def test_neighborhood_options_are_checked_when_built(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(32, 4, **kwargs)


def test_neighborhood_module_names_x():
    block = attnkit.nn.NeighborhoodAttention1D(32, 4, kernel_size=3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        block([[0.0] * 32])


# ---------------------------------------------------------------------------- lightning's default slopes


@pytest.mark.parametrize("layer_idx,num_layers", [(0, 1), (2, 4)])
def test_lightning_block_takes_the_standard_slopes(layer_idx, num_layers):
    torch.manual_seed(0)
    kwargs = {} if (layer_idx, num_layers) == (0, 1) else {"layer_idx": layer_idx, "num_layers": num_layers}
    block = attnkit.nn.Attention(32, 4, variant="lightning", backend="reference", **kwargs)
    want = attnkit.lightning_slopes(4, layer_idx, num_layers)
    assert torch.equal(block.option_slopes, want)
    assert (block.layer_idx, block.num_layers) == (layer_idx, num_layers)
    torch.manual_seed(0)
    explicit = attnkit.nn.Attention(32, 4, variant="lightning", backend="reference", slopes=want)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(block(x), explicit(x), rtol=0, atol=0)


def test_lightning_block_layer_options_are_checked():
    with pytest.raises(ValueError, match="layer_idx must be < num_layers"):
        attnkit.nn.Attention(32, 4, variant="lightning", layer_idx=3, num_layers=3)
    with pytest.raises(ValueError, match="layer_idx must be >= 0"):
        attnkit.nn.Attention(32, 4, variant="flash", layer_idx=-1)
    with pytest.raises(ValueError, match="pass slopes or layer_idx/num_layers"):
        attnkit.nn.Attention(32, 4, variant="lightning", slopes=attnkit.lightning_slopes(4), layer_idx=1,
                             num_layers=2)
