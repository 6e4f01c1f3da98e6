"""One LoRA linear layer: every competitor over dtype x (K, N) x r x tokens M x mode.

Modes: ``fwd`` (inference, no grad), ``train`` (forward + backward, base frozen, dropout 0) and
``train-drop0.1``. Backward returns dx, dA and dB (nn.Linear: dx only). Each case checks the competitor's
output (and gradients) against a float32 run of fastlora.reference once, then times it.
"""

from __future__ import annotations

import competitors
import harness
import pytest
import torch
import torch.nn.functional as F

from fastlora import reference

Case = harness.LayerCase


def _cases():
    g = harness.grid()
    modes = ["fwd"] + [("train" if p == 0 else f"train-drop{p:g}") for p in g.train_dropouts]
    out = []
    for dtype in g.dtypes:
        for mode in modes:
            for K, N in g.shapes:
                for R in g.ranks:
                    for M in g.tokens:
                        for impl in competitors.LAYER:
                            if impl == "merged" and mode != "fwd":
                                continue  # merged weights serve inference only
                            out.append(Case(mode, dtype, K, N, R, M, impl))
    return out


CASES = _cases()
_MS: dict = {}  # (group, impl) -> median ms, so later competitors can report ratios
_PROBLEM: dict = {}


def _problem(c: Case) -> competitors.Problem:
    key = (c.dtype, c.K, c.N, c.R)
    if key not in _PROBLEM:
        _PROBLEM.clear()
        _PROBLEM[key] = competitors.Problem(c.K, c.N, c.R, harness.DTYPES[c.dtype], harness.device())
    return _PROBLEM[key]


def _check(c: Case, pb: competitors.Problem, impl: competitors.Impl, x: torch.Tensor, dy: torch.Tensor):
    """Compare output and gradients with a float32 reference run on the same dropout mask."""
    dtype, p = pb.dtype, (c.dropout if c.train else 0.0)
    y, mask = harness.seeded_run(impl, x, p)
    xr = x.detach().float().requires_grad_(c.train)
    Ar = pb.A.float().requires_grad_(c.train)
    Br = pb.B.float().requires_grad_(c.train)
    if c.impl == "linear":
        ref = F.linear(xr, pb.W.float(), pb.b.float())
    else:
        ref = reference.lora_linear(xr, pb.W.float(), pb.b.float(), Ar, Br, pb.scaling, dropout_p=p,
                                    training=c.train, dropout_mask=mask)
    return harness.check_layer(c.id, y, ref, dtype, c.train, [x, *impl.params], [xr, Ar, Br], dy)


def _floor_ms(c: Case) -> float:
    """nn.Linear's time for this case's shape and mode (measured now if its own case did not run)."""
    key = (c.group, "linear")
    if key not in _MS:
        pb = _problem(c)
        impl = competitors.layer_impl("linear", pb, c.dropout, c.train)
        _MS[key] = harness.baseline_ms(impl, c.M, c.K, c.N, pb.dtype, c.train)
    return _MS[key]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_layer(benchmark, request, case: Case):
    if case.impl == "peft":
        harness.require("peft", "peft")
    pb = _problem(case)
    impl = competitors.layer_impl(case.impl, pb, case.dropout, case.train)
    ring = harness.input_ring(case.M, case.K, case.N, pb.dtype, case.train)
    errs = _check(case, pb, impl, *ring.items[0])
    timing, peak, extra = harness.time_layer(benchmark, impl, ring, case.train)
    _MS[(case.group, case.impl)] = timing.median_ms

    lora = case.impl != "linear"
    flop = harness.flops(case.M, case.K, case.N, case.R, case.train, lora=lora)
    nbytes = harness.bytes_moved(case.M, case.K, case.N, case.R, pb.W.element_size(), case.train, lora=lora)
    ratio = timing.median_ms / _floor_ms(case)
    peft_ms = _MS.get((case.group, "peft"))
    speedup = peft_ms / timing.median_ms if peft_ms else None
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=f"  {ratio:6.2f}x nn.Linear" + (f"  {speedup:5.2f}x vs PEFT" if speedup else ""),
                   suite="layer", mode=case.mode, train=case.train, dropout=case.dropout, dtype=case.dtype,
                   K=case.K, N=case.N, R=case.R, M=case.M, impl=case.impl, ring=len(ring.items),
                   ratio_to_linear=ratio, speedup_over_peft=speedup, peak_mem_bytes=peak, extra_mem_bytes=extra,
                   rel_err=errs)
