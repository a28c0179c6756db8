"""The distributed tests' one harness: a spawned gloo group that runs a test module's checks.

A test module defines ``CHECKS`` ({name: check(rank, world)}, or check(rank) with
``with_world=False``); :func:`run_group` spawns ``world`` ranks on 127.0.0.1 that import
the module, join one gloo group and run the checks in order, each rank writing its outcome
per check (after every check, so a group that hangs still reports what ran). Start-up
(importing torch in W processes) dominates the time, so a module runs all its checks in
one group. A rank left waiting in a collective fails after ``group_timeout_s`` (gloo's
timeout); the parent kills any rank still alive at ``deadline_s``. Workers end as
docs/distributed.md says: barrier, destroy the group, ``os._exit(0)``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import pathlib
import socket
import time
import traceback
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: (results per rank: {check: {"ok", "message" | "error", "s"}}, what went wrong with the
#: group as a whole: "" when it ended normally)
GroupResults = tuple[list[dict], str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, module: str, names: Optional[list],
            group_timeout_s: float, with_world: bool) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    path = pathlib.Path(outdir) / f"rank{rank}.json"
    try:
        checks = importlib.import_module(module).CHECKS
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        for name in names or list(checks):
            start = time.perf_counter()
            try:
                message = checks[name](rank, world) if with_world else checks[name](rank)
                results[name] = {"ok": True, "message": message, "s": time.perf_counter() - start}
            except Exception:  # noqa: BLE001 -- every failure of a check is reported by its test
                results[name] = {"ok": False, "error": traceback.format_exc()}
            path.write_text(json.dumps(results))
    except Exception:  # noqa: BLE001 -- reported by every test
        results["<setup>"] = {"ok": False, "error": traceback.format_exc()}
    finally:
        path.write_text(json.dumps(results))
        try:
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        finally:
            os._exit(0)


def run_group(module: str, world: int, outdir: pathlib.Path, *, deadline_s: float, group_timeout_s: float,
              names: Optional[Sequence[str]] = None, with_world: bool = True) -> GroupResults:
    """Run ``module``'s checks (all, or ``names``) on a ``world``-rank gloo group."""
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(outdir), module,
                                            list(names) if names else None, group_timeout_s, with_world),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    trouble = ""
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                trouble = f"the {world}-rank group did not finish in {deadline_s} s"
                break
    except mp.ProcessExitedException as exc:  # a rank crashed (e.g. gloo aborted it)
        trouble = str(exc)
    finally:
        for p in ctx.processes:  # only the processes this group started
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for r in range(world):
        path = outdir / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results, trouble


def assert_check(group: GroupResults, check: str, *, same_message: bool = False) -> None:
    """Check ``check`` passed on every rank (and, with ``same_message``, returned the same
    message everywhere: the same error text on every rank)."""
    results, trouble = group
    for rank, per_rank in enumerate(results):
        assert "<setup>" not in per_rank, per_rank["<setup>"]["error"]
        outcome = per_rank.get(check)
        assert outcome is not None, f"rank {rank} did not finish {check} ({trouble or 'no result'})"
        assert outcome["ok"], f"rank {rank}:\n{outcome['error']}"
    if same_message:
        messages = [per_rank[check]["message"] for per_rank in results]
        assert all(m == messages[0] for m in messages), f"ranks raised different errors: {messages}"
