"""Grouped DoRA's kernels as ``torch.library`` custom ops: one batch mixing DoRA and plain LoRA adapters.

As ``fastlora._dora_ops`` with one scale row per adapter: g [n, N] fp32, contiguous, g[a] = m[a] / max(||W + s_a B_a
A_a||, eps) for a DoRA adapter and exactly 1 for a plain one (its magnitude row is NaN), so a plain adapter's tokens
compute LoRA, dropout form included. Tokens are sorted by adapter (``AdapterBatch``: perm, sorted ids, segment
offsets), and the GEMM core reads each tile row's g row by its adapter id (``DORA`` with B_GROUPED). Padded stacks
(lora_A [n, r, K], lora_B [n, N, r]) and ragged ones (``rank_offsets`` [n + 1], lora_A [sum r, K], lora_B [N, sum r],
T [M, ``t_width``]) take the same ops. Derivations: docs/dora.md.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlora import _launch
from fastlora._ops import _fake_shrink, _ragged, _shrink


@torch.library.custom_op("fastlora::grouped_dora_forward", mutates_args=())
def grouped_dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale_vec: Tensor, perm: Tensor,
    ids: Tensor, seg: Tensor, g: Tensor, dropout_p: float, seed: int, store_z: bool, rank_offsets: Tensor | None,
    t_width: int, rank_align: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [M, N], T fp32, bits, Z): per token i of adapter a, y_i = g_a * (x_i W^T + s_a T_i B_a^T) + b (p = 0) or
    PEFT's x_i W^T + b + (g_a - 1) * (d(x_i) W^T) + g_a * s_a T_i B_a^T (p > 0); Z [M, N] (x's dtype, by token; empty
    unless ``store_z``) is the term g multiplies."""
    M = x.shape[0]
    p = dropout_p
    ragged = _ragged(rank_offsets, t_width, rank_align, lora_A)
    t, bits = _shrink(x, lora_A, perm, ids, seg, p, seed, ragged)
    z = _launch.empty((M, weight.shape[0]), x.dtype, x.device) if store_z else x.new_empty(0)
    scale = _launch.DoraScale(g, dropout=p > 0, z=z if store_z else None)
    y = _launch.gemm(x, weight, out_dtype=x.dtype, bias=bias, t=t, b=lora_B, scale_vec=scale_vec, perm=perm, ids=ids,
                     dropout_p=p, bits=bits if p > 0 else None, dora=scale, ragged=ragged)
    return y, t, bits, z


@grouped_dora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scale_vec, perm, ids, seg, g, dropout_p, seed, store_z, rank_offsets, t_width,
      rank_align):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty(M, N), *_fake_shrink(x, lora_A, dropout_p, rank_offsets, t_width),
            x.new_empty(M, N) if store_z else x.new_empty(0))


def _column_scale(g: Tensor, lora_B: Tensor, rank_offsets: Tensor | None) -> Tensor:
    """g laid out like lora_B, fp32: [n, N, 1] for a padded stack, [N, sum r] for a ragged one (column c of B scaled
    by the row of the adapter owning it; 1 past the last offset)."""
    if rank_offsets is None:
        return g[:, :, None]
    owner = _owners(rank_offsets, lora_B.shape[1])
    return torch.cat([g, g.new_ones(1, g.shape[1])]).t()[:, owner]


def _owners(rank_offsets: Tensor, total: int) -> Tensor:
    """The adapter owning each of a ragged stack's ``total`` rank rows (n past the last offset), int64 [total]."""
    cols = torch.arange(total, device=rank_offsets.device, dtype=rank_offsets.dtype)
    return torch.searchsorted(rank_offsets[1:].contiguous(), cols, right=True)


@torch.library.custom_op("fastlora::grouped_dora_backward", mutates_args=())
def grouped_dora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor, bits: Tensor, z: Tensor,
    scale_vec: Tensor, perm: Tensor, ids: Tensor, seg: Tensor, g: Tensor, dropout_p: float, need_dx: bool,
    need_dA: bool, need_dB: bool, need_dm: bool, rank_offsets: Tensor | None, t_width: int, rank_align: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dz), each empty when not needed; dz fp32 [n, N] = sum over adapter a's tokens of dy * Z (dm before
    the division by the norm). Per token of adapter a, with U = (g_a * dy) B_a (the shrink reads g * B):

    dx = (g_a * dy) W + s_a U A_a                          p = 0: dy's tiles scaled by its row's g as loaded
    dx = dy W + D * (((g_a - 1) * dy) W + s_a U A_a)       p > 0
    dA = s U^T d(x),  dB = g_a * (s dy^T T)                LoRA's reductions per adapter, B's rows scaled by g_a
    """
    p = dropout_p
    grouped_b = lora_A.dim() == 3
    n = lora_A.shape[0] if grouped_b else rank_offsets.numel() - 1
    ragged = _ragged(rank_offsets, t_width, rank_align, lora_A)
    dx, dA, dB, dz = (dy.new_empty(0) for _ in range(4))  # distinct: custom-op outputs may not alias
    scale = _column_scale(g, lora_B, rank_offsets) if need_dx or need_dA or need_dB else None
    if need_dx or need_dA:
        gb = (lora_B.float() * scale).to(dy.dtype)  # [n, N, r] / [N, sum r]: g * dy's columns is g * B's rows
        shrink_ragged = ragged
        if ragged is not None and gb.stride(0) % ragged.align:
            shrink_ragged = _launch.Ragged(ragged.offsets, ragged.width, ragged.total, 1)
        u = _launch.gemm(dy, gb.transpose(-1, -2), out_dtype=torch.float32, shrink=True, perm=perm, ids=ids, seg=seg,
                         ragged=shrink_ragged)
    if need_dx:
        dx = _launch.gemm(dy, weight.t(), out_dtype=x.dtype, t=u, b=lora_A.transpose(-1, -2), scale_vec=scale_vec,
                          perm=perm, ids=ids, out_dropout=p > 0, dropout_p=p, bits=bits if p > 0 else None,
                          ragged=ragged, dora=_launch.DoraScale(g, dx=True, dropout=p > 0))
    if need_dA:
        gA = _launch.grad(x, u, num_adapters=n, scale_vec=scale_vec, perm=perm, seg=seg, z_dropout=p > 0, dropout_p=p,
                          bits=bits if p > 0 else None, ragged=ragged)
        dA = gA.transpose(-1, -2).to(lora_A.dtype).contiguous()
    if need_dB or need_dm:
        gB = _launch.grad(dy, t, num_adapters=n, scale_vec=scale_vec, perm=perm, seg=seg, ragged=ragged,
                          col_dot=z if need_dm else None)
        gB, dz = gB if need_dm else (gB, dz)
        if need_dB:
            dB = (gB * scale).to(lora_B.dtype)
    return dx, dA, dB, dz


@grouped_dora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, t, bits, z, scale_vec, perm, ids, seg, g, dropout_p, need_dx, need_dA, need_dB,
      need_dm, rank_offsets, t_width, rank_align):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if need_dA else dy.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if need_dB else dy.new_empty(0)
    dz = dy.new_empty(g.shape, dtype=torch.float32) if need_dm else dy.new_empty(0)
    return dx, dA, dB, dz


@torch.library.custom_op("fastlora::grouped_dora_norm", mutates_args=())
def grouped_dora_norm(weight: Tensor, weight_sq: Tensor, lora_A: Tensor, lora_B: Tensor, scale_vec: Tensor,
                      rank_offsets: Tensor | None) -> Tensor:
    """||W_n + s_a B_a[n] A_a|| for every adapter a and output row n, fp32 [n, N], without an N x K tensor:

        ||W_n||^2 + 2 s_a B_a[n] . (A_a W^T)[:, n] + s_a^2 B_a[n] (A_a A_a^T) B_a[n]^T

    U = A W^T for the whole stack is one GEMM-core launch (n r rows padded, sum r ragged); the per-adapter cross and
    quadratic terms are small fp32 torch ops (ragged: A A^T of the stack masked to its diagonal blocks, (sum r)^2 K
    FLOPs, and one-hot sums over each adapter's columns). ``weight_sq``: ||W_n||^2 (from the caller).
    """
    N, K = weight.shape
    a2 = lora_A.reshape(-1, K)
    u = _launch.gemm(a2 if a2.dtype == weight.dtype else a2.float(), weight, out_dtype=torch.float32)  # [rows, N]
    af, bf = lora_A.float(), lora_B.float()
    if rank_offsets is None:
        n, r = lora_A.shape[:2]
        cross = (bf * u.view(n, r, N).transpose(1, 2)).sum(2)  # [n, N]
        quad = ((bf @ (af @ af.transpose(1, 2))) * bf).sum(2)
    else:
        n = rank_offsets.numel() - 1
        owner = _owners(rank_offsets, af.shape[0])
        onehot = F.one_hot(owner, n + 1)[:, :n].float()  # [sum r, n]
        gram = (af @ af.t()) * (owner[:, None] == owner[None, :])  # per-adapter A_a A_a^T blocks
        cross = onehot.t() @ (bf.t() * u)  # [n, N] contiguous, as the fake (inductor checks the strides)
        quad = onehot.t() @ ((bf @ gram) * bf).t()
    s = scale_vec.float()[:, None]
    return (weight_sq[None, :] + 2.0 * s * cross + s * s * quad).clamp_min(0.0).sqrt()


@grouped_dora_norm.register_fake
def _(weight, weight_sq, lora_A, lora_B, scale_vec, rank_offsets):
    return weight_sq.new_empty(scale_vec.shape[0], weight.shape[0])
