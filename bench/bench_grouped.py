"""Multi-adapter inference: one layer, a mixed batch of tokens with uniformly random adapter ids.

Competitors: fastlora grouped (the AdapterBatch built once per batch, as ``fastlora.use_adapters`` shares it
across a model's layers), PEFT's mixed batch (``adapter_names``, one name per token), a loop over adapters,
and single-adapter fastlora on the same tokens (the floor for the grouped kernel), plus nn.Linear.

Mixed ranks (``test_grouped_mixed_ranks``, issue 24): 32 adapters, 28 at r 8, 3 at r 64, 1 at r 256, random ids,
decode (32 tokens) and 4096 tokens: fastlora's ragged stack (``rank_offsets``, each adapter at its own rank)
against today's stack padded to r 256, PEFT's mixed batch, and nn.Linear; each records its adapter bytes and the
low-rank overhead (its time minus nn.Linear's). The smoke grid runs a small mix through the interpreter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import competitors
import harness
import pytest
import torch

from fastlora import reference


@dataclass(frozen=True)
class Case(harness.Cell):
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


def _cases():
    g = harness.grid()
    K, N = g.grouped_shape
    return [Case(dtype, K, N, g.grouped_rank, G, M, impl)
            for dtype in g.dtypes for M in g.grouped_tokens for G in g.adapters for impl in competitors.GROUPED]


CASES = _cases()
_MS: dict = {}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_grouped(benchmark, request, case: Case):
    if case.impl == "peft-mixed":
        harness.require("peft", "peft")
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

    timing, peak, extra = _timed_forward(benchmark, case, impl, ring)

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


def _timed_forward(benchmark, case, impl, ring):
    """(timing, peak bytes, peak above the inputs) of ``impl``'s no-grad forward over ``ring``; the median is kept in
    _MS for the later competitors' ratios and pytest-benchmark's own rounds run."""
    def step():
        with torch.no_grad():
            impl.forward(ring.next())

    timing = harness.measure(step)
    _MS[(case.group, case.impl)] = timing.median_ms
    peak, extra = harness.peak_memory(step)
    harness.pedantic(benchmark, step)
    return timing, peak, extra


# 28 x r 8, 3 x r 64, 1 x r 256: one large adapter among many small ones, what a padded stack handles worst
MIX = (8,) * 28 + (64,) * 3 + (256,)
MIX_TOKENS = (32, 4096)
SMOKE_MIX, SMOKE_MIX_TOKENS = (8, 2, 16, 4), (32,)


@dataclass(frozen=True)
class MixedCase(harness.Cell):
    dtype: str
    K: int
    N: int
    ranks: tuple
    M: int
    impl: str

    @property
    def group(self) -> str:
        mix = "+".join(f"{len(list(g))}x{r}" for r, g in itertools.groupby(self.ranks))
        return f"mixed-{self.dtype}-K{self.K}-N{self.N}-{mix}-M{self.M}"


def _mixed_cases():
    g = harness.grid()
    K, N = g.grouped_shape
    mix, tokens = (SMOKE_MIX, SMOKE_MIX_TOKENS) if g.name == "smoke" else (MIX, MIX_TOKENS)
    return [MixedCase(dtype, K, N, mix, M, impl) for dtype in g.dtypes for M in tokens for impl in competitors.MIXED]


MIXED_CASES = _mixed_cases()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in MIXED_CASES])
def test_grouped_mixed_ranks(benchmark, request, case: MixedCase):
    if case.impl == "peft-mixed":
        harness.require("peft", "peft")
    dtype, dev = harness.DTYPES[case.dtype], harness.device()
    mp = competitors.MixedProblem(case.K, case.N, case.ranks, dtype, dev)
    gen = torch.Generator(device="cpu").manual_seed(case.M * 1000 + len(case.ranks))
    ids = torch.randint(0, len(case.ranks), (case.M,), generator=gen).to(dev)
    impl = competitors.mixed_impl(case.impl, mp, ids)
    ring = harness.Ring(lambda: torch.randn(case.M, case.K, dtype=dtype, device=dev),
                        mp.W.element_size() * case.M * case.K)

    x = ring.items[0]
    with torch.no_grad():
        y = impl.forward(x)
        xf = x.float()
        if case.impl == "linear":
            ref = torch.nn.functional.linear(xf, mp.W.float(), mp.b.float())
        else:
            ref = reference.grouped_lora_linear(xf, mp.W.float(), mp.b.float(), mp.A_ragged.float(),
                                                mp.B_ragged.float(), mp.scaling, ids, rank_offsets=mp.offsets)
    err = harness.check_close(case.id, y, ref, dtype)

    timing, peak, extra = _timed_forward(benchmark, case, impl, ring)

    lora = case.impl != "linear"
    token_rank = sum(case.ranks[i] for i in ids.tolist())  # sum over tokens of their adapter's rank
    flop = 2 * case.M * case.K * case.N + (2 * token_rank * (case.K + case.N) if lora else 0)
    nbytes = harness.bytes_moved(case.M, case.K, case.N, 0, mp.W.element_size(), False, lora=False)
    if lora:  # every adapter a token uses is read once, at its own rank
        used = torch.unique(ids).tolist()
        nbytes += mp.W.element_size() * sum(case.ranks[i] for i in used) * (case.K + case.N)
    linear_ms = _MS.get((case.group, "linear"))
    padded_ms = _MS.get((case.group, "fastlora-padded"))
    overhead = timing.median_ms - linear_ms if linear_ms and lora else None
    padded_overhead = padded_ms - linear_ms if padded_ms and linear_ms else None
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=(f"  {timing.median_ms / linear_ms:6.2f}x nn.Linear" if linear_ms else "")
                   + (f"  overhead {overhead:.4f} ms" if overhead is not None else ""),
                   suite="grouped-mixed", mode="fwd", train=False, dtype=case.dtype, K=case.K, N=case.N,
                   ranks=list(case.ranks), G=len(case.ranks), M=case.M, impl=case.impl, ring=len(ring.items),
                   ratio_to_linear=timing.median_ms / linear_ms if linear_ms else None, lowrank_overhead_ms=overhead,
                   padded_overhead_ms=padded_overhead, peak_mem_bytes=peak, extra_mem_bytes=extra,
                   rel_err={"y": err}, **impl.info)
