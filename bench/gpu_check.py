"""The GPU session's correctness tier: every kernel family once per dtype, one forced config each, against float64.

    python bench/gpu_check.py --jsonl checks.jsonl [--budget 120] [--small]

Families: the dense layer through pointer tiles and through TMA tiles (forward + backward: the shrink, the main
GEMM, the dx GEMM and the gradient kernel), dropout (the mask kernel, the dropout shrink, masked dx and gradients),
grouped adapters, a 4-bit (nf4, double quant) base with fp32 adapters, DoRA (the magnitude trained too), and a
block-scaled FP8 base (e4m3, 128 x 128 blocks: ``fp8`` with fp32 scales and adapters in x's dtype; ``fp8-dora`` with
bf16 scales, fp32 adapters and magnitude, and dropout; ``fp8-w8a8`` the W8A8 forward, x quantised per token and
128 channels in the kernel, compared with ``reference.lora_linear_fp8(fp8_activations=True)``, the float64 emulation of
that quantisation; bf16 and fp16 only), and mixture-of-experts ``experts`` (a 3-D weight stored (E,
in, out) as gpt-oss's and read through strides, a bias and a scale per expert, experts without tokens, -1 rows that
must come out zero); each in bf16, fp16, fp32 (ieee) and tf32. Where the autotuner would try many configs,
``forced`` pins one: the first candidate its pruning keeps on the asked path (TMA or pointer), not timed. y, dx, dA,
dB (and DoRA's dm) are compared with ``fastlora.reference`` in float64 on the same inputs (W decoded exactly for the
quantised bases) by relative Frobenius error ||out - ref|| / ||ref||; outputs start NaN (FASTLORA_POISON=1), so an
unwritten element fails. One JSON line per check, written as it finishes; checks not started within ``--budget``
seconds are written as skipped; checks already in the file are not rerun; after a CUDA error that kills the context
the process exits with ``LOST`` (the session starts it again for the rest).
Without CUDA: the interpreter and ``--small`` shapes, bf16 skipped (on CPU it takes the PyTorch reference, not
the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import harness
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
# Relative Frobenius error bounds. fp32 (ieee dots) lands near 1e-7; tf32 near 3e-4 at K ~ 500 (the bound is
# tests/tolerance.py's TF32_TOL); 16-bit inputs and outputs round at 2^-8 / 2^-11.
BOUND = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4, "tf32": 3e-3}
FAMILIES = ("dense-ptr", "dense-tma", "dropout", "grouped", "nf4", "dora", "qdora", "gdora", "fp8", "fp8-dora",
            "fp8-w8a8", "experts")
# W8A8 (fp8_activations) takes 16-bit activations only: its fp32 / tf32 checks are not made
ONLY_16BIT = ("fp8-w8a8",)
# with dropout (the packed mask, the shrink's Philox draw; DoRA's two-accumulator forms): these families
DROPPED = ("dropout", "qdora", "gdora", "fp8-dora")
# Odd sizes: no dimension a multiple of a tile, every stride 16-byte aligned (TMA), K a multiple of the 4-bit
# blocksize (64); for the FP8 base's 128 x 128 blocks, N and K end in partial blocks (392 = 3 x 128 + 8,
# 576 = 4 x 128 + 64).
SHAPE = dict(M=257, K=576, N=392, R=12)
SMALL = dict(M=17, K=64, N=40, R=8)
ADAPTERS = 4
DROPOUT = 0.1
# The experts family: EXPERTS expert weights stored (E, in, out) as gpt-oss does (read through the transposed view's
# strides), a bias and a scaling per expert; ids drawn from ROUTED, so experts 2 and 5 get no token and -1 rows (a
# token routed to no expert held here) must come out all zero.
EXPERTS = 6
ROUTED = (-1, 0, 1, 3, 4)


@dataclass(frozen=True)
class Check:
    family: str
    dtype: str
    M: int
    K: int
    N: int
    R: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.dtype}-M{self.M}-K{self.K}-N{self.N}-R{self.R}"

    @property
    def tma(self) -> bool:
        return self.family == "dense-tma"

    @property
    def p(self) -> float:
        return DROPOUT if self.family in DROPPED else 0.0

    @property
    def grouped(self) -> bool:
        return self.family in ("grouped", "gdora")

    @property
    def four_bit(self) -> bool:
        return self.family in ("nf4", "qdora")

    @property
    def fp8(self) -> bool:
        return self.family in ("fp8", "fp8-dora", "fp8-w8a8")

    @property
    def experts(self) -> bool:
        return self.family == "experts"

    def inputs(self, device) -> dict:
        """Random inputs: x, W, bias, adapters (B nonzero), dy; ids for grouped; the packed W for nf4; the e4m3 W and
        its block scales for fp8; the magnitude for DoRA (grouped: adapter 1 plain, a NaN row)."""
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        dt, M, K, N, R = DTYPES[self.dtype], self.M, self.K, self.N, self.R

        def rand(*shape, scale=1.0, dtype=dt):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        lead = (ADAPTERS,) if self.grouped else (EXPERTS,) if self.experts else ()
        # PEFT's QLoRA keeps its adapters in fp32, as fastlora.LinearFP8 does by default
        adt = torch.float32 if self.four_bit or self.family == "fp8-dora" else dt
        out = dict(x=rand(M, K).requires_grad_(), w=rand(N, K, scale=K ** -0.5), b=rand(N, scale=0.1),
                   a=rand(*lead, R, K, scale=K ** -0.5, dtype=adt).requires_grad_(),
                   bb=rand(*lead, N, R, scale=R ** -0.5, dtype=adt).requires_grad_(), dy=rand(M, N))
        if self.grouped:  # every adapter and some base-only tokens (-1)
            out["ids"] = (torch.randint(-1, ADAPTERS, (M,), generator=g)).to(device)
        if self.experts:  # W [E, N, K] a view of an (E, K, N) storage; a bias and a scaling per expert
            out["w"] = rand(EXPERTS, K, N, scale=K ** -0.5).transpose(1, 2)
            out["b"] = rand(EXPERTS, N, scale=0.1)
            out["s"] = (0.5 + torch.rand(EXPERTS, generator=g)).to(device)
            out["ids"] = torch.tensor(ROUTED)[torch.randint(0, len(ROUTED), (M,), generator=g)].to(device)
        if self.family in ("dora", "qdora", "gdora", "fp8-dora"):  # near ||W + s B A|| per row, as PEFT initialises it
            m = 1.0 + 0.1 * torch.randn(*lead, N, generator=g)
            if self.grouped:
                m[1] = float("nan")  # a plain LoRA adapter among DoRA ones
            out["m"] = m.to(device=device, dtype=adt).requires_grad_()
        if self.four_bit:
            from fastlora import quant

            out["packed"], out["state"] = quant.quantize_4bit(out["w"], blocksize=64, quant_type="nf4",
                                                               double_quant=True)
        if self.fp8:  # DeepSeek-V3's fp32 scales; Qwen's bf16 ones for the DoRA family
            from fastlora import quant

            sdt = torch.bfloat16 if self.family == "fp8-dora" else torch.float32
            out["w8"], out["scale"] = quant.quantize_fp8_blockwise(out["w"], block_size=(128, 128), scale_dtype=sdt)
        return out

    def run(self, t: dict) -> tuple[dict, list[str]]:
        """fastlora's y and gradients (dx, dA, dB, dm) for ``t``, and the configs ``forced`` picked."""
        import fastlora

        s = 2.0
        kw = dict(dropout_p=self.p, training=True, seed=7, magnitude=t.get("m"))
        with harness.allow_tf32(self.dtype == "tf32"), forced(self.tma) as picked:
            if self.grouped or self.experts:
                y = fastlora.grouped_lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], t.get("s", s), t["ids"],
                                                 **kw)
            elif self.four_bit:
                y = fastlora.lora_linear_4bit(t["x"], t["packed"], t["state"], t["b"], t["a"], t["bb"], s,
                                              compute_dtype=DTYPES[self.dtype], **kw)
            elif self.fp8:
                y = fastlora.lora_linear_fp8(t["x"], t["w8"], t["scale"], t["b"], t["a"], t["bb"], s,
                                             fp8_activations=self.family == "fp8-w8a8", **kw)
            else:
                y = fastlora.lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], s, **kw)
            grads = torch.autograd.grad(y, _leaves(t), t["dy"])
        return dict(zip(("y", "dx", "dA", "dB", "dm")[:1 + len(grads)], (y, *grads), strict=True)), picked

    def reference(self, t: dict) -> dict:
        """The same outputs from ``fastlora.reference`` in float64 (W decoded exactly for nf4 and fp8; dropout with
        the mask the kernels draw)."""
        import fastlora
        from fastlora import quant, reference

        def f64(v):
            return v.detach().double().requires_grad_(v.requires_grad)

        x, a, bb, b = f64(t["x"]), f64(t["a"]), f64(t["bb"]), f64(t["b"])
        leaves = [x, a, bb] + ([f64(t["m"])] if "m" in t else [])
        if self.four_bit:
            w = quant.dequantize_4bit(t["packed"], t["state"], dtype=torch.float64)
        elif self.fp8:
            w = quant.dequantize_fp8_blockwise(t["w8"], t["scale"], block_size=(128, 128), dtype=torch.float64)
        else:
            w = f64(t["w"])
        s = 2.0
        mask = fastlora.dropout_mask(t["x"].shape, DROPOUT, 7, t["x"].device) if self.p else None
        kw = dict(dropout_p=self.p, training=True, dropout_mask=mask)
        if self.grouped and "m" in t:
            y = reference.grouped_dora_linear(x, w, b, a, bb, s, t["ids"], leaves[-1], **kw)
        elif self.grouped:
            y = reference.grouped_lora_linear(x, w, b, a, bb, s, t["ids"], **kw)
        elif self.experts:
            y = reference.grouped_lora_linear(x, w, b, a, bb, t["s"].double(), t["ids"], **kw)
        elif self.family == "fp8-w8a8":  # the kernel's activation quantisation, emulated in float64
            y = reference.lora_linear_fp8(x, t["w8"], t["scale"], b, a, bb, s, fp8_activations=True, **kw)
        elif "m" in t:
            y = reference.dora_linear(x, w, b, a, bb, s, leaves[-1], **kw)
        else:
            y = reference.lora_linear(x, w, b, a, bb, s, **kw)
        grads = torch.autograd.grad(y, leaves, t["dy"].double())
        return dict(zip(("y", "dx", "dA", "dB", "dm")[:1 + len(grads)], (y, *grads), strict=True))


def _leaves(t: dict) -> list[torch.Tensor]:
    """What the check differentiates: x, the adapters and, for DoRA, the magnitude."""
    return [t["x"], t["a"], t["bb"], *([t["m"]] if "m" in t else [])]


def checks(small: bool) -> list[Check]:
    shape = SMALL if small else SHAPE
    return [Check(family, dtype, **shape) for dtype in DTYPES for family in FAMILIES
            if not (family in ONLY_16BIT and dtype in ("fp32", "tf32"))]


@contextlib.contextmanager
def forced(tma: bool):
    """fastlora's autotuned kernels run one config per key, untimed: the first that pruning keeps with
    ``USE_TMA == tma`` (else the first kept: no TMA tile fits the FMA path). Yields the picks as they are made
    (none under the interpreter, whose launchers take a default config). ``bench/gpu_cache.py`` compiles these."""
    from fastlora import _configs

    tuners = (_configs._gemm_tuned, _configs._shrink_tuned, _configs._grad_tuned)
    saved = [dict(t.__dict__) for t in tuners]

    picked: list[str] = []

    def pick(name, prune):
        def one(kwargs):
            kept = prune(kwargs)
            on_path = [c for c in kept if bool(c.kwargs.get("USE_TMA")) == tma]
            picked.append(f"{name}: {(on_path or kept)[0]}")
            return [(on_path or kept)[0]]
        return one

    for name, t in zip(("gemm", "shrink", "grad"), tuners, strict=True):
        t.prune_configs = pick(name, t.prune_configs)
        t.do_bench = lambda fn, quantiles: [0.0, 0.0, 0.0]  # one candidate: nothing to time
        t.cache = {}
    try:
        yield picked
    finally:
        for t, d in zip(tuners, saved, strict=True):
            t.__dict__.clear()
            t.__dict__.update(d)


def rel_fro(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds a non-finite value (unwritten or overflowed)."""
    a, e = out.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom or 1.0)


def run_check(c: Check, device) -> dict:
    t0 = time.perf_counter()
    rec = dict(asdict(c), name=c.name, bound=BOUND[c.dtype], status="fail", errors={})
    try:
        t = c.inputs(device)
        got, rec["configs"] = c.run(t)
        want = c.reference(t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rec["errors"] = {k: rel_fro(got[k], want[k]) for k in got}
        rec["status"] = "pass" if all(e <= rec["bound"] for e in rec["errors"].values()) else "fail"
    except Exception as exc:  # a launch error, an illegal address: recorded, the next check still runs
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", required=True, help="append one JSON record per check here")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds; later checks are skipped")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the interpreter's dry run)")
    args = ap.parse_args(argv)
    import gpu_cache

    gpu_cache.activate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deadline = time.monotonic() + args.budget
    failed = 0
    done = set()
    if os.path.exists(args.jsonl):  # a rerun after a lost CUDA context or a crash: the checks not yet recorded
        with open(args.jsonl) as f:
            done = {json.loads(line)["name"] for line in f if line.strip()}
    with open(args.jsonl, "a") as f:
        for c in checks(args.small or device.type == "cpu"):
            if c.name in done:
                continue
            if time.monotonic() > deadline:
                rec = dict(asdict(c), name=c.name, status="skipped", reason=f"stage budget {args.budget:g} s spent")
            elif device.type == "cpu" and c.dtype == "bf16":
                rec = dict(asdict(c), name=c.name, status="skipped",
                           reason="interpreter: bf16 takes the PyTorch reference (functional._use_kernels)")
            else:
                rec = run_check(c, device)
            failed += rec["status"] == "fail"
            errs = " ".join(f"{k} {v:.2e}" for k, v in rec.get("errors", {}).items())
            print(f"{rec['status']:<7} {c.name:<40} {errs} {rec.get('error', rec.get('reason', ''))}", flush=True)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if rec.get("error") and device.type == "cuda" and not _cuda_alive():
                print("CUDA context lost (an illegal address?): exit 3, the session reruns the rest", flush=True)
                return LOST
    return 1 if failed else 0


LOST = 3  # exit code: the CUDA context died, later checks in this process would all fail


def _cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").item() == 1.0
    except Exception:
        return False


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
