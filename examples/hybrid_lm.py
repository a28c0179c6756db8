"""A tiny hybrid language model: gated linear layers and a softmax layer, trained on CPU, then
generating with each layer's own decoding cache.

Today's hybrid models interleave a few softmax-attention layers with many linear ones
(gated linear attention, the gated delta rule) at 3:1 to 6:1. This model does that at toy
size with ``attnkit.nn.Attention`` blocks: by default three GLA layers and one causal flash
layer (``--pattern``). A linear block computes its gates from its input (GLA's low-rank
logsigmoid gates, Mamba-2's scalar gates, the delta rule's sigmoid beta: see the block's
docstring) and decodes with its recurrent state, (B, H, Dk, Dv) float32, constant memory;
the flash block decodes with a growing KV cache.

The script trains a character-level model on a short built-in text, checks that the loss
went down, then generates greedily twice from the same prompt: once with one cache per
layer (prefill, then one token per step) and once recomputing the whole sequence at every
step with no cache; the tokens must be equal and the logits close::

    python examples/hybrid_lm.py                                   # gla,gla,gla,flash, 300 steps
    python examples/hybrid_lm.py --pattern delta_rule,delta_rule,delta_rule,flash
    python examples/hybrid_lm.py --pattern simple_gla,deltanet,gla,flash --steps 500
    python examples/hybrid_lm.py --fast                            # a few steps (the test)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import attnkit

#: the layer types of --pattern: the options of their attnkit.nn.Attention block
LAYERS: dict[str, dict] = {
    "gla": {"variant": "gla", "gate": "channel"},                 # GLA: per-channel low-rank logsigmoid gates
    "simple_gla": {"variant": "gla", "gate": "scalar"},           # Mamba-2/SSD: one gate per token and head
    "delta_rule": {"variant": "delta_rule", "gate": "scalar"},    # GatedDeltaNet
    "deltanet": {"variant": "delta_rule", "gate": "none"},        # DeltaNet (no decay)
    "lightning": {"variant": "lightning"},                        # fixed per-head decays
    "flash": {"variant": "flash", "causal": True, "rope": True},  # softmax attention
}

TEXT = (
    "The quick brown fox jumps over the lazy dog. A linear layer keeps a state of fixed size and "
    "forgets through its gates; a softmax layer keeps every key and looks back exactly. "
    "Hybrid models put a few softmax layers among many linear ones, so that the state stays small "
    "and recall stays sharp. The quick brown fox jumps over the lazy dog again, and again. "
)


class HybridLM(nn.Module):
    """Token embedding, one residual block per entry of ``pattern`` (RMSNorm, attention,
    RMSNorm, MLP), a tied output head. ``forward(tokens (B, N), caches=None) -> logits
    (B, N, vocab)``; ``caches``: one decoding cache per layer (``new_caches``)."""

    def __init__(self, vocab: int, pattern: Sequence[str], dim: int = 64, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)  # the tied head's logits start near unit scale
        self.layers = nn.ModuleList()
        for i, kind in enumerate(pattern):
            self.layers.append(nn.ModuleDict({
                "norm1": nn.RMSNorm(dim), "norm2": nn.RMSNorm(dim),
                "attn": attnkit.nn.Attention(dim, heads, layer_idx=i, num_layers=len(pattern), **LAYERS[kind]),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))}))
        self.norm = nn.RMSNorm(dim)

    def new_caches(self) -> list:
        """One empty decoding cache per layer, each of its own kind (state, KV)."""
        return [layer["attn"].new_cache() for layer in self.layers]

    def forward(self, tokens: torch.Tensor, caches: Sequence | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = x + layer["attn"](layer["norm1"](x), cache=None if caches is None else caches[i])
            x = x + layer["mlp"](layer["norm2"](x))
        return self.norm(x) @ self.embed.weight.T


def train(model: HybridLM, data: torch.Tensor, steps: int, batch: int, seqlen: int, lr: float) -> list[float]:
    """Next-character prediction on random windows of ``data``; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seqlen - 1, (batch,)).tolist()
        window = torch.stack([data[s:s + seqlen + 1] for s in starts])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def generate(model: HybridLM, prompt: torch.Tensor, steps: int, cached: bool) -> tuple[list[int], torch.Tensor]:
    """Greedy generation from prompt (N,): with a cache per layer (prefill, then one token per
    step) or recomputing the whole sequence at every step. Returns the tokens and the logits
    (steps, vocab) each token was chosen from."""
    tokens, chosen_from = prompt.tolist(), []
    caches = model.new_caches() if cached else None
    logits = model(prompt[None], caches)[0, -1]
    for _ in range(steps):
        chosen_from.append(logits)
        tokens.append(int(logits.argmax()))
        step = torch.tensor([tokens[-1:]] if cached else [tokens], device=prompt.device)
        logits = model(step, caches)[0, -1]
    return tokens[len(prompt):], torch.stack(chosen_from)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="gla,gla,gla,flash",
                        help=f"comma-separated layer types, one per layer, from {sorted(LAYERS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--generate", type=int, default=48, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads: a model this small gains little from more and loses much on a busy CPU")
    parser.add_argument("--fast", action="store_true", help="a short run (15 steps, 12 tokens): the test's")
    args = parser.parse_args(argv)
    pattern = [kind.strip() for kind in args.pattern.split(",") if kind.strip()]
    unknown = [kind for kind in pattern if kind not in LAYERS]
    if not pattern or unknown:
        parser.error(f"--pattern: unknown layer type(s) {unknown} (got {args.pattern!r}); "
                     f"the types are {sorted(LAYERS)}")
    if args.fast:
        args.steps, args.generate = 15, 12

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = sorted(set(TEXT))
    data = torch.tensor([vocab.index(c) for c in TEXT], device=args.device)
    model = HybridLM(len(vocab), pattern, args.dim, args.heads).to(args.device)
    print(f"layers: {' '.join(pattern)}  ({sum(p.numel() for p in model.parameters())} parameters)")

    start = time.perf_counter()
    losses = train(model, data, args.steps, args.batch, args.seqlen, args.lr)
    window = max(1, min(10, args.steps // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: loss {first:.3f} -> {last:.3f}")
    if not last < first:
        print("FAILED: the loss did not decrease")
        return 1
    print("loss decreased")

    model.eval()
    prompt = data[:12]
    with_cache, cache_logits = generate(model, prompt, args.generate, cached=True)
    without, full_logits = generate(model, prompt, args.generate, cached=False)
    text = "".join(vocab[i] for i in prompt.tolist() + with_cache)
    print(f"generated: {text!r}")
    if with_cache != without:
        print(f"FAILED: the cached generation {with_cache} differs from the no-cache generation {without}")
        return 1
    torch.testing.assert_close(cache_logits, full_logits, rtol=1e-4, atol=1e-4)
    print("cached generation equals the no-cache generation (tokens equal, logits close)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
