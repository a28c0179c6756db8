"""Regenerate the pictures of docs/neighborhood.md (needs matplotlib):

    python docs/img/make_neighborhood_pictures.py

Each picture is a 2-D map of 13 x 13 tokens; the query (or the queries of one
stride group) in dark blue, the keys it attends to shaded, computed with attnkit's
own geometry (the table the reference gathers with).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attnkit.neighborhood.geometry import neighbor_table, normalize  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = (13, 13)


def neighborhood(query, **options):
    axes = normalize(SIZE, options.pop("kernel_size"), options.pop("dilation", 1), options.pop("causal", False),
                     options.pop("stride", 1))
    idx, valid = neighbor_table(axes)
    row = query[0] * SIZE[1] + query[1]
    grid = np.zeros(SIZE[0] * SIZE[1])
    grid[idx[row][valid[row]].numpy()] = 1
    return grid.reshape(SIZE)


def draw(name, title, queries, grid, note=""):
    fig, ax = plt.subplots(figsize=(2.6, 2.9), dpi=80)
    img = np.where(grid > 0, 0.55, 0.0)
    for q in queries:
        img[q] = 1.0
    ax.imshow(img, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(np.arange(-0.5, SIZE[1], 1), minor=True)
    ax.set_yticks(np.arange(-0.5, SIZE[0], 1), minor=True)
    ax.grid(which="minor", color="0.75", linewidth=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=8)
    if note:
        ax.set_xlabel(note, fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, f"neighborhood_{name}.png"))
    plt.close(fig)


def main():
    draw("corner", "kernel 5x5, query at (1, 0)", [(1, 0)], neighborhood((1, 0), kernel_size=5),
         "window shifted inside: still 25 keys")
    draw("centre", "kernel 5x5, query at (6, 6)", [(6, 6)], neighborhood((6, 6), kernel_size=5),
         "window centred on the query")
    draw("dilation", "kernel 3x3, dilation 3", [(6, 6)], neighborhood((6, 6), kernel_size=3, dilation=3),
         "keys of the query's dilation group only")
    draw("causal", "kernel 5x5, causal rows", [(6, 6)],
         neighborhood((6, 6), kernel_size=5, causal=(True, False)), "rows (time): 5 up to the query")
    group = [(r, c) for r in range(3, 6) for c in range(3, 6)]
    grid = neighborhood((4, 4), kernel_size=5, stride=3)
    for q in group:  # every query of the stride group has the leader's window
        assert (neighborhood(q, kernel_size=5, stride=3) == grid).all()
    draw("stride", "kernel 5x5, stride 3", group, grid, "a 3x3 stride group shares its leader's window")


if __name__ == "__main__":
    main()
