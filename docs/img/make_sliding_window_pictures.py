"""Regenerate docs/img/sliding_window_*.png from the PyTorch reference.

The masks are not drawn from a formula: each picture runs
``attnkit.sliding_window_attention(..., backend="reference")`` with q = 0 (uniform
scores) and v = the identity matrix, so output[i, j] > 0 exactly where query i sees key j.

    pip install matplotlib && python docs/img/make_sliding_window_pictures.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import attnkit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N = 20


def visible(window, sinks, heads=1, nq=N, nk=N):
    """(heads, nq, nk) bool: what the reference lets each query see."""
    q = torch.zeros(1, heads, nq, 8, dtype=torch.float64)
    k = torch.zeros(1, heads, nk, 8, dtype=torch.float64)
    v = torch.eye(nk, dtype=torch.float64).expand(1, heads, nk, nk)
    out = attnkit.sliding_window_attention(q, k, v, window=window, sinks=sinks, backend="reference")
    return (out[0] > 0).numpy()


def panel(ax, mask, title, sinks=0):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
    if sinks:
        ax.axvline(sinks - 0.5, color="tab:red", lw=1, ls="--")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)
    ax.set_xticks(range(0, mask.shape[1], 5))
    ax.set_yticks(range(0, mask.shape[0], 5))
    ax.tick_params(labelsize=7)
    ax.set_xticks([x - 0.5 for x in range(mask.shape[1] + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(mask.shape[0] + 1)], minor=True)
    ax.grid(which="minor", color="white", lw=0.4)
    ax.tick_params(which="minor", length=0)


def window_with_sinks():
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.5))
    panel(axes[0], visible(6, 0)[0], "window=6  i.e. (5, 0)")
    panel(axes[1], visible(6, 3)[0], "window=6, sinks=3", sinks=3)
    panel(axes[2], visible((4, 2), 3)[0], "window=(4, 2), sinks=3", sinks=3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "sliding_window_sinks.png"), dpi=80)
    plt.close(fig)


def per_head_windows():
    rows = [[-1, 0], [7, 0], [2, 0], [3, 3]]
    masks = visible(torch.tensor(rows), 2, heads=len(rows))
    fig, axes = plt.subplots(1, len(rows), figsize=(12, 3.4))
    for h, (ax, row) in enumerate(zip(axes, rows)):
        panel(ax, masks[h], f"head {h}: window[{h}] = {tuple(row)}", sinks=2)
    fig.suptitle("window=torch.tensor(%s), sinks=2  (one launch)" % rows, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "sliding_window_per_head.png"), dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    window_with_sinks()
    per_head_windows()
