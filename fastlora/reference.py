"""The PyTorch oracle: the LoRA equations written out, nothing clever. Imports only torch.

Used by the tests (in float64) and as the CPU path when the Triton interpreter is off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dropped(x, dropout_p, training, dropout_mask):
    if not training or dropout_p == 0.0:
        return x
    if dropout_mask is None:
        return F.dropout(x, dropout_p, training=True)
    return x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, dropout_mask=None,
                compute_dtype=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, the low-rank branch in the adapters' dtype (as PEFT).

    ``dropout_mask`` (bool, x's shape) replaces torch's random dropout, so a test can use the kernels' mask.
    ``compute_dtype`` (a quantised base, as bitsandbytes' Linear4bit): the base product x W^T + b runs in it and
    comes back in x's dtype.
    """
    if compute_dtype is None:
        base = F.linear(x, weight, bias)
    else:
        cd = compute_dtype
        base = F.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd)).to(x.dtype)
    xd = _dropped(x, dropout_p, training, dropout_mask).to(lora_A.dtype)
    low = F.linear(F.linear(xd, lora_A), lora_B)
    return base + (scaling * low).to(base.dtype)


def grouped_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, *, dropout_p=0.0, training=False,
                        dropout_mask=None, rank_offsets=None):
    """Per-token adapters: token i adds scaling[g] * (dropout(x_i) A[g]^T) B[g]^T with g = adapter_ids[i] (-1: none).

    lora_A [n, r, in], lora_B [n, out, r]; scaling a float or an (n,) tensor. A loop over adapters. With
    ``rank_offsets`` (n + 1 offsets) the stack is ragged: A[g] = lora_A[o_g:o_(g+1)] of lora_A [sum r, in] and
    B[g] = lora_B[:, o_g:o_(g+1)] of lora_B [out, sum r].

    A 3-D ``weight`` [n, out, in] (mixture-of-experts: one weight per expert, bias None or [n, out]): token i computes
    W[g] x_i + b[g] + its adapter's term with g = adapter_ids[i]; a token with id -1 gives an all-zero row.
    """
    if weight.dim() == 3:
        return _expert_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, training,
                                   dropout_mask)
    base = F.linear(x, weight, bias)
    xd = _dropped(x, dropout_p, training, dropout_mask).to(lora_A.dtype).reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1)
    low = torch.zeros(xd.shape[0], weight.shape[0], dtype=lora_B.dtype, device=x.device)
    offsets = None if rank_offsets is None else [int(o) for o in rank_offsets]
    for g in range(lora_A.shape[0] if offsets is None else len(offsets) - 1):
        rows = (ids == g).nonzero().squeeze(1)
        s = scaling[g] if isinstance(scaling, torch.Tensor) else scaling
        a, b = _adapter(lora_A, lora_B, offsets, g)
        low = low.index_put((rows,), s * F.linear(F.linear(xd[rows], a), b))
    return base + low.reshape(base.shape).to(base.dtype)


def _expert_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, training, dropout_mask):
    """``grouped_lora_linear`` with one base weight per expert (a loop over experts)."""
    xf = x.reshape(-1, x.shape[-1])
    xd = _dropped(x, dropout_p, training, dropout_mask).to(lora_A.dtype).reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1)
    out = torch.zeros(xf.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    for g in range(weight.shape[0]):
        rows = (ids == g).nonzero().squeeze(1)
        s = scaling[g] if isinstance(scaling, torch.Tensor) else scaling
        y = F.linear(xf[rows], weight[g], None if bias is None else bias[g])
        low = s * F.linear(F.linear(xd[rows], lora_A[g]), lora_B[g])
        out = out.index_put((rows,), y + low.to(y.dtype))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _adapter(lora_A, lora_B, offsets, g):
    """Adapter g's (A [r, K], B [N, r]) of a padded stack ([n, r, K], [n, N, r]) or, with ``offsets``, a ragged one."""
    if offsets is None:
        return lora_A[g], lora_B[g]
    return lora_A[offsets[g]:offsets[g + 1]], lora_B[:, offsets[g]:offsets[g + 1]]


# DoRA: the column norm is clamped to this before dividing (m / max(||.||, eps)), so a zero-norm row with m = 0 gives
# g = 0 (y = b there) where PEFT gives NaN; see docs/dora.md.
DORA_EPS = 1e-6


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, *, dropout_p=0.0, training=False,
                dropout_mask=None, compute_dtype=None):
    """PEFT's DoRA written out: g = m / max(||W + s B A||, eps) per output row, the norm detached;

        y = x W^T + b + (g - 1) (d(x) W^T) + g s (d(x) A^T) B^T     d(x) = x without dropout (then = g (...) + b)

    The out x in matrix W + s B A is built here, as PEFT does; the kernels never build it. ``compute_dtype`` (a
    quantised base, as in ``lora_linear``): the base products x W^T + b and d(x) W^T run in it.
    """
    delta = scaling * (lora_B @ lora_A)
    norm = torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=1).detach()
    g = magnitude / norm.clamp_min(DORA_EPS)
    xd = _dropped(x, dropout_p, training, dropout_mask)
    if compute_dtype is None:
        base, plain = F.linear(x, weight, bias), F.linear(xd, weight)
    else:
        cd = compute_dtype
        base = F.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd)).to(x.dtype)
        plain = F.linear(xd.to(cd), weight.to(cd)).to(x.dtype)
    low = F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B)
    return base + ((g - 1) * plain + g * (scaling * low)).to(base.dtype)


def grouped_dora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, magnitude, *, dropout_p=0.0,
                        training=False, dropout_mask=None, rank_offsets=None):
    """Per-token adapters, DoRA and plain LoRA mixed: ``magnitude`` (n, out) holds adapter g's m in row g, or NaN
    for a plain adapter. Token i of adapter g = adapter_ids[i] (-1: none) adds

        plain:  s_g (d(x_i) A_g^T) B_g^T
        DoRA:   (c_g - 1) (d(x_i) W^T) + c_g s_g (d(x_i) A_g^T) B_g^T     c_g = m_g / max(||W + s_g B_g A_g||, eps)

    to x_i W^T + b (the norm per output row, detached). Stacks as ``grouped_lora_linear``. A loop over adapters."""
    N = weight.shape[0]
    base = F.linear(x, weight, bias)
    xd = _dropped(x, dropout_p, training, dropout_mask).reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1)
    out = base.reshape(-1, N)
    offsets = None if rank_offsets is None else [int(o) for o in rank_offsets]
    for g in range(magnitude.shape[0]):
        rows = (ids == g).nonzero().squeeze(1)
        s = scaling[g] if isinstance(scaling, torch.Tensor) else scaling
        a, b = _adapter(lora_A, lora_B, offsets, g)
        low = s * F.linear(F.linear(xd[rows].to(a.dtype), a), b)
        if torch.isnan(magnitude[g]).all():
            delta = low
        else:
            norm = torch.linalg.vector_norm(weight.to(b.dtype) + s * (b @ a), dim=1).detach()
            c = magnitude[g] / norm.clamp_min(DORA_EPS)
            delta = (c - 1) * F.linear(xd[rows], weight) + c * low
        out = out.index_add(0, rows, delta.to(out.dtype))
    return out.reshape(base.shape)


def lora_linear_fp8(x, weight, weight_scale_inv, bias, lora_A, lora_B, scaling, *, block_size=(128, 128),
                    dropout_p=0.0, training=False, dropout_mask=None, magnitude=None, fp8_activations=False):
    """``lora_linear`` (``dora_linear`` when ``magnitude`` is given) over a block-scaled FP8 base: weight
    float8_e4m3fn [N, K], weight_scale_inv [ceil(N / bn), ceil(K / bk)], W = float(weight) * scale per block, in
    x's dtype (the fp32 product rounded once; exact for float64). As ``fastlora.quant.dequantize_fp8_blockwise``.

    ``fp8_activations`` (W8A8, no DoRA): the base product takes x through ``fake_quant_fp8_act`` (the kernel's per
    token, per 128 channel e4m3 quantisation, straight-through in backward) and W unrounded, computed in fp32 (float64
    for float64 x) and rounded once to x's dtype; the low-rank branch takes x as it is.
    """
    bn, bk = block_size
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = weight_scale_inv.to(cd).repeat_interleave(bn, dim=0)[:weight.shape[0]]
    w = weight.to(cd) * scale.repeat_interleave(bk, dim=1)[:, :weight.shape[1]]
    kw = dict(dropout_p=dropout_p, training=training, dropout_mask=dropout_mask)
    if fp8_activations:
        base = F.linear(fake_quant_fp8_act(x.to(cd)), w, None if bias is None else bias.to(cd)).to(x.dtype)
        xd = _dropped(x, dropout_p, training, dropout_mask).to(lora_A.dtype)
        return base + (scaling * F.linear(F.linear(xd, lora_A), lora_B)).to(base.dtype)
    if magnitude is None:
        return lora_linear(x, w.to(x.dtype), bias, lora_A, lora_B, scaling, **kw)
    return dora_linear(x, w.to(x.dtype), bias, lora_A, lora_B, scaling, magnitude, **kw)


def fake_quant_fp8_act(x, group=128):
    """x [..., K] as the W8A8 kernel multiplies it: per token and per ``group`` channels (the last group partial)
    sx = amax(|x|) * fp32(1 / 448) (1 for an all-zero group), codes e4m3(x * (1 / sx)) rounded to nearest even
    (saturated at 448), times sx again; the scale arithmetic in fp32, as the kernel's (the same codes and scales).
    Straight-through: the gradient is x's."""
    xf = x.detach().float()
    K = xf.shape[-1]
    pad = -K % group
    g = F.pad(xf, (0, pad)).unflatten(-1, (-1, group))  # [..., K / group, group]
    amax = g.abs().amax(-1, keepdim=True)
    sx = torch.where(amax > 0, amax * torch.tensor(1 / 448, dtype=torch.float32), torch.ones_like(amax))
    codes = (g * (1.0 / sx)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    q = (codes.to(x.dtype) * sx.to(x.dtype)).flatten(-2)[..., :K]
    return x + (q - x).detach()
