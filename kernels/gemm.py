"""The one GEMM core: out = drop?(X) W^T + bias + scale * drop?((T B^T)), dense or per-token adapters.

Every matrix product of fastlora's forward and backward with a large reduction runs here:

    forward   T  = drop(x) A^T            shrink:  X=x,  W=A,    HAS_LORA=0, X_DROPOUT
              y  = x W^T + b + s T B^T    main:    X=x,  W=W,    T=T, B=B
    backward  U  = dy B                   shrink:  X=dy, W=B^T,  HAS_LORA=0
              dx = dy W + s D*(U A)       main:    X=dy, W=W^T,  T=U, B=A^T, OUT_DROPOUT

Transposes are stride swaps, never copies. With W_GROUPED (grouped shrink) W is a stack [G, N, K] and
row m uses W[ids[m]]; with B_GROUPED (grouped main) B is a stack [G, N, R]. With HAS_PERM, row m of the
tile space is token perm[m] (tokens sorted by adapter), so X is gathered and out scattered in place.
"""

import triton
import triton.language as tl

from .tiles import dropout_keep, grouped_dot, tile_mn


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, out_ptr, perm_ptr, ids_ptr, scale_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk,
    stride_wg, stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_bg, stride_bn, stride_br,
    stride_om, stride_on,
    scaling, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_PERM: tl.constexpr,
    W_GROUPED: tl.constexpr, B_GROUPED: tl.constexpr, HAS_SCALE_VEC: tl.constexpr,
    X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out [M, N] (rows in caller order) from X [M, K], W [(G,) N, K], T [M, R], B [(G,) N, R].

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped GROUP_M row-tiles at a time. Accumulates in
    fp32; products run in X's dtype (tf32 or ieee for fp32 per INPUT_PRECISION). ids: sorted adapter id
    per tile row (-1 = base only); scale_ptr: per-adapter scaling (HAS_SCALE_VEC) else ``scaling``.
    X_DROPOUT masks X by Philox(seed, token*K + k) and scales by 1/(1-p); OUT_DROPOUT masks the low-rank
    term by Philox(seed, token*N + n). M_BUCKET only keys the autotuner.
    """
    pid_m, pid_n = tile_mn(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    if W_GROUPED or B_GROUPED or HAS_SCALE_VEC:
        ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if X_DROPOUT:
            keep = dropout_keep(seed, rows, k0 + offs_k, K, dropout_p)
            x = tl.where(keep, x, tl.zeros_like(x))
        w_mask = mask_k[:, None] & mask_n[None, :]
        if W_GROUPED:
            acc = grouped_dot(acc, x, ids, w_ptrs, w_mask, stride_wg, INPUT_PRECISION)
        else:
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if X_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t_ptrs = t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr  # [BLOCK_M, BLOCK_R]
        t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_r[:, None] * stride_br  # [BLOCK_R, BLOCK_N]
        b_mask = mask_r[:, None] & mask_n[None, :]
        lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if B_GROUPED:
            lo = grouped_dot(lo, t, ids, b_ptrs, b_mask, stride_bg, INPUT_PRECISION)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            lo = tl.dot(t, b.to(t.dtype), lo, input_precision=INPUT_PRECISION)
        if HAS_SCALE_VEC:
            s = tl.load(scale_ptr + ids, mask=ids >= 0, other=0.0).to(tl.float32)
            lo = lo * s[:, None]
        else:
            lo = lo * scaling
        if OUT_DROPOUT:
            keep = dropout_keep(seed, rows, offs_n, N, dropout_p)
            lo = tl.where(keep, lo * (1.0 / (1.0 - dropout_p)), 0.0)
        acc += lo
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_configs(shrink: bool):
    """Autotune candidates for the GEMM core (the launcher prunes by shared memory).

    ``shrink`` kernels have N = R (one column tile of BLOCK_R), so only BLOCK_M / BLOCK_K vary.
    """
    configs = []
    if shrink:
        for bm, bk, w, s in [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 5),
                             (128, 64, 8, 4), (128, 128, 8, 3)]:
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": 1}, num_warps=w, num_stages=s))
        return configs
    for bm, bn, bk, w, s in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (64, 256, 64, 8, 3),
        (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 4), (32, 64, 128, 4, 5),
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=w, num_stages=s))
    return configs
