"""The W8A8 forward over a block-scaled FP8 base (``fp8_activations=True``): x quantised per token per 128 channels to
e4m3 inside the GEMM, fp8 dot per K step. Its error against the exact product is the quantisation's (~1-3%), so the
kernel is compared with a float64 emulation of the same quantisation (``reference.lora_linear_fp8(...,
fp8_activations=True)``) tightly and with the exact reference loosely; the backward is W8A16's, bit for bit. On CPU
the kernels run under the Triton interpreter with fp16 activations (its bf16 tl.dot is wrong; fp32 is refused)."""

import pytest
import torch
import triton
import triton.language as tl
from helpers import case_id, f64, gemm_weights
from test_fp8 import make_fp8
from tolerance import assert_close

import fastlora
from fastlora import _launch, quant, reference
from fastlora.kernels.weight8 import e4m3_rne

# Against the emulation: fp32 accumulation and the output's rounding only (fp16 rounding alone: 2.1e-4 measured).
EMU_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Against the exact product: e4m3 activations (4 significant bits): 1.3e-2 measured for randn x at K = 300.
EXACT_TOL = 5e-2

# (M, K, N, R, block): K and N multiples of no tile (a partial last 128-channel group), M = 1, r 1 ... 64, a weight
# block whose N extent no tile divides (48) and one spanning two K steps (256).
CASES = [(17, 300, 200, 8, (128, 128)), (1, 130, 65, 1, (128, 128)), (40, 257, 96, 64, (48, 128)),
         (33, 384, 70, 12, (128, 256))]
IDS = [case_id(M=m, K=k, N=n, R=r, B=f"{b[0]}x{b[1]}") for m, k, n, r, b in CASES]


def _inputs(M, K, N, R, block, *, bias=True, dtype=torch.float16, device="cpu", seed=0):
    x, weight, scale, b, a, bb = make_fp8(M, K, N, R, block, bias=bias, dtype=dtype, seed=seed, device=device)
    if M > 3:
        x[3] = 0  # an all-zero token: its scale is 1, its row the bias and the low-rank term
    if M > 5:
        x[5, :K // 2] *= 1e3  # one token with a wide range: a group's scale set by one channel
    return x, weight, scale, b, a, bb


def _grads(x, weight, scale, b, a, bb, s, block, dy, *, w8a8, p=0.0, seed=0):
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, s, block_size=block, dropout_p=p, training=p > 0,
                                 seed=seed, fp8_activations=w8a8)
    y.backward(dy)
    return y, x.grad, a.grad, bb.grad


@triton.jit
def _encode_kernel(src, dst, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs, e4m3_rne(tl.load(src + offs)))


def test_e4m3_encoder_matches_torch(device):
    # The interpreter's codes (and the GPU's cvt.rn.satfinite): ties to even, carries into the exponent, subnormals,
    # saturation at 448 and the signs of zero, against torch's cast of the clamped values.
    g = torch.Generator().manual_seed(0)
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3)]
    mids = (e4m3.sort().values[1:] + e4m3.sort().values[:-1]) / 2  # exact ties
    v = torch.cat([e4m3, mids, torch.nextafter(mids, torch.full_like(mids, 1e9)),
                   torch.nextafter(mids, torch.full_like(mids, -1e9)), torch.randn(4096, generator=g) * 100,
                   torch.randn(4096, generator=g) * 0.01, torch.tensor([448.0, 460.0, 464.0, 1e6, -1e6, 2.0**-10,
                                                                        -2.0**-10, 127.96, -0.0, 0.0])])
    v = torch.cat([v, torch.zeros(triton.next_power_of_2(v.numel()) - v.numel())]).to(device)
    out = torch.empty(v.numel(), dtype=torch.uint8, device=device)
    _encode_kernel[(1,)](v, out, BLOCK=v.numel())
    expected = v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (out != expected).nonzero().flatten()[:4].tolist()
    assert not bad, [(v[i].item(), hex(out[i].item()), hex(expected[i].item())) for i in bad]


@pytest.mark.parametrize("M,K,N,R,block", CASES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_emulation_fp16(M, K, N, R, block, bias, device):
    x, weight, scale, b, a, bb = _inputs(M, K, N, R, block, bias=bias, device=device)
    y = fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.5, block_size=block, fp8_activations=True)
    xr, br, ar, bbr = f64(x, b, a, bb)
    emu = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 1.5, block_size=block, fp8_activations=True)
    exact = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 1.5, block_size=block)
    assert y.dtype == torch.float16
    assert_close(y, emu, torch.float16, "y vs emulation", tol=EMU_TOL[torch.float16])
    assert_close(y, exact, torch.float16, "y vs exact", tol=EXACT_TOL)
    if M > 3:  # the zero token gets exactly what the W8A16 path gives it (bias + low-rank term)
        y16 = fastlora.lora_linear_fp8(x[3:4], weight, scale, b, a, bb, 1.5, block_size=block)
        assert torch.equal(y[3:4], y16)


def test_emulation_is_the_quantised_product():
    # The emulation's x: codes * scale per token per 128 channels, within half an e4m3 step of x, exactly x at zero
    # and at each group's amax; straight-through gradient.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 300, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None])
    x[2] = 0
    x.requires_grad_()
    q = reference.fake_quant_fp8_act(x)
    groups = [slice(0, 128), slice(128, 256), slice(256, 300)]
    for sl in groups:
        amax = x[:, sl].detach().abs().amax(1, keepdim=True)
        err = (q[:, sl] - x[:, sl]).abs().detach()
        assert (err <= amax * 2.0**-4 + 1e-300).all()  # e4m3: 3 mantissa bits, half a step is 2^-4 of the top binade
    assert torch.equal(q[2], x[2].detach())
    top = x.detach()[:, :128].abs().argmax(1)
    assert torch.allclose(q[torch.arange(5), top].detach(), x.detach()[torch.arange(5), top], rtol=1e-6, atol=0)
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
def test_backward_is_w8a16(p, device):
    # Gradients come from the W8A16 backward (dx = dy W dequantised, adapters from the saved x): bit for bit the same
    # as fp8_activations=False, with the same dropout mask.
    block = (128, 128)
    x, weight, scale, b, a, bb = _inputs(21, 260, 90, 8, block, device=device)
    dy = torch.randn(21, 90, generator=torch.Generator().manual_seed(1)).half().to(device)
    y8, *g8 = _grads(x, weight, scale, b, a, bb, 0.75, block, dy, w8a8=True, p=p, seed=4)
    y16, *g16 = _grads(x, weight, scale, b, a, bb, 0.75, block, dy, w8a8=False, p=p, seed=4)
    assert not torch.equal(y8, y16)  # the forward differs (quantised x) ...
    for name, g1, g2 in zip(("dx", "dA", "dB"), g8, g16, strict=True):
        assert torch.equal(g1, g2), name  # ... the backward does not


def test_adapter_dtype_fp32_and_leading_dims(device):
    # fp32 adapters over fp16 x (PEFT's default over a quantised base) and x with leading dimensions
    block = (128, 128)
    x, weight, scale, b, a, bb = make_fp8(12, 200, 72, 4, block, dtype=torch.float16, adapter_dtype=torch.float32,
                                          device=device)
    y = fastlora.lora_linear_fp8(x.reshape(3, 4, 200), weight, scale, b, a, bb, 2.0, fp8_activations=True)
    xr, br, ar, bbr = f64(x, b, a, bb)
    emu = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 2.0, fp8_activations=True)
    assert y.shape == (3, 4, 72)
    assert_close(y.reshape(12, 72), emu, torch.float16, "y", tol=EMU_TOL[torch.float16])


def test_runs_the_w8a8_kernel_forward_only(device, monkeypatch):
    if device == "cpu" and not _launch.INTERPRET:
        pytest.skip("CPU without the interpreter takes the reference")
    seen = gemm_weights(monkeypatch)
    monkeypatch.setattr(reference, "lora_linear_fp8", None)  # a fall-back to the reference would fail
    x, weight, scale, b, a, bb = make_fp8(9, 130, 40, 4, (128, 128), dtype=torch.float16, device=device)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, fp8_activations=True).sum().backward()
    fp8 = [w for w in seen if isinstance(w, _launch.BlockFP8)]
    assert [(w.transposed, w.fp8_activations) for w in fp8] == [(False, True), (True, False)]


def test_compiles_fullgraph(device):
    # the ops' fake implementations take the W8A8 flag in qblocks (no graph break)
    x, weight, scale, b, a, bb = make_fp8(5, 130, 40, 4, (128, 128), dtype=torch.float16, device=device)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    f = lambda x, a, bb: fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, fp8_activations=True)
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, a, bb)
    assert torch.equal(y, f(x, a, bb))
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and bb.grad is not None


def test_cpu_reference_path_is_the_emulation(monkeypatch):
    # Without the kernels (CPU, bf16) the call computes the emulation, in fp32, and trains straight through.
    monkeypatch.setattr(fastlora.functional, "_use_kernels", lambda *a, **k: False)
    x, weight, scale, b, a, bb = _inputs(8, 200, 40, 4, (128, 128), dtype=torch.bfloat16)
    x.requires_grad_()
    y = fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, fp8_activations=True)
    xr, br, ar, bbr = f64(x, b, a, bb)
    emu = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 1.0, fp8_activations=True)
    assert y.dtype == torch.bfloat16
    assert_close(y, emu, torch.bfloat16, "y", tol=EMU_TOL[torch.bfloat16])
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module(device):
    lin = torch.nn.Linear(256, 96).to(device)
    layer = fastlora.LinearFP8.from_linear(lin, r=8, alpha=16, fp8_activations=True).half()
    torch.nn.init.normal_(layer.lora_B)
    assert layer.fp8_activations and "fp8_activations=True" in repr(layer)
    x = torch.randn(5, 256, device=device).half()
    y = layer(x)
    expected = fastlora.lora_linear_fp8(x, layer.weight, layer.weight_scale_inv, layer.bias, layer.lora_A,
                                        layer.lora_B, layer.scaling, fp8_activations=True)
    assert torch.equal(y, expected)
    assert not torch.equal(y, fastlora.lora_linear_fp8(x, layer.weight, layer.weight_scale_inv, layer.bias,
                                                       layer.lora_A, layer.lora_B, layer.scaling))
    fp8_linear = torch.nn.Module()  # a checkpoint's FP8 layer: its tensors are shared
    fp8_linear.weight, fp8_linear.weight_scale_inv = layer.weight, layer.weight_scale_inv
    shared = fastlora.LinearFP8.from_linear(fp8_linear, r=4, fp8_activations=True)
    assert shared.weight is layer.weight and shared.fp8_activations
    assert layer._with_new_adapter(r=4, alpha=4).fp8_activations
    assert not fastlora.LinearFP8(256, 96, r=4, device=device).fp8_activations


def test_errors(device):
    x, weight, scale, b, a, bb = make_fp8(4, 256, 64, 4, (128, 128), dtype=torch.float16, device=device)
    call = lambda **kw: fastlora.lora_linear_fp8(**{**dict(x=x, weight=weight, weight_scale_inv=scale, bias=b,
                                                           lora_A=a, lora_B=bb, scaling=1.0, fp8_activations=True),
                                                    **kw})
    w64, s64 = (t.to(device) for t in quant.quantize_fp8_blockwise(torch.randn(64, 256), (64, 64)))
    with pytest.raises(ValueError, match=r"block_size\[1\].*multiple of 128.*\(64, 64\)"):
        call(weight=w64, weight_scale_inv=s64, block_size=(64, 64))
    with pytest.raises(ValueError, match="bfloat16 or float16 x.*float32"):
        call(x=x.float(), lora_A=a.float(), lora_B=bb.float(), bias=b.float())
    with pytest.raises(NotImplementedError, match="DoRA"):
        call(magnitude=torch.ones(64, device=device))
    with pytest.raises(TypeError, match="fp8_activations must be True or False"):
        call(fp8_activations=1)
    with pytest.raises(ValueError, match=r"block_size\[1\]"):
        fastlora.LinearFP8(256, 64, block_size=(128, 64), fp8_activations=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        fastlora.LinearFP8.from_linear(torch.nn.Linear(256, 64), use_dora=True, fp8_activations=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        fastlora.LinearFP8.from_linear(torch.nn.Linear(256, 64), fp8_activations=True)._with_new_adapter(
            r=4, alpha=4, use_dora=True)


def test_refused_before_sm89(monkeypatch):
    monkeypatch.setattr(fastlora.functional._configs, "target_capability", lambda device: (8, 0))
    x, weight, scale, b, a, bb = make_fp8(4, 256, 64, 4, (128, 128), dtype=torch.float16)
    with pytest.raises(ValueError, match="compute capability 8.9"):
        fastlora.lora_linear_fp8(x, weight, scale, b, a, bb, 1.0, fp8_activations=True)


GPU_CASES = [(1, 4096, 4096, 16), (257, 4096, 1000, 64), (1024, 1030, 4096, 8), (4096, 4096, 4096, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,N,R", GPU_CASES, ids=[case_id(M=m, K=k, N=n, R=r) for m, k, n, r in GPU_CASES])
def test_gpu_matches_emulation(M, K, N, R, dtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("W8A8 needs fp8 tensor cores (sm_89+)")
    x, weight, scale, b, a, bb = _inputs(M, K, N, R, (128, 128), dtype=dtype, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    y, *grads = _grads(x, weight, scale, b, a, bb, 2.0, (128, 128), dy, w8a8=True, p=0.1, seed=3)
    xr, br, ar, bbr = f64(x, b, a, bb)
    emu = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 2.0, fp8_activations=True)
    exact = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 2.0)
    mask = fastlora.dropout_mask(x.shape, 0.1, 3, x.device)
    emu_t = reference.lora_linear_fp8(xr, weight, scale, br, ar, bbr, 2.0, fp8_activations=True, dropout_p=0.1,
                                      training=True, dropout_mask=mask)
    assert_close(y, emu_t, dtype, "y vs emulation", tol=EMU_TOL[dtype])
    assert_close(y, exact + (emu_t - emu), dtype, "y vs exact", tol=EXACT_TOL)
    _, *g16 = _grads(x, weight, scale, b, a, bb, 2.0, (128, 128), dy, w8a8=False, p=0.1, seed=3)
    for name, g1, g2 in zip(("dx", "dA", "dB"), grads, g16, strict=True):
        assert torch.equal(g1, g2), name


@pytest.mark.gpu
def test_gpu_every_w8a8_config():
    # Every W8A8 tile, explicitly (the autotuner runs only its winner), against the emulation.
    from fastlora.kernels.gemm import gemm_configs

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("W8A8 needs fp8 tensor cores (sm_89+)")
    x, weight, scale, b, a, bb = _inputs(200, 300, 260, 16, (128, 128), dtype=torch.bfloat16, device="cuda")
    w = _launch.BlockFP8(weight.view(torch.uint8), scale, (128, 128), (260, 300), torch.bfloat16,
                         fp8_activations=True)
    t = _launch.gemm(x, a, out_dtype=torch.float32, shrink=True)
    emu = reference.lora_linear_fp8(x.double(), weight, scale, b.double(), a.double(), bb.double() * 0, 0.5,
                                    fp8_activations=True) + 0.5 * t.double() @ bb.double().t()
    for c in gemm_configs(shrink=False, w8a8=True):
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        y = _launch.gemm(x, w, out_dtype=x.dtype, bias=b, t=t, b=bb, scaling=0.5, config=cfg)
        assert_close(y, emu, torch.bfloat16, f"y {cfg}", tol=EMU_TOL[torch.bfloat16])
