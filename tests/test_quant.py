"""fastlora.quant: bitsandbytes' 4-bit format. Byte equality with bitsandbytes where it is installed; the
round-trip bounds, layout and errors everywhere."""

import math

import pytest
import torch

from fastlora import quant
from fastlora.quant import DYNAMIC_CODE, FP4_CODE, NF4_CODE, QuantState4bit, dequantize_4bit, quantize_4bit

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale


def _normal(N, K, seed):
    return _randn((N, K), seed)


def _zero_block(N, K, seed):
    """An all-zero full 64-block (absmax 0) and an all-zero last block, partial when N*K % 64 != 0."""
    w = _randn((N, K), seed)
    w.view(-1)[64:128] = 0
    w.view(-1)[-(w.numel() % 64 or 64):] = 0
    return w


def _outliers(N, K, seed):
    w = _randn((N, K), seed, 1e-3)
    w.view(-1)[:: 97] = 3e3  # 3e6 x the rest: the blocks holding one quantise everything else to 0
    return w


def _ties(N, K, seed):
    """Every element of a block on a midpoint between two NF4 codes (scaled by an absmax of 1)."""
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).double()
    w = mids[torch.randint(0, 15, (N, K), generator=_gen(seed))]
    w.view(-1)[::64] = 1.0
    return w


# name -> (N, K, maker). Odd N, K not a multiple of 64, N*K odd, partial last blocks, > 256 absmax blocks.
CASES = {
    "N1-K1": (1, 1, _normal),
    "N3-K5": (3, 5, _normal),
    "N17-K130": (17, 130, _normal),
    "N64-K64": (64, 64, _normal),
    "N257-K96": (257, 96, _normal),
    "N33-K67-zero-blocks": (33, 67, _zero_block),
    "N31-K64-outliers": (31, 64, _outliers),
    "N16-K128-ties": (16, 128, _ties),
    "N8-K64-tiny": (8, 64, lambda N, K, s: _randn((N, K), s, 1e-30)),
    "N8-K64-huge": (8, 64, lambda N, K, s: _randn((N, K), s, 6e3)),
}


def _weight(case, dtype, seed=0):
    N, K, make = CASES[case]
    return make(N, K, seed).to(dtype)


def _unpack(packed, n):
    b = packed.reshape(-1)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()


def _bound_violations(w, packed, state):
    """Elements whose decoded value misses w by more than absmax * half the widest codebook gap, plus what
    double quant moves absmax by (|code| <= 1) and fp32's rounding of the scaled value."""
    n, bs = w.numel(), state.blocksize
    flat = w.double().reshape(-1)
    nb = state.nblocks
    true_absmax = torch.nn.functional.pad(flat.abs(), (0, nb * bs - n)).view(nb, bs).amax(1)
    half_gap = (state.code.sort().values.diff().max() / 2).item()
    moved = (quant.dequantize_absmax(state).double() - true_absmax).abs()
    bound = (true_absmax * (half_gap + 2.0**-22) + moved).repeat_interleave(bs)[:n]
    err = (dequantize_4bit(packed, state, dtype=torch.float64).reshape(-1) - flat).abs()
    return int((err > bound).sum())


@pytest.mark.parametrize("dq", [False, True], ids=["single", "dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", ["N3-K5", "N17-K130", "N257-K96", "N33-K67-zero-blocks", "N31-K64-outliers"])
def test_roundtrip_error_bound(case, quant_type, dtype, dq):
    w = _weight(case, dtype, seed=1)
    packed, state = quantize_4bit(w, quant_type=quant_type, double_quant=dq)
    assert _bound_violations(w, packed, state) == 0
    # The bound has teeth: the same bytes read with the nibbles of each byte swapped break it.
    if w.numel() > 8:
        swapped = (packed << 4) | (packed >> 4)
        assert _bound_violations(w, swapped, state) > 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_are_nearest(quant_type):
    """Each element gets a nearest code to w / absmax (ties: either neighbour), up to fp32's rounding."""
    w = _weight("N257-K96", torch.float32, seed=2)
    packed, state = quantize_4bit(w, quant_type=quant_type, double_quant=False)
    s = w.double().reshape(-1) / state.absmax.double().repeat_interleave(64)[: w.numel()]
    dist = (s[:, None] - state.code.double()[None, :]).abs()
    chosen = dist.gather(1, _unpack(packed, w.numel())[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 2.0**-21).all()


def test_double_quant_absmax_error_bound():
    """Decoded absmax within absmax2 * (half the widest dynamic-code gap + half a grid step) of the exact one."""
    w = _weight("N257-K96", torch.float32, seed=3)
    _, single = quantize_4bit(w, double_quant=False)
    _, state = quantize_4bit(w, double_quant=True)
    assert torch.equal(state.offset, single.absmax.mean())
    err = (quant.dequantize_absmax(state).double() - single.absmax.double()).abs()
    half_gap = DYNAMIC_CODE.double().diff().max().item() / 2
    scale = state.absmax2.double().repeat_interleave(256)[: state.nblocks]
    rounding = 2.0**-22 * (state.offset.double().abs() + scale)  # the fp32 multiply and add
    assert (err <= scale * (half_gap + 1 / 65535) + rounding).all()
    assert err.max() > 0  # the codes are lossy: a bound on an exact copy would test nothing


def test_layout_by_hand():
    """Element 2i is the high nibble of byte i; odd N*K pads a low nibble for 0.0 (NF4 code 7)."""
    w = torch.tensor([[1.0, -1.0, 0.0]])
    packed, state = quantize_4bit(w, double_quant=False)
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.reshape(-1).tolist() == [0xF0, 0x77]
    assert state.absmax.tolist() == [1.0] and state.shape == (1, 3) and state.dtype == torch.float32
    assert torch.equal(dequantize_4bit(packed, state), w)


def test_partial_and_zero_blocks():
    """A full all-zero block stores absmax 0; an all-zero partial last block stores 1e-38 (clamped), as bnb."""
    w = torch.zeros(1, 64 + 10)
    w[0, 3] = 2.0
    packed, state = quantize_4bit(w, blocksize=32, double_quant=False)
    assert state.absmax.tolist() == [2.0, 0.0, torch.tensor(1e-38).item()]
    assert packed.reshape(-1)[2:].tolist() == [0x77] * 35
    assert torch.equal(dequantize_4bit(packed, state), w)


@pytest.mark.parametrize("dq", [False, True], ids=["single", "dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_float64_path_rounds_to_the_dtype_path(dtype, dq):
    w = _weight("N17-K130", dtype, seed=4)
    packed, state = quantize_4bit(w, quant_type="fp4", double_quant=dq)
    exact = dequantize_4bit(packed, state, dtype=torch.float64)
    assert torch.equal(dequantize_4bit(packed, state), exact.float().to(dtype))
    assert torch.equal(dequantize_4bit(packed, state, dtype=torch.float32), exact.float())


def test_non_contiguous_weight():
    w = _weight("N17-K130", torch.bfloat16, seed=12).t()
    packed, state = quantize_4bit(w)
    expected_packed, expected = quantize_4bit(w.contiguous())
    assert torch.equal(packed, expected_packed) and torch.equal(state.absmax, expected.absmax)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.int32], ids=["bf16", "int32"])
def test_quant_storage_views(storage):
    """bitsandbytes' quant_storage keeps the same bytes under another dtype; they decode the same."""
    w = _weight("N64-K64", torch.float16, seed=5)
    packed, state = quantize_4bit(w)
    assert torch.equal(dequantize_4bit(packed.view(-1).view(storage)[:, None], state), dequantize_4bit(packed, state))


def test_codebooks():
    assert NF4_CODE.shape == (16,) and torch.equal(NF4_CODE.sort().values, NF4_CODE)
    assert NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    assert (FP4_CODE * 12).tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]
    assert DYNAMIC_CODE.shape == (256,) and torch.equal(DYNAMIC_CODE.sort().values, DYNAMIC_CODE)
    assert DYNAMIC_CODE.unique().numel() == 256 and DYNAMIC_CODE[-1] == 1 and (DYNAMIC_CODE == 0).sum() == 1


def _bad_state():
    _, state = quantize_4bit(torch.ones(4, 64))
    state.absmax2 = state.absmax2[:0]
    return state


@pytest.mark.parametrize("call, error, match", [
    (lambda: quantize_4bit(torch.ones(4, 64), blocksize=48), ValueError, r"blocksize must be one of .*got 48"),
    (lambda: quantize_4bit(torch.ones(4, 64), blocksize=8192), ValueError, r"blocksize .*got 8192"),
    (lambda: quantize_4bit(torch.ones(4, 64), quant_type="int4"), ValueError, r"quant_type .*'int4'"),
    (lambda: quantize_4bit(torch.ones(4, 64, dtype=torch.float64)), TypeError, r"weight must be .*float64"),
    (lambda: quantize_4bit(torch.ones(4, 64, dtype=torch.int8)), TypeError, r"weight must be .*int8"),
    (lambda: quantize_4bit([[1.0]]), TypeError, r"weight must be a torch.Tensor; got list"),
    (lambda: quantize_4bit(torch.ones(64)), ValueError, r"2-D .*got \(64,\)"),
    (lambda: quantize_4bit(torch.ones(2, 3, 4)), ValueError, r"2-D .*got \(2, 3, 4\)"),
    (lambda: quantize_4bit(torch.ones(0, 64)), ValueError, r"non-empty .*got \(0, 64\)"),
    (lambda: quantize_4bit(torch.tensor([[1.0, math.nan]])), ValueError, r"inf or NaN"),
    (lambda: dequantize_4bit(torch.zeros(3, 1, dtype=torch.uint8), quantize_4bit(torch.ones(3, 3))[1]),
     ValueError, r"\(N\*K \+ 1\) // 2 = 5 bytes for shape \(3, 3\); got 3 bytes"),
    (lambda: dequantize_4bit(*quantize_4bit(torch.ones(2, 2)), dtype=torch.int32), TypeError, r"dtype must be"),
    (lambda: dequantize_4bit(torch.zeros(128, 1, dtype=torch.uint8), _bad_state()), ValueError,
     r"absmax2 must be a torch.float32 tensor of shape \(1,\); got torch.float32 \(0,\)"),
], ids=["blocksize-48", "blocksize-8192", "quant_type-int4", "weight-fp64", "weight-int8", "weight-list",
        "weight-1d", "weight-3d", "weight-empty", "weight-nan", "packed-size", "out-dtype-int32", "state-absmax2"])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# Against bitsandbytes itself: skipped where it is not installed.

@pytest.fixture
def bnbF():
    # 0.50 changed the CPU rounding of the double-quant codes, which these tests pin (see fastlora/quant.py).
    pytest.importorskip("bitsandbytes", minversion="0.50")
    import bitsandbytes.functional as F

    return F


def _format_dequant(packed, state, *, rows_restart=False):
    """The format written out, independent of ``quant.dequantize_4bit``: flat element j is
    ``code[q_j] * absmax[j // blocksize]`` in fp32, rounded to the weight's dtype. ``rows_restart``: the block index
    bitsandbytes 0.50's AVX512 CPU kernel uses instead, ``row * (K // blocksize) + column // blocksize`` (see
    _assert_bnb_dequant)."""
    N, K = state.shape
    q = _unpack(packed.view(torch.uint8), N * K)
    j = torch.arange(N * K)
    block = (j // K) * (K // state.blocksize) + (j % K) // state.blocksize if rows_restart else j // state.blocksize
    absmax = quant.dequantize_absmax(state)
    return (state.code[q] * absmax[block.clamp(max=absmax.numel() - 1)]).view(N, K).to(state.dtype)


def _assert_bnb_dequant(bnbF, packed, theirs, ours_out):
    """bitsandbytes' ``dequantize_4bit`` of the same bytes gives ``ours_out``, the format, wherever it implements the
    format: always when K % blocksize == 0, and on its CUDA, default (pure torch) and scalar CPU paths. Its native
    AVX512 CPU kernel (0.50, taken when K % 16 == 0, and for blocksize < 2048 only when torch's CPU capability is
    AVX512) restarts the blocks at every row, which differs when K % blocksize != 0 (docs/qlora.md); there the
    result must be exactly that deviation, so fastlora, right by the format, is not compared with it."""
    expected = bnbF.dequantize_4bit(packed, theirs)
    assert expected.dtype == ours_out.dtype
    if torch.equal(expected, ours_out):
        return
    state = QuantState4bit.from_bnb(theirs)
    N, K = state.shape
    assert packed.device.type == "cpu" and K % 16 == 0 and K % state.blocksize != 0, \
        f"bitsandbytes decodes {tuple(state.shape)} blocksize {state.blocksize} differently from the format"
    assert torch.equal(expected, _format_dequant(packed, state, rows_restart=True))


def test_format_dequant_oracle_has_teeth():
    """The independent oracle agrees with fastlora, and its row-restart variant differs where blocks cross rows."""
    w = _weight("N257-K96", torch.float32, seed=12)
    packed, state = quantize_4bit(w, double_quant=True)
    assert torch.equal(_format_dequant(packed, state), dequantize_4bit(packed, state))
    assert not torch.equal(_format_dequant(packed, state, rows_restart=True), dequantize_4bit(packed, state))
    w = _weight("N64-K64", torch.float32, seed=12)
    packed, state = quantize_4bit(w, double_quant=False)
    assert torch.equal(_format_dequant(packed, state, rows_restart=True), dequantize_4bit(packed, state))


def _assert_same_state(ours: QuantState4bit, theirs):
    assert tuple(ours.shape) == tuple(theirs.shape) and ours.dtype == theirs.dtype
    assert ours.blocksize == theirs.blocksize and ours.quant_type == theirs.quant_type
    assert torch.equal(ours.code.view(torch.int32), theirs.code.view(torch.int32))
    assert ours.absmax.dtype == theirs.absmax.dtype and torch.equal(ours.absmax, theirs.absmax)
    assert ours.double_quant == (theirs.state2 is not None)
    if ours.double_quant:
        assert torch.equal(ours.offset.view(torch.int32), theirs.offset.view(torch.int32))
        assert torch.equal(ours.absmax2.view(torch.int32), theirs.state2.absmax.view(torch.int32))
        assert torch.equal(ours.code2.view(torch.int32), theirs.state2.code.view(torch.int32))
        assert ours.blocksize2 == theirs.state2.blocksize


@pytest.mark.parametrize("dq", [False, True], ids=["single", "dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", CASES)
def test_matches_bitsandbytes(bnbF, case, quant_type, dtype, dq):
    w = _weight(case, dtype, seed=6)
    theirs_packed, theirs = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=dq)
    assert packed.shape == theirs_packed.shape and torch.equal(packed, theirs_packed)
    _assert_same_state(state, theirs)
    out = dequantize_4bit(packed, state)
    assert torch.equal(out, _format_dequant(packed, state))
    _assert_bnb_dequant(bnbF, theirs_packed, theirs, out)


@pytest.mark.parametrize("blocksize", quant.BLOCKSIZES, ids=lambda b: f"bs{b}")
def test_matches_bitsandbytes_blocksizes(bnbF, blocksize):
    w = _weight("N257-K96", torch.bfloat16, seed=7)
    theirs_packed, theirs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_4bit(w, blocksize=blocksize)
    assert torch.equal(packed, theirs_packed)
    _assert_same_state(state, theirs)
    out = dequantize_4bit(packed, state)
    assert torch.equal(out, _format_dequant(packed, state))
    _assert_bnb_dequant(bnbF, theirs_packed, theirs, out)


def test_double_quant_rounding_matches_bitsandbytes(bnbF):
    """bnb 0.50's CPU 8-bit quantiser, probed where its 65536-point grid and the codes' midpoints decide."""
    code = DYNAMIC_CODE.double()
    k = torch.arange(1, 65536, dtype=torch.float64)
    centres = [(2 * (k - 0.5) / 65535 - 1).float(), ((code[:-1] + code[1:]) / 2).float()]
    probes = []
    for c in centres:
        up, down = c, c
        probes.append(c)
        for _ in range(3):
            up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
            probes += [up, down]
    probes.append(torch.rand(50_000, generator=_gen(8)) * 2 - 1)
    probes.append((torch.rand(50_000, generator=_gen(9)) * 2 - 1) * 1e-4)
    v = torch.cat(probes).clamp(-1, 1)
    v = torch.cat([v, torch.ones(-v.numel() % 255)]).view(-1, 255)
    x = torch.cat([v, torch.ones(v.shape[0], 1)], dim=1).reshape(-1)  # absmax 1 per 256-block: v is scaled as is
    theirs, theirs_state = bnbF.quantize_blockwise(x, blocksize=256)
    ours, absmax = quant._quantize_dynamic(x, 256)
    assert torch.equal(absmax, theirs_state.absmax) and torch.equal(ours, theirs)
    nearest = torch.bucketize(x, (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2)
    assert (nearest != theirs.long()).any()  # plain nearest-code rounding would not have passed


def test_codebooks_match_bitsandbytes(bnbF):
    for name, ours in {"nf4": NF4_CODE, "fp4": FP4_CODE}.items():
        assert torch.equal(ours.view(torch.int32), bnbF.get_4bit_type(name, device="cpu").view(torch.int32))
    assert torch.equal(DYNAMIC_CODE.view(torch.int32), bnbF.create_dynamic_map().view(torch.int32))


def _ptr(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dq", [False, True], ids=["single", "dq"])
def test_bnb_state_shares_storage_both_ways(bnbF, dq):
    w = _weight("N17-K130", torch.float16, seed=10)
    packed, state = quantize_4bit(w, quant_type="fp4", double_quant=dq)
    qs = state.to_bnb()
    back = QuantState4bit.from_bnb(qs)
    names = ["absmax", "code"] + (["offset", "absmax2", "code2"] if dq else [])
    for name in names:
        assert _ptr(getattr(back, name)) == _ptr(getattr(state, name)), name
    assert _ptr(qs.absmax) == _ptr(state.absmax) and _ptr(qs.code) == _ptr(state.code)
    if dq:
        assert _ptr(qs.state2.absmax) == _ptr(state.absmax2) and _ptr(qs.offset) == _ptr(state.offset)
    assert (back.shape, back.dtype, back.blocksize, back.quant_type, back.blocksize2) == \
        (state.shape, state.dtype, state.blocksize, state.quant_type, state.blocksize2)
    # bitsandbytes decodes our bytes and state as we do.
    _assert_bnb_dequant(bnbF, packed, qs, dequantize_4bit(packed, state))


@pytest.mark.parametrize("dq", [False, True], ids=["single", "dq"])
def test_bnb_checkpoint_state_loads(bnbF, dq):
    """A state as bitsandbytes serialises it (packed dict, e.g. safetensors) loads and decodes the same."""
    w = _weight("N33-K67-zero-blocks", torch.bfloat16, seed=11)
    packed, theirs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
    loaded = bnbF.QuantState.from_dict(theirs.as_dict(packed=True), device=torch.device("cpu"))
    state = QuantState4bit.from_bnb(loaded)
    assert _ptr(state.absmax) == _ptr(loaded.absmax)
    _assert_bnb_dequant(bnbF, packed, theirs, dequantize_4bit(packed, state))


def test_from_bnb_rejects_what_it_cannot_decode(bnbF):
    _, qs = bnbF.quantize_4bit(torch.ones(4, 64), quant_type="nf4")
    qs.code = FP4_CODE.clone()
    with pytest.raises(ValueError, match="not bitsandbytes' nf4 codebook"):
        QuantState4bit.from_bnb(qs)
    _, qs = bnbF.quantize_4bit(torch.ones(256), quant_type="nf4")
    with pytest.raises(ValueError, match=r"2-D .*got \(256,\)"):
        QuantState4bit.from_bnb(qs)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["single", "dq"])
def test_from_bnb_cpu_layout_undoes_bitsandbytes_repacking(bnbF, dq, quant_type, storage):
    """bitsandbytes' AVX512-BF16 CPU layout read back: the codes exactly, the scales as the bf16 values it then
    computes with (double quant decoded, rounded to bf16), the packed shape and storage dtype as first stored."""
    import copy

    w = _randn((96, 128), seed=13).to(torch.float16)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq,
                                    quant_storage=storage)
    original = QuantState4bit.from_bnb(copy.deepcopy(qs))
    repacked, rqs = bnbF._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(qs))
    assert rqs.packing_format_for_cpu and not torch.equal(repacked.reshape(-1), packed.view(torch.uint8).reshape(-1))
    with pytest.raises(ValueError, match="packing_format_for_cpu.*from_bnb_cpu_layout"):
        QuantState4bit.from_bnb(rqs)
    back, state = quant.from_bnb_cpu_layout(repacked, rqs)
    assert back.dtype == packed.dtype and back.shape == packed.shape
    assert torch.equal(back.view(torch.uint8), packed.view(torch.uint8))  # bytes: bf16 storage holds NaN patterns
    assert (state.dtype, state.blocksize, state.quant_type, state.double_quant) == (w.dtype, 64, quant_type, False)
    assert torch.equal(state.absmax, quant.dequantize_absmax(original).to(torch.bfloat16).float())
    # bitsandbytes' own inverse gives the same codes.
    theirs, _ = bnbF._convert_weight_packed_for_cpu_inverse(repacked.clone(), copy.deepcopy(rqs))
    assert torch.equal(theirs.view(torch.uint8), back.view(torch.uint8))
    with pytest.raises(ValueError, match="not in bitsandbytes' CPU layout"):
        quant.from_bnb_cpu_layout(packed, qs)
