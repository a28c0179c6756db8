"""Regenerate docs/img/decoding_*.png (the pictures of decoding and serving) from the library.

Nothing is drawn from a formula:

* the page pool is an ``attnkit.PagedKVCache`` driven through a small serving schedule
  (sequences join, decode in interleaved steps, one leaves and a new one takes its pages);
  the picture reads ``block_table``/``seqlens`` and the positions stored in the pages;
* what a head sees is read off ``attnkit.sliding_window_attention(..., backend="reference")``
  with the windows ``StreamingHeadsCache.per_head_windows`` returns, q = 0 (uniform scores)
  and v = the identity matrix, so output[i, j] > 0 exactly where query i sees key j (and the
  cache's own decoding is checked against it);
* page scores come from ``attnkit.decode.selection.page_scores`` on the cache's page bounds;
  the pages kept and the key scores are read off ``attnkit.decode_attention(...,
  return_key_scores=True, backend="reference")``.

    pip install matplotlib && python docs/img/make_decoding_pictures.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

import attnkit  # noqa: E402
from attnkit.decode.selection import page_scores, select_pages  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DPI = 100
COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]


# ----------------------------------------------------------------------------- paged cache

def serve(cache, snapshots):
    """A small serving schedule over ``cache`` (page_size 8, 16 pages). Each key holds
    (sequence id + 1, position) in its first two dims, so the pages can be read back.
    Calls ``snapshots(label)`` when the pool is full and at the end."""
    lengths = {}

    def append(ids, n):
        k = torch.zeros(len(ids), 1, n, cache.head_dim, dtype=torch.float64)
        for row, s in enumerate(ids):
            k[row, 0, :, 0] = s + 1
            k[row, 0, :, 1] = torch.arange(lengths[s], lengths[s] + n, dtype=torch.float64)
            lengths[s] += n
        cache.append(ids, k, k.clone())

    def join(prompt):
        s = cache.add_sequence()
        lengths[s] = 0
        append([s], prompt)
        return s

    join(8)                                    # two requests arrive with prompts of 8 and 21 tokens
    join(21)
    for step in range(28):                     # every live sequence decodes one token per step
        if step == 6:
            c = join(10)                       # a third request arrives
        append(cache.sequences, 1)
    used = cache.num_pages - cache.num_free_pages
    snapshots(f"after 28 decoding steps the pool is full: {used} of {cache.num_pages} pages used")
    cache.free(c)                              # sequence 2 finishes: its 4 pages return to the pool
    join(11)                                   # a new request takes the freed pages
    append(cache.sequences, 1)
    snapshots(f"sequence {c} finished and was freed; a new sequence took its pages "
              f"({cache.num_free_pages} pages free)")


def draw_pool(ax, cache, owners, was, title):
    """16 pages as boxes in 2 rows of 8: slots filled by a sequence coloured, its logical page and
    the positions stored in the page written inside."""
    ps = cache.page_size
    seqs = cache.sequences
    table, lens = cache.block_table(seqs), cache.seqlens(seqs)
    per_row = 8
    layout = {}                                # physical page -> (seq, logical page, filled slots)
    for row, s in enumerate(seqs):
        n = int(lens[row])
        for p in range(-(-n // ps)):
            layout[int(table[row, p])] = (s, p, min(ps, n - p * ps))
    for page in range(cache.num_pages):
        x, y = (page % per_row) * 1.15, -(page // per_row) * 1.55
        reused = page in was and page in layout
        ax.text(x + 0.5, y + 1.08, f"page {page}" + (f"\nwas seq {was[page]}'s" if reused else ""), ha="center",
                va="bottom", fontsize=7, color=COLOURS[layout[page][0]] if reused else "0.3",
                fontweight="bold" if reused else "normal")
        if page not in layout:
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor="0.93", edgecolor="0.55", lw=0.8, hatch="//"))
            note = f"free\n(was seq {was[page]})" if page in was else "free"
            ax.text(x + 0.5, y + 0.5, note, ha="center", va="center", fontsize=7, color="0.4")
            continue
        s, p, filled = layout[page]
        colour = np.array(to_rgb(COLOURS[s]))
        for slot in range(ps):                 # one column per slot; the stored position says it is ours
            stored = cache.keys[page, 0, slot]
            mine = slot < filled and int(stored[0]) == s + 1 and int(stored[1]) == p * ps + slot
            assert mine == (slot < filled)
            ax.add_patch(Rectangle((x + slot / ps, y), 1 / ps, 1, lw=0,
                                   facecolor=colour if mine else 1 - 0.15 * (1 - colour)))
        ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="0.2", lw=1.0))
        first, last = int(cache.keys[page, 0, 0, 1]), int(cache.keys[page, 0, filled - 1, 1])
        outline = [patheffects.withStroke(linewidth=2, foreground=0.55 * colour)]
        ax.text(x + 0.5, y + 0.62, f"seq {s}\np{p}", ha="center", va="center", fontsize=7.5, color="white",
                fontweight="bold", path_effects=outline)
        span = f"pos {first}" + (f"-{last}" if last > first else "")
        ax.text(x + 0.5, y + 0.17, span + ("" if filled == ps else f"\n{filled}/{ps} filled"),
                ha="center", va="center", fontsize=6.5, color="white", path_effects=outline)
        owners.setdefault(page, set()).add(s)
    ax.set_xlim(-0.1, per_row * 1.15)
    ax.set_ylim(-1.7, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)


def draw_table(ax, cache):
    """The block table rows: column p holds the physical page of logical page p."""
    seqs = cache.sequences
    table, lens = cache.block_table(seqs), cache.seqlens(seqs)
    ps = cache.page_size
    width = table.shape[1]
    for row, s in enumerate(seqs):
        n = int(lens[row])
        used = -(-n // ps)
        colour = COLOURS[s]
        ax.text(-0.2, -row, f"seq {s}\nlen {n}", ha="right", va="center", fontsize=7.5)
        for p in range(width):
            live = p < used
            ax.add_patch(Rectangle((p, -row - 0.4), 0.92, 0.8, facecolor=colour if live else "white",
                                   edgecolor="0.3" if live else "0.75", lw=0.8))
            ax.text(p + 0.46, -row, str(int(table[row, p])), ha="center", va="center", fontsize=7.5,
                    color="white" if live else "0.7")
    for p in range(width):
        ax.text(p + 0.46, 0.65, f"p{p}", ha="center", va="bottom", fontsize=7, color="0.3")
    ax.set_xlim(-1.6, 7.2)
    ax.set_ylim(-2.9, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("block_table(seqs): logical page -> physical page\n(grey: padding, not read)", fontsize=8)


def paged_cache_picture():
    cache = attnkit.PagedKVCache(16, 8, num_kv_heads=1, head_dim=4, dtype=torch.float64, device="cpu")
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.4), gridspec_kw={"width_ratios": [2.1, 1]})
    shots = []
    owners, was = {}, {}

    def snapshot(label):
        row = len(shots)
        if row == 1:                           # the pages that came back when sequence 2 left
            was.update({page: 2 for page, s in owners.items() if 2 in s})
        draw_pool(axes[row, 0], cache, owners, was, f"{'ab'[row]}) {label}")
        draw_table(axes[row, 1], cache)
        shots.append(label)

    serve(cache, snapshot)
    fig.suptitle("PagedKVCache(16 pages x 8 positions): sequences take pages from a shared pool as they grow, "
                 "in whatever order they are free;\ninside a box: the sequence, its logical page p and the "
                 "positions stored there (light: free slots of a partly filled last page)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "decoding_paged_cache.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- streaming heads

def visible(window, sinks, heads, n):
    """(heads, n, n) bool: what the sliding-window reference lets each query see."""
    q = torch.zeros(1, heads, n, 8, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).expand(1, heads, n, n)
    out = attnkit.sliding_window_attention(q, q, v, window=window, sinks=sinks, backend="reference")
    return (out[0] > 0).numpy()


def check_cache_decodes_as_windows(full_heads, window, sinks, n):
    """StreamingHeadsCache fed one token at a time equals sliding_window_attention with its windows."""
    cache = attnkit.StreamingHeadsCache(full_heads, window=window, sinks=sinks)
    heads = full_heads.numel()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    steps = torch.cat([cache.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], backend="reference")
                       for t in range(n)], dim=2)
    whole = attnkit.sliding_window_attention(q, k, v, window=cache.per_head_windows(heads), sinks=cache.sinks,
                                             backend="reference")
    torch.testing.assert_close(steps, whole)


def streaming_heads_picture():
    n, window, sinks = 24, 6, 2
    full_heads = torch.tensor([True, False, False, True])
    heads = full_heads.numel()                 # Hq = Hkv
    cache = attnkit.StreamingHeadsCache(full_heads, window=window, sinks=sinks)
    windows = cache.per_head_windows(heads)
    masks = visible(windows, sinks, heads, n)
    check_cache_decodes_as_windows(full_heads, window, sinks, n)

    fig, axes = plt.subplots(1, heads + 1, figsize=(12, 3.5), gridspec_kw={"width_ratios": [1] * heads + [1.25]})
    kept = []
    for h in range(heads):
        ax, mask = axes[h], masks[h]
        colour = np.array(to_rgb("tab:blue" if full_heads[h] else "tab:orange"))
        img = np.ones((n, n, 3))
        img[mask] = 1 - 0.35 * (1 - colour)
        img[n - 1, mask[n - 1]] = colour       # the newest query: what the cache must hold
        ax.imshow(img, interpolation="nearest")
        ax.add_patch(Rectangle((-0.5, n - 1.5), n, 1, fill=False, ec="black", lw=1.0))
        if not full_heads[h]:
            ax.axvline(sinks - 0.5, color="tab:red", lw=1, ls="--")
        kind = "retrieval (all keys)" if full_heads[h] else f"streaming (sinks + last {window})"
        ax.set_title(f"kv head {h}: {kind}\nwindow {tuple(windows[h].tolist())}, sinks {sinks}", fontsize=8)
        ax.set_xlabel("key j", fontsize=7)
        ax.set_ylabel("query i", fontsize=7)
        ax.set_xticks(range(0, n, 6))
        ax.set_yticks(range(0, n, 6))
        ax.tick_params(labelsize=7)
        ax.set_xticks([x - 0.5 for x in range(n + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(n + 1)], minor=True)
        ax.grid(which="minor", color="white", lw=0.4)
        ax.tick_params(which="minor", length=0)
        kept.append(int(mask[n - 1].sum()))   # what the newest query sees = what the head must keep

    ax = axes[heads]
    x = np.arange(heads)
    ax.bar(x - 0.2, [n] * heads, width=0.38, color="0.8", label="every head keeps every key")
    ax.bar(x + 0.2, kept, width=0.38, color=["tab:blue" if f else "tab:orange" for f in full_heads.tolist()],
           label="StreamingHeadsCache")
    for xi, value in zip(x, kept):
        ax.text(xi + 0.2, value + 0.4, str(value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"head {h}" for h in range(heads)])
    ax.set_ylim(0, n * 1.5)
    ax.set_ylabel("keys kept", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(handles=[Patch(color="0.8", label=f"every head keeps every key ({n})"),
                       Patch(color="tab:blue", label=f"retrieval head: all {n}"),
                       Patch(color="tab:orange", label=f"streaming head: {sinks} sinks + {window}")],
              fontsize=7, frameon=False, loc="upper left")
    ax.set_title(f"keys kept after N = {n} tokens:\n{sum(kept)} in all vs {n * heads}", fontsize=8)
    fig.suptitle(f"StreamingHeadsCache(full_heads={full_heads.tolist()}, window={window}, sinks={sinks}): "
                 "what each query sees (light), the newest query (dark, boxed); red dashes: the sinks", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "decoding_streaming_heads.png"), dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- Quest page selection

def page_selection_picture():
    ps, length, dim, top_k = 8, 92, 16, 4
    g = torch.Generator().manual_seed(1)
    cache = attnkit.PagedKVCache(12, ps, num_kv_heads=1, head_dim=dim, dtype=torch.float64, device="cpu")
    seq = cache.add_sequence()
    q = torch.randn(1, 1, 1, dim, generator=g, dtype=torch.float64)
    q = q * dim ** 0.5 / q.norm()               # |q|^2 = D: a key equal to q scores 1 / scale = sqrt(D)
    k = 0.4 * torch.randn(1, 1, length, dim, generator=g, dtype=torch.float64)
    for pos, strength in ((29, 1.0), (62, 0.8)):   # two keys close to the query: what is worth finding
        k[0, 0, pos] += strength * q[0, 0, 0]
    v = torch.randn(1, 1, length, dim, generator=g, dtype=torch.float64)
    for start in range(0, length, 20):          # a prompt arriving in chunks
        cache.append([seq], k[:, :, start:start + 20], v[:, :, start:start + 20])
    table, lens = cache.block_table([seq]), cache.seqlens([seq])
    pages = int(-(-length // ps))

    scores = page_scores(q, cache.kmin, cache.kmax, table, lens, ps)[0, 0]          # (pages,)
    chosen, count = select_pages(scores[None, None], lens, ps, top_k)
    chosen = sorted(chosen[0, 0, :int(count[0, 0])].tolist())
    exact = (q[0, 0, 0] @ k[0, 0].T).double()                                      # the true q . k per key
    page_max = [float(exact[p * ps:(p + 1) * ps].max()) for p in range(pages)]

    args = {"block_table": table, "return_key_scores": True, "backend": "reference"}
    _, full = attnkit.decode_attention(q, cache.keys, cache.values, lens, **args)
    _, quest = attnkit.decode_attention(q, cache.keys, cache.values, lens, page_top_k=top_k,
                                        page_bounds=(cache.kmin, cache.kmax), **args)
    full, quest = full[0, 0, :length].numpy(), quest[0, 0, :length].numpy()
    kept = [p for p in range(pages) if quest[p * ps:(p + 1) * ps].sum() > 0]    # read off the reference
    assert kept == chosen and 0 in kept and pages - 1 in kept, (kept, chosen)

    fig, axes = plt.subplots(2, 1, figsize=(11, 6.2), gridspec_kw={"height_ratios": [1, 1.15]})
    ax = axes[0]
    x = np.arange(pages)
    colours = ["tab:green" if p in kept else "0.75" for p in range(pages)]
    ax.bar(x, scores.numpy(), width=0.7, color=colours)
    ax.plot(x, page_max, "k_", ms=14, mew=1.6, label="largest true q.k of the page's keys")
    for p in kept:
        why = "first" if p == 0 else "newest" if p == pages - 1 else "top score"
        ax.text(p, float(scores[p]) + 0.3, f"kept\n({why})", ha="center", va="bottom", fontsize=7,
                color="tab:green")
    ax.axhline(0, color="0.4", lw=0.6)
    ax.set_xticks(x, [f"p{p}\n[{p * ps}, {min(length, (p + 1) * ps) - 1}]" for p in x])
    ax.set_xlim(-0.6, pages - 0.4)
    ax.set_ylim(min(0, float(scores.min())) - 0.5, float(scores.max()) * 1.45)
    ax.tick_params(labelsize=7)
    ax.set_ylabel("page score (upper bound)", fontsize=7)
    ax.legend(handles=[Patch(color="tab:green", label=f"kept (page_top_k = {top_k})"),
                       Patch(color="0.75", label="skipped"), ax.lines[0]], fontsize=7, frameon=False,
              loc="upper left", ncol=3)
    ax.set_title(f"page_scores(q, kmin, kmax, ...): sum_d max(q_d kmax_d, q_d kmin_d) per page of one sequence "
                 f"({length} tokens, {pages} pages of {ps}); black: the true best q.k, always below", fontsize=8)

    ax = axes[1]
    keys = np.arange(length)
    for p in kept:
        ax.axvspan(p * ps - 0.5, min(length, (p + 1) * ps) - 0.5, color="tab:green", alpha=0.09, lw=0)
    for p in range(1, pages):
        ax.axvline(p * ps - 0.5, color="0.85", lw=0.6)
    ax.bar(keys - 0.2, full, width=0.4, color="0.45", label="full decoding (every key)")
    ax.bar(keys + 0.2, quest, width=0.4, color="tab:green", label=f"page_top_k = {top_k} (kept pages only)")
    ax.set_xlim(-0.8, length - 0.2)
    ax.set_xticks(range(0, length + 1, ps))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key position (grid: page boundaries; green band: kept pages)", fontsize=7)
    ax.set_ylabel("key score (softmax prob.)", fontsize=7)
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    mass = float(full[np.concatenate([np.arange(p * ps, min(length, (p + 1) * ps)) for p in kept])].sum())
    ax.set_title(f"decode_attention(..., return_key_scores=True): the newest query's probability on each key; "
                 f"the kept pages hold {mass:.0%} of the full attention,\nselection renormalises over them "
                 "(0 on skipped pages)", fontsize=8)
    fig.suptitle("Quest page selection: score every page by an upper bound of q.k from its key bounds, attend "
                 "only the best pages (the first and the newest always)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "decoding_page_selection.png"), dpi=DPI)
    plt.close(fig)


if __name__ == "__main__":
    paged_cache_picture()
    streaming_heads_picture()
    page_selection_picture()
