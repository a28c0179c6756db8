"""Batched generation with a paged KV cache: requests of different lengths join and leave.

A tiny decoder-only model (``attnkit.nn.Attention`` blocks with RoPE and GQA) serves a
queue of requests the way an inference server does: each layer owns an
``attnkit.PagedKVCache``; a request that arrives is prefilled on its own, then decodes
one token per step together with every other running request through
``attnkit.decode_attention`` (paged, one length per sequence); a request that is done
frees its pages, which the next requests reuse. The pool is kept small on purpose.

Every generated sequence is checked against the model run on the whole sequence without
any cache (greedy tokens equal, logits close).

    python examples/generate.py            # CPU: the PyTorch reference; GPU: the Triton kernels
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

import attnkit


class TinyLM(nn.Module):
    """Embedding, ``layers`` x (norm, attention, norm, MLP), tied output head."""

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 variant: str = "flash", **variant_options):
        super().__init__()
        options = dict(causal=True) if variant == "flash" else {}
        options.update(variant_options)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=nn.LayerNorm(dim), norm2=nn.LayerNorm(dim),
                attn=attnkit.nn.Attention(dim, heads, kv_heads, variant=variant, rope=True, **options),
                mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)))))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, caches: Optional[Sequence] = None) -> torch.Tensor:
        """tokens (B, N) -> logits (B, N, vocab); ``caches``: one decoding cache per layer."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = x + block["attn"](block["norm1"](x), cache=None if caches is None else caches[i])
            x = x + block["mlp"](block["norm2"](x))
        return self.norm(x) @ self.embed.weight.T


@torch.no_grad()
def generate_full(model: TinyLM, prompt: Sequence[int], steps: int) -> List[int]:
    """Greedy generation recomputing the whole sequence at every step (no cache): the baseline."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


@torch.no_grad()
def generate_cached(model: TinyLM, prompt: Sequence[int], steps: int, caches: Sequence) -> List[int]:
    """Greedy generation with one decoding cache per layer: prefill, then one token per step."""
    logits = model(torch.tensor([list(prompt)]), caches)
    out = []
    for _ in range(steps):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), caches)
    return out


@dataclass
class Request:
    prompt: List[int]
    max_new_tokens: int
    output: List[int] = field(default_factory=list)
    seq_id: int = -1


@torch.no_grad()
def serve(model: TinyLM, requests: List[Request], *, num_pages: int, page_size: int, max_batch: int) -> dict:
    """Run every request to completion with continuous batching over paged KV caches.

    Returns statistics: decode steps, the largest batch, and how many times a page was reused.
    """
    first = model.blocks[0]["attn"]
    dtype = model.embed.weight.dtype
    device = model.embed.weight.device
    caches = [attnkit.PagedKVCache(num_pages, page_size, first.num_kv_heads, first.head_dim, dtype=dtype,
                                   device=device) for _ in model.blocks]
    waiting, running = list(requests), []
    stats = dict(steps=0, largest_batch=0, pages_taken=0)

    def pages_for(req: Request) -> int:
        return -(-(len(req.prompt) + req.max_new_tokens) // page_size)

    while waiting or running:
        # admit requests while the pool can hold them to the end
        while waiting and len(running) < max_batch and \
                sum(pages_for(r) for r in running) + pages_for(waiting[0]) <= num_pages:
            req = waiting.pop(0)
            ids = {cache.add_sequence() for cache in caches}
            req.seq_id = ids.pop()                            # every layer hands out the same ids
            stats["pages_taken"] += pages_for(req)
            views = [attnkit.nn.PagedCache(cache, [req.seq_id]) for cache in caches]
            logits = model(torch.tensor([req.prompt], device=device), views)   # prefill on its own
            req.output.append(int(logits[0, -1].argmax()))
            running.append(req)
        # one decoding step for every running request, then let the finished ones go
        views = [attnkit.nn.PagedCache(cache, [r.seq_id for r in running]) for cache in caches]
        tokens = torch.tensor([[r.output[-1]] for r in running], device=device)
        unfinished = [r for r in running if len(r.output) < r.max_new_tokens]
        if unfinished:
            logits = model(tokens, views)
            for row, req in enumerate(running):
                if len(req.output) < req.max_new_tokens:
                    req.output.append(int(logits[row, -1].argmax()))
            stats["steps"] += 1
            stats["largest_batch"] = max(stats["largest_batch"], len(running))
        for req in [r for r in running if len(r.output) >= r.max_new_tokens]:
            running.remove(req)
            for cache in caches:
                cache.free(req.seq_id)
    stats["pool_pages"] = num_pages
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = TinyLM().eval()
    g = torch.Generator().manual_seed(args.seed)
    requests = [Request(torch.randint(0, 64, (int(n),), generator=g).tolist(), int(m))
                for n, m in zip(torch.randint(3, 40, (args.requests,), generator=g),
                                torch.randint(2, 12, (args.requests,), generator=g))]
    stats = serve(model, requests, num_pages=12, page_size=16, max_batch=3)
    ok = True
    for i, req in enumerate(requests):
        expected = generate_full(model, req.prompt, req.max_new_tokens)
        same = expected == req.output
        ok &= same
        print(f"request {i}: prompt {len(req.prompt):2d} tokens, {req.max_new_tokens:2d} generated, "
              f"{'equal to' if same else 'DIFFERENT from'} the full-sequence run")
    print(f"{stats['steps']} decoding steps, up to {stats['largest_batch']} sequences at once, "
          f"{stats['pages_taken']} pages taken from a pool of {stats['pool_pages']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
