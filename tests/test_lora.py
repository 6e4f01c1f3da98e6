"""Fused single-adapter LoRA: forward and every gradient against the float64 reference (tier A: interpreter)."""

import pytest
import torch
from helpers import case_id, make_dense, run_dense
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerance import assert_close

import fastlora

NAMES = ("y", "dx", "dA", "dB")
# (M, K, N, R): odd sizes that are multiples of no block, M = 1, r = 1 and r = 64 (BLOCK_R padding both ways)
SHAPES = [(1, 33, 40, 1), (17, 130, 96, 8), (63, 70, 50, 12), (40, 64, 48, 64), (3, 16, 200, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,R", SHAPES, ids=[case_id(M=m, K=k, N=n, R=r) for m, k, n, r in SHAPES])
def test_matches_reference(M, K, N, R, dtype, device):
    outs, refs = run_dense(*make_dense(M, K, N, R, dtype, device), 0.75)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)


@pytest.mark.parametrize("scaling", [0.0, -1.5, 16.0])
def test_scaling_values_and_no_bias(scaling, device):
    outs, refs = run_dense(*make_dense(19, 45, 37, 4, torch.float32, device, bias=False), scaling)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_zero_scaling_is_the_base_layer(device):
    x, w, b, a, bb = make_dense(9, 40, 24, 8, torch.float32, device)
    y = fastlora.lora_linear(x, w, b, a, bb, 0.0)
    assert_close(y, torch.nn.functional.linear(x.double(), w.double(), b.double()), torch.float32, "y")


def test_leading_dims_and_noncontiguous_x(device):
    x, w, b, a, bb = make_dense(0, 48, 32, 8, torch.float32, device, lead=(3, 5))
    outs, refs = run_dense(x, w, b, a, bb, 2.0)
    assert outs[0].shape == (3, 5, 32)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    big = torch.randn(21, 2 * 48, device=device)
    xs = big[:, ::2]  # stride 2 along K
    assert not xs.is_contiguous()
    outs, refs = run_dense(xs, w, b, a, bb, 2.0)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    xt = torch.randn(48, 13, device=device).t()  # column-major x
    outs, refs = run_dense(xt, w, b, a, bb, 2.0)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_empty_batch(device):
    x, w, b, a, bb = make_dense(0, 24, 16, 4, torch.float32, device)
    x.requires_grad_()
    y = fastlora.lora_linear(x, w, b, a, bb, 1.0)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 24)


def test_fp32_adapters_with_fp16_activations(device):
    x, w, b, a, bb = make_dense(21, 70, 40, 8, torch.float16, device, adapter_dtype=torch.float32)
    outs, refs = run_dense(x, w, b, a, bb, 0.5)
    assert outs[0].dtype == torch.float16 and outs[2].dtype == torch.float32 and outs[3].dtype == torch.float32
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float16, name)


def test_weight_and_bias_gradients_when_unfrozen(device):
    x, w, b, a, bb = make_dense(13, 36, 20, 4, torch.float32, device)
    w, b = w.requires_grad_(), b.requires_grad_()
    y = fastlora.lora_linear(x, w, b, a, bb, 1.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    wr, br = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    fastlora.reference.lora_linear(x.double(), wr, br, a.double(), bb.double(), 1.0).backward(dy.double())
    assert_close(w.grad, wr.grad, torch.float32, "dW")
    assert_close(b.grad, br.grad, torch.float32, "db")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_kernel_mask(p, device):
    outs, refs = run_dense(*make_dense(33, 70, 40, 8, torch.float32, device), 1.25, p=p, seed=1234)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_dropout_eval_and_seed_semantics(device):
    x, w, b, a, bb = make_dense(17, 64, 32, 8, torch.float32, device)
    plain = fastlora.lora_linear(x, w, b, a, bb, 1.0)
    evaluated = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, training=False)
    assert torch.equal(plain, evaluated)
    y1 = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, training=True, seed=5)
    y2 = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, training=True, seed=5)
    y3 = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, training=True, seed=6)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(y1, plain)
    torch.manual_seed(0)
    y4 = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, training=True)
    torch.manual_seed(0)
    y5 = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, training=True)
    assert torch.equal(y4, y5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p, device):
    keep = fastlora.dropout_mask((200, 300), p, seed=42, device=device)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Rows and columns are not copies of each other (offsets are row*K + col).
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


@settings(max_examples=8, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 80), N=st.integers(1, 80), R=st.integers(1, 20),
       bias=st.booleans(), s=st.sampled_from([0.0, 1.0, -2.5, 0.03]))
def test_random_shapes(M, K, N, R, bias, s):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outs, refs = run_dense(*make_dense(M, K, N, R, torch.float32, device, bias=bias), s)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M,K,N,R", [(1, 4096, 4096, 16), (257, 4096, 1000, 64), (1024, 1030, 4096, 8),
                                     (64, 512, 512, 256)])
def test_gpu_matrix(M, K, N, R, dtype):
    outs, refs = run_dense(*make_dense(M, K, N, R, dtype, "cuda"), 2.0, p=0.1, seed=3)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)


@pytest.mark.gpu
def test_gpu_every_config():
    from fastlora import _launch
    from fastlora.kernels.gemm import gemm_configs

    x, w, b, a, bb = make_dense(200, 300, 260, 16, torch.bfloat16, "cuda")
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    ref = ref + 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
    t = _launch.gemm(x, a, out_dtype=torch.float32, shrink=True)
    for shrink_cfg in gemm_configs(shrink=True):
        cfg = {**shrink_cfg.kwargs, "num_warps": shrink_cfg.num_warps, "num_stages": shrink_cfg.num_stages}
        assert_close(_launch.gemm(x, a, out_dtype=torch.float32, shrink=True, config=cfg), t, torch.bfloat16, "T")
    for c in gemm_configs(shrink=False):
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        y = _launch.gemm(x, w, out_dtype=x.dtype, bias=b, t=t, b=bb, scaling=0.5, config=cfg)
        assert_close(y, ref, torch.bfloat16, f"y {cfg}")


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    M, K = 1 << 17, 1 << 15  # M * K = 2**32 elements of x (8 GiB in bf16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    a = torch.randn(8, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    bb = torch.randn(16, 8, device="cuda", dtype=torch.bfloat16)
    y = fastlora.lora_linear(x, w, None, a, bb, 1.0)
    rows = torch.tensor([0, M // 2, M - 1], device="cuda")
    ref = fastlora.reference.lora_linear(x[rows].double(), w.double(), None, a.double(), bb.double(), 1.0)
    assert_close(y[rows], ref, torch.bfloat16, "y")


@pytest.mark.parametrize("policy", ["fused", "torch"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dispatch_paths_agree_with_reference(policy, p, device):
    from fastlora import dispatch

    old = dispatch.get_policy()
    dispatch.set_policy(policy)
    try:
        x, w, b, a, bb = make_dense(21, 50, 30, 6, torch.float32, device)
        w.requires_grad_()
        outs, refs = run_dense(x, w, b, a, bb, 1.5, p=p, seed=11)
    finally:
        dispatch.set_policy(old)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, f"{policy} {name}")
    with pytest.raises(ValueError, match="policy must be one of"):
        dispatch.set_policy("fastest")


def test_dispatch_decisions_round_trip(tmp_path):
    from fastlora import dispatch

    path = tmp_path / "decisions.json"
    path.write_text('{"k": "torch"}')
    dispatch.load_decisions(str(path))
    assert dispatch.decisions()["k"] == "torch"
    dispatch.save_decisions(str(tmp_path / "out.json"))
    assert '"k": "torch"' in (tmp_path / "out.json").read_text()
    path.write_text('{"k": "cublas"}')
    with pytest.raises(ValueError, match="must be 'fused' or 'torch'"):
        dispatch.load_decisions(str(path))
