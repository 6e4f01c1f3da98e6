"""The autograd Function around the fused ops: what is saved (x, T [M, R], the packed dropout mask) and what is
recomputed."""

from __future__ import annotations

import torch

from fastlora import _ops


class LoRAFunction(torch.autograd.Function):
    """y [M, N] from x [M, K]; dense (lora_A [R, K]) or grouped (lora_A [G, R, K] plus batch tensors).

    Saves x, T = drop(x) A^T and, with dropout, its keep-mask packed one bit per element (M*K/8 bytes, 1/16 of a
    bf16 dropped copy of x); never an M x N tensor nor a dropped copy of x. Gradients for the
    frozen weight and bias are computed with torch only when they require grad (full fine-tuning). A 4-bit weight
    (``quant``, ``qblocks``: see ``fastlora._ops``) is saved packed, as it is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, scale_vec, perm, ids, seg, dropout_p, seed,
                quant=(), qblocks=()):
        y, t, bits = _ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, scale_vec, perm, ids, seg, dropout_p,
                                       seed, list(quant), list(qblocks))
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, bits, scale_vec, perm, ids, seg, *quant)
        ctx.scaling, ctx.dropout_p, ctx.qblocks = scaling, dropout_p, qblocks
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, bits, scale_vec, perm, ids, seg, *quant = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB = _ops.lora_backward(dy, x, weight, lora_A, lora_B, t, bits, ctx.scaling, scale_vec, perm, ids,
                                        seg, ctx.dropout_p, need[0], need[3], need[4], quant, list(ctx.qblocks))
        dw = (dy.t() @ x.to(dy.dtype)).to(weight.dtype) if need[1] else None
        db = dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
        return (dx if need[0] else None, dw, db, dA if need[3] else None, dB if need[4] else None,
                None, None, None, None, None, None, None, None, None)
