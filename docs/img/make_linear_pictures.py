"""Regenerate docs/img/linear_chunked.png (the chunked algorithm of docs/linear.md) from the library.

Nothing is drawn from a formula:

* the matrix is what one head of ``attnkit.gated_linear_attention(..., backend="reference")``
  (the recurrence, one token at a time) reads: with q = k = 1 (Dk = 1), scale 1 and v = the
  identity, output[t, s] = exp(g_{s+1} + ... + g_t), the weight of token s's write in query t's
  read (0 above the diagonal);
* the states at the chunk boundaries are the ``return_state`` of the same op run chunk by chunk,
  each piece given the previous piece's state; the script checks that these pieces equal one call
  on the whole sequence (outputs and final state), which is what lets the chunks run in parallel
  once the boundary states are known.

    pip install matplotlib && python docs/img/make_linear_pictures.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, Rectangle

import attnkit

HERE = os.path.dirname(os.path.abspath(__file__))
N, C, DK, DV = 64, 16, 6, 6        # 4 chunks of 16 tokens, states of 6 x 6
INTRA, INTER = "tab:orange", "tab:blue"


def gates(n):
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.logsigmoid(torch.randn(1, 1, n, generator=g, dtype=torch.float64) + 3.5)


def read_weights(g):
    """(N, N): out[t, s] = exp(sum of g over (s, t]) for s <= t, read off the reference."""
    ones = torch.ones(1, 1, N, 1, dtype=torch.float64)
    eye = torch.eye(N, dtype=torch.float64)[None, None]
    out = attnkit.gated_linear_attention(ones, ones, eye, g, scale=1.0, backend="reference")
    return out[0, 0].numpy()


def boundary_states(g):
    """The states entering each chunk and the final one, [(DK, DV)] * (N / C + 1), from the op run
    chunk by chunk; checked against one call on the whole sequence."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, N, d, generator=gen, dtype=torch.float64) for d in (DK, DK, DV))
    whole, final = attnkit.gated_linear_attention(q, k, v, g, return_state=True, backend="reference")
    state, states, outs = None, [torch.zeros(DK, DV, dtype=torch.float64)], []
    for a in range(0, N, C):
        piece = slice(a, a + C)
        out, state = attnkit.gated_linear_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece], g[:, :, piece],
                                                    initial_state=state, return_state=True, backend="reference")
        outs.append(out)
        states.append(state[0, 0])
    torch.testing.assert_close(torch.cat(outs, dim=2), whole)
    torch.testing.assert_close(states[-1], final[0, 0])
    return [s.numpy() for s in states]


def draw_matrix(ax, weights):
    shown = np.where(np.tril(np.ones((N, N), dtype=bool)), weights, np.nan)
    image = ax.imshow(shown, cmap="Greys", vmin=0, vmax=1.15, interpolation="nearest")
    chunks = N // C
    for c in range(chunks):
        lo = c * C - 0.5
        ax.add_patch(Rectangle((lo, lo), C, C, fill=False, edgecolor=INTRA, lw=2))
        ax.text(lo + C * 0.72, lo + C * 0.3, f"intra\nchunk {c}", color=INTRA, fontsize=7.5, ha="center",
                va="center", fontweight="bold")
        if c:
            ax.add_patch(Rectangle((-0.5, lo), c * C, C, fill=False, edgecolor=INTER, lw=1.6, ls="--"))
            ax.text(-0.5 + c * C / 2, lo + C / 2, f"q · S{c}" if c > 1 else "q · S1", color=INTER,
                    fontsize=8.5, ha="center", va="center", fontweight="bold",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1})
    ax.set_title("a) what query t reads of token s's write: exp(g_{s+1} + ... + g_t)\n(one head, scalar gates; "
                 f"{N} tokens in chunks of {C})", fontsize=9)
    ax.set_xlabel("token s (key, value)", fontsize=8)
    ax.set_ylabel("query t", fontsize=8)
    ax.set_xticks(range(0, N + 1, C))
    ax.set_yticks(range(0, N + 1, C))
    ax.tick_params(labelsize=7)
    bar = plt.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=7)


def draw_states(ax, states):
    """Chunk c lies between boundaries c and c + 1; the state at boundary c sits above it."""
    chunks = N // C
    pitch, half, low = 5.4, 1.2, 7.4           # boundary spacing; the state squares: side 2 * half, bottom at low
    lim = max(np.abs(s).max() for s in states)
    for c in range(chunks + 1):                # stage 1: the states at the boundaries, one pass
        x = c * pitch
        ax.imshow(states[c], cmap="RdBu_r", vmin=-lim, vmax=lim, extent=(x - half, x + half, low, low + 2 * half),
                  interpolation="nearest", zorder=3)
        ax.add_patch(Rectangle((x - half, low), 2 * half, 2 * half, fill=False, edgecolor="0.2", lw=0.8, zorder=4))
        label = "S0 = initial_state\n(zeros here)" if c == 0 else (f"S{c} = final state" if c == chunks else f"S{c}")
        ax.text(x, low + 2 * half + 0.2, label, ha="center", va="bottom", fontsize=8)
        if c < chunks:
            ax.add_patch(FancyArrowPatch((x + half + 0.1, low + half), (x + pitch - half - 0.1, low + half),
                                         arrowstyle="-|>", mutation_scale=11, color="0.3", lw=1))
            ax.text(x + pitch / 2, low + half + 0.25, f"decay\n+ chunk {c}'s\nwrites", ha="center", va="bottom",
                    fontsize=7, color="0.3")
    for c in range(chunks):                    # stage 2: every chunk at once, from its rows and its S_c
        x = c * pitch + 0.35
        ax.add_patch(Rectangle((x, 0.6), pitch - 0.7, 4.2, facecolor="white", edgecolor=INTRA, lw=1.6))
        ax.text(x + (pitch - 0.7) / 2, 2.7, f"chunk {c}\ntokens {c * C}-{c * C + C - 1}\n\nintra-chunk\nblock\n"
                f"+ q · S{c}", ha="center", va="center", fontsize=8)
        ax.add_patch(FancyArrowPatch((c * pitch, low - 0.1), (x + 0.9, 4.85), arrowstyle="-|>", mutation_scale=10,
                                     color=INTER, lw=1.3, ls="--"))
    ax.text(-1.8, low + half, "stage 1:\nthe states at\nthe boundaries\n(one pass)", ha="right", va="center",
            fontsize=8.5)
    ax.text(-1.8, 2.7, "stage 2:\nevery chunk\nin parallel", ha="right", va="center", fontsize=8.5)
    ax.set_xlim(-6.2, chunks * pitch + 1.6)
    ax.set_ylim(0.2, low + 2 * half + 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"b) the state S_c ({DK} x {DV}, read off the op run chunk by chunk) holds every token before "
                 "chunk c:\nonce the states are known, each chunk needs only its own rows and S_c", fontsize=9)


def chunked_picture():
    g = gates(N)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.4), gridspec_kw={"width_ratios": [1, 1.55]})
    draw_matrix(axes[0], read_weights(g))
    draw_states(axes[1], boundary_states(g))
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "linear_chunked.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    chunked_picture()
