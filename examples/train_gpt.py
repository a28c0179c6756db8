"""Train a tiny GPT on a synthetic copy task with a choice of attnkit attention variant.

Each training sequence is a random pattern of ``--period`` tokens repeated to fill the
context: after the first period every token is predictable by looking exactly one
period back, which needs attention that can reach that far. Loss curves of the chosen
variants are printed and, when matplotlib is installed (it is optional: the ``plot``
extra, ``pip install -e '.[plot]'``), plotted to ``--plot``.

    python examples/train_gpt.py                         # all four variants, 300 steps each
    python examples/train_gpt.py --variant sliding_window --steps 300

On CPU the default run is about one minute of compute: 61 CPU-seconds measured on the
project's 2-core box, with one thread. On a machine busy with other work, run it as
``OMP_NUM_THREADS=1 python examples/train_gpt.py``: the model is tiny, and PyTorch's
intra-op threads otherwise spin against the other processes. On that 2-core box, shared
with other jobs, the default run took 3.5 min with one thread; with PyTorch's default
two threads flash alone took 12.5 min (all four: about 55 min, extrapolated from 30 steps).

Expect flash, sliding_window (window = period + 1) and moba (block = period, top-3) to
learn the copy exactly, and lightning not to: a linear-attention layer keeps a fixed-size
decaying state and cannot recall one exact token from a period back — the recall gap that
Based and Zoology describe, and why hybrid models keep some softmax layers.
The figure in docs/img/train_gpt_loss.png is this script's output.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch
from torch import nn

import attnkit

VARIANTS = ("flash", "sliding_window", "lightning", "moba")


def variant_options(variant: str, heads: int, layer: int, layers: int, period: int) -> Dict:
    if variant == "flash":
        return {"causal": True}
    if variant == "sliding_window":
        return {"window": period + 1}  # just enough to see one period back
    if variant == "lightning":
        return {"slopes": attnkit.lightning_slopes(heads, layer, layers)}
    if variant == "moba":
        return {"block_size": period, "top_k": 3}
    raise ValueError(f"--variant must be one of {VARIANTS} or 'all', got {variant!r}")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, variant: str, layer: int, layers: int, period: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attnkit.nn.Attention(dim, heads, variant=variant, rope=variant != "lightning",
                                         **variant_options(variant, heads, layer, layers, period))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, variant: str, period: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, variant, i, layers, period) for i in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(size: int, length: int, period: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    pattern = torch.randint(0, vocab, (size, period), generator=generator)
    return pattern.repeat(1, -(-length // period))[:, :length]


def train(variant: str, args: argparse.Namespace) -> List[float]:
    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.dim, args.heads, args.layers, variant, args.period).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.steps):
        tokens = batch(args.batch, args.seqlen + 1, args.period, args.vocab, g).to(args.device)
        logits = model(tokens[:, :-1])
        # score only the predictable part: after the first period
        loss = nn.functional.cross_entropy(logits[:, args.period:].reshape(-1, args.vocab),
                                           tokens[:, args.period + 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"{variant:>15} step {step:4d}  loss {loss.item():.3f}")
    return losses


def pyplot():
    """matplotlib.pyplot (non-interactive backend), or None with a note on how to get it:
    the plot is optional, the training and the printed losses are not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plot will be saved; install it with "
              "pip install -e '.[plot]' in the attnkit checkout (or pip install matplotlib), or pass --plot '' "
              "to skip the plot")
        return None
    return plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="all", help=f"one of {VARIANTS} or 'all'")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--period", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--plot", default="loss_curves.png", help="where to save the plot ('' to skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    plt = pyplot() if args.plot else None  # said before training, not after it
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    curves = {}
    for variant in variants:
        start = time.perf_counter()
        curves[variant] = train(variant, args)
        print(f"{variant:>15} done in {time.perf_counter() - start:.1f} s, final loss {curves[variant][-1]:.3f}")
    print("\nfinal loss (mean of the last 20 steps):")
    for variant, losses in curves.items():
        print(f"  {variant:<15} {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, losses in curves.items():
            ax.plot(losses, label=variant)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (predictable tokens)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
