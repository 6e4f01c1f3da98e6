"""Validate-free launchers: allocate, choose a config, compute the grid, launch.

Callers (``fastlora._ops``) pass shapes that ``fastlora.functional`` already checked. On CUDA the kernels are
autotuned, keyed on a power-of-two bucket of M so a new batch size does not retune; under
``TRITON_INTERPRET=1`` a fixed small config runs so the CPU tests exercise several tiles and masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastlora import _configs
from fastlora._configs import FMA_LORA_CHUNK, FMA_PTXAS_OPTIONS, INTERPRET, LORA_CHUNK, _is_fma
from fastlora.kernels.dropout import _dropout_mask_kernel
from fastlora.kernels.gemm import DX, DX_DROP, FWD, FWD_DROP, NO_DORA, _lora_gemm_kernel
from fastlora.kernels.grad import _lora_grad_kernel
from fastlora.kernels.weight4 import ABSMAX, DENSE, DOUBLE, FP8
from fastlora.kernels.weight8 import X_FP8, X_PLAIN

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# Tests set this so every buffer a kernel should fully write starts as NaN.
POISON = os.environ.get("FASTLORA_POISON") == "1"

MAX_RANK = 256
INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "USE_TMA": False}
INTERPRET_W8A8 = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 2, "USE_TMA": False}  # K steps of 128
INTERPRET_SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "GROUP_M": 1, "USE_TMA": False}
INTERPRET_GRAD = {"BLOCK_M": 16, "BLOCK_P": 32}


def empty(shape, dtype, device) -> torch.Tensor:
    if POISON:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def block_r(r: int) -> int:
    """BLOCK_R: next power of two >= r, at least 16 (the smallest tl.dot operand dimension)."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 follows torch's matmul setting, as nn.Linear does; 16-bit inputs ignore it."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# A ragged stack's T columns are computed in tiles of at most this many in the shrink (a rank-8 adapter's tokens run
# one tile, a rank-256 one's four, each reading its x rows again), and its rank walked in chunks of BLOCK_R (the main
# GEMM's LORA_CHUNK / FMA_LORA_CHUNK, the gradients' RAGGED_GRAD_CHUNK): a chunk past an adapter's rank is skipped.
RAGGED_SHRINK_N = 64
RAGGED_GRAD_CHUNK = 32


@dataclass(frozen=True)
class Ragged:
    """A ragged adapter stack: adapter g owns rank rows ``offsets[g]:offsets[g + 1]`` of A [sum r, K] and those
    columns of B [N, sum r] (int32 ``offsets`` [G + 1], on the device); ``width``: the columns of T and U (the
    shrinks' N), at least every rank; ``total``: the stack's rank rows (A [total, K]). Each adapter computes and
    reads only its own rank (``kernels/tiles.ragged_dot``)."""

    offsets: torch.Tensor
    width: int
    total: int  # sum r: A's rows, B's columns
    align: int = 1  # every offset a multiple of this (8: B's rank columns load as 16-byte vectors, cp.async)

    @property
    def num_adapters(self) -> int:
        return self.offsets.numel() - 1



@dataclass(frozen=True)
class DoraScale:
    """DoRA's magnitude scale g = m / ||W + s B A|| (fp32 [N], N the forward's out_features) as the GEMM core applies
    it: the forward's epilogue (``dx=False``: out = g * acc + bias, or with ``dropout`` PEFT's
    x W^T + low-rank + (g - 1) * (W d(x) + low-rank) + bias from a second accumulator) or dx's X tiles (``dx=True``:
    dy scaled by g as loaded; with ``dropout`` a second accumulator for the (g - 1) * dy product, masked by the
    forward's mask). ``z``: a buffer shaped like the output for the term g multiplies (the magnitude gradient's
    input), written by the forward. Grouped (a stack of B), g is [G, N] contiguous, one row per adapter (1 for plain
    LoRA adapters), each tile row scaled by its adapter's row."""

    g: torch.Tensor
    dx: bool = False
    dropout: bool = False
    z: torch.Tensor | None = None

    @property
    def mode(self) -> int:
        if self.dx:
            return DX_DROP.value if self.dropout else DX.value
        return FWD_DROP.value if self.dropout else FWD.value


class _StoredWeight:
    """A quantised weight's logical matrix: the stored [N, K] (``stored``, row-major) or, ``transposed``, its
    transpose (dx), with the shape and strides a dense tensor would have."""

    x_format = X_PLAIN.value  # how X meets it (X_FORMAT): as loaded, cast to ``compute``

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored[::-1] if self.transposed else self.stored

    def dim(self) -> int:
        return 2

    def stride(self, dim: int) -> int:
        strides = (1, self.stored[1]) if self.transposed else (self.stored[1], 1)
        return strides[dim]

    def t(self):
        return replace(self, transposed=not self.transposed)


@dataclass(frozen=True)
class Packed4bit(_StoredWeight):
    """A bitsandbytes 4-bit weight as the GEMM core's W operand: the stored [N, K] (``shape``) or, after ``t()``,
    its transpose, addressed through the strides of the logical matrix like a dense tensor.

    data: the packed bytes (uint8, two codes per byte); absmax fp32 [nblocks] or, with double quant, uint8 with
    absmax2 fp32, code2 fp32 [256] and offset fp32 (0-d); code the fp32 [16] codebook; compute: the dtype the
    dequantised tiles (and the X tiles beside them) are multiplied in.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    blocksize2: int
    stored: tuple[int, int]
    compute: torch.dtype
    transposed: bool = False

    @property
    def w_format(self) -> int:
        return DOUBLE.value if self.absmax2 is not None else ABSMAX.value

    @property
    def qblock(self) -> tuple[int, int]:
        return self.blocksize, self.blocksize2

    def pointers(self) -> tuple:
        """(absmax, absmax2, code, code2, offset) for the kernel, absent ones replaced by ``absmax``."""
        a = self.absmax
        return (a, a if self.absmax2 is None else self.absmax2, self.code, a if self.code2 is None else self.code2,
                a if self.offset is None else self.offset)


@dataclass(frozen=True)
class BlockFP8(_StoredWeight):
    """A block-scaled FP8 weight as the GEMM core's W operand (W8A16): the stored [N, K] (``stored``) or, after
    ``t()``, its transpose, addressed through the strides of the logical matrix like a dense tensor.

    data: the e4m3 bytes viewed as uint8 [N, K], contiguous; scale: fp32 [cdiv(N, block[0]), cdiv(K, block[1])],
    contiguous (``weight_scale_inv``: W[n, k] = e4m3(data[n, k]) * scale[n // block[0], k // block[1]]); compute: the
    dtype the dequantised tiles (and the X tiles beside them) are multiplied in. ``fp8_activations`` (W8A8, the
    forward only: not transposed, block[1] a multiple of 128): X is quantised per token per 128 channels to e4m3 in
    the K loop and multiplied by the e4m3 bytes as they are (fp8 MMA), never dequantised; ``compute`` then is only
    the low-rank term's dtype (X's).
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    stored: tuple[int, int]
    compute: torch.dtype
    transposed: bool = False
    fp8_activations: bool = False

    w_format = FP8.value

    @property
    def x_format(self) -> int:
        return X_FP8.value if self.fp8_activations else X_PLAIN.value

    @property
    def qblock(self) -> tuple[int, int]:
        return self.block

    def pointers(self) -> tuple:
        return (self.scale,) * 5



def _tma_aligned(t: torch.Tensor) -> bool:
    e = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(0) * e) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def _descriptors(x, w, out, tma: bool):
    """Host-side TMA descriptors (block shapes set per config) when the strides allow, else Nones; and W_KMAJOR,
    whether W's unit stride runs along K (the FMA pointer loop clamps W's columns only then)."""
    kmajor = w.stride(-1) == 1
    if not tma or w.dim() != 2 or not _tma_aligned(x) or not _tma_aligned(out):
        return None, None, None, kmajor
    if _tma_aligned(w):
        wd, kmajor = TensorDescriptor.from_tensor(w, [16, 16]), True
    elif _tma_aligned(w.t()):
        wd, kmajor = TensorDescriptor.from_tensor(w.t(), [16, 16]), False
    else:
        return None, None, None, kmajor
    return TensorDescriptor.from_tensor(x, [16, 16]), wd, TensorDescriptor.from_tensor(out, [16, 16]), kmajor


def gemm(
    x: torch.Tensor,
    w: torch.Tensor | Packed4bit | BlockFP8,
    *,
    out_dtype: torch.dtype,
    shrink: bool = False,
    bias: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scaling: float = 1.0,
    scale_vec: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    seg: torch.Tensor | None = None,
    x_dropout: bool = False,
    out_dropout: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    bits: torch.Tensor | None = None,
    dora: DoraScale | None = None,
    ragged: Ragged | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """out [M, N] = drop?(x) w^T + bias + scale * drop?(t b^T), see ``_lora_gemm_kernel``; ``dora`` applies a DoRA
    magnitude scale (``DoraScale``; dense or quantised w, ungrouped) and fills its ``z``.

    x [M, K]; w [N, K] (a tensor, a ``Packed4bit`` or a ``BlockFP8``) or, grouped, [G, N, K]; t [M, R]; b [N, R] or
    [G, N, R]; perm/ids [M] (sorted order -> token, adapter id of each sorted row); seg [G + 1] (the segment offsets,
    needed with a grouped w: its tiles are cut at them). ``shrink`` marks N = R (a rank-sized output). ``ragged``
    (``Ragged``): w [sum r, K] (shrink, N = ragged.width) or b [N, sum r] is a ragged stack, per-adapter ranks.
    ``bits``: the packed dropout keep-mask [M, cdiv(K, 32)] int32, written by an ``x_dropout`` shrink (pass
    ``dropout_bits(M, K)``) and read by an ``out_dropout`` main GEMM.
    """
    M, K = x.shape
    N = ragged.width if ragged is not None and shrink else w.shape[-2]
    out = empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return out
    has_lora = t is not None
    R = t.shape[1] if has_lora else (N if shrink else 0)
    w_grouped = w.dim() == 3 or (ragged is not None and shrink)
    b_grouped = has_lora and (b.dim() == 3 or ragged is not None)
    G = w.shape[0] if w.dim() == 3 else ragged.num_adapters if w_grouped else 1
    if (x_dropout or out_dropout) and bits is None:
        raise AssertionError("dropout needs the packed mask buffer")
    if w_grouped and seg is None:
        raise AssertionError("a grouped w needs the segment offsets")
    quant = w if isinstance(w, (Packed4bit, BlockFP8)) else None
    cap = _configs.target_capability(x.device)
    want_tma = (config or {}).get("USE_TMA", cap is not None and cap[0] >= 9)
    dual = dora is not None and dora.dropout  # two accumulators: pointer loads only
    tma = (want_tma and not shrink and perm is None and not w_grouped and quant is None and not dual
           and x.dtype == w.dtype)
    x_desc, w_desc, out_desc, w_kmajor = _descriptors(x, w, out, tma)
    dummy = out
    args = (
        x, w if quant is None else quant.data, bias if bias is not None else dummy, t if has_lora else dummy,
        b if has_lora else dummy, out, perm if perm is not None else dummy, ids if ids is not None else dummy,
        seg if seg is not None else dummy, ragged.offsets if ragged is not None else dummy,
        scale_vec if scale_vec is not None else dummy, bits if bits is not None else dummy,
        dora.g if dora is not None else dummy, dora.z if dora is not None and dora.z is not None else dummy,
        *(quant.pointers() if quant is not None else (dummy,) * 5),
        x_desc, w_desc, out_desc,
        M, N, K, R, G, m_bucket(M),
        x.stride(0), x.stride(1),
        w.stride(0) if w.dim() == 3 else 0, w.stride(-2), w.stride(-1),
        t.stride(0) if has_lora else 0, t.stride(1) if has_lora else 0,
        b.stride(0) if has_lora and b.dim() == 3 else 0,
        b.stride(-2) if has_lora else 0, b.stride(-1) if has_lora else 0,
        out.stride(0), out.stride(1),
        bits.stride(0) if bits is not None else 0,
        float(scaling), float(dropout_p), int(seed),
    )
    precision = input_precision(x.dtype, x.device)
    compute = quant.compute if quant else x.dtype  # the dtype the main product runs in (W_COMPUTE)
    fma = _is_fma(compute.itemsize, precision)
    flags = dict(
        BLOCK_R=min(block_r(R), FMA_LORA_CHUNK if fma else LORA_CHUNK) if has_lora else 16,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        HAS_PERM=perm is not None, W_GROUPED=w_grouped, B_GROUPED=b_grouped, RAGGED=ragged.align if ragged else 0,
        HAS_SCALE_VEC=scale_vec is not None,
        X_DROPOUT=x_dropout, OUT_DROPOUT=out_dropout, TMA_OK=x_desc is not None, W_KMAJOR=w_kmajor,
        W_FORMAT=DENSE.value if quant is None else quant.w_format, W_TRANS=bool(quant and quant.transposed),
        W_COMPUTE=_TL_DTYPES[compute], X_FORMAT=quant.x_format if quant else X_PLAIN.value,
        QBLOCK=quant.qblock[0] if quant else 1,
        QBLOCK2=quant.qblock[1] if quant else 1, INPUT_PRECISION=precision,
        DORA=dora.mode if dora is not None else NO_DORA.value, STORE_Z=dora is not None and dora.z is not None,
    )
    if shrink:
        flags["BLOCK_N"] = min(block_r(R), RAGGED_SHRINK_N) if ragged is not None else block_r(R)
    # One block per SM (FMA_PTXAS_OPTIONS) on the FMA path and for an FP8 W before Hopper: at ptxas's own occupancy
    # target (168 registers) the FP8 forward's 64x64x64 and 32x64x128 / 4 warps tiles parked 16-32 B of loop-invariant
    # values on the stack on sm_80 (none with it).
    if fma or (isinstance(quant, BlockFP8) and _configs._mma_sync(cap)):
        flags["ptx_options"] = " ".join(filter(None, [triton.knobs.nvidia.ptxas_options, FMA_PTXAS_OPTIONS]))

    def grid(meta):  # a grouped w cuts row tiles at its G adapter segments: at most G more
        row_tiles = triton.cdiv(M, meta["BLOCK_M"]) + (G if w_grouped else 0)
        tiles = row_tiles * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, _configs.num_sms(x.device)) if meta["USE_TMA"] else tiles,)

    if config is None and not INTERPRET:
        (_configs._shrink_tuned if shrink else _configs._gemm_tuned)[grid](*args, **flags)
        return out
    default = INTERPRET_SHRINK if shrink else INTERPRET_W8A8 if flags["X_FORMAT"] == X_FP8.value else INTERPRET_GEMM
    cfg = dict(config or default)
    cfg["USE_TMA"] = bool(cfg.get("USE_TMA")) and x_desc is not None
    launch = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    if shrink:
        launch.pop("BLOCK_N", None)
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    meta = {**launch, **flags}
    _configs._set_tma_blocks({**meta, "x_desc": x_desc, "w_desc": w_desc, "out_desc": out_desc})
    _lora_gemm_kernel[grid(meta)](*args, **launch, **flags, **opts)
    return out


def dropout_bits(M: int, K: int, device) -> torch.Tensor:
    """Buffer for the packed dropout keep-mask: [M, cdiv(K, 32)] int32, bit j of word w = column 32w + j."""
    return empty((M, triton.cdiv(K, 32)), torch.int32, device)


def grad(
    z: torch.Tensor,
    v: torch.Tensor,
    *,
    num_adapters: int = 1,
    scaling: float = 1.0,
    scale_vec: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    seg: torch.Tensor | None = None,
    z_dropout: bool = False,
    dropout_p: float = 0.0,
    bits: torch.Tensor | None = None,
    col_dot: torch.Tensor | None = None,
    ragged: Ragged | None = None,
    config: dict | None = None,
):
    """fp32 [G, P, R] = scale_g * sum_m Z[m]^T V[m] over each adapter's tokens (see ``_lora_grad_kernel``); with
    ``ragged`` fp32 [P, sum r], adapter g's sum over its own rank in columns offsets[g]:offsets[g + 1] (zero
    past the last offset).

    z [M, P], v [M, R]; with ``seg`` (G+1 offsets into sorted order) and ``perm`` the sum is per adapter.
    ``z_dropout`` masks z by ``bits``, the packed keep-mask the forward shrink wrote. ``col_dot`` [M, P] (no
    dropout): also return fp32 [P] (with ``seg``: [G, P], per adapter) = sum_m z[m] * col_dot[m], from the same z
    tiles (DoRA's magnitude gradient).
    """
    M, P = z.shape
    R = v.shape[1]
    G = ragged.num_adapters if ragged is not None else num_adapters
    split = _num_splits(M, P, G, z.device)
    if ragged is not None:  # columns past the last offset belong to no adapter: zeros
        part = torch.zeros((split, 1, P, ragged.total), dtype=torch.float32, device=z.device)
    else:
        part = empty((split, G, P, R), torch.float32, z.device)
    col = empty((split, G, P), torch.float32, z.device) if col_dot is not None else None

    def result(out):
        out = out[0] if ragged is not None else out
        return out if col is None else (out, col.sum(0) if seg is not None else col.sum(0)[0])

    if P == 0 or R == 0 or (part.numel() == 0 and col is None):
        return result(part.sum(0))
    dummy = part if part.numel() else col  # a ragged stack of rank 0 still reduces the column dot: nothing else stored
    args = (
        z, v, dummy, perm if perm is not None else dummy, seg if seg is not None else dummy,
        ragged.offsets if ragged is not None else dummy,
        scale_vec if scale_vec is not None else dummy, bits if bits is not None else dummy,
        col_dot if col is not None else dummy, col if col is not None else dummy,
        M, P, R, m_bucket(M),
        z.stride(0), z.stride(1),
        col_dot.stride(0) if col is not None else 0, col_dot.stride(1) if col is not None else 0,
        col.stride(0) if col is not None else 0, col.stride(1) if col is not None else 0,
        v.stride(0), v.stride(1),
        part.stride(0), 0 if ragged is not None else part.stride(1), part.stride(2), part.stride(3),
        bits.stride(0) if bits is not None else 0,
        float(scaling), float(dropout_p),
    )
    flags = dict(
        BLOCK_R=min(block_r(R), RAGGED_GRAD_CHUNK) if ragged is not None else block_r(R), HAS_PERM=perm is not None,
        GROUPED=seg is not None, RAGGED=ragged.align if ragged else 0, HAS_SCALE_VEC=scale_vec is not None,
        Z_DROPOUT=z_dropout, INPUT_PRECISION=input_precision(z.dtype, z.device), COL_DOT=col is not None,
    )
    chunks = triton.cdiv(R, flags["BLOCK_R"]) if ragged is not None else 1  # a ragged rank's column chunks

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * chunks, G, split)

    if config is None and not INTERPRET:
        _configs._grad_tuned[grid](*args, **flags)
    else:
        cfg = dict(config or INTERPRET_GRAD)
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        _lora_grad_kernel[grid(cfg)](*args, **cfg, **flags, **opts)
    return result(part.sum(0) if split > 1 else part[0])


def _num_splits(M: int, P: int, G: int, device: torch.device) -> int:
    """Token splits for the gradient reduction: enough programs to fill the GPU, each >= 256 tokens."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(3, triton.cdiv(M, 16 * G)))
    programs = triton.cdiv(P, 64) * G
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    by_rows = max(1, M // (256 * G))
    return max(1, min(triton.cdiv(target, programs), by_rows, 64))


def dropout_mask(M: int, K: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The [M, K] boolean keep-mask the fused kernels draw for (dropout_p, seed)."""
    out = empty((M, K), torch.int8, device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, float(dropout_p), int(seed), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
