"""Adapter gradients: reductions over tokens, split over M, summed deterministically by the launcher.

    dA^T = s * drop(x)^T U     Z = x,  V = U = dy B,  Z_DROPOUT    -> [G, K, R]
    dB   = s * dy^T T          Z = dy, V = T = drop(x) A^T         -> [G, N, R]
    DoRA's magnitude gradient rides along the dB reduction (COL_DOT): sum_m dy[m, n] * Z2[m, n] from the same dy tiles
(per adapter when grouped).
"""

import triton
import triton.language as tl

from .tiles import unpack_keep


@triton.jit
def _lora_grad_kernel(
    z_ptr, v_ptr, out_ptr, perm_ptr, seg_ptr, ro_ptr, scale_ptr, bits_ptr, y_ptr, col_ptr,
    M, P, R, M_BUCKET,
    stride_zm, stride_zp,
    stride_ym, stride_yp, stride_cs, stride_cg,
    stride_vm, stride_vr,
    stride_os, stride_og, stride_op, stride_or,
    stride_bits,
    scaling, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_PERM: tl.constexpr, GROUPED: tl.constexpr, RAGGED: tl.constexpr, HAS_SCALE_VEC: tl.constexpr,
    Z_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, COL_DOT: tl.constexpr,
):
    """out[split, g, p, r] = scale_g * sum over this split's rows m of adapter g: Z[m, p] * V[m, r].

    Z [M, P], V [M, R] (fp32), out fp32 [SPLIT, G, P, R]. Grid: (cdiv(P, BLOCK_P), G, SPLIT). With
    GROUPED, adapter g owns sorted rows [seg[g], seg[g+1]) and token perm[row]; else one segment [0, M).
    Z_DROPOUT masks Z by the packed keep-mask bits [M, cdiv(P, 32)] (int32 words, by token) and scales by 1/(1-p).
    Unused adapters and empty splits write zeros, so the sum over splits is exact and deterministic.
    RAGGED (grouped; > 0, every offset a multiple of it): adapter g has its own rank r_g = ro[g + 1] - ro[g]
    (capped at V's width R) and writes columns ro[g]:ro[g + 1] of out [SPLIT, P, sum r] (stride_og = 0); axis 0
    also walks V's columns in chunks of BLOCK_R, and a chunk past r_g reads and writes nothing.
    M_BUCKET only keys the autotuner. COL_DOT (no Z_DROPOUT): also col[split, g, p] = sum over the same rows of
    Z[m, p] * Y[m, p] in fp32 (Y [M, P], col fp32 [SPLIT, G, P]; DoRA's dm from dy and its saved Z), unscaled; RAGGED:
    written by the first rank chunk only.
    """
    g = tl.program_id(1)
    if RAGGED:
        num_rc = tl.cdiv(R, BLOCK_R)
        pid_p = tl.program_id(0) // num_rc
        r0 = (tl.program_id(0) % num_rc) * BLOCK_R
        col0 = tl.multiple_of(tl.load(ro_ptr + g), RAGGED)
        rank = tl.minimum(tl.load(ro_ptr + g + 1) - col0, R)
    else:
        pid_p = tl.program_id(0)
        r0 = 0
        col0 = 0
        rank = R
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if GROUPED:
        start = tl.load(seg_ptr + g)
        end = tl.load(seg_ptr + g + 1)
        if RAGGED and COL_DOT:  # the first rank chunk also reduces the column dot, whatever the rank
            end = tl.where((r0 < rank) | (r0 == 0), end, start)
        elif RAGGED:
            end = tl.where(r0 < rank, end, start)
    else:
        start = 0
        end = M
    rows_per_split = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_M) * BLOCK_M
    lo = start + split * rows_per_split
    hi = min(lo + rows_per_split, end)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < rank
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    col = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < hi
        if HAS_PERM:
            rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            rows = offs_m.to(tl.int64)
        z = tl.load(z_ptr + rows[:, None] * stride_zm + offs_p[None, :] * stride_zp,
                    mask=mask_m[:, None] & mask_p[None, :], other=0.0)  # [BLOCK_M, BLOCK_P]
        if COL_DOT:
            y = tl.load(y_ptr + rows[:, None] * stride_ym + offs_p[None, :] * stride_yp,
                        mask=mask_m[:, None] & mask_p[None, :], other=0.0)  # [BLOCK_M, BLOCK_P]
            col += tl.sum(z.to(tl.float32) * y.to(tl.float32), axis=0)
        if Z_DROPOUT:
            keep = unpack_keep(bits_ptr, rows, mask_m, pid_p * BLOCK_P, tl.cdiv(P, 32), stride_bits, BLOCK_M, BLOCK_P)
            z = tl.where(keep, z, tl.zeros_like(z))
        v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        acc = tl.dot(tl.trans(z), v.to(z.dtype), acc, input_precision=INPUT_PRECISION)

    if HAS_SCALE_VEC:
        s = tl.load(scale_ptr + g).to(tl.float32)
    else:
        s = scaling
    if Z_DROPOUT:
        s = s / (1.0 - dropout_p)
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_os + g.to(tl.int64) * stride_og
                + offs_p[:, None] * stride_op + (col0 + offs_r)[None, :] * stride_or)
    tl.store(out_ptrs, acc * s, mask=mask_p[:, None] & mask_r[None, :])
    if COL_DOT:
        tl.store(col_ptr + split.to(tl.int64) * stride_cs + g * stride_cg + offs_p, col, mask=mask_p & (r0 == 0))


def grad_configs():
    """Autotune candidates for the token reduction (BLOCK_R is fixed by R); the launcher prunes by what fits
    (the last ones keep r = 256 within shared memory and registers)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_P": bp}, num_warps=w, num_stages=s)
        for bm, bp, w, s in [(64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3),
                             (32, 128, 4, 4), (256, 64, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2),
                             (32, 32, 4, 3), (32, 32, 8, 2)]
    ]
