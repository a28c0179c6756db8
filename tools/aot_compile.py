"""Compile every Triton kernel attnkit launches for a GPU target, on a machine without a GPU.

Triton's interpreter runs the kernels on CPU but skips every GPU compile rule (tl.dot
shapes, types, register and shared-memory limits). This tool closes part of that gap:

1. ``record``: run the registered variants' examples (forward and backward) through the
   interpreter and record every kernel launch: the kernel, its argument types and its
   compile-time constants (``TRITON_INTERPRET=1`` is set for this step).
2. ``compile``: in a process without the interpreter, rebuild each launch for a CUDA
   target (default sm_90, Hopper) and compile it to a cubin with the ptxas that ships in
   the triton wheel — once per autotune config of the engine's tables — and check the
   shared memory each needs against the target's limit, and read ptxas's count of register
   spills. On a GPU the prune filter drops every config that spills; here a launch fails
   when none of its kept configs is spill-free.

    python tools/aot_compile.py                 # both steps, every variant, sm_90, every kept config
    python tools/aot_compile.py --dedupe --configs first-clean   # what CI runs
    python tools/aot_compile.py --variants flash --head-dim 128 --dedupe --dtypes float16,bfloat16 --report
        # a markdown table per kernel and kept config: registers, spills, shared memory, HGMMA, TMA

With ``--report`` the first kept forward config of flash at head dims 64 and 128 (the main
configs) must use Hopper's warpgroup MMA (HGMMA in the SASS, ``wgmma.mma_async`` in the
PTX when no cuobjdump is at hand), or the run fails.

A cubin is not a correctness proof (only a GPU run is), but a kernel that does not
compile here will not compile on the GPU either.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any

# --------------------------------------------------------------------------- recording


def _describe(value: Any) -> Any:
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).replace("torch.", ""))
    if value is None:
        return ("none",)
    if isinstance(value, tuple):  # a tuple argument (a variant's or a mod's arguments)
        return ("tuple", tuple(_describe(v) for v in value))
    if isinstance(value, tl.constexpr):
        return ("const", value.value)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value)
    if isinstance(value, str):
        return ("str", value)
    recipe = getattr(value, "attnkit_recipe", None)
    if recipe is not None:  # a generated hook (mask combinators, chained score mods): rebuild it from source
        source, name, namespace = recipe
        return ("generated", source, name, tuple(sorted((k, _describe(v)) for k, v in namespace.items())))
    fn = getattr(value, "fn", None)
    if fn is not None and callable(fn):  # a @triton.jit function passed as a constexpr
        return ("jit", fn.__module__, fn.__qualname__)
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def record(variants: list[str], out_path: str, dtypes: list[str]) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import attnkit
    from attnkit.testing import check_case

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        names = [p.name for p in params]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        constexpr = {p.name for p in params if "constexpr" in str(p.annotation)}
        desc = {name: _describe(values.get(name)) for name in names}
        entry = {"module": self.fn.__module__, "name": self.fn.__qualname__, "args": desc,
                 "constexpr": sorted(constexpr), "num_warps": kwargs.get("num_warps", 4)}
        launches.setdefault(json.dumps(entry, sort_keys=True), entry)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    for name in variants:
        for case in attnkit.get_variant(name).examples():
            for dtype in dtypes:
                check_case(name, case, dtype=getattr(torch, dtype), device="cpu", backend="triton")
    with open(out_path, "wb") as f:
        pickle.dump(list(launches.values()), f)
    print(f"recorded {len(launches)} distinct launches of {len(variants)} variants")


# --------------------------------------------------------------------------- compiling

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64", "int32": "*i32",
        "int64": "*i64", "bool": "*i1", "int8": "*i8", "uint8": "*u8"}


_GENERATED: dict[Any, Any] = {}


def _resolve(desc: Any) -> Any:
    import importlib

    kind = desc[0]
    if kind == "jit":
        return getattr(importlib.import_module(desc[1]), desc[2])
    if kind == "generated":
        if desc not in _GENERATED:
            from attnkit.mods.core import generate_jit

            _GENERATED[desc] = generate_jit(desc[1], desc[2], {k: _resolve(v) for k, v in desc[3]})
        return _GENERATED[desc]
    if kind == "tuple":
        return tuple(_resolve(d) for d in desc[1])
    return None if kind == "none" else desc[1]


def _signature(desc: Any, path: tuple, constexprs: dict) -> Any:
    """The Triton signature type of a runtime argument (a tuple of them for a tuple argument);
    its compile-time parts go into ``constexprs`` keyed by their path, as Triton's launcher does."""
    kind = desc[0]
    if kind == "tuple":
        return tuple(_signature(d, path + (i,), constexprs) for i, d in enumerate(desc[1]))
    if kind == "tensor":
        return _PTR[desc[1]]
    if kind in ("none", "const", "jit", "generated") or (kind == "int" and desc[1] == 1):
        constexprs[path] = _resolve(desc)  # None, constexprs, and ints equal to 1 are specialized
        return "constexpr"
    if kind == "int":
        return "i32" if -2**31 <= desc[1] < 2**31 else "i64"
    if kind == "float":
        return "fp32"
    if kind == "bool":
        return "i1"
    raise TypeError(f"an argument of kind {kind} cannot be compiled")


def _source(entry: dict, overrides: dict[str, Any]):
    import importlib

    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(entry["module"]), entry["name"])
    signature, constexprs = {}, {}
    for index, (name, desc) in enumerate(entry["args"].items()):
        if name in overrides or name in entry["constexpr"]:
            signature[name] = "constexpr"
            constexprs[(index,)] = overrides.get(name, _resolve(desc))
        else:
            signature[name] = _signature(desc, (index,), constexprs)
    return fn, ASTSource(fn=fn, signature=signature, constexprs=constexprs)


def _engine_configs(entry: dict, which: str, arch: int) -> list[dict]:
    """The autotune configs of an engine kernel that its prune filter keeps for this launch."""
    from attnkit.kernels.engine import configs

    kind = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}[entry["name"]]
    named = {name: _resolve(desc) for name, desc in entry["args"].items()}
    kept = configs.prune(configs.autotune_configs(kind), named, arch=arch)
    if which == "first":
        kept = kept[:1]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a Triton CompilationError chain, with the source excerpt of the frame above it."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    where = str(chain[-2]) if len(chain) > 1 else ""
    excerpt = "\n      ".join(where.splitlines()[-4:]) if where else ""
    return f"{type(chain[-1]).__name__}: {str(chain[-1])[:400]}" + (f"\n      {excerpt}" if excerpt else "")


def _code_path(entry: dict) -> str:
    """What selects a distinct code path of a launch: the kernel, its jit hooks and its
    non-numeric constants (flags, dot precision, compile-time and None entries of tuple
    arguments), and the dtype of its first tensor."""
    def shape_of(desc: Any) -> Any:  # a tuple argument's structure: which entries are constant or None
        if desc[0] == "tuple":
            return tuple(shape_of(d) for d in desc[1])
        return desc if desc[0] in ("const", "none", "jit", "generated") else desc[0]

    parts = [entry["module"], entry["name"]]
    for name, desc in sorted(entry["args"].items()):
        if name in entry["constexpr"] and desc[0] in ("jit", "generated", "bool", "str", "none"):
            parts.append(f"{name}={desc[:3]}")
        elif desc[0] == "tuple":
            parts.append(f"{name}={shape_of(desc)}")
    parts.append(next((d[1] for d in entry["args"].values() if d[0] == "tensor"), ""))
    return "|".join(parts)


def _launch_label(entry: dict) -> str:
    """The hooks, head dim and dtype of a launch, for reports."""
    args = entry["args"]
    hooks = [f"{n}={d[2]}" for n, d in sorted(args.items()) if d[0] in ("jit", "generated")]
    dims = [f"{n}={args[n][1]}" for n in ("HEAD_DIM", "HEAD_DIM_V") if n in args]
    dtype = next((d[1] for d in args.values() if d[0] == "tensor"), "")
    return "[" + " ".join(hooks + dims + [dtype]) + "]"


def _with_head_dim(entry: dict, head_dim: int) -> dict:
    """An engine launch rebuilt for another head dim (of Q/K and of V): strides are runtime arguments."""
    args = dict(entry["args"])
    for name in ("HEAD_DIM", "HEAD_DIM_V", "BLOCK_D", "BLOCK_DV"):
        args[name] = ("int", head_dim)
    return dict(entry, args=args)


def _registers(log: str) -> int:
    """Registers per thread ptxas reported in its verbose log (0 when it did not say)."""
    import re

    counts = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    return max(counts, default=0)


def _instructions(kernel: Any) -> dict[str, bool]:
    """Whether the compiled kernel uses Hopper's warpgroup MMA (HGMMA; ``wgmma.mma_async`` in
    PTX) and TMA loads (``cp.async.bulk.tensor`` in PTX). HGMMA is read from the SASS when
    cuobjdump can disassemble the cubin, else from the PTX."""
    ptx = kernel.asm.get("ptx", "")
    try:
        hgmma, source = "HGMMA" in kernel.asm["sass"], "sass"
    except Exception:  # noqa: BLE001 -- no cuobjdump: the PTX says as much for this instruction
        hgmma, source = "wgmma.mma_async" in ptx, "ptx"
    return {"hgmma": hgmma, "hgmma_source": source, "tma": "cp.async.bulk.tensor" in ptx}


def _is_main(entry: dict) -> bool:
    """A main config's launch: flash's forward at head dim 64 or 128, fp16 or bf16."""
    args = entry["args"]
    return (entry["name"] == "attn_fwd_kernel" and args.get("RANGE_FN", ("",))[-1] == "flash_kv_range"
            and args.get("SCORE_MOD") == ("none",) and args.get("MASK_MOD") == ("none",)
            and args.get("HEAD_DIM") in (("int", 64), ("int", 128)) and args.get("HEAD_DIM_V") == args.get("HEAD_DIM")
            and next((d[1] for d in args.values() if d[0] == "tensor"), "") in ("float16", "bfloat16"))


def _report_table(rows: list[dict]) -> str:
    """The markdown table of ``--report``."""
    lines = [("| kernel | launch | BLOCK_M x BLOCK_N | warps | stages | registers | spill bytes | shared memory (bytes) "
             "| HGMMA | TMA |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r["config"]
        tile = f"{cfg['BLOCK_M']} x {cfg['BLOCK_N']}" if "BLOCK_M" in cfg else "-"
        lines.append(f"| {r['kernel']} | {r['launch']} | {tile} | {cfg.get('num_warps', '-')} | "
                     f"{cfg.get('num_stages', '-')} | {r['registers']} | {r['spills']} | {r['shared']} | "
                     f"{'yes' if r['hgmma'] else 'no'} ({r['hgmma_source']}) | {'yes' if r['tma'] else 'no'} |")
    return "\n".join(lines)


def _spills(log: str) -> int:
    """Bytes of register spill stores ptxas reported in its verbose log (0 when none)."""
    import re

    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def compile_all(in_path: str, arch: int, which: str, dedupe: bool = False, head_dim: int | None = None,
                report: bool = False) -> int:
    """Compile the recorded launches; returns 1 when a launch fails to compile, exceeds
    shared memory, or (modes "all" and "first-clean") keeps no spill-free config, or (``report``)
    a main config (:func:`_is_main`) has no HGMMA. ``head_dim``: compile the engine launches at
    this head dim (the recorded examples' are small)."""
    import contextlib
    import io

    # a fresh cache: a cached kernel skips ptxas, whose log is where register spills show
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnkit-aot-")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (registers, spills) is printed: captured below
    from attnkit.kernels.engine import configs as engine_configs

    smem_limit = engine_configs.smem_limit(arch)
    with open(in_path, "rb") as f:
        launches = pickle.load(f)
    if head_dim is not None:
        launches = [_with_head_dim(e, head_dim) if "HEAD_DIM" in e["args"] else e for e in launches]
    if dedupe:
        launches = list({_code_path(e): e for e in launches}.values())
    if report:  # the main configs are checked at both head dims, whatever the examples recorded
        mains: dict[str, dict] = {}  # one flash forward launch per dtype
        for e in launches:
            if _is_main(_with_head_dim(e, 64)):
                mains.setdefault(next(d[1] for d in e["args"].values() if d[0] == "tensor"), e)
        launches += [_with_head_dim(e, d) for e in mains.values() for d in (64, 128)
                     if e["args"]["HEAD_DIM"] != ("int", d)]  # already there at that head dim
    rows: list[dict] = []
    target = GPUTarget("cuda", arch, 32)
    failures, spills, done = [], [], 0
    start = time.perf_counter()
    for entry in launches:
        engine = entry["name"] in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
        variants = _engine_configs(entry, "first" if which == "first" else "all", arch) if engine else \
            [{"num_warps": entry["num_warps"]}]
        clean = 0
        for position, cfg in enumerate(variants):
            options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
            overrides = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            label = f"{entry['name']} {_launch_label(entry)} {overrides} {options}"
            try:
                _, src = _source(entry, overrides)
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    kernel = triton.compile(src, target=target, options=options)
                done += 1
            except Exception as exc:  # noqa: BLE001 -- report every failure (its root cause), keep going
                failures.append(f"{label}: {_root_cause(exc)}")
                continue
            smem = kernel.metadata.shared
            if smem > smem_limit:
                failures.append(f"{label}: needs {smem} bytes of shared memory")
            spilled = _spills(log.getvalue())
            if report:
                found = _instructions(kernel)
                rows.append(dict(found, kernel=entry["name"], launch=_launch_label(entry), config=cfg,
                                 registers=_registers(log.getvalue()), spills=spilled, shared=smem))
                if position == 0 and _is_main(entry) and not found["hgmma"]:
                    failures.append(f"{label}: a main config without HGMMA (wgmma)")
            if spilled:  # on a GPU the prune filter drops this config
                spills.append(f"{label}: {spilled} bytes of register spill stores")
            else:
                clean += 1
                if which == "first-clean":
                    break
        if engine and which != "first" and clean == 0:
            failures.append(f"{entry['name']} {_launch_label(entry)}: every kept config spills "
                            "(the prune filter would keep the least-spilling one)")
    print(f"compiled {done} kernel configs for sm_{arch} in {time.perf_counter() - start:.0f} s; "
          f"{len(failures)} failures; {len(spills)} spilling configs (the engine's prune filter drops those on a "
          "GPU; other kernels' are listed)")
    for line in failures:
        print("  FAILED", line)
    for line in spills:
        print("  SPILLS", line)
    if report:
        print(f"\nStatic check, sm_{arch}, Triton {triton.__version__} (registers per thread and spills from ptxas -v; "
              "HGMMA from the SASS or PTX, TMA from the PTX):\n")
        print(_report_table(rows))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="all")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--configs", choices=("all", "first-clean", "first"), default="all",
                        help="engine autotune configs to compile: every one the static prune filter keeps "
                             "(spilling ones are reported: the GPU filter drops them), the kept ones in order "
                             "until one does not spill, or only the first")
    parser.add_argument("--dtypes", default="float16,float32", help="input dtypes of the recorded examples")
    parser.add_argument("--dedupe", action="store_true",
                        help="compile one launch per distinct code path (kernel, hooks, flags, dtype)")
    parser.add_argument("--step", choices=("both", "record", "compile"), default="both")
    parser.add_argument("--launches", default=None, help="the recorded launches (pickle)")
    parser.add_argument("--head-dim", type=int, default=None,
                        help="compile the engine launches at this head dim (Q/K and V) instead of the examples'")
    parser.add_argument("--report", action="store_true",
                        help="print a markdown table of every compiled kernel config (registers, spill bytes, shared "
                             "memory, HGMMA, TMA) and fail when a main config (flash forward, head dim 64/128) has "
                             "no HGMMA")
    args = parser.parse_args(argv)
    path = args.launches or os.path.join(tempfile.gettempdir(), "attnkit_launches.pkl")
    if args.step == "record":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        import attnkit

        record(attnkit.list_variants() if args.variants == "all" else args.variants.split(","), path,
               args.dtypes.split(","))
        return 0
    if args.step == "compile":
        return compile_all(path, args.arch, args.configs, args.dedupe, args.head_dim, args.report)
    env = dict(os.environ, TRITON_INTERPRET="1")
    base = [sys.executable, os.path.abspath(__file__), "--variants", args.variants, "--launches", path,
            "--dtypes", args.dtypes]
    subprocess.run(base + ["--step", "record"], check=True, env=env)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(base + ["--step", "compile", "--arch", str(args.arch), "--configs", args.configs]
                          + (["--dedupe"] if args.dedupe else []) + (["--report"] if args.report else [])
                          + (["--head-dim", str(args.head_dim)] if args.head_dim else []), check=False, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
