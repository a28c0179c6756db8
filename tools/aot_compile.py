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
   when none of its kept configs is spill-free. Each launch is compiled with the
   specialization Triton's launcher would give it on a GPU (tensors 16-byte aligned, ints
   divisible by 16 marked so, ints equal to 1 constant), without which the compiler would
   neither vectorize nor pipeline the loads.

    python tools/aot_compile.py                 # both steps, every variant, sm_90, every kept config
    python tools/aot_compile.py --dedupe --configs first-clean --report main --full-head-dims 128 \
        --dtypes float16 --jobs 2          # what CI runs (tests/test_aot_compile.py)
    python tools/aot_compile.py --variants flash --head-dim 128 --dedupe --dtypes float16,bfloat16 --report
        # a markdown table with a row per kernel and kept config: registers, spills, shared memory, HGMMA, TMA
    python tools/aot_compile.py --external FILE.py:KERNEL --signature 'Q=*fp16,...,HEAD_DIM=128'
        # the same table for a kernel of another file (e.g. the Triton tutorial's fused attention)

The main launches — flash's forward, dK/dV and dQ kernels on whole blocks (causal and not,
no varlen, softcap, sinks, dropout or mods), fp16/bf16 at head dims 64 and 128 — are held to
more with ``--report``: every config the static prune filter keeps for them is compiled, and
the run fails when one spills (the tables must drop it at that head dim) or when the first
has no Hopper warpgroup MMA (HGMMA in the SASS, ``wgmma.mma_async`` in the PTX when no
cuobjdump is at hand).

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


def main_cases() -> list:
    """Flash problems that take the main code path of the engine's kernels (what a long-sequence
    benchmark runs): whole 128-row blocks (EVEN_M, EVEN_N), no varlen, softcap, sinks, dropout or
    mods, causal and not; recorded at head dim 64 and compiled at 64 and 128."""
    from attnkit.registry import Case

    shape = (1, 2, 128, 64)
    return [Case(shape, shape, shape, {"causal": causal}, name=f"main_causal={causal}") for causal in (False, True)]


def record(variants: list[str], out_path: str, dtypes: list[str]) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import attnkit
    from attnkit.testing import check_case, kernel_blockers

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
        if kwargs.get("num_stages") is not None:  # as launched (Triton's default, 3, otherwise)
            entry["num_stages"] = kwargs["num_stages"]
        launches.setdefault(json.dumps(entry, sort_keys=True), entry)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    for name in variants:
        cases = list(attnkit.get_variant(name).examples()) + (main_cases() if name == "flash" else [])
        for case in cases:
            for dtype in dtypes:
                if kernel_blockers(name, case, dtype=getattr(torch, dtype)):
                    continue  # a case the kernel declares it refuses (kernel_support) launches nothing
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


#: what Triton's launcher tells the compiler about a pointer aligned to 16 bytes or an int divisible by 16
_DIVISIBLE = [["tt.divisibility", 16]]


def _signature(desc: Any, path: tuple, constexprs: dict, attrs: dict) -> Any:
    """The Triton signature type of a runtime argument (a tuple of them for a tuple argument);
    its compile-time parts go into ``constexprs`` keyed by their path, and the divisibility the
    launcher would see into ``attrs``, as Triton's launcher does: every tensor is taken as
    16-byte aligned (as PyTorch's allocations are), an int as recorded (divisible by 16 or not).
    Without these hints the compiler can neither vectorize the loads nor pipeline them
    (``cp.async``), and the registers and shared memory would not be the GPU's."""
    kind = desc[0]
    if kind == "tuple":
        return tuple(_signature(d, path + (i,), constexprs, attrs) for i, d in enumerate(desc[1]))
    if kind == "type":  # an external kernel's argument, given as its Triton type
        if desc[1].startswith("*"):
            attrs[path] = _DIVISIBLE
        return desc[1]
    if kind == "tensor":
        attrs[path] = _DIVISIBLE
        return _PTR[desc[1]]
    if kind in ("none", "const", "jit", "generated") or (kind == "int" and desc[1] == 1):
        constexprs[path] = _resolve(desc)  # None, constexprs, and ints equal to 1 are specialized
        return "constexpr"
    if kind == "int":
        if desc[1] % 16 == 0:
            attrs[path] = _DIVISIBLE
        return "i32" if -2**31 <= desc[1] < 2**31 else "i64"
    if kind == "float":
        return "fp32"
    if kind == "bool":
        return "i1"
    raise TypeError(f"an argument of kind {kind} cannot be compiled")


def _kernel(entry: dict) -> Any:
    """The @triton.jit function of a launch (unwrapped from an autotuner or heuristics)."""
    import importlib

    from triton.runtime.autotuner import Autotuner, Heuristics

    module = _load_external(entry["path"], entry.get("arch", 90)) if "path" in entry else \
        importlib.import_module(entry["module"])
    fn = getattr(module, entry["name"])
    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn


def _source(entry: dict, overrides: dict[str, Any]):
    from triton.compiler import ASTSource

    fn = _kernel(entry)
    known = {n: d[1] for n, d in entry["args"].items() if d[0] in ("const", "int")}
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, desc) in enumerate(entry["args"].items()):
        if name in overrides or name in entry["constexpr"]:
            signature[name] = "constexpr"
            constexprs[(index,)] = overrides[name] if name in overrides else _resolve(desc)
        else:
            if desc[0] == "type":  # a block shape may name compile-time arguments: tensordesc<fp16[BLOCK_M,HEAD_DIM]>
                desc = ("type", _substitute(desc[1], {**known, **overrides}))
            signature[name] = _signature(desc, (index,), constexprs, attrs)
    return fn, ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _substitute(text: str, values: dict[str, Any]) -> str:
    import re

    return re.sub(r"[A-Za-z_]\w*", lambda m: str(values[m.group(0)]) if m.group(0) in values else m.group(0), text)


# --------------------------------------------------------------------------- external kernels


class _TargetDriver:
    """Stands in for the GPU driver while an external kernel file is imported: files written for a
    GPU ask it for the device and its target at import time (the Triton tutorials do)."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        raise RuntimeError("no GPU: nothing can be timed here")


_EXTERNAL: dict[str, Any] = {}


def _load_external(path: str, arch: int) -> Any:
    """Import a Python file holding a @triton.jit kernel, with the GPU queries it makes at import
    answered for ``arch`` (the driver's target; torch.cuda's capability and availability)."""
    import importlib.util
    from unittest import mock

    import torch
    from triton.runtime.driver import driver

    if path not in _EXTERNAL:
        name = "attnkit_external_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        previous = driver._active  # reset_active() would look for a real GPU driver
        driver.set_active(_TargetDriver(arch))
        try:
            with mock.patch.object(torch.cuda, "get_device_capability", lambda *a: divmod(arch, 10)), \
                    mock.patch.object(torch.cuda, "is_available", lambda: True):
                spec.loader.exec_module(module)
        finally:
            driver._active = previous
        _EXTERNAL[path] = module
    return _EXTERNAL[path]


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` outside brackets (a tensordesc type holds commas)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[<(" and 1 or (ch in "]>)" and -1 or 0)
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in parts + [current] if p.strip()]


def _literal(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return float(text)


def external_entry(spec: str, signature: str, arch: int) -> tuple[dict, list[dict]]:
    """The launch of an external kernel (``PATH:KERNEL``) and its configs: ``signature`` names each
    runtime argument's Triton type (``*fp16``, ``fp32``, ``tensordesc<fp16[BLOCK_M,HEAD_DIM]>``) and
    each compile-time argument's value; runtime arguments left out are ``i32`` ints divisible by 16
    (strides, sizes). The configs are the kernel's autotune configs (none: one launch, 4 warps)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"--external: expected PATH:KERNEL, got {spec!r}")
    module = _load_external(os.path.abspath(path), arch)
    kernel = getattr(module, name)
    fn = _kernel({"path": os.path.abspath(path), "name": name, "arch": arch})
    params = list(inspect.signature(fn.fn).parameters.values())
    names = [p.name for p in params]
    given = dict(item.split("=", 1) for item in _split_top(signature, ","))
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"--signature: {sorted(unknown)} are not arguments of {name} ({names})")
    constexpr = [p.name for p in params if "constexpr" in str(p.annotation)]
    args = {}
    for arg in names:
        if arg in constexpr:
            args[arg] = ("const", _literal(given[arg])) if arg in given else ("autotuned",)
        elif arg in given:  # an int value stands for a runtime int (1 is specialized, as the launcher does)
            value = given[arg]
            args[arg] = ("int", int(value)) if value.lstrip("-").isdigit() else ("type", value)
        else:
            args[arg] = ("int", 16)
    entry = {"path": os.path.abspath(path), "module": module.__name__, "name": name, "args": args,
             "constexpr": constexpr, "num_warps": 4, "arch": arch}
    configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in getattr(kernel, "configs", [])]
    return entry, configs


def _parse_configs(text: str) -> list[dict]:
    """``BLOCK_M=128,BLOCK_N=64,num_warps=4;...`` as a list of dicts."""
    return [{k.strip(): _literal(v.strip()) for k, v in (item.split("=", 1) for item in part.split(","))}
            for part in text.split(";") if part.strip()]


def compile_external(spec: str, signature: str, select: str | None, arch: int, jobs: int = 1) -> int:
    """Compile an external kernel (``--external``) at each of its autotune configs that matches one
    of ``select`` (all when None; a kernel without autotune configs is compiled at the ``select``
    configs themselves) and print the same table as ``--report``; returns 1 on a compile error."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnkit-aot-")
    import triton

    entry, configs = external_entry(spec, signature, arch)
    wanted = _parse_configs(select) if select else []
    if configs:
        configs = [c for c in configs if not wanted or any(all(c.get(k) == v for k, v in w.items()) for w in wanted)]
    else:
        configs = [dict({"num_warps": 4}, **w) for w in wanted] or [{"num_warps": 4}]
    missing = [a for a, d in entry["args"].items() if d == ("autotuned",) and not all(a in c for c in configs)]
    if missing:
        raise ValueError(f"--signature: give a value for the compile-time arguments {missing} of {entry['name']}")
    start = time.perf_counter()
    results = _run([(entry, [cfg], False) for cfg in configs], arch, jobs)
    rows, failures = [], []
    label = "[" + " ".join(f"{n}={d[1]}" for n, d in entry["args"].items() if d[0] == "const") + "]"
    for outcome in results:
        for r in outcome:
            if "error" in r:
                failures.append(f"{entry['name']} {r['config']}: {r['error']}")
            else:
                rows.append(dict(r, kernel=entry["name"], launch=label))
    print(f"compiled {len(rows)} configs of {spec} for sm_{arch} in {time.perf_counter() - start:.0f} s; "
          f"{len(failures)} failures")
    for line in failures:
        print("  FAILED", line)
    print(f"\nStatic check, sm_{arch}, Triton {triton.__version__}, {spec}:\n")
    print(_report_table(rows))
    return 1 if failures else 0


def _engine_configs(entry: dict, which: str, arch: int) -> list[dict]:
    """The autotune configs of an engine kernel that its prune filter keeps for this launch."""
    from attnkit.kernels.engine import configs

    kind = _ENGINE_KERNELS[entry["name"]]
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


_ENGINE_KERNELS = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}
#: the head dims the main launches are compiled at
MAIN_HEAD_DIMS = (64, 128)


def _launch_label(entry: dict) -> str:
    """The hooks, compile-time variant arguments (flash's causal flag), flags that are on, head dims
    and dtype of a launch, for reports."""
    args = entry["args"]
    hooks = [f"{n}={d[2]}" for n, d in sorted(args.items()) if d[0] in ("jit", "generated")]
    variant = args.get("VARIANT_ARGS")
    consts = ([f"VARIANT_ARGS=({','.join(str(d[1]) if d[0] == 'const' else d[0] for d in variant[1])})"]
              if variant and variant[0] == "tuple" and variant[1] else [])
    flags = [n for n, d in sorted(args.items()) if n in entry["constexpr"] and d == ("bool", True)]
    dims = [f"{n}={args[n][1]}" for n in ("HEAD_DIM", "HEAD_DIM_V") if n in args]
    dtype = next((d[1] for d in args.values() if d[0] == "tensor"), "")
    return "[" + " ".join(hooks + consts + flags + dims + [dtype]) + "]"


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


def _spills(log: str) -> int:
    """Bytes of register spill stores ptxas reported in its verbose log (0 when none)."""
    import re

    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def _instructions(kernel: Any) -> dict[str, Any]:
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
    """A main launch: flash's forward, dK/dV or dQ kernel on its main code path (:func:`main_cases`:
    whole blocks, no varlen, softcap, sinks, dropout or mods, causal or not) at a head dim of
    :data:`MAIN_HEAD_DIMS`, fp16 or bf16."""
    args = entry["args"]
    off = ("bool", False)
    return (entry["name"] in _ENGINE_KERNELS
            and args.get("RANGE_FN", ("",))[-1] in ("flash_kv_range", "flash_q_range")
            and all(args.get(n, ("none",)) == ("none",) for n in ("SCORE_MOD", "MASK_MOD", "POSITIONS", "LISTS"))
            and all(args.get(n, off) == off for n in ("VARLEN", "HAS_SOFTCAP", "HAS_SINK", "DROPOUT"))
            and args.get("EVEN_M") == ("bool", True) and args.get("EVEN_N") == ("bool", True)
            and args.get("HEAD_DIM") in [("int", d) for d in MAIN_HEAD_DIMS]
            and args.get("HEAD_DIM_V") == args["HEAD_DIM"]
            and next((d[1] for d in args.values() if d[0] == "tensor"), "") in ("float16", "bfloat16"))


def _config_label(cfg: dict) -> str:
    tile = f"{cfg['BLOCK_M']} x {cfg['BLOCK_N']}" if "BLOCK_M" in cfg else "-"
    extra = [f"{k}={v}" for k, v in sorted(cfg.items()) if k not in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")]
    return " ".join([tile] + extra)


def _report_table(rows: list[dict]) -> str:
    """The markdown table of ``--report``: one row per compiled config."""
    lines = [("| kernel | launch | BLOCK_M x BLOCK_N | warps | stages | registers | spill bytes "
              "| shared memory (bytes) | HGMMA | TMA |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r["config"]
        lines.append(f"| {r['kernel']} | {r['launch']} | {_config_label(cfg)} | {cfg.get('num_warps', '-')} | "
                     f"{cfg.get('num_stages', '-')} | {r['registers']} | {r['spills']} | {r['shared']} | "
                     f"{'yes' if r['hgmma'] else 'no'} ({r['hgmma_source']}) | {'yes' if r['tma'] else 'no'} |")
    return "\n".join(lines)


def _compile_launch(entry: dict, cfgs: list[dict], stop_at_clean: bool, arch: int) -> list[dict]:
    """Compile one launch at each config in turn (stopping after the first spill-free one when
    ``stop_at_clean``); one result per config: ``error``, or registers, spills, shared memory and
    instructions. Runs in a worker process when ``--jobs`` > 1."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (registers, spills) is printed: captured below
    results = []
    for cfg in cfgs:
        options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
        overrides = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        try:
            _, src = _source(entry, overrides)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:  # noqa: BLE001 -- report every failure (its root cause), keep going
            results.append({"config": cfg, "error": _root_cause(exc)})
            continue
        spilled = _spills(log.getvalue())
        results.append(dict(_instructions(kernel), config=cfg, registers=_registers(log.getvalue()), spills=spilled,
                            shared=kernel.metadata.shared))
        if stop_at_clean and not spilled:
            break
    return results


def _run(units: list[tuple[dict, list[dict], bool]], arch: int, jobs: int) -> list[list[dict]]:
    """:func:`_compile_launch` of each (launch, configs, stop at the first spill-free one), in
    ``jobs`` processes when more than one."""
    from concurrent.futures import ProcessPoolExecutor

    if jobs <= 1:
        return [_compile_launch(entry, cfgs, stop, arch) for entry, cfgs, stop in units]
    with ProcessPoolExecutor(jobs) as pool:  # the largest units first, for an even spread
        order = sorted(range(len(units)), key=lambda i: -len(units[i][1]))
        futures = {i: pool.submit(_compile_launch, *units[i], arch) for i in order}
        return [futures[i].result() for i in range(len(units))]


def judge(entry: dict, outcome: list[dict], *, is_main: bool, check_clean: bool, smem_limit: int) -> dict:
    """The failures and the (tolerated) spills of one launch's compiled configs, in order:
    a compile error, more shared memory than ``smem_limit``; for a main launch, a spill in any
    kept config or no HGMMA in the first; for an engine launch with ``check_clean``, no
    spill-free config at all (the prune filter would have to keep a spilling one)."""
    failures, spills, clean = [], [], 0
    for position, r in enumerate(outcome):
        cfg = r["config"]
        options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
        overrides = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        label = f"{entry['name']} {_launch_label(entry)} {overrides} {options}"
        if "error" in r:
            failures.append(f"{label}: {r['error']}")
            continue
        if r["shared"] > smem_limit:
            failures.append(f"{label}: needs {r['shared']} bytes of shared memory")
        if is_main and position == 0 and not r["hgmma"]:
            failures.append(f"{label}: the first kept config of a main launch has no HGMMA (wgmma)")
        if r["spills"] and is_main:
            failures.append(f"{label}: a kept config of a main launch spills {r['spills']} bytes "
                            "(kernels/engine/configs.py must not keep it at this head dim)")
        elif r["spills"]:  # on a GPU the prune filter drops this config
            spills.append(f"{label}: {r['spills']} bytes of register spill stores")
        else:
            clean += 1
    if entry["name"] in _ENGINE_KERNELS and check_clean and clean == 0 and outcome:
        failures.append(f"{entry['name']} {_launch_label(entry)}: every kept config spills "
                        "(the prune filter would keep the least-spilling one)")
    return {"failures": failures, "spills": spills}


def compile_all(in_path: str, arch: int, which: str, dedupe: bool = False, head_dim: int | None = None,
                report: str | None = None, jobs: int = 1, full_head_dims: tuple[int, ...] | None = None) -> int:
    """Compile the recorded launches; returns 1 when a launch fails to compile, exceeds shared
    memory, or (modes "all" and "first-clean") keeps no spill-free config. ``head_dim``: compile
    the engine launches at this head dim (the recorded examples' are small).

    ``report`` ("all" or "main"): also compile the main launches (:func:`_is_main`) at every head
    dim of :data:`MAIN_HEAD_DIMS` (only ``head_dim`` when given) and every config the static prune
    filter keeps for them, and fail
    when one of those spills (the tables must not keep it there) or when the first kept config of
    a main launch has no HGMMA; print a markdown table with a row per compiled config of the main
    launches ("main") or of every launch, which then compiles every kept config of each ("all").
    ``full_head_dims``: the main head dims compiled at every kept config (default: all of them);
    at the others the main launches compile their first kept config only (spills and HGMMA)."""
    # a fresh cache: a cached kernel skips ptxas, whose log is where register spills show
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnkit-aot-")
    import triton
    from attnkit.kernels.engine import configs as engine_configs

    smem_limit = engine_configs.smem_limit(arch)
    with open(in_path, "rb") as f:
        launches = pickle.load(f)
    if head_dim is not None:
        launches = [_with_head_dim(e, head_dim) if "HEAD_DIM" in e["args"] else e for e in launches]
    if dedupe:
        launches = list({_code_path(e): e for e in launches}.values())
    mains: list[dict] = []
    if report:  # every main code path at each main head dim, whatever the examples recorded
        main_paths = {_code_path(e): e for e in launches if _is_main(_with_head_dim(e, MAIN_HEAD_DIMS[0]))}
        launches = [e for e in launches if _code_path(e) not in main_paths]
        dims = MAIN_HEAD_DIMS if head_dim is None else [d for d in MAIN_HEAD_DIMS if d == head_dim]
        mains = [_with_head_dim(e, d) for d in dims for e in main_paths.values()]
        if not mains:
            print("  no main launch was recorded (flash is not among the variants): nothing to check for HGMMA")
    units = []  # (launch, is main, configs, stop at the first spill-free one)
    for entry in mains + launches:
        is_main = bool(report) and _is_main(entry)
        full = report == "all" or is_main
        if which == "none" and not full:
            continue
        if entry["name"] in _ENGINE_KERNELS:
            first_only = (is_main and report != "all" and full_head_dims is not None
                          and entry["args"]["HEAD_DIM"][1] not in full_head_dims)
            cfgs = _engine_configs(entry, "first" if first_only else "all" if full else which, arch)
        else:
            cfgs = [{k: entry[k] for k in ("num_warps", "num_stages") if k in entry}]
        units.append((entry, is_main, cfgs, which == "first-clean" and not full))
    start = time.perf_counter()
    results = _run([(entry, cfgs, stop) for entry, _, cfgs, stop in units], arch, jobs)
    rows: list[dict] = []
    failures, spills, done = [], [], 0
    for (entry, is_main, _, _), outcome in zip(units, results):
        verdict = judge(entry, outcome, is_main=is_main, check_clean=which != "first", smem_limit=smem_limit)
        failures += verdict["failures"]
        spills += verdict["spills"]
        done += sum("error" not in r for r in outcome)
        if report == "all" or is_main:
            rows += [dict(r, kernel=entry["name"], launch=_launch_label(entry), main=is_main)
                     for r in outcome if "error" not in r]
    print(f"compiled {done} kernel configs for sm_{arch} in {time.perf_counter() - start:.0f} s; "
          f"{len(failures)} failures; {len(spills)} spilling configs (the engine's prune filter drops those on a "
          "GPU; other kernels' are listed)")
    for line in failures:
        print("  FAILED", line)
    for line in spills:
        print("  SPILLS", line)
    if report:
        print(f"\nStatic check, sm_{arch}, Triton {triton.__version__} (registers per thread and spills from ptxas -v; "
              "HGMMA from the SASS or PTX, TMA from the PTX).\n\nMain launches (flash, whole blocks, head dims "
              f"{' and '.join(map(str, MAIN_HEAD_DIMS))}), every config the static prune filter keeps"
              + (f" at head dim {', '.join(map(str, full_head_dims))}, the first elsewhere" if full_head_dims else "")
              + ":\n")
        print(_report_table([r for r in rows if r["main"]]))
        if report == "all":
            print("\nThe other launches, every config the static prune filter keeps:\n")
            print(_report_table([r for r in rows if not r["main"]]))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="all")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--configs", choices=("all", "first-clean", "first", "none"), default="all",
                        help="engine autotune configs to compile: every one the static prune filter keeps "
                             "(spilling ones are reported: the GPU filter drops them), the kept ones in order "
                             "until one does not spill, only the first, or (with --report main: only the main "
                             "launches) none")
    parser.add_argument("--dtypes", default="float16,float32", help="input dtypes of the recorded examples")
    parser.add_argument("--dedupe", action="store_true",
                        help="compile one launch per distinct code path (kernel, hooks, flags, dtype)")
    parser.add_argument("--step", choices=("both", "record", "compile"), default="both")
    parser.add_argument("--launches", default=None, help="the recorded launches (pickle)")
    parser.add_argument("--head-dim", type=int, default=None,
                        help="compile the engine launches at this head dim (Q/K and V) instead of the examples'")
    parser.add_argument("--report", nargs="?", const="all", choices=("all", "main"), default=None,
                        help="compile every config the static prune filter keeps of each launch and print a "
                             "markdown table with a row per config (registers, spill bytes, shared memory, HGMMA, "
                             "TMA); 'main': only the main launches (flash forward, dK/dV and dQ on whole blocks, "
                             "causal and not, at head dims 64 and 128) in full, the others per --configs. Either way "
                             "the main launches are compiled, and a spill in one of their kept configs, or a first "
                             "kept config without HGMMA, fails the run")
    parser.add_argument("--jobs", type=int, default=1, help="record and compile in this many processes")
    parser.add_argument("--full-head-dims", default=None,
                        help="with --report main: the main head dims (e.g. '128') compiled at every kept config; "
                             "at the other main head dims only the first kept config (default: every config at each)")
    parser.add_argument("--external", metavar="PATH:KERNEL", default=None,
                        help="compile this @triton.jit kernel of a Python file instead of attnkit's launches (e.g. the "
                             "Triton tutorial's fused attention, to compare) and print its table; the file is "
                             "imported with the GPU queries it makes answered for --arch")
    parser.add_argument("--signature", default="",
                        help="with --external: NAME=TYPE for its runtime arguments (*fp16, fp32, "
                             "tensordesc<fp16[BLOCK_M,HEAD_DIM]>: names of compile-time arguments are replaced per "
                             "config; an int such as 1 or 8192 is taken as that value) and NAME=VALUE for its "
                             "compile-time ones; runtime arguments left out are i32 ints divisible by 16")
    parser.add_argument("--external-configs", default=None,
                        help="with --external: 'BLOCK_M=128,BLOCK_N=64,num_warps=4;...': the kernel's autotune configs "
                             "that match one of these (all by default), or, for a kernel that is not autotuned, "
                             "these configs")
    args = parser.parse_args(argv)
    if args.external:
        return compile_external(args.external, args.signature, args.external_configs, args.arch, args.jobs)
    path = args.launches or os.path.join(tempfile.gettempdir(), "attnkit_launches.pkl")
    if args.step == "record":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        import attnkit

        # "all": every variant with a Triton kernel (a torch-only variant has nothing to compile)
        variants = ([name for name in attnkit.list_variants() if attnkit.get_variant(name).kernel is not None]
                    if args.variants == "all" else args.variants.split(","))
        if args.jobs > 1 and len(variants) > 1:  # the interpreter is single-threaded: a process per share
            groups = [variants[i::args.jobs] for i in range(args.jobs)]
            parts = [f"{path}.{i}" for i in range(len(groups))]
            runs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--step", "record", "--variants",
                                      ",".join(group), "--launches", part, "--dtypes", args.dtypes])
                    for group, part in zip(groups, parts) if group]
            if any(run.wait() for run in runs):
                raise RuntimeError("recording failed (see above)")
            merged: dict[str, dict] = {}
            for part in parts:
                with open(part, "rb") as f:
                    for entry in pickle.load(f):
                        merged.setdefault(json.dumps(entry, sort_keys=True), entry)
                os.remove(part)
            with open(path, "wb") as f:
                pickle.dump(list(merged.values()), f)
            print(f"recorded {len(merged)} distinct launches of {len(variants)} variants in {len(runs)} processes")
            return 0
        record(variants, path, args.dtypes.split(","))
        return 0
    if args.step == "compile":
        full_dims = tuple(int(d) for d in args.full_head_dims.split(",")) if args.full_head_dims else None
        return compile_all(path, args.arch, args.configs, args.dedupe, args.head_dim, args.report, args.jobs,
                           full_dims)
    env = dict(os.environ, TRITON_INTERPRET="1")
    base = [sys.executable, os.path.abspath(__file__), "--variants", args.variants, "--launches", path,
            "--dtypes", args.dtypes]
    subprocess.run(base + ["--step", "record", "--jobs", str(args.jobs)], check=True, env=env)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(base + ["--step", "compile", "--arch", str(args.arch), "--configs", args.configs]
                          + (["--dedupe"] if args.dedupe else []) + (["--report", args.report] if args.report else [])
                          + ["--jobs", str(args.jobs)]
                          + (["--full-head-dims", args.full_head_dims] if args.full_head_dims else [])
                          + (["--head-dim", str(args.head_dim)] if args.head_dim else []),
                          check=False, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
