"""Operand fetch of a block-scaled FP8 weight (DeepSeek-V3 / transformers' ``fp8`` format), dequantised in
registers: the GEMM core's W tiles when ``W_FORMAT == FP8`` (W8A16), so no 16-bit W is ever written.

The format (``fastlora.quant.quantize_fp8_blockwise``): W [N, K] float8_e4m3fn, row-major, and fp32 scales
S [cdiv(N, QBLOCK), cdiv(K, QBLOCK2)] (``weight_scale_inv``), W[n, k] = float(q[n, k]) * S[n // QBLOCK, k // QBLOCK2];
edge blocks are partial. The bytes are read as uint8 and decoded with integer ops (exact for all 256 codes, NaN for
0x7F / 0xFF), one path on every GPU and in the interpreter (whose float8 load gets the NaN codes wrong). The tile is
the operand as the main loop multiplies it, [BLOCK_K, BLOCK_N], through the same strides as a dense W: the forward
reads the stored rows along N, dx (W_TRANS) the same bytes transposed.
"""

import triton
import triton.language as tl


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
