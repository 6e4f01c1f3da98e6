"""LoRA on MoE experts (issue 43, item 4): a transformers-5 experts block (hidden_states, top_k_index, top_k_weights ->
out) with one rank-r adapter per expert on gate_up_proj and down_proj, every competitor of ``competitors.MOE`` over
dtype x shape (``harness.MOE_SHAPES``) x r x tokens T x mode.

Shapes: PEFT #3577's (Qwen3-30B-A3B's experts: 128 experts, hidden 2048, intermediate 768, top-8; stored (E, out, in),
no bias, SiLU gate) and a gpt-oss-20b-like one (32 experts, hidden 2880, intermediate 2880, top-4; stored (E, in, out),
biases, gpt-oss's clamped SwiGLU), 4096 tokens, r = 16, alpha = 32. Routing: k distinct uniformly random experts per
token, softmax weights over them (a new routing per ring entry). Modes: ``fwd`` (no grad) and ``train`` (forward +
backward: d hidden_states, d top_k_weights (a trained router needs it) and each adapter's dA, dB; expert weights
frozen). Each cell checks its output and gradients once against a float32 reference (``MoeProblem.reference``:
``fastlora.reference``'s loop over experts) before timing. Recorded per cell: peak memory of one step
(``harness.step_memory``: CUDA's allocator on a GPU; on the CPU the bytes of the live tensors torch ops create), the
ratio to the base experts alone (issue 43's target: fwd+bwd <= 1.15x), the speedup over PEFT ``target_parameters``
(>= 2x) and the ratio to the split composition (<= 1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import competitors
import harness
import pytest
import torch

MODES = ("fwd", "train")
GRADS = ("dx", "dtopk_weights", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down")


@dataclass(frozen=True)
class Case(harness.Cell):
    """One experts-block cell: mode (``fwd``, ``train``), dtype, shape (a ``harness.MOE_SHAPES`` name), rank, tokens T
    (each routed to k experts: T * k rows per projection), competitor."""

    mode: str
    dtype: str
    shape: str
    R: int
    T: int
    impl: str

    @property
    def train(self) -> bool:
        return self.mode == "train"

    @property
    def dims(self) -> harness.MoeShape:
        return harness.MOE_SHAPES[self.shape]

    @property
    def group(self) -> str:
        s = self.dims
        return f"moe-{self.mode}-{self.dtype}-{s.name}-E{s.E}-H{s.H}-I{s.inter}-k{s.k}-r{self.R}-T{self.T}"


def _cases():
    g = harness.grid()
    m = g.moe
    return [Case(mode, dtype, shape, R, T, impl) for dtype in g.dtypes for mode in m.get("modes", MODES)
            for shape in m["shapes"] for R in m["ranks"] for T in m["tokens"]
            for impl in m.get("impls", competitors.MOE)]


CASES = _cases()
_MS: dict = {}  # (group, impl) -> median ms, for the ratios of later competitors
_MEM: dict = {}  # (group, impl) -> peak bytes of one step above what was allocated before it
_PROBLEM: dict = {}


def _problem(c: Case) -> competitors.MoeProblem:
    key = (c.dtype, c.shape, c.R)
    if key not in _PROBLEM:
        _PROBLEM.clear()
        _PROBLEM[key] = competitors.MoeProblem(c.dims, c.R, harness.DTYPES[c.dtype], harness.device())
    return _PROBLEM[key]


def _ring(c: Case, mp: competitors.MoeProblem) -> harness.Ring:
    """Entries (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], dy [T, H] or None), each with its own
    routing; hidden_states and top_k_weights require grad when training."""
    H, k, dev, dtype = c.dims.H, c.dims.k, mp.device, mp.dtype
    seeds = itertools.count(1)

    def make():
        index, weights = mp.routing(c.T, next(seeds))
        x = torch.randn(c.T, H, dtype=dtype, device=dev).requires_grad_(c.train)
        dy = torch.randn(c.T, H, dtype=dtype, device=dev) if c.train else None
        return x, index, weights.requires_grad_(c.train), dy

    elt = torch.finfo(dtype).bits // 8
    return harness.Ring(make, elt * c.T * H * (2 if c.train else 1) + c.T * k * (8 + elt))


def _step(impl: competitors.Impl, train: bool):
    """The timed callable on one ring entry: the block under no_grad, or the block and ``torch.autograd.grad`` for
    hidden_states, top_k_weights and the adapters."""
    if not train:
        def fwd(entry):
            with torch.no_grad():
                return impl.forward(*entry[:3])
        return fwd

    def fwd_bwd(entry):
        x, index, weights, dy = entry
        return torch.autograd.grad(impl.forward(x, index, weights), [x, weights, *impl.params], dy)
    return fwd_bwd


def _check(c: Case, mp: competitors.MoeProblem, impl: competitors.Impl, entry) -> dict:
    """Relative errors (``harness.check_close``: raises past the dtype's bound) of the output and, training, of the
    gradients against the float32 reference on the same weights, routing and adapters."""
    x, index, weights, dy = entry
    y = impl.forward(x, index, weights)
    xr = x.detach().float().requires_grad_(c.train)
    wr = weights.detach().float().requires_grad_(c.train)
    lora = c.impl != "experts"
    adapters = [t.float().requires_grad_(c.train) for p in competitors.PROJECTIONS for t in mp.adapters[p]] \
        if lora else None
    ref = mp.reference(xr, index, wr, adapters)
    errs = {"y": harness.check_close(f"{c.id} y", y, ref, mp.dtype)}
    if c.train:
        got = torch.autograd.grad(y, [x, weights, *impl.params], dy)
        want = torch.autograd.grad(ref, [xr, wr, *(adapters or [])], dy.float())
        for name, g, w in zip(GRADS[:len(got)], got, want, strict=True):
            errs[name] = harness.check_close(f"{c.id} {name}", g, w, mp.dtype)
    return errs


def _ms(c: Case, impl_name: str) -> float:
    """This case's group's time for ``impl_name`` (measured now if its own case did not run)."""
    key = (c.group, impl_name)
    if key not in _MS:
        mp = _problem(c)
        step = _step(competitors.moe_impl(impl_name, mp, c.train), c.train)
        ring = _ring(c, mp)
        _MS[key] = harness.measure(lambda: step(ring.next())).median_ms
    return _MS[key]


def model(c: Case, elt: int) -> tuple[int, int]:
    """(FLOPs, compulsory bytes) of the block: ``harness.flops`` / ``harness.bytes_moved`` per projection over its
    T * k rows, every expert's W and adapter read once (the routing, activation and top-k sum not counted)."""
    s, S = c.dims, c.T * c.dims.k
    lora = c.impl != "experts"
    flop = nbytes = 0
    for K, N in ((s.H, 2 * s.inter), (s.inter, s.H)):
        flop += harness.flops(S, K, N, c.R, c.train, lora=lora)
        nbytes += harness.bytes_moved(S, K, N, c.R * s.E, elt, c.train, lora=lora, w_bytes=elt * s.E * N * K)
    return flop, nbytes


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_moe(benchmark, request, case: Case):
    harness.require("transformers", "peft")
    if case.impl.startswith("peft"):
        harness.require("peft", "peft")
    if case.impl == "peft-baddbmm":
        pytest.skip(competitors.peft_baddbmm_skip())
    mp = _problem(case)
    impl = competitors.moe_impl(case.impl, mp, case.train)
    ring = _ring(case, mp)
    errs = _check(case, mp, impl, ring.items[0])
    step = _step(impl, case.train)
    timing = harness.measure(lambda: step(ring.next()))
    peak, extra, mem_how = harness.step_memory(lambda: step(ring.items[0]))
    harness.pedantic(benchmark, lambda: step(ring.next()))
    _MS[(case.group, case.impl)] = timing.median_ms
    _MEM[(case.group, case.impl)] = extra

    flop, nbytes = model(case, mp.dtype.itemsize)
    ratio = timing.median_ms / _ms(case, "experts")
    peft_ms, peft_mem = _MS.get((case.group, "peft")), _MEM.get((case.group, "peft"))
    split_ms = _MS.get((case.group, "split"))
    speedup = peft_ms / timing.median_ms if peft_ms and case.impl != "peft" else None
    to_split = timing.median_ms / split_ms if split_ms and case.impl != "split" else None
    base_mem = _MEM.get((case.group, "experts"))
    s = case.dims
    benchmark.group = case.group
    harness.record(benchmark, request, timing=timing, flop=flop, nbytes=nbytes,
                   summary_extra=f"  {ratio:6.2f}x experts" + (f"  {speedup:5.2f}x vs PEFT" if speedup else "")
                   + (f"  {to_split:5.2f}x split" if to_split else "")
                   + (f"  {extra / 2**20:8.1f} MiB" if extra is not None else ""),
                   suite="moe", mode=case.mode, train=case.train, dtype=case.dtype, shape=s.name, layout=s.layout,
                   E=s.E, H=s.H, I=s.inter, top_k=s.k, R=case.R, T=case.T, M=case.T * s.k, impl=case.impl,
                   ring=len(ring.items), ratio_to_experts=ratio, speedup_over_peft=speedup, ratio_to_split=to_split,
                   peak_mem_bytes=peak, extra_mem_bytes=extra, memory_method=mem_how,
                   extra_mem_over_experts=extra - base_mem if extra is not None and base_mem is not None else None,
                   extra_mem_over_peft=extra / peft_mem if extra is not None and peft_mem and case.impl != "peft"
                   else None, rel_err=errs, **impl.info)
