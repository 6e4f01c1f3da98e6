"""Static compile report: every Triton kernel fastlora launches, compiled for an H100 (sm_90) or A100 (sm_80).

No GPU needed. Inside ``compile_only()`` Triton's active driver is swapped for a fake one that reports the
target GPU, every launch compiles through Triton's own JIT specialisation instead of running (unit strides
become constants, 16-byte alignment is detected, as on a real launch), and an autotuned kernel compiles every
config its pruning keeps, after the config's ``pre_hook`` (which may set TMA descriptor block shapes). The
public API (``fastlora.lora_linear`` / ``grouped_lora_linear``, forward and backward, training and inference)
is driven with CPU tensors of the real shapes; nothing runs, the outputs are garbage. Each distinct compiled
kernel is reported with registers per thread and local-memory stack (> 0: spills) from ``cuobjdump``, shared
memory per block, and counts in its PTX of wgmma (Hopper MMA), mma.sync (pre-Hopper MMA), cp.async (pipelined
loads) and cp.async.bulk.tensor (TMA).

    python bench/sm90.py                         # full grid for sm_90, table on stdout
    python bench/sm90.py --tier ci --check       # CI subset; exit 1 if a check fails
    python bench/sm90.py --capability 80 --json sm80.json

Checks (``check``): no compile error, no spill, shared memory within the target's per-block limit; on sm_90
also wgmma in every GEMM-family variant with BLOCK_M >= 64 (e4m3 wgmma in the W8A8 forward's) and pipelined loads
(cp.async or TMA) in every
variant. fp32 runs both ways the launchers choose: 'tf32' (``torch.backends.cuda.matmul.allow_tf32`` set, tensor
cores, checked like bf16) and 'ieee' (the default, FMA units: no wgmma expected there). Each record with a stack
also counts the LDL/STL instructions inside its K loops (``loop_spills``, from the SASS), which tells a few
loop-invariant values parked outside the loop (ptxas's own occupancy target does that) from spills paid every K
step; either fails the check. Run it without ``TRITON_INTERPRET`` (interpreted kernels cannot compile) and
without ``FASTLORA_POISON``. Needs the triton wheel (it ships ptxas and cuobjdump); tested with triton 3.6.0 and 3.7.1,
whose internals it patches (the active driver, ``JITFunction.run``, ``Autotuner.run``) and restores on exit.

Grids (``cases``). full (default): the default bench grid's (K, N) shapes and token counts, bf16/fp16/fp32/tf32, r in
the bench ranks plus {16, 64, 256}: inference, and training with dropout 0 and 0.1, with bias; training without bias at
r = 16 once per dtype; grouped, 32 adapters at r = 16 on the grouped bench shape and token counts, with and without
bias; a bitsandbytes nf4 base (double quant) at r = 16 in each dtype, on the bench shapes and token counts, the 4-bit
product in that dtype (fp32: bitsandbytes' compute dtype float32, the transformers default), inference and training; a
block-scaled FP8 base (``fp8_calls``). Only M's specialisation (1 or not), N, K alignment and the constexprs change what
compiles; Triton's cache makes the repeats cheap; 15 (sm_80) to 18 (sm_90) minutes on 2 cores, empty cache, measured
before tf32 joined the grid.
ci (~3 minutes on 2 cores, empty cache): M = 4096 and M = 16 (small-M configs), K = N = 4096. Every flag combination of
the forward and backward kernels (dense/grouped x dropout 0/0.1 x bias on/off, inference and training) for bf16 at r =
16, dense and grouped; then training with bias and dropout 0.1 for bf16 at r = 256, fp16 at r = 64 and fp32 at r = 256
(ieee and tf32); fp16 grouped inference at r = 16 (its own tile issues); an nf4 base at r = 16, bf16 (every flag) and
fp32 (ieee and tf32: training with dropout 0.1); an FP8 base (``fp8_calls``: bf16 W8A16 and W8A8 at r = 16 and 64,
inference and training with dropout 0 and 0.1; alone, with M = 1 too, as ``--tier fp8``); DoRA (``dora_calls``: every
flag at bf16 r = 16, training with dropout at fp16 r = 64, training at fp32 r = 256, ieee and tf32), also alone as
``--tier dora`` (with M = 1 too, as in the full tier, and the same calls over an nf4 double-quant base: QDoRA, which the
ci tier leaves out); ragged stacks (``ragged_calls``: every flag at bf16 over the mix 28 x r 8, 3 x r 64, 1 x r 256,
whose offsets are multiples of 8, and training with dropout over the unaligned mix r 2, 8, 16, 4); ``--tier ragged``
runs the ragged calls alone, with fp16 and fp32 (ieee, tf32) and M = 1 too. ``--tier gdora`` (``gdora_calls``, M = 4096,
16, 1): grouped DoRA, 32 adapters with every other one plain (NaN magnitude rows), padded r = 16 and the ragged bench
mix at bf16 every flag, training with dropout at fp16 (padded r = 64) and fp32 ieee and tf32 (padded r = 16 with and
without dropout, ragged mix). ``--tier moe`` (``moe_calls``): mixture-of-experts calls (a 3-D weight) at bf16, r = 16,
on bench_moe's two shapes (gate_up and down; gpt-oss's (E, in, out) storage and biases), inference and training, at
M = 4096 tokens x top-k and M = 16; the ci tier takes them too (the large M with its M = 4096 calls), as does full.
The flags left out there repeat combinations already compiled; every flag at every dtype x rank takes ~7 minutes.
M = 1, its own specialisation of every kernel (about 40% of the full tier's variants), is left to the full tier.
Every autotune config the pruning keeps compiles, so the largest and smallest tiles are always in. Cases run in
``--jobs`` worker processes (default one per CPU), one task per (dtype, tf32, dense/grouped, r); the workers share
Triton's disk cache.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import harness  # bench/ is on sys.path when this runs as a script (tests/test_sm90.py puts it there to import)
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import autotuner as _autotuner
from triton.runtime import driver as _driver
from triton.runtime import jit as _jit

import fastlora
from fastlora import _configs, _launch, dispatch, functional, quant

# Device properties Triton and the launchers query, per compute capability.
DEVICES = {
    90: {"name": "H100", "max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
         "warpSize": 32},
    80: {"name": "A100", "max_shared_mem": 166912, "multiprocessor_count": 108, "max_num_regs": 65536,
         "warpSize": 32},
}
# Kernels whose BLOCK_M tile feeds tl.dot: on sm_90 a BLOCK_M >= 64 variant must use wgmma.
MMA_KERNELS = ("_lora_gemm_kernel", "_lora_grad_kernel")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_PTX_COUNTS = {
    "wgmma": r"wgmma\.mma_async",
    "mma_sync": r"mma\.sync",
    "cp_async": r"cp\.async\.(?:ca|cg)",
    "tma": r"cp\.async\.bulk\.tensor",
    "wgmma_e4m3": r"wgmma\.mma_async\S*\.e4m3\.e4m3",  # fp8 (W8A8) wgmma, also in "wgmma"
}


@dataclass
class Variant:
    """One distinct compiled kernel (or a failed compile) and the public call that first produced it."""

    kernel: str
    capability: int
    constexprs: dict
    case: str
    num_warps: int | None = None
    num_stages: int | None = None
    maxnreg: int | None = None
    ptx_options: str | None = None  # extra ptxas options the launch asked for (the FMA path's --minnctapersm=1)
    regs: int | None = None
    spill_bytes: int | None = None
    loop_spills: int | None = None
    shared: int | None = None
    wgmma: int | None = None
    mma_sync: int | None = None
    cp_async: int | None = None
    tma: int | None = None
    wgmma_e4m3: int | None = None
    error: str | None = None
    hash: str = field(default="", repr=False)  # Triton's hash of the compiled kernel; not in the JSON record

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "hash"}


class _CompileOnlyDriver:
    """Just enough of a CUDA driver for Triton to specialise and compile for ``target``, never to launch."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)
        props = {k: v for k, v in DEVICES[capability].items() if k != "name"}
        self.utils = type("Utils", (), {"get_device_properties": staticmethod(lambda device: dict(props))})()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _clear_launch_caches():
    for obj in (*vars(_launch).values(), *vars(_configs).values()):
        if isinstance(getattr(obj, "cache_clear", None), type(functools.cache(len).cache_clear)):
            obj.cache_clear()


@contextlib.contextmanager
def compile_only(capability: int):
    """Inside, fastlora's calls on CPU tensors compile their kernels for cuda:<capability> instead of running.

    Yields a recorder whose ``variants`` fill in as kernels compile; set ``recorder.case`` to tag them.
    One capability per process: Triton binds a kernel's target the first time it is specialised.
    """
    if _launch.INTERPRET:
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset: interpreted kernels cannot compile")
    rec = _Recorder(capability)
    saved = (_jit.JITFunction.run, _autotuner.Autotuner.run, getattr(_driver, "_active", None),
             functional._use_kernels, _configs.target_capability, _launch.input_precision, dispatch.get_policy())
    jit_run, capability_pair = saved[0], (capability // 10, capability % 10)

    def run(self, *args, grid=None, warmup=False, **kwargs):
        try:
            kernel = jit_run(self, *args, grid=None, warmup=True, **kwargs)
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
        except Exception as exc:  # one bad variant should not hide the others
            rec.add_error(self, args, kwargs, exc)
            return None
        rec.add(self, args, kwargs, kernel)
        return kernel

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        try:
            for config in self.prune_configs(kwargs):
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    _driver.set_active(_CompileOnlyDriver(capability))
    _clear_launch_caches()
    _jit.JITFunction.run = run
    _autotuner.Autotuner.run = autotune_run
    functional._use_kernels = lambda *a, **k: True
    _configs.target_capability = lambda device: capability_pair
    _launch.input_precision = _cuda_input_precision
    dispatch.set_policy("fused")
    try:
        yield rec
    finally:
        (_jit.JITFunction.run, _autotuner.Autotuner.run, _driver._active, functional._use_kernels,
         _configs.target_capability, _launch.input_precision) = saved[:6]
        dispatch.set_policy(saved[6])
        _clear_launch_caches()


def _cuda_input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``_launch.input_precision`` as on a CUDA device, for the CPU tensors that stand in for one."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


class _Recorder:
    def __init__(self, capability: int):
        self.capability = capability
        self.case = ""
        self.variants: dict[object, Variant] = {}

    def _variant(self, fn, args, kwargs) -> Variant:
        bound = fn.signature.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in fn.signature.parameters})
        constexprs = {p.name: _plain(bound.arguments[p.name]) for p in fn.params
                      if p.is_constexpr and p.name in bound.arguments}
        return Variant(fn.__name__, self.capability, constexprs, self.case)

    def add(self, fn, args, kwargs, compiled):
        if compiled.hash not in self.variants:
            v = self._variant(fn, args, kwargs)
            v.hash = compiled.hash
            for key, value in stats(compiled).items():
                setattr(v, key, value)
            self.variants[compiled.hash] = v

    def add_error(self, fn, args, kwargs, exc):
        v = self._variant(fn, args, kwargs)
        lines = str(exc).strip().splitlines()
        v.error = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
        self.variants.setdefault((v.kernel, repr(v.constexprs), v.error), v)


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def stats(compiled) -> dict:
    """num_warps/num_stages, registers, spill stack, shared memory and PTX instruction counts of a kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
        sass = None
        if stack and int(stack.group(1)):
            sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-sass", f.name],
                                  capture_output=True, text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    return {
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "maxnreg": compiled.metadata.maxnreg,
        "ptx_options": compiled.metadata.ptx_options,
        "regs": int(regs.group(1)) if regs else None,
        "spill_bytes": int(stack.group(1)) if stack else None,
        "loop_spills": loop_spills(sass) if sass else 0,
        "shared": compiled.metadata.shared,
        **{name: len(re.findall(pattern, ptx)) for name, pattern in _PTX_COUNTS.items()},
    }


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_MULTIPLY_ADDS = re.compile(r"\b(?:HGMMA|QGMMA|HMMA|IMMA|FFMA)\b")  # QGMMA: fp8 wgmma
_LOCAL_MEMORY = re.compile(r"\b(?:LDL|STL)\b")
_BACK_EDGE = re.compile(r"\bBRA\s+0x([0-9a-f]+)")


def loop_spills(sass: str) -> int:
    """Local-memory loads and stores (LDL/STL) inside the kernel's K loops: the innermost loops (a backward branch
    and its target) that hold multiply-adds. A stack whose spills all sit outside them (values saved before the
    main loop, reloaded in the epilogue) costs a few instructions per tile; one inside costs them every K step."""
    code = [(int(addr, 16), text) for addr, text in _SASS.findall(sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in code
             if (m := _BACK_EDGE.search(text)) and int(m.group(1), 16) < addr]

    def has_mma(lo, hi):
        return any(lo <= a <= hi and _MULTIPLY_ADDS.search(t) for a, t in code)

    hot = [(lo, hi) for lo, hi in loops if has_mma(lo, hi)]
    inner = [(lo, hi) for lo, hi in hot if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in hot)]
    return sum(1 for a, t in code if _LOCAL_MEMORY.search(t) and any(lo <= a <= hi for lo, hi in inner))


# ------------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One public call: forward (+ backward when ``train``) of a dense or grouped (``G`` > 1) LoRA layer; ``tf32``:
    fp32 with ``torch.backends.cuda.matmul.allow_tf32`` set."""

    dtype: str
    M: int
    K: int
    N: int
    r: int
    p: float = 0.0
    bias: bool = True
    train: bool = True
    G: int = 1
    tf32: bool = False
    quant: str = ""  # "nf4": a 4-bit base (fastlora.lora_linear_4bit, double quant, blocksize 64); "fp8": a
    # block-scaled FP8 base (fastlora.lora_linear_fp8, 128 x 128 blocks, fp32 scales; W8A16, adapters in x's dtype);
    # "w8a8": the same with fp8_activations=True (W8A8 forward, W8A16 backward; skipped before sm_89)
    dora: bool = False  # DoRA: lora_linear(magnitude=) or, with quant, lora_linear_4bit(magnitude=) (QDoRA)
    ranks: tuple = ()  # a ragged grouped stack (rank_offsets), G = len(ranks) adapters at these ranks; r unused
    fp32_adapters: bool = False  # fp32 adapters (and magnitude) over any dtype, as bench_fp8's (nf4 has them always)
    experts: int = 0  # E > 0: a mixture of experts (grouped_lora_linear with a 3-D weight [E, N, K], bias [E, N])
    transposed: bool = False  # experts stored (E, K, N) and passed as w.transpose(1, 2), gpt-oss's layout

    def __str__(self):
        kind = f"grouped{self.G}" if self.G > 1 else f"{self.quant}-dense" if self.quant else "dense"
        if self.experts:
            kind = f"experts{self.experts}{'-EinOut' if self.transposed else ''}"
        kind = f"dora-{kind}" if self.dora else kind
        if self.ranks:
            kind = f"{'dora-' if self.dora else ''}ragged{len(self.ranks)}-rmax{max(self.ranks)}"
        mode = f"train-p{self.p:g}" if self.train else "infer"
        return (f"{kind}-{mode} {self.dtype}{'-tf32' if self.tf32 else ''} M{self.M}-K{self.K}-N{self.N}-R{self.r}"
                f"{'' if self.bias else '-nobias'}{'-fp32adapters' if self.fp32_adapters else ''}")

    def run(self):
        dt = harness.DTYPES[self.dtype]
        x = torch.empty(self.M, self.K, dtype=dt, requires_grad=self.train)
        w = torch.empty(self.N, self.K, dtype=dt)
        b = torch.empty(self.N, dtype=dt) if self.bias else None
        lead = (self.G,) if self.G > 1 else ()
        # fastlora.Linear4bit's adapters are fp32, as PEFT's QLoRA
        adt = torch.float32 if self.quant == "nf4" or self.fp32_adapters else dt
        if self.ranks:
            lead, r = (), sum(self.ranks)
        else:
            r = self.r
        a = torch.empty(*lead, r, self.K, dtype=adt, requires_grad=self.train)
        bb = torch.empty(*lead, self.N, r, dtype=adt, requires_grad=self.train)
        kw = dict(dropout_p=self.p, training=self.train, seed=1)
        # grouped DoRA: every other adapter plain (a NaN magnitude row); the values are never read by a kernel here
        mag = dict(magnitude=torch.ones(len(self.ranks) or self.G, self.N, dtype=adt).index_fill_(
            0, torch.arange(1, len(self.ranks) or self.G, 2), float("nan")).requires_grad_(self.train)) \
            if self.dora and (self.ranks or self.G > 1) else {}
        with torch.set_grad_enabled(self.train), harness.allow_tf32(self.tf32):
            if self.experts:  # as fastlora.Experts calls it: one projection of every token's top-k rows
                E = self.experts
                w = torch.empty(E, self.K, self.N, dtype=dt).transpose(1, 2) if self.transposed else \
                    torch.empty(E, self.N, self.K, dtype=dt)
                b = torch.empty(E, self.N, dtype=dt) if self.bias else None
                a = torch.empty(E, r, self.K, dtype=adt, requires_grad=self.train)
                bb = torch.empty(E, self.N, r, dtype=adt, requires_grad=self.train)
                y = fastlora.grouped_lora_linear(x, w, b, a, bb, 2.0, torch.arange(self.M) % E, **kw)
            elif self.ranks:
                ids = torch.arange(self.M) % len(self.ranks)
                offsets = torch.tensor([0, *torch.tensor(self.ranks).cumsum(0).tolist()], dtype=torch.int32)
                y = fastlora.grouped_lora_linear(x, w, b, a, bb, 2.0, ids, rank_offsets=offsets, **mag, **kw)
            elif self.G > 1:
                ids = torch.arange(self.M) % self.G
                y = fastlora.grouped_lora_linear(x, w, b, a, bb, 2.0, ids, **mag, **kw)
            elif self.quant in ("fp8", "w8a8"):
                if self.quant == "w8a8" and _configs.target_capability(x.device) < (8, 9):
                    return  # no fp8 MMA before sm_89: fastlora refuses fp8_activations there
                w8 = torch.empty(self.N, self.K, dtype=torch.float8_e4m3fn)
                scale = torch.empty(-(-self.N // 128), -(-self.K // 128))
                m = torch.empty(self.N, dtype=adt, requires_grad=self.train) if self.dora else None
                y = fastlora.lora_linear_fp8(x, w8, scale, b, a, bb, 2.0, magnitude=m,
                                             fp8_activations=self.quant == "w8a8", **kw)
            elif self.quant:
                packed, state = quant.empty_4bit((self.N, self.K), dtype=dt, quant_type=self.quant)
                m = torch.empty(self.N, dtype=adt, requires_grad=self.train) if self.dora else None
                y = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, 2.0, compute_dtype=dt, magnitude=m, **kw)
            elif self.dora:
                m = torch.empty(self.N, dtype=adt, requires_grad=self.train)
                y = fastlora.lora_linear(x, w, b, a, bb, 2.0, magnitude=m, **kw)
            else:
                y = fastlora.lora_linear(x, w, b, a, bb, 2.0, **kw)
            if self.train:
                y.backward(torch.empty_like(y))


def _calls(dtype: str, M: int, K: int, N: int, r: int, G: int = 1, ps=(0.0, 0.1), biases=(True, False),
           infer: bool = True, tf32: bool = False, quant: str = "", dora: bool = False, ranks=(), experts: int = 0,
           transposed: bool = False) -> list[Case]:
    """Training at each dropout in ``ps`` and (``infer``) inference, with and without bias as ``biases`` says."""
    kw = dict(G=G, tf32=tf32, quant=quant, dora=dora, ranks=ranks, experts=experts, transposed=transposed)
    return [c for bias in biases
            for c in ((Case(dtype, M, K, N, r, bias=bias, train=False, **kw),) if infer else ())
            + tuple(Case(dtype, M, K, N, r, p, bias, **kw) for p in ps)]


def dora_calls(M: int, qdora: bool = True) -> list[Case]:
    """DoRA (dense, K = N = 4096): every flag at bf16 r = 16, training with dropout at fp16 r = 64 and fp32 r = 256
    (ieee and tf32); then the same over an nf4 double-quant base (QDoRA, the 4-bit product in that dtype, fp32
    adapters and magnitude) unless ``qdora`` is off. The ci tier's dense calls at M = 4096 and 16; ``--tier dora``
    and the full tier take all of them and add M = 1."""
    out = []
    for q in ("", "nf4") if qdora else ("",):
        out += [*_calls("bf16", M, 4096, 4096, 16, quant=q, dora=True),
                *_calls("fp16", M, 4096, 4096, 64, ps=(0.1,), biases=(True,), infer=False, quant=q, dora=True),
                *_calls("fp32", M, 4096, 4096, 256, ps=(0.0, 0.1), biases=(True,), infer=False, quant=q, dora=True),
                *_calls("fp32", M, 4096, 4096, 256, ps=(0.0, 0.1), biases=(True,), infer=False, tf32=True, quant=q,
                        dora=True)]
    return out


def fp8_calls(M: int) -> list[Case]:
    """A block-scaled FP8 base (128 x 128 blocks, K = N = 4096) under bf16 activations and adapters: inference and
    training with dropout 0 and 0.1, with bias, at r = 16 and 64, as W8A16 (the forward's dequantising main GEMM, dx's
    over the same bytes transposed) and W8A8 (``fp8_activations=True``: the forward's e4m3 main GEMM; its backward is
    W8A16's). The ci tier's and ``--tier fp8``'s (which adds M = 1)."""
    return [c for q in ("fp8", "w8a8") for r in (16, 64) for c in _calls("bf16", M, 4096, 4096, r, biases=(True,),
                                                                            quant=q)]


def moe_calls(small: bool) -> list[Case]:
    """The experts of bench_moe's two shapes (``harness.MOE_SHAPES``: Qwen3-30B-A3B's, stored (E, out, in), no bias;
    gpt-oss-20b's, stored (E, in, out) and read through strides, biases) at bf16, r = 16: gate_up and down, inference
    and training (dropout 0), as ``fastlora.Experts`` calls them, M = tokens x top-k rows of the bench (4096 tokens),
    or M = 16 (``small``). ``--tier moe`` takes both; the ci tier too, with its M = 4096 and M = 16 calls."""
    out = []
    for s in (harness.MOE_SHAPES[name] for name in harness.GRIDS["default"].moe["shapes"]):
        M = 16 if small else harness.GRIDS["default"].moe["tokens"][0] * s.k
        gpt = s.layout == "gpt-oss"
        for K, N in ((s.H, 2 * s.inter), (s.inter, s.H)):
            out += _calls("bf16", M, K, N, 16, ps=(0.0,), biases=(gpt,), experts=s.E, transposed=gpt)
    return out


def gdora_calls(M: int) -> list[Case]:
    """Grouped DoRA (K = N = 4096, 32 adapters, every other one plain): padded (r = 16) and ragged (the bench mix) at
    bf16 every flag; training with dropout at fp16 (padded r = 64) and fp32 (ieee and tf32: padded r = 16 also without
    dropout, ragged mix). ``--tier gdora``, at M = 4096, 16 and 1."""
    mix = RAGGED_MIXES[0]
    return [*_calls("bf16", M, 4096, 4096, 16, G=32, dora=True),
            *_calls("bf16", M, 4096, 4096, 0, G=len(mix), ranks=mix, dora=True),
            *_calls("fp16", M, 4096, 4096, 64, G=32, ps=(0.1,), biases=(True,), infer=False, dora=True),
            *[c for tf32 in (False, True) for c in (
                *_calls("fp32", M, 4096, 4096, 16, G=32, ps=(0.0, 0.1), biases=(True,), infer=False, tf32=tf32,
                        dora=True),
                *_calls("fp32", M, 4096, 4096, 0, G=len(mix), ranks=mix, ps=(0.1,), biases=(True,), infer=False,
                        tf32=tf32, dora=True))]]


# Ragged stacks (issue 24): the bench's mix (28 x r 8, 3 x r 64, 1 x r 256: T 256 wide) and a small-rank one (16 wide),
# which give every BLOCK_R / shrink BLOCK_N the ragged launchers choose.
RAGGED_MIXES = ((8,) * 28 + (64,) * 3 + (256,), (2, 8, 16, 4))


def ragged_calls(M: int) -> list[Case]:
    """Ragged grouped calls (K = N = 4096): every flag at bf16 for both mixes; training with dropout and inference at
    fp16 and fp32 (ieee and tf32). ``--tier ragged``; the ci tier takes the bf16 calls."""
    out = []
    for ranks in RAGGED_MIXES:
        kw = dict(G=len(ranks), ranks=ranks)
        out += _calls("bf16", M, 4096, 4096, 0, **kw)
        out += _calls("fp16", M, 4096, 4096, 0, ps=(0.1,), biases=(True,), **kw)
        out += _calls("fp32", M, 4096, 4096, 0, ps=(0.1,), biases=(True,), **kw)
        out += _calls("fp32", M, 4096, 4096, 0, ps=(0.1,), biases=(True,), tf32=True, **kw)
    return out


def cases(tier: str) -> list[Case]:
    """The public calls of a tier (see the module docstring)."""
    if tier == "ci":
        return [c for M in (4096, 16) for c in (  # largest worker tasks first: the two workers finish together
            *_calls("bf16", M, 4096, 4096, 16), *_calls("bf16", M, 4096, 4096, 16, G=32),
            *_calls("fp16", M, 4096, 4096, 64, ps=(0.1,), biases=(True,), infer=False),
            *_calls("bf16", M, 4096, 4096, 256, ps=(0.1,), biases=(True,), infer=False),
            *_calls("fp16", M, 4096, 4096, 16, G=32, ps=(), biases=(True,)),
            *_calls("fp32", M, 4096, 4096, 256, ps=(0.1,), biases=(True,), infer=False),
            *_calls("fp32", M, 4096, 4096, 256, ps=(0.1,), biases=(True,), infer=False, tf32=True),
            *_calls("bf16", M, 4096, 4096, 16, biases=(True,), quant="nf4"),
            *_calls("fp32", M, 4096, 4096, 16, ps=(0.1,), biases=(True,), infer=False, quant="nf4"),
            *_calls("fp32", M, 4096, 4096, 16, ps=(0.1,), biases=(True,), infer=False, tf32=True, quant="nf4"),
            *fp8_calls(M),
            *dora_calls(M, qdora=False),
            *_calls("bf16", M, 4096, 4096, 0, G=32, ranks=RAGGED_MIXES[0]),
            *_calls("bf16", M, 4096, 4096, 0, G=4, ranks=RAGGED_MIXES[1], ps=(0.1,), biases=(True,), infer=False),
            *moe_calls(small=M == 16),
        )]
    if tier == "dora":
        return [c for M in (4096, 16, 1) for c in dora_calls(M)]
    if tier == "fp8":
        return [c for M in (4096, 16, 1) for c in fp8_calls(M)]
    if tier == "gdora":
        return [c for M in (4096, 16, 1) for c in gdora_calls(M)]
    if tier == "ragged":
        return [c for M in (4096, 16, 1) for c in ragged_calls(M)]
    if tier == "moe":
        return [*moe_calls(small=False), *moe_calls(small=True)]
    g = harness.GRIDS["default"]
    out = []
    for dtype, tf32 in (("bf16", False), ("fp16", False), ("fp32", False), ("fp32", True)):
        for r in sorted({*g.ranks, 16, 64, 256}):
            out += [c for K, N in g.shapes for M in g.tokens
                    for c in _calls(dtype, M, K, N, r, biases=(True,), tf32=tf32)]
        K, N = g.shapes[0]
        out += [Case(dtype, g.tokens[-1], K, N, 16, p, bias=False, tf32=tf32) for p in (0.0, 0.1)]
        K, N = g.grouped_shape
        out += [c for M in g.grouped_tokens for c in _calls(dtype, M, K, N, g.grouped_rank, G=32, tf32=tf32)]
        out += [c for K, N in g.shapes for M in g.tokens
                for c in _calls(dtype, M, K, N, 16, biases=(True,), tf32=tf32, quant="nf4")]
    return out + [c for M in (4096, 16, 1) for c in (*dora_calls(M), *fp8_calls(M))] + cases("moe")


# ------------------------------------------------------------------------------------------------ run


def compile_cases(case_list: list[Case], capability: int) -> list[Variant]:
    """Compile every kernel the cases launch, in this process; one Variant per distinct compiled kernel."""
    with compile_only(capability) as rec:
        for case in case_list:
            rec.case = str(case)
            case.run()
    return list(rec.variants.values())


def report(case_list: list[Case], capability: int, jobs: int) -> list[Variant]:
    """``compile_cases`` spread over ``jobs`` fresh processes, one task per (dtype, tf32, dense/grouped, r)."""
    groups: dict[tuple, list[Case]] = {}
    for case in case_list:  # tasks that share few kernels; a repeat in another process reads Triton's disk cache
        groups.setdefault((case.dtype, case.tf32, case.G, case.r, case.quant, case.dora, case.ranks, case.experts),
                          []).append(case)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        parts = list(pool.map(compile_cases, groups.values(), [capability] * len(groups)))
    variants: dict[object, Variant] = {}
    for v in (v for part in parts for v in part):
        variants.setdefault(v.hash or (v.kernel, repr(v.constexprs), v.error), v)
    return list(variants.values())


# ------------------------------------------------------------------------------------------------ checks


def is_fma(rec: dict) -> bool:
    """A variant whose dots run on FMA units: fp32 operands with input_precision 'ieee' (an fp32 call, or a 4-bit W
    computed in fp32: QDoRA's norm launch in every dtype)."""
    c = rec["constexprs"]
    return c.get("INPUT_PRECISION") == "ieee" and (" fp32 " in f" {rec['case']} " or c.get("W_COMPUTE") == "fp32")


def check(records: list[dict], capability: int) -> list[str]:
    """One failure string per problem: compile errors, spills, shared memory over the target's per-block
    limit; on sm_90 also a GEMM-family variant with BLOCK_M >= 64 without wgmma (W8A8, X_FORMAT 1: without e4m3
    wgmma), or loads without cp.async/TMA.
    """
    if not records:
        return [f"no kernel compiled for sm_{capability}"]
    limit = DEVICES[capability]["max_shared_mem"]
    failures = []
    for rec in records:
        what = f"{describe(rec)} [{rec['case']}]"
        if rec["error"]:
            failures.append(f"ERROR {what}: {rec['error']}")
            continue
        fma = is_fma(rec)  # fp32 'ieee': FMA units, no wgmma by design
        if rec["spill_bytes"]:
            failures.append(f"SPILL {rec['spill_bytes']} B/thread, {rec['regs']} regs: {what}")
        if rec["shared"] > limit:
            failures.append(f"SMEM {rec['shared']} B > {limit} B: {what}")
        if capability == 90:
            if (rec["kernel"] in MMA_KERNELS and not fma and rec["constexprs"].get("BLOCK_M", 0) >= 64
                    and not rec["wgmma"]):
                failures.append(f"NO-WGMMA ({rec['mma_sync']} mma.sync): {what}")
            if not (rec["cp_async"] or rec["tma"]):
                failures.append(f"NO-PIPELINE (no cp.async, no TMA): {what}")
            if (rec["constexprs"].get("X_FORMAT") == 1 and rec["constexprs"].get("BLOCK_M", 0) >= 64
                    and not rec.get("wgmma_e4m3")):
                failures.append(f"NO-E4M3 (W8A8 without fp8 wgmma: {rec['wgmma']} wgmma): {what}")
    return failures


def describe(rec: dict) -> str:
    """Kernel name, its integer constexprs, the flags that are on, string constexprs, warps and stages."""
    parts = [rec["kernel"]]
    for name, value in rec["constexprs"].items():
        if value is True:
            parts.append(name)
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{name}={value}")
        elif isinstance(value, str):
            parts.append(value)
    if rec["num_warps"] is not None:
        parts.append(f"w{rec['num_warps']} s{rec['num_stages']}")
    return " ".join(parts)


def table(records: list[dict], capability: int) -> list[str]:
    """One line per variant, those failing a check first (flagged ERROR, SPILL, SMEM, ...), then a summary."""
    limit = DEVICES[capability]["max_shared_mem"]
    bad, good = [], []
    for rec in records:
        flags = sorted({f.split()[0] for f in check([rec], capability)})
        line = describe(rec)
        if not rec["error"]:
            line += (f" | regs {rec['regs']} spill {rec['spill_bytes']} ({rec['loop_spills']} LDL/STL in K loops)"
                     f" smem {rec['shared']} wgmma {rec['wgmma']}"
                     + (f" (e4m3 {rec['wgmma_e4m3']})" if rec.get("wgmma_e4m3") else "") +
                     f" mma.sync {rec['mma_sync']} cp.async {rec['cp_async']} tma {rec['tma']}")
        if flags:
            bad.append(f"{'/'.join(flags):<9} {line} | {rec['error'] or rec['case']}")
        else:
            good.append(f"{'ok':<9} {line}")
    ok = [r for r in records if not r["error"]]
    return bad + good + [
        f"{len(records)} variants compiled for sm_{capability}: {len(records) - len(ok)} errors, "
        f"{sum(1 for r in ok if r['spill_bytes'])} spill ({sum(1 for r in ok if r['loop_spills'])} inside a K loop), "
        f"{sum(1 for r in ok if r['shared'] > limit)} over shared "
        f"memory (limit {limit})"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capability", type=int, choices=sorted(DEVICES), default=90, help="compile target (sm_XX)")
    ap.add_argument("--tier", choices=("full", "ci", "dora", "ragged", "gdora", "fp8", "moe"), default="full",
                    help="which grid of public calls")
    ap.add_argument("--json", metavar="PATH", help="write the records here")
    ap.add_argument("--check", action="store_true", help="exit 1 if a check fails")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (default: one per CPU)")
    args = ap.parse_args(argv)
    if _launch.INTERPRET:
        ap.error("unset TRITON_INTERPRET: under the interpreter the kernels cannot be compiled")
    start = time.perf_counter()
    case_list = cases(args.tier)
    records = [v.record() for v in report(case_list, args.capability, args.jobs)]
    for line in table(records, args.capability):
        print(line)
    print(f"{len(case_list)} public calls ({args.tier} tier) compiled in {time.perf_counter() - start:.0f} s "
          f"with {args.jobs} processes; triton {triton.__version__}, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.check:
        failures = check(records, args.capability)
        print(f"check: {len(failures)} failures" + "".join(f"\n  {f}" for f in failures))
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
