"""DoRA's kernels as ``torch.library`` custom ops, with fake implementations (torch.compile traces through).

PEFT's DoRA (``LoraConfig(use_dora=True)``), with g = m / max(||W + s B A||, eps) per output row (the norm
detached, ``dora_norm``):

    no dropout / eval:  y = g * (x W^T + s T B^T) + b                      T = x A^T
    training, p > 0:    y = x W^T + b + (g - 1) * (d(x) W^T) + g * s T B^T   T = d(x) A^T

Both are one launch of the GEMM core each way (``_launch.DoraScale``): the forward scales its epilogue by g, dx
scales dy by g as its tiles are loaded; the dropout forms add the second product of the same W tiles (over the
dropped x, or (g - 1) * dy) into a second accumulator of the same K loop.
A 4-bit base (QDoRA) passes its packed bytes as ``weight``, an FP8 base its float8_e4m3fn weight, with ``quant`` /
``qblocks`` as ``fastlora._ops`` does (empty for a dense W): the same launches read W quantised and dequantise its
tiles in registers.
Derivations: docs/dora.md.
"""

import torch
from torch import Tensor

from fastlora import _launch
from fastlora._ops import COMPUTE_DTYPES, _fake_shrink, _shrink, _weight


@torch.library.custom_op("fastlora::dora_forward", mutates_args=())
def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float, g: Tensor,
    dropout_p: float, seed: int, store_z: bool, quant: list[Tensor], qblocks: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [M, N], T [M, R] fp32, bits, Z): Z [M, N] (x's dtype; empty unless ``store_z``) is the term g multiplies,
    x W^T + s T B^T (p = 0) or d(x) W^T + s T B^T (p > 0), which the magnitude gradient needs."""
    M, K = x.shape
    p = dropout_p
    t, bits = _shrink(x, lora_A, None, None, None, p, seed, None)
    z = _launch.empty((M, lora_B.shape[0]), x.dtype, x.device) if store_z else x.new_empty(0)
    scale = _launch.DoraScale(g, dropout=p > 0, z=z if store_z else None)
    w = _weight(weight, quant, qblocks, lora_B.shape[0], K)
    y = _launch.gemm(x, w, out_dtype=x.dtype, bias=bias, t=t, b=lora_B, scaling=scaling, dropout_p=p,
                     bits=bits if p > 0 else None, dora=scale)
    return y, t, bits, z


@dora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, g, dropout_p, seed, store_z, quant, qblocks):
    M, N = x.shape[0], lora_B.shape[0]
    return x.new_empty(M, N), *_fake_shrink(x, lora_A, dropout_p), x.new_empty(M, N) if store_z else x.new_empty(0)


@torch.library.custom_op("fastlora::dora_backward", mutates_args=())
def dora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor, bits: Tensor, z: Tensor,
    scaling: float, g: Tensor, dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool,
    quant: list[Tensor], qblocks: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dz): one not needed comes back empty; dz = sum_tokens dy * Z (fp32 [N], Z the forward's saved
    term), dm before the division by the norm, computed by dB's token reduction from the same dy tiles. With
    U = (g * dy) B (the shrink reads g * B, [N, R]):

    dx = (g * dy) W + s U A                          p = 0
    dx = dy W + D * (((g - 1) * dy) W + s U A)       p > 0 (D: the forward's mask / (1 - p))
    dA = s U^T d(x),  dB = g * (s dy^T T)            LoRA's, with g * dy
    """
    p = dropout_p
    dx, dA, dB, dz = (dy.new_empty(0) for _ in range(4))  # distinct: custom-op outputs may not alias
    if need_dx or need_dA:
        # [N, R]: scaling dy's columns is scaling B's rows; in dy's dtype, as the kernel would convert its tiles
        gb = (lora_B.float() * g[:, None]).to(dy.dtype)
        u = _launch.gemm(dy, gb.t(), out_dtype=torch.float32, shrink=True)
    if need_dx:
        w = _weight(weight, quant, qblocks, dy.shape[1], x.shape[1])
        dx = _launch.gemm(dy, w.t(), out_dtype=x.dtype, t=u, b=lora_A.t(), scaling=scaling, out_dropout=p > 0,
                          dropout_p=p, bits=bits if p > 0 else None, dora=_launch.DoraScale(g, dx=True, dropout=p > 0))
    if need_dA:
        dA = _launch.grad(x, u, scaling=scaling, z_dropout=p > 0, dropout_p=p, bits=bits if p > 0 else None)
        dA = dA[0].t().to(lora_A.dtype).contiguous()
    if need_dB or need_dm:
        gB = _launch.grad(dy, t, scaling=scaling, col_dot=z if need_dm else None)
        gB, dz = gB if need_dm else (gB, dz)
        if need_dB:
            dB = (gB[0] * g[:, None]).to(lora_B.dtype)
    return dx, dA, dB, dz


@dora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, t, bits, z, scaling, g, dropout_p, need_dx, need_dA, need_dB, need_dm, quant,
      qblocks):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if need_dA else dy.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if need_dB else dy.new_empty(0)
    dz = dy.new_empty(dy.shape[1], dtype=torch.float32) if need_dm else dy.new_empty(0)
    return dx, dA, dB, dz


@torch.library.custom_op("fastlora::dora_norm", mutates_args=())
def dora_norm(weight: Tensor, weight_sq: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """||W_n + s B_n A|| per output row n, fp32 [N], without an N x K tensor:

        ||W_n||^2 + 2 s B_n . (A W^T)[:, n] + s^2 B_n (A A^T) B_n^T

    ``weight_sq``: ||W_n||^2 (fp32 [N], from the caller: ``dora.weight_sq``). U = A W^T [R, N] is one GEMM-core launch
    (M = R), A A^T [R, R] a torch matmul; all fp32 (A is cast to fp32 when its dtype differs from W's, so W's tiles are
    converted, never copied). Rounding can make the sum slightly negative where the row's norm is ~0: clamped to 0.
    """
    a = lora_A if lora_A.dtype == weight.dtype else lora_A.float()
    return _combine(_launch.gemm(a, weight, out_dtype=torch.float32), weight_sq, lora_A, lora_B, scaling)


@dora_norm.register_fake
def _(weight, weight_sq, lora_A, lora_B, scaling):
    return weight_sq.new_empty(weight.shape[0])


@torch.library.custom_op("fastlora::dora_norm_4bit", mutates_args=())
def dora_norm_4bit(weight: Tensor, quant: list[Tensor], qblocks: list[int], weight_sq: Tensor, lora_A: Tensor,
                   lora_B: Tensor, scaling: float) -> Tensor:
    """``dora_norm`` over a packed 4-bit W or an FP8 one (``quant``/``qblocks`` as ``fastlora._ops``): U = A deq(W)^T
    is the quantised forward launch with A as its input, W's tiles dequantised to fp32 in registers (the compute dtype
    is fp32 here, whatever the layer's), A in fp32: no dequantised W is written."""
    fp32 = [*qblocks[:2], COMPUTE_DTYPES.index(torch.float32)]
    w = _weight(weight, quant, fp32, lora_B.shape[0], lora_A.shape[1])
    return _combine(_launch.gemm(lora_A.float(), w, out_dtype=torch.float32), weight_sq, lora_A, lora_B, scaling)


@dora_norm_4bit.register_fake
def _(weight, quant, qblocks, weight_sq, lora_A, lora_B, scaling):
    return weight_sq.new_empty(lora_B.shape[0])


def _combine(u: Tensor, weight_sq: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """sqrt(max(||W_n||^2 + 2 s B_n . U[:, n] + s^2 B_n (A A^T) B_n^T, 0)), fp32 [N], from U = A W^T [R, N]."""
    af, bf = lora_A.float(), lora_B.float()
    cross = (bf * u.t()).sum(1)
    quad = ((bf @ (af @ af.t())) * bf).sum(1)
    return (weight_sq + 2.0 * scaling * cross + scaling * scaling * quad).clamp_min(0.0).sqrt()
