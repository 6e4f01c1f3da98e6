"""The one GEMM core: out = drop?(X) W^T + bias + scale * drop?(T B^T), dense or per-token adapters.

Every matrix product of fastlora's forward and backward with a large reduction runs here:

    forward   T  = drop(x) A^T            shrink:  X=x,  W=A,    HAS_LORA=0, X_DROPOUT (writes the packed mask)
              y  = x W^T + b + s T B^T    main:    X=x,  W=W,    T=T, B=B
    backward  U  = dy B                   shrink:  X=dy, W=B^T,  HAS_LORA=0
              dx = dy W + s D*(U A)       main:    X=dy, W=W^T,  T=U, B=A^T, OUT_DROPOUT (reads the packed mask)

DoRA (``DORA``, see ``dora_scale``): the magnitude scale g [N] is a per-column factor of the epilogue (forward) or
of the X tiles as they are loaded (dx: X = dy, whose columns are the forward's outputs); with dropout a second
accumulator over the same W tiles carries PEFT's (g - 1) * W d(x) term (docs/dora.md). Grouped (B_GROUPED), g is
[G, N], one row per adapter, gathered per tile row by its adapter id (plain-LoRA adapters and base-only rows: 1).

Transposes are stride swaps, never copies. W_FORMAT says what the W operand is: dense, a bitsandbytes 4-bit weight
(packed codes + block scales, ``weight4.py``) or a block-scaled FP8 weight (e4m3 bytes + 2-D block scales,
``weight8.py``), the last two dequantised per K tile in registers. X_FORMAT says what the X operand becomes: as
loaded (cast to the product's dtype) or, over an FP8 W in the forward (W8A8, ``weight8.dot_w8a8``), quantised per
token per 128 channels to e4m3 for an fp8 dot per K step. With HAS_PERM, row m of the tile
space is token perm[m] (tokens sorted by adapter), so X is gathered and out scattered in place. With W_GROUPED
(grouped shrink) W is a stack [G, N, K]; the sorted rows are cut into tiles at the adapter segment offsets, so
each tile runs the ordinary (pipelined) K loop on one adapter's W, and base-only rows come out zero. With
B_GROUPED (grouped main) B is a stack [G, N, R], read per adapter present in the tile (``grouped_dot``).

Each tile's accumulator starts as the low-rank term (R in chunks of BLOCK_R, masked when OUT_DROPOUT), then
the K loop adds X W^T into it: one BLOCK_M x BLOCK_N fp32 accumulator, never two. Operands come through
pointers (cp.async pipelining, any strides, gathers) or, with USE_TMA (Hopper), through tensor descriptors
with a persistent grid that walks tiles in the same grouped order.
"""

import triton
import triton.language as tl

from .tiles import grouped_dot, load_dropped, ragged_dot, segment_tile, tile_mn, unpack_keep
from .weight4 import ABSMAX, DENSE, DOUBLE, FP8, load_4bit
from .weight8 import X_FP8, dot_w8a8, load_fp8

# DORA values: how the GEMM core applies a DoRA magnitude scale g [N] (per output column of the forward).
NO_DORA = tl.constexpr(0)
FWD = tl.constexpr(1)  # out = g * acc + bias; Z (optional) = acc
FWD_DROP = tl.constexpr(2)  # acc2 over keep * X (bits): out = acc + (g - 1) * Z + bias, Z = acc2 / (1 - p)
DX = tl.constexpr(3)  # X tiles (dy) scaled by g along K as loaded
DX_DROP = tl.constexpr(4)  # acc2 = low-rank + ((g - 1) * X) W^T; out = acc + keep * acc2 / (1 - p)


@triton.jit
def dora_g(g_ptr, ids, offs, mask, length, PER_ROW: tl.constexpr):
    """DoRA's scale for columns ``offs``: [1, C] from g [length] or, PER_ROW (grouped), [BLOCK_M, C] from g [G, length]
    (contiguous) at each row's adapter ``ids``; base-only rows (id -1) get 1."""
    if PER_ROW:
        g = tl.load(g_ptr + ids.to(tl.int64)[:, None] * length + offs[None, :],
                    mask=(ids >= 0)[:, None] & mask[None, :], other=1.0)  # [BLOCK_M, C] fp32
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)[None, :]  # [1, C] fp32
    return g


@triton.jit
def dora_scale(x, g_ptr, ids, k0, offs_k, mask_k, K, minus: tl.constexpr, PER_ROW: tl.constexpr,
               dtype: tl.constexpr):
    """X tile [BLOCK_M, BLOCK_K] with column k scaled by g[k0 + k] (of the row's adapter when PER_ROW; minus one
    when ``minus``), in ``dtype`` (X's, or a 4-bit W's compute dtype: one rounding)."""
    g = dora_g(g_ptr, ids, k0 + offs_k, mask_k, K, PER_ROW)
    if minus:
        g = g - 1.0
    return (x.to(tl.float32) * g).to(dtype)


@triton.jit
def _lowrank(
    t_ptr, b_ptr, scale_ptr, bits_ptr, ro_ptr, rows, ids, n0, offs_n, mask_m, mask_n, N, R,
    stride_tm, stride_tr, stride_bg, stride_bn, stride_br, stride_bits, scaling, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    B_GROUPED: tl.constexpr, HAS_SCALE_VEC: tl.constexpr, OUT_DROPOUT: tl.constexpr, RAGGED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, dtype: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 = drop?(s * T B^T), R walked in chunks of BLOCK_R; s is folded into T rows. RAGGED:
    each row's adapter at its own rank (``ragged_dot``)."""
    if HAS_SCALE_VEC:
        s = tl.load(scale_ptr + ids, mask=ids >= 0, other=0.0).to(tl.float32)
    else:
        s = tl.full((BLOCK_M,), scaling, tl.float32)
    if OUT_DROPOUT:
        s = s * (1.0 / (1.0 - dropout_p))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if RAGGED:
        acc = ragged_dot(acc, t_ptr, rows, ids, s, mask_m, ro_ptr, b_ptr + offs_n.to(tl.int64) * stride_bn, mask_n,
                         R, stride_tm, stride_tr, stride_br, BLOCK_R, RAGGED, INPUT_PRECISION, dtype)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
            t = (t * s[:, None]).to(dtype)
            b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_r[:, None] * stride_br  # [R, N] tile
            b_mask = mask_r[:, None] & mask_n[None, :]
            if B_GROUPED:
                acc = grouped_dot(acc, t, ids, b_ptrs, b_mask, stride_bg, INPUT_PRECISION)
            else:
                b = tl.load(b_ptrs, mask=b_mask, other=0.0)
                acc = tl.dot(t, b.to(dtype), acc, input_precision=INPUT_PRECISION)
    if OUT_DROPOUT:
        keep = unpack_keep(bits_ptr, rows, mask_m, n0, tl.cdiv(N, 32), stride_bits, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc, 0.0)
    return acc


@triton.jit
def _w_tile(w_ptr, w_ptrs, quant, codebook, k0, offs_k, mask_k, n0, offs_n, mask_n, mask_wn, stride_wn, stride_wk,
            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, W_FORMAT: tl.constexpr, W_TRANS: tl.constexpr,
            QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, dt: tl.constexpr):
    """The W operand tile [BLOCK_K, BLOCK_N] of one K step in ``dt``: dense (at ``w_ptrs``), FP8 (the bytes through W's
    strides, dx transposed, scaled per block) or 4-bit (forward: rows offs_n, columns k0.., transposed; dx: rows k0..,
    columns n0..), dequantised in registers."""
    if W_FORMAT == DENSE:
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_wn[None, :], other=0.0)
    elif W_FORMAT == FP8:
        w = load_fp8(w_ptrs, mask_k[:, None] & mask_wn[None, :], quant[0], k0, offs_k, offs_n, mask_n,
                     stride_wk if W_TRANS else stride_wn, BLOCK_K, W_TRANS, QBLOCK, QBLOCK2)
    elif W_TRANS:
        w = load_4bit(w_ptr, quant, codebook, (k0 + offs_k).to(tl.int64), mask_k, n0, stride_wk, BLOCK_N, W_FORMAT,
                      QBLOCK, QBLOCK2)
    else:
        w = load_4bit(w_ptr, quant, codebook, offs_n.to(tl.int64), mask_n, k0, stride_wn, BLOCK_K, W_FORMAT, QBLOCK,
                      QBLOCK2).T
    return w.to(dt)


@triton.jit
def _mainloop_ptr(
    acc, acc2, x_ptr, w_ptr, bits_ptr, g_ptr, quant, rows, ids, n0, offs_n, mask_m, mask_n, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bits, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_DROPOUT: tl.constexpr,
    W_KMAJOR: tl.constexpr, W_FORMAT: tl.constexpr, W_TRANS: tl.constexpr, QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr, W_COMPUTE: tl.constexpr, X_FORMAT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FMA: tl.constexpr, DORA: tl.constexpr, DORA_ROWS: tl.constexpr,
):
    """acc += drop?(X[rows]) W^T with pointer loads (any strides, gathered rows). With X_DROPOUT the keep-mask
    is drawn here (Philox) and also written, packed, to bits (the shrink has one column tile, so once). With a
    quantised W_FORMAT, W is fetched 4-bit (``quant``: absmax, absmax2, code, code2, offset pointers) or FP8
    (``quant[0]``: the block scales) and dequantised, from the stored [N, K] weight (forward) or, W_TRANS, its
    transpose (dx); the stored row length is the unit stride's partner (stride_wn, or stride_wk when W_TRANS). The
    product runs in W_COMPUTE (bitsandbytes' compute dtype; FP8: X's), X tiles cast to it in registers, whatever X's
    own dtype; X_FORMAT == X_FP8 (FP8 W, forward): X quantised per row per K step, an e4m3 dot (W8A8). DoRA (dense,
    4-bit or FP8 W, the same dots either way): DX scales the X tiles by g (each row by its adapter's g when DORA_ROWS,
    grouped); FWD_DROP and DX_DROP also add the second product of the same W tile into acc2 (returned)."""
    offs_k = tl.arange(0, BLOCK_K)
    # FMA dots (fp32 without tf32): rows past the tile's end and, for a K-contiguous W, columns past N read row /
    # column 0 (never stored) instead of being masked, so no row or column predicates stay live across the K loop
    # (ptxas parked them on the stack). Tensor-core tiles keep the masks: there the clamp cost registers.
    rows_x = rows
    mask_xm = mask_m
    cols_w = offs_n
    mask_wn = mask_n
    if FMA:
        rows_x = tl.where(mask_m, rows, 0)
        mask_xm = tl.full((BLOCK_M,), 1, tl.int1)
        if W_KMAJOR:
            cols_w = tl.where(mask_n, offs_n, 0)
            mask_wn = tl.full((BLOCK_N,), 1, tl.int1)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols_w.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    dt: tl.constexpr = x_ptr.dtype.element_ty if W_FORMAT == DENSE else W_COMPUTE  # the dot's operand dtype
    codebook = tl.load(quant[2] + tl.arange(0, 16)) if W_FORMAT == ABSMAX or W_FORMAT == DOUBLE else None
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        if X_DROPOUT:
            x, words = load_dropped(x_ptr, rows, rows_x, mask_xm, k0, K, stride_xm, stride_xk, seed, dropout_p,
                                    BLOCK_M, BLOCK_K)  # [BLOCK_M, BLOCK_K], [BLOCK_M, BLOCK_K // 32]
            offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            tl.store(bits_ptr + rows[:, None] * stride_bits + offs_w[None, :], words,
                     mask=mask_m[:, None] & (offs_w < tl.cdiv(K, 32))[None, :])
        else:
            x = tl.load(x_ptrs, mask=mask_xm[:, None] & mask_k[None, :], other=0.0)
        if X_FORMAT == X_FP8:  # W8A8: no dequantised W tile; both scales applied to the step's fp8 product
            acc = dot_w8a8(acc, x, w_ptrs, mask_k[:, None] & mask_wn[None, :], quant[0], k0, n0, offs_n, mask_n,
                           stride_wn, BLOCK_N, QBLOCK, QBLOCK2)
        else:
            w = _w_tile(w_ptr, w_ptrs, quant, codebook, k0, offs_k, mask_k, n0, offs_n, mask_n, mask_wn, stride_wn,
                        stride_wk, BLOCK_K, BLOCK_N, W_FORMAT, W_TRANS, QBLOCK, QBLOCK2, dt)
            if DORA == DX:
                acc = tl.dot(dora_scale(x, g_ptr, ids, k0, offs_k, mask_k, K, False, DORA_ROWS, dt), w, acc,
                             input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(x.to(dt), w, acc, input_precision=INPUT_PRECISION)
            if DORA == FWD_DROP:  # the dropped x of the same tile, from the mask the shrink wrote
                keep = unpack_keep(bits_ptr, rows, mask_m, k0, tl.cdiv(K, 32), stride_bits, BLOCK_M, BLOCK_K)
                acc2 = tl.dot(tl.where(keep, x, tl.zeros_like(x)).to(dt), w, acc2, input_precision=INPUT_PRECISION)
            if DORA == DX_DROP:
                acc2 = tl.dot(dora_scale(x, g_ptr, ids, k0, offs_k, mask_k, K, True, DORA_ROWS, dt), w, acc2,
                              input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if X_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    return acc, acc2


@triton.jit
def _mainloop_tma(acc, x_desc, w_desc, g_ptr, off_m, off_n, K, BLOCK_K: tl.constexpr, W_KMAJOR: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, DORA: tl.constexpr):
    """acc += X W^T with TMA tile loads (out-of-bounds reads are zeros). W_KMAJOR: w_desc is [N, K], else [K, N].
    DORA == DX: X tiles scaled by g along K."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([off_m, k0])  # [BLOCK_M, BLOCK_K]
        if DORA == DX:
            x = dora_scale(x, g_ptr, offs_k, k0, offs_k, offs_k < K - k0, K, False, False, x.dtype)
        if W_KMAJOR:
            w = w_desc.load([off_n, k0]).T  # [BLOCK_K, BLOCK_N]
        else:
            w = w_desc.load([k0, off_n])
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _dora_epilogue(acc, acc2, g_ptr, z_ptr, bits_ptr, rows, ids, n0, offs_n, mask_m, mask_n, N, stride_zm, stride_zn,
                   stride_bits, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DORA: tl.constexpr,
                   STORE_Z: tl.constexpr, DORA_ROWS: tl.constexpr):
    """The DoRA output tile before the bias. FWD: g * acc (Z = acc); FWD_DROP: acc + (g - 1) * Z, Z = acc2 / (1 - p);
    DX_DROP: acc + keep * acc2 / (1 - p). Z, the term g multiplies, is stored (out's dtype) when STORE_Z."""
    if DORA == DX_DROP:
        keep = unpack_keep(bits_ptr, rows, mask_m, n0, tl.cdiv(N, 32), stride_bits, BLOCK_M, BLOCK_N)
        return acc + tl.where(keep, acc2 * (1.0 / (1.0 - dropout_p)), 0.0)
    g = dora_g(g_ptr, ids, offs_n, mask_n, N, DORA_ROWS)  # [1 or BLOCK_M, BLOCK_N] fp32
    z = acc
    if DORA == FWD_DROP:
        z = acc2 * (1.0 / (1.0 - dropout_p))
    if STORE_Z:
        tl.store(z_ptr + rows[:, None] * stride_zm + offs_n[None, :] * stride_zn, z.to(z_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    if DORA == FWD:
        return acc * g
    return acc + (g - 1.0) * z


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, out_ptr, perm_ptr, ids_ptr, seg_ptr, ro_ptr, scale_ptr, bits_ptr, g_ptr,
    z_ptr,
    qabs_ptr, qabs2_ptr, qcode_ptr, qcode2_ptr, qoff_ptr,
    x_desc, w_desc, out_desc,
    M, N, K, R, G, M_BUCKET,
    stride_xm, stride_xk,
    stride_wg, stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_bg, stride_bn, stride_br,
    stride_om, stride_on,
    stride_bits,
    scaling, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_PERM: tl.constexpr,
    W_GROUPED: tl.constexpr, B_GROUPED: tl.constexpr, RAGGED: tl.constexpr, HAS_SCALE_VEC: tl.constexpr,
    X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_OK: tl.constexpr, W_KMAJOR: tl.constexpr,
    W_FORMAT: tl.constexpr, W_TRANS: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
    W_COMPUTE: tl.constexpr, X_FORMAT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DORA: tl.constexpr,
    STORE_Z: tl.constexpr,
):
    """out [M, N] (rows in caller order) from X [M, K], W [(G,) N, K], T [M, R] fp32, B [(G,) N, R].

    Grid: (programs,), each walking tiles pid, pid + programs, ... in GROUP_M-grouped order; programs is the
    tile count (one tile each) or, with USE_TMA, the SM count (persistent). With W_GROUPED the row tiles are
    cut at the adapter segments seg [G + 1] instead: (cdiv(M, BLOCK_M) + G) * cdiv(N, BLOCK_N) tiles, the
    surplus ones empty. Accumulates in fp32; products run in X's dtype (tf32 or ieee for fp32 per
    INPUT_PRECISION). ids: sorted adapter id per tile row (-1 = base only); scale_ptr: per-adapter scaling
    (HAS_SCALE_VEC) else ``scaling``. bits: the dropout keep-mask, int32 words [M, cdiv(K, 32)] by token —
    written by the X_DROPOUT shrink, read by OUT_DROPOUT. USE_TMA needs TMA_OK (the launcher built descriptors:
    16-byte aligned, unit inner stride) and no gather. M_BUCKET and TMA_OK also key the autotuner. W_FORMAT
    (``weight4``: DENSE, ABSMAX, DOUBLE, FP8) reads W as 4-bit codes at w_ptr with their block scales (qabs..qoff
    pointers, QBLOCK elements per absmax, QBLOCK2 absmax per absmax2) or as e4m3 bytes with fp32 scales at qabs_ptr
    per QBLOCK x QBLOCK2 block of the stored [N, K], and multiplies in W_COMPUTE; W_TRANS: the
    operand is the stored weight's transpose (dx). The low-rank term stays in X's dtype (an fp32 X under a bf16
    4-bit base: exact adapter products, as PEFT's QLoRA computes them). W_KMAJOR: W's unit stride runs along K.
    RAGGED (with W_GROUPED or B_GROUPED; > 0, every offset a multiple of it, so 8 lets B's rank columns load as
    16-byte vectors and cp.async): the stack is ragged, adapter g at its own rank r_g = ro[g + 1] - ro[g]:
    W [sum r, K] (shrink; rows ro[g]:ro[g + 1], out's columns past r_g left unwritten) or B [N, sum r] (main; columns
    ro[g]:ro[g + 1], read over r_g only), T [M, R] with R the width (at least every r_g).
    A grouped W with HAS_LORA is a mixture of experts (main GEMMs: W [G, N, K], one weight per expert, B [G, N, R]):
    the same segment tiles, each on its expert's W, B and bias (bias [G, N] contiguous); rows of no expert are zero.
    DORA (dense or 4-bit W; the values above): g_ptr the fp32 magnitude scale [N] (forward) or [K] (dx); with
    B_GROUPED (grouped DoRA, dense W) g [G, N] / [G, K], contiguous, each row scaled by its adapter's row (base-only
    rows by 1). STORE_Z also writes the pre-scale term Z to z_ptr (out's strides, rows by token), which DoRA's
    magnitude gradient reads.
    X_FORMAT == X_FP8 (W8A8, an FP8 W in the forward, BLOCK_K = 128 and W's blocks along K a multiple of it): each X
    tile is quantised per row to e4m3 and multiplied by the e4m3 bytes in one fp8 dot per K step, scaled by both
    scales into the fp32 accumulator (``weight8.dot_w8a8``); the low-rank term is as for any W.
    """
    tl.static_assert(not (X_DROPOUT and HAS_LORA), "X_DROPOUT is the shrink's; the main GEMM takes OUT_DROPOUT")
    tl.static_assert(not USE_TMA or (TMA_OK and not HAS_PERM and not W_GROUPED and not X_DROPOUT))
    tl.static_assert(W_FORMAT == DENSE or not (USE_TMA or W_GROUPED), "quantised W: pointer loads, one weight")
    tl.static_assert(DORA == NO_DORA or (not W_GROUPED and (B_GROUPED or not HAS_PERM)))
    tl.static_assert(DORA == NO_DORA or W_FORMAT == DENSE or not B_GROUPED, "grouped DoRA: dense W")
    tl.static_assert(not USE_TMA or DORA == NO_DORA or DORA == FWD or DORA == DX, "two accumulators: pointers")
    tl.static_assert(X_FORMAT != X_FP8 or (W_FORMAT == FP8 and not W_TRANS and DORA == NO_DORA and not X_DROPOUT
                                          and QBLOCK2 % BLOCK_K == 0 and BLOCK_K == 128), "W8A8: FP8 W, forward")
    quant = (qabs_ptr, qabs2_ptr, qcode_ptr, qcode2_ptr, qoff_ptr)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = (tl.cdiv(M, BLOCK_M) + (G if W_GROUPED else 0)) * num_n
    # Programs own one tile each unless persistent (TMA). On the FMA path (fp32 'ieee') the tile loop is written
    # with one trip, which the compiler removes: ptxas kept per-program values live across it, on the stack.
    # Tensor-core tiles keep the plain loop (with one trip, 10 small mma.sync tiles on sm_90 kept 8 B of stack), but
    # for W8A8, whose 128x128 / 8 warps tiles held 250-255 registers with it (sm_90) and 229-234 without.
    fma: tl.constexpr = INPUT_PRECISION == "ieee" and W_COMPUTE == tl.float32  # as the launcher's _is_fma
    one_tile = not USE_TMA and (fma or X_FORMAT == X_FP8)
    last = tl.program_id(0) + 1 if one_tile else num_tiles
    for tile in tl.range(tl.program_id(0), last, 1 if one_tile else tl.num_programs(0), flatten=USE_TMA):
        w_base = w_ptr
        k_len = K
        n_end = N  # W's rows (out's columns) this tile computes
        if W_GROUPED:  # one adapter per tile: its W, or an empty K loop for base-only rows (their T is zero)
            row0, row_end, g = segment_tile(tile // num_n, seg_ptr, G, BLOCK_M)
            pid_n = tile % num_n
            if RAGGED:  # adapter g's rows ro[g]:ro[g + 1] of W [sum r, K]; T's columns past its rank are not written
                o = tl.multiple_of(tl.load(ro_ptr + tl.maximum(g, 0)), RAGGED)
                n_end = tl.where(g >= 0, tl.minimum(tl.load(ro_ptr + tl.maximum(g, 0) + 1) - o, N), 0)
                w_base += o.to(tl.int64) * stride_wn
                live = pid_n * BLOCK_N < n_end
                if X_DROPOUT:  # the first column tile draws the mask even at rank 0: DoRA's base term reads it
                    live = live | ((pid_n == 0) & (g >= 0))
                k_len = tl.where(live, K, 0)
            else:
                w_base += tl.maximum(g, 0).to(tl.int64) * stride_wg
                k_len = tl.where(g >= 0, K, 0)
        else:
            pid_m, pid_n = tile_mn(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            row0, row_end = pid_m * BLOCK_M, M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < row_end
        mask_n = offs_n < n_end
        if HAS_PERM:
            rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            rows = offs_m.to(tl.int64)
        if B_GROUPED or HAS_SCALE_VEC:
            ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
        else:
            ids = offs_m  # unused

        if HAS_LORA:  # DX_DROP masks its low-rank term with the second product, after the K loop
            acc = _lowrank(t_ptr, b_ptr, scale_ptr, bits_ptr, ro_ptr, rows, ids, pid_n * BLOCK_N, offs_n, mask_m,
                           mask_n, N, R, stride_tm, stride_tr, stride_bg, stride_bn, stride_br, stride_bits, scaling,
                           dropout_p, BLOCK_M, BLOCK_N, BLOCK_R, B_GROUPED, HAS_SCALE_VEC,
                           OUT_DROPOUT and DORA != DX_DROP, RAGGED, INPUT_PRECISION, x_ptr.dtype.element_ty)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if DORA == FWD_DROP:  # both products start from the low-rank term: Z = acc2 / (1 - p)
            acc2 = acc * (1.0 - dropout_p)
        elif DORA == DX_DROP:
            acc2 = acc
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc2 = tl.zeros((1, 1), dtype=tl.float32)  # unused
        if USE_TMA:
            acc = _mainloop_tma(acc, x_desc, w_desc, g_ptr, row0, pid_n * BLOCK_N, K, BLOCK_K, W_KMAJOR,
                                INPUT_PRECISION, DORA)
        else:
            acc, acc2 = _mainloop_ptr(acc, acc2, x_ptr, w_base, bits_ptr, g_ptr, quant, rows, ids, pid_n * BLOCK_N,
                                      offs_n, mask_m, mask_n, k_len, stride_xm, stride_xk, stride_wn, stride_wk,
                                      stride_bits, dropout_p, seed, BLOCK_M, BLOCK_N, BLOCK_K, X_DROPOUT, W_KMAJOR,
                                      W_FORMAT, W_TRANS, QBLOCK, QBLOCK2, W_COMPUTE, X_FORMAT, INPUT_PRECISION, fma,
                                      DORA, B_GROUPED)
        if DORA == FWD or DORA == FWD_DROP or DORA == DX_DROP:
            acc = _dora_epilogue(acc, acc2, g_ptr, z_ptr, bits_ptr, rows, ids, pid_n * BLOCK_N, offs_n, mask_m, mask_n,
                                 N, stride_om, stride_on, stride_bits, dropout_p, BLOCK_M, BLOCK_N, DORA, STORE_Z,
                                 B_GROUPED)
        if HAS_BIAS:
            if W_GROUPED:  # experts: the tile's expert's bias row [G, N]; rows of no expert (-1) stay zero
                acc += tl.load(bias_ptr + tl.maximum(g, 0).to(tl.int64) * N + offs_n, mask=mask_n & (g >= 0),
                               other=0.0).to(tl.float32)[None, :]
            else:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

        if USE_TMA:
            out_desc.store([row0, pid_n * BLOCK_N], acc.to(out_ptr.dtype.element_ty))
        else:
            out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The W8A8 forward's tiles (X_FORMAT == X_FP8: one K step per 128-channel activation block), which only that path
# takes and it only these (``fastlora._configs``): 0 spills on sm_90 with the low-rank term from the shrink's T; a
# shrink fused into the K loop spilled 32-96 B at r = 64, and 128x64x128 / 4 warps 24 B even without it.
W8A8_TILES = ((128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (64, 128, 128, 4, 3), (64, 64, 128, 4, 4))


def gemm_configs(shrink: bool, w8a8: bool = False):
    """Autotune candidates for the GEMM core; the launcher prunes by what fits the target (shared memory,
    accumulator registers, TMA availability).

    ``shrink`` kernels have N = R (one column tile of next_pow2(R)), so only BLOCK_M / BLOCK_K vary. Main-GEMM
    candidates are the pointer (cp.async) tiles for every GPU plus persistent TMA tiles for Hopper; ``w8a8``: the W8A8
    forward's own tiles instead (``W8A8_TILES``; the main GEMM's autotuner holds both lists, pruned by X_FORMAT).
    """
    if w8a8:
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": False},
                              num_warps=w, num_stages=s) for bm, bn, bk, w, s in W8A8_TILES]
    if shrink:
        return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": 1, "USE_TMA": False},
                              num_warps=w, num_stages=s)
                for bm, bk, w, s in [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 5),
                                     (128, 64, 8, 4), (128, 128, 8, 3), (64, 32, 4, 4), (64, 32, 8, 4),
                                     (128, 32, 8, 4), (32, 32, 4, 3), (32, 32, 8, 3)]]
    ptr = [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (64, 256, 64, 8, 3),
        (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 4), (32, 64, 128, 4, 5),
        (16, 64, 128, 4, 4),  # decode tile whose dequantised 4-bit W fits registers
        # fp32 without tf32 (FMA, operands in registers): K steps of 128 bytes
        (128, 64, 32, 8, 4), (64, 64, 32, 8, 4), (32, 64, 32, 8, 3), (32, 64, 32, 4, 3),
    ]
    tma = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
           (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": False},
                             num_warps=w, num_stages=s) for bm, bn, bk, w, s in ptr]
    configs += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": True},
                              num_warps=w, num_stages=s) for bm, bn, bk, w, s in tma]
    return configs
