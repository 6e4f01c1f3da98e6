"""Static compile checks for the H100 (sm_90) and A100 (sm_80), no GPU needed: ``bench/sm90.py --tier ci``.

Every kernel variant that fastlora's public calls launch (dense and grouped, dropout and bias on and off,
forward and backward, bf16/fp16/fp32 (tf32 and ieee), r in {16, 64, 256}, every autotune config the pruning
keeps) is compiled for the target and must not fail to compile, spill registers or exceed the per-block shared
memory; on sm_90 GEMM tiles with BLOCK_M >= 64 must use wgmma and every kernel must pipeline its loads (cp.async
or TMA).
The report runs in a subprocess without TRITON_INTERPRET, which conftest sets for this process.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from fastlora._configs import FMA_PTXAS_OPTIONS

BENCH = Path(__file__).resolve().parent.parent / "bench"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.fixture(scope="module")
def sm90():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("sm90")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
def test_compile_report(sm90, capability, tmp_path):
    missing = [t for t in ("ptxas", "cuobjdump") if not (TOOLS / t).exists()]
    if missing:
        pytest.skip(f"the triton wheel lacks {', '.join(missing)} in {TOOLS}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_POISON")}
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(BENCH / "sm90.py"), "--tier", "ci", "--capability", str(capability),
           "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    records = json.loads(out.read_text())
    failures = sm90.check(records, capability)
    summary = proc.stdout.strip().splitlines()[-2]
    assert not failures, f"{summary}\n{len(failures)} failing variants:\n" + "\n".join(failures)
    # the FMA path's ptxas option reaches the compiler (Triton's ptx_options), and only there and, before Hopper, an
    # FP8 W's launches
    gemm = [r for r in records if r["kernel"] == "_lora_gemm_kernel"]
    one_block = [r for r in gemm if sm90.is_fma(r) or (capability < 90 and r["constexprs"].get("W_FORMAT") == 3)]
    assert one_block and all(FMA_PTXAS_OPTIONS in (r["ptx_options"] or "") for r in one_block)
    assert not any(FMA_PTXAS_OPTIONS in (r["ptx_options"] or "") for r in gemm if r not in one_block)


# fp32 with input_precision 'ieee': FMA dots (no wgmma expected), no stack allowed either.
FMA = dict(case="dense-train-p0 fp32 M4096-K4096-N4096-R16", wgmma=0,
           constexprs={"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "INPUT_PRECISION": "ieee"})


def _record(**changes):
    rec = dict(kernel="_lora_gemm_kernel", capability=90, case="dense-train-p0 bf16 M4096-K4096-N4096-R16",
               constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "HAS_BIAS": True}, num_warps=8,
               num_stages=3, regs=168, spill_bytes=0, loop_spills=0, shared=98304, wgmma=8, mma_sync=0, cp_async=0,
               tma=6, error=None)
    return {**rec, **changes}


@pytest.mark.parametrize("capability, changes, expected", [
    (90, {}, None),
    (80, {"wgmma": 0, "mma_sync": 16, "tma": 0, "cp_async": 12}, None),
    (90, {"constexprs": {"BLOCK_M": 32}, "wgmma": 0, "mma_sync": 8}, None),
    (90, {"spill_bytes": 16}, "SPILL"),
    (80, {"spill_bytes": 16}, "SPILL"),
    (90, {"shared": 232448 + 1}, "SMEM"),
    (80, {"shared": 200000}, "SMEM"),
    (90, {"wgmma": 0, "mma_sync": 16}, "NO-WGMMA"),
    (90, {"tma": 0}, "NO-PIPELINE"),
    (90, {"error": "CompilationError: out of resource"}, "ERROR"),
    (90, FMA, None),
    (90, {**FMA, "spill_bytes": 8}, "SPILL"),
    (90, {**FMA, "spill_bytes": 16, "loop_spills": 2}, "SPILL"),
    (90, {"constexprs": {"BLOCK_M": 128, "INPUT_PRECISION": "ieee"}, "wgmma": 0, "mma_sync": 16}, "NO-WGMMA"),
    (90, {"case": "dense-train-p0 fp32-tf32 M4096-K4096-N4096-R16", "spill_bytes": 16,
          "constexprs": {"BLOCK_M": 128, "INPUT_PRECISION": "tf32"}}, "SPILL"),
    (90, {"constexprs": {"BLOCK_M": 128, "X_FORMAT": 1}, "wgmma": 5, "wgmma_e4m3": 4}, None),
    (90, {"constexprs": {"BLOCK_M": 128, "X_FORMAT": 1}, "wgmma": 5, "wgmma_e4m3": 0}, "NO-E4M3"),
], ids=["clean", "clean-sm80", "small-tile-mma-sync", "spill", "spill-sm80", "smem", "smem-sm80", "no-wgmma",
        "no-pipeline", "error", "fma-clean", "fma-stack", "fma-spill-in-k-loop", "bf16-ieee-no-wgmma",
        "tf32-spill", "w8a8-e4m3", "w8a8-without-e4m3"])
def test_check_fails_on_bad_records(sm90, capability, changes, expected):
    failures = sm90.check([_record(**changes)], capability)
    if expected is None:
        assert failures == []
    else:
        assert len(failures) == 1 and failures[0].startswith(expected), failures


def test_check_fails_when_nothing_compiled(sm90):
    assert sm90.check([], 90)


def _sass(*lines: str) -> str:
    """cuobjdump-style SASS: one instruction per 16-byte slot from address 0."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))


def test_loop_spills_counts_only_the_k_loops(sm90):
    sass = _sass(
        "STL [R1], R0",  # 0x00: before the loops (cold)
        "FFMA R2, R3, R4, R2",  # 0x10: outer loop (tiles) starts; K loop below
        "LDL R5, [R1]",  # 0x20: inside the K loop
        "FFMA R6, R7, R8, R6",  # 0x30
        "@!P0 BRA 0x20",  # 0x40: K loop back edge
        "LDL R9, [R1+0x4]",  # 0x50: epilogue, outer loop only
        "@P1 BRA 0x10",  # 0x60: outer loop back edge
        "EXIT",
    )
    assert sm90.loop_spills(sass) == 1
    assert sm90.loop_spills(_sass("STL [R1], R0", "FFMA R2, R3, R4, R2", "@!P0 BRA 0x10", "LDL R0, [R1]")) == 0
    assert sm90.loop_spills(_sass("STL [R1], R0", "IADD3 R2, R2, 0x1, RZ", "LDL R0, [R1]", "@!P0 BRA 0x10")) == 0
    # an fp8 wgmma (W8A8) makes its loop a K loop too
    qgmma = "QGMMA.64x128x32.F32.E4M3.E4M3 R24, R152, gdesc[UR28], R24"
    assert sm90.loop_spills(_sass("STL [R1], R0", qgmma, "LDL R0, [R1]", "@!P0 BRA 0x10")) == 1
