"""The kernels as ``torch.library`` custom ops, with fake implementations, so torch.compile traces through.

Dense and grouped calls share the ops: lora_A is [R, K] or a stack [G, R, K]; grouped calls also pass the
``AdapterBatch`` tensors (perm, sorted ids, segment offsets) and per-adapter scaling. With dropout the forward
returns the keep-mask it drew, packed one bit per element ([M, cdiv(K, 32)] int32, M*K/8 bytes), and the
backward reads it instead of drawing it again.

A 4-bit base (QLoRA) passes its packed bytes as ``weight`` with ``quant`` = [absmax, code] or, double-quantised,
[absmax, code, absmax2, code2, offset] and ``qblocks`` = [blocksize, blocksize2, compute] (compute: the index of
the compute dtype in ``COMPUTE_DTYPES``); N then comes from lora_B. A mixture of experts passes a 3-D ``weight``
[E, N, K] (with bias [E, N] and a padded stack of E adapters): the main GEMMs then cut their row tiles at the
expert segments, as the grouped shrink does, and each tile runs its expert's W. A block-scaled FP8 base passes its
float8_e4m3fn [N, K] ``weight`` (the dtype names the format) with ``quant`` = [weight_scale_inv] (fp32, contiguous)
and ``qblocks`` = [block rows, block columns, compute] or, for the W8A8 forward (x quantised to e4m3 in the kernel,
fp8 MMA), [block rows, block columns, compute, 1]; the backward reads W dequantised either way (W8A16 dx). A dense
weight passes ``quant`` = [] and ``qblocks`` = [].

A ragged stack (``rank_offsets`` [G + 1] int32, adapter g at its own rank) passes lora_A [sum r, K] and lora_B
[N, sum r]; T and U are then [M, ``t_width``], each row filled up to its adapter's rank only (the rest unwritten);
``rank_align``: every offset is a multiple of it (8 enables vector loads of B's rank columns).
"""

import torch
from torch import Tensor

from fastlora import _launch


@torch.library.custom_op("fastlora::lora_forward", mutates_args=())
def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    scale_vec: Tensor | None, perm: Tensor | None, ids: Tensor | None, seg: Tensor | None, dropout_p: float, seed: int,
    quant: list[Tensor], qblocks: list[int], rank_offsets: Tensor | None = None, t_width: int = 0,
    rank_align: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, N], T [M, R] fp32, bits): T = drop(x) A^T, y = x W^T + b + s T B^T; bits is the packed keep-mask
    (empty without dropout)."""
    ragged = _ragged(rank_offsets, t_width, rank_align, lora_A)
    t, bits = _shrink(x, lora_A, perm, ids, seg, dropout_p, seed, ragged)
    w = _weight(weight, quant, qblocks, lora_B.shape[-2], x.shape[1])
    y = _launch.gemm(x, w, out_dtype=x.dtype, bias=bias, t=t, b=lora_B, scaling=scaling,
                     scale_vec=scale_vec, perm=perm, ids=ids, seg=seg, ragged=ragged)
    return y, t, bits


@lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, scale_vec, perm, ids, seg, dropout_p, seed, quant, qblocks,
      rank_offsets=None, t_width=0, rank_align=1):
    return x.new_empty(x.shape[0], lora_B.shape[-2]), *_fake_shrink(x, lora_A, dropout_p, rank_offsets, t_width)


def _shrink(x: Tensor, lora_A: Tensor, perm, ids, seg, dropout_p: float, seed: int, ragged):
    """(T [M, R] fp32, bits): T = drop(x) A^T, the first launch of every forward op (grouped with perm / ids / seg,
    ragged with ``ragged``); bits is the packed keep-mask it draws, empty without dropout."""
    M, K = x.shape
    p = dropout_p
    bits = _launch.dropout_bits(M, K, x.device) if p > 0 else x.new_empty(0, dtype=torch.int32)
    t = _launch.gemm(x, lora_A, out_dtype=torch.float32, shrink=True, perm=perm, ids=ids, seg=seg, x_dropout=p > 0,
                     dropout_p=p, seed=seed, bits=bits if p > 0 else None, ragged=ragged)
    return t, bits


def _fake_shrink(x: Tensor, lora_A: Tensor, dropout_p: float, rank_offsets=None, t_width: int = 0):
    """``_shrink``'s (T, bits) for the ops' fake implementations: T as wide as ``t_width`` for a ragged stack."""
    M, K = x.shape
    bits = x.new_empty(M, -(-K // 32), dtype=torch.int32) if dropout_p > 0 else x.new_empty(0, dtype=torch.int32)
    R = t_width if rank_offsets is not None else lora_A.shape[-2]
    return x.new_empty(M, R, dtype=torch.float32), bits


def _ragged(rank_offsets, t_width, rank_align, lora_A):
    if rank_offsets is None:
        return None
    return _launch.Ragged(rank_offsets, t_width, lora_A.shape[0], rank_align)


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quant_args(state, compute_dtype: torch.dtype) -> tuple[list[Tensor], list[int]]:
    """(``quant``, ``qblocks``) of a ``fastlora.quant.QuantState4bit`` for the ops, the product in ``compute_dtype``."""
    tensors = [state.absmax, state.code] + ([state.absmax2, state.code2, state.offset] if state.double_quant else [])
    return tensors, [state.blocksize, state.blocksize2 if state.double_quant else 1,
                     COMPUTE_DTYPES.index(compute_dtype)]


def _weight(weight: Tensor, quant: list[Tensor], qblocks: list[int], N: int, K: int):
    """The W operand: ``weight`` itself (``quant`` empty), its packed 4-bit form with the quantisation state, or an
    FP8 weight with its block scales."""
    if not quant:
        return weight
    if weight.dtype == torch.float8_e4m3fn:
        return _launch.BlockFP8(weight.view(torch.uint8), quant[0], (qblocks[0], qblocks[1]), (N, K),
                                COMPUTE_DTYPES[qblocks[2]], fp8_activations=bool(qblocks[3:4] and qblocks[3]))
    absmax, code, *double = quant
    absmax2, code2, offset = double if double else (None, None, None)
    return _launch.Packed4bit(weight, absmax, code, absmax2, code2, offset, qblocks[0], qblocks[1], (N, K),
                              COMPUTE_DTYPES[qblocks[2]])


@torch.library.custom_op("fastlora::lora_backward", mutates_args=())
def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor, bits: Tensor, scaling: float,
    scale_vec: Tensor | None, perm: Tensor | None, ids: Tensor | None, seg: Tensor | None,
    dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool,
    quant: list[Tensor], qblocks: list[int], rank_offsets: Tensor | None = None, t_width: int = 0,
    rank_align: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor.

    U = dy B; dx = dy W + s D*(U A); dA = s U^T drop(x); dB = s dy^T T (D: the forward's dropout mask, ``bits``).
    """
    grouped = lora_A.dim() == 3
    G = lora_A.shape[0] if grouped else 1
    ragged = _ragged(rank_offsets, t_width, rank_align, lora_A)
    p = dropout_p
    dx, dA, dB = (dy.new_empty(0) for _ in range(3))  # distinct: custom-op outputs may not alias
    if need_dx or need_dA:
        u = _launch.gemm(dy, lora_B.transpose(-1, -2), out_dtype=torch.float32, shrink=True, perm=perm, ids=ids,
                         seg=seg, ragged=ragged)
    if need_dx:
        # qblocks[:3]: W8A8 is the forward's; dx = dy W reads W dequantised (W8A16), straight through x's quantisation
        w = _weight(weight, quant, qblocks[:3], dy.shape[1], x.shape[1])
        wt = w.transpose(-1, -2) if isinstance(w, Tensor) else w.t()  # experts [E, N, K]: each one transposed
        dx = _launch.gemm(dy, wt, out_dtype=x.dtype, t=u, b=lora_A.transpose(-1, -2), scaling=scaling,
                          scale_vec=scale_vec, perm=perm, ids=ids, seg=seg, out_dropout=p > 0, dropout_p=p,
                          bits=bits, ragged=ragged)
    if need_dA:
        g = _launch.grad(x, u, num_adapters=G, scaling=scaling, scale_vec=scale_vec, perm=perm, seg=seg,
                         z_dropout=p > 0, dropout_p=p, bits=bits, ragged=ragged)  # [G, K, R] or ragged [K, sum r]
        dA = g.transpose(-1, -2).to(lora_A.dtype).contiguous()
        dA = dA if grouped or ragged is not None else dA[0]
    if need_dB:
        g = _launch.grad(dy, t, num_adapters=G, scaling=scaling, scale_vec=scale_vec, perm=perm, seg=seg,
                         ragged=ragged)
        dB = g.to(lora_B.dtype)
        dB = dB if grouped or ragged is not None else dB[0]
    return dx, dA, dB


@lora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, t, bits, scaling, scale_vec, perm, ids, seg, dropout_p,
      need_dx, need_dA, need_dB, quant, qblocks, rank_offsets=None, t_width=0, rank_align=1):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if need_dA else dy.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if need_dB else dy.new_empty(0)
    return dx, dA, dB
