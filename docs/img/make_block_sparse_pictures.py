"""Regenerate docs/img/block_sparse_*.png from the PyTorch references.

The masks are not drawn from a formula: each picture runs the reference
(``block_sparse_attention`` / ``moba_attention`` with ``backend="reference"``) with
v = the identity matrix, so output[i, j] > 0 exactly where query i sees key j.

    pip install matplotlib && python docs/img/make_block_sparse_pictures.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import attnkit  # noqa: E402
from attnkit import patterns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def visible_block_sparse(bm, causal=False):
    nq, nk = bm.seq_lens
    q = torch.zeros(1, 1, nq, 8, dtype=torch.float64)
    k = torch.zeros(1, 1, nk, 8, dtype=torch.float64)
    v = torch.eye(nk, dtype=torch.float64).view(1, 1, nk, nk)
    return (attnkit.block_sparse_attention(q, k, v, bm, causal=causal, backend="reference")[0, 0] > 0).numpy()


def panel(ax, mask, title, block=None):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    if block:
        bq, bk = block
        for x in range(bk, mask.shape[1], bk):
            ax.axvline(x - 0.5, color="0.85", lw=0.4)
        for y in range(bq, mask.shape[0], bq):
            ax.axhline(y - 0.5, color="0.85", lw=0.4)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("key", fontsize=7)
    ax.set_ylabel("query", fontsize=7)


def patterns_picture():
    n, b = 128, 16
    masks = [
        ("BigBird: window 1, global 1, random 1", patterns.local_global_random(n, b, window=1, global_blocks=1,
                                                                              random_blocks=1, seed=3), False),
        ("Longformer: window 1, global 1", patterns.longformer(n, b, window=1, global_blocks=1), False),
        ("strided: stride 3, local 1 (causal)", patterns.strided(n, b, stride=3, local_blocks=1), True),
        ("Radial: 16 frames x 64 tokens, block 16", patterns.radial(16, 64, 16), False),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8), dpi=80)
    for ax, (title, bm, causal) in zip(axes, masks):
        panel(ax, visible_block_sparse(bm, causal), title, bm.block_size)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "block_sparse_patterns.png"))
    plt.close(fig)


def causal_picture():
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(5, 8, generator=g) < 0.55
    bm = attnkit.BlockMask.from_dense(dense, (16, 12), (72, 96))  # Nq != Nk, ragged last blocks
    full, part = bm.causal_split(True)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.0), dpi=80)
    panel(axes[0], visible_block_sparse(bm), "listed tiles (BQ=16, BK=12, Nq=72, Nk=96)", bm.block_size)
    panel(axes[1], visible_block_sparse(bm, causal=True), "causal=True (bottom-right)", bm.block_size)
    kinds = (full[0, 0].int() * 2 + part[0, 0].int()).numpy()  # 2 full, 1 partial, 0 skipped
    axes[2].imshow(kinds, cmap=matplotlib.colors.ListedColormap(["white", "tab:orange", "tab:blue"]), vmin=0,
                   vmax=2, interpolation="nearest")
    axes[2].set_title("kernel tiles: full (blue), partial (orange)", fontsize=8)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "block_sparse_causal.png"))
    plt.close(fig)


def moba_picture():
    n, bs, top_k = 128, 16, 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, n, 16, generator=g, dtype=torch.float64)
    k[..., 40:56, :] += 0.6 * q[0, 0, 100:].mean(0)  # one block that late queries like
    v = torch.eye(n, dtype=torch.float64).view(1, 1, n, n)
    out = attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, backend="reference")
    seen = (out[0, 0] > 0).numpy().astype(float)
    own = np.zeros_like(seen)
    for i in range(n):
        own[i, (i // bs) * bs:i + 1] = 1
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=80)
    ax.imshow(seen + own, cmap=matplotlib.colors.ListedColormap(["white", "tab:blue", "tab:orange"]), vmin=0,
              vmax=2, interpolation="nearest")
    for x in range(bs, n, bs):
        ax.axvline(x - 0.5, color="0.8", lw=0.4)
    ax.set_title(f"MoBA, block {bs}, top_k {top_k}: own block (orange),\nselected blocks per token (blue)",
                 fontsize=8)
    ax.set_xlabel("key", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
    ax.set_xticks(range(0, n + 1, 32))
    ax.set_yticks(range(0, n + 1, 32))
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "block_sparse_moba.png"))
    plt.close(fig)


if __name__ == "__main__":
    patterns_picture()
    causal_picture()
    moba_picture()
