"""A small cost model of the context-parallel schemes: bytes each rank sends and the
number of sequential communication steps, forward pass, for a sequence of N tokens
on W ranks. Run ``python -m attnkit.distributed.costs`` (``--help`` for the model
parameters) to print the table in docs/distributed.md.

Model (per layer, forward; B = 1; e bytes per element of q/k/v/o, states in fp32):

* ring:     W - 1 P2P steps, each sends one K/V shard: 2 Hkv (N/W) D e bytes.
            Per step a rank computes 4 Hq (N/W)^2 D FLOPs (half that with a causal
            mask, which zigzag/striped spread evenly), so communication hides behind
            compute when that time exceeds the transfer time (``overlap`` column:
            compute time / transfer time per step, > 1 means hidden).
            Backward: K/V once more plus W fp32 dK/dV transfers (about 3x the bytes).
* ulysses:  4 all-to-alls (q, k, v in, out back); each sends (W-1)/W of the rank's
            shard: (W-1)/W (N/W) e (2 Hq D + 2 Hkv' D) bytes, Hkv' = Hkv if W divides it,
            else Hq (K/V expanded). Needs W | Hq. Backward: the same again.
* lasp2:    one all-gather of the D x Dv fp32 state per head: a rank receives
            (W-1) Hq D Dv 4 bytes, independent of N; 1 collective (log2 W rounds
            with recursive doubling). LASP-1's ring would need W - 1 sequential steps.
* tree:     decoding one token against a cache of N split over W ranks: all-reduce
            max (Hq 4 bytes) and sum (Hq (Dv + 1) 4 bytes); 2 log2 W rounds with
            recursive doubling, versus W - 1 steps for a ring of partial results.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence


@dataclass
class Model:
    heads: int = 32          # Hq
    kv_heads: int = 8        # Hkv
    head_dim: int = 128      # D = Dv
    elem_bytes: int = 2      # bf16
    tflops: float = 400.0    # sustained attention TFLOP/s per GPU
    link_gbs: float = 50.0   # GB/s per rank (400 Gb/s InfiniBand; ~ 200+ within an NVLink node)


def ring(n: int, w: int, m: Model) -> Dict[str, float]:
    local = n / w
    per_step = 2 * m.kv_heads * local * m.head_dim * m.elem_bytes
    flops = 4 * m.heads * local * local * m.head_dim / 2        # causal, balanced (zigzag / striped)
    t_comm = per_step / (m.link_gbs * 1e9)
    t_comp = flops / (m.tflops * 1e12)
    return dict(bytes=(w - 1) * per_step, steps=w - 1, overlap=t_comp / t_comm if t_comm else math.inf)


def ulysses(n: int, w: int, m: Model) -> Dict[str, float]:
    if m.heads % w:
        return dict(bytes=math.nan, steps=math.nan)
    kv = m.kv_heads if m.kv_heads % w == 0 else m.heads
    local = n / w
    return dict(bytes=(w - 1) / w * local * m.elem_bytes * m.head_dim * (2 * m.heads + 2 * kv), steps=4)


def lasp2(n: int, w: int, m: Model) -> Dict[str, float]:
    return dict(bytes=(w - 1) * m.heads * m.head_dim * m.head_dim * 4, steps=1)


def tree(n: int, w: int, m: Model) -> Dict[str, float]:
    size = m.heads * 4 + m.heads * (m.head_dim + 1) * 4
    rounds = math.ceil(math.log2(w)) if w > 1 else 0
    return dict(bytes=size * rounds, steps=2 * rounds)


def table(lengths: Sequence[int], worlds: Sequence[int], m: Model) -> List[Dict[str, float]]:
    rows = []
    for n in lengths:
        for w in worlds:
            r, u, l, t = ring(n, w, m), ulysses(n, w, m), lasp2(n, w, m), tree(n, w, m)
            rows.append(dict(N=n, W=w, ring_mb=r["bytes"] / 2**20, ring_steps=r["steps"], overlap=r["overlap"],
                             ulysses_mb=u["bytes"] / 2**20, ulysses_steps=u["steps"], lasp2_mb=l["bytes"] / 2**20,
                             tree_kb=t["bytes"] / 2**10, tree_steps=t["steps"]))
    return rows


def _fmt(x: float, digits: int = 1) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 10:
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def markdown(rows: List[Dict[str, float]]) -> str:
    head = ("| N | W | ring MB/rank | ring steps | ring compute/comm per step | Ulysses MB/rank | Ulysses steps "
            "| LASP-2 MB/rank | tree decode KB/rank | tree steps (ring: W-1) |")
    lines = [head, "|" + "---:|" * 10]
    for r in rows:
        lines.append(f"| {r['N']:,} | {r['W']} | {_fmt(r['ring_mb'])} | {r['ring_steps']} | {_fmt(r['overlap'])} "
                     f"| {_fmt(r['ulysses_mb'])} | {_fmt(r['ulysses_steps'])} | {_fmt(r['lasp2_mb'])} "
                     f"| {_fmt(r['tree_kb'])} | {r['tree_steps']} ({r['W'] - 1}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Communication cost of ring / Ulysses / LASP-2 / tree decoding "
                                            "per rank, forward pass, one layer, batch 1.")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--elem-bytes", type=int, default=2)
    p.add_argument("--tflops", type=float, default=400.0, help="sustained attention TFLOP/s per GPU")
    p.add_argument("--link-gbs", type=float, default=50.0, help="link bandwidth per rank, GB/s")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144, 1048576])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 8, 16, 64])
    a = p.parse_args(argv)
    m = Model(a.heads, a.kv_heads, a.head_dim, a.elem_bytes, a.tflops, a.link_gbs)
    print(f"Model: Hq={m.heads} Hkv={m.kv_heads} D=Dv={m.head_dim} {m.elem_bytes}-byte q/k/v/o, fp32 states; "
          f"{m.tflops:g} TFLOP/s, {m.link_gbs:g} GB/s per rank; causal; forward; per layer, batch 1.\n")
    print(markdown(table(a.lengths, a.worlds, m)))


if __name__ == "__main__":
    main()
