"""DoRA's competitors for one layer, built from one ``competitors.Problem`` plus a magnitude, so outputs must agree.

``linear`` (nn.Linear, no adapter: the cuBLAS floor), ``fastlora-lora`` (fastlora LoRA at the same rank: DoRA's
cost is measured against it), ``peft-dora`` (PEFT's LoRA layer with ``use_dora=True``), ``peft-dora-cached``
(inference only: the same under ``peft.helpers.DoraCaching``, which keeps the weight norm between eval calls),
``composed`` (the best plain-torch composition, after the "dorafactors" recipe: the norm factored with ||W||^2
computed once, cuBLAS GEMMs, and one fused elementwise compose), ``fastlora-dora`` (fastlora.Linear with
``use_dora=True``: the norm computed every call by default, as PEFT) and ``fastlora-dora-cached`` (inference only:
the same under ``fastlora.DoraCaching``, the counterpart of ``peft-dora-cached``).
"""

from __future__ import annotations

import competitors
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora
from fastlora.reference import DORA_EPS

DORA = ("linear", "fastlora-lora", "peft-dora", "peft-dora-cached", "composed", "fastlora-dora",
        "fastlora-dora-cached")
INFERENCE_ONLY = ("peft-dora-cached", "fastlora-dora-cached")
# QDoRA (a 4-bit base, ``competitors.QProblem``): nn.Linear on the dequantised W, fastlora QLoRA, PEFT's DoRA over a
# bitsandbytes Linear4bit, fastlora.Linear4bit(use_dora=True); each maps to ``competitors.qlora_impl`` (+ magnitude)
QDORA = {"linear": ("linear", False), "qlora-fastlora": ("qlora-fastlora", False),
         "qdora-peft": ("qlora-peft", True), "qdora-fastlora": ("qlora-fastlora", True)}


def magnitude(pb: competitors.Problem, W: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's initial magnitude ||W + s B A|| per row, perturbed by 10% so g is not 1 (fp32, as PEFT keeps it
    for fp32 adapters; cast to the adapters' dtype by each competitor). ``W``: the base if not ``pb.W`` (QDoRA: the
    dequantised weight)."""
    g = torch.Generator(device="cpu").manual_seed(7)
    w = (pb.W if W is None else W).float() + pb.scaling * (pb.B.float() @ pb.A.float())
    noise = 1 + 0.1 * torch.randn(pb.N, generator=g).to(pb.device)
    return torch.linalg.vector_norm(w, dim=1) * noise


def dora_impl(name: str, pb: competitors.Problem, m: torch.Tensor, dropout: float, train: bool) -> competitors.Impl:
    W, b, s = pb.W, pb.b, pb.scaling
    p = dropout if train else 0.0
    if name == "linear":
        return competitors.Impl(lambda x: F.linear(x, W, b), [])
    A = pb.A.clone().requires_grad_(train)
    B = pb.B.clone().requires_grad_(train)
    M = m.to(pb.dtype).requires_grad_(train)
    if name == "fastlora-lora":
        return competitors.Impl(
            lambda x: fastlora.lora_linear(x, W, b, A, B, s, dropout_p=p, training=train), [A, B],
            lambda x, seed: fastlora.lora_linear(x, W, b, A, B, s, dropout_p=p, training=train, seed=seed))
    if name in ("fastlora-dora", "fastlora-dora-cached"):
        mod = fastlora.Linear.from_linear(pb.base_linear(), r=pb.R, alpha=pb.alpha, dropout=dropout, use_dora=True,
                                          adapter_dtype=pb.dtype)  # as the PEFT competitor (docs/benchmarks.md)
        params = competitors.set_params(mod, [mod.lora_A, mod.lora_B, mod.lora_magnitude], [pb.A, pb.B, m], train)
        if name == "fastlora-dora-cached":
            if train:
                raise ValueError("fastlora-dora-cached is an inference competitor (the eval norm is what it keeps)")
            return competitors.Impl(_Cached(mod, fastlora.DoraCaching), params, info=dict(cache="fastlora.DoraCaching"))

        def seeded(x, seed):
            return fastlora.lora_linear(x, W, b, mod.lora_A, mod.lora_B, s, magnitude=mod.lora_magnitude,
                                        dropout_p=p, training=train, seed=seed)
        return competitors.Impl(mod, params, seeded)
    if name == "composed":
        return competitors.Impl(Composed(W, b, A, B, M, s, p), [A, B, M])
    if name in ("peft-dora", "peft-dora-cached"):
        layer = competitors.peft_layer(pb, dropout, ["default"], use_dora=True)
        params = competitors.set_params(layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                                layer.lora_magnitude_vector["default"].weight], [pb.A, pb.B, m], train)
        if name == "peft-dora":
            return competitors.Impl(layer, params)
        if train:
            raise ValueError("peft-dora-cached is an inference competitor (DoraCaching caches in eval only)")
        from peft.helpers import DoraCaching

        return competitors.Impl(_Cached(layer, DoraCaching), params, info=dict(cache="peft.helpers.DoraCaching"))
    raise ValueError(f"unknown DoRA competitor {name!r}")


def qdora_impl(name: str, qp: competitors.QProblem, m: torch.Tensor, train: bool) -> competitors.Impl:
    """A ``QDORA`` competitor over ``qp``'s 4-bit base (dropout 0, as the QLoRA suite)."""
    base, dora = QDORA[name]
    return competitors.qlora_impl(base, qp, train, magnitude=m.float() if dora else None)


class _Cached:
    """Calls ``layer`` inside one ``DoraCaching`` context held open for the whole benchmark (PEFT fills its cache on
    the first eval call and reuses it while the context lasts, as a serving loop would)."""

    def __init__(self, layer, caching):
        self.layer = layer
        self.ctx = caching()
        self.ctx.__enter__()

    def __call__(self, x):
        return self.layer(x)

    def __del__(self):
        self.ctx.__exit__(None, None, None)


class Composed(nn.Module):
    """DoRA from torch ops at their best: ||W_n||^2 once (W frozen), the norm per step as
    ||W||^2 + 2 s B.(A W^T) + s^2 B (A A^T) B^T (fp32, detached: no out x in tensor), cuBLAS for every product,
    and one fused elementwise pass composing the output.

        p = 0:  acc = x W^T;  acc += s T B^T (addmm_);  y = b + g * acc                   T = x A^T
        p > 0:  z = d(x) W^T;  z += s T B^T;  y = b + x W^T;  y += s T B^T;  y += (g - 1) * z    T = d(x) A^T

    (PEFT's dropout form: (g - 1) d(x) W^T + g s T B^T = (g - 1) z + s T B^T.)
    """

    def __init__(self, W, b, A, B, m, s, p):
        super().__init__()
        self.W, self.b, self.A, self.B, self.m, self.s, self.p = W, b, A, B, m, s, p
        self.w_sq = W.float().square().sum(1)

    def norm(self):
        with torch.no_grad():
            a, bb = self.A.float(), self.B.float()
            cross = (bb * (self.A.to(self.W.dtype) @ self.W.t()).float().t()).sum(1)
            quad = ((bb @ (a @ a.t())) * bb).sum(1)
            return (self.w_sq + 2 * self.s * cross + self.s ** 2 * quad).clamp_min(0).sqrt().clamp_min(DORA_EPS)

    def forward(self, x):
        x2 = x.reshape(-1, self.W.shape[1])
        g = (self.m.float() / self.norm()).to(x.dtype)
        if self.p == 0:
            acc = x2 @ self.W.t()
            acc.addmm_(x2 @ self.A.t(), self.B.t(), alpha=self.s)
            y = torch.addcmul(self.b, acc, g)
        else:
            xd = F.dropout(x2, self.p)
            t = xd @ self.A.t()
            z = xd @ self.W.t()
            z.addmm_(t, self.B.t(), alpha=self.s)
            y = torch.addmm(self.b, x2, self.W.t())
            y.addmm_(t, self.B.t(), alpha=self.s)
            y.addcmul_(g - 1, z)
        return y.reshape(*x.shape[:-1], self.W.shape[0])

