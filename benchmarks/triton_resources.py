"""Registers, spills and shared memory of every Triton kernel, compiled ahead of time for sm_90 (no GPU needed).

For each launch of the layer's Triton path (`triton_launches.py`) over the SPEC's shape grid, and each autotune
config the launcher would try (`triton_mole_kernels.CONFIGS`), compile the kernel with `triton.compile` for
GPUTarget("cuda", 90, 32) as the JIT would specialise it (pointers and multiples of 16 marked divisible by 16,
integers equal to 1 as constants), deduplicated: shapes matter only through the constexprs. Resources come from
ptxas' own report (`ptxas -v`, which Triton runs: "Used N registers", "N bytes spill stores"; Triton >= 3.9 prints
it with knobs.nvidia.dump_ptxas_log) and the compiled kernel's metadata (`shared`). ptxas runs exactly as Triton
invokes it by default (Triton 3.9: bundled ptxas 13.x with --regAllocOptLevel=2), since that is what users get.
The routing kernels' configs are those left by `triton_mole_kernels.prune_route_configs` for each launch.

    python benchmarks/triton_resources.py            # full grid -> benchmarks/results/triton-sm90-resources-<date>.*
    python benchmarks/triton_resources.py --subset   # E = 8 with dropout, E = 30 without (what CI compiles)
    python benchmarks/triton_resources.py --drop-reg-alloc-flag   # diagnostic: ptxas without --regAllocOptLevel=2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, whatever the caller's environment says
DROP_REG_ALLOC_FLAG = "--drop-reg-alloc-flag" in sys.argv  # diagnostic only, off by default


def _ptxas_without_reg_alloc_flag() -> None:
    """Diagnostic only (--drop-reg-alloc-flag, off by default): Triton 3.9 runs ptxas (13.x) with
    --regAllocOptLevel=2 (a workaround of its own); where a kernel's registers cannot fit, ptxas 13.4 with it may fall
    back to 32 registers and spill kilobytes (route_shrink_fwd at E = 8, r = 16, BM 32, 4 warps: 6.8 KB). This
    shows what ptxas does without the flag (as Triton releases before that workaround invoke it), through Triton's
    own tool-path override. The report and CI use Triton's own flags."""
    import shutil
    import tempfile

    real = shutil.which("ptxas-blackwell", path=str(Path(__import__("importlib").util.find_spec("triton").origin).parent
                                                     / "backends" / "nvidia" / "bin"))  # fmt: skip
    if real is None or "TRITON_PTXAS_BLACKWELL_PATH" in os.environ:
        return
    wrapper = Path(tempfile.mkdtemp(prefix="ptxas_wrap_")) / "ptxas-blackwell"
    wrapper.write_text(f'#!/bin/sh\nfor a; do shift; [ "$a" = --regAllocOptLevel=2 ] || set -- "$@" "$a"; done\n'
                       f'exec "{real}" "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = str(wrapper)


if DROP_REG_ALLOC_FLAG:
    _ptxas_without_reg_alloc_flag()

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from triton_launches import Problem, grid_problems, layer_launches  # noqa: E402

from fedamole_kernels import triton_mole_kernels as K  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ("kernel", "config", "constexprs", "regs", "spill_stores", "spill_loads", "smem", "num_warps", "shapes")


def _signature(fn, launch, dtype: str):
    """(signature, constexprs, attrs) as the JIT would build them for this launch's argument values."""
    sig, consts, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts or fn.params[i].is_constexpr:  # a constexpr the launcher passes positionally (r)
            sig[name] = "constexpr"
            consts.setdefault(name, launch.scalars.get(name))
        elif name.endswith("_ptr"):
            sig[name] = "*" + launch.ptrs.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scaling", "inv_sqrt_r"):
            sig[name] = "fp32"
        else:
            value = launch.scalars.get(name, 0)  # unnamed operand strides of absent operands are 0
            if fn.params[i].do_not_specialize:  # @triton.jit(do_not_specialize=...): neither == 1 nor % 16
                sig[name] = "i32"
                continue
            if value == 1:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32"
            if value % 16 == 0 and value:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ptxas_numbers(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        return {}
    return {"regs": int(regs[-1]), "spill_stores": int(spill[-1][0]), "spill_loads": int(spill[-1][1])}


def _cuobjdump_numbers(cubin: bytes, tmp: Path) -> dict:
    """Fallback (older Triton without the ptxas log knob): REG and STACK/LOCAL from cuobjdump's resource usage."""
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    reg, stack, local = (int(re.search(rf"{k}:(\d+)", out).group(1)) for k in ("REG", "STACK", "LOCAL"))
    return {"regs": reg, "spill_stores": stack + local, "spill_loads": stack + local}


def compile_one(fn, launch, config: triton.Config, dtype: str = "bf16", tmp: Path = Path("/tmp")) -> dict:
    launch = type(launch)(**{**launch.__dict__, "constexprs": {**launch.constexprs, **config.kwargs}})
    sig, consts, attrs = _signature(fn, launch, dtype)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    knob = getattr(getattr(triton, "knobs", None), "nvidia", None)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if knob is not None and hasattr(knob, "dump_ptxas_log"):
            with knob.scope():
                knob.dump_ptxas_log = True
                kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        else:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    numbers = _ptxas_numbers(log.getvalue()) or _cuobjdump_numbers(kernel.asm["cubin"], tmp)
    return {**numbers, "smem": int(kernel.metadata.shared), "num_warps": config.num_warps}


def _compile_key(launch, config, plain=(), const_args=()) -> tuple:
    """What the compile depends on; `plain`: the kernel's do_not_specialize arguments, `const_args`: its constexpr
    arguments the launcher passes positionally (their values, from the scalars)."""
    consts = {**launch.constexprs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    consts.update({k: launch.scalars[k] for k in const_args if k in launch.scalars})
    scalars = {k: v for k, v in launch.scalars.items() if k not in plain}
    ones = tuple(sorted(k for k, v in scalars.items() if v == 1))
    div16 = tuple(sorted(k for k, v in scalars.items() if isinstance(v, int) and v and v % 16 == 0))
    return launch.kernel, tuple(sorted(consts.items())), ones, div16


# What CI compiles: the reference setup's constexprs (E = 8, r = 16, dropout, S = 10) and one token of one segment at
# E = 6, r = 8 (rank 8, widths not multiples of 16, T = S = 1 specialised): every kernel variant but E = 30's.
SUBSET = ("512,10,8,16,1", "1,1,6,8,1")


def parse_problem(text: str) -> Problem:
    """ "T,S,E,r,dropout" (d = 4096) -> Problem."""
    t, s, e, r, drop = (int(v) for v in text.split(","))
    return Problem(T=t, S=s, E=e, r=r, d_in=4096, d_out=4096, dropout=bool(drop))


def problems(subset: bool, only: list[str] | None = None) -> list[Problem]:
    if only:
        return [parse_problem(p) for p in only]
    if subset:
        return [parse_problem(p) for p in SUBSET]
    return grid_problems() + grid_problems(dropout=False)


def collect(subset=False, tmp=Path("/tmp"), log=None, only: list[str] | None = None, kernels=None) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for p in problems(subset, only):
        for launch in layer_launches(p):
            if launch.kernel == "torch" or (kernels and launch.kernel.lstrip("_") not in kernels):
                continue
            fn = getattr(K, launch.kernel)
            for config in K.configs_for(launch.kind, launch.constexprs, launch.kernel):
                plain = {p.name for p in fn.params if p.do_not_specialize}
                key = _compile_key(launch, config, plain, {p.name for p in fn.params if p.is_constexpr})
                shape = f"T={p.T} S={p.S} E={p.E} r={p.r} xe={int(p.dropout)}"
                if key in rows:
                    rows[key]["shapes"].append(shape)
                    continue
                res = compile_one(fn, launch, config, tmp=tmp)
                consts = {k: v for k, v in launch.constexprs.items() if k not in ("UPCAST", "PREC")}
                rows[key] = dict(kernel=launch.kernel.lstrip("_"), config=f"{config.kwargs} w{config.num_warps}",
                                 constexprs=consts, shapes=[shape], **res)  # fmt: skip
                if log:
                    print(
                        f"{rows[key]['kernel']:18s} {rows[key]['config']:45s} {consts} -> regs {res['regs']} "
                        f"spills {res['spill_stores']}/{res['spill_loads']} smem {res['smem']}",
                        file=log,
                        flush=True,
                    )
    return list(rows.values())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _ptxas_version() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        text = get_ptxas_version(90)
        return next((ln.strip() for ln in text.splitlines() if "release" in ln), text.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 (a report field, never fatal)
        return f"unknown ({exc})"


def write(rows: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"triton-sm90-resources-{dt.date.today().isoformat()}"
    meta = {
        "commit": _commit(),
        "triton": triton.__version__,
        "target": "cuda sm_90 (warp 32)",
        "dtype": "bf16",
        "ptxas": _ptxas_version(),
        "ptxas_flags": "triton default" + (" minus --regAllocOptLevel=2 (diagnostic)" if DROP_REG_ALLOC_FLAG else ""),
    }
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    lines = ["# " + " ".join(f"{k}={v}" for k, v in meta.items()), ",".join(FIELDS)]
    for row in rows:
        cells = [json.dumps(row[f], default=str) if isinstance(row[f], (dict, list)) else str(row[f]) for f in FIELDS]
        lines.append(",".join('"' + c.replace('"', '""') + '"' if "," in c or '"' in c else c for c in cells))
    stem.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    return stem


def summary(rows: list[dict]) -> str:
    out = [
        "| kernel | configs x variants | regs (max) | spills (max bytes) | smem (max bytes) |",
        "|---|---|---|---|---|",
    ]
    for name in sorted({r["kernel"] for r in rows}):
        sel = [r for r in rows if r["kernel"] == name]
        out.append(
            f"| {name} | {len(sel)} | {max(r['regs'] for r in sel)} | "
            f"{max(r['spill_stores'] + r['spill_loads'] for r in sel)} | {max(r['smem'] for r in sel)} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", action="store_true", help=f"the shapes CI compiles: {' '.join(SUBSET)}")
    ap.add_argument("--problem", action="append", metavar="T,S,E,r,dropout", help="these shapes only (repeatable)")
    ap.add_argument("--kernel", action="append", help="these kernels only, e.g. route_shrink_fwd (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (none with --no-write)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--drop-reg-alloc-flag",
        action="store_true",
        help="diagnostic: run ptxas without Triton 3.9's --regAllocOptLevel=2 (not what users get)",
    )
    args = ap.parse_args(argv)
    rows = collect(args.subset, log=sys.stderr, only=args.problem, kernels=args.kernel)
    if not args.no_write:
        print(f"wrote {write(rows, args.out)}.{{csv,json}}")
    print(summary(rows))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    for r in spilling:
        print(f"SPILL: {r['kernel']} {r['config']} {r['constexprs']}: {r['spill_stores']}/{r['spill_loads']} bytes")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
