"""Jitted helpers shared by every fastlora kernel: tile order, dropout mask, the per-adapter dot."""

import triton
import triton.language as tl

# Sentinel larger than any adapter id; ids are < 2**31 - 1.
NO_ADAPTER = tl.constexpr(2**30)


@triton.jit
def tile_mn(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), GROUP_M row-tiles at a time so W tiles stay in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def dropout_keep(seed, rows, cols, row_len, dropout_p):
    """Keep-mask of element (row, col) of a row-major [*, row_len] matrix: Philox(seed, row*row_len+col) >= p.

    ``rows`` are int64 token indices in the caller's order, so the mask does not depend on tiling,
    sorting or which kernel regenerates it.
    """
    offs = rows[:, None] * row_len + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def grouped_dot(acc, lhs, ids, rhs_ptrs, rhs_mask, stride_g, INPUT_PRECISION: tl.constexpr):
    """acc[i, :] += lhs[i, :] @ rhs[ids[i]] for every row i, where rhs[g] is loaded from rhs_ptrs + g*stride_g.

    Rows with id < 0 get nothing. Loops once per distinct adapter present in the tile, so a tile of
    sorted tokens reads each adapter's operand once and mixed tiles stay exact.
    """
    g = tl.min(tl.where(ids >= 0, ids, NO_ADAPTER))
    while g < NO_ADAPTER:
        rhs = tl.load(rhs_ptrs + g.to(tl.int64) * stride_g, mask=rhs_mask, other=0.0)
        sel = tl.where((ids == g)[:, None], lhs, tl.zeros_like(lhs))
        acc = tl.dot(sel, rhs.to(lhs.dtype), acc, input_precision=INPUT_PRECISION)
        g = tl.min(tl.where(ids > g, ids, NO_ADAPTER))
    return acc
