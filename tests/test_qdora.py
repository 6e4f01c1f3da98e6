"""QDoRA: DoRA (PEFT's use_dora=True) over a bitsandbytes-format 4-bit base. The fused kernels against the float64
reference formula on the dequantised weight, forward and every gradient (x, A, B, magnitude); dropout, the 4-bit
norm and its caches, zero-norm rows, ``Linear4bit(use_dora=True)`` (from an nn.Linear and from bitsandbytes),
torch.compile and meta tensors (tier A: interpreter, fp32 and fp16 compute)."""

import pytest
import torch
import torch.nn as nn
from helpers import case_id, compiled_matches_eager, dora_layer_backward, f64, saved_elements
from tolerance import assert_close

import fastlora
from fastlora import dora, quant, reference

NAMES = ("y", "dx", "dA", "dB", "dm")
FP16, FP32 = torch.float16, torch.float32
# (M, K, N, R, quant_type, double_quant, blocksize, compute dtype, x dtype, dropout, bias): odd N and M, M = 1,
# r = 1 ... 256, both formats, both absmax encodings, fp16 activations (fp32 adapters, PEFT's QLoRA layout).
CASES = [
    (1, 64, 40, 1, "nf4", True, 64, FP32, FP32, 0.0, True),
    (17, 128, 33, 8, "fp4", False, 64, FP32, FP32, 0.3, False),
    (20, 96, 50, 12, "nf4", True, 32, FP16, FP32, 0.2, True),
    (9, 64, 24, 256, "nf4", False, 64, FP32, FP32, 0.0, True),
    (11, 128, 17, 3, "fp4", True, 128, FP16, FP16, 0.25, False),
]


def _id(c):
    M, K, N, R, qt, dq, bs, cd, xd, p, bias = c
    return (case_id(M=M, K=K, N=N, R=R) + f"-{qt}{'-dq' if dq else ''}-bs{bs}-c{str(cd)[-7:]}-x{str(xd)[-7:]}"
            f"-p{p:g}{'' if bias else '-nobias'}")


def make_qdora(M, K, N, R, *, quant_type="nf4", double_quant=True, blocksize=64, x_dtype=FP32, bias=True, seed=0,
               device="cpu"):
    """x, packed W, its state, bias, fp32 A, B and magnitude (not ||W + sBA||: g far from 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    packed, state = quant.quantize_4bit(w.to(device), blocksize=blocksize, quant_type=quant_type,
                                        double_quant=double_quant)
    x = torch.randn(M, K, generator=g).to(x_dtype).to(device)
    b = torch.randn(N, generator=g).to(x_dtype).to(device) if bias else None
    a = (torch.randn(R, K, generator=g) / K**0.5).to(device)
    bb = (torch.randn(N, R, generator=g) / R**0.5).to(device)
    m = (torch.rand(N, generator=g) + 0.5).to(device)
    return x, packed, state, b, a, bb, m


def run_qdora(x, packed, state, b, a, bb, m, s, *, compute_dtype, p=0.0, seed=0, need=(True,) * 4):
    """(fastlora y and the gradients ``need`` asks for (x, A, B, m); the float64 reference on the exactly
    dequantised W) for one random dy."""
    x, a, bb, m = (t.detach().requires_grad_(n) for t, n in zip((x, a, bb, m), need, strict=True))
    y = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, s, compute_dtype=compute_dtype, dropout_p=p,
                                  training=p > 0, seed=seed, magnitude=m)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    w = quant.dequantize_4bit(packed, state, dtype=torch.float64)
    xr, br, ar, bbr, mr = f64(x, b, a, bb, m)
    yr = reference.dora_linear(xr, w, br, ar, bbr, s, mr, dropout_p=p, training=p > 0, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert y.dtype == x.dtype
    pairs = [(t.grad, r.grad) for t, r, n in zip((x, a, bb, m), (xr, ar, bbr, mr), need, strict=True) if n]
    return [y, *(p[0] for p in pairs)], [yr, *(p[1] for p in pairs)]


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_reference(case, device):
    M, K, N, R, qt, dq, bs, cd, xd, p, bias = case
    args = make_qdora(M, K, N, R, quant_type=qt, double_quant=dq, blocksize=bs, x_dtype=xd, bias=bias, device=device)
    outs, refs = run_qdora(*args, 0.75, compute_dtype=cd, p=p, seed=7)
    tol = FP16 if FP16 in (cd, xd) else FP32
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        # dA is fp32-exact with fp32 x and adapters (dB and dm sum dy against terms holding the base product)
        assert_close(o, r, FP32 if name == "dA" and xd == FP32 else tol, name)


def test_each_gradient_alone_and_negative_scaling(device):
    args = make_qdora(15, 64, 24, 4, quant_type="fp4", device=device)
    for need, p in (((True, False, False, False), 0.3), ((False, False, False, True), 0.3),
                    ((False, True, True, False), 0.0)):
        outs, refs = run_qdora(*args, -1.5, compute_dtype=FP32, p=p, seed=3, need=need)
        assert len(outs) == 1 + sum(need)
        for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
            assert_close(o, r, FP32, f"{need} output {i}")


def test_dropout_is_one_mask_in_both_terms(device):
    """y = x W^T + b + d(x) ((g - 1) W + g s B A)^T with ONE mask d, the one the shrink drew (PEFT: the (g - 1) base
    term runs on the dropped x); the mask follows the seed; eval has none."""
    x, packed, state, b, a, bb, m = make_qdora(23, 64, 40, 4, device=device)
    s, p = 1.25, 0.4
    call = dict(compute_dtype=FP32, magnitude=m, dropout_p=p, training=True, seed=11)
    y = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, s, **call)
    keep = fastlora.dropout_mask(x.shape, p, 11, device).double()
    wd, ad, bd = quant.dequantize_4bit(packed, state, dtype=torch.float64), a.double(), bb.double()
    g = m.double() / torch.linalg.vector_norm(wd + s * bd @ ad, dim=1)
    combined = (g - 1)[:, None] * wd + g[:, None] * s * (bd @ ad)  # [N, K]
    expected = x.double() @ wd.t() + b.double() + (x.double() * keep / (1 - p)) @ combined.t()
    assert_close(y, expected, FP32, "y")
    assert torch.equal(y, fastlora.lora_linear_4bit(x, packed, state, b, a, bb, s, **call))
    evaluated = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, s, compute_dtype=FP32, magnitude=m)
    assert (y - evaluated).abs().max() > 1e-3, "training applies dropout, eval does not"


def test_saves_an_mxn_tensor_only_when_the_magnitude_trains(device):
    M, K, N = 40, 64, 56  # M x N larger than every other saved tensor
    x, packed, state, b, a, bb, m = make_qdora(M, K, N, 4, device=device)
    x, a, bb = x.requires_grad_(), a.requires_grad_(), bb.requires_grad_()

    def call(mag):
        return lambda: fastlora.lora_linear_4bit(x, packed, state, b, a, bb, 1.0, compute_dtype=FP32, magnitude=mag,
                                                 dropout_p=0.25, training=True, seed=1)

    frozen, trained = saved_elements(call(m)), saved_elements(call(m.clone().requires_grad_()))
    assert M * N not in frozen and trained.count(M * N) == 1
    assert packed.numel() in frozen and N * K not in frozen, "W saved packed, never dequantised"


# ------------------------------------------------------------------------------------------------ the 4-bit norm


@pytest.mark.parametrize("R", [1, 256])
def test_weight_norm_4bit_without_the_out_by_in_matrix(R, device, monkeypatch):
    monkeypatch.setattr(dora, "ROWS", 16)  # ||W_n||^2 decoded in row chunks: several, the last one partial
    x, packed, state, b, a, bb, m = make_qdora(1, 96, 70, R, quant_type="nf4", blocksize=32, device=device)
    s = 0.3
    norm = dora.weight_norm_4bit(packed, state, a, bb, s)
    wd = quant.dequantize_4bit(packed, state, dtype=torch.float64)
    exact = torch.linalg.vector_norm(wd + s * bb.double() @ a.double(), dim=1)
    assert norm.dtype == FP32 and norm.shape == (70,)
    assert_close(norm, exact, FP32, "norm", tol=1e-5)  # fp32 throughout: W's decode is exact in fp32
    assert_close(dora.weight_sq_4bit(packed, state), wd.square().sum(1), FP32, "||W||^2", tol=1e-6)


def test_weight_sq_4bit_cache_follows_the_packed_weight(device, dora_caching):
    x, packed, state, b, a, bb, m = make_qdora(5, 64, 30, 2, device=device)
    first = dora.weight_sq_4bit(packed, state)
    assert dora.weight_sq_4bit(packed, state) is first, "cached while the packed bytes are unchanged"
    with torch.no_grad():
        packed[:32] = 0x77  # the first rows' codes change in place (NF4 code 7: 0)
    second = dora.weight_sq_4bit(packed, state)
    assert second is not first
    assert_close(second, quant.dequantize_4bit(packed, state, dtype=torch.float64).square().sum(1), FP32, "||W||^2")
    outs, refs = run_qdora(x, packed, state, b, a, bb, m, 1.0, compute_dtype=FP32, need=(False, False, False, True))
    for name, o, r in zip(("y", "dm"), outs, refs, strict=True):
        assert_close(o, r, FP32, f"{name} after W changed in place")


def test_zero_norm_rows_are_finite(device):
    """A zero row of W (absmax 0 in its blocks) in a fresh layer: m = ||W_n|| = 0, g = m / eps = 0, the row's output
    is the bias and every gradient is finite (PEFT: 0 / 0 = NaN)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 12, device=device)
    with torch.no_grad():
        base.weight[[2, 7]] = 0
    layer = fastlora.Linear4bit.from_linear(base, r=4, alpha=8, use_dora=True, compute_dtype=FP32)
    assert layer.lora_magnitude[2] == 0 and layer.lora_magnitude[7] == 0
    x = torch.randn(9, 64, device=device, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all() and torch.equal(y[:, 2], layer.bias[2].expand(9))
    y.square().sum().backward()
    for t in (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad):
        assert torch.isfinite(t).all()


def test_bad_magnitude_is_rejected(device):
    x, packed, state, b, a, bb, m = make_qdora(3, 64, 8, 2, device=device)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out_features,\) = \(8,\); got \(9,\)"):
        fastlora.lora_linear_4bit(x, packed, state, b, a, bb, 1.0, magnitude=torch.ones(9, device=device))
    with pytest.raises(TypeError, match="magnitude must be a tensor"):
        fastlora.lora_linear_4bit(x, packed, state, b, a, bb, 1.0, magnitude=[1.0] * 8)
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        fastlora.Linear4bit(64, 8, use_dora=1)


def test_bf16_compute(device):
    # bf16 compute runs the kernels on CUDA; on CPU the interpreter's bf16 dots are wrong, so it takes the reference.
    x, packed, state, b, a, bb, m = make_qdora(7, 64, 24, 4, device=device)
    y = fastlora.lora_linear_4bit(x, packed, state, b, a, bb, 0.5, compute_dtype=torch.bfloat16, magnitude=m)
    w = quant.dequantize_4bit(packed, state, dtype=torch.float64)
    ref = reference.dora_linear(*f64(x, w, b, a, bb), 0.5, m.double())
    assert y.dtype == FP32
    assert_close(y, ref, torch.bfloat16, "y")


# ------------------------------------------------------------------------------------------------ Linear4bit


def qdora_layer(device, *, dropout=0.0, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    layer = fastlora.Linear4bit(64, 24, bias=bias, r=4, alpha=8, dropout=dropout, use_dora=True, device=device,
                                compute_dtype=FP32, **kw)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.3)
        layer.lora_magnitude.mul_(torch.rand(24, device=device) + 0.5)
    return layer


def _reference(layer, x, **kw):
    w = layer.dequantized_weight(torch.float64)
    xr, br, ar, bbr, mr = f64(x, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude)
    return reference.dora_linear(xr, w, br, ar, bbr, layer.scaling, mr, **kw), (xr, ar, bbr, mr)


def test_linear4bit_from_linear_initial_magnitude_and_state_dict(device):
    torch.manual_seed(0)
    base = nn.Linear(128, 40, device=device)
    layer = fastlora.Linear4bit.from_linear(base, r=8, alpha=16, use_dora=True, compute_dtype=FP32)
    w = layer.dequantized_weight(torch.float64)
    assert layer.lora_magnitude.dtype == FP32 and layer.lora_magnitude.requires_grad
    assert_close(layer.lora_magnitude, torch.linalg.vector_norm(w, dim=1), FP32, "m = ||deq(W)_n||")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "lora_magnitude"}
    x = torch.randn(2, 5, 128, device=device)
    assert_close(layer(x), nn.functional.linear(x.double(), w, base.bias.double()), FP32, "fresh layer = base")
    keys = list(layer.state_dict())
    assert keys[:5] == ["weight", "bias", "lora_A", "lora_B", "lora_magnitude"]
    assert "use_dora=True" in repr(layer)
    other = fastlora.Linear4bit(128, 40, r=8, alpha=16, use_dora=True, compute_dtype=FP32, device=device)
    with torch.no_grad():
        layer.lora_magnitude.mul_(1.5)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    new = layer._with_new_adapter(r=4, alpha=4, use_dora=True)
    assert new.weight is layer.weight and new.use_dora and new.lora_magnitude is not layer.lora_magnitude
    assert_close(new.lora_magnitude, torch.linalg.vector_norm(w, dim=1), FP32, "new adapter's m")
    assert not layer._with_new_adapter(r=4, alpha=4).use_dora


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_linear4bit_trains_every_parameter(p, device):
    layer = qdora_layer(device, dropout=p, bias=False).train()
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    mask = None
    if p > 0:  # the seed the layer drew: the next draw of torch's CPU generator after manual_seed(5)
        torch.manual_seed(5)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        mask = fastlora.dropout_mask(x.shape, p, seed, device)
    yr, (xr, ar, bbr, mr) = _reference(layer, x, dropout_p=p, training=p > 0, dropout_mask=mask)
    outs, refs = dora_layer_backward(layer, x, y, yr, xr, ar, bbr, mr)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, FP32, name)
    assert layer.weight.grad is None


@pytest.mark.parametrize("which", ["lora_A", "lora_B", "lora_magnitude", "weight"])
def test_eval_cache_follows_in_place_updates(which, device, dora_caching):
    layer = qdora_layer(device).eval()
    x = torch.randn(5, 64, device=device)
    before = layer(x)
    assert layer._norm_cache is not None and layer._norm() is layer._norm_cache[1], "eval reuses the norm"
    with torch.no_grad():
        if which == "weight":
            layer.weight[:40] = 0x77  # codes of the first rows rewritten in place
        else:
            getattr(layer, which).mul_(1.5)  # an optimizer step between evaluations
    after = layer(x)
    assert_close(after, _reference(layer, x)[0], FP32, f"y after {which} changed")
    assert (after - before).abs().max() > 1e-4


def test_merge_is_refused_and_dequantize_merges_exactly(device):
    layer = qdora_layer(device).eval()
    with pytest.raises(NotImplementedError, match="cannot merge its DoRA adapter"):
        layer.merge()
    x = torch.randn(6, 64, device=device)
    y = layer(x)
    dense = layer.dequantize()
    assert dense.use_dora and dense.lora_magnitude is layer.lora_magnitude
    assert_close(dense(x), y.double(), FP32, "dequantised layer")
    dense.merge()
    assert_close(dense(x), y.double(), FP32, "merged dequantised layer")


def test_linear4bit_from_bitsandbytes(device):
    """A bitsandbytes Linear4bit is shared as it is; compared with the float64 reference on the weight decoded by
    fastlora's format oracle (``quant.dequantize_4bit``), which holds on AVX2 and AVX512 CPUs alike."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, compute_dtype=FP32, quant_type="fp4").to(device)
    layer = fastlora.Linear4bit.from_linear(base, r=4, alpha=8, use_dora=True)
    assert layer.weight is base.weight and layer.use_dora and layer.compute_dtype == FP32
    w = layer.dequantized_weight(torch.float64)
    assert_close(layer.lora_magnitude, torch.linalg.vector_norm(w, dim=1), FP32, "m")
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.3)
        layer.lora_magnitude.mul_(torch.rand(48, device=device) + 0.5)
    x = torch.randn(7, 64, device=device, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, (xr, ar, bbr, mr) = _reference(layer, x)
    yr.backward(dy.double())
    for name, o, r in (("y", y, yr), ("dx", x.grad, xr.grad), ("dm", layer.lora_magnitude.grad, mr.grad)):
        assert_close(o, r, FP32, name)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(fastlora.Linear4bit(64, 64, r=4, alpha=8, use_dora=True, compute_dtype=FP32), nn.GELU(),
                          fastlora.Linear4bit(64, 20, bias=False, r=3, alpha=-2, use_dora=True, blocksize=32,
                                              double_quant=False, compute_dtype=FP32)).train()
    for layer in model[::2]:
        with torch.no_grad():
            nn.init.normal_(layer.lora_B)
            layer.lora_magnitude.mul_(torch.rand(layer.out_features) + 0.5)
    compiled_matches_eager(model, 64, 6, assert_close)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_meta_tensors_infer_shapes(train):
    x = torch.empty(3, 5, 64, device="meta", requires_grad=True)
    layer = fastlora.Linear4bit(64, 32, r=4, dropout=0.1, use_dora=True, device="meta").train(train)
    assert layer.lora_magnitude.device.type == "meta" and layer.lora_magnitude.shape == (32,)
    y = layer(x)
    assert (y.shape, y.device, y.dtype) == ((3, 5, 32), x.device, x.dtype)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora_magnitude.grad.shape == (32,)
