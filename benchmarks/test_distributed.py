"""Context parallelism on 2+ GPUs: every scheme of attnkit.distributed against ring
attention and torch's ``context_parallel`` on the same shards.

One NCCL group over all the GPUs of the machine (one process per GPU, spawned by the
module's fixture: run it with plain pytest, not torchrun) times every case once; each
test then reports one (scheme, N, heads, mode) row. Without 2+ GPUs every test is
skipped with that reason.

Schemes (each on the layout it is built for; q, k, v are shards of the same whole
tensors, B = 1, Hq = 32, D = Dv = 128, bf16, causal):

* ``ring`` - ``ring_attention``, zigzag: the baseline of the ``vs_ring`` ratio.
* ``token_ring`` - ``token_ring_attention``, zigzag.
* ``ulysses`` - ``ulysses_attention`` (flash), contiguous.
* ``usp`` - ``usp_attention`` on a (W/2) x 2 (ulysses x ring) mesh, zigzag over the ring.
* ``lasp2h`` - ``lasp2h_attention``, contiguous.
* ``windowed_ring`` - ``ring_attention(window=4096, sinks=4, layout="contiguous")``: a
  sliding-window layer, not the same attention (less work), timed beside the full ring.
* ``star`` - ``star_attention`` (inference: forward only), contiguous blocks of the
  context, anchor of one block, 128 query tokens after it.
* ``torch_cp`` - ``F.scaled_dot_product_attention`` under
  ``torch.distributed.tensor.experimental.context_parallel`` on a 1-D mesh (its own
  ring; its load balancer shards head-and-tail, as zigzag). Its ring takes no GQA: with
  Hkv < Hq its K/V are expanded to Hq heads (Hq/Hkv times the ring's K/V bytes), so the
  Hkv = Hq rows are the like-for-like comparison.

``benchmark.extra_info``: ``ms`` (median over the timed runs of the slowest rank, CUDA
events), ``vs_ring`` (ring's ms / this ms: > 1 is faster than the ring), ``vs_torch_cp``,
``tflops`` (the causal pairs of the whole sequence over all GPUs together). A scheme that
is not available (a torch without ``context_parallel``) is skipped with the reason; one
that fails on the GPUs fails its test with the rank's traceback. pytest-benchmark's own
table times only the report (the timing ran in the spawned group).
Run: ``python -m pytest benchmarks/test_distributed.py --benchmark-only``.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import attention_flops, causal_pairs

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason=f"context parallelism needs 2+ GPUs, found {GPUS}")

SCHEMES = ["ring", "token_ring", "ulysses", "usp", "lasp2h", "windowed_ring", "star", "torch_cp"]
SEQLENS = [32768, 131072]             # tokens of the whole sequence
HEADS_KV = [8, 32]
MODES = ["fwd", "fwd+bwd"]
HEADS_Q, HEAD_DIM, DTYPE = 32, 128, torch.bfloat16
WINDOW, SINKS, STAR_QUERY = 4096, 4, 128
WARMUP, REPS = 3, 10
DEADLINE_S = 3600                     # the whole group, every case


# --------------------------------------------------------------------------- one rank

def _shards(scheme: str, n: int, hkv: int, device, mesh):
    """This rank's q, k, v (requires_grad) for ``scheme``: the shards of one whole
    (1, H, n, D) q, k, v drawn from the same seed on every rank."""
    import attnkit.distributed as akd

    g = torch.Generator(device=device).manual_seed(0)
    whole = [torch.randn(1, h, n, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
             for h in (HEADS_Q, hkv, hkv)]
    if scheme == "torch_cp":          # context_parallel shards the whole tensors itself
        return whole
    if scheme == "star":              # context blocks, then the query tokens after the context
        context = [t[:, :, :n - STAR_QUERY] for t in whole]
        blocks = [akd.shard_sequence(t, layout="contiguous") for t in context]
        return [torch.cat([b, t[:, :, n - STAR_QUERY:]], dim=2) for b, t in zip(blocks, whole)]
    layout = {"ring": "zigzag", "token_ring": "zigzag", "usp": "zigzag"}.get(scheme, "contiguous")
    group = mesh if scheme == "usp" else None
    return [akd.shard_sequence(t, layout=layout, group=group).detach().requires_grad_(True) for t in whole]


def _call(scheme: str, q, k, v, mesh, cp_mesh):
    """A zero-argument callable running one forward of ``scheme`` on the shards."""
    import attnkit.distributed as akd

    if scheme == "ring":
        return lambda: akd.ring_attention(q, k, v, layout="zigzag", causal=True)
    if scheme == "token_ring":
        return lambda: akd.token_ring_attention(q, k, v, None, causal=True, layout="zigzag")
    if scheme == "ulysses":
        return lambda: akd.ulysses_attention(q, k, v, variant="flash", causal=True)
    if scheme == "usp":
        return lambda: akd.usp_attention(q, k, v, mesh, causal=True, layout="zigzag")
    if scheme == "lasp2h":
        return lambda: akd.lasp2h_attention(q, k, v, None, causal=True)
    if scheme == "windowed_ring":
        return lambda: akd.ring_attention(q, k, v, layout="contiguous", causal=True, window=WINDOW, sinks=SINKS)
    if scheme == "star":
        return lambda: akd.star_attention(q, k, v, None, anchor_len=q.shape[2] - STAR_QUERY, query_len=STAR_QUERY)
    if scheme == "torch_cp":
        return _torch_cp_call(q, k, v, cp_mesh)
    raise ValueError(f"unknown scheme {scheme!r}")


def _torch_cp_call(q, k, v, cp_mesh):
    """SDPA under torch's context_parallel: the buffers are sharded in place on entry (once,
    outside the timed calls); inside, SDPA runs torch's ring attention."""
    from torch.distributed.tensor.experimental import context_parallel

    reps = HEADS_Q // k.shape[1]
    k, v = (t.repeat_interleave(reps, dim=1) if reps > 1 else t for t in (k, v))
    q, k, v = (t.detach().contiguous() for t in (q, k, v))
    cm = context_parallel(cp_mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v})
    cm.__enter__()                    # shards q, k, v in place (kept sharded); left by call.exit
    for t in (q, k, v):               # leaves from here on (the in-place sharding is not a graph op)
        t.requires_grad_(True)

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    call.exit = lambda: cm.__exit__(None, None, None)
    return call


def _time(fn, device) -> float:
    """Median ms of ``fn`` on this rank after a barrier per run (all ranks start together)."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _case(scheme: str, n: int, hkv: int, mode: str, device, mesh, cp_mesh) -> float:
    q, k, v = _shards(scheme, n, hkv, device, mesh)
    call = _call(scheme, q, k, v, mesh, cp_mesh)
    try:
        if mode == "fwd":
            with torch.no_grad():
                ms = _time(call, device)
        else:
            grad = None

            def step():
                nonlocal grad
                out = call()
                if grad is None:
                    grad = torch.randn_like(out)
                out.backward(grad)

            ms = _time(step, device)
    finally:
        getattr(call, "exit", lambda: None)()
    slowest = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def cases() -> list[tuple[str, int, int, str]]:
    return [(s, n, h, m) for s in SCHEMES for n in SEQLENS for h in HEADS_KV for m in MODES
            if not (s == "star" and m != "fwd")]


def _unavailable(scheme: str, world: int) -> str | None:
    """Why ``scheme`` cannot run here (the same answer on every rank), or None."""
    import attnkit.distributed as akd

    if scheme == "torch_cp":
        try:
            from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
        except ImportError as exc:
            return f"torch {torch.__version__} has no context_parallel ({exc})"
    name = {"usp": "usp_attention", "lasp2h": "lasp2h_attention", "token_ring": "token_ring_attention",
            "star": "star_attention"}.get(scheme)
    if name and not hasattr(akd, name):
        return f"attnkit.distributed has no {name}"
    if scheme == "usp" and (world < 4 or world % 2):
        return f"USP needs a (W/2) x 2 mesh with W/2 >= 2: {world} GPUs"
    if scheme == "ulysses" and HEADS_Q % world:
        return f"Ulysses needs Hq = {HEADS_Q} divisible by W = {world}"
    return None


def worker(rank: int, world: int, port: int, outdir: str, backend: str = "nccl") -> None:
    """One rank of the timing group: every case, the slowest rank's ms written by rank 0."""
    results = {}
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600), device_id=device if backend == "nccl" else None)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // 2, 2), mesh_dim_names=("ulysses", "ring")) \
            if world >= 4 and world % 2 == 0 else None
        cp_mesh = init_device_mesh(device.type, (world,))
        for scheme, n, hkv, mode in cases():
            key = f"{scheme}-{n}-{hkv}-{mode}"
            why = _unavailable(scheme, world)
            if why is not None:
                results[key] = {"skip": why}
                continue
            try:
                results[key] = {"ms": _case(scheme, n, hkv, mode, device, mesh, cp_mesh)}
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                results[key] = {"skip": "out of memory at this length"}
            except Exception:
                results[key] = {"error": traceback.format_exc()}
                # a rank that failed may have left a collective: the other ranks would wait in it
                raise
    except Exception:  # noqa: BLE001 - reported by every test
        results["<setup>"] = {"error": traceback.format_exc()}
    finally:
        if rank == 0 or "<setup>" in results:
            (pathlib.Path(outdir) / f"rank{rank}.json").write_text(json.dumps(results))
        try:
            if dist.is_initialized() and "<setup>" not in results:
                dist.barrier()
                dist.destroy_process_group()
        finally:
            os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, outdir: pathlib.Path, backend: str = "nccl") -> dict:
    ctx = mp.start_processes(worker, args=(world, _free_port(), str(outdir), backend), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world}-GPU group did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:      # only the processes this test started
            if p.is_alive():
                p.kill()
                p.join(5)
    results = {}
    for path in sorted(outdir.glob("rank*.json")):
        results.update(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module")
def timings(tmp_path_factory):
    return run_group(GPUS, tmp_path_factory.mktemp("distributed_bench"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads_kv", HEADS_KV)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_distributed(benchmark, timings, scheme, seqlen, heads_kv, mode):
    if scheme == "star" and mode != "fwd":
        pytest.skip("star_attention is inference only (forward)")
    assert "<setup>" not in timings, timings["<setup>"]["error"]
    result = timings.get(f"{scheme}-{seqlen}-{heads_kv}-{mode}")
    if result is None:
        pytest.fail("the group stopped before this case (an earlier case failed: see its test)")
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, result["error"]
    ms = result["ms"]
    info = {"provider": scheme, "world": GPUS, "seqlen": seqlen, "heads_kv": heads_kv, "mode": mode, "ms": ms}
    for base in ("ring", "torch_cp"):
        other = timings.get(f"{base}-{seqlen}-{heads_kv}-{mode}", {})
        if "ms" in other:
            info[f"vs_{base}"] = other["ms"] / ms
    if scheme not in ("windowed_ring", "star"):
        flops = HEADS_Q * attention_flops(causal_pairs(seqlen, seqlen), HEAD_DIM, HEAD_DIM, mode)
        info["tflops"] = flops / ms / 1e9
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
