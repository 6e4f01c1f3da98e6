"""fastlora.quant's block-scaled FP8 (float8_e4m3fn codes, 2-D block scales) and reference.lora_linear_fp8: the
round-trip bound, exact values, zero and partial edge blocks, bf16 scales, every error message, transformers'
dequantisation where it is installed."""

import math
import re

import pytest
import torch
from helpers import case_id

from fastlora import quant, reference
from fastlora.quant import check_fp8_blockwise, dequantize_fp8_blockwise, quantize_fp8_blockwise

E4M3 = torch.float8_e4m3fn
TINY = torch.finfo(torch.float32).tiny
# Every finite e4m3 value, as fp32 (bit patterns 0x7F and 0xFF are NaN).
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
E4M3_VALUES = E4M3_VALUES[~E4M3_VALUES.isnan()]
SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _blocks(shape, block_size):
    """(row slice, column slice, block index) of every block, edge blocks partial."""
    (N, K), (bn, bk) = shape, block_size
    for i in range(-(-N // bn)):
        for j in range(-(-K // bk)):
            yield slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk), (i, j)


def _weight(shape, seed, dtype=torch.float32):
    """Normal values with a per-row spread of 2^-8..2^8, so blocks see different scales."""
    w = torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    w = w * torch.exp2(torch.randint(-8, 9, (shape[0], 1), generator=_gen(seed + 1)).double())
    return w.to(dtype)


SHAPES = [(1, 1), (3, 5), (129, 257), (300, 200), (256, 128)]
BLOCKS = [(128, 128), (64, 32)]
ROUND_TRIP = [pytest.param(shape, block, sd, wd, id=case_id(N=shape[0], K=shape[1], b=f"{block[0]}x{block[1]}",
                                                               scale=sd, w=wd))
              for shape in SHAPES for block in BLOCKS for sd in SCALE_DTYPES for wd in ("fp32", "bf16")]


@pytest.mark.parametrize("shape, block_size, scale_dtype, w_dtype", ROUND_TRIP)
def test_round_trip(shape, block_size, scale_dtype, w_dtype):
    """Per block s = amax / 448 (fp32, then rounded to the scale dtype), the block's amax coded as +-448, and every
    element within max(2^-4 |w|, 2^-10 s) of w: round to nearest in e4m3 (3 mantissa bits) moves a normal value
    by at most half its spacing, 2^-4 of the binade's bottom (1/17 relative at worst, ties to even), and a
    subnormal one (|w / s| < 2^-6, spacing 2^-9) by at most 2^-10. fp32's rounding of w / s can tip a tie (by
    2^-24 |w|): the slack of 2^-20 on the bound. The product is exact here (float64)."""
    sd = SCALE_DTYPES[scale_dtype]
    w = _weight(shape, seed=sum(shape), dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[w_dtype])
    weight, scale = quantize_fp8_blockwise(w, block_size, scale_dtype=sd)
    nb = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    assert weight.dtype == E4M3 and weight.shape == w.shape
    assert scale.dtype == sd and tuple(scale.shape) == nb
    out = dequantize_fp8_blockwise(weight, scale, block_size, dtype=torch.float64)
    wd = w.double()
    for rows, cols, idx in _blocks(shape, block_size):
        block = w[rows, cols].float()
        s = (block.abs().amax() / 448.0).to(sd)
        assert scale[idx] == s, f"block {idx}: scale {scale[idx].item()!r}, expected amax/448 = {s.item()!r}"
        assert weight[rows, cols].float().abs().amax() == 448.0, f"block {idx} does not use e4m3's full range"
        err = (out[rows, cols] - wd[rows, cols]).abs()
        bound = torch.maximum(2**-4 * wd[rows, cols].abs(), torch.full_like(err, 2**-10 * s.double().item()))
        bound = bound * (1 + 2**-20)
        bad = (err > bound).nonzero()
        assert bad.numel() == 0, f"block {idx}: {bad.shape[0]} elements past the bound, first at {bad[0].tolist()}: " \
            f"w {wd[rows, cols][tuple(bad[0])].item()!r}, dequantised {out[rows, cols][tuple(bad[0])].item()!r}"


def test_round_trip_bound_is_tight():
    """The bound above is not loose: uniform values in a binade reach close to 1/17 relative error."""
    w = torch.linspace(256.0, 448.0, 4097, dtype=torch.float64).to(torch.float32).view(17, 241)
    weight, scale = quantize_fp8_blockwise(w, (32, 256))
    assert scale.item() == 1.0
    out = dequantize_fp8_blockwise(weight, scale, (32, 256), dtype=torch.float64)
    rel = ((out - w.double()) / w.double()).abs().max()
    assert 1 / 17 - 1e-3 < rel <= 1 / 17


def _exact_weight(shape, block_size, scales, seed):
    """e4m3 values times each block's scale, one +-448 per block (so amax / 448 is the scale itself): (w, codes)."""
    codes = E4M3_VALUES[torch.randint(0, E4M3_VALUES.numel(), shape, generator=_gen(seed))]
    for rows, cols, idx in _blocks(shape, block_size):
        block = codes[rows, cols]
        block[idx[0] * 7 % block.shape[0], idx[1] * 5 % block.shape[1]] = -448.0 if idx[1] % 2 else 448.0
    w = codes * quant._expand_blocks(scales, shape, block_size)
    return w, codes


@pytest.mark.parametrize("shape, block_size", [((1, 1), (128, 128)), ((129, 257), (128, 128)),
                                               ((300, 200), (64, 32))], ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("scale_dtype", list(SCALE_DTYPES))
def test_exact_values(shape, block_size, scale_dtype):
    """w = e4m3 code x block scale (scales with few significant bits, powers of two among them) round-trips bit for
    bit: the codes are w's e4m3 values and the scales the ones w was built with."""
    sd = SCALE_DTYPES[scale_dtype]
    nb = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    mant = torch.tensor([1.0, 1.5, 1.3125, 1.75, 1.1875])
    scales = mant[torch.arange(math.prod(nb)) % 5] * torch.exp2(torch.arange(math.prod(nb)) % 23 - 16.0)
    scales = scales.view(nb)
    w, codes = _exact_weight(shape, block_size, scales, seed=3)
    weight, scale = quantize_fp8_blockwise(w, block_size, scale_dtype=sd)
    assert torch.equal(weight.float(), codes)
    assert torch.equal(scale, scales.to(sd)) and torch.equal(scale.float(), scales)
    assert torch.equal(dequantize_fp8_blockwise(weight, scale, block_size), w)


def test_zero_and_tiny_blocks():
    """An all-zero block (full or partial) gets scale 1.0 and decodes to exact zeros; a block whose amax / 448 is
    below fp32's smallest normal gets that normal; the other blocks are as without them."""
    w = _weight((300, 200), seed=5)
    w[:128, 128:] = 0  # full row of blocks, partial in K
    w[256:, :128] = 0  # partial in N
    w[128:256, 128:] = 1e-38 * torch.rand(128, 72, generator=_gen(6))  # amax / 448 < 2^-126: fp32 subnormal
    weight, scale = quantize_fp8_blockwise(w)
    assert scale[0, 1] == quant.ZERO_BLOCK_SCALE == 1.0 and scale[2, 0] == 1.0
    assert scale[1, 1] == TINY
    assert torch.isfinite(scale).all() and (scale > 0).all()
    out = dequantize_fp8_blockwise(weight, scale)
    assert torch.equal(out[:128, 128:], torch.zeros(128, 72)) and torch.equal(out[256:, :128], torch.zeros(44, 128))
    tiny = w[128:256, 128:].double()
    assert ((out[128:256, 128:].double() - tiny).abs() <= (2**-4 * tiny.abs()).clamp_min(2**-10 * TINY)).all()
    ref_w, ref_s = quantize_fp8_blockwise(_weight((300, 200), seed=5))
    for rows, cols, idx in [(slice(0, 128), slice(0, 128), (0, 0)), (slice(128, 256), slice(0, 128), (1, 0)),
                            (slice(256, 300), slice(128, 200), (2, 1))]:
        assert scale[idx] == ref_s[idx] and torch.equal(weight[rows, cols].float(), ref_w[rows, cols].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_zero_weight(dtype):
    weight, scale = quantize_fp8_blockwise(torch.zeros(130, 5), scale_dtype=dtype)
    assert torch.equal(scale, torch.ones(2, 1, dtype=dtype))
    assert torch.equal(dequantize_fp8_blockwise(weight, scale), torch.zeros(130, 5))


def test_bf16_scale_rounded_first():
    """A bf16 scale is rounded before w is divided by it. Here fp32 amax / 448 = 2^-7 (1 - 2^-9), which rounds to
    2^-7 in bf16; an element at 2^-7 x 1.0625 (1 - 2^-12), just under the midpoint between the e4m3 codes 1.0 and
    1.125, codes to 1.0 with the bf16 scale and 1.125 with the fp32 one."""
    w = torch.zeros(2, 3)
    w[0, 0] = 448 * 2**-7 * (1 - 2**-9)
    w[1, 2] = 2**-7 * 1.0625 * (1 - 2**-12)
    weight, scale = quantize_fp8_blockwise(w, scale_dtype=torch.bfloat16)
    assert scale.item() == 2**-7 and weight[1, 2].float().item() == 1.0 and weight[0, 0].float().item() == 448.0
    weight, scale = quantize_fp8_blockwise(w, scale_dtype=torch.float32)
    assert scale.item() == 2**-7 * (1 - 2**-9) and weight[1, 2].float().item() == 1.125


def test_bf16_scale_rounded_down_clamps_to_448(device):
    """When bf16 rounds the scale down, amax / s passes 448 (by < 2^-8) and is clamped, never NaN (torch's CPU cast
    saturates by itself; CUDA's need not)."""
    w = torch.tensor([[448 * 2**-7 * (1 + 2**-9), -448 * 2**-7 * (1 + 2**-9)]], device=device)
    weight, scale = quantize_fp8_blockwise(w, scale_dtype=torch.bfloat16)
    assert scale.item() == 2**-7 and weight.float().tolist() == [[448.0, -448.0]]


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_input_dtypes(w_dtype):
    """fp16 and fp64 weights quantise as their fp32 values do."""
    w = _weight((65, 130), seed=8).to(w_dtype)
    got, expected = quantize_fp8_blockwise(w, (64, 64)), quantize_fp8_blockwise(w.float(), (64, 64))
    assert torch.equal(got[0].float(), expected[0].float()) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_refused(bad):
    w = _weight((129, 3), seed=9)
    w[128, 1] = bad
    with pytest.raises(ValueError, match=r"^w has inf or NaN entries"):
        quantize_fp8_blockwise(w)


def test_float64_past_float32_refused():
    with pytest.raises(ValueError, match=r"^w has inf or NaN entries \(in float32\)"):
        quantize_fp8_blockwise(torch.tensor([[1.0, 1e300]], dtype=torch.float64))


BAD_BLOCK_SIZES = [(0, 128), (128, -1), (128,), (128, 128, 1), 128, (1.5, 2), (True, 1), "ab", None]


@pytest.mark.parametrize("block_size", BAD_BLOCK_SIZES, ids=repr)
def test_block_size_errors(block_size):
    message = re.escape(f"block_size must be two positive ints (rows, columns); got {block_size!r}")
    weight, scale = quantize_fp8_blockwise(torch.ones(4, 4))
    for call in (lambda: quantize_fp8_blockwise(torch.ones(4, 4), block_size),
                 lambda: dequantize_fp8_blockwise(weight, scale, block_size),
                 lambda: check_fp8_blockwise(weight, scale, block_size)):
        with pytest.raises(ValueError, match=f"^{message}$"):
            call()


@pytest.mark.parametrize("call, error, message", [
    (lambda: quantize_fp8_blockwise([[1.0]]), TypeError, "w must be a torch.Tensor; got list"),
    (lambda: quantize_fp8_blockwise(torch.ones(2, 2, dtype=torch.int32)), TypeError,
     "w must be float16, bfloat16, float32 or float64; got torch.int32"),
    (lambda: quantize_fp8_blockwise(torch.ones(8)), ValueError,
     "w must be 2-D (out_features, in_features); got shape (8,)"),
    (lambda: quantize_fp8_blockwise(torch.ones(2, 2, 2)), ValueError,
     "w must be 2-D (out_features, in_features); got shape (2, 2, 2)"),
    (lambda: quantize_fp8_blockwise(torch.ones(2, 2), scale_dtype=torch.float16), TypeError,
     "scale_dtype must be torch.float32 or torch.bfloat16; got torch.float16"),
    (lambda: quantize_fp8_blockwise(torch.ones(2, 2), scale_dtype=E4M3), TypeError,
     "scale_dtype must be torch.float32 or torch.bfloat16; got torch.float8_e4m3fn"),
], ids=["w-list", "w-int", "w-1d", "w-3d", "scale-fp16", "scale-fp8"])
def test_quantize_errors(call, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


def _pair(shape=(300, 200), block_size=(128, 128)):
    return quantize_fp8_blockwise(_weight(shape, seed=11), block_size)


@pytest.mark.parametrize("args, error, message", [
    (lambda w, s: (w.float(), s), TypeError, "weight must be a torch.float8_e4m3fn tensor; got torch.float32"),
    (lambda w, s: (w.view(torch.uint8), s), TypeError, "weight must be a torch.float8_e4m3fn tensor; got torch.uint8"),
    (lambda w, s: (w.float().to(torch.float8_e5m2), s), TypeError,
     "weight must be a torch.float8_e4m3fn tensor; got torch.float8_e5m2"),
    (lambda w, s: (None, s), TypeError, "weight must be a torch.float8_e4m3fn tensor; got NoneType"),
    (lambda w, s: (w[0], s), ValueError, "weight must be 2-D (out_features, in_features); got shape (200,)"),
    (lambda w, s: (w, s.half()), TypeError,
     "weight_scale_inv must be a torch.float32 or torch.bfloat16 tensor; got torch.float16"),
    (lambda w, s: (w, s.tolist()), TypeError,
     "weight_scale_inv must be a torch.float32 or torch.bfloat16 tensor; got list"),
    (lambda w, s: (w, s[:2]), ValueError, "weight_scale_inv must have shape (ceil(N/128), ceil(K/128)) = (3, 2) for "
     "weight (300, 200) and block_size (128, 128); got (2, 2)"),
    (lambda w, s: (w, s.t()), ValueError, "weight_scale_inv must have shape (ceil(N/128), ceil(K/128)) = (3, 2) for "
     "weight (300, 200) and block_size (128, 128); got (2, 3)"),
    (lambda w, s: (w, s.reshape(-1)), ValueError, "weight_scale_inv must have shape (ceil(N/128), ceil(K/128)) = "
     "(3, 2) for weight (300, 200) and block_size (128, 128); got (6,)"),
    (lambda w, s: (w, s.to("meta")), ValueError, "weight_scale_inv must be on weight's device cpu; got meta"),
], ids=["weight-fp32", "weight-uint8", "weight-e5m2", "weight-none", "weight-1d", "scale-fp16", "scale-list",
        "scale-rows", "scale-transposed", "scale-flat", "scale-device"])
def test_dequantize_errors(args, error, message):
    weight, scale = args(*_pair())
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        check_fp8_blockwise(weight, scale, (128, 128))
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        dequantize_fp8_blockwise(weight, scale)


def test_scale_shape_names_the_block_size():
    weight, scale = _pair((300, 200), (64, 32))
    assert check_fp8_blockwise(weight, scale, (64, 32)) is None
    message = ("weight_scale_inv must have shape (ceil(N/128), ceil(K/128)) = (3, 2) for weight (300, 200) and "
               "block_size (128, 128); got (5, 7)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        dequantize_fp8_blockwise(weight, scale)
    message = ("weight_scale_inv must have shape (ceil(N/64), ceil(K/32)) = (5, 7) for weight (300, 200) and "
               "block_size (64, 32); got (3, 2)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        dequantize_fp8_blockwise(*_pair(), (64, 32))


def test_dequantize_dtype():
    weight, scale = _pair()
    with pytest.raises(TypeError, match=r"^dtype must be float16, bfloat16, float32 or float64; got torch.int8$"):
        dequantize_fp8_blockwise(weight, scale, dtype=torch.int8)
    exact = dequantize_fp8_blockwise(weight, scale, dtype=torch.float64)
    assert torch.equal(exact, weight.double() * quant._expand_blocks(scale.double(), weight.shape, (128, 128)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_fp8_blockwise(weight, scale, dtype=dtype), exact.float().to(dtype))


# transformers' FineGrainedFP8: Fp8Dequantize (checkpoint loading with dequantize=True; needs shapes divisible by
# the scale grid), _dequantize_fp8_weight (its backward; partial blocks, products in the output dtype) and
# Fp8Quantize (saving).
TF_SHAPES = [((256, 384), (128, 128)), ((129, 257), (128, 128)), ((300, 200), (64, 32)), ((1, 1), (128, 128))]


def _fp8_integration():
    pytest.importorskip("transformers", reason="needs fastlora[peft] (transformers)")
    return pytest.importorskip("transformers.integrations.finegrained_fp8")


@pytest.mark.parametrize("shape, block_size", TF_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("scale_dtype", list(SCALE_DTYPES))
def test_transformers_dequantize(shape, block_size, scale_dtype):
    fp8 = _fp8_integration()
    weight, scale = quantize_fp8_blockwise(_weight(shape, seed=12), block_size, scale_dtype=SCALE_DTYPES[scale_dtype])
    ours = dequantize_fp8_blockwise(weight, scale, block_size)
    assert torch.equal(fp8._dequantize_fp8_weight(weight, scale, list(block_size), torch.float32), ours)
    if shape[0] % block_size[0] or shape[1] % block_size[1]:
        return
    for dtype in (torch.float32, torch.bfloat16):
        theirs = fp8.Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=dtype)
        assert torch.equal(theirs, dequantize_fp8_blockwise(weight, scale, block_size, dtype=dtype))


def test_transformers_quantize():
    """transformers' Fp8Quantize stores 1 / (448 / amax) and multiplies by 448 / amax: its scales are ours to an
    fp32 rounding, its zero block's scale is ours (1.0), and its codes decode within our bound."""
    from types import SimpleNamespace

    fp8 = _fp8_integration()
    w = _weight((256, 384), seed=13)
    w[128:, 256:] = 0
    config = SimpleNamespace(weight_block_size=[128, 128], scale_fmt="float")
    out = fp8.Fp8Quantize(SimpleNamespace(quantization_config=config)).convert({"l.weight": w})
    weight, scale = quantize_fp8_blockwise(w)
    assert out["l.weight_scale_inv"][1, 2] == scale[1, 2] == 1.0
    assert ((out["l.weight_scale_inv"].double() - scale.double()).abs() <= 2**-23 * scale.double()).all()
    theirs = dequantize_fp8_blockwise(out["l.weight"], out["l.weight_scale_inv"], dtype=torch.float64)
    s = quant._expand_blocks(scale.double(), w.shape, (128, 128))
    assert ((theirs - w.double()).abs() <= torch.maximum(2**-4 * w.double().abs(), 2**-10 * s) * (1 + 2**-20)).all()


DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_lora_linear_fp8(dtype, dora, bias):
    """reference.lora_linear_fp8 is lora_linear (dora_linear with magnitude) on quant's dequantised W, bit for
    bit: its own dequantisation agrees with quant's."""
    dt = DTYPES[dtype]
    M, K, N, R, block_size = 17, 130, 96, 8, (64, 32)
    g = _gen(14)
    weight, scale = quantize_fp8_blockwise(_weight((N, K), seed=14) / K**0.5, block_size, scale_dtype=torch.bfloat16)
    x = torch.randn(3, M, K, generator=g).to(dt)
    b = torch.randn(N, generator=g).to(dt) if bias else None
    a, bb = (torch.randn(R, K, generator=g) / K**0.5).to(dt), torch.randn(N, R, generator=g).to(dt)
    mask = torch.rand(3, M, K, generator=g) > 0.25
    kw = dict(dropout_p=0.25, training=True, dropout_mask=mask)
    w = dequantize_fp8_blockwise(weight, scale, block_size, dtype=dt)
    if dora:
        m = (torch.rand(N, generator=g) + 0.5).to(dt)
        expected = reference.dora_linear(x, w, b, a, bb, -0.7, m, **kw)
    else:
        m, expected = None, reference.lora_linear(x, w, b, a, bb, -0.7, **kw)
    got = reference.lora_linear_fp8(x, weight, scale, b, a, bb, -0.7, block_size=block_size, magnitude=m, **kw)
    assert got.dtype == dt and torch.equal(got, expected)
    other = reference.lora_linear_fp8(x, weight, scale, b, a, bb, -0.7, block_size=(48, 27), magnitude=m, **kw)
    assert not torch.equal(other, expected)  # the block size is used, not ignored


@pytest.mark.gpu
@pytest.mark.parametrize("scale_dtype", list(SCALE_DTYPES))
def test_cuda_matches_cpu(scale_dtype):
    w = _weight((300, 200), seed=15)
    w[:128, :64] = 0
    sd = SCALE_DTYPES[scale_dtype]
    weight, scale = quantize_fp8_blockwise(w, (128, 64), scale_dtype=sd)
    cw, cs = quantize_fp8_blockwise(w.cuda(), (128, 64), scale_dtype=sd)
    assert cw.is_cuda and cs.is_cuda
    assert torch.equal(cw.cpu().view(torch.uint8), weight.view(torch.uint8)) and torch.equal(cs.cpu(), scale)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert torch.equal(dequantize_fp8_blockwise(cw, cs, (128, 64), dtype=dtype).cpu(),
                           dequantize_fp8_blockwise(weight, scale, (128, 64), dtype=dtype))
    with pytest.raises(ValueError, match=r"^weight_scale_inv must be on weight's device cuda:0; got cpu$"):
        dequantize_fp8_blockwise(cw, scale, (128, 64))
