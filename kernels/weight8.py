"""Operand fetch of a block-scaled FP8 weight (DeepSeek-V3 / transformers' ``fp8`` format), dequantised in
registers: the GEMM core's W tiles when ``W_FORMAT == FP8`` (W8A16), so no 16-bit W is ever written.

The format (``fastlora.quant.quantize_fp8_blockwise``): W [N, K] float8_e4m3fn, row-major, and fp32 scales
S [cdiv(N, QBLOCK), cdiv(K, QBLOCK2)] (``weight_scale_inv``), W[n, k] = float(q[n, k]) * S[n // QBLOCK, k // QBLOCK2];
edge blocks are partial. The bytes are read as uint8 and decoded with integer ops (exact for all 256 codes, NaN for
0x7F / 0xFF), one path on every GPU and in the interpreter (whose float8 load gets the NaN codes wrong). The tile is
the operand as the main loop multiplies it, [BLOCK_K, BLOCK_N], through the same strides as a dense W: the forward
reads the stored rows along N, dx (W_TRANS) the same bytes transposed.

W8A8 (the forward's opt-in ``X_FORMAT == X_FP8``): X is quantised in the K loop per token per BLOCK_K = 128 channels
(DeepSeek-V3's act_quant: sx = amax(|x|) * fp32(1 / 448), x * (1 / sx) rounded to e4m3), the W bytes are taken as
e4m3 as they are, and each K step is one e4m3 dot, scaled by sx per row and the W block scale per column before it
joins the fp32 accumulator (``dot_w8a8``).
"""

import os

import triton
import triton.language as tl

# X_FORMAT values: how the GEMM core takes its X operand (the launcher's ``BlockFP8.fp8_activations``).
X_PLAIN = tl.constexpr(0)  # as loaded, cast to W_COMPUTE
X_FP8 = tl.constexpr(1)  # quantised per token per BLOCK_K channels to e4m3, an fp8 dot (W8A8; FP8 W, forward only)
E4M3_MAX = tl.constexpr(448.0)
# The interpreter's fp32 -> float8e4nv cast loses the carry when the mantissa rounds up across a power of two
# (127.96 -> 64, not 128): there the codes come from ``e4m3_rne``; GPUs use the hardware cast (cvt.rn.satfinite,
# which the integer encoder matches but spilled beside the 128x128 accumulator on sm_90: 8 B).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def decode_e4m3(byte):
    """fp32 value of e4m3fn codes (uint8): the sign and the 7 low bits moved into an fp16 (exponent bias 15, e4m3's 7:
    normal and subnormal codes alike are fp16 values 2^-8 times theirs), then scaled back by 256, exactly."""
    b = byte.to(tl.uint16)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    w = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((b & 0x7F) == 0x7F, float("nan"), w)


@triton.jit
def load_fp8(w_ptrs, mask, s_ptr, k0, offs_k, offs_n, mask_n, row_len,
             BLOCK_K: tl.constexpr, W_TRANS: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr):
    """fp32 operand tile [BLOCK_K, BLOCK_N] (0 where ``mask`` is off) of an FP8 weight: decoded bytes at ``w_ptrs``
    times their block scales. Operand element (k, n) is stored (n, k) (forward) or, W_TRANS (dx), (k, n); the stored
    rows are ``row_len`` bytes long (K), S's rows cdiv(row_len, QBLOCK2) scales. When a BLOCK_K step lies inside one
    block along the reduction (k0 a multiple of BLOCK_K), the scales are one vector along N, else one per element."""
    KB: tl.constexpr = QBLOCK if W_TRANS else QBLOCK2  # block length along the reduction
    NB: tl.constexpr = QBLOCK2 if W_TRANS else QBLOCK
    sb = tl.cdiv(row_len, QBLOCK2)
    stride_sk = sb if W_TRANS else 1
    stride_sn = 1 if W_TRANS else sb
    w = decode_e4m3(tl.load(w_ptrs, mask=mask, other=0))  # [BLOCK_K, BLOCK_N] fp32
    if KB % BLOCK_K == 0:
        s = tl.load(s_ptr + (k0 // KB) * stride_sk + (offs_n // NB) * stride_sn, mask=mask_n, other=0.0)[None, :]
    else:
        s = tl.load(s_ptr + ((k0 + offs_k) // KB)[:, None] * stride_sk + (offs_n // NB)[None, :] * stride_sn,
                    mask=mask & mask_n[None, :], other=0.0)  # ``mask`` may leave N unmasked (the FMA path's clamp)
    return w * s


@triton.jit
def e4m3_rne(v):
    """e4m3fn codes (uint8) of fp32 values by integer ops, rounded to nearest even and saturated at +-448, as the
    hardware's cvt.rn.satfinite.e4m3x2.f32 does (torch's cast of the clamped values: ties, carries, subnormals and
    saturation in tests/test_fp8_w8a8.py)."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(bits & 0x7FFFFFFF, 0x43E00000)  # |v| saturated at 448
    r = a + 0x7FFFF + ((a >> 20) & 1)  # the 23-bit mantissa rounded to 3 bits; a carry moves into the exponent
    normal = ((r >> 20) & 0x7) | (((r >> 23) - 120) << 3)  # e4m3's exponent bias 7 against fp32's 127
    af = a.to(tl.float32, bitcast=True)
    sub = ((af * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)  # |v| < 2^-6: multiples of 2^-9, fp32's own RNE
    code = tl.where(a < 0x3C800000, sub, normal)
    return (code | sign).to(tl.uint8)


@triton.jit
def quantize_rows_e4m3(x):
    """(e4m3 tile, fp32 scale per row) of an X tile [BLOCK_M, BLOCK_K]: sx = amax(|row|) * fp32(1 / 448) (1 for an
    all-zero row), codes = e4m3(x * (1 / sx)) with the reciprocal correctly rounded (div.rn, once per row), so every
    GPU and the interpreter give ``reference.fake_quant_fp8_act``'s codes and scales exactly."""
    amax = tl.max(tl.abs(x), axis=1).to(tl.float32)
    sx = tl.where(amax > 0, amax * (1.0 / E4M3_MAX), 1.0)
    xs = x.to(tl.float32) * tl.math.div_rn(tl.full(sx.shape, 1.0, tl.float32), sx)[:, None]
    if INTERPRETED:
        xq = e4m3_rne(xs).to(tl.float8e4nv, bitcast=True)
    else:
        xq = xs.to(tl.float8e4nv)
    return xq, sx


@triton.jit
def dot_w8a8(acc, x, w_ptrs, mask, s_ptr, k0, n0, offs_n, mask_n, row_len, BLOCK_N: tl.constexpr,
             QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr):
    """acc + one K step of X W^T in W8A8: x [BLOCK_M, BLOCK_K] quantised per row (``quantize_rows_e4m3``), the W
    bytes [BLOCK_K, BLOCK_N] at ``w_ptrs`` (0 where ``mask`` is off) as e4m3, one fp8 dot, then the step scaled by sx
    per row and by each column's W block scale. The step lies inside one W block along K (QBLOCK2 % BLOCK_K == 0); the
    tile's columns n0.. inside one along N (QBLOCK % BLOCK_N == 0) share one scale, else a vector along N. ``row_len``:
    K, the stored rows' length."""
    xq, sx = quantize_rows_e4m3(x)
    wq = tl.load(w_ptrs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
    s_row = s_ptr + k0 // QBLOCK2
    sb = tl.cdiv(row_len, QBLOCK2)
    if QBLOCK % BLOCK_N == 0:  # one scalar per step: a [BLOCK_N] vector beside the accumulators spilled 8 B (sm_90)
        return acc + tl.dot(xq, wq) * (sx * tl.load(s_row + (n0 // QBLOCK) * sb))[:, None]
    sw = tl.load(s_row + (offs_n // QBLOCK) * sb, mask=mask_n, other=0.0)
    return acc + tl.dot(xq, wq) * sx[:, None] * sw[None, :]
