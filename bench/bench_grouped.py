"""Multi-adapter inference: one layer, a mixed batch of tokens with uniformly random adapter ids.

Competitors: fastlora grouped (the AdapterBatch built once per batch, as ``fastlora.use_adapters`` shares it
across a model's layers), PEFT's mixed batch (``adapter_names``, one name per token), a loop over adapters,
and single-adapter fastlora on the same tokens (the floor for the grouped kernel), plus nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import competitors
import harness
import pytest
import torch

from fastlora import reference


@dataclass(frozen=True)
class Case:
    dtype: str
    K: int
    N: int
    R: int
    G: int
    M: int
    impl: str

    @property
    def group(self) -> str:
        return f"grouped-{self.dtype}-K{self.K}-N{self.N}-r{self.R}-G{self.G}-M{self.M}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.impl}"


def _cases():
    g = harness.grid()
    K, N = g.grouped_shape
    return [Case(dtype, K, N, g.grouped_rank, G, M, impl)
            for dtype in g.dtypes for M in g.grouped_tokens for G in g.adapters for impl in competitors.GROUPED]


CASES = _cases()
_MS: dict = {}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_grouped(benchmark, request, case: Case):
    if case.impl == "peft-mixed" and not harness.have_peft():
        pytest.skip("peft is not installed")
    dtype, dev = harness.DTYPES[case.dtype], harness.device()
    pb = competitors.Problem(case.K, case.N, case.R, dtype, dev, num_adapters=case.G)
    gen = torch.Generator(device="cpu").manual_seed(case.M * 1000 + case.G)
    ids = torch.randint(0, case.G, (case.M,), generator=gen).to(dev)
    impl = competitors.grouped_impl(case.impl, pb, ids)
    ring = harness.Ring(lambda: torch.randn(case.M, case.K, dtype=dtype, device=dev),
                        pb.W.element_size() * case.M * case.K)

    x = ring.items[0]
    with torch.no_grad():
        y = impl.forward(x)
        xf = x.float()
        if case.impl == "linear":
            ref = torch.nn.functional.linear(xf, pb.W.float(), pb.b.float())
        elif case.impl == "fastlora-single":
            ref = reference.lora_linear(xf, pb.W.float(), pb.b.float(), pb.A[0].float(), pb.B[0].float(), pb.scaling)
        else:
            ref = reference.grouped_lora_linear(xf, pb.W.float(), pb.b.float(), pb.A.float(), pb.B.float(),
                                                pb.scaling, ids)
    err = harness.check_close(case.id, y, ref, dtype)

    def step():
        with torch.no_grad():
            impl.forward(ring.next())

    timing = harness.measure(step)
    _MS[(case.group, case.impl)] = timing.median_ms
    peak, extra = harness.peak_memory(step)
    harness.pedantic(benchmark, step)

    lora = case.impl != "linear"
    flop = harness.flops(case.M, case.K, case.N, case.R, False, lora=lora)
    nbytes = harness.bytes_moved(case.M, case.K, case.N, case.R, pb.W.element_size(), False, lora=lora)
    if lora and case.impl != "fastlora-single":  # every adapter a token uses is read once
        used = int(torch.unique(ids).numel())
        nbytes += pb.W.element_size() * (used - 1) * case.R * (case.K + case.N)
    linear_ms = _MS.get((case.group, "linear"))
    peft_ms = _MS.get((case.group, "peft-mixed"))
    ratio = timing.median_ms / linear_ms if linear_ms else None
    speedup = peft_ms / timing.median_ms if peft_ms else None
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=(f"  {ratio:6.2f}x nn.Linear" if ratio else "")
                   + (f"  {speedup:6.2f}x vs PEFT" if speedup else ""),
                   suite="grouped", mode="fwd", train=False, dtype=case.dtype, K=case.K, N=case.N, R=case.R,
                   G=case.G, M=case.M, impl=case.impl, ring=len(ring.items), ratio_to_linear=ratio,
                   speedup_over_peft=speedup, peak_mem_bytes=peak, extra_mem_bytes=extra, rel_err={"y": err})
