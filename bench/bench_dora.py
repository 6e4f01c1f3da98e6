"""One DoRA linear layer (PEFT's ``use_dora=True``): every competitor of ``dora_impls`` over dtype x (K, N) x r x
tokens M x mode.

Modes: ``fwd`` (inference, no grad), ``train`` (forward + backward, base frozen, dropout 0) and
``train-drop<p>`` (PEFT's dropout form: a second base product on the dropped x). Backward returns dx, dA, dB and
the magnitude's gradient (nn.Linear: dx; fastlora LoRA: dx, dA, dB). Each case checks its output and gradients
against a float32 run of ``fastlora.reference.dora_linear`` (``lora_linear`` for fastlora LoRA) on the same dropout
mask once, then times it. Recorded per cell: the ratio to nn.Linear, to fastlora LoRA (issue 23's targets: training
<= 1.10x, inference <= 1.03x), the speedup over PEFT DoRA, and peak memory above the inputs.

QDoRA cells (ids ``qdora-...``, ``extra_info.suite = "qdora"``): the same over the QLoRA suite's 4-bit base (NF4,
double quant, blocksize 64, fp32 adapters and magnitude; ``fwd`` and ``train``): nn.Linear on the dequantised W,
fastlora QLoRA (the baseline), PEFT's DoRA over a bitsandbytes Linear4bit and fastlora.Linear4bit(use_dora=True),
checked against the reference on W decoded in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import competitors
import dora_impls
import harness
import pytest
import torch
import torch.nn.functional as F

from fastlora import reference


@dataclass(frozen=True)
class Case(harness.LayerCase):
    quant: str = ""  # "nf4": QDoRA over the QLoRA suite's 4-bit base

    @property
    def kind(self) -> dict:
        return KINDS[self.quant]

    @property
    def group(self) -> str:
        return f"{self.kind['suite']}-{super().group}"


# per kind: the suite name, the competitors, fastlora's LoRA baseline and PEFT's DoRA
KINDS = {"": dict(suite="dora", impls=dora_impls.DORA, lora="fastlora-lora", peft="peft-dora"),
         "nf4": dict(suite="qdora", impls=tuple(dora_impls.QDORA), lora="qlora-fastlora", peft="qdora-peft")}


def _cases():
    g = harness.grid()
    modes = ["fwd"] + [("train" if p == 0 else f"train-drop{p:g}") for p in g.dora["dropouts"]]
    shapes, tokens = g.dora.get("shapes", g.shapes), g.dora.get("tokens", g.tokens)
    dense = [Case(mode, dtype, K, N, R, M, impl) for dtype in g.dtypes for mode in modes for K, N in shapes
             for R in g.dora["ranks"] for M in tokens for impl in dora_impls.DORA
             if mode == "fwd" or impl not in dora_impls.INFERENCE_ONLY]
    four_bit = [Case(mode, dtype, K, N, R, M, impl, "nf4") for dtype in g.dtypes for mode in ("fwd", "train")
                for K, N in shapes for R in g.dora["ranks"] for M in tokens for impl in dora_impls.QDORA]
    return dense + four_bit


CASES = _cases()
_MS: dict = {}  # (group, impl) -> median ms, for the ratios of later competitors
_PROBLEM: dict = {}


def _problem(c: Case):
    """(Problem, magnitude) or, for a 4-bit case, (QProblem, magnitude from the dequantised W)."""
    key = (c.dtype, c.K, c.N, c.R, c.quant)
    if key not in _PROBLEM:
        _PROBLEM.clear()
        pb = competitors.Problem(c.K, c.N, c.R, harness.DTYPES[c.dtype], harness.device())
        if c.quant:
            qp = competitors.QProblem(pb)
            _PROBLEM[key] = qp, dora_impls.magnitude(pb, qp.W32)
        else:
            _PROBLEM[key] = pb, dora_impls.magnitude(pb)
    return _PROBLEM[key]


def _impl(c: Case, impl_name: str) -> competitors.Impl:
    p, m = _problem(c)
    if c.quant:
        return dora_impls.qdora_impl(impl_name, p, m, c.train)
    return dora_impls.dora_impl(impl_name, p, m, c.dropout, c.train)


def _check(c: Case, pb, m, impl: competitors.Impl, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Output and gradients against a float32 reference on the same dropout mask (fastlora's seeded mask, or
    torch's RNG replayed for F.dropout / nn.Dropout); ``pb`` a QProblem for 4-bit cases (W decoded in float32,
    fp32 adapters)."""
    p = c.dropout if c.train else 0.0
    s = pb.pb.scaling if c.quant else pb.scaling
    y, mask = harness.seeded_run(impl, x, p)
    xr = x.detach().float().requires_grad_(c.train)
    if c.quant:
        W, b, dtype = pb.W32, pb.pb.b.float(), pb.pb.dtype
        Ar, Br, mr = (t.float().requires_grad_(c.train) for t in (pb.A, pb.B, m))
    else:
        W, b, dtype = pb.W.float(), pb.b.float(), pb.dtype
        Ar, Br, mr = (t.float().requires_grad_(c.train) for t in (pb.A, pb.B, m.to(pb.dtype)))
    if c.impl == "linear":
        ref = F.linear(xr, W, b)
    elif c.impl == c.kind["lora"]:
        ref = reference.lora_linear(xr, W, b, Ar, Br, s, dropout_p=p, training=c.train, dropout_mask=mask)
    else:
        ref = reference.dora_linear(xr, W, b, Ar, Br, s, mr, dropout_p=p, training=c.train, dropout_mask=mask)
    return harness.check_layer(c.id, y, ref, dtype, c.train, [x, *impl.params], [xr, Ar, Br, mr], dy)


def _ms(c: Case, impl_name: str) -> float:
    """This case's group's time for ``impl_name`` (measured now if its own case did not run)."""
    key = (c.group, impl_name)
    if key not in _MS:
        _MS[key] = harness.baseline_ms(_impl(c, impl_name), c.M, c.K, c.N, harness.DTYPES[c.dtype], c.train)
    return _MS[key]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_dora(benchmark, request, case: Case):
    if "peft" in case.impl:
        harness.require("peft", "peft")
    if case.impl == "qdora-peft" and harness.bnb_unavailable():
        pytest.skip(harness.bnb_unavailable())
    if case.impl == "qdora-peft" and not case.train and not harness.CUDA:
        # bitsandbytes' CPU inference path repacks the 4-bit weight (packing_format_for_cpu, AVX512-BF16 CPUs) in
        # the base layer's forward, and PEFT's DoRA then dequantises the repacked bytes for its norm: outputs 8-17%
        # off (bitsandbytes 0.50.2, peft 0.21.2, 2026-12-01). Not a fastlora path; on CUDA nothing is repacked.
        pytest.skip("PEFT DoRA over a bitsandbytes 4-bit layer in CPU inference reads repacked bytes (CUDA only)")
    pb, m = _problem(case)
    impl = _impl(case, case.impl)
    dtype = harness.DTYPES[case.dtype]
    ring = harness.input_ring(case.M, case.K, case.N, dtype, case.train)
    errs = _check(case, pb, m, impl, *ring.items[0])
    timing, peak, extra = harness.time_layer(benchmark, impl, ring, case.train)
    _MS[(case.group, case.impl)] = timing.median_ms

    lora = case.impl != "linear"
    flop = harness.flops(case.M, case.K, case.N, case.R, case.train, lora=lora)
    nbytes = harness.bytes_moved(case.M, case.K, case.N, case.R, dtype.itemsize, case.train, lora=lora,
                                 w_bytes=pb.w_bytes if case.quant else None, adapter_elt=4 if case.quant else None)
    ratio = timing.median_ms / _ms(case, "linear")
    to_lora = timing.median_ms / _ms(case, case.kind["lora"]) if lora else None
    peft_ms = _MS.get((case.group, case.kind["peft"]))
    speedup = peft_ms / timing.median_ms if peft_ms else None
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=f"  {ratio:6.2f}x nn.Linear" + (f"  {to_lora:5.2f}x LoRA" if to_lora else "")
                   + (f"  {speedup:5.2f}x vs PEFT DoRA" if speedup else ""),
                   suite=case.kind["suite"], mode=case.mode, train=case.train, dropout=case.dropout, dtype=case.dtype,
                   K=case.K, N=case.N, R=case.R, M=case.M, impl=case.impl, ring=len(ring.items),
                   quant=competitors.QUANT if case.quant else None,
                   ratio_to_linear=ratio, ratio_to_fastlora_lora=to_lora, speedup_over_peft=speedup,
                   peak_mem_bytes=peak, extra_mem_bytes=extra, rel_err=errs, **impl.info)
