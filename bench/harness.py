"""Shared benchmark machinery: grids, timing, FLOP/byte models, correctness checks, provenance.

Imported by the ``bench_*.py`` modules (pytest puts ``bench/`` on ``sys.path``) and by ``run.py``. Timing on
CUDA is ``triton.testing.do_bench``: CUDA events around each call, the L2 cache flushed between calls, the
median over ~100 ms of calls. Inputs rotate through a ring of buffers larger than L2, so no call reads an x
that the previous one left in cache. Without CUDA the same code runs under ``TRITON_INTERPRET=1`` with a
wall-clock loop of a few calls: those numbers check the plumbing and mean nothing about performance.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import itertools
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error bound (max |y - ref| / max |ref|) for the pre-timing correctness check, per dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
RING_BYTES = 128 << 20  # inputs of one case rotate through at least this much memory (H100 L2: 50 MB)
MAX_RING = 512

# ------------------------------------------------------------------------------------------------ grids


@dataclass(frozen=True)
class Grid:
    name: str
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (K, N)
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    train_dropouts: tuple[float, ...]
    adapters: tuple[int, ...]
    grouped_tokens: tuple[int, ...]
    grouped_shape: tuple[int, int]
    grouped_rank: int
    e2e: dict
    qlora_ranks: tuple[int, ...]  # the QLoRA layer suite (bench_qlora.py): the layer grid's shapes and tokens
    dora: dict  # the DoRA suite (bench_dora.py): ranks, training dropouts; shapes, tokens (default: the layer grid's)
    fp8: dict  # the FP8-base suite (bench_fp8.py): ranks; shapes, tokens (default: the layer grid's)
    moe: dict  # the MoE experts suite (bench_moe.py): shapes (MOE_SHAPES names), tokens, ranks; modes, impls (all)


@dataclass(frozen=True)
class MoeShape:
    """One experts block: E experts, hidden H, intermediate ``inter`` (gate_up (E, 2 inter, H), down (E, H, inter) as
    (experts, out, in)), top-k experts per token. ``layout``: 'qwen3' (Qwen3-MoE: stored (E, out, in), no bias, SiLU
    gate) or 'gpt-oss' (stored (E, in, out), biases, gpt-oss's clamped SwiGLU on interleaved gate/up columns)."""

    name: str
    E: int
    H: int
    inter: int
    k: int
    layout: str


MOE_SHAPES = {s.name: s for s in (
    MoeShape("qwen3-30b-a3b", 128, 2048, 768, 8, "qwen3"),  # PEFT #3577's shape (Qwen3-30B-A3B's experts)
    MoeShape("gpt-oss-20b", 32, 2880, 2880, 4, "gpt-oss"),
    MoeShape("tiny-qwen3", 8, 64, 48, 2, "qwen3"),  # the CPU smoke grid's
    MoeShape("tiny-gpt-oss", 4, 40, 24, 2, "gpt-oss"),
)}
_MOE = dict(shapes=("qwen3-30b-a3b", "gpt-oss-20b"), tokens=(4096,), ranks=(16,))
_LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000)
GRIDS = {
    "full": Grid("full", ("bf16", "fp16"), ((4096, 4096), (4096, 14336), (14336, 4096)), (8, 16, 64),
                 (1, 16, 128, 1024, 4096, 16384), (0.0, 0.1), (1, 4, 32, 128), (32, 1024, 8192), (4096, 4096), 16,
                 dict(config=_LLAMA_8B, layers=4, batch=4, seq=2048, ranks=(16, 64)), (8, 16, 64),
                 dict(ranks=(16, 64), dropouts=(0.0, 0.1)), dict(ranks=(16, 64), tokens=(4096, 16384)), _MOE),
    "default": Grid("default", ("bf16",), ((4096, 4096), (4096, 14336), (14336, 4096)), (8, 16, 64),
                    (1, 16, 128, 1024, 4096, 16384), (0.0, 0.1), (1, 4, 32, 128), (32, 1024, 8192), (4096, 4096),
                    16, dict(config=_LLAMA_8B, layers=4, batch=4, seq=2048, ranks=(16,)), (16, 64),
                    dict(ranks=(16, 64), dropouts=(0.0, 0.1)), dict(ranks=(16, 64), tokens=(4096, 16384)), _MOE),
    "quick": Grid("quick", ("bf16",), ((4096, 4096), (4096, 14336)), (16,), (1, 128, 4096), (0.0,), (4, 32),
                  (1024,), (4096, 4096), 16, dict(config=_LLAMA_8B, layers=2, batch=2, seq=1024, ranks=(16,)),
                  (16,), dict(ranks=(16,), dropouts=(0.0, 0.1), shapes=((4096, 4096),), tokens=(128, 4096)),
                  dict(ranks=(16,), shapes=((4096, 4096),), tokens=(4096,)),
                  # the session's bench stage is time-limited: fastlora against the base experts alone, training
                  dict(shapes=("qwen3-30b-a3b",), tokens=(4096,), ranks=(16,), modes=("train",),
                       impls=("experts", "fastlora"))),
    # fp16: triton 3.6's interpreter gets bf16 tl.dot wrong (errors ~1e10 on a bare 16x16 dot, not fastlora's).
    "smoke": Grid("smoke", ("fp16",), ((64, 64), (64, 96)), (8,), (1, 16), (0.0, 0.1), (1, 4), (32,), (64, 64), 8,
                  dict(config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128), layers=1, batch=2, seq=8, ranks=(8,)),
                  (8,), dict(ranks=(8,), dropouts=(0.0, 0.1)), dict(ranks=(8,), shapes=((64, 96),), tokens=(16,)),
                  dict(shapes=("tiny-qwen3", "tiny-gpt-oss"), tokens=(13,), ranks=(4,))),
}


def grid() -> Grid:
    """The grid chosen by ``run.py`` (env FASTLORA_BENCH_GRID); smoke without CUDA, default with it."""
    name = os.environ.get("FASTLORA_BENCH_GRID") or ("default" if CUDA else "smoke")
    if name not in GRIDS:
        raise ValueError(f"FASTLORA_BENCH_GRID must be one of {sorted(GRIDS)}; got {name!r}")
    g = GRIDS[name]
    if os.environ.get("FASTLORA_BENCH_DTYPES"):
        g = Grid(**{**g.__dict__, "dtypes": tuple(os.environ["FASTLORA_BENCH_DTYPES"].split(","))})
    return g


def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


class Cell:
    """A benchmark cell (a dataclass with ``group`` and ``impl``): the cells of one group are timed against each
    other; the id (pytest's, and the JSON's key) is the group and the competitor."""

    @property
    def id(self) -> str:
        return f"{self.group}-{self.impl}"


@dataclass(frozen=True)
class LayerCase(Cell):
    """One single-layer cell: mode (``fwd``, ``train``, ``train-drop<p>``), dtype, shape, rank, tokens, competitor."""

    mode: str
    dtype: str
    K: int
    N: int
    R: int
    M: int
    impl: str

    @property
    def train(self) -> bool:
        return self.mode.startswith("train")

    @property
    def dropout(self) -> float:
        return float(self.mode.removeprefix("train-drop")) if "drop" in self.mode else 0.0

    @property
    def group(self) -> str:
        return f"{self.mode}-{self.dtype}-K{self.K}-N{self.N}-r{self.R}-M{self.M}"


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str


def measure(fn) -> Timing:
    """Median time of ``fn()``: CUDA events + L2 flush on a GPU, a short wall-clock loop on the CPU."""
    if CUDA:
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
        method = "triton.testing.do_bench: CUDA events per call, L2 flushed between calls"
    else:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        method = "CPU wall clock (TRITON_INTERPRET=1), not a GPU measurement"
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], len(times), method)


def measure_steps(fn, warmup: int, reps: int) -> Timing:
    """Median of ``reps`` calls after ``warmup``, each timed with CUDA events (no L2 flush: for whole training
    steps, long enough that cache state at the start does not matter); wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    method = "CUDA events per step" if CUDA else "CPU wall clock (TRITON_INTERPRET=1), not a GPU measurement"
    return Timing(statistics.median(times), q[0], q[3], len(times), method)


@contextlib.contextmanager
def allow_tf32(on: bool):
    """fp32 matmuls on tensor cores (tf32) inside, as ``torch.backends.cuda.matmul.allow_tf32`` says; restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def sync():
    if CUDA:
        torch.cuda.synchronize()


def synced(fn):
    """``fn`` followed by a device synchronisation, for pytest-benchmark's own wall-clock rounds."""
    def call():
        fn()
        sync()
    return call


def pedantic(benchmark, fn, rounds: int = 20):
    """pytest-benchmark's columns: host wall clock of one synchronised call (includes launch overhead)."""
    rounds, warm = (rounds, 3) if CUDA else (2, 0)
    benchmark.pedantic(synced(fn), rounds=rounds, warmup_rounds=warm, iterations=1)


class Ring:
    """``make()`` called until the ring holds >= RING_BYTES (at least 2 entries); ``next()`` cycles them."""

    def __init__(self, make, nbytes: int):
        count = 2 if not CUDA else min(MAX_RING, max(2, math.ceil(RING_BYTES / max(nbytes, 1))))
        self.items = [make() for _ in range(count)]
        self._it = itertools.cycle(self.items)

    def next(self):
        return next(self._it)


def input_ring(M: int, K: int, N: int, dtype: torch.dtype, train: bool) -> Ring:
    """A ring of (x [M, K], dy [M, N] or None) on the bench device; x requires grad when training."""
    dev = device()

    def make():
        x = torch.randn(M, K, dtype=dtype, device=dev).requires_grad_(train)
        dy = torch.randn(M, N, dtype=dtype, device=dev) if train else None
        return x, dy

    return Ring(make, (torch.finfo(dtype).bits // 8) * M * (K + (N if train else 0)))


def layer_step(forward, params, train: bool):
    """The timed callable on one ``input_ring`` entry: forward under no_grad, or forward and
    ``torch.autograd.grad`` for x and ``params``."""
    if not train:
        def fwd(entry):
            with torch.no_grad():
                return forward(entry[0])
        return fwd

    def fwd_bwd(entry):
        x, dy = entry
        return torch.autograd.grad(forward(x), [x, *params], dy)
    return fwd_bwd


def time_layer(benchmark, impl, ring: Ring, train: bool):
    """(Timing, peak bytes, peak above the inputs) of one ``layer_step`` of ``impl`` over ``ring``; pytest-benchmark's
    own rounds run too."""
    step = layer_step(impl.forward, impl.params, train)
    timing = measure(lambda: step(ring.next()))
    peak, extra = peak_memory(lambda: step(ring.items[0]))
    pedantic(benchmark, lambda: step(ring.next()))
    return timing, peak, extra


def baseline_ms(impl, M: int, K: int, N: int, dtype: torch.dtype, train: bool) -> float:
    """Median ms of one ``layer_step`` of ``impl`` on a fresh input ring: a baseline whose own cell did not run."""
    ring = input_ring(M, K, N, dtype, train)
    step = layer_step(impl.forward, impl.params, train)
    return measure(lambda: step(ring.next())).median_ms


def peak_memory(fn) -> tuple[int | None, int | None]:
    """(peak bytes allocated while running ``fn`` once, that peak minus what was allocated before)."""
    if not CUDA:
        return None, None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before


class _LiveTensorBytes:
    """A TorchDispatchMode (``mode``) that counts the bytes of the storages the ops run under it create while they are
    alive: an op's output storage that none of its inputs holds (views and in-place results do not count) is added
    when the op returns it and taken off by a weakref finaliser when it is freed; ``peak`` is the high-water mark."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                leaves = torch.utils._pytree.tree_leaves((args, kwargs))
                held = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                        counter._track(t)
                return out

        self.mode = Mode()
        self.live, self.peak, self._seen = 0, 0, {}

    def _track(self, t: torch.Tensor):
        import weakref

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def freed(key=key, nbytes=nbytes):
            if self._seen.pop(key, None) is not None:
                self.live -= nbytes
        weakref.finalize(storage, freed)


CPU_MEMORY = ("bytes of the tensors torch ops allocate during the step, counted while alive (a TorchDispatchMode; "
              "what kernels or custom ops allocate inside themselves without returning it is not seen)")


def step_memory(fn) -> tuple[int | None, int | None, str]:
    """(peak bytes, peak above what was allocated before, how) of one call of ``fn``: CUDA's allocator statistics on a
    GPU (``peak_memory``); on the CPU the peak of the bytes alive among the tensors torch ops create during the call
    (``CPU_MEMORY``): no absolute peak there, only the step's own."""
    if CUDA:
        peak, extra = peak_memory(fn)
        return peak, extra, "torch.cuda.max_memory_allocated minus memory_allocated before the step"
    counter = _LiveTensorBytes()
    with counter.mode:
        fn()
    return None, counter.peak, CPU_MEMORY


# ------------------------------------------------------------------------------------------------ models


def flops(M, K, N, R, train: bool, lora: bool = True) -> int:
    """Forward 2MKN + 2MKR + 2MRN. Training with the base frozen: forward + dX for the base (no dW, so 2x the
    base GEMM) and 3x the low-rank part (forward, dX through A and B, dA and dB)."""
    base = 2 * M * K * N
    low = (2 * M * K * R + 2 * M * R * N) if lora else 0
    return (2 * base + 3 * low) if train else (base + low)


def bytes_moved(M, K, N, R, elt: int, train: bool, lora: bool = True, w_bytes: int | None = None,
                adapter_elt: int | None = None) -> int:
    """Compulsory HBM traffic: read x, W, bias, A, B, write y; training adds read dy, W, x, A, B, write dx, dA, dB.
    ``elt`` bytes per element; ``w_bytes`` one read of W (default elt N K; a 4-bit W: its codes and scales);
    ``adapter_elt`` bytes per adapter element (default elt; fp32 adapters under 16-bit activations: 4)."""
    w = elt * N * K if w_bytes is None else w_bytes
    ab = (R * K + N * R) * (elt if adapter_elt is None else adapter_elt) if lora else 0
    fwd = elt * (M * K + N + M * N) + w + ab
    bwd = elt * (M * N + M * K + M * K) + w + 2 * ab
    return fwd + (bwd if train else 0)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.abs().max().item() or 1.0
    return (y.double() - ref).abs().max().item() / scale


def check_close(name: str, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Raise if ``y`` is further than the dtype's bound from ``ref``; return the relative error."""
    if not torch.isfinite(y).all():
        raise AssertionError(f"{name}: non-finite values")
    err = rel_err(y, ref)
    if err > TOLERANCE[dtype]:
        raise AssertionError(f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})")
    return err


def seeded_run(impl, x: torch.Tensor, p: float, seed: int = 1234):
    """(output, keep-mask or None) of ``impl`` on x with a dropout mask the reference can replay: fastlora's seeded
    mask (``impl.checked_forward``), or torch's RNG state replayed for F.dropout / nn.Dropout."""
    if impl.checked_forward is not None:
        import fastlora

        return impl.checked_forward(x, seed), (fastlora.dropout_mask(x.shape, p, seed, x.device) if p else None)
    torch.manual_seed(seed)
    y = impl.forward(x)
    if not p:
        return y, None
    torch.manual_seed(seed)
    return y, torch.nn.functional.dropout(torch.ones_like(x), p) != 0


def check_layer(cid: str, y, ref, dtype, train: bool, inputs, ref_inputs, dy) -> dict:
    """Relative errors of a layer's output and, when ``train``, of its gradients for ``inputs`` (x and the
    trainable tensors) against the reference's for ``ref_inputs`` (x, A, B and DoRA's magnitude in float32;
    nn.Linear has x only)."""
    errs = {"y": check_close(f"{cid} y", y, ref, dtype)}
    if train:
        got = torch.autograd.grad(y, inputs, dy)
        want = torch.autograd.grad(ref, ref_inputs[:len(got)], dy.float())
        for name, g, w in zip(("dx", "dA", "dB", "dm")[:len(got)], got, want, strict=True):
            errs[name] = check_close(f"{cid} {name}", g, w, dtype)
    return errs


# ------------------------------------------------------------------------------------------------ provenance


@functools.cache
def provenance() -> dict:
    import triton

    info = {
        "device": torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})",
        "backend": "cuda" if CUDA else "cpu-triton-interpreter",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "grid": grid().name,
    }
    for name in ("peft", "bitsandbytes"):  # read from the installed metadata, without importing them
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def git_sha() -> str:
    """HEAD (+ "-dirty" when tracked files differ); FASTLORA_GIT_SHA overrides, for copies without .git."""
    if os.environ.get("FASTLORA_GIT_SHA"):
        return os.environ["FASTLORA_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


NOT_INSTALLED = "not installed: "  # how require's skips begin (run.py fails a main job whose PEFT is missing)
# how the skips of a competitor that has no cell of its own with the installed versions begin (no banner in run.py)
NOT_APPLICABLE = "not applicable: "


def require(module: str, extra: str) -> None:
    """Skip the cell when ``module`` is not installed; one that is installed but fails to import fails the cell
    with its own error (transformers 5.25 importing a shadowed ``kernels`` broke ``import peft``: that is no skip).
    """
    if importlib.util.find_spec(module) is None:
        import pytest

        pytest.skip(f"{NOT_INSTALLED}{module} (pip install -e '.[{extra}]')")
    importlib.import_module(module)


@functools.cache
def bnb_unavailable() -> str | None:
    """None when bitsandbytes is installed and quantises and dequantises a 4-bit weight on the bench device; else
    why not (the QLoRA cases skip its competitors with this reason)."""
    try:
        import bitsandbytes.functional as bnbF
    except ImportError as e:
        return (f"bitsandbytes cannot be imported ({e}); pip install 'bitsandbytes>=0.50', or carry its wheel to "
                "the GPU machine (docs/benchmarks.md, QLoRA)")
    try:
        w = torch.randn(64, 64, device=device(), dtype=torch.float16)
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bnbF.dequantize_4bit(packed, state)
        sync()
    except Exception as e:  # a missing CUDA binary, an unsupported device: the reason names it
        import bitsandbytes

        return f"bitsandbytes {bitsandbytes.__version__} cannot run on {device()}: {type(e).__name__}: {e}"[:300]
    return None


def record(benchmark, request, *, timing: Timing, flop: int, nbytes: int, summary_extra: str = "", **extra):
    """Fill ``benchmark.extra_info`` and the one-line progress summary printed by the conftest."""
    tflops = flop / (timing.median_ms * 1e-3) / 1e12
    gbs = nbytes / (timing.median_ms * 1e-3) / 1e9
    benchmark.extra_info.update(provenance())
    benchmark.extra_info.update(dict(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                                     reps=timing.reps, timing=timing.method, flop=flop, tflops=tflops,
                                     bytes=nbytes, gbps=gbs, **extra))
    unit = "TFLOP/s" if CUDA else "TFLOP/s(cpu)"
    request.node.user_properties.append(
        ("summary", f"{timing.median_ms:9.4f} ms  {tflops:8.3f} {unit}  {gbs:8.1f} GB/s{summary_extra}"))
