"""`@triton.jit` helpers shared by the Triton kernels of `mole_lora` (`triton_mole_kernels`): reductions that work
under the interpreter, segment/tile bookkeeping, masked slot columns, the shrink loop of the routing kernels and the
expert-group helpers (E = 30). Device functions only: no kernel launches here.
"""

from __future__ import annotations

# fmt: off
import triton
import triton.language as tl


# Reductions through tl.reduce / tl.associative_scan with triton's own combine functions, and tl.full instead of
# tl.zeros: tl.sum, tl.max, tl.zeros & co are @jit functions of triton.language.standard, decorated once when
# triton is imported, so they raise under an interpreter switched on after `import triton`. The builtins are
# patched per launch, and the interpreter runs numpy reductions for these combine functions.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maxc(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minc(a, b):
    return tl.minimum(a, b)


_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _maxc)
_MIN_COMBINE = getattr(tl.standard, "_elementwise_min", _minc)


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN_COMBINE)


@triton.jit
def _cumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, _SUM_COMBINE)


@triton.jit
def _clamped_bounds(lo_raw, hi_raw, T):
    """Segment bounds clamped so that any seg_offsets values index rows in [0, T): lo into [0, T], hi into [lo, T].
    Valid offsets are left as they are."""
    lo = tl.minimum(tl.maximum(lo_raw, 0), T)
    hi = tl.minimum(tl.maximum(hi_raw, lo), T)
    return lo, hi


@triton.jit
def _tile_map(pid, seg_ptr, S, T, SP: tl.constexpr, BM: tl.constexpr):
    """Program pid -> (segment, first row, segment end, bad); first row >= end means no work (past the last tile).

    The offsets are clamped (`_clamped_bounds`), so no value reads or writes out of bounds; `bad` says whether they
    were invalid (not 0 = first <= ... <= last = T), for the caller's error flag."""
    s = tl.arange(0, SP)
    lo_raw = tl.load(seg_ptr + s, mask=s < S, other=0).to(tl.int64)
    hi_raw = tl.load(seg_ptr + s + 1, mask=s < S, other=0).to(tl.int64)
    lo, hi = _clamped_bounds(lo_raw, hi_raw, T)
    first = tl.load(seg_ptr).to(tl.int64)
    last = tl.load(seg_ptr + S).to(tl.int64)
    bad = (_sum(((lo != lo_raw) | (hi != hi_raw)).to(tl.int32), 0) > 0) | (first != 0) | (last != T)
    lo = lo.to(tl.int32)
    hi = hi.to(tl.int32)
    n_tiles = (hi - lo + BM - 1) // BM
    ends = _cumsum(n_tiles, 0)
    seg = _sum((ends <= pid).to(tl.int32), 0)  # empty segments have n_tiles = 0 and are skipped
    pick = s == seg
    first_tile = _sum(tl.where(pick, ends - n_tiles, 0), 0)
    row0 = _sum(tl.where(pick, lo, 0), 0) + (pid - first_tile) * BM
    row_end = _sum(tl.where(pick, hi, 0), 0)
    return seg, row0, row_end, bad


@triton.jit
def _tile_rows(seg, row0, row_end, BM: tl.constexpr):
    """A token tile's rows, their mask, the rows and the segment as int64 (address arithmetic)."""
    rows = row0 + tl.arange(0, BM)
    return rows, rows < row_end, rows.to(tl.int64), seg.to(tl.int64)


@triton.jit
def _slot_active(mask_ptr, seg64, slots, E):
    """expert_mask[seg, slots] as booleans (False past E): masked slots' weights are never loaded."""
    return tl.load(mask_ptr + seg64 * E + slots, mask=(slots >= 0) & (slots < E), other=0) != 0


@triton.jit
def _col_offsets(cols, rows_per_slot, valid_rows, n_slots, stride_slot, stride_row):
    """Column c of a slot-stacked operand -> (offset of (slot c // rows_per_slot, row c % rows_per_slot), ok)."""
    slot = cols // rows_per_slot
    row = cols % rows_per_slot
    ok = (cols >= 0) & (slot < n_slots) & (row < valid_rows)
    off = tl.where(ok, slot.to(tl.int64) * stride_slot + row.to(tl.int64) * stride_row, 0)
    return off, ok


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # The interpreter multiplies raw bf16 bits in tl.dot: UPCAST (set only there) routes bf16 through fp32.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _expert_cols(a_ptr, mask_ptr, seg64, E, r, d_in, s0, NS: tl.constexpr, R: tl.constexpr):
    """Expert columns of slots s0 .. s0 + NS - 1 in the padded [EP, R] layout -> (cols, A row pointers, load mask,
    in-range mask); masked means absent: A (and B) of masked slots are never loaded."""
    cols = s0 * R + tl.arange(0, NS * R)
    a_off, col_ok = _col_offsets(cols, R, r, E, r * d_in, d_in)
    a_ok = col_ok & _slot_active(mask_ptr, seg64, cols // R, E)
    return cols, a_ptr + seg64 * E * r * d_in + a_off, a_ok, col_ok


@triton.jit
def _shrink(
    x_ptr, xe_ptr, rt_ptr, sa_ptr, mask_ptr, rows64, rmask, seg64, a_base, a_ok, E, r, d_in,
    EP: tl.constexpr, R: tl.constexpr, ZP: tl.constexpr, EMBED: tl.constexpr, LINEAR_Z: tl.constexpr,
    HAS_XE: tl.constexpr, HAS_SHARED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    """One pass over x (and x_e) of a token tile -> (u = x_e A^T, h = x A^T (u itself without x_e), t = x W_t^T,
    zl = x R^T (LINEAR_Z: linear-router logits, ZP padded columns), v = x_e A_s^T); unused results stay zero."""
    ks = tl.arange(0, BK)
    rcols = tl.arange(0, R)
    r_ok = rcols < r
    zcols = tl.arange(0, ZP)
    z_ok = _slot_active(mask_ptr, seg64, zcols, E)
    u = tl.full([BM, EP * R], 0, tl.float32)
    h = tl.full([BM, EP * R], 0, tl.float32)
    t = tl.full([BM, R], 0, tl.float32)
    zl = tl.full([BM, ZP], 0, tl.float32)
    v = tl.full([BM, R], 0, tl.float32)
    for k0 in range(0, d_in, BK):
        kk = k0 + ks
        kmask = kk < d_in
        xmask = rmask[:, None] & kmask[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * d_in + kk[None, :], mask=xmask, other=0.0)
        at = tl.load(a_base[None, :] + kk[:, None], mask=a_ok[None, :] & kmask[:, None], other=0.0)
        if HAS_XE:
            xet = tl.load(xe_ptr + rows64[:, None] * d_in + kk[None, :], mask=xmask, other=0.0)
            u = _dot(xet, at, u, UPCAST, PREC)
            if EMBED:
                h = _dot(xt, at, h, UPCAST, PREC)
        else:
            xet = xt
            u = _dot(xt, at, u, UPCAST, PREC)
        if EMBED:
            wt = tl.load(rt_ptr + seg64 * r * d_in + rcols[None, :] * d_in + kk[:, None],
                         mask=r_ok[None, :] & kmask[:, None], other=0.0)
            t = _dot(xt, wt, t, UPCAST, PREC)
        if LINEAR_Z:
            wz = tl.load(rt_ptr + seg64 * E * d_in + zcols[None, :] * d_in + kk[:, None],
                         mask=z_ok[None, :] & kmask[:, None], other=0.0)
            zl = _dot(xt, wz, zl, UPCAST, PREC)
        if HAS_SHARED:
            ws = tl.load(sa_ptr + seg64 * r * d_in + rcols[None, :] * d_in + kk[:, None],
                         mask=r_ok[None, :] & kmask[:, None], other=0.0)
            v = _dot(xet, ws, v, UPCAST, PREC)
    if not (HAS_XE and EMBED):
        h = u
    return u, h, t, zl, v


@triton.jit
def _rows_dot(x_ptr, rows64, rmask, w_base, w_ok, K, w_stride, UPCAST: tl.constexpr, PREC: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr):
    """acc [BM, NC] = X[rows, :K] @ W, W[k, c] at w_base[c] + k * w_stride (columns with w_ok False read as 0)."""
    ks = tl.arange(0, BK)
    acc = tl.full([BM, NC], 0, tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        xt = tl.load(x_ptr + rows64[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_base[None, :] + kk[:, None] * w_stride, mask=w_ok[None, :] & kmask[:, None], other=0.0)
        acc = _dot(xt, wt, acc, UPCAST, PREC)
    return acc


@triton.jit
def _group_of(a, gi, BM: tl.constexpr, NG: tl.constexpr, GE: tl.constexpr):
    """[BM, NG * GE] -> the [BM, GE] columns of slot group gi."""
    return _sum(tl.where(tl.arange(0, NG)[None, :, None] == gi, tl.reshape(a, [BM, NG, GE]), 0.0), 1)


@triton.jit
def _in_group(a, gi, BM: tl.constexpr, NG: tl.constexpr, GE: tl.constexpr):
    """[BM, GE] of slot group gi -> [BM, NG * GE], zeros outside the group."""
    return tl.reshape(tl.where(tl.arange(0, NG)[None, :, None] == gi, a[:, None, :], 0.0), [BM, NG * GE])


@triton.jit
def _embed_logits(h, t, inv_sqrt_r, BM: tl.constexpr, NS: tl.constexpr, R: tl.constexpr):
    """Embedding-router logits of NS slots: z_i = <h_i, t> / sqrt(r), h [BM, NS * R] -> [BM, NS]."""
    return _sum(tl.reshape(h, [BM, NS, R]) * t[:, None, :], 2) * inv_sqrt_r


@triton.jit
def _store_gated(uv_ptr, rows64, rmask, KU, cols, col_ok, u, gate, r, BM: tl.constexpr, NS: tl.constexpr,
                 R: tl.constexpr):
    gated = tl.reshape(tl.reshape(u, [BM, NS, R]) * gate[:, :, None], [BM, NS * R])
    dst = (cols // R) * r + cols % R
    tl.store(uv_ptr + rows64[:, None] * KU + dst[None, :], gated.to(uv_ptr.dtype.element_ty),
             mask=rmask[:, None] & col_ok[None, :])
# fmt: on
