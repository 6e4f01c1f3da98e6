"""Operand fetch of a bitsandbytes 4-bit weight (NF4/FP4, blockwise absmax, optional double quant), dequantised
in registers: the GEMM core's W tiles when the weight is packed (``W_FORMAT``), so no 16-bit W is ever written.

The format (``fastlora.quant``): W [N, K] flattened row-major, element j is nibble j of the packed bytes (high
nibble first), a 4-bit index into a 16-entry fp32 codebook, scaled by absmax[j // QBLOCK]. With double quant
absmax is uint8 and decodes as code2[absmax] * absmax2[block // QBLOCK2] + offset. The kernels need K to be a
multiple of QBLOCK (every row starts on a byte and a block boundary), so a tile of BLOCK_C consecutive columns
of one row reads BLOCK_C / 2 bytes and max(BLOCK_C / QBLOCK, 1) block scales, never one scale per element.
"""

import triton
import triton.language as tl

# W_FORMAT values: how the GEMM core reads its W operand (the launcher's typed value: a tensor, ``Packed4bit`` or
# ``BlockFP8``).
DENSE = tl.constexpr(0)
ABSMAX = tl.constexpr(1)  # 4-bit codes, fp32 absmax per block
DOUBLE = tl.constexpr(2)  # 4-bit codes, 8-bit absmax per block, fp32 absmax2 per QBLOCK2 blocks, fp32 offset
FP8 = tl.constexpr(3)  # e4m3 bytes, fp32 scale per QBLOCK x QBLOCK2 block (``weight8.py``)


@triton.jit
def load_4bit(w_ptr, quant, codebook, rows, mask_rows, c0, K,
              BLOCK_C: tl.constexpr, W_FORMAT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr):
    """fp32 tile W[rows, c0 : c0 + BLOCK_C] of the stored [N, K] weight (0 outside), dequantised as bitsandbytes
    does: codebook[q] * absmax, an fp32 multiply (the double-quant absmax decode may contract to an FMA).

    rows: int64 [R] row indices; c0: a multiple of BLOCK_C; codebook: the [16] fp32 code, already loaded;
    quant: the (absmax, absmax2, code, code2, offset) pointers.
    """
    R: tl.constexpr = rows.shape[0]
    HALF: tl.constexpr = BLOCK_C // 2
    NB: tl.constexpr = max(BLOCK_C // QBLOCK, 1)  # block scales per tile row
    cols = c0 // 2 + tl.arange(0, HALF)
    mask = mask_rows[:, None] & (cols < K // 2)[None, :]
    byte = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :], mask=mask, other=0).to(tl.int32)
    q = tl.reshape(tl.join(byte >> 4, byte & 15), (R * BLOCK_C,))  # element 2i is the high nibble of byte i
    value = tl.reshape(tl.gather(codebook, q, 0), (R, NB, BLOCK_C // NB))

    blocks = c0 // QBLOCK + tl.arange(0, NB)
    bmask = mask_rows[:, None] & (blocks < K // QBLOCK)[None, :]
    block = rows[:, None] * (K // QBLOCK) + blocks[None, :]  # [R, NB]
    if W_FORMAT == DOUBLE:
        a8 = tl.load(quant[0] + block, mask=bmask, other=0).to(tl.int32)
        absmax = tl.load(quant[3] + a8) * tl.load(quant[1] + block // QBLOCK2, mask=bmask, other=0.0)
        absmax = tl.where(bmask, absmax + tl.load(quant[4]), 0.0)
    else:
        absmax = tl.load(quant[0] + block, mask=bmask, other=0.0)
    return tl.reshape(value * absmax[:, :, None], (R, BLOCK_C))
