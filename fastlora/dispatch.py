"""Per-shape choice between the fused kernels and the torch composition, decided once and cached.

Policy (``set_policy`` or ``FASTLORA_DISPATCH``): ``"fused"`` always runs the Triton kernels, ``"torch"``
always the cuBLAS composition, ``"auto"`` (default on CUDA) times both once per key — device, dtypes, a
power-of-two bucket of M, N, K, R, bias, dropout, training — and keeps the faster, like autotuning. CPU
tensors and code being compiled by torch.compile always take the fused path (the custom ops).
Decisions can be saved to and loaded from a JSON file (``save_decisions``/``load_decisions``) so a
process does not re-time what an earlier one measured on the same GPU.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from fastlora import _launch

POLICIES = ("auto", "fused", "torch")
_policy = os.environ.get("FASTLORA_DISPATCH", "auto")
_decisions: dict[str, str] = {}


def set_policy(policy: str) -> None:
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}; got {policy!r}")
    _policy = policy


def get_policy() -> str:
    return _policy


def decisions() -> dict[str, str]:
    return dict(_decisions)


def save_decisions(path: str) -> None:
    with open(path, "w") as f:
        json.dump(_decisions, f, indent=1, sort_keys=True)


def load_decisions(path: str) -> None:
    with open(path) as f:
        loaded = json.load(f)
    bad = {k: v for k, v in loaded.items() if v not in ("fused", "torch")}
    if bad:
        raise ValueError(f"{path}: decisions must be 'fused' or 'torch'; got {bad}")
    _decisions.update(loaded)


def key(x, weight, bias, lora_A, dropout_p, training) -> str:
    M, K = x.shape
    dev = _device_name(x.device.index) if x.is_cuda else x.device.type
    return (f"{dev}|{x.dtype}|{lora_A.dtype}|M{_launch.m_bucket(M)}|K{K}|N{weight.shape[0]}|R{lora_A.shape[0]}"
            f"|bias{int(bias is not None)}|p{int(dropout_p > 0)}|train{int(training)}")


@functools.cache
def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def choose(x, weight, bias, lora_A, lora_B, dropout_p, training, run_fused, run_torch) -> str:
    """'fused' or 'torch' for this call; under "auto" times both (forward, plus backward when training)."""
    if _policy != "auto":
        return _policy
    if not x.is_cuda or torch.compiler.is_compiling():
        return "fused"
    k = key(x, weight, bias, lora_A, dropout_p, training)
    if k not in _decisions:
        _decisions[k] = _measure(x, weight, bias, lora_A, lora_B, training, run_fused, run_torch)
    return _decisions[k]


def _measure(x, weight, bias, lora_A, lora_B, training, run_fused, run_torch) -> str:
    import triton.testing

    M = _launch.m_bucket(x.shape[0])
    xs = torch.randn(M, x.shape[1], device=x.device, dtype=x.dtype)
    a = torch.randn_like(lora_A).requires_grad_(training)
    b = torch.randn_like(lora_B).requires_grad_(training)
    dy = torch.randn(M, weight.shape[0], device=x.device, dtype=x.dtype)

    def bench(run):
        def step():
            with torch.set_grad_enabled(training):
                y = run(xs, a, b)
                if training:
                    torch.autograd.backward(y, dy, inputs=[a, b])
        return triton.testing.do_bench(step, warmup=10, rep=40, return_mode="median")

    return "fused" if bench(run_fused) <= bench(run_torch) else "torch"
