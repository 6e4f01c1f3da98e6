"""LoRA over a block-scaled FP8 base, one layer (issue 45): every competitor of ``competitors.FP8`` over dtype (the
activations') x (K, N) x r x tokens M x mode.

The base is quantised once to float8_e4m3fn with one fp32 scale per 128 x 128 block (DeepSeek-V3's format,
``fastlora.quant.quantize_fp8_blockwise``); the adapters are fp32, as PEFT keeps them. Modes: ``fwd`` (inference, no
grad) and ``train`` (forward + backward, base frozen, dropout 0; dx, dA, dB, nn.Linear dx only). Each case checks
its output (and gradients) against a float32 run of fastlora.reference on the float32 dequantised W once, then
times it. Recorded per cell: the ratio to nn.Linear on the dequantised W, to fastlora LoRA over the dequantised W
(issue 45's target: W8A16 training <= 1.10x), the speedup over the unfused ``fp8-dequant``, the base weight each
keeps resident (``weight_bytes``) and peak memory above the inputs (CUDA only).
"""

from __future__ import annotations

from dataclasses import dataclass

import competitors
import harness
import pytest
import torch
import torch.nn.functional as F

from fastlora import reference

MODES = ("fwd", "train")


@dataclass(frozen=True)
class Case(harness.LayerCase):
    """A single-layer cell (modes fwd / train, no dropout), its group marked as FP8."""

    @property
    def group(self) -> str:
        return f"fp8-{super().group}"


def _cases():
    g = harness.grid()
    shapes, tokens = g.fp8.get("shapes", g.shapes), g.fp8.get("tokens", g.tokens)
    return [Case(mode, dtype, K, N, R, M, impl) for dtype in g.dtypes for mode in MODES for K, N in shapes
            for R in g.fp8["ranks"] for M in tokens for impl in competitors.FP8]


CASES = _cases()
_MS: dict = {}  # (group, impl) -> median ms, for the ratios of later competitors
_MEM: dict = {}  # (group, impl) -> peak bytes above the inputs
_PROBLEM: dict = {}


def _problem(c: Case) -> competitors.FP8Problem:
    key = (c.dtype, c.K, c.N, c.R)
    if key not in _PROBLEM:
        _PROBLEM.clear()
        _PROBLEM[key] = competitors.FP8Problem(
            competitors.Problem(c.K, c.N, c.R, harness.DTYPES[c.dtype], harness.device()))
    return _PROBLEM[key]


def _check(c: Case, fp: competitors.FP8Problem, impl: competitors.Impl, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Compare output and gradients with float32 on the float32 dequantised W (fastlora.quant)."""
    y = impl.forward(x)
    xr = x.detach().float().requires_grad_(c.train)
    Ar = fp.A.clone().requires_grad_(c.train)
    Br = fp.B.clone().requires_grad_(c.train)
    b32 = fp.pb.b.float()
    if c.impl == "linear":
        ref = F.linear(xr, fp.W32, b32)
    elif c.impl == "fp8-w8a8":  # the kernel's per-token, per-128-channel e4m3 quantisation of x, emulated in fp32
        ref = reference.lora_linear_fp8(xr, fp.weight, fp.scale, b32, Ar, Br, fp.pb.scaling, block_size=fp.block,
                                        fp8_activations=True)
    else:
        ref = reference.lora_linear(xr, fp.W32, b32, Ar, Br, fp.pb.scaling)
    return harness.check_layer(c.id, y, ref, fp.pb.dtype, c.train, [x, *impl.params], [xr, Ar, Br], dy)


def w8a8_unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the W8A8 cell cannot run here (fp32 activations; a GPU without fp8 MMAs), or None."""
    if dtype == torch.float32:
        return "W8A8 (fp8_activations) takes 16-bit activations"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "W8A8 needs fp8 MMAs (compute capability 8.9 or later)"
    return None


def _ms(c: Case, impl_name: str) -> float:
    """This case's group's time for ``impl_name`` (measured now if its own case did not run)."""
    key = (c.group, impl_name)
    if key not in _MS:
        impl = competitors.fp8_impl(impl_name, _problem(c), c.train)
        _MS[key] = harness.baseline_ms(impl, c.M, c.K, c.N, harness.DTYPES[c.dtype], c.train)
    return _MS[key]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_fp8(benchmark, request, case: Case):
    if case.impl == "fp8-w8a8":
        why = w8a8_unavailable(harness.DTYPES[case.dtype], harness.device())
        if why:
            pytest.skip(f"not applicable: {why}")
    fp = _problem(case)
    impl = competitors.fp8_impl(case.impl, fp, case.train)
    dtype = fp.pb.dtype
    ring = harness.input_ring(case.M, case.K, case.N, dtype, case.train)
    errs = _check(case, fp, impl, *ring.items[0])
    timing, peak, extra = harness.time_layer(benchmark, impl, ring, case.train)
    _MS[(case.group, case.impl)] = timing.median_ms
    _MEM[(case.group, case.impl)] = extra

    lora = case.impl != "linear"
    fp8 = case.impl.startswith("fp8")
    flop = harness.flops(case.M, case.K, case.N, case.R, case.train, lora=lora)
    nbytes = harness.bytes_moved(case.M, case.K, case.N, case.R, dtype.itemsize, case.train, lora=lora,
                                 w_bytes=fp.w_bytes if fp8 else None, adapter_elt=4)
    ratio = timing.median_ms / _ms(case, "linear")
    to_lora = timing.median_ms / _ms(case, "fastlora-lora") if lora else None
    unfused_ms, unfused_mem = _MS.get((case.group, "fp8-dequant")), _MEM.get((case.group, "fp8-dequant"))
    speedup = unfused_ms / timing.median_ms if unfused_ms and case.impl != "fp8-dequant" else None
    mem_ratio = extra / unfused_mem if extra is not None and unfused_mem and case.impl != "fp8-dequant" else None
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=f"  {ratio:6.2f}x nn.Linear" + (f"  {to_lora:5.2f}x LoRA" if to_lora else "")
                   + (f"  {speedup:5.2f}x vs unfused" if speedup else ""),
                   suite="fp8", mode=case.mode, train=case.train, dropout=0.0, dtype=case.dtype, K=case.K,
                   N=case.N, R=case.R, M=case.M, impl=case.impl, ring=len(ring.items),
                   quant=dict(format="float8_e4m3fn", block_size=list(fp.block), scale_dtype="float32"),
                   ratio_to_linear=ratio, ratio_to_fastlora_lora=to_lora, speedup_over_unfused=speedup,
                   peak_mem_bytes=peak, extra_mem_bytes=extra, extra_mem_over_unfused=mem_ratio, rel_err=errs,
                   **impl.info)
