"""Materialise the dropout keep-mask the fused kernels generate, for the reference and the tests."""

import triton
import triton.language as tl

from .tiles import dropout_keep


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, k] = keep(seed, m*K + k) as int8, out contiguous [M, K]. Grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, offs_m.to(tl.int64), offs_k, K, dropout_p)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)
