"""The DoRA benchmark's competitors (bench/dora_impls.py) agree with the float64-checked reference before anything
is timed: each one's output and gradients (x, A, B, magnitude) against fastlora.reference.dora_linear on the same
dropout mask, through the bench's own check (``bench_dora._check``), at a small odd shape on CPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_dora  # noqa: E402
import competitors  # noqa: E402
import dora_impls  # noqa: E402
import harness  # noqa: E402

MODES = ("fwd", "train", "train-drop0.2")


@pytest.mark.parametrize("impl", dora_impls.DORA)
@pytest.mark.parametrize("mode", MODES)
def test_competitor_matches_reference(mode, impl):
    if impl.startswith("peft"):
        pytest.importorskip("peft")
    case = bench_dora.Case(mode, "fp32", 40, 24, 4, 9, impl)
    if case.train and impl in dora_impls.INFERENCE_ONLY:
        pytest.skip("inference-only competitor")
    pb = competitors.Problem(case.K, case.N, case.R, torch.float32, harness.device(), seed=3)
    m = dora_impls.magnitude(pb)
    built = dora_impls.dora_impl(impl, pb, m, case.dropout, case.train)
    x, dy = harness.input_ring(case.M, case.K, case.N, torch.float32, case.train).items[0]
    errs = bench_dora._check(case, pb, m, built, x, dy)
    want = {"y"} | ({"dx"} if case.train else set())
    if case.train and impl != "linear":
        want |= {"dA", "dB"} | ({"dm"} if impl not in ("fastlora-lora",) else set())
    assert set(errs) == want and all(e < 1e-4 for e in errs.values()), errs


def test_composed_differs_from_lora():
    """The check can fail: DoRA's magnitude moves the output away from plain LoRA's."""
    pb = competitors.Problem(40, 24, 4, torch.float32, harness.device(), seed=3)
    m = dora_impls.magnitude(pb)
    x = torch.randn(9, 40)
    dora = dora_impls.dora_impl("composed", pb, m, 0.0, False).forward(x)
    lora = dora_impls.dora_impl("fastlora-lora", pb, m, 0.0, False).forward(x)
    assert harness.rel_err(dora, lora) > 1e-2


@pytest.mark.parametrize("impl", list(dora_impls.QDORA))
@pytest.mark.parametrize("mode", ("fwd", "train"))
def test_qdora_competitor_matches_reference(mode, impl):
    """The QDoRA cells: each competitor over the 4-bit base against reference.dora_linear on W decoded in fp32."""
    if impl == "qdora-peft":
        pytest.importorskip("peft")
        if harness.bnb_unavailable():
            pytest.skip(harness.bnb_unavailable())
        if mode == "fwd" and not harness.CUDA:
            pytest.skip("bitsandbytes' CPU inference path repacks the weight before PEFT's DoRA dequantises it")
    case = bench_dora.Case(mode, "fp32", 64, 24, 4, 9, impl, "nf4")
    qp, m = bench_dora._problem(case)
    built = bench_dora._impl(case, impl)
    x, dy = harness.input_ring(case.M, case.K, case.N, torch.float32, case.train).items[0]
    errs = bench_dora._check(case, qp, m, built, x, dy)
    want = {"y"} | ({"dx"} if case.train else set())
    if case.train and impl != "linear":
        want |= {"dA", "dB"} | ({"dm"} if impl.startswith("qdora") else set())
    assert set(errs) == want and all(e < 1e-4 for e in errs.values()), errs
