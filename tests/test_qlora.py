"""QLoRA: a bitsandbytes-format 4-bit base dequantised inside the fused GEMM (forward and dx), and
``fastlora.Linear4bit``. Kernels are compared with a float64 reference on the dequantised weight; on CPU they run
under the Triton interpreter (fp32 and fp16 compute; bf16 compute takes the PyTorch reference there)."""

import pytest
import torch
from helpers import case_id, f64
from tolerance import assert_close

import fastlora
from fastlora import _launch, quant, reference

NAMES = ("y", "dx", "dA", "dB")
# (M, K, N): K a multiple of every block size used with it; N odd or not a tile multiple; M of one row to a few tiles.
SHAPES = [(37, 128, 45), (1, 64, 64), (20, 192, 33), (50, 256, 17)]


def make_4bit(M, K, N, R, *, blocksize=64, quant_type="nf4", double_quant=True, bias=True, seed=0,
              adapter_dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    packed, state = quant.quantize_4bit(w.to(device), blocksize=blocksize, quant_type=quant_type,
                                        double_quant=double_quant)
    x = torch.randn(M, K, generator=g).to(device)
    b = torch.randn(N, generator=g).to(device) if bias else None
    a = (torch.randn(R, K, generator=g) / K**0.5).to(adapter_dtype).to(device)
    bb = torch.randn(N, R, generator=g).to(adapter_dtype).to(device)
    return x, packed, state, b, a, bb


def run_4bit(x, packed, state, b, a, bb, s, *, compute_dtype, p=0.0, seed=0):
    """(fastlora y, dx, dA, dB; float64 reference on the exactly dequantised weight) for one random dy."""
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, s, compute_dtype=compute_dtype, dropout_p=p,
                                  training=p > 0, seed=seed)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    w = quant.dequantize_4bit(packed, state, dtype=torch.float64)
    xr, br, ar, bbr = f64(x, b, a, bb)
    yr = reference.lora_linear(xr, w, br, ar, bbr, s, dropout_p=p, training=p > 0, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert y.dtype == x.dtype and x.grad.dtype == x.dtype and a.grad.dtype == a.dtype
    return [y, x.grad, a.grad, bb.grad], [yr, xr.grad, ar.grad, bbr.grad]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=[case_id(M=m, K=k, N=n) for m, k, n in SHAPES])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "absmax"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
def test_matches_reference_fp32(M, K, N, double_quant, p, device):
    x, packed, state, b, a, bb = make_4bit(M, K, N, 8, double_quant=double_quant, bias=M % 2 == 1, device=device)
    outs, refs = run_4bit(x, packed, state, b, a, bb, 0.75, compute_dtype=torch.float32, p=p, seed=5)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_formats_fp16_compute(quant_type, blocksize, device):
    # fp16 compute with fp32 adapters (PEFT's QLoRA layout); x comes in fp32 and y goes back in fp32.
    x, packed, state, b, a, bb = make_4bit(29, 128, 40, 4, blocksize=blocksize, quant_type=quant_type,
                                           device=device)
    outs, refs = run_4bit(x, packed, state, b, a, bb, 2.0, compute_dtype=torch.float16, p=0.1, seed=2)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float16, name)


@pytest.mark.parametrize("cfg", [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128)],
                         ids=["bn64-bk64", "bn32-bk128"])
def test_tiles_spanning_several_blocks(cfg, device, monkeypatch):
    # Block size 32 under tiles of 64/128 columns: several absmax per tile row (forward along K, dx along N);
    # K = 160 leaves a partial last K tile.
    for k, v in cfg.items():
        monkeypatch.setitem(_launch.INTERPRET_GEMM, k, v)
    x, packed, state, b, a, bb = make_4bit(21, 160, 96, 8, blocksize=32, device=device)
    outs, refs = run_4bit(x, packed, state, b, a, bb, 1.0, compute_dtype=torch.float32, p=0.3, seed=8)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_bitsandbytes_state_and_bytes(device):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=g)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = quant.QuantState4bit.from_bnb(qs)
    x = torch.randn(10, 128, generator=g)
    a, bb = torch.randn(4, 128, generator=g) / 10, torch.randn(48, 4, generator=g)
    y = fastlora.lora_linear_4bit(x.to(device), packed.to(device), _to(state, device), None, a.to(device),
                                  bb.to(device), 0.5, compute_dtype=torch.float32)
    wb = bnbf.dequantize_4bit(packed, qs).double()  # bitsandbytes' own decoding as the oracle
    ref = x.double() @ wb.t() + 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
    assert_close(y, ref, torch.float32, "y")


def _to(state, device):
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(state).items()}
    return quant.QuantState4bit(**fields)


# ------------------------------------------------------------------------------------------------ Linear4bit


def test_linear4bit_from_linear_equals_its_dequantised_layer(device):
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 72).to(device)
    layer = fastlora.Linear4bit.from_linear(base, r=8, alpha=16, compute_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert (layer.quant_state.shape, layer.quant_state.blocksize, layer.quant_state.quant_type) == \
        ((72, 128), 64, "nf4")
    x = torch.randn(3, 7, 128, device=device)
    y = layer(x)
    dense = layer.dequantize()
    assert isinstance(dense, fastlora.Linear) and dense.lora_A is layer.lora_A
    assert_close(y, dense(x), torch.float32, "y vs dequantised")
    w4 = quant.dequantize_4bit(*quant.quantize_4bit(base.weight.detach()), dtype=torch.float64)
    assert_close(layer.dequantized_weight(torch.float64), w4, torch.float32, "W")
    y.square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and base.bias.grad is None


def test_linear4bit_bf16_compute_returns_input_dtype(device):
    layer = fastlora.Linear4bit(64, 48, r=4, device=device)  # compute_dtype bf16 by default
    assert layer.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64, device=device)
    y = layer(x)
    assert y.dtype == torch.float32
    w = layer.dequantized_weight(torch.float64)
    ref = torch.nn.functional.linear(x.double(), w, layer.bias.double()) + \
        layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    assert_close(y, ref, torch.bfloat16, "y")


def test_linear4bit_state_dict_and_dtype_casts(device):
    a = fastlora.Linear4bit(64, 32, r=4, compute_dtype=torch.float32, double_quant=True, device=device)
    b = fastlora.Linear4bit(64, 32, r=4, compute_dtype=torch.float32, double_quant=True, device=device)
    torch.nn.init.normal_(a.lora_B)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 64, device=device)
    assert torch.equal(a(x), b(x))
    a.half()  # a model-wide cast must not touch the quantisation state
    assert a.quant_absmax.dtype == torch.uint8 and a.quant_absmax2.dtype == torch.float32
    assert a.quant_code.dtype == torch.float32 and a.lora_A.dtype == torch.float16
    assert_close(a(x), b(x), torch.float16, "after half()")


def test_linear4bit_meta_device():
    layer = fastlora.Linear4bit(128, 40, r=8, device="meta")
    assert layer.weight.shape == ((128 * 40 + 1) // 2, 1) and layer.weight.is_meta
    y = layer(torch.empty(2, 3, 128, device="meta"))
    assert y.shape == (2, 3, 40) and y.is_meta


def test_linear4bit_refuses_merge(device):
    layer = fastlora.Linear4bit(64, 16, device=device)
    with pytest.raises(NotImplementedError, match="dequantize"):
        layer.merge()
    dense = layer.dequantize()
    dense.merge()  # the dequantised layer merges exactly
    assert dense.merged


def test_errors_name_the_argument(device):
    x, packed, state, b, a, bb = make_4bit(4, 64, 16, 4, device=device)
    call = lambda **kw: fastlora.lora_linear_4bit(**{**dict(x=x, weight=packed, quant_state=state, bias=b, lora_A=a,
                                                             lora_B=bb, scaling=1.0), **kw})
    with pytest.raises(ValueError, match="in_features = 64"):
        call(x=torch.randn(4, 63, device=device))
    with pytest.raises(ValueError, match="packed bytes"):
        call(weight=packed[:-1])
    with pytest.raises(ValueError, match=r"lora_B must have shape"):
        call(lora_B=bb[:, :3])
    with pytest.raises(TypeError, match="quant_state"):
        call(quant_state=None)
    with pytest.raises(TypeError, match="compute_dtype"):
        call(compute_dtype=torch.int8)
    odd = torch.randn(8, 96)
    p2, s2 = quant.quantize_4bit(odd, blocksize=64)  # the format allows K = 96 with blocks of 64 ...
    with pytest.raises(ValueError, match="multiple of the quantisation blocksize 64"):  # ... the kernels do not
        fastlora.lora_linear_4bit(torch.randn(2, 96), p2, s2, None, torch.randn(4, 96), torch.zeros(8, 4), 1.0)
    with pytest.raises(ValueError, match="multiple of the quantisation blocksize 64"):
        fastlora.Linear4bit(96, 8)
    with pytest.raises(TypeError, match="nn.Linear or a bitsandbytes"):
        fastlora.Linear4bit.from_linear(torch.nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_fp32_activations_keep_exact_adapter_math(p, device):
    # fp32 x over an fp16-compute base (QLoRA after prepare_model_for_kbit_training): the base product is cast to
    # fp16 inside the kernel, the low-rank branch and the adapter gradients stay fp32 (PEFT's semantics).
    x, packed, state, b, a, bb = make_4bit(33, 128, 40, 8, device=device)
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, 1.5, compute_dtype=torch.float16, dropout_p=p,
                                  training=p > 0, seed=4)
    mask = fastlora.dropout_mask(x.shape, p, 4, x.device) if p > 0 else None
    w = quant.dequantize_4bit(packed, state, dtype=torch.float64)
    xr, br, ar, bbr = f64(x, b, a, bb)
    yr = reference.lora_linear(xr, w, br, ar, bbr, 1.5, dropout_p=p, training=p > 0, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert y.dtype == torch.float32
    assert_close(y, yr, torch.float16, "y")
    assert_close(x.grad, xr.grad, torch.float16, "dx")
    assert_close(a.grad, ar.grad, torch.float32, "dA (fp32 exact)")
    assert_close(bb.grad, bbr.grad, torch.float32, "dB (fp32 exact)")
