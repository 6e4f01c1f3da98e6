"""QLoRA, one layer: a 4-bit base (NF4, double quant, blocksize 64, quantised once) with fp32 adapters, every
competitor of ``competitors.QLORA`` over dtype (the compute dtype) x (K, N) x r x tokens M x mode.

Modes: ``fwd`` (inference, no grad) and ``train`` (forward + backward, base frozen, dropout 0; dx, dA, dB,
nn.Linear dx only). Each case checks its output (and gradients) against a float32 run of fastlora.reference on
the float32 dequantised W once, then times it, and records the ratio to bf16 nn.Linear on the dequantised W,
the speedup over PEFT's QLoRA and peak memory above the inputs (CUDA only) beside PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench_layer
import competitors
import harness
import pytest
import torch
import torch.nn.functional as F

from fastlora import reference

MODES = ("fwd", "train")


@dataclass(frozen=True)
class Case(bench_layer.Case):
    """The layer suite's case (modes fwd / train, no dropout), its groups marked as QLoRA."""

    @property
    def group(self) -> str:
        return f"qlora-{super().group}"


def _cases():
    g = harness.grid()
    return [Case(mode, dtype, K, N, R, M, impl) for dtype in g.dtypes for mode in MODES for K, N in g.shapes
            for R in g.qlora_ranks for M in g.tokens for impl in competitors.QLORA]


CASES = _cases()
_MS: dict = {}  # (group, impl) -> median ms, for the ratios of later competitors
_MEM: dict = {}  # (group, impl) -> peak bytes above the inputs
_PROBLEM: dict = {}


def _problem(c: Case) -> competitors.QProblem:
    key = (c.dtype, c.K, c.N, c.R)
    if key not in _PROBLEM:
        _PROBLEM.clear()
        _PROBLEM[key] = competitors.QProblem(
            competitors.Problem(c.K, c.N, c.R, harness.DTYPES[c.dtype], harness.device()))
    return _PROBLEM[key]


def _check(c: Case, qp: competitors.QProblem, impl: competitors.Impl, x: torch.Tensor, dy: torch.Tensor):
    """Compare output and gradients with float32 on the exactly decoded W (fastlora.quant, bitsandbytes' format)."""
    dtype = qp.pb.dtype
    y = impl.forward(x)
    xr = x.detach().float().requires_grad_(c.train)
    Ar = qp.A.clone().requires_grad_(c.train)
    Br = qp.B.clone().requires_grad_(c.train)
    b32 = qp.pb.b.float()
    if c.impl == "linear":
        ref = F.linear(xr, qp.W32, b32)
    else:
        ref = reference.lora_linear(xr, qp.W32, b32, Ar, Br, qp.pb.scaling)
    return harness.check_layer(c.id, y, ref, dtype, c.train, [x, *impl.params], [xr, Ar, Br], dy)


def _floor_ms(c: Case) -> float:
    """nn.Linear's time on the dequantised W for this case (measured now if its own case did not run)."""
    key = (c.group, "linear")
    if key not in _MS:
        impl = competitors.qlora_impl("linear", _problem(c), c.train)
        _MS[key] = harness.baseline_ms(impl, c.M, c.K, c.N, _problem(c).pb.dtype, c.train)
    return _MS[key]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_qlora(benchmark, request, case: Case):
    if case.impl == "qlora-peft":
        harness.require("peft", "peft")
        if harness.bnb_unavailable():
            pytest.skip(harness.bnb_unavailable())
    qp = _problem(case)
    impl = competitors.qlora_impl(case.impl, qp, case.train)
    ring = harness.input_ring(case.M, case.K, case.N, qp.pb.dtype, case.train)
    errs = _check(case, qp, impl, *ring.items[0])
    timing, peak, extra = harness.time_layer(benchmark, impl, ring, case.train)
    _MS[(case.group, case.impl)] = timing.median_ms
    _MEM[(case.group, case.impl)] = extra

    lora = case.impl != "linear"
    flop = harness.flops(case.M, case.K, case.N, case.R, case.train, lora=lora)
    nbytes = harness.bytes_moved(case.M, case.K, case.N, case.R, qp.pb.W.element_size(), case.train, lora=lora,
                                 w_bytes=qp.w_bytes if lora else None, adapter_elt=4)
    ratio = timing.median_ms / _floor_ms(case)
    peft_ms, peft_mem = _MS.get((case.group, "qlora-peft")), _MEM.get((case.group, "qlora-peft"))
    speedup = peft_ms / timing.median_ms if peft_ms else None
    mem_ratio = extra / peft_mem if extra is not None and peft_mem else None
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=f"  {ratio:6.2f}x nn.Linear" + (f"  {speedup:5.2f}x vs PEFT" if speedup else ""),
                   suite="qlora", mode=case.mode, train=case.train, dropout=0.0, dtype=case.dtype, K=case.K,
                   N=case.N, R=case.R, M=case.M, impl=case.impl, ring=len(ring.items), quant=competitors.QUANT,
                   ratio_to_linear=ratio, speedup_over_peft=speedup, peak_mem_bytes=peak, extra_mem_bytes=extra,
                   extra_mem_over_peft=mem_ratio, rel_err=errs, **impl.info)
