"""The best plain-PyTorch composition (what Unsloth does): base ``addmm``, then an in-place ``addmm_`` of the
low-rank product; backward likewise. Dispatch falls back to it where the fused kernels cannot win.

Saves x, T and the seed: the dropout mask is regenerated from the seed by the mask kernel, in forward and
backward, and only lives as a temporary (the fused path saves it packed instead, M*K/8 bytes).
"""

from __future__ import annotations

import torch

from fastlora import _launch


def _dropped(x, p, seed):
    if p == 0.0:
        return x
    return x * _launch.dropout_mask(x.shape[0], x.shape[1], p, seed, x.device).to(x.dtype) * (1.0 / (1.0 - p))


class ComposedLoRAFunction(torch.autograd.Function):
    """y [M, N] from x [M, K] with torch GEMMs; same arguments as the dense ``LoRAFunction``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        dt = x.dtype
        t = _dropped(x, dropout_p, seed) @ lora_A.to(dt).t()  # [M, R]
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        y.addmm_(t, lora_B.to(dt).t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.has_bias = scaling, dropout_p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t = ctx.saved_tensors
        need = ctx.needs_input_grad
        s, p, dt = ctx.scaling, ctx.dropout_p, dy.dtype
        dx = dw = db = dA = dB = None
        if need[0] or need[3]:
            u = dy @ lora_B.to(dt)  # [M, R]
        if need[0]:
            dx = dy @ weight.to(dt)
            if p == 0.0:
                dx.addmm_(u, lora_A.to(dt), alpha=s)
            else:
                dx += _dropped(u @ lora_A.to(dt), p, ctx.seed) * s
        if need[3]:
            dA = (s * (u.t() @ _dropped(x, p, ctx.seed).to(dt))).to(lora_A.dtype)
        if need[4]:
            dB = (s * (dy.t() @ t)).to(lora_B.dtype)
        if need[1]:
            dw = (dy.t() @ x.to(dt)).to(weight.dtype)
        if ctx.has_bias and need[2]:
            db = dy.sum(0).to(weight.dtype)
        return dx, dw, db, dA, dB, None, None, None
