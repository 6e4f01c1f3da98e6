"""The MoE experts benchmark (bench/bench_moe.py), its static and correctness tiers (bench/sm90.py's moe calls,
bench/gpu_check.py's experts family) and its memory accounting: every competitor agrees with the float32 reference
through the suite's own check before anything is timed, the check fails on a wrong result, the grids hold issue 43's
cells, and the whole smoke suite runs through bench/run.py."""

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

import bench_moe  # noqa: E402
import competitors  # noqa: E402
import gpu_check  # noqa: E402
import harness  # noqa: E402

pytest.importorskip("transformers")
RUN = [i for i in competitors.MOE if i != "peft-baddbmm"]  # peft-baddbmm: see test_peft_baddbmm_is_named_not_run
TINY = ("tiny-qwen3", "tiny-gpt-oss")


def _built(mode, dtype, shape, impl, T=13):
    case = bench_moe.Case(mode, dtype, shape, 4, T, impl)
    mp = competitors.MoeProblem(case.dims, case.R, harness.DTYPES[dtype], harness.device(), seed=3)
    return case, mp, competitors.moe_impl(impl, mp, case.train), bench_moe._ring(case, mp).items[0]


# fp32 for every competitor; fp16 for the two built here (fastlora's kernels, the split composition)
MATRIX = [(mode, impl, dtype, shape) for mode in bench_moe.MODES for impl in RUN for dtype in ("fp32", "fp16")
          for shape in TINY if dtype == "fp32" or impl in ("fastlora", "split")]


@pytest.mark.parametrize("mode,impl,dtype,shape", MATRIX, ids=["-".join(m) for m in MATRIX])
def test_competitor_matches_reference(mode, impl, dtype, shape):
    if impl.startswith("peft"):
        pytest.importorskip("peft")
    case, mp, built, entry = _built(mode, dtype, shape, impl)
    errs = bench_moe._check(case, mp, built, entry)
    n = (6 if impl != "experts" else 2) if case.train else 0
    assert list(errs) == ["y", *bench_moe.GRADS[:n]], errs
    bound = 1e-4 if dtype == "fp32" else 4e-3
    assert all(e < bound for e in errs.values()), errs
    if impl in ("experts", "peft"):
        assert built.info["experts_implementation"] == competitors.base_implementation(str(mp.device), mp.dtype)


@pytest.mark.parametrize("impl", ["fastlora", "split", "experts"])
def test_check_fails_on_a_wrong_result(impl, monkeypatch):
    """The check can fail: the reference's down_proj adapter B doubled after the competitor copied it (the LoRA
    competitors), or the reference's activation scaled (the base experts alone)."""
    case, mp, built, entry = _built("train", "fp32", "tiny-gpt-oss", impl)
    if impl == "experts":
        gate = mp.gate
        monkeypatch.setattr(mp, "gate", lambda h: 1.01 * gate(h))
    else:
        mp.adapters["down_proj"][1].mul_(2)
    with pytest.raises(AssertionError, match="relative error"):
        bench_moe._check(case, mp, built, entry)


def test_idle_experts(monkeypatch):
    """Every token on experts 0 and 1 of the tiny gpt-oss block (experts 2 and 3 get none): the competitors agree."""
    case, mp, _, _ = _built("train", "fp32", "tiny-gpt-oss", "fastlora")
    routing = mp.routing

    def two_experts(T, seed):
        index, weights = routing(T, seed)
        return torch.stack([torch.zeros_like(index[:, 0]), torch.ones_like(index[:, 1])], 1), weights
    monkeypatch.setattr(mp, "routing", two_experts)
    entry = bench_moe._ring(case, mp).items[0]
    assert set(entry[1].unique().tolist()) == {0, 1}
    for impl in ("fastlora", "split", "experts"):
        built = competitors.moe_impl(impl, mp, True)
        errs = bench_moe._check(dataclasses.replace(case, impl=impl), mp, built, entry)
        assert all(e < 1e-4 for e in errs.values()), (impl, errs)


def test_peft_baddbmm_is_named_not_run():
    """peft 0.21's target_parameters already folds with baddbmm and has no option to choose it: the cell is skipped
    as not applicable (no PEFT banner in run.py), the reason naming the installed version."""
    peft = pytest.importorskip("peft")
    reason = competitors.peft_baddbmm_skip()
    assert reason.startswith(harness.NOT_APPLICABLE) and f"peft {peft.__version__}" in reason
    from peft.tuners.lora.layer import ParamWrapper

    assert ("already folds" in reason) == hasattr(ParamWrapper, "get_delta_factors")


def test_step_memory_counts_new_storages_while_alive():
    w = torch.randn(256, 256)
    before = harness.step_memory(lambda: w.t()[1:])[1]  # a view of a tensor made before: nothing new
    assert before == 0

    def step():
        a = torch.empty(1000)  # 4000 B, freed before b
        del a
        b = torch.empty(500)  # 2000 B
        c = b.view(10, 50).add_(1)  # in place on b: nothing new
        return c

    assert harness.step_memory(step) == (None, 4000, harness.CPU_MEMORY)


@pytest.mark.parametrize("mode", bench_moe.MODES)
def test_peft_step_holds_a_stack_sized_tensor_fastlora_does_not(mode):
    """issue 43, item 3, seen in the bench's memory column: PEFT's target_parameters builds W + s B A for the whole
    expert stack (gate_up's E x 2I x H elements) inside the step; fastlora's step stays below one stack's bytes."""
    pytest.importorskip("peft")
    stack = {}
    for impl in ("peft", "fastlora"):
        case, mp, built, entry = _built(mode, "fp32", "tiny-qwen3", impl, T=3)
        stack[impl] = harness.step_memory(lambda built=built, case=case, entry=entry:
                                          bench_moe._step(built, case.train)(entry))[1]
    E, N, K = mp.dims["gate_up_proj"]
    assert stack["peft"] >= E * N * K * 4 > stack["fastlora"], stack


def _grid_cells(monkeypatch, name):
    monkeypatch.setenv("FASTLORA_BENCH_GRID", name)
    monkeypatch.delenv("FASTLORA_BENCH_DTYPES", raising=False)
    return bench_moe._cases()


def test_default_grid_holds_issue_43s_cells(monkeypatch):
    qwen, gpt = harness.MOE_SHAPES["qwen3-30b-a3b"], harness.MOE_SHAPES["gpt-oss-20b"]
    assert (qwen.E, qwen.H, qwen.inter, qwen.k, qwen.layout) == (128, 2048, 768, 8, "qwen3")  # PEFT #3577's
    assert (gpt.E, gpt.H, gpt.inter, gpt.k, gpt.layout) == (32, 2880, 2880, 4, "gpt-oss")
    cells = _grid_cells(monkeypatch, "default")
    want = {(mode, "bf16", shape, 16, 4096, impl) for mode in ("fwd", "train") for shape in (qwen.name, gpt.name)
            for impl in ("experts", "peft", "peft-baddbmm", "split", "fastlora")}
    assert {dataclasses.astuple(c) for c in cells} == want and len(cells) == len(want)
    assert all(c.id.startswith("moe-") for c in cells) and len({c.id for c in cells}) == len(cells)
    quick = _grid_cells(monkeypatch, "quick")
    assert 1 <= len(quick) <= 2 and {dataclasses.astuple(c) for c in quick} <= want
    assert {c.impl for c in quick} == {"experts", "fastlora"}  # the 1.15x target's two sides
    smoke = _grid_cells(monkeypatch, "smoke")
    assert {c.shape for c in smoke} == set(TINY) and {c.impl for c in smoke} == set(competitors.MOE)


def test_quick_grid_kernels_are_in_the_session_calls(monkeypatch):
    """The carried kernel cache is built from gpu_cache.quick_calls: it must drive the quick fastlora cells' expert
    calls (gate_up and down over T * k rows, the layout's bias and strides, forward or training)."""
    import gpu_cache

    calls = {(c.dtype, c.M, c.K, c.N, c.r, c.train, c.bias, c.transposed, c.experts)
             for c in gpu_cache.quick_calls() if c.experts}
    quick = [c for c in _grid_cells(monkeypatch, "quick") if c.impl == "fastlora"]
    assert quick
    for c in quick:
        s, gpt = c.dims, c.dims.layout == "gpt-oss"
        for K, N in ((s.H, 2 * s.inter), (s.inter, s.H)):
            assert (c.dtype, c.T * s.k, K, N, c.R, c.train, gpt, gpt, s.E) in calls, c.id


def test_sm90_moe_tier_and_ci_take_the_bench_shapes():
    sm90 = pytest.importorskip("sm90")
    moe = sm90.cases("moe")
    want = {(s.E, K, N, M, s.layout == "gpt-oss", train)
            for s in (harness.MOE_SHAPES["qwen3-30b-a3b"], harness.MOE_SHAPES["gpt-oss-20b"])
            for K, N in ((s.H, 2 * s.inter), (s.inter, s.H)) for M in (4096 * s.k, 16) for train in (False, True)}
    assert {(c.experts, c.K, c.N, c.M, c.transposed, c.train) for c in moe} == want
    assert all(c.dtype == "bf16" and c.r == 16 and c.p == 0 and c.bias == c.transposed for c in moe)
    assert {c for c in sm90.cases("ci") if c.experts} == set(moe)


def test_gpu_check_has_the_experts_family():
    small = [c for c in gpu_check.checks(small=True) if c.experts]
    assert {(c.family, c.dtype) for c in small} == {("experts", d) for d in gpu_check.DTYPES}
    t = small[0].inputs(harness.device())
    E = gpu_check.EXPERTS
    assert t["w"].shape == (E, small[0].N, small[0].K) and t["w"].stride(1) == 1  # an (E, in, out) storage
    assert set(t["ids"].tolist()) <= set(gpu_check.ROUTED) and -1 in gpu_check.ROUTED
    assert set(range(E)) - set(gpu_check.ROUTED)  # experts that get no token


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "tf32"])
def test_gpu_check_experts_family_passes_and_can_fail(dtype):
    c = gpu_check.Check("experts", dtype, **gpu_check.SMALL)
    rec = gpu_check.run_check(c, harness.device())
    assert rec["status"] == "pass", rec
    assert set(rec["errors"]) == {"y", "dx", "dA", "dB"}
    assert all(0 < e <= rec["bound"] for e in rec["errors"].values()), rec
    t = c.inputs(harness.device())
    got, _ = c.run(t)
    t["s"] = t["s"].flip(0)  # the reference scales each expert by another's scaling: the check must see it
    want = c.reference(t)
    assert gpu_check.rel_fro(got["y"], want["y"]) > rec["bound"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke grid is the no-CUDA path")
def test_smoke_suite_runs_through_the_main_job(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # run.py decides: no CUDA, so the interpreter
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "moe", "--no-plot",
                           "--results", str(tmp_path), "--name", "moe"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "HEADLINE COMPETITOR" not in proc.stdout  # the not-applicable peft-baddbmm cells raise no PEFT banner
    assert "peft-baddbmm: 4 cells: not applicable: " in proc.stdout
    benches = json.loads((tmp_path / "moe.json").read_text())["benchmarks"]
    rows = {(b["extra_info"]["impl"], b["extra_info"]["mode"], b["extra_info"]["shape"]): b["extra_info"]
            for b in benches}
    assert set(rows) == {(i, m, s) for i in RUN for m in bench_moe.MODES for s in TINY}
    for key, info in rows.items():
        assert info["suite"] == "moe" and info["median_ms"] > 0 and info["git_sha"], key
        assert info["ratio_to_experts"] > 0 and info["extra_mem_bytes"] > 0, key
        assert info["memory_method"] == harness.CPU_MEMORY and info["peak_mem_bytes"] is None, key
        assert set(info["rel_err"]) == {"y", *(bench_moe.GRADS[:2 if key[0] == "experts" else 6]
                                               if key[1] == "train" else ())}, key
    for m in bench_moe.MODES:
        for s in TINY:
            assert rows[("fastlora", m, s)]["speedup_over_peft"] > 0 and rows[("fastlora", m, s)]["ratio_to_split"] > 0
            assert rows[("peft", m, s)]["peft_fold"] == "baddbmm"
