"""A small cost model of the context-parallel schemes: bytes each rank sends and the
number of sequential communication steps, forward pass, for a sequence of N tokens
on W ranks. Run ``python -m attnkit.distributed.costs`` (``--help`` for the model
parameters) to print the tables in docs/distributed.md. These are *model* figures
from each scheme's communication pattern, not measurements.

Model (per layer, forward; B = 1; e bytes per element of q/k/v/o, states and LSEs in
fp32; N_l = N / W tokens per rank):

* ring:     W - 1 P2P steps, each sends one K/V shard: 2 Hkv N_l D e bytes.
            Per step a rank computes 4 Hq N_l^2 D FLOPs (half that with a causal
            mask, which zigzag/striped spread evenly), so communication hides behind
            compute when that time exceeds the transfer time (``overlap`` column:
            compute time / transfer time per step, > 1 means hidden).
            Backward: K/V once more plus W fp32 dK/dV transfers (about 3x the bytes).
            Contiguous + causal: the last rank computes a whole block at every step
            while rank 0 idles, so a step takes a full block's time (zigzag / striped:
            half a block): :func:`layer_time` compares them.
* windowed: a causal window of ``window`` keys on contiguous shards: ceil((window - 1)
            / N_l) hops instead of W - 1 (plus one all-reduce of the sink keys when
            the window does not reach rank 0).
* ulysses:  4 all-to-alls (q, k, v in, out back); each sends (W-1)/W of the rank's
            shard: (W-1)/W N_l e (2 Hq D + 2 Hkv' D) bytes, Hkv' = Hkv if W divides it,
            else Hq (K/V expanded). Needs W | Hq. Backward: the same again.
* usp:      a U x R mesh (U * R = W): the Ulysses all-to-alls inside each group of U
            (fast links), then a ring of R - 1 steps over K/V shards of N / R tokens
            and Hkv / U heads across the groups (slow links).
* tokenring: queries travel forward (Hq N_l D e per step) while partial outputs and
            LSEs travel back in fp32 (Hq N_l (Dv + 1) 4, as token_ring_attention sends
            them), both link directions busy at once:
            W - 1 steps whose time is the larger of the two, not their sum.
* lasp2:    one all-gather of the D x Dv fp32 state per head: a rank receives
            (W-1) Hq D Dv 4 bytes, independent of N; 1 collective (log2 W rounds
            with recursive doubling). LASP-1's ring would need W - 1 sequential steps.
* lasp2h:   the softmax layer of a hybrid under LASP-2's scheme: one all-gather of
            K/V, (W-1) 2 Hkv N_l D e bytes received (the ring's bytes), 1 collective.
* tree:     decoding one token against a cache of N split over W ranks: all-reduce
            max (Hq 4 bytes) and sum (Hq (Dv + 1) 4 bytes); 2 log2 W rounds with
            recursive doubling, versus W - 1 steps for a ring of partial results.
* star:     Star Attention: phase 1 (context) broadcasts the anchor's K/V once
            (2 Hkv anchor D e bytes), then each rank attends its block prefixed by the
            anchor with no more communication; phase 2 is a tree decode of the query
            tokens. Approximate by design.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Model:
    heads: int = 32          # Hq
    kv_heads: int = 8        # Hkv
    head_dim: int = 128      # D = Dv
    elem_bytes: int = 2      # bf16
    tflops: float = 400.0    # sustained attention TFLOP/s per GPU
    link_gbs: float = 50.0   # GB/s per rank (400 Gb/s InfiniBand; ~ 200+ within an NVLink node)
    fast_gbs: float = 200.0  # GB/s per rank inside a node (NVLink), for USP's Ulysses dimension


def _kv_shard(tokens: float, m: Model, heads: float | None = None) -> float:
    return 2 * (m.kv_heads if heads is None else heads) * tokens * m.head_dim * m.elem_bytes


def _block_s(rows: float, keys: float, m: Model) -> float:
    """Seconds of one unmasked attention block (4 Hq rows keys D FLOPs)."""
    return 4 * m.heads * rows * keys * m.head_dim / (m.tflops * 1e12)


def ring(n: int, w: int, m: Model) -> dict[str, float]:
    local = n / w
    per_step = _kv_shard(local, m)
    flops = 4 * m.heads * local * local * m.head_dim / 2        # causal, balanced (zigzag / striped)
    t_comm = per_step / (m.link_gbs * 1e9)
    t_comp = flops / (m.tflops * 1e12)
    return {"bytes": (w - 1) * per_step, "steps": w - 1, "overlap": t_comp / t_comm if t_comm else math.inf}


def windowed_ring(n: int, w: int, m: Model, window: int, sinks: int = 0) -> dict[str, float]:
    """A causal window of ``window`` keys (and ``sinks`` sink keys) on contiguous shards."""
    local = n / w
    hops = min(w - 1, math.ceil((window - 1) / local))
    sink_bytes = 2 * _kv_shard(sinks, m) if sinks and hops < w - 1 else 0   # all-reduce: ~2x the slab
    return {"bytes": hops * _kv_shard(local, m) + sink_bytes, "steps": hops + (1 if sink_bytes else 0)}


def ulysses(n: int, w: int, m: Model) -> dict[str, float]:
    if m.heads % w:
        return {"bytes": math.nan, "steps": math.nan}
    kv = m.kv_heads if m.kv_heads % w == 0 else m.heads
    local = n / w
    return {"bytes": (w - 1) / w * local * m.elem_bytes * m.head_dim * (2 * m.heads + 2 * kv), "steps": 4}


def usp(n: int, u: int, r: int, m: Model) -> dict[str, float]:
    """U-way Ulysses inside a node, R-way ring across nodes (W = U R): bytes on the fast
    links (all-to-all) and on the slow links (ring), and the steps of each."""
    if m.heads % u:
        return {"bytes": math.nan, "fast_bytes": math.nan, "slow_bytes": math.nan, "steps": math.nan}
    a2a = ulysses(n // r, u, m)                         # the group of U holds N / R tokens
    kv_heads = m.kv_heads / u if m.kv_heads % u == 0 else m.heads / u
    slow = (r - 1) * _kv_shard(n / r, m, kv_heads)
    return {"bytes": a2a["bytes"] + slow, "fast_bytes": a2a["bytes"], "slow_bytes": slow, "steps": 4 + r - 1}


def token_ring(n: int, w: int, m: Model) -> dict[str, float]:
    local = n / w
    forward = m.heads * local * m.head_dim * m.elem_bytes           # queries, one way
    backward = m.heads * local * (m.head_dim + 1) * 4              # fp32 partial outputs and LSEs, the other
    return {"bytes": (w - 1) * (forward + backward), "steps": w - 1, "step_bytes": max(forward, backward),
            "forward_bytes": forward, "backward_bytes": backward}


def lasp2(n: int, w: int, m: Model) -> dict[str, float]:
    return {"bytes": (w - 1) * m.heads * m.head_dim * m.head_dim * 4, "steps": 1}


def lasp2h(n: int, w: int, m: Model) -> dict[str, float]:
    return {"bytes": (w - 1) * _kv_shard(n / w, m), "steps": 1}


def tree(n: int, w: int, m: Model) -> dict[str, float]:
    size = m.heads * 4 + m.heads * (m.head_dim + 1) * 4
    rounds = math.ceil(math.log2(w)) if w > 1 else 0
    return {"bytes": size * rounds, "steps": 2 * rounds}


def star(n: int, w: int, m: Model, query_tokens: int = 1, anchor: int = 0) -> dict[str, float]:
    """Phase 1's broadcast of the ``anchor`` tokens' K/V, then phase 2 for ``query_tokens``."""
    t = tree(n, w, m)
    bcast = _kv_shard(anchor, m) if anchor and w > 1 else 0
    return {"bytes": bcast + query_tokens * t["bytes"], "steps": t["steps"] + (1 if bcast else 0)}


def layer_time(scheme: str, n: int, w: int, m: Model, *, u: int = 8) -> float:
    """Modelled seconds of one causal attention layer, forward, communication overlapped
    with compute step by step (a step takes the longer of the two).

    ``scheme``: "ring" (contiguous), "zigzag", "striped", "tokenring", "usp" (``u``-way
    Ulysses on ``fast_gbs`` links, a ring across W / u groups on ``link_gbs``), "lasp2h"
    (the all-gather, then the whole causal block: no overlap).
    """
    local = n / w
    link = m.link_gbs * 1e9
    if scheme in ("ring", "zigzag", "striped"):
        step_comp = _block_s(local, local, m) * (1.0 if scheme == "ring" else 0.5)
        step_comm = _kv_shard(local, m) / link
        return (w - 1) * max(step_comp, step_comm) + _block_s(local, local, m) / 2     # + the diagonal block
    if scheme == "tokenring":
        tr = token_ring(n, w, m)
        return (w - 1) * max(_block_s(local, local, m) / 2, tr["step_bytes"] / link) + _block_s(local, local, m) / 2
    if scheme == "usp":
        r = w // u
        cost = usp(n, u, r, m)
        a2a = cost["fast_bytes"] / (m.fast_gbs * 1e9)
        local_r = n / r                                   # tokens per ring rank after the all-to-all
        heads_frac = 1 / u
        step_comp = _block_s(local_r, local_r, m) * heads_frac / 2
        step_comm = cost["slow_bytes"] / max(r - 1, 1) / link
        return a2a + (r - 1) * max(step_comp, step_comm) + _block_s(local_r, local_r, m) * heads_frac / 2
    if scheme == "lasp2h":
        return lasp2h(n, w, m)["bytes"] / link + _block_s(local, n, m) / 2
    raise ValueError(f"scheme must be one of ring, zigzag, striped, tokenring, usp, lasp2h; got {scheme!r}")


def table(lengths: Sequence[int], worlds: Sequence[int], m: Model) -> list[dict[str, float]]:
    rows = []
    for n in lengths:
        for w in worlds:
            r, u, l, t = ring(n, w, m), ulysses(n, w, m), lasp2(n, w, m), tree(n, w, m)
            rows.append({"N": n, "W": w, "ring_mb": r["bytes"] / 2**20, "ring_steps": r["steps"],
                         "overlap": r["overlap"], "ulysses_mb": u["bytes"] / 2**20, "ulysses_steps": u["steps"],
                         "lasp2_mb": l["bytes"] / 2**20, "tree_kb": t["bytes"] / 2**10, "tree_steps": t["steps"]})
    return rows


def schemes(n: int, w: int, m: Model, *, window: int = 4096, sinks: int = 4, u: int = 8) -> list[tuple]:
    """(scheme, MB per rank, steps) of every scheme for one N and W."""
    r = max(1, w // u)
    rows = [("ring (contiguous / zigzag / striped)", ring(n, w, m)),
            (f"windowed ring (window {window:,}, {sinks} sinks)", windowed_ring(n, w, m, window, sinks)),
            ("Ulysses", ulysses(n, w, m)),
            (f"USP ({min(u, w)} x {r})", usp(n, min(u, w), r, m)),
            ("TokenRing", token_ring(n, w, m)),
            ("LASP-2 (linear layers)", lasp2(n, w, m)),
            ("LASP-2H (softmax layers)", lasp2h(n, w, m)),
            ("tree decode (1 token)", tree(n, w, m)),
            ("Star Attention (anchor = N/W, 1 query token)", star(n, w, m, anchor=n // w))]
    return [(name, c["bytes"] / 2**20, c["steps"]) for name, c in rows]


def _fmt(x: float, digits: int = 1) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 10:
        return f"{int(x):,}"
    return f"{x:,.{digits}f}" if abs(x) >= 0.05 or x == 0 else f"{x:.2g}"


def markdown(rows: list[dict[str, float]]) -> str:
    head = ("| N | W | ring MB/rank | ring steps | ring compute/comm per step | Ulysses MB/rank | Ulysses steps "
            "| LASP-2 MB/rank | tree decode KB/rank | tree steps (ring: W-1) |")
    lines = [head, "|" + "---:|" * 10]
    for r in rows:
        lines.append(f"| {r['N']:,} | {r['W']} | {_fmt(r['ring_mb'])} | {r['ring_steps']} | {_fmt(r['overlap'])} "
                     f"| {_fmt(r['ulysses_mb'])} | {_fmt(r['ulysses_steps'])} | {_fmt(r['lasp2_mb'])} "
                     f"| {_fmt(r['tree_kb'])} | {r['tree_steps']} ({r['W'] - 1}) |")
    return "\n".join(lines)


def schemes_markdown(n: int, w: int, m: Model) -> str:
    lines = [f"Every scheme at N = {n:,}, W = {w}:", "", "| scheme | MB sent per rank | sequential steps |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {_fmt(mb)} | {_fmt(steps)} |" for name, mb, steps in schemes(n, w, m)]
    return "\n".join(lines)


def published(m: Model) -> str:
    """The model's figures beside the papers' reported numbers (their hardware, not ours)."""
    striped = layer_time("ring", 262144, 8, m) / layer_time("striped", 262144, 8, m)
    n, w = 2 ** 21, 64
    lasp1 = (w - 1) * (lasp2(n, w, m)["bytes"] / (w - 1) / (m.link_gbs * 1e9) + 10e-6)   # W - 1 hops, 10 us each
    lasp2_t = lasp2(n, w, m)["bytes"] / (m.link_gbs * 1e9) + math.log2(w) * 10e-6
    n_usp = 212992
    ideal = _block_s(n_usp / 16, n_usp, m) / 2          # the causal layer's compute per rank, nothing else
    usp_share = ideal / layer_time("usp", n_usp, 16, m, u=8)
    ring_share = ideal / layer_time("striped", n_usp, 16, m)
    tr = token_ring(131072, 8, m)
    ring_step = _kv_shard(131072 / 8, m)
    lines = ["| claim (paper, its hardware) | reported | this model (same setting) |", "|---|---|---|",
             (f"| Striped vs ring attention, causal, 256K | 1.45x end-to-end (A100) | {striped:.2f}x attention layer, "
             "W = 8 (a contiguous step waits for a whole block) |"),
             (f"| LASP-2 vs ring-style LASP-1, 2M tokens, 64 GPUs | +36.6% throughput | state traffic "
             f"{lasp1 * 1e3:.2f} ms in 63 steps vs {lasp2_t * 1e3:.2f} ms in one all-gather (latency 10 us a hop) |"),
             (f"| USP, 208K tokens, 2 nodes x 8 GPUs | 86% MFU (whole model) | attention compute is {usp_share:.0%} of the "
              f"modelled layer time (8-way Ulysses on {m.fast_gbs:g} GB/s, 2-way ring on {m.link_gbs:g} GB/s) vs "
              f"{ring_share:.0%} for a striped ring over all 16 ranks on {m.link_gbs:g} GB/s |"),
             (f"| TokenRing: both directions of a link busy | bidirectional overlap | a step moves "
             f"{tr['forward_bytes'] / 2**20:.1f} MB of queries forward and {tr['backward_bytes'] / 2**20:.1f} MB "
             f"of fp32 partials back at once (its time: the larger) vs the ring's {ring_step / 2**20:.1f} MB "
             "one way, N = 128K, W = 8 (with GQA 32/8 the ring moves fewer bytes; with MHA the larger "
             "direction is about the ring's K/V shard, and the other direction comes free) |")]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Communication cost of every context-parallel scheme per rank, "
                                            "forward pass, one layer, batch 1 (model figures, not measurements).")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--elem-bytes", type=int, default=2)
    p.add_argument("--tflops", type=float, default=400.0, help="sustained attention TFLOP/s per GPU")
    p.add_argument("--link-gbs", type=float, default=50.0, help="link bandwidth per rank, GB/s")
    p.add_argument("--fast-gbs", type=float, default=200.0, help="intra-node link bandwidth per rank, GB/s")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144, 1048576])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 8, 16, 64])
    p.add_argument("--scheme-world", type=int, default=16, help="W of the every-scheme table (N: the last length)")
    a = p.parse_args(argv)
    m = Model(a.heads, a.kv_heads, a.head_dim, a.elem_bytes, a.tflops, a.link_gbs, a.fast_gbs)
    print(f"Model: Hq={m.heads} Hkv={m.kv_heads} D=Dv={m.head_dim} {m.elem_bytes}-byte q/k/v/o, fp32 states; "
          f"{m.tflops:g} TFLOP/s, {m.link_gbs:g} GB/s per rank ({m.fast_gbs:g} inside a node); causal; forward; "
          "per layer, batch 1. Model figures, not measurements.\n")
    print(markdown(table(a.lengths, a.worlds, m)))
    print()
    print(schemes_markdown(a.lengths[-1], a.scheme_world, m))
    print()
    print(published(m))


if __name__ == "__main__":
    main()
