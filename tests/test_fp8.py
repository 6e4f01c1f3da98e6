"""A block-scaled FP8 base (W8A16): e4m3 bytes and 2-D block scales dequantised inside the fused GEMM (forward and
dx), ``fastlora.lora_linear_fp8``. Kernels are compared with a float64 reference on the exactly dequantised weight
(``reference.lora_linear_fp8``); on CPU they run under the Triton interpreter (fp32 and fp16 activations)."""

import pytest
import torch
import triton
import triton.language as tl
from helpers import case_id, f64, gemm_weights
from tolerance import assert_close

import fastlora
from fastlora import _launch, quant, reference
from fastlora.kernels.weight8 import decode_e4m3

NAMES = ("y", "dx", "dA", "dB", "dm")
# (M, K, N, R, block): K and N multiples of no block nor tile; blocks that divide the interpreter's BLOCK_K = 32
# (one scale vector per tile: 128x128, 64x32) and that do not (48x24: a scale per element).
CASES = [(17, 200, 300, 8, (128, 128)), (1, 130, 65, 1, (64, 32)), (63, 96, 70, 12, (48, 24))]


def make_fp8(M, K, N, R, block, *, bias=True, dtype=torch.float32, adapter_dtype=None, scale_dtype=torch.float32,
             seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    w[: N // 3] *= 8.0  # block scales that differ by row block
    weight, scale = quant.quantize_fp8_blockwise(w, block, scale_dtype=scale_dtype)
    adt = adapter_dtype or dtype
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    a = (torch.randn(R, K, generator=g) / K**0.5).to(adt)
    bb = torch.randn(N, R, generator=g).to(adt)
    return [t.to(device) if t is not None else None for t in (x, weight, scale, b, a, bb)]


def run_fp8(x, weight, scale, b, a, bb, s, block, *, p=0.0, seed=0, magnitude=None):
    """(fastlora y, dx, dA, dB[, dm]; the float64 reference's) for one random dy."""
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    m = magnitude.detach().requires_grad_() if magnitude is not None else None
    y = fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, s, block_size=block, dropout_p=p, training=p > 0,
                                 seed=seed, magnitude=m)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    xr, br, ar, bbr, mr = f64(x, b, a, bb, m) if m is not None else (*f64(x, b, a, bb), None)
    yr = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, s, block_size=block, dropout_p=p, training=p > 0,
                                   dropout_mask=mask, magnitude=mr)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert y.dtype == x.dtype and x.grad.dtype == x.dtype and a.grad.dtype == a.dtype
    outs, refs = [y, x.grad, a.grad, bb.grad], [yr, xr.grad, ar.grad, bbr.grad]
    if m is not None:
        outs, refs = outs + [m.grad], refs + [mr.grad]
    return outs, refs


@triton.jit
def _decode_kernel(src, dst, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs, decode_e4m3(tl.load(src + offs)))


def test_decode_is_exact_for_every_code(device):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    out = torch.full((256,), 7.0, device=device)
    _decode_kernel[(1,)](codes, out, BLOCK=256)
    expected = codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(expected)
    assert nan.nonzero().flatten().tolist() == [0x7F, 0xFF] and torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan], expected[~nan])
    assert torch.equal(torch.signbit(out[~nan]), torch.signbit(expected[~nan]))  # -0.0 (0x80) included


@pytest.mark.parametrize("M,K,N,R,block", CASES, ids=[case_id(M=m, K=k, N=n, R=r, B=f"{b[0]}x{b[1]}")
                                                      for m, k, n, r, b in CASES])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
def test_matches_reference_fp32(M, K, N, R, block, p, device):
    x, weight, scale, b, a, bb = make_fp8(M, K, N, R, block, bias=M % 2 == 1, device=device)
    outs, refs = run_fp8(x, weight, scale, b, a, bb, 0.75, block, p=p, seed=5)
    for name, o, r in zip(NAMES[:len(outs)], outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=["fp16-adapters", "fp32-adapters"])
def test_fp16_activations(adapter_dtype, device):
    # bf16 scales (Qwen's checkpoints) with fp16 activations: W rounded once to fp16 from the fp32 product.
    x, weight, scale, b, a, bb = make_fp8(29, 160, 72, 8, (64, 32), dtype=torch.float16, adapter_dtype=adapter_dtype,
                                          scale_dtype=torch.bfloat16, device=device)
    outs, refs = run_fp8(x, weight, scale, b, a, bb, 2.0, (64, 32), p=0.1, seed=2)
    for name, o, r in zip(NAMES[:len(outs)], outs, refs, strict=True):
        assert_close(o, r, torch.float16, name)


@pytest.mark.parametrize("cfg", [dict(BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128)],
                         ids=["bn64-bk64", "bn32-bk128"])
def test_tiles_spanning_several_blocks(cfg, device, monkeypatch):
    # Blocks of 64x32 under K steps of 64 / 128: several scales along the reduction of one tile (forward: K,
    # dx: N), so the per-element scale path; leading dimensions on x.
    for k, v in cfg.items():
        monkeypatch.setitem(_launch.INTERPRET_GEMM, k, v)
    x, weight, scale, b, a, bb = make_fp8(21, 150, 90, 8, (64, 32), device=device)
    outs, refs = run_fp8(x.reshape(3, 7, 150), weight, scale, b, a, bb, 1.0, (64, 32), p=0.3, seed=8)
    for name, o, r in zip(NAMES[:len(outs)], outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


@pytest.mark.parametrize("block", [(64, 32), (48, 24)], ids=["64x32", "48x24"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
def test_dora_matches_reference(block, p, device):
    x, weight, scale, b, a, bb = make_fp8(19, 100, 70, 4, block, device=device)
    m = torch.rand(70, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    outs, refs = run_fp8(x, weight, scale, b, a, bb, 0.5, block, p=p, seed=6, magnitude=m)
    for name, o, r in zip(NAMES[:len(outs)], outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_runs_the_fused_kernels_and_freezes_the_weight(device, monkeypatch):
    if device == "cpu" and not _launch.INTERPRET:
        pytest.skip("CPU without the interpreter takes the reference")
    seen = gemm_weights(monkeypatch)
    monkeypatch.setattr(reference, "lora_linear_fp8", None)  # a fall-back to the reference would fail
    x, weight, scale, b, a, bb = make_fp8(9, 64, 40, 4, (32, 32), device=device)
    weight.requires_grad_()
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, block_size=(32, 32)).sum().backward()
    fp8 = [w for w in seen if isinstance(w, _launch.BlockFP8)]
    assert [w.transposed for w in fp8] == [False, True]  # the forward's main GEMM, then dx's
    assert fp8[0].data.dtype == torch.uint8 and fp8[0].qblock == (32, 32)
    assert weight.grad is None and not scale.requires_grad
    assert x.grad is not None and a.grad is not None and bb.grad is not None


def test_column_major_weight(device):
    # a view whose rows are not contiguous (here column-major) gives the same result as the row-major weight
    x, weight, scale, b, a, bb = make_fp8(7, 96, 40, 4, (32, 32), device=device)
    strided = weight.t().contiguous().t()
    assert not strided.is_contiguous()
    y = fastlora.lora_linear_fp8(x, strided, scale, b, a, bb, 1.0, block_size=(32, 32))
    assert torch.equal(y, fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, block_size=(32, 32)))


def test_compiles_fullgraph(device):
    # the custom ops' fake implementations take the float8 weight and its scales (no graph break)
    x, weight, scale, b, a, bb = make_fp8(5, 64, 40, 4, (32, 32), device=device)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    f = lambda x, a, bb: fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, block_size=(32, 32))
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, a, bb)
    assert torch.equal(y, f(x, a, bb))
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and bb.grad is not None


def test_errors_name_the_argument(device):
    x, weight, scale, b, a, bb = make_fp8(4, 200, 300, 4, (128, 128), device=device)
    call = lambda **kw: fastlora.lora_linear_fp8(**{**dict(x=x, weight=weight, weight_scale_inv=scale, bias=b,
                                                           lora_A=a, lora_B=bb, scaling=1.0), **kw})
    with pytest.raises(TypeError, match="weight must be a torch.float8_e4m3fn"):
        call(weight=weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight_scale_inv must have shape .*\(3, 2\).*\(300, 200\).*\(2, 2\)"):
        call(weight_scale_inv=scale[:2])
    with pytest.raises(ValueError, match=r"weight_scale_inv must have shape .*\(5, 4\)"):
        call(block_size=(64, 64))
    with pytest.raises(TypeError, match="weight_scale_inv"):
        call(weight_scale_inv=scale.half())
    with pytest.raises(ValueError, match="in_features = 200"):
        call(x=torch.randn(4, 199, device=device))
    with pytest.raises(ValueError, match="lora_B must have shape"):
        call(lora_B=bb[:, :3])
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=b[:-1])
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        call(x=x.double())
    with pytest.raises(ValueError, match="magnitude must have shape"):
        call(magnitude=torch.ones(299, device=device))


GPU_CASES = [(1, 4096, 4096, 16, (128, 128)), (257, 4096, 1000, 64, (128, 128)), (1024, 1030, 4096, 8, (128, 128)),
             (64, 512, 520, 16, (64, 32))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M,K,N,R,block", GPU_CASES, ids=[case_id(M=m, K=k, N=n, R=r, B=f"{b[0]}x{b[1]}")
                                                          for m, k, n, r, b in GPU_CASES])
def test_gpu_matrix(M, K, N, R, block, dtype):
    x, weight, scale, b, a, bb = make_fp8(M, K, N, R, block, dtype=dtype, device="cuda")
    outs, refs = run_fp8(x, weight, scale, b, a, bb, 2.0, block, p=0.1, seed=3)
    for name, o, r in zip(NAMES[:len(outs)], outs, refs, strict=True):
        assert_close(o, r, torch.float32 if dtype == torch.float32 else dtype, name,
                     tol=3e-3 if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else None)


@pytest.mark.gpu
def test_gpu_every_config():
    # Every main-GEMM candidate over an FP8 W, forward and dx (the autotuner runs only its winner).
    from fastlora.kernels.gemm import gemm_configs

    x, weight, scale, b, a, bb = make_fp8(200, 300, 260, 16, (128, 128), dtype=torch.bfloat16, device="cuda")
    w = _launch.BlockFP8(weight.view(torch.uint8), scale, (128, 128), (260, 300), torch.bfloat16)
    wd = quant.dequantize_fp8_blockwise(weight, scale, (128, 128), dtype=torch.bfloat16).double()
    t = _launch.gemm(x, a, out_dtype=torch.float32, shrink=True)
    dy = torch.randn(200, 260, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.double(), wd, b.double()) + 0.5 * t.double() @ bb.double().t()
    dx_ref = dy.double() @ wd
    for c in gemm_configs(shrink=False):
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        y = _launch.gemm(x, w, out_dtype=x.dtype, bias=b, t=t, b=bb, scaling=0.5, config=cfg)
        assert_close(y, ref, torch.bfloat16, f"y {cfg}")
        dx = _launch.gemm(dy, w.t(), out_dtype=x.dtype, config=cfg)
        assert_close(dx, dx_ref, torch.bfloat16, f"dx {cfg}")
