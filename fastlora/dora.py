"""DoRA's column norm ||W + s B A|| per output row, without an out x in tensor, and the ||W||^2 it starts from.

By default nothing is cached: every call computes ||W_n||^2 (one pass over W) and U = A W^T (one small GEMM,
``fastlora._dora_ops.dora_norm``), so an edit made any way (``.data`` included) is seen by the next call.
``DoraCaching`` (opt-in, as PEFT's) keeps ||W||^2 per weight tensor and, in eval mode, each layer's norm, trusting
version counters and storages (which ``.data`` edits bypass); never under torch.compile (version counters do not
trace). A 4-bit W (QDoRA, ``weight_sq_4bit``) or an FP8 one (``weight_sq_fp8``): ||deq(W)_n||^2 in fp32 from the
stored bytes, decoded ROWS rows at a time; U = A deq(W)^T by the quantised-W GEMM.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from fastlora import _dora_grouped_ops, _dora_ops, _ops, quant
from fastlora.reference import DORA_EPS

_weight_sq: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# Rows per chunk when summing ||W_n||^2: bounds the fp32 temporary to ROWS x in_features.
ROWS = 1024
_caching = False  # DoraCaching
_epoch = 0  # bumped each time caching is switched on: nothing cached before is used again


class DoraCaching:
    """Opt-in caching of DoRA's norms, used as PEFT's ``peft.helpers.DoraCaching``: ``with DoraCaching(): ...``, or
    ``DoraCaching()(True)`` / ``DoraCaching()(False)`` to switch it on or off for good. Off by default.

    While on: ||W_n||^2 is computed once per base weight tensor (training too), and in eval mode each DoRA layer
    (``Linear``, ``Linear4bit``, ``GroupedLinear``) computes its norm ||W + s B A|| once and reuses it. Both are
    recomputed when W, A, B, the scaling (or the 4-bit block scales) change by an op that bumps their version
    counter (optimizer steps, ``copy_``/``mul_`` under ``no_grad``, ``load_state_dict``) or are replaced, and when
    the grad mode switches into or out of ``torch.inference_mode``. Edits that bypass version counters
    (``p.data.add_(...)``, ``p.data = t``) are **not** guaranteed to be seen: make them with caching off, or switch
    it on again after them; each switch on (entering the block, leaving an inner ``DoraCaching(False)``, a call with
    True) starts from empty caches. A training-mode forward drops the layer's eval norm. Under torch.compile nothing
    is cached.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self._previous: list[bool] = []

    def __enter__(self) -> DoraCaching:
        self._previous.append(_caching)
        _set_caching(self.enabled)
        return self

    def __exit__(self, *exc) -> None:
        _set_caching(self._previous.pop())

    def __call__(self, enabled: bool = True) -> None:
        _set_caching(bool(enabled))


def _set_caching(enabled: bool) -> None:
    global _caching, _epoch
    _caching = enabled
    _epoch += 1
    _weight_sq.clear()


def _cached_on(t: torch.Tensor, key, compute) -> torch.Tensor:
    """``compute()``, kept on tensor ``t`` (weakly) while caching is on and ``key()`` is unchanged; every call with
    caching off, under torch.compile (version counters do not trace) or for a meta ``t``."""
    if torch.compiler.is_compiling() or not _caching or t.device.type == "meta":
        return compute()
    k = (_epoch, torch.is_inference_mode_enabled(), *key())  # an inference-mode result is never saved for backward
    hit = _weight_sq.get(t)
    if hit is None or hit[0] != k:
        hit = (k, compute())
        _weight_sq[t] = hit
    return hit[1]


def eval_cached(module, tensors, compute, extra=()) -> torch.Tensor:
    """A DoRA layer's norm: ``compute()`` unless caching is on and the layer is in eval mode (never under
    torch.compile or on meta); then kept on ``module._norm_cache`` until one of ``tensors`` changes (version counter
    or storage), ``extra`` differs, caching is switched on again or the inference mode flips."""
    if torch.compiler.is_compiling() or tensors[0].device.type == "meta":
        return compute()
    if module.training or not _caching:
        module._norm_cache = None
        return compute()
    key = (_epoch, torch.is_inference_mode_enabled(), *extra, *((t._version, t.data_ptr()) for t in tensors))
    if module._norm_cache is None or module._norm_cache[0] != key:
        module._norm_cache = (key, compute())
    return module._norm_cache[1]


def weight_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W_n||^2, fp32 [N]; with ``DoraCaching`` on, cached while ``weight`` keeps its version and storage."""
    return _cached_on(weight, lambda: (weight._version, weight.data_ptr(), weight.shape), lambda: _row_sq(weight))


def _row_sq(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([w.float().square().sum(1) for w in weight.detach().split(ROWS)]) if weight.shape[0] else \
            weight.new_zeros(0, dtype=torch.float32)


def weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """max(||W_n + s B_n A||, DORA_EPS) per row, fp32 [N], detached (PEFT and the paper treat it as a constant)."""
    with torch.no_grad():
        return _dora_ops.dora_norm(weight.detach(), weight_sq(weight), lora_A.detach(), lora_B.detach(),
                                   float(scaling)).clamp_min(DORA_EPS)


def weight_sq_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """||deq(W)_n||^2, fp32 [N], of a packed 4-bit weight (``state``: its ``QuantState4bit``, K a multiple of the
    block size); with ``DoraCaching`` on, cached while the packed bytes and the block scales keep their versions and
    storages."""
    return _cached_on(packed, lambda: (packed._version, packed.data_ptr(), state.absmax._version,
                                       state.absmax.data_ptr(), tuple(state.shape), state.quant_type),
                      lambda: _row_sq_4bit(packed, state))


def _row_sq_4bit(packed, state) -> torch.Tensor:
    N, K = state.shape
    if packed.device.type == "meta":
        return torch.empty(N, dtype=torch.float32, device="meta")
    with torch.no_grad():
        data = packed.detach().reshape(-1).view(torch.uint8)
        absmax = quant.dequantize_absmax(state).float().reshape(-1, K // state.blocksize)  # [N, blocks per row]
        out = []
        for r0 in range(0, N, ROWS):  # a ROWS x K fp32 temporary, never N x K
            byte = data[r0 * K // 2:min(r0 + ROWS, N) * K // 2]
            q = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1).int()
            w = state.code[q].view(-1, K // state.blocksize, state.blocksize) * absmax[r0:r0 + ROWS, :, None]
            out.append(w.square().sum((1, 2)))
        return torch.cat(out)


def weight_norm_4bit(packed, state, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """``weight_norm`` of a packed 4-bit W: max(||deq(W)_n + s B_n A||, DORA_EPS), fp32 [N], detached."""
    tensors, qblocks = _ops.quant_args(state, torch.float32)
    data = packed.detach().reshape(-1).view(torch.uint8)
    with torch.no_grad():
        return _dora_ops.dora_norm_4bit(data, tensors, qblocks, weight_sq_4bit(packed, state), lora_A.detach(),
                                        lora_B.detach(), float(scaling)).clamp_min(DORA_EPS)


def weight_sq_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """||deq(W)_n||^2, fp32 [N], of a block-scaled FP8 weight (float8_e4m3fn [N, K], ``scale`` [cdiv(N, bn),
    cdiv(K, bk)]); with ``DoraCaching`` on, cached while the bytes and the scales keep their versions and storages."""
    return _cached_on(weight, lambda: (weight._version, weight.data_ptr(), scale._version, scale.data_ptr(),
                                       tuple(weight.shape), tuple(block)),
                      lambda: _row_sq_fp8(weight, scale, block))


def _row_sq_fp8(weight, scale, block) -> torch.Tensor:
    N, K = weight.shape
    if weight.device.type == "meta":
        return torch.empty(N, dtype=torch.float32, device="meta")
    bn, bk = block
    with torch.no_grad():
        cols = scale.detach().float().repeat_interleave(bk, dim=1)[:, :K]  # [cdiv(N, bn), K]
        out = []
        for r0 in range(0, N, ROWS):  # a ROWS x K fp32 temporary, never N x K
            rows = torch.arange(r0, min(r0 + ROWS, N), device=weight.device)
            w = weight.detach()[r0:r0 + ROWS].float() * cols[rows // bn]
            out.append(w.square().sum(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32, device=weight.device)


def weight_norm_fp8(weight, scale, block, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """``weight_norm`` of a block-scaled FP8 W: max(||deq(W)_n + s B_n A||, DORA_EPS), fp32 [N], detached; U = A
    deq(W)^T by the FP8 GEMM (tiles dequantised to fp32 in registers)."""
    with torch.no_grad():
        sc = scale.detach().float().contiguous()
        fp32 = [*block, _ops.COMPUTE_DTYPES.index(torch.float32)]
        return _dora_ops.dora_norm_4bit(weight.detach().contiguous(), [sc], fp32, weight_sq_fp8(weight, scale, block),
                                        lora_A.detach(), lora_B.detach(), float(scaling)).clamp_min(DORA_EPS)


def grouped_weight_norm(weight, lora_A, lora_B, scale_vec, rank_offsets=None) -> torch.Tensor:
    """max(||W_n + s_a B_a[n] A_a||, DORA_EPS) for every adapter a of a stack (padded, or ragged with
    ``rank_offsets``), fp32 [n, N], detached: one GEMM-core launch for the whole stack."""
    with torch.no_grad():
        return _dora_grouped_ops.grouped_dora_norm(weight.detach(), weight_sq(weight), lora_A.detach(),
                                                   lora_B.detach(), scale_vec.detach().float(),
                                                   rank_offsets).clamp_min(DORA_EPS)
