"""Autotune configs of the Triton kernels (`triton_mole_kernels`) and their per-launch pruning.

Pure Python over `triton.Config`: `benchmarks/triton_resources.py` and `tests/test_gpu_path_on_paper.py` read the
same tables to compile every config a launch would try for sm_90.
"""

from __future__ import annotations

import triton

# fmt: off
# GPU: autotune the tile sizes (keyed on the problem dims); few configs, since each costs a compile per key. The
# interpreter runs one fixed, large-tile config because its cost is per program and per op. Rows: tile sizes
# (in the order of CONFIG_KEYS), num_warps; num_stages 3. benchmarks/triton_resources.py compiles them for sm_90
# (with Triton's own ptxas flags) and tests/test_gpu_path_on_paper.py fails on any spill.
CONFIG_KEYS = {"route": ("BM", "BK"), "gemm": ("BM", "BKD", "BN"), "wgrad": ("BM", "BKD", "BN")}
CONFIGS = {
    "route": ((64, 32, 8), (64, 64, 8), (64, 32, 16)),
    "gemm": ((64, 32, 64, 4), (128, 32, 64, 8), (128, 32, 128, 8), (64, 32, 128, 8)),
    "wgrad": ((32, 64, 64, 4), (64, 64, 128, 8), (32, 128, 64, 8), (64, 64, 64, 4)),
}
INTERPRET_META = {"route": {"BM": 32, "BK": 64}, "gemm": {"BM": 32, "BKD": 64, "BN": 64},
                  "wgrad": {"BM": 32, "BKD": 64, "BN": 64}}
# Routing kernels hold [BM, GE * R] fp32 accumulators across their K loops. With GE = EP (all slots at once, while
# EP * R <= ROUTE_GROUP_COLS): u (and h, with x_e and the embedding router) in route_shrink_fwd, u, G (and h) in
# route_bwd. Compiled for sm_90 with Triton's own ptxas flags, they stayed in registers only with BM >= 64 (one
# warpgroup MMA per 64 rows; BM 16/32 mma.sync tiles spilled at every size tried) and when accumulators + 64 + 512 /
# num_warps (what ptxas reported beyond them: ~128 registers at 8 warps, ~96 at 16) fit the thread's budget (255, or
# 64K / threads). Beyond (E = 30: EP * R = 512, 128 fp32 per thread per accumulator even at 16 warps) the kernels
# loop over groups of GE = `route_group` slots (GE * R = 64 columns): one accumulator live in route_shrink_fwd, two
# (u and G, or h and G) in route_bwd, plus a few [BM, EP] arrays (logits, gates, dL/dw) across the groups. With
# 128-column groups route_bwd took 248-255 registers at 8 warps and spilled 150-390 bytes in some variants; with 64
# columns every variant compiles without spills at (64, 32, 8 warps), and forward also at BK 64 / 16 warps (backward
# at BK 64 or 16 warps reached 255 / 128 registers and spilled 24-36 bytes at T = S = 1, so the model prunes them).
ROUTE_GROUP_COLS = 256


def route_group(EP, R):
    """Slots per group of the routing kernels (constexpr GE): all EP while EP * R <= ROUTE_GROUP_COLS, else groups of
    64 columns (at least one slot)."""
    return EP if EP * R <= ROUTE_GROUP_COLS else max(1, 64 // R)


def route_acc_per_thread(BM, num_warps, EP, R, HAS_XE, EMBED, bwd=False):
    """fp32 accumulator elements per thread: BM * EP * R per accumulator (u, + G backward, + h with x_e and the
    embedding router) / threads; grouped (`route_group`), BM * GE * R per accumulator (1 forward, 2 backward) plus
    the [BM, EP] arrays kept across the groups (forward 4: logits, probs, gates, top-k; backward 8: + dL/dw, dz)."""
    threads = 32 * num_warps
    GE = route_group(EP, R)
    if GE == EP:
        return BM * EP * R * (1 + bool(bwd) + bool(HAS_XE and EMBED)) // threads
    return (BM * GE * R * (1 + bool(bwd)) + (8 if bwd else 4) * BM * EP) // threads


def route_config_fits(BM, num_warps, EP, R, HAS_XE, EMBED, bwd=False, BK=32):
    """Accumulators + 64 + 512 / num_warps registers within the budget; grouped, + the weight tile's 64-bit
    addresses (BK * GE * R * 2 / threads: what separated BK 64 from BK 32 in ptxas' counts)."""
    regs = route_acc_per_thread(BM, num_warps, EP, R, HAS_XE, EMBED, bwd) + 64 + 512 // num_warps
    GE = route_group(EP, R)
    if GE < EP:
        regs += BK * GE * R * 2 // (32 * num_warps)
    return BM >= 64 and regs <= min(255, 65536 // (32 * num_warps))


def route_fits_any(EP, R, HAS_XE, EMBED, bwd=False, **_):
    """Whether some routing config fits these constexprs (with slot groups, every SPEC shape does)."""
    return any(route_config_fits(row[0], row[-1], EP, R, HAS_XE, EMBED, bwd, row[1]) for row in CONFIGS["route"])


def _configs(kind):
    return [triton.Config(dict(zip(CONFIG_KEYS[kind], row[:-1])), num_warps=row[-1], num_stages=3)
            for row in CONFIGS[kind]]


def prune_route_configs(configs, named_args=None, bwd=False, **meta):
    """early_config_prune of the routing kernels (and the configs triton_resources compiles): those that fit
    (`route_config_fits`) this launch's EP, R, HAS_XE, EMBED; when none does, the one with the fewest accumulator
    elements per thread (a fallback: no SPEC shape needs it since the kernels loop over slot groups)."""
    dims = [meta[k] for k in ("EP", "R", "HAS_XE", "EMBED")] + [bwd]
    fit = [c for c in configs if route_config_fits(c.kwargs["BM"], c.num_warps, *dims, BK=c.kwargs["BK"])]
    return fit or [min(configs, key=lambda c: (route_acc_per_thread(c.kwargs["BM"], c.num_warps, *dims), -c.num_warps))]


def _prune_route_bwd(configs, named_args=None, **meta):
    return prune_route_configs(configs, named_args, bwd=True, **meta)


def configs_for(kind, constexprs, kernel=""):
    """The autotune configs a launch of `kernel` (of this kind, with these constexprs) would try, after pruning."""
    if kind != "route":
        return _configs(kind)
    return prune_route_configs(_configs(kind), bwd=kernel.lstrip("_") == "route_bwd", **constexprs)
# fmt: on
