"""Jitted helpers shared by every fastlora kernel: tile order (dense, or cut at adapter segments), dropout mask
(drawn and packed), the per-adapter dot."""

import triton
import triton.language as tl

# Sentinel larger than any adapter id; ids are < 2**31 - 1.
NO_ADAPTER = tl.constexpr(2**30)
# Segment offsets read per step when a tile looks up its adapter.
SEG_CHUNK = tl.constexpr(64)


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
def segment_tile(tile, seg_ptr, G, BLOCK_M: tl.constexpr):
    """(first row, end row, adapter) of row tile ``tile`` over rows sorted by adapter, cut at segment boundaries.

    Segment 0 holds the base-only rows [0, seg[0]) (adapter -1), segment g + 1 adapter g's rows [seg[g], seg[g+1]);
    each is cut into cdiv(rows, BLOCK_M) tiles, numbered in segment order, so no tile mixes adapters and there
    are at most cdiv(M, BLOCK_M) + G of them. A tile past the last gets an empty row range and adapter -1.
    """
    done = 0  # segments that end at or before this tile
    before = 0  # tiles in those segments
    total = 0  # tiles in the segments scanned so far
    for s0 in range(0, G + 1, SEG_CHUNK):
        s = s0 + tl.arange(0, SEG_CHUNK)
        lo = tl.load(seg_ptr + s - 1, mask=(s >= 1) & (s <= G), other=0)
        hi = tl.load(seg_ptr + s, mask=s <= G, other=0)
        count = tl.cdiv(hi - lo, BLOCK_M)  # [SEG_CHUNK] tiles per segment, 0 past G
        passed = ((total + tl.cumsum(count, 0)) <= tile) & (s <= G)
        done += tl.sum(passed.to(tl.int32))
        before += tl.sum(tl.where(passed, count, 0))
        total += tl.sum(count)
    first = tl.load(seg_ptr + done - 1, mask=done >= 1, other=0)
    end = tl.load(seg_ptr + done, mask=done <= G, other=0)
    return first + (tile - before) * BLOCK_M, end, tl.where(done <= G, done - 1, -1)


@triton.jit
def dropout_keep(seed, rows, cols, row_len, dropout_p):
    """Keep-mask of element (row, col) of a row-major [*, row_len] matrix: Philox(seed, row*row_len+col) >= p.

    ``rows`` are int64 token indices in the caller's order, so the mask does not depend on tiling,
    sorting or which kernel regenerates it.
    """
    return philox_keep(seed, rows[:, None] * row_len + cols[None, :], dropout_p)


@triton.jit
def philox_keep(seed, offs, dropout_p):
    """The one definition of the dropout draw: element with flat offset token*row_len + col is kept when
    Philox(seed, offset) >= p. Every kernel that draws the mask goes through here."""
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def load_dropped(ptr, rows, rows_in, mask_m, k0, K, stride_m, stride_k, seed, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(X tile [BLOCK_M, BLOCK_K] at columns k0.. with dropped elements zeroed (unscaled), its keep-mask packed
    to [BLOCK_M, BLOCK_K // 32] int32 words, bit j of word w = column k0 + 32w + j).

    ``rows``: the token indices the mask is drawn for; ``rows_in``/``mask_m``: the rows read and their mask (the
    caller may clamp rows past the tile's end to a valid row instead of masking them; they are never stored).

    Same mask as ``dropout_keep``, drawn in 3-D [rows, words, 32] so the packing reduces the last axis of a
    tensor laid out for it: triton 3.6 fails to lower a reshape + sum of a 2-D mask that also feeds a dot.
    """
    cols = k0 + (tl.arange(0, BLOCK_K // 32) * 32)[None, :, None] + tl.arange(0, 32)[None, None, :]  # [1, W, 32]
    in_k = cols < K
    keep = philox_keep(seed, rows[:, None, None] * K + cols, dropout_p) & in_k
    x = tl.load(ptr + rows_in[:, None, None] * stride_m + cols * stride_k, mask=mask_m[:, None, None] & in_k,
                other=0.0)
    x = tl.where(keep, x, tl.zeros_like(x))
    words = tl.sum(keep.to(tl.int32) << tl.arange(0, 32)[None, None, :], axis=2)  # disjoint bits: sum == or
    return tl.reshape(x, (BLOCK_M, BLOCK_K)), words


@triton.jit
def unpack_keep(bits_ptr, rows, mask_m, col0, n_words, stride_bits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N] of columns col0.. (a multiple of 32) from the packed words of ``load_dropped``.

    Loads the [BLOCK_M, BLOCK_N // 32] words and expands them in registers: on sm_90 a 128x256 dx tile needs 192
    registers this way against 255 for a per-element gather of the words (static report, docs/perf-notes.md).
    """
    offs_w = col0 // 32 + tl.arange(0, BLOCK_N // 32)
    words = tl.load(bits_ptr + rows[:, None] * stride_bits + offs_w[None, :],
                    mask=mask_m[:, None] & (offs_w < n_words)[None, :], other=0)
    keep = ((words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1) != 0
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


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


@triton.jit
def ragged_dot(acc, t_ptr, rows, ids, s, mask_m, ro_ptr, b_ptrs, mask_n, R, stride_tm, stride_tr, stride_br,
               BLOCK_R: tl.constexpr, ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """acc[i, :] += s[i] * T[rows[i], :r_g] @ B[:, o_g:o_g + r_g]^T for every row i, g = ids[i], o_g = ro[g] and
    r_g = ro[g + 1] - o_g (the ragged stack's rank offsets, each a multiple of ALIGN; r_g capped at T's width R).

    ``b_ptrs`` [BLOCK_N]: B's rank column 0 for the tile's output columns. Like ``grouped_dot`` it loops once per
    distinct adapter present in the tile, and inside over that adapter's own rank in chunks of BLOCK_R: a rank-8
    adapter reads 8 columns of B, a rank-256 one 256, whatever else shares the call. Rows with id < 0 get nothing.
    """
    offs = tl.arange(0, BLOCK_R)
    g = tl.min(tl.where(ids >= 0, ids, NO_ADAPTER))
    while g < NO_ADAPTER:
        o = tl.multiple_of(tl.load(ro_ptr + g), ALIGN)
        rank = tl.minimum(tl.load(ro_ptr + g + 1) - o, R)
        sel = mask_m & (ids == g)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + offs
            mask_r = offs_r < rank
            t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=sel[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
            t = (t * s[:, None]).to(dtype)
            b = tl.load(b_ptrs[None, :] + (o + offs_r).to(tl.int64)[:, None] * stride_br,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            acc = tl.dot(t, b.to(dtype), acc, input_precision=INPUT_PRECISION)
        g = tl.min(tl.where(ids > g, ids, NO_ADAPTER))
    return acc
