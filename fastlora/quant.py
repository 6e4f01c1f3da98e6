"""Quantised base-weight formats in plain torch: bitsandbytes' 4-bit (NF4/FP4, blockwise absmax, double quant) and
block-scaled FP8 (``float8_e4m3fn`` codes with 2-D block scales, as DeepSeek's and Qwen's FP8 releases; see
``quantize_fp8_blockwise``, at the end).

The bytes and the state are bitsandbytes' own, so a model quantised by bitsandbytes loads as it is, and the
fused 4-bit kernels are tested against this module. Imports only torch, json and math; bitsandbytes is imported
lazily, by ``QuantState4bit.to_bnb`` alone.

The format, for a weight W of shape (N, K) flattened row-major into n = N*K elements:

- codes: a 4-bit index into a 16-entry codebook (``NF4_CODE`` or ``FP4_CODE``) per element; element 2i is the
  high nibble of byte i, element 2i+1 the low nibble. Odd n: the last low nibble encodes 0.0. The packed
  tensor is uint8 of shape ((n + 1) // 2, 1).
- absmax: one scale per block of ``blocksize`` consecutive flat elements. Blocks run across rows when
  K % blocksize != 0; the last block may be partial and has its own absmax. The weight is
  ``W[j] = code[q[j]] * absmax[j // blocksize]``, multiplied in fp32, then rounded to W's dtype.
- double quant: the fp32 absmax is stored as uint8 indices into ``DYNAMIC_CODE`` (256 entries), in blocks of
  256 with one fp32 ``absmax2`` each, after subtracting ``offset = absmax.mean()``. Decoded as
  ``absmax[b] = code2[q[b]] * absmax2[b // 256] + offset``: an fp32 multiply, then an fp32 add (no FMA).

Quantisation reproduces bitsandbytes 0.50's CPU path bit for bit. Its CUDA kernels (read, not run here) differ in
all-zero blocks, FP4's sign of zero, the partial last block's scaling and the double-quant codes, which they round to
the nearest code, as its CPU path did before 0.50: their bytes can differ, the format does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, divided by the largest (12) in fp32. Entry 8 is +0.0,
# as in bitsandbytes (its list spells it as the integer -0).
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=torch.float32) / 12
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZE2 = 256
# bitsandbytes 0.50's CPU 8-bit quantiser snaps each scaled value to this many points evenly spaced in [-1, 1]
# before taking the nearest code (csrc/cpu_ops.cpp, build_quantize_lut); < 0.50 and CUDA take the nearest code.
_GRID = 65536


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: 0, 1 and 2**i values per sign in each decade 10**(i-6) * [0.1, 1]."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - 6)
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()


@dataclass(eq=False)
class QuantState4bit:
    """What decodes a packed 4-bit weight; field for field bitsandbytes' ``QuantState`` (``state2`` flattened).

    absmax: fp32 [nblocks], or uint8 [nblocks] (indices into code2) when double-quantised.
    shape: the weight's (N, K). dtype: the weight's dtype, the one ``dequantize_4bit`` returns.
    code: the 16-entry fp32 codebook of ``quant_type`` ('nf4' or 'fp4').
    offset (0-d fp32), absmax2 (fp32 [ceil(nblocks / blocksize2)]), code2 (fp32 [256]), blocksize2: double
    quant only; all None without it.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nblocks(self) -> int:
        return -(-math.prod(self.shape) // self.blocksize)

    @classmethod
    def from_bnb(cls, qs) -> QuantState4bit:
        """The same tensors as a ``bitsandbytes.functional.QuantState`` (no copies); raises if not a 2-D weight's."""
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("bitsandbytes repacked this weight for its AVX512-BF16 CPU kernel "
                             "(quant_state.packing_format_for_cpu); read it with quant.from_bnb_cpu_layout(packed, qs)")
        nested = getattr(qs, "state2", None) is not None
        offset = qs.offset
        if nested and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=qs.absmax.device)
        state = cls(
            absmax=qs.absmax, shape=torch.Size(qs.shape or ()), dtype=qs.dtype, blocksize=qs.blocksize,
            quant_type=qs.quant_type, code=qs.code, offset=offset if nested else None,
            absmax2=qs.state2.absmax if nested else None, code2=qs.state2.code if nested else None,
            blocksize2=qs.state2.blocksize if nested else None,
        )
        state.validate()
        if not torch.equal(state.code.cpu(), CODES[state.quant_type]):
            # bitsandbytes decodes with its built-in table whatever the state's code says; so does the kernel.
            raise ValueError(f"QuantState.code is not bitsandbytes' {state.quant_type} codebook: "
                             f"{state.code.tolist()}")
        return state

    def to_bnb(self):
        """The same tensors as a ``bitsandbytes.functional.QuantState`` (no copies)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=state2)

    def validate(self) -> None:
        """Raise ValueError/TypeError if the fields do not describe a 2-D weight in this format."""
        _check_format(self.blocksize, self.quant_type)
        if len(self.shape) != 2 or math.prod(self.shape) == 0:
            raise ValueError(f"shape must be a non-empty 2-D (out_features, in_features); got {tuple(self.shape)}")
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {DTYPES}; got {self.dtype}")
        _check_tensor("code", self.code, torch.float32, (16,))
        if not self.double_quant:
            _check_tensor("absmax", self.absmax, torch.float32, (self.nblocks,))
            return
        _check_tensor("absmax", self.absmax, torch.uint8, (self.nblocks,))
        if not isinstance(self.blocksize2, int) or self.blocksize2 <= 0:
            raise ValueError(f"blocksize2 must be a positive int; got {self.blocksize2!r}")
        _check_tensor("absmax2", self.absmax2, torch.float32, (-(-self.nblocks // self.blocksize2),))
        _check_tensor("code2", self.code2, torch.float32, (256,))
        _check_tensor("offset", self.offset, torch.float32, ())


def _check_tensor(name, t, dtype, shape) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape}; got {got}")


def _check_format(blocksize, quant_type) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes); got {blocksize!r}")
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4'; got {quant_type!r}")


def quantize_4bit(weight: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState4bit]:
    """Pack a 2-D weight (N, K) as bitsandbytes does: ``bitsandbytes.functional.quantize_4bit(weight,
    blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)``, same bytes and state.

    Any N, K: blocks run across rows, the last block may be partial, an odd N*K gets a padding nibble.
    Returns (packed uint8 [(N*K + 1) // 2, 1], state).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32; got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D (out_features, in_features); got {tuple(weight.shape)}")
    _check_format(blocksize, quant_type)
    if not torch.isfinite(weight).all():
        raise ValueError("weight has inf or NaN entries; the 4-bit format cannot represent them")

    n = weight.numel()
    nfull = n - n % blocksize
    flat = weight.reshape(-1).float()
    blocks = flat[:nfull].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by fp32 1/absmax; the partial last block divides by its absmax, clamped at 1e-38 and
    # stored clamped (an all-zero partial block keeps absmax 1e-38, a full one 0), as bitsandbytes does.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if nfull < n:
        tail_max = flat[nfull:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[nfull:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = CODES[quant_type].to(weight.device)
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)  # nearest code, ties to the lower value
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)

    state = QuantState4bit(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code.clone())
    if double_quant:
        state.offset = absmax.mean()
        state.absmax, state.absmax2 = _quantize_dynamic(absmax - state.offset, BLOCKSIZE2)
        state.code2 = DYNAMIC_CODE.to(weight.device, copy=True)
        state.blocksize2 = BLOCKSIZE2
    return packed, state


def empty_4bit(shape, *, dtype: torch.dtype, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
               device=None) -> tuple[torch.Tensor, QuantState4bit]:
    """Uninitialised packed bytes and state of the shapes ``quantize_4bit`` gives a weight of ``shape``: for the
    meta device (shape inference, deferred init) and for compiling kernels without data. The codebooks are real."""
    _check_format(blocksize, quant_type)
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    kw = dict(dtype=torch.float32, device=device)
    state = QuantState4bit(absmax=torch.empty(nblocks, **kw), shape=torch.Size(shape), dtype=dtype,
                           blocksize=blocksize, quant_type=quant_type, code=CODES[quant_type].to(device))
    if double_quant:
        state.absmax = torch.empty(nblocks, dtype=torch.uint8, device=device)
        state.absmax2 = torch.empty(-(-nblocks // BLOCKSIZE2), **kw)
        state.code2 = DYNAMIC_CODE.to(device)
        state.offset = torch.empty((), **kw)
        state.blocksize2 = BLOCKSIZE2
    return torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device), state


def _quantize_dynamic(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes 0.50 CPU ``quantize_blockwise`` of fp32 x with DYNAMIC_CODE: (uint8 codes, fp32 absmax)."""
    nblocks = -(-x.numel() // blocksize)
    blocks = torch.nn.functional.pad(x, (0, nblocks * blocksize - x.numel())).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    # Snap to the grid point -1 + 2i/65535 (index by truncation after +0.5), then the nearest code to that point.
    i = (((v + 1.0) * 0.5) * (_GRID - 1) + 0.5).trunc()
    grid = (2.0 * i) / (_GRID - 1) - 1.0
    code = DYNAMIC_CODE.to(x.device)
    q = torch.searchsorted(0.5 * (code[:-1] + code[1:]), grid, side="left")
    q = torch.where(absmax[:, None] == 0, 0, q)  # all-zero block: codes 0, absmax 0
    return q.to(torch.uint8).reshape(-1)[: x.numel()], absmax


def from_bnb_cpu_layout(packed: torch.Tensor, qs) -> tuple[torch.Tensor, QuantState4bit]:
    """The format again from bitsandbytes' AVX512-BF16 CPU layout: (packed, as bitsandbytes first stored it, state).

    bitsandbytes (0.49+) repacks a ``Linear4bit`` in place the first time it runs on such a CPU in eval mode without
    grad (``quant_state.packing_format_for_cpu``): the codes become [N, K/2] bytes, each row of 32 bytes holding
    32 weight rows x 2 columns (low nibbles first), and the scales become bf16 [K/blocksize, N] (double quant
    decoded, then rounded to bf16). Undoing it is exact for the codes; the scales are the bf16 ones bitsandbytes
    computes with from then on, as fp32, single-quantised: the function the repacked layer computes, not the
    original double-quant state, which bitsandbytes discarded.
    """
    if not getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("quant_state is not in bitsandbytes' CPU layout (packing_format_for_cpu is not set)")
    N, K = (int(d) for d in qs.shape)
    data = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    nb = K // qs.blocksize if qs.blocksize else 0
    if tuple(data.shape) != (N, K // 2) or N % 32 or K % 2 or nb * qs.blocksize != K:
        raise ValueError(f"a weight repacked by bitsandbytes for its CPU kernel must be uint8 [N, K/2] = "
                         f"[{N}, {K // 2}] with N % 32 == 0 and K % blocksize == 0 (blocksize {qs.blocksize}); got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    _check_tensor("absmax", qs.absmax, torch.bfloat16, (nb, N))
    rows = data.reshape(-1, 32)
    q = torch.cat([rows & 0xF, rows >> 4], dim=1)  # [N/32 * K/2, 64]: (row, column) pairs, row-major
    q = q.view(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(-1)
    flat = ((q[0::2] << 4) | q[1::2]).reshape(tuple(getattr(qs, "original_qshape", None) or (N * K // 2, 1)))
    storage = getattr(qs, "original_storage_type", None)  # bitsandbytes' quant_storage, when not uint8
    if storage is not None and storage != torch.uint8:
        flat = flat.view(storage)
    state = QuantState4bit(absmax=qs.absmax.t().reshape(-1).float(), shape=torch.Size((N, K)),
                           dtype=getattr(qs, "original_dtype", qs.dtype), blocksize=qs.blocksize,
                           quant_type=qs.quant_type, code=CODES[qs.quant_type].to(data.device))
    state.validate()
    return flat, state


_STATE_KEY = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def state_dict_entries(state: QuantState4bit, *, fixed_width: bool = False) -> dict[str, torch.Tensor]:
    """``state`` as bitsandbytes' ``Linear4bit`` writes it into a state dict after ``weight.`` (``QuantState.as_dict(
    packed=True)``: tensors, plus the other fields as JSON bytes): what transformers reloads a 4-bit model from.

    ``fixed_width``: the double-quant offset written as ``%.16e`` (17 significant digits: the same float, parsed by
    bitsandbytes as it is) instead of Python's shortest repr, so the JSON's length depends on the format alone, not
    on the offset: what a distributed checkpoint needs to load it into a model of another offset."""
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    entries = {"absmax": state.absmax, "quant_map": state.code}
    if state.double_quant:
        entries.update(nested_absmax=state.absmax2, nested_quant_map=state.code2.clone())
        offset = 0.0 if state.offset.is_meta else state.offset.item()
        meta.update(nested_blocksize=state.blocksize2, nested_dtype="float32", nested_offset=offset)
    text = json.dumps(meta)
    if fixed_width and state.double_quant:
        text = text.replace(json.dumps({"nested_offset": offset})[1:-1], f'"nested_offset": {offset:.16e}')
    entries[_STATE_KEY + state.quant_type] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return entries


def state_from_entries(entries: dict[str, torch.Tensor], device=None) -> QuantState4bit:
    """The inverse of ``state_dict_entries`` (keys without the ``weight.`` prefix), on ``device``; checked."""
    keys = [k for k in entries if k.startswith(_STATE_KEY)]
    if len(keys) != 1:
        raise ValueError(f"a 4-bit quant state needs exactly one '{_STATE_KEY}<nf4|fp4>' entry; got {sorted(entries)}")
    try:
        meta = json.loads(bytes(entries[keys[0]].cpu().tolist()).decode())
        dtype = _DTYPE_NAMES[meta["dtype"]]
        double = "nested_absmax" in entries
        state = QuantState4bit(
            absmax=entries["absmax"].to(device), shape=torch.Size(meta["shape"]), dtype=dtype,
            blocksize=meta["blocksize"], quant_type=meta["quant_type"], code=entries["quant_map"].to(device),
            offset=torch.tensor(float(meta["nested_offset"]), device=device) if double else None,
            absmax2=entries["nested_absmax"].to(device) if double else None,
            code2=entries["nested_quant_map"].to(device) if double else None,
            blocksize2=meta["nested_blocksize"] if double else None)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the 4-bit quant state entries {sorted(entries)} do not describe a state: {e!r}") from None
    state.validate()
    if not state.code.is_meta and not torch.equal(state.code.cpu(), CODES[state.quant_type]):
        raise ValueError(f"quant_map is not bitsandbytes' {state.quant_type} codebook")
    return state


def dequantize_absmax(state: QuantState4bit) -> torch.Tensor:
    """The fp32 per-block absmax [nblocks]: ``state.absmax`` itself, or double quant decoded as bitsandbytes does.

    ``dequantize_4bit`` uses this precomputed vector. A kernel that decodes double quant itself must round the
    same way (fp32 multiply, then fp32 add of offset) to match bit for bit.
    """
    if not state.double_quant:
        return state.absmax
    idx = torch.arange(state.absmax.numel(), device=state.absmax.device) // state.blocksize2
    return state.code2[state.absmax.long()] * state.absmax2[idx] + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (N, K) that ``packed`` and ``state`` encode, as ``bitsandbytes.functional.dequantize_4bit``.

    dtype defaults to ``state.dtype``: the fp32 product ``code * absmax`` rounded once to it. ``torch.float64``
    gives the exact product (of the fp32 codebook value and fp32 absmax), the oracle for tests; rounding it to
    fp32 gives the fp32 result bit for bit. A packed tensor of another dtype (bitsandbytes' ``quant_storage``)
    is read as its bytes.
    """
    state.validate()
    dtype = state.dtype if dtype is None else dtype
    if dtype not in (*DTYPES, torch.float64):
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64; got {dtype}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor; got {type(packed).__name__}")
    n = math.prod(state.shape)
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    if data.numel() != (n + 1) // 2:
        raise ValueError(f"packed must hold (N*K + 1) // 2 = {(n + 1) // 2} bytes for shape {tuple(state.shape)}; "
                         f"got {data.numel()} bytes (shape {tuple(packed.shape)}, {packed.dtype})")
    q = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n].long()
    absmax, code = dequantize_absmax(state), state.code
    if dtype == torch.float64:
        absmax, code = absmax.double(), code.double()
    values = torch.nn.functional.pad(code[q], (0, state.nblocks * state.blocksize - n))
    out = (values.view(state.nblocks, state.blocksize) * absmax[:, None]).reshape(-1)[:n]
    return out.view(state.shape).to(dtype)


# Block-scaled FP8 (DeepSeek-V3's and Qwen's FP8 checkpoints): ``weight`` float8_e4m3fn [N, K] and ``weight_scale_inv``
# [ceil(N / bn), ceil(K / bk)], W[i, j] = float(weight[i, j]) * weight_scale_inv[i // bn, j // bk].

FP8_MAX = 448.0  # the largest float8_e4m3fn
FP8_SCALE_DTYPES = (torch.float32, torch.bfloat16)  # DeepSeek stores fp32 scales, Qwen bf16
# An all-zero block's scale: 1.0, as transformers' Fp8Quantize gives it (DeepSeek's weight_quant divides by 0 there).
ZERO_BLOCK_SCALE = 1.0


def _check_block_size(block_size) -> tuple[int, int]:
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
        raise ValueError(f"block_size must be two positive ints (rows, columns); got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def check_fp8_blockwise(weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size=(128, 128)) -> None:
    """Raise TypeError/ValueError unless ``weight`` (float8_e4m3fn [N, K]) and ``weight_scale_inv`` (fp32 or bf16
    [ceil(N / bn), ceil(K / bk)], on weight's device) are a block-scaled FP8 weight with ``block_size`` (bn, bk)."""
    bn, bk = _check_block_size(block_size)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a torch.float8_e4m3fn tensor; got {got}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}")
    if not isinstance(weight_scale_inv, torch.Tensor) or weight_scale_inv.dtype not in FP8_SCALE_DTYPES:
        got = weight_scale_inv.dtype if isinstance(weight_scale_inv, torch.Tensor) else type(weight_scale_inv).__name__
        raise TypeError(f"weight_scale_inv must be a torch.float32 or torch.bfloat16 tensor; got {got}")
    N, K = weight.shape
    expected = (-(-N // bn), -(-K // bk))
    if tuple(weight_scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv must have shape (ceil(N/{bn}), ceil(K/{bk})) = {expected} for weight "
                         f"{(N, K)} and block_size {(bn, bk)}; got {tuple(weight_scale_inv.shape)}")
    if weight_scale_inv.device != weight.device:
        raise ValueError(f"weight_scale_inv must be on weight's device {weight.device}; got {weight_scale_inv.device}")


def _expand_blocks(scale: torch.Tensor, shape, block_size) -> torch.Tensor:
    """Per-block values [ceil(N / bn), ceil(K / bk)] repeated over their blocks, cut to shape (N, K)."""
    (N, K), (bn, bk) = shape, block_size
    return scale.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]


def quantize_fp8_blockwise(w: torch.Tensor, block_size=(128, 128),
                           scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight w [N, K] to block-scaled FP8: (weight float8_e4m3fn [N, K], weight_scale_inv
    [ceil(N / bn), ceil(K / bk)] in ``scale_dtype``, fp32 (DeepSeek) or bf16 (Qwen)).

    Per block, in fp32 as DeepSeek-V3's ``weight_quant``: s = amax(|block|) / 448, weight = e4m3(w / s), rounded to
    nearest even. A bf16 s is rounded to bf16 first and w divided by the rounded s, so ``dequantize_fp8_blockwise``
    with the stored scale undoes exactly this division; w / s can then pass 448 by up to 2^-8 relative and is
    clamped to +-448. An all-zero block gets s = 1.0 (``ZERO_BLOCK_SCALE``, as transformers) and decodes to zeros;
    a block whose amax / 448 is below fp32's smallest normal gets that normal instead, so s stays normal and finite.
    Edge blocks of N, K not multiples of the block are partial, with their own amax.
    Error: |dequant - w| <= max(2^-4 |w|, 2^-10 s) per element (3 mantissa bits; 2^-10 s below e4m3's normals).
    """
    bn, bk = _check_block_size(block_size)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor; got {type(w).__name__}")
    if w.dtype not in (*DTYPES, torch.float64):
        raise TypeError(f"w must be float16, bfloat16, float32 or float64; got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features); got shape {tuple(w.shape)}")
    if scale_dtype not in FP8_SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be torch.float32 or torch.bfloat16; got {scale_dtype}")
    wf = w.float()
    if not torch.isfinite(wf).all():
        raise ValueError("w has inf or NaN entries (in float32); FP8 block scales cannot represent them")
    N, K = w.shape
    nbn, nbk = -(-N // bn), -(-K // bk)
    padded = torch.nn.functional.pad(wf.abs(), (0, nbk * bk - K, 0, nbn * bn - N))
    amax = padded.view(nbn, bn, nbk, bk).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.where(amax > 0, scale, ZERO_BLOCK_SCALE).to(scale_dtype)
    q = (wf / _expand_blocks(scale.float(), (N, K), (bn, bk))).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp8_blockwise(weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size=(128, 128),
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] = float(weight) * weight_scale_inv[i // bn, j // bk]: the fp32 product rounded once to ``dtype``
    (as DeepSeek-V3's ``weight_dequant``), or exact for ``torch.float64``. Checked by ``check_fp8_blockwise``."""
    check_fp8_blockwise(weight, weight_scale_inv, block_size)
    if dtype not in (*DTYPES, torch.float64):
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64; got {dtype}")
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    scale = _expand_blocks(weight_scale_inv.to(cd), weight.shape, _check_block_size(block_size))
    return (weight.to(cd) * scale).to(dtype)
