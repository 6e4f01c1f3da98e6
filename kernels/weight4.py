"""Operand fetch of a bitsandbytes 4-bit weight (NF4/FP4, blockwise absmax, optional double quant), dequantised
in registers: the GEMM core's W tiles when the weight is packed (``W_QUANT``), so no 16-bit W is ever written.

The format (``fastlora.quant``): W [N, K] flattened row-major, element j is nibble j of the packed bytes (high
nibble first), a 4-bit index into a 16-entry fp32 codebook, scaled by absmax[j // QBLOCK]. With double quant
absmax is uint8 and decodes as code2[absmax] * absmax2[block // QBLOCK2] + offset. Every element is addressed by
its flat index, so the same fetch serves W (forward, K contiguous) and W^T (dx, N contiguous) and any N, K.
"""

import triton
import triton.language as tl

# W_QUANT values: how the GEMM core reads its W operand.
DENSE = tl.constexpr(0)
ABSMAX = tl.constexpr(1)  # 4-bit codes, fp32 absmax per block
DOUBLE = tl.constexpr(2)  # 4-bit codes, 8-bit absmax per block, fp32 absmax2 per QBLOCK2 blocks, fp32 offset


@triton.jit
def load_4bit(w_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, flat, mask,
              W_QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr):
    """fp32 values of the elements at int64 ``flat`` indices (0 where ``mask`` is False): code[q] * absmax,
    an fp32 multiply as bitsandbytes' dequantisation (the double-quant absmax decode may contract to an FMA)."""
    byte = tl.load(w_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where((flat % 2) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + q)
    block = flat // QBLOCK
    if W_QUANT == DOUBLE:
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0)
        absmax += tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * absmax, 0.0)
