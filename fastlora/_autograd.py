"""The autograd Functions around the fused ops (LoRA, DoRA): what is saved (x, T [M, R], the packed dropout mask;
DoRA's g and, when the magnitude trains, one M x N term) and what is recomputed."""

from __future__ import annotations

import torch

from fastlora import _dora_grouped_ops, _dora_ops, _ops


class LoRAFunction(torch.autograd.Function):
    """y [M, N] from x [M, K]; dense (lora_A [R, K]) or grouped (lora_A [G, R, K] plus batch tensors).

    Saves x, T = drop(x) A^T and, with dropout, its keep-mask packed one bit per element (M*K/8 bytes, 1/16 of a
    bf16 dropped copy of x); never an M x N tensor nor a dropped copy of x. Gradients for the
    frozen weight and bias are computed with torch only when they require grad (full fine-tuning). A 4-bit weight
    (``quant``, ``qblocks``: see ``fastlora._ops``) is saved packed, as it is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, scale_vec, perm, ids, seg, dropout_p, seed,
                quant=(), qblocks=(), rank_offsets=None, t_width=0, rank_align=1):
        y, t, bits = _ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, scale_vec, perm, ids, seg, dropout_p,
                                       seed, list(quant), list(qblocks), rank_offsets, t_width, rank_align)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, bits, scale_vec, perm, ids, seg, rank_offsets, *quant)
        ctx.scaling, ctx.dropout_p, ctx.qblocks, ctx.t_width, ctx.rank_align = scaling, dropout_p, qblocks, t_width, \
            rank_align
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, bits, scale_vec, perm, ids, seg, rank_offsets, *quant = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB = _ops.lora_backward(dy, x, weight, lora_A, lora_B, t, bits, ctx.scaling, scale_vec, perm, ids,
                                        seg, ctx.dropout_p, need[0], need[3], need[4], quant, list(ctx.qblocks),
                                        rank_offsets, ctx.t_width, ctx.rank_align)
        dw = (dy.t() @ x.to(dy.dtype)).to(weight.dtype) if need[1] else None  # experts refuse a trainable W
        db = None
        if ctx.bias_dtype is not None and need[2]:
            db = dy.sum(0) if weight.dim() == 2 else _expert_bias_grad(dy, perm, ids, weight.shape[0])
            db = db.to(ctx.bias_dtype)
        return (dx if need[0] else None, dw, db, dA if need[3] else None, dB if need[4] else None,
                None, None, None, None, None, None, None, None, None, None, None, None)


class DoRAFunction(torch.autograd.Function):
    """PEFT's DoRA, y [M, N] from x [M, K] (``fastlora._dora_ops``), with g = magnitude / norm and ``norm`` the
    detached max(||W + s B A||, eps) per output row.

    Saves what LoRA saves (x, T, the packed mask) plus g and, only when the magnitude requires grad, Z [M, N] (the
    term g multiplies, written by the forward kernel): dm = sum_tokens dy * Z / norm, reduced in fp32 beside dB from
    the same dy tiles. Nothing of size M x N when the magnitude is frozen. A 4-bit weight (``quant``, ``qblocks``: see
    ``fastlora._ops``) is saved packed, as it is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, quant=(), qblocks=()):
        g = magnitude.detach().float() / norm
        store_z = ctx.needs_input_grad[5]
        y, t, bits, z = _dora_ops.dora_forward(x, weight, bias, lora_A, lora_B, scaling, g, dropout_p, seed, store_z,
                                               list(quant), list(qblocks))
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, bits, g, norm, z, *quant)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.qblocks = scaling, dropout_p, seed, qblocks
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.magnitude_dtype = magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, bits, g, norm, z, *quant = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB, dz = _dora_ops.dora_backward(dy, x, weight, lora_A, lora_B, t, bits, z, ctx.scaling, g,
                                                 ctx.dropout_p, need[0], need[3], need[4], need[5], quant,
                                                 list(ctx.qblocks))
        dm = (dz / norm).to(ctx.magnitude_dtype) if need[5] else None
        dw = _dora_weight_grad(dy, x, g, bits, ctx.dropout_p, weight.dtype) if need[1] else None
        db = dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
        return (dx if need[0] else None, dw, db, dA if need[3] else None, dB if need[4] else None, dm,
                None, None, None, None, None, None)


class GroupedDoRAFunction(torch.autograd.Function):
    """Grouped DoRA (``fastlora._dora_grouped_ops``): y [M, N] from x [M, K] and a stack of adapters, each token its
    adapter's, with g [n, N] = magnitude / norm per adapter row, exactly 1 where the magnitude is NaN (a plain LoRA
    adapter: its tokens compute LoRA). Saves what the grouped LoRA saves plus g and, only when the magnitude requires
    grad, Z [M, N]; dm = per adapter sum_tokens dy * Z / norm, 0 for NaN rows and adapters no token uses."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scale_vec, perm, ids, seg, dropout_p, seed,
                rank_offsets=None, t_width=0, rank_align=1):
        m = magnitude.detach().float()
        plain = torch.isnan(m)
        g = torch.where(plain, 1.0, m / norm).contiguous()
        store_z = ctx.needs_input_grad[5]
        y, t, bits, z = _dora_grouped_ops.grouped_dora_forward(x, weight, bias, lora_A, lora_B, scale_vec, perm, ids,
                                                               seg, g, dropout_p, seed, store_z, rank_offsets,
                                                               t_width, rank_align)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, bits, z, scale_vec, perm, ids, seg, g, norm, plain,
                              rank_offsets)
        ctx.dropout_p, ctx.t_width, ctx.rank_align = dropout_p, t_width, rank_align
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.magnitude_dtype = magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, bits, z, scale_vec, perm, ids, seg, g, norm, plain, rank_offsets = \
            ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB, dz = _dora_grouped_ops.grouped_dora_backward(
            dy, x, weight, lora_A, lora_B, t, bits, z, scale_vec, perm, ids, seg, g, ctx.dropout_p, need[0], need[3],
            need[4], need[5], rank_offsets, ctx.t_width, ctx.rank_align)
        dm = torch.where(plain, 0.0, dz / norm).to(ctx.magnitude_dtype) if need[5] else None
        dw = None
        if need[1]:  # each token's g row (1 for base-only tokens)
            tok = torch.empty_like(ids).scatter_(0, perm.long(), ids).long()  # adapter of each token, caller's order
            gt = torch.cat([g, g.new_ones(1, g.shape[1])])[torch.where(tok < 0, g.shape[0], tok)]
            dw = _dora_weight_grad(dy, x, gt, bits, ctx.dropout_p, weight.dtype)
        db = dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
        return (dx if need[0] else None, dw, db, dA if need[3] else None, dB if need[4] else None, dm,
                None, None, None, None, None, None, None, None, None, None)


def _expert_bias_grad(dy, perm, ids, num_experts):
    """d bias [E, N] of per-expert biases: each expert's sum of dy over its tokens (sorted rows: token perm[i] of
    expert ids[i]; rows of no expert, id -1, add nothing)."""
    keep = ids >= 0
    return dy.new_zeros(num_experts, dy.shape[1], dtype=torch.float32).index_add_(
        0, ids[keep].long(), dy[perm[keep].long()].float())


def _dora_weight_grad(dy, x, g, bits, p, dtype):
    """dW of a DoRA layer whose base weight trains (full fine-tuning): the norm is detached, so W enters through the
    base products only. g fp32: [N] (one adapter) or [M, N] (each token's adapter row)."""
    if p == 0:
        return ((dy * g.to(dy.dtype)).t() @ x.to(dy.dtype)).to(dtype)
    return (dy.t() @ x.to(dy.dtype) + (dy * (g - 1).to(dy.dtype)).t() @ _dropped(x, bits, p)).to(dtype)


def _dropped(x, bits, p):
    """d(x) = x * keep / (1 - p) from the packed keep-mask (for the rare unfrozen-weight gradient)."""
    keep = (bits[:, :, None] >> torch.arange(32, device=bits.device, dtype=torch.int32)) & 1
    keep = keep.reshape(bits.shape[0], -1)[:, : x.shape[1]].to(x.dtype)
    return x * keep / (1.0 - p)
