"""Triton kernels of the `mole_lora` Triton backend (launchers live in `triton_mole_lora`).

Four kernels, all grouped over segments (clients) without host syncs:

  route_shrink_fwd  per (segment, token tile): H = x @ [A_1..A_E | W_t]^T, scores, masked softmax, top-k, gates;
                    writes probs, topk_idx and the gated rank activations UV = [s*w_i*u_i ... | s*v] (one row/token)
  seg_gemm          per (segment, token tile, N tile): out = D @ W_cat with W_cat gathered from up to three stacked
                    weight tensors (forward expand: UV @ [B | B_s]^T; backward input grads: D @ [A | A_s | W_t])
  route_bwd         per (segment, token tile): recomputes u, h, t, v, G = g @ [B | B_s] and runs the fused routing
                    backward; writes the rank-space gradients (UG for dB, Dx / Dxe for dA, dW_t, dx)
  seg_wgrad         per (segment, K tile, N tile): W_grad = D_seg^T @ X_seg (+ D2_seg^T @ X2_seg), scattered into
                    the stacked gradient tensors; every element is written once, no atomics, so results are
                    deterministic

Segment -> tile mapping: the grid has cdiv(T, BM) + S programs along tokens (an upper bound on the number of
per-segment tiles known without reading seg_offsets on the host); each program finds its (segment, tile) from a
cumsum over seg_offsets in registers and returns early when it is past the last tile.

Many slots (EP * R > 256, E = 30): the routing kernels loop over groups of GE slots (`route_group`, 64 columns) so
that their accumulators fit in registers on sm_90, keeping only [BM, EP] arrays (logits, gates, dL/dw, dz) across
groups and recomputing per group what a later step needs (see each kernel's docstring); E = 6 / 8 run one group.

The routing kernels take the rank r as a constexpr (one compile per rank, as autotuning already keys on it): with
r = 8 a runtime value, route_bwd spilled on sm_90 (ptxas: ~100 bytes), as a constant it does not.

Rank-space layouts. Inside a routing program the rank is padded to R = max(16, next_pow2(r)) and the slots to
EP = max(2, next_pow2(E)) so that tl.dot sees dims >= 16 and the per-slot epilogue can reshape [BM, EP*R] to
[BM, EP, R]. Buffers in global memory are compact: column e*r + j for slot e, rank row j, then r shared columns,
then the router columns (r for the embedding router, E for the linear one).

This module is (re)imported by `triton_mole_lora._kernels()` so that whether the kernels run in the interpreter
follows $TRITON_INTERPRET at launch time, whatever imported the package first.
"""

from __future__ import annotations

# fmt: off
# (ruff format would put each of the kernels' ~30 arguments on its own line; the grouped lists read better.)
import triton
import triton.language as tl

from fedamole_kernels.triton_mole_configs import (  # noqa: F401  (re-exported: launchers, benchmarks, tests)
    CONFIG_KEYS,
    CONFIGS,
    INTERPRET_META,
    _configs,
    _prune_route_bwd,
    configs_for,
    prune_route_configs,
    route_acc_per_thread,
    route_config_fits,
    route_fits_any,
    route_group,
)
from fedamole_kernels.triton_mole_helpers import (
    _clamped_bounds,
    _col_offsets,
    _dot,
    _embed_logits,
    _expert_cols,
    _group_of,
    _in_group,
    _max,
    _min,
    _rows_dot,
    _shrink,
    _slot_active,
    _store_gated,
    _sum,
    _tile_map,
    _tile_rows,
)

INTERPRETED = bool(triton.knobs.runtime.interpret)
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(float32).tiny, as the reference clamps


@triton.jit
def _route_shrink_fwd(
    x_ptr, xe_ptr, seg_ptr, a_ptr, rt_ptr, sa_ptr, mask_ptr, probs_ptr, idx_ptr, uv_ptr, err_ptr,
    S, T, E, r: tl.constexpr, d_in, KU, scaling, inv_sqrt_r,
    SP: tl.constexpr, EP: tl.constexpr, R: tl.constexpr, ZP: tl.constexpr, TOPK: tl.constexpr, GE: tl.constexpr,
    EMBED: tl.constexpr, HAS_XE: tl.constexpr, HAS_SHARED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    """GE = EP: one pass over x for every slot at once. GE < EP (many slots, `route_group`): the [BM, GE * R]
    accumulators of one slot group at a time, so that they fit in registers; the logits need only h (x A^T, or u
    itself without x_e) and t, so u of each group is computed after the top-k (recomputed without x_e)."""
    seg, row0, row_end, bad = _tile_map(tl.program_id(0), seg_ptr, S, T, SP, BM)
    tl.store(err_ptr, 1, mask=bad)  # err[0]: invalid seg_offsets (the launcher raises)
    if row0 >= row_end:
        return
    rows, rmask, rows64, seg64 = _tile_rows(seg, row0, row_end, BM)
    rcols = tl.arange(0, R)
    NG: tl.constexpr = EP // GE
    if NG == 1:
        cols, a_base, a_ok, col_ok = _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, 0, EP, R)
        u, h, t, zl, v = _shrink(x_ptr, xe_ptr, rt_ptr, sa_ptr, mask_ptr, rows64, rmask, seg64, a_base, a_ok, E, r,
                                 d_in, EP, R, ZP, EMBED, not EMBED, HAS_XE, HAS_SHARED, UPCAST, PREC, BM, BK)
        if EMBED:
            z = _embed_logits(h, t, inv_sqrt_r, BM, EP, R)
    else:
        r_ok = rcols < r
        zcols = tl.arange(0, ZP)
        if EMBED:
            t = _rows_dot(x_ptr, rows64, rmask, rt_ptr + seg64 * r * d_in + rcols * d_in, r_ok, d_in, 1, UPCAST,
                          PREC, BM, BK, R)
            z = tl.full([BM, EP], 0, tl.float32)
            for gi in range(NG):
                _, a_base, a_ok, _ = _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, gi * GE, GE, R)
                h = _rows_dot(x_ptr, rows64, rmask, a_base, a_ok, d_in, 1, UPCAST, PREC, BM, BK, GE * R)
                z += _in_group(_embed_logits(h, t, inv_sqrt_r, BM, GE, R), gi, BM, NG, GE)
        else:
            zl = _rows_dot(x_ptr, rows64, rmask, rt_ptr + seg64 * E * d_in + zcols * d_in,
                           _slot_active(mask_ptr, seg64, zcols, E), d_in, 1, UPCAST, PREC, BM, BK, ZP)
        if HAS_SHARED:
            v = _rows_dot(xe_ptr, rows64, rmask, sa_ptr + seg64 * r * d_in + rcols * d_in, r_ok, d_in, 1, UPCAST,
                          PREC, BM, BK, R)

    # Scores over the padded slots, then the masked softmax (a segment with no active slot gets all-zero probs).
    ecols = tl.arange(0, EP)
    active = tl.load(mask_ptr + seg64 * E + ecols, mask=ecols < E, other=0) != 0
    if not EMBED:
        if ZP > EP:  # the router tile was padded to 16 columns for tl.dot: fold the all-zero tail back
            z = _sum(tl.reshape(zl, [BM, ZP // EP, EP]), 1)
        else:
            z = tl.reshape(zl, [BM, EP])
    z = tl.where(active[None, :], z, float("-inf"))
    zmax = _max(z, 1)
    zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
    ez = tl.where(active[None, :], tl.exp(z - zmax[:, None]), 0.0)
    den = _sum(ez, 1)
    p = ez / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(probs_ptr + rows64[:, None] * E + ecols[None, :], p, mask=rmask[:, None] & (ecols < E)[None, :])

    # Top-k by iterated argmax; ties go to the lowest slot; masked slots are never picked (-1 when none left).
    taken = tl.full([BM, EP], 0, tl.int32)
    for i in range(TOPK):
        cand = tl.where(active[None, :] & (taken == 0), p, -1.0)
        best = _max(cand, 1)
        found = best >= 0.0
        first = _min(tl.where((cand == best[:, None]) & found[:, None], ecols[None, :], EP), 1)
        taken = tl.where(ecols[None, :] == first[:, None], 1, taken)
        tl.store(idx_ptr + rows64 * TOPK + i, tl.where(found, first, -1).to(tl.int64), mask=rmask)
    picked = tl.where(taken != 0, p, 0.0)
    norm = tl.maximum(_sum(picked, 1), FP32_TINY)
    gate = picked / norm[:, None] * scaling
    if NG == 1:
        _store_gated(uv_ptr, rows64, rmask, KU, cols, col_ok, u, gate, r, BM, EP, R)
    else:
        for gi in range(NG):
            cols, a_base, a_ok, col_ok = _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, gi * GE, GE, R)
            u = _rows_dot(xe_ptr, rows64, rmask, a_base, a_ok, d_in, 1, UPCAST, PREC, BM, BK, GE * R)
            _store_gated(uv_ptr, rows64, rmask, KU, cols, col_ok, u, _group_of(gate, gi, BM, NG, GE), r, BM, GE, R)
    if HAS_SHARED:
        tl.store(uv_ptr + rows64[:, None] * KU + E * r + rcols[None, :], (v * scaling).to(uv_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (rcols < r)[None, :])


@triton.jit
def _seg_gemm(
    d_ptr, seg_ptr, out_ptr, mask_ptr,
    w1_ptr, w1_s, w1_slot, w1_row, w1_n, rows1, slots1,
    w2_ptr, w2_s, w2_row, w2_n, rows2,
    w3_ptr, w3_s, w3_row, w3_n, rows3,
    S, T, KD, N,
    SP: tl.constexpr, HAS_W2: tl.constexpr, HAS_W3: tl.constexpr, ACC: tl.constexpr, MASK_W3: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BKD: tl.constexpr, BN: tl.constexpr,
):
    """out[rows of segment s] (+)= D[rows] @ W_cat[s]; W_cat rows: slots of w1, then w2 rows, then w3 rows.

    Slots of w1 that expert_mask[s] marks absent are never loaded (zeros), nor, with MASK_W3, rows of w3 (one per
    slot: the linear router)."""
    seg, row0, row_end, _ = _tile_map(tl.program_id(0), seg_ptr, S, T, SP, BM)
    if row0 >= row_end:
        return
    rows, rmask, rows64, seg64 = _tile_rows(seg, row0, row_end, BM)
    ns = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = ns < N
    k1 = rows1 * slots1
    acc = tl.full([BM, BN], 0, tl.float32)
    for k0 in range(0, KD, BKD):
        cols = k0 + tl.arange(0, BKD)
        d = tl.load(d_ptr + rows64[:, None] * KD + cols[None, :], mask=rmask[:, None] & (cols < KD)[None, :],
                    other=0.0)
        off, ok = _col_offsets(cols, rows1, rows1, slots1, w1_slot, w1_row)
        ok = ok & _slot_active(mask_ptr, seg64, cols // rows1, slots1)
        w = tl.load(w1_ptr + seg64 * w1_s + off[:, None] + ns[None, :] * w1_n, mask=ok[:, None] & nmask[None, :],
                    other=0.0)
        if HAS_W2:
            off, ok = _col_offsets(cols - k1, rows2, rows2, 1, 0, w2_row)
            w += tl.load(w2_ptr + seg64 * w2_s + off[:, None] + ns[None, :] * w2_n,
                         mask=ok[:, None] & nmask[None, :], other=0.0)
        if HAS_W3:
            off, ok = _col_offsets(cols - k1 - rows2, rows3, rows3, 1, 0, w3_row)
            if MASK_W3:
                ok = ok & _slot_active(mask_ptr, seg64, cols - k1 - rows2, slots1)
            w += tl.load(w3_ptr + seg64 * w3_s + off[:, None] + ns[None, :] * w3_n,
                         mask=ok[:, None] & nmask[None, :], other=0.0)
        acc = _dot(d, w, acc, UPCAST, PREC)
    optr = out_ptr + rows64[:, None] * N + ns[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if ACC:
        acc += tl.load(optr, mask=omask, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_gates(probs_ptr, idx_ptr, mask_ptr, err_ptr, rows64, rmask, seg64, E, EP: tl.constexpr, BM: tl.constexpr,
               TOPK: tl.constexpr):
    """Gates w = p[idx] / sum p[idx] from the forward's probs and top-k choice -> (ecols, active, emask, p, sel, w,
    norm); ids that are not -1 or an active slot, or repeat, set err[1]."""
    ecols = tl.arange(0, EP)
    active = _slot_active(mask_ptr, seg64, ecols, E)
    emask = rmask[:, None] & active[None, :]
    p = tl.load(probs_ptr + rows64[:, None] * E + ecols[None, :], mask=emask, other=0.0)
    sel = tl.full([BM, EP], 0, tl.int32)
    idx_bad = tl.full([BM], 0, tl.int32)
    for i in range(TOPK):
        ix = tl.load(idx_ptr + rows64 * TOPK + i, mask=rmask, other=-1)
        hit = (ecols[None, :].to(tl.int64) == ix[:, None]) & active[None, :]
        ok = (ix == -1) | (_sum(hit.to(tl.int32), 1) > 0)
        repeat = _sum((hit & (sel != 0)).to(tl.int32), 1) > 0
        idx_bad = tl.where(ok & ~repeat, idx_bad, 1)
        sel = tl.where(hit, 1, sel)
    tl.store(err_ptr + 1, 1, mask=_max(tl.where(rmask, idx_bad, 0), 0) > 0)
    picked = tl.where(sel != 0, p, 0.0)
    norm = tl.maximum(_sum(picked, 1), FP32_TINY)
    w = picked / norm[:, None]
    return ecols, active, emask, p, sel, w, norm


@triton.jit
def _bwd_dz(gp_ptr, rows64, ecols, active, emask, E, p, sel, w, norm, gu, HAS_GP: tl.constexpr):
    """dz from gu = s * <G_i, u_i> (dL/dw_i): through the renormalisation, then the masked softmax (p = 0 on masked
    slots)."""
    d_gate = tl.where(sel != 0, gu, 0.0)
    d_picked = tl.where(sel != 0, (d_gate - _sum(d_gate * w, 1)[:, None]) / norm[:, None], 0.0)
    dp = d_picked
    if HAS_GP:
        dp += tl.load(gp_ptr + rows64[:, None] * E + ecols[None, :], mask=emask, other=0.0).to(tl.float32)
    return tl.where(active[None, :], p * (dp - _sum(p * dp, 1)[:, None]), 0.0)


@triton.jit
def _route_bwd(
    g_ptr, gp_ptr, x_ptr, xe_ptr, seg_ptr, a_ptr, b_ptr, rt_ptr, sa_ptr, sb_ptr, probs_ptr, idx_ptr, mask_ptr,
    ug_ptr, dx_ptr, dxe_ptr, err_ptr,
    S, T, E, r: tl.constexpr, d_in, d_out, KU, KX, scaling, inv_sqrt_r,
    SP: tl.constexpr, EP: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr, GE: tl.constexpr,
    EMBED: tl.constexpr, HAS_XE: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_GP: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Routing + rank-space backward for one token tile (see reference.mole_lora_backward for the math).

    Masked means absent: masked slots' A and B are never loaded and their probs, grad_probs and dz are selected to 0.
    Top-k ids are only compared, never used as addresses; ids that are not -1 or an active slot, or repeat, set
    err[1] (the launcher raises) and select nothing. GE < EP (many slots, `route_group`): one slot group at a time,
    u and G in a first pass (for dL/dw, UG and the gradients that need no dz), h (and G without x_e) recomputed in a
    second pass once dz is known (embedding router only)."""
    seg, row0, row_end, bad = _tile_map(tl.program_id(0), seg_ptr, S, T, SP, BM)
    tl.store(err_ptr, 1, mask=bad)
    if row0 >= row_end:
        return
    rows, rmask, rows64, seg64 = _tile_rows(seg, row0, row_end, BM)
    rcols = tl.arange(0, R)
    r_ok = rcols < r
    row_ptr = rows64[:, None] * KX
    ty = dx_ptr.dtype.element_ty
    NG: tl.constexpr = EP // GE
    if NG == 1:
        ks = tl.arange(0, BK)
        cols, a_base, a_ok, col_ok = _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, 0, EP, R)
        b_off, _ = _col_offsets(cols, R, r, E, d_out * r, 1)
        b_base = b_ptr + seg64 * E * d_out * r + b_off
        # recompute u = x_e A^T, h = x A^T, t = x W_t^T, v = x_e A_s^T
        u, h, t, _, v = _shrink(x_ptr, xe_ptr, rt_ptr, sa_ptr, mask_ptr, rows64, rmask, seg64, a_base, a_ok, E, r,
                                d_in, EP, R, R, EMBED, False, HAS_XE, HAS_SHARED, UPCAST, PREC, BM, BK)
        gs, gr = tl.full([BM, R], 0, tl.float32), tl.full([BM, EP * R], 0, tl.float32)
        for n0 in range(0, d_out, BK):  # G = g [B_1 .. B_E], G_s = g B_s
            nn = n0 + ks
            nmask = nn < d_out
            gt = tl.load(g_ptr + rows64[:, None] * d_out + nn[None, :], mask=rmask[:, None] & nmask[None, :],
                         other=0.0)
            bt = tl.load(b_base[None, :] + nn[:, None] * r, mask=a_ok[None, :] & nmask[:, None], other=0.0)
            gr = _dot(gt, bt, gr, UPCAST, PREC)
            if HAS_SHARED:
                bs = tl.load(sb_ptr + seg64 * d_out * r + nn[:, None] * r + rcols[None, :],
                             mask=r_ok[None, :] & nmask[:, None], other=0.0)
                gs = _dot(gt, bs, gs, UPCAST, PREC)
        ecols, active, emask, p, sel, w, norm = _bwd_gates(probs_ptr, idx_ptr, mask_ptr, err_ptr, rows64, rmask,
                                                           seg64, E, EP, BM, TOPK)
        u3 = tl.reshape(u, [BM, EP, R])
        g3 = tl.reshape(gr, [BM, EP, R])
        du = g3 * (w * scaling)[:, :, None]
        dz = _bwd_dz(gp_ptr, rows64, ecols, active, emask, E, p, sel, w, norm, _sum(g3 * u3, 2) * scaling, HAS_GP)

        dst = (cols // R) * r + cols % R
        emask2 = rmask[:, None] & col_ok[None, :]  # every column is written (zeros for masked slots)
        tl.store(ug_ptr + rows64[:, None] * KU + dst[None, :],
                 tl.reshape(u3 * (w * scaling)[:, :, None], [BM, EP * R]).to(ty), mask=emask2)
        du2 = tl.reshape(du, [BM, EP * R])
        if EMBED:  # z = <h_i, t> / sqrt(r): dh_i = dz_i t / sqrt(r), dt = sum_i dz_i h_i / sqrt(r)
            h3 = tl.reshape(h, [BM, EP, R])
            dh2 = tl.reshape(dz[:, :, None] * t[:, None, :] * inv_sqrt_r, [BM, EP * R])
            dt = _sum(dz[:, :, None] * h3, 1) * inv_sqrt_r
            if HAS_XE:
                tl.store(dxe_ptr + row_ptr + dst[None, :], du2.to(ty), mask=emask2)
                tl.store(dx_ptr + row_ptr + dst[None, :], dh2.to(ty), mask=emask2)
            else:
                tl.store(dx_ptr + row_ptr + dst[None, :], (du2 + dh2).to(ty), mask=emask2)
        else:  # linear router: z = R x, the router columns of Dx are dz itself
            if HAS_XE:
                tl.store(dxe_ptr + row_ptr + dst[None, :], du2.to(ty), mask=emask2)
                tl.store(dx_ptr + row_ptr + dst[None, :], tl.full([BM, EP * R], 0, ty), mask=emask2)
            else:
                tl.store(dx_ptr + row_ptr + dst[None, :], du2.to(ty), mask=emask2)
    else:
        ecols, active, emask, p, sel, w, norm = _bwd_gates(probs_ptr, idx_ptr, mask_ptr, err_ptr, rows64, rmask,
                                                           seg64, E, EP, BM, TOPK)
        ws = w * scaling
        b_seg = b_ptr + seg64 * E * d_out * r
        # Pass 1, per slot group: u = x_e A^T, G = g B^T -> s <G_i, u_i>, UG, and dx_e (or dx) = G w s where no dz
        # is added to it.
        gu = tl.full([BM, EP], 0, tl.float32)
        for gi in range(NG):
            cols, a_base, a_ok, col_ok = _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, gi * GE, GE, R)
            b_off, _ = _col_offsets(cols, R, r, E, d_out * r, 1)
            u = _rows_dot(xe_ptr, rows64, rmask, a_base, a_ok, d_in, 1, UPCAST, PREC, BM, BK, GE * R)
            g3 = tl.reshape(_rows_dot(g_ptr, rows64, rmask, b_seg + b_off, a_ok, d_out, r, UPCAST, PREC, BM, BK,
                                      GE * R), [BM, GE, R])
            u3 = tl.reshape(u, [BM, GE, R])
            gu += _in_group(_sum(g3 * u3, 2) * scaling, gi, BM, NG, GE)
            ws_g = _group_of(ws, gi, BM, NG, GE)
            dst = (cols // R) * r + cols % R
            emask2 = rmask[:, None] & col_ok[None, :]
            tl.store(ug_ptr + rows64[:, None] * KU + dst[None, :],
                     tl.reshape(u3 * ws_g[:, :, None], [BM, GE * R]).to(ty), mask=emask2)
            du2 = tl.reshape(g3 * ws_g[:, :, None], [BM, GE * R])
            if HAS_XE:
                tl.store(dxe_ptr + row_ptr + dst[None, :], du2.to(ty), mask=emask2)
                if not EMBED:
                    tl.store(dx_ptr + row_ptr + dst[None, :], tl.full([BM, GE * R], 0, ty), mask=emask2)
            elif not EMBED:
                tl.store(dx_ptr + row_ptr + dst[None, :], du2.to(ty), mask=emask2)
        dz = _bwd_dz(gp_ptr, rows64, ecols, active, emask, E, p, sel, w, norm, gu, HAS_GP)
        if EMBED:  # pass 2, per slot group: h = x A^T for dt, dh = dz t / sqrt(r) (+ G w s without x_e)
            t = _rows_dot(x_ptr, rows64, rmask, rt_ptr + seg64 * r * d_in + rcols * d_in, r_ok, d_in, 1, UPCAST,
                          PREC, BM, BK, R)
            dt = tl.full([BM, R], 0, tl.float32)
            for gi in range(NG):
                cols, a_base, a_ok, col_ok = _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, gi * GE, GE, R)
                h3 = tl.reshape(_rows_dot(x_ptr, rows64, rmask, a_base, a_ok, d_in, 1, UPCAST, PREC, BM, BK, GE * R),
                                [BM, GE, R])
                dz_g = _group_of(dz, gi, BM, NG, GE)
                dt += _sum(dz_g[:, :, None] * h3, 1)
                dh2 = tl.reshape(dz_g[:, :, None] * t[:, None, :] * inv_sqrt_r, [BM, GE * R])
                dst = (cols // R) * r + cols % R
                emask2 = rmask[:, None] & col_ok[None, :]
                if not HAS_XE:
                    b_off, _ = _col_offsets(cols, R, r, E, d_out * r, 1)
                    g3 = tl.reshape(_rows_dot(g_ptr, rows64, rmask, b_seg + b_off, a_ok, d_out, r, UPCAST, PREC, BM,
                                              BK, GE * R), [BM, GE, R])
                    dh2 += tl.reshape(g3 * _group_of(ws, gi, BM, NG, GE)[:, :, None], [BM, GE * R])
                tl.store(dx_ptr + row_ptr + dst[None, :], dh2.to(ty), mask=emask2)
            dt = dt * inv_sqrt_r
        if HAS_SHARED:
            v = _rows_dot(xe_ptr, rows64, rmask, sa_ptr + seg64 * r * d_in + rcols * d_in, r_ok, d_in, 1, UPCAST,
                          PREC, BM, BK, R)
            gs = _rows_dot(g_ptr, rows64, rmask, sb_ptr + seg64 * d_out * r + rcols, r_ok, d_out, r, UPCAST, PREC,
                           BM, BK, R)

    estore = rmask[:, None] & (ecols < E)[None, :]
    rt_col = E * r + r * HAS_SHARED
    if EMBED:
        tl.store(dx_ptr + row_ptr + rt_col + rcols[None, :], dt.to(ty), mask=rmask[:, None] & r_ok[None, :])
        if HAS_XE:
            tl.store(dxe_ptr + row_ptr + rt_col + rcols[None, :], tl.full([BM, R], 0, ty),
                     mask=rmask[:, None] & r_ok[None, :])
    else:  # linear router: z = R x, the router columns of Dx are dz itself
        if HAS_XE:
            tl.store(dxe_ptr + row_ptr + rt_col + ecols[None, :], tl.full([BM, EP], 0, ty), mask=estore)
        tl.store(dx_ptr + row_ptr + rt_col + ecols[None, :], dz.to(ty), mask=estore)
    if HAS_SHARED:
        smask = rmask[:, None] & r_ok[None, :]
        tl.store(ug_ptr + rows64[:, None] * KU + E * r + rcols[None, :], (v * scaling).to(ty), mask=smask)
        if HAS_XE:
            tl.store(dxe_ptr + row_ptr + E * r + rcols[None, :], (gs * scaling).to(ty), mask=smask)
            tl.store(dx_ptr + row_ptr + E * r + rcols[None, :], tl.full([BM, R], 0, ty), mask=smask)
        else:
            tl.store(dx_ptr + row_ptr + E * r + rcols[None, :], (gs * scaling).to(ty), mask=smask)


@triton.jit
def _seg_wgrad(
    d_ptr, x_ptr, d2_ptr, x2_ptr, seg_ptr,
    o1_ptr, o1_s, o1_slot, o1_row, o1_n, rows1, slots1,
    o2_ptr, o2_s, o2_row, o2_n, rows2,
    o3_ptr, o3_s, o3_row, o3_n, rows3,
    T, KD, N,
    HAS_D2: tl.constexpr, HAS_O2: tl.constexpr, HAS_O3: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BKD: tl.constexpr, BN: tl.constexpr,
):
    """O_cat[s] = D[seg s]^T @ X[seg s] (+ D2^T @ X2), O_cat rows scattered to o1 slots, o2 rows, o3 rows."""
    seg = tl.program_id(0)
    seg64 = seg.to(tl.int64)
    lo, hi = _clamped_bounds(tl.load(seg_ptr + seg).to(tl.int64), tl.load(seg_ptr + seg + 1).to(tl.int64), T)
    lo = lo.to(tl.int32)
    hi = hi.to(tl.int32)
    cols = tl.program_id(1) * BKD + tl.arange(0, BKD)
    cmask = cols < KD
    ns = tl.program_id(2) * BN + tl.arange(0, BN)
    nmask = ns < N
    acc = tl.full([BKD, BN], 0, tl.float32)
    for m0 in range(lo, hi, BM):  # empty segments run no iteration and store zeros
        ms = (m0 + tl.arange(0, BM)).to(tl.int64)
        mm = ms < hi
        dmask = cmask[:, None] & mm[None, :]
        xmask = mm[:, None] & nmask[None, :]
        dt = tl.load(d_ptr + ms[None, :] * KD + cols[:, None], mask=dmask, other=0.0)
        xt = tl.load(x_ptr + ms[:, None] * N + ns[None, :], mask=xmask, other=0.0)
        acc = _dot(dt, xt, acc, UPCAST, PREC)
        if HAS_D2:
            dt = tl.load(d2_ptr + ms[None, :] * KD + cols[:, None], mask=dmask, other=0.0)
            xt = tl.load(x2_ptr + ms[:, None] * N + ns[None, :], mask=xmask, other=0.0)
            acc = _dot(dt, xt, acc, UPCAST, PREC)
    k1 = rows1 * slots1
    off, ok = _col_offsets(cols, rows1, rows1, slots1, o1_slot, o1_row)
    tl.store(o1_ptr + seg64 * o1_s + off[:, None] + ns[None, :] * o1_n, acc.to(o1_ptr.dtype.element_ty),
             mask=ok[:, None] & nmask[None, :])
    if HAS_O2:
        off, ok = _col_offsets(cols - k1, rows2, rows2, 1, 0, o2_row)
        tl.store(o2_ptr + seg64 * o2_s + off[:, None] + ns[None, :] * o2_n, acc.to(o2_ptr.dtype.element_ty),
                 mask=ok[:, None] & nmask[None, :])
    if HAS_O3:
        off, ok = _col_offsets(cols - k1 - rows2, rows3, rows3, 1, 0, o3_row)
        tl.store(o3_ptr + seg64 * o3_s + off[:, None] + ns[None, :] * o3_n, acc.to(o3_ptr.dtype.element_ty),
                 mask=ok[:, None] & nmask[None, :])


if INTERPRETED:
    route_shrink_fwd, route_bwd, seg_gemm, seg_wgrad = _route_shrink_fwd, _route_bwd, _seg_gemm, _seg_wgrad
else:
    # HAS_XE and EMBED decide the pruning (h is accumulated only with both): part of the key.
    route_shrink_fwd = triton.autotune(_configs("route"), key=["E", "r", "d_in", "KU", "HAS_XE", "EMBED"],
                                       prune_configs_by={"early_config_prune": prune_route_configs})(_route_shrink_fwd)
    route_bwd = triton.autotune(_configs("route"), key=["E", "r", "d_in", "d_out", "KX", "HAS_XE", "EMBED"],
                                prune_configs_by={"early_config_prune": _prune_route_bwd})(_route_bwd)
    # seg_gemm may accumulate into its output (ACC): restore it between autotuning runs.
    seg_gemm = triton.autotune(_configs("gemm"), key=["KD", "N"], restore_value=["out_ptr"])(_seg_gemm)
    seg_wgrad = triton.autotune(_configs("wgrad"), key=["KD", "N"])(_seg_wgrad)
# fmt: on
