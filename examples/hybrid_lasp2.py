"""Train a tiny linear/softmax hybrid with sequence parallelism: LASP-2 + LASP-2H on gloo.

The model alternates linear-attention layers (:func:`attnkit.distributed.lasp2_linear_attention`,
one all-gather of D x Dv states per layer) with a softmax layer
(:func:`attnkit.distributed.lasp2h_attention`, one all-gather of K/V), so the whole model
uses one communication pattern: all-gathers forward, their reverse backward. Every rank
holds a contiguous shard of each sequence; its loss is the sum over its tokens divided by
the total number of tokens, and the parameter gradients are summed over the ranks (what
DDP/FSDP do) before each optimizer step.

The script trains the same model twice from the same seed — in one process (no process
group: the same functions run their one-rank path) and on ``--world`` gloo ranks on
127.0.0.1 — and checks that the losses and the final parameters agree::

    python examples/hybrid_lasp2.py                 # 2 ranks, 5 steps, CPU
    python examples/hybrid_lasp2.py --steps 20 --world 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from attnkit.distributed import lasp2_linear_attention, lasp2h_attention, shard_sequence


class Mixer(nn.Module):
    """One attention layer of the hybrid: "linear" (LASP-2) or "softmax" (LASP-2H, causal,
    optionally windowed). x (B, L, dim) is this rank's contiguous shard of the sequence."""

    def __init__(self, dim: int, heads: int, kind: str, window: int | None = None):
        super().__init__()
        self.heads, self.kind, self.window = heads, kind, window
        self.norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        # linear layers: a fixed per-head decay (lightning-style), a learnable one works the same
        self.register_buffer("decay", torch.linspace(0.05, 0.5, heads), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.kind == "linear":       # positive features keep the linear attention's sums stable
            o = lasp2_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, decay=self.decay)
        else:
            o = lasp2h_attention(q, k, v, None, causal=True, window=self.window)
        return x + self.out(o.transpose(1, 2).reshape(B, L, dim))


class Hybrid(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, window: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Mixer(dim, heads, "linear"), Mixer(dim, heads, "softmax", window),
                                     Mixer(dim, heads, "linear")])
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of random sequences (inputs, next-token targets), (B, N) each."""
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, args.vocab, (args.batch, args.seqlen + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def train(args: argparse.Namespace, world: int = 1) -> tuple[list[float], torch.Tensor]:
    """Train on this rank's shard; returns the global losses and the final parameters (flat)."""
    torch.manual_seed(0)
    model = Hybrid(args.vocab, args.dim, args.heads, args.window)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens, targets = data(args)
    if world > 1:               # this rank's contiguous shard (the layout LASP-2 and LASP-2H take)
        tokens, targets = (shard_sequence(t, layout="contiguous", dim=1) for t in (tokens, targets))
    losses = []
    for _ in range(args.steps):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / targets.numel() / world
        opt.zero_grad()
        loss.backward()
        total = loss.detach().clone()
        if world > 1:           # the gradient of the global loss is the sum of the ranks' shares
            for p in model.parameters():
                dist.all_reduce(p.grad)
            dist.all_reduce(total)
        opt.step()
        losses.append(total.item())
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        losses, params = train(args, world)
        if rank == 0:
            torch.save({"losses": losses, "params": params}, pathlib.Path(outdir) / "result.pt")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (must divide --seqlen)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=12, help="the softmax layer's sliding window")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    losses, params = train(args)
    for step, loss in enumerate(losses):
        print(f"one process   step {step:3d}  loss {loss:.5f}")
    with tempfile.TemporaryDirectory() as outdir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(args.world, port, args, outdir), nprocs=args.world, join=True,
                           start_method="spawn")
        result = torch.load(pathlib.Path(outdir) / "result.pt")
    for step, loss in enumerate(result["losses"]):
        print(f"{args.world} ranks       step {step:3d}  loss {loss:.5f}")
    loss_err = max(abs(a - b) for a, b in zip(losses, result["losses"]))
    param_err = (params - result["params"]).abs().max().item()
    print(f"max loss difference {loss_err:.2e}, max parameter difference {param_err:.2e}")
    if loss_err > 1e-4 or param_err > 1e-4:
        print(f"{args.world} ranks DIFFER from one process", file=sys.stderr)
        return 1
    print(f"{args.world} ranks equal one process")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
