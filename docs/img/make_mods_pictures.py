"""Regenerate docs/img/mods_*.png (the pictures of docs/mods.md) from the PyTorch reference.

Nothing is drawn from a formula:

* a mask is read off ``attnkit.flex_attention(..., backend="reference")`` (or
  ``attnkit.neighborhood_attention``) with q = 0 (uniform scores) and v = the identity
  matrix, so output[i, j] > 0 exactly where query i sees key j;
* a score mod is shown as the bias it adds: its reference applied to a zero score tile,
  ``mod.specialize(problem).apply(zeros, b, h, q_idx, kv_idx)``, at the positions the
  references use (query row i sits at key position i + Nk - Nq). Each additive bias is
  checked against the attention reference: with q = 0 and v = identity, the output row
  is softmax(bias), so log(out) equals the bias up to a constant per row;
* the tile status of a BlockMask comes from ``attnkit.create_block_mask``.

    pip install matplotlib && python docs/img/make_mods_pictures.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap, to_rgb  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

import attnkit  # noqa: E402
from attnkit import mods  # noqa: E402
from attnkit._reference import bottom_right, mod_positions  # noqa: E402
from attnkit.block_sparse.block_mask import lists_to_dense  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DPI = 100
N = 24


def qkv(heads=1, nq=N, nk=N):
    """q = k = 0 (uniform scores) and v = identity, float64."""
    q = torch.zeros(1, heads, nq, 8, dtype=torch.float64)
    k = torch.zeros(1, heads, nk, 8, dtype=torch.float64)
    v = torch.eye(nk, dtype=torch.float64).expand(1, heads, nk, nk)
    return q, k, v


def visible(mask_mod=None, block_mask=None, nq=N, nk=N):
    """(nq, nk) bool: what the flex reference lets each query see."""
    q, k, v = qkv(1, nq, nk)
    out = attnkit.flex_attention(q, k, v, mask_mod=mask_mod, block_mask=block_mask, backend="reference")
    return (out[0, 0] > 0).numpy()


def bias(score_mod, heads=1, nq=N, nk=N):
    """(heads, nq, nk): what ``score_mod``'s reference adds to a zero score, checked against
    the flex reference (log of its output = bias - logsumexp(bias) per row)."""
    q, k, v = qkv(heads, nq, nk)
    mod = score_mod.specialize(mods.Problem.of("flex", q, k))
    positions = mod_positions(1, heads, bottom_right(0, nq, nq, nk, "cpu"), torch.arange(nk))
    added = mod.apply(torch.zeros(1, heads, nq, nk, dtype=torch.float64), *positions)[0]
    out = attnkit.flex_attention(q, k, v, score_mod=score_mod, backend="reference")[0]
    torch.testing.assert_close(out.log(), added - added.logsumexp(-1, keepdim=True))
    return added.numpy()


def grid_ticks(ax, rows, cols, step=4, grid=True, labels=True):
    ax.set_xticks(range(0, cols, step))
    ax.set_yticks(range(0, rows, step))
    ax.tick_params(labelsize=7)
    if not labels:
        ax.tick_params(labelbottom=False, labelleft=False)
    if grid:
        ax.set_xticks([x - 0.5 for x in range(cols + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(rows + 1)], minor=True)
        ax.grid(which="minor", color="white", lw=0.4)
        ax.tick_params(which="minor", length=0)


def mask_panel(ax, mask, title, vlines=(), hlines=(), global_tokens=0):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
    for x in vlines:
        ax.axvline(x - 0.5, color="tab:red", lw=1, ls="--")
    if global_tokens:
        ax.axvline(global_tokens - 0.5, color="tab:green", lw=1.2, ls="--")
    for y in hlines:
        ax.axhline(y - 0.5, color="tab:red", lw=1, ls="--")
    ax.set_title(title, fontsize=7.5)
    ax.set_xlabel("key j", fontsize=7)
    ax.set_ylabel("query i", fontsize=7)
    grid_ticks(ax, *mask.shape, step=6)


def bias_panel(fig, ax, values, title, cmap="viridis", step=4, vmin=None, vmax=None, colorbar=True):
    img = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("key j", fontsize=7)
    ax.set_ylabel("query i", fontsize=7)
    grid_ticks(ax, *values.shape, step=step, grid=False)
    if colorbar:
        bar = fig.colorbar(img, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
    return img


def doc_ids(*lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def boundaries(lengths):
    return np.cumsum(lengths)[:-1].tolist()


# ----------------------------------------------------------------------------- masks

def masks_picture():
    lengths = (7, 10, 7)
    docs = doc_ids(*lengths)
    panels = [
        ("causal()\n(q_idx >= kv_idx)", mods.causal(), (), (), 0),
        ("sliding_window(4, 0)\n(the query and 4 before)", mods.sliding_window(4, 0), (), (), 0),
        ("prefix_lm(6)\n(prefix of 6 tokens)", mods.prefix_lm(6), (6,), (), 0),
        ("document(doc_ids)\n3 documents:\n7, 10, 7 tokens", mods.document(docs), boundaries(lengths),
         boundaries(lengths), 0),
        ("and_masks(causal(), document(\ndoc_ids, global_tokens=2))\n(AnchorAttention)", mods.and_masks(
            mods.causal(), mods.document(docs, global_tokens=2)), boundaries(lengths), boundaries(lengths), 2),
        ("or_masks(\nsliding_window(2, 0),\nprefix_lm(4))", mods.or_masks(mods.sliding_window(2, 0),
                                                                        mods.prefix_lm(4)), (4,), (), 0),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.1))
    for ax, (title, mask_mod, vlines, hlines, global_tokens) in zip(axes, panels):
        mask_panel(ax, visible(mask_mod), title, vlines, hlines, global_tokens)
    fig.suptitle("mask mods, N = 24: query i sees key j (blue); red dashes: prefix and document boundaries, "
                 "green: the global (anchor) tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mods_masks.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- block mask of a token mask

def block_mask_picture():
    n, block, lengths = 64, 16, (6, 14, 44)
    mask_mod = mods.and_masks(mods.causal(), mods.document(doc_ids(*lengths)))
    bm = attnkit.create_block_mask(mask_mod, None, None, n, n, block_size=block, device="cpu")
    cols = bm.num_key_blocks
    listed = bm.to_dense()[0, 0]
    full = lists_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, cols)[0, 0]
    partial = bm._partial[0, 0]
    assert torch.equal(listed, full | partial) and not (full & partial).any()
    seen = visible(block_mask=bm, nq=n, nk=n)
    assert (seen == visible(mask_mod, nq=n, nk=n)).all()  # exact: same as the mask_mod on every pair

    status = (full.int() * 2 + partial.int()).numpy()  # 0 dropped, 1 partial, 2 full
    blue, orange = np.array(to_rgb("tab:blue")), np.array(to_rgb("tab:orange"))
    tile = np.kron(status, np.ones((block, block), dtype=int))[:n, :n]
    img = np.ones((n, n, 3))
    img[(tile == 2) & seen] = blue
    img[(tile == 1) & seen] = orange
    img[(tile == 1) & ~seen] = 1 - 0.25 * (1 - orange)  # computed, then masked inside the tile
    assert not (seen & (tile == 0)).any() and seen[tile == 2].all()

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), gridspec_kw={"width_ratios": [1, 1.6]})
    ax = axes[0]
    ax.imshow(status, cmap=ListedColormap(["white", "tab:orange", "tab:blue"]), vmin=0, vmax=2,
              interpolation="nearest")
    for (r, c), s in np.ndenumerate(status):
        ax.text(c, r, ["dropped", "partial", "full"][s], ha="center", va="center", fontsize=7,
                color="0.4" if s == 0 else "white")
    ax.set_xticks(range(status.shape[1]))
    ax.set_yticks(range(status.shape[0]))
    ax.set_xticks(np.arange(-0.5, status.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, status.shape[0]), minor=True)
    ax.grid(which="minor", color="0.3", lw=0.8)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key block", fontsize=7)
    ax.set_ylabel("query block", fontsize=7)
    ax.set_title(f"create_block_mask(..., block_size={block}):\n{int(full.sum())} full, {int(partial.sum())} "
                 f"partial, {int((~listed).sum())} dropped tiles", fontsize=8)

    ax = axes[1]
    ax.imshow(img, interpolation="nearest")
    for x in range(block, n, block):
        ax.axvline(x - 0.5, color="0.2", lw=0.9)
        ax.axhline(x - 0.5, color="0.2", lw=0.9)
    for x in boundaries(lengths):
        ax.axvline(x - 0.5, color="tab:red", lw=0.8, ls="--")
        ax.axhline(x - 0.5, color="tab:red", lw=0.8, ls="--")
    ax.set_xticks(range(0, n + 1, block))
    ax.set_yticks(range(0, n + 1, block))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key j", fontsize=7)
    ax.set_ylabel("query i", fontsize=7)
    ax.set_title(f"token mask from flex_attention(block_mask=...), N = {n}\n"
                 f"and_masks(causal(), document(doc_ids)), documents {lengths} (red)", fontsize=8)
    ax.legend(handles=[Patch(color="tab:blue", label="full tile: all pairs, no mask"),
                       Patch(color="tab:orange", label="partial tile: attended pairs"),
                       Patch(color=1 - 0.25 * (1 - orange), label="partial tile: masked by mask_mod"),
                       Patch(facecolor="white", edgecolor="0.6", label="dropped tile: skipped")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle("exact, not block-rounded: partial tiles carry the mask_mod, so the result is the token mask",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mods_block_mask.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- ALiBi

def alibi_picture():
    heads = 8
    slopes = mods.alibi_slopes(heads)
    square = bias(mods.alibi(slopes), heads)
    nq, nk = 8, 24
    short = bias(mods.alibi(slopes), heads, nq=nq, nk=nk)
    low = float(square.min())
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3), gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for ax, h in zip(axes, (0, 1, 3)):
        img = bias_panel(fig, ax, square[h], f"head {h} of {heads}: slope {slopes[h]:g}", step=6, vmin=low, vmax=0,
                         colorbar=False)
    bias_panel(fig, axes[3], short[0], f"head 0, Nq = {nq} < Nk = {nk}: query row i\nat q_idx = i + {nk - nq} "
                                       "(bottom-right; white dots: bias 0)", step=4, vmin=low, vmax=0, colorbar=False)
    axes[3].plot(np.arange(nq) + nk - nq, np.arange(nq), "w.", ms=3)
    axes[3].set_yticks(range(nq))
    fig.subplots_adjust(left=0.04, right=0.92, top=0.8, bottom=0.12, wspace=0.3)
    bar = fig.colorbar(img, ax=axes, fraction=0.015, pad=0.015)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("alibi(alibi_slopes(8)): the bias added to the scores, -slope[h] * |q_idx - kv_idx| "
                 "(one colour scale: smaller slopes reach further)", fontsize=9)
    fig.savefig(os.path.join(HERE, "mods_alibi.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- T5

def t5_picture():
    n, buckets, distance = 32, 32, 128
    rel = torch.arange(-distance - 24, distance + 25)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), gridspec_kw={"width_ratios": [1.35, 1, 1, 1]})
    ax = axes[0]
    for bidirectional, colour in ((True, "tab:blue"), (False, "tab:orange")):
        ax.step(rel.numpy(), mods.t5_bucket(rel, num_buckets=buckets, max_distance=distance,
                                            bidirectional=bidirectional).numpy(),
                where="mid", color=colour, lw=1.2, label=f"bidirectional={bidirectional}")
    for x in (-distance, distance):
        ax.axvline(x, color="0.6", lw=0.6, ls=":")
    ax.set_xlabel("kv_idx - q_idx", fontsize=7)
    ax.set_ylabel("bucket", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="center right", frameon=False)
    ax.set_title(f"t5_bucket: num_buckets={buckets}, max_distance={distance}\n"
                 "exact near 0, then logarithmic, clamped (dotted: +-128)", fontsize=8)

    idx = torch.arange(n)
    for ax, bidirectional in ((axes[1], True), (axes[2], False)):
        grid = mods.t5_bucket(idx[None, :] - idx[:, None], num_buckets=buckets, max_distance=distance,
                              bidirectional=bidirectional).numpy()
        bias_panel(fig, ax, grid, f"bucket of kv_idx - q_idx, N = {n}\nbidirectional={bidirectional}",
                   cmap="viridis", step=8, vmin=-0.5, vmax=buckets - 0.5)

    table = torch.randn(1, buckets, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = bias(mods.relative_position_bias(table), 1, nq=n, nk=n)[0]
    bound = float(np.abs(values).max())
    bias_panel(fig, axes[3], values, "relative_position_bias(table), table ~ N(0, 1)\n"
                                     "bias = table[h, bucket(j - i)]", cmap="RdBu_r", step=8, vmin=-bound,
               vmax=bound)
    fig.suptitle("T5 relative position bias: buckets of the relative position and the bias one head adds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mods_t5.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- NATTEN rpb (2-D)

def rpb_2d_bias(table, size, kernel, dilation, query):
    """(size, size) float with NaN off the neighbourhood: the bias ``relative_position_bias_2d``
    adds to the score of each neighbour of ``query``; the neighbours are read off
    ``neighborhood_attention``'s reference (q = 0, v = identity)."""
    tokens = size * size
    q = torch.zeros(1, 1, size, size, 8, dtype=torch.float64)
    v = torch.eye(tokens, dtype=torch.float64).view(1, 1, size, size, tokens)
    score_mod = mods.relative_position_bias_2d(table, kernel)
    plain = attnkit.neighborhood_attention(q, q, v, kernel_size=kernel, dilation=dilation, backend="reference")
    row = query[0] * size + query[1]
    keys = torch.nonzero(plain[0, 0].reshape(tokens, tokens)[row] > 0).flatten()
    assert len(keys) == kernel * kernel
    problem = mods.Problem("neighborhood", 1, 1, tokens, tokens, torch.device("cpu"), spatial=(size, size),
                           dilation=(dilation, dilation), kernel_size=(kernel, kernel), stride=(1, 1))
    mod = score_mod.specialize(problem)
    added = mod.apply(torch.zeros(1, 1, 1, len(keys), dtype=torch.float64),
                      *mod_positions(1, 1, torch.tensor([row]), keys.view(1, -1)))[0, 0, 0]
    # the neighbourhood reference with the mod: out over the neighbours = softmax(bias)
    out = attnkit.neighborhood_attention(q, q, v, kernel_size=kernel, dilation=dilation, score_mod=score_mod,
                                         backend="reference")[0, 0].reshape(tokens, tokens)[row, keys]
    torch.testing.assert_close(out.log(), added - added.logsumexp(0))
    grid = np.full(tokens, np.nan)
    grid[keys.numpy()] = added.numpy()
    return grid.reshape(size, size)


def rpb_2d_picture():
    size, kernel = 11, 5
    table = torch.randn(1, 2 * kernel - 1, 2 * kernel - 1, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    bound = float(table.abs().max())
    cmap = matplotlib.colormaps["RdBu_r"].copy()
    cmap.set_bad("0.88")
    centre, corner = (size // 2, size // 2), (1, 0)
    panels = [(f"kernel {kernel}, query {centre}", 1, centre), (f"kernel {kernel}, query {corner}", 1, corner),
              (f"kernel {kernel}, dilation 2, query {centre}", 2, centre),
              (f"kernel {kernel}, dilation 2, query {corner}", 2, corner)]
    fig, axes = plt.subplots(1, 5, figsize=(12, 3.0))
    ax = axes[0]
    img = ax.imshow(table[0].numpy(), cmap=cmap, vmin=-bound, vmax=bound, interpolation="nearest")
    offsets = range(-(kernel - 1), kernel)
    ax.set_xticks(range(2 * kernel - 1), [str(o) for o in offsets])
    ax.set_yticks(range(2 * kernel - 1), [str(o) for o in offsets])
    ax.tick_params(labelsize=6)
    ax.set_xlabel("column offset / dilation", fontsize=7)
    ax.set_ylabel("row offset / dilation", fontsize=7)
    ax.set_title(f"the table, (H, {2 * kernel - 1}, {2 * kernel - 1}), head 0\n~ N(0, 1)", fontsize=8)
    for ax, (title, dilation, query) in zip(axes[1:], panels):
        grid = rpb_2d_bias(table, size, kernel, dilation, query)
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-bound, vmax=bound, interpolation="nearest")
        ax.add_patch(Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
        ax.set_xticks([x - 0.5 for x in range(size + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(size + 1)], minor=True)
        ax.grid(which="minor", color="white", lw=0.5)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"{size} x {size} map; grey: not a neighbour", fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.93, top=0.74, bottom=0.1, wspace=0.25)
    bar = fig.colorbar(img, cax=fig.add_axes([0.945, 0.15, 0.01, 0.55]))
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("relative_position_bias_2d(table, 5) with neighborhood_attention: the bias each neighbour of the "
                 "query (black box) gets;\na query near the border has a shifted window, so it reads an off-centre "
                 "part of the table", fontsize=9)
    fig.savefig(os.path.join(HERE, "mods_rpb_2d.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- key bias, softcap

def softcap_curve(cap, scores):
    """softcap(cap)'s reference on a row of scores, and its derivative (autograd through it)."""
    s = scores.clone().requires_grad_(True)
    mod = mods.softcap(cap)
    q, k, _ = qkv()
    mod = mod.specialize(mods.Problem.of("flex", q, k))
    zero = torch.zeros(1, dtype=torch.long)
    out = mod.apply(s.view(1, 1, 1, -1), zero.view(1, 1, 1, 1), zero.view(1, 1, 1, 1), zero.view(1, 1, 1, 1),
                    torch.arange(len(scores)).view(1, 1, 1, -1)).flatten()
    (grad,) = torch.autograd.grad(out.sum(), s)
    return out.detach().numpy(), grad.numpy()


def key_bias_softcap_picture():
    n = 16
    row = torch.zeros(1, 1, n, dtype=torch.float64)
    row[0, 0, 0] = 4.0          # attention-sink calibration: a large bias on the first token
    row[0, 0, 9] = -2.0         # and a penalised key
    values = bias(mods.key_bias(row), 1, nq=n, nk=n)[0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    bias_panel(fig, axes[0], values, "key_bias(bias): bias[b, h, kv_idx], the same in every row\n"
               "+4 on key 0 (attention-sink calibration), -2 on key 9", cmap="RdBu_r", step=3, vmin=-4, vmax=4)
    scores = torch.linspace(-40, 40, 801, dtype=torch.float64)
    for cap, colour in ((5.0, "tab:blue"), (20.0, "tab:orange")):
        out, grad = softcap_curve(cap, scores)
        axes[1].plot(scores.numpy(), out, color=colour, lw=1.4, label=f"cap = {cap:g}")
        for y in (-cap, cap):
            axes[1].axhline(y, color=colour, lw=0.6, ls=":")
        axes[2].plot(scores.numpy(), grad, color=colour, lw=1.4, label=f"cap = {cap:g}")
    axes[1].plot(scores.numpy(), scores.numpy(), color="0.6", lw=0.8, ls="--", label="no cap")
    axes[1].set_ylim(-25, 25)
    axes[1].set_title("softcap(cap): cap * tanh(s / cap)  (non-additive)", fontsize=8)
    axes[1].set_ylabel("score after the mod", fontsize=7)
    axes[2].set_title("its derivative d out / d s = 1 - tanh(s / cap)^2", fontsize=8)
    axes[2].set_ylabel("d out / d s", fontsize=7)
    for ax in axes[1:]:
        ax.set_xlabel("score s", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(color="0.9", lw=0.5)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mods_key_bias_softcap.png"), dpi=DPI)
    plt.close(fig)


if __name__ == "__main__":
    masks_picture()
    block_mask_picture()
    alibi_picture()
    t5_picture()
    rpb_2d_picture()
    key_bias_softcap_picture()
