"""The FP8-base benchmark (bench/bench_fp8.py) and the GPU check's FP8 families (bench/gpu_check.py): every competitor
agrees with the float32 reference on the dequantised W through the bench's own check before anything is timed, the
check fails on a wrong decode, the grids hold issue 45's cells, and the whole smoke suite runs through bench/run.py."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_fp8  # noqa: E402
import competitors  # noqa: E402
import gpu_check  # noqa: E402
import harness  # noqa: E402

# (K, N): partial 128 x 128 edge blocks in both (two blocks each, the second cut), so the fp8-dequant baseline takes
# quant.dequantize_fp8_blockwise; whole blocks, so it takes its broadcast decode
SHAPES = {"partial": (200, 136), "whole": (256, 128)}


def _built(mode, dtype, shape, impl):
    case = bench_fp8.Case(mode, dtype, *SHAPES[shape], 4, 9, impl)
    pb = competitors.Problem(case.K, case.N, case.R, harness.DTYPES[dtype], harness.device(), seed=3)
    fp = competitors.FP8Problem(pb)
    x, dy = harness.input_ring(case.M, case.K, case.N, pb.dtype, case.train).items[0]
    return case, fp, competitors.fp8_impl(impl, fp, case.train), x, dy


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("impl", competitors.FP8)
@pytest.mark.parametrize("mode", bench_fp8.MODES)
def test_competitor_matches_reference(mode, impl, dtype, shape):
    if impl == "fp8-w8a8" and dtype == "fp32":
        with pytest.raises(ValueError, match="fp8_activations"):  # refused by fastlora, skipped by the suite
            _built(mode, dtype, shape, impl)[2].forward(torch.randn(9, SHAPES[shape][0]))
        assert bench_fp8.w8a8_unavailable(torch.float32, torch.device("cpu"))
        return
    case, fp, built, x, dy = _built(mode, dtype, shape, impl)
    errs = bench_fp8._check(case, fp, built, x, dy)
    want = {"y"} | ({"dx"} if case.train else set()) | ({"dA", "dB"} if case.train and impl != "linear" else set())
    assert set(errs) == want, errs
    bound = 1e-4 if dtype == "fp32" else 4e-3
    assert all(e < bound for e in errs.values()), errs
    resident = fp.w_bytes if impl.startswith("fp8") else case.N * case.K * fp.W.element_size()
    assert built.info["weight_bytes"] == resident
    if impl == "fp8-dequant":
        assert built.info["dequantized_by"].startswith("torch" if shape == "whole" else "fastlora.quant")


@pytest.mark.parametrize("impl", ["fp8-fastlora", "fp8-dequant"])
def test_check_fails_on_a_wrong_decode(impl):
    """The check can fail: one block's scale doubled after the reference's W was decoded."""
    case, fp, built, x, dy = _built("fwd", "fp32", "partial", impl)
    fp.scale[1, 0] *= 2
    built = competitors.fp8_impl(impl, fp, case.train)
    with pytest.raises(AssertionError, match="relative error"):
        bench_fp8._check(case, fp, built, x, dy)


def test_fp8_problem_keeps_half_the_bf16_base():
    pb = competitors.Problem(512, 384, 4, torch.bfloat16, torch.device("cpu"))
    fp = competitors.FP8Problem(pb)
    assert fp.weight.dtype == torch.float8_e4m3fn and fp.scale.shape == (3, 4) and fp.scale.dtype == torch.float32
    assert fp.w_bytes == 512 * 384 + 12 * 4 and fp.W.dtype == torch.bfloat16 and fp.W32.dtype == torch.float32
    assert fp.A.dtype == fp.B.dtype == torch.float32  # adapters fp32, as PEFT and fastlora.LinearFP8 keep them


def test_unknown_competitor_is_named():
    fp = competitors.FP8Problem(competitors.Problem(64, 32, 4, torch.float32, torch.device("cpu")))
    with pytest.raises(ValueError, match="unknown FP8 competitor 'peft'"):
        competitors.fp8_impl("peft", fp, False)


def _grid_cells(monkeypatch, name):
    monkeypatch.setenv("FASTLORA_BENCH_GRID", name)
    monkeypatch.delenv("FASTLORA_BENCH_DTYPES", raising=False)
    return bench_fp8._cases()


def test_default_grid_holds_issue_45s_cells(monkeypatch):
    cells = _grid_cells(monkeypatch, "default")
    want = {(mode, "bf16", K, N, R, M, impl) for mode in ("fwd", "train")
            for K, N in ((4096, 4096), (4096, 14336), (14336, 4096)) for R in (16, 64) for M in (4096, 16384)
            for impl in ("linear", "fastlora-lora", "fp8-dequant", "fp8-fastlora", "fp8-w8a8")}
    assert {dataclasses.astuple(c) for c in cells} == want and len(cells) == len(want)
    assert all(c.id.startswith("fp8-") for c in cells) and len({c.id for c in cells}) == len(cells)
    quick = _grid_cells(monkeypatch, "quick")
    assert 0 < len(quick) < len(cells) and {dataclasses.astuple(c) for c in quick} <= want


def test_quick_grid_kernels_are_in_the_session_calls(monkeypatch):
    """The carried kernel cache is built from gpu_cache.quick_calls: it must drive the FP8 cells' calls (fp32
    adapters, over the FP8 base and over the dequantised W, forward and training)."""
    import gpu_cache

    quick = _grid_cells(monkeypatch, "quick")
    calls = {(c.dtype, c.M, c.K, c.N, c.r, c.train, c.quant) for c in gpu_cache.quick_calls() if c.fp32_adapters}
    for c in quick:
        if c.impl in ("fastlora-lora", "fp8-fastlora"):
            quant = "fp8" if c.impl == "fp8-fastlora" else ""
            assert (c.dtype, c.M, c.K, c.N, c.R, c.train, quant) in calls, c.id


def test_gpu_check_has_the_fp8_families():
    small = [c for c in gpu_check.checks(small=True) if c.fp8]
    assert {(c.family, c.dtype) for c in small} == {(f, d) for f in ("fp8", "fp8-dora") for d in gpu_check.DTYPES} | {
        ("fp8-w8a8", "bf16"), ("fp8-w8a8", "fp16")}
    assert all(c.p == (gpu_check.DROPOUT if c.family == "fp8-dora" else 0.0) for c in small)
    big = gpu_check.SHAPE
    assert big["K"] % 128 and big["N"] % 128 and big["K"] > 128 and big["N"] > 128  # partial edge blocks, several


@pytest.mark.parametrize("family", ["fp8", "fp8-dora"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32", "tf32"])
def test_gpu_check_fp8_family_passes_and_can_fail(family, dtype):
    c = gpu_check.Check(family, dtype, **gpu_check.SMALL)
    rec = gpu_check.run_check(c, harness.device())
    assert rec["status"] == "pass", rec
    assert set(rec["errors"]) == {"y", "dx", "dA", "dB"} | ({"dm"} if family == "fp8-dora" else set())
    assert all(0 < e <= rec["bound"] for e in rec["errors"].values()), rec
    t = c.inputs(harness.device())
    got, _ = c.run(t)
    t["scale"] = t["scale"] * 1.25  # the reference decodes another W: the check must see it
    want = c.reference(t)
    assert gpu_check.rel_fro(got["y"], want["y"]) > rec["bound"]


def test_gpu_check_w8a8_family_passes_and_can_fail():
    """The W8A8 check against the float64 emulation of the kernel's activation quantisation (fp16 on CPU); the exact
    (unquantised-x) reference is further off than the bound, so the check compares with the right oracle."""
    c = gpu_check.Check("fp8-w8a8", "fp16", **gpu_check.SMALL)
    rec = gpu_check.run_check(c, harness.device())
    assert rec["status"] == "pass", rec
    assert set(rec["errors"]) == {"y", "dx", "dA", "dB"} and all(0 < e <= rec["bound"] for e in rec["errors"].values())
    t = c.inputs(harness.device())
    got, _ = c.run(t)
    t["scale"] = t["scale"] * 1.25
    assert gpu_check.rel_fro(got["y"], c.reference(t)["y"]) > rec["bound"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke grid is the no-CUDA path")
def test_smoke_suite_runs_through_the_main_job(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # run.py decides: no CUDA, so the interpreter
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "fp8", "--no-plot",
                           "--results", str(tmp_path), "--name", "fp8"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benches = json.loads((tmp_path / "fp8.json").read_text())["benchmarks"]
    rows = {b["extra_info"]["impl"] + "-" + b["extra_info"]["mode"]: b["extra_info"] for b in benches}
    assert set(rows) == {f"{i}-{m}" for i in competitors.FP8 for m in bench_fp8.MODES}
    for key, info in rows.items():
        assert info["suite"] == "fp8" and info["median_ms"] > 0 and info["git_sha"], key
        assert set(info["rel_err"]) >= {"y"} and info["ratio_to_linear"] > 0, key
        assert (info["ratio_to_fastlora_lora"] is None) == key.startswith("linear-"), key
    for mode in bench_fp8.MODES:
        assert rows[f"fp8-fastlora-{mode}"]["speedup_over_unfused"] > 0
        assert rows[f"fp8-fastlora-{mode}"]["weight_bytes"] < rows[f"fastlora-lora-{mode}"]["weight_bytes"]
