"""``LinearFP8``: a frozen block-scaled FP8 base (DeepSeek-V3 / Qwen FP8 checkpoints) plus a LoRA adapter, fused."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastlora import dora, quant
from fastlora.functional import _check_dtype, _check_fp8_activations, _lora_linear_fp8
from fastlora.modules import (
    Linear,
    _adapter_args,
    _adapter_dtype,
    _check_use_dora,
    _dense_twin,
    _init_adapter,
    _refuse_merge,
)

_BASE = ("weight", "weight_scale_inv")  # the FP8 payload and its scales: frozen, never cast by a dtype move


class LinearFP8(nn.Module):
    """A block-scaled FP8 base linear with a LoRA adapter: y = x W^T + b + (alpha/r) (dropout(x) A^T) B^T,
    W[i, j] = float(weight[i, j]) * weight_scale_inv[i // bn, j // bk], (bn, bk) = ``block_size``.

    ``weight`` (float8_e4m3fn [out, in]) and ``weight_scale_inv`` (fp32 or bf16 [ceil(out / bn), ceil(in / bk)]) are
    the checkpoint's tensors under the checkpoint's names, frozen: W is dequantised tile by tile inside the fused GEMM,
    forward and backward (``fastlora.lora_linear_fp8``, W8A16: the base product runs in x's dtype), and never stored in
    16 bits. ``lora_A`` (r, in) and ``lora_B`` (out, r) are fp32 by default (``adapter_dtype``), as PEFT keeps
    adapters over a quantised base; ``lora_B`` starts at zero, so a fresh layer computes the dequantised base.

    Built here, the layer quantises a freshly initialised ``nn.Linear`` (on ``device``; on the meta device nothing
    is computed). ``from_linear`` wraps an ``nn.Linear`` (quantised, its weight not kept) or any module holding an
    FP8 ``weight`` and a ``weight_scale_inv`` (transformers' ``FP8Linear``), whose tensors it shares without a copy.
    ``load_state_dict`` reads an FP8 checkpoint's ``weight`` and ``weight_scale_inv`` into the layer byte for byte.

    ``use_dora=True``: DoRA over the FP8 base, a trainable ``lora_magnitude`` (out,) initialised to ||W_n|| of the
    dequantised W, the norm computed in fp32 from the FP8 bytes every call (kept in eval mode under
    ``fastlora.DoraCaching``). Merging is refused (it would re-quantise the base); ``dequantize()`` gives a
    ``fastlora.Linear`` sharing the adapter, which merges exactly. Dtype casts of the module (``.half()``,
    ``.to(torch.bfloat16)``) leave ``weight`` and ``weight_scale_inv`` as they are; ``.to(device)`` moves them.

    ``fp8_activations=True`` (opt-in, W8A8): the forward quantises x per token and per 128 channels to e4m3 inside the
    GEMM and runs the base product on fp8 tensor cores; the backward stays W8A16 (``fastlora.lora_linear_fp8``).
    Needs bf16 or fp16 inputs, ``block_size[1]`` a multiple of 128 and no DoRA.
    """

    def __init__(self, in_features, out_features, bias=True, *, r=8, alpha=8, dropout=0.0, use_rslora=False,
                 use_dora=False, block_size=(128, 128), scale_dtype=torch.float32, device=None, dtype=None,
                 adapter_dtype=None, fp8_activations=False):
        super().__init__()
        block = quant._check_block_size(block_size)
        _check_use_dora(use_dora)
        _check_fp8_activations(fp8_activations, block, use_dora)
        self.fp8_activations = fp8_activations
        _adapter_dtype(adapter_dtype, torch.float32)
        if scale_dtype not in quant.FP8_SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be torch.float32 or torch.bfloat16; got {scale_dtype}")
        self.out_features, self.in_features, self.block_size = int(out_features), int(in_features), block
        bound = 1 / math.sqrt(in_features) if in_features else 0.0  # nn.Linear's initial weight and bias range
        self._set_base(_quantize_rows(lambda r0, r1: torch.empty(r1 - r0, in_features, device=device)
                                      .uniform_(-bound, bound), (out_features, in_features), block, scale_dtype,
                                      torch.device(device) if device is not None else None))
        b = None
        if bias:
            b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self._setup(b, r, alpha, dropout, use_rslora, use_dora, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r=8, alpha=8, dropout=0.0, use_rslora=False, use_dora=False,
                    block_size=(128, 128), adapter_dtype=None, fp8_activations=False) -> LinearFP8:
        """Wrap ``linear``: a module holding an FP8 ``weight`` and its ``weight_scale_inv`` (transformers'
        ``FP8Linear``: its own ``block_size`` wins) is shared as it is, no copy; an ``nn.Linear`` is quantised with
        ``block_size`` and fp32 scales (its weight is not kept). The bias is shared and frozen. ``fp8_activations``:
        the W8A8 forward (see the class)."""
        _adapter_args(r, alpha, dropout, use_rslora)  # before anything below touches ``linear``
        _check_use_dora(use_dora)
        _adapter_dtype(adapter_dtype, torch.float32)
        block = quant._check_block_size(block_size)
        if is_fp8_linear(linear):
            block = fp8_block_size(linear)
        _check_fp8_activations(fp8_activations, block, use_dora)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.fp8_activations = fp8_activations
        if is_fp8_linear(linear):
            self.block_size = block
            self.weight = linear.weight
            self.weight_scale_inv = linear.weight_scale_inv  # a Parameter stays one: the checkpoint's key either way
            for t in (self.weight, self.weight_scale_inv):
                t.requires_grad_(False)
            self.out_features, self.in_features = self.weight.shape
        elif isinstance(linear, nn.Linear):
            if isinstance(linear, (Linear, LinearFP8)) or not linear.weight.is_floating_point():
                raise TypeError(f"linear must be an nn.Linear with a float weight or an FP8 linear; got a "
                                f"{type(linear).__name__} with a {linear.weight.dtype} weight")
            self._quantize(linear, block, torch.float32)
        else:
            raise TypeError(f"linear must be an nn.Linear or a module with a float8_e4m3fn weight and a "
                            f"weight_scale_inv; got {type(linear).__name__}")
        self._setup(getattr(linear, "bias", None), r, alpha, dropout, use_rslora, use_dora, adapter_dtype)
        return self

    def _with_new_adapter(self, *, r, alpha, dropout=0.0, use_rslora=False, use_dora=False,
                          adapter_dtype=None) -> LinearFP8:
        """A new layer over this one's FP8 weight, scales and bias (shared, not copied), with a fresh adapter (and,
        ``use_dora``, a fresh magnitude ||W_n||); this layer is left as it is."""
        _check_use_dora(use_dora)
        fp8_activations = self.fp8_activations
        _check_fp8_activations(fp8_activations, self.block_size, use_dora)
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new.block_size, new.out_features, new.in_features = self.block_size, self.out_features, self.in_features
        new.fp8_activations = fp8_activations
        for name in _BASE:
            setattr(new, name, getattr(self, name))
        new._setup(self.bias, r, alpha, dropout, use_rslora, use_dora, adapter_dtype)
        return new.train(self.training)

    def _quantize(self, linear: nn.Linear, block: tuple[int, int], scale_dtype: torch.dtype) -> None:
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        self.block_size = block
        self._set_base(_quantize_rows(lambda r0, r1: w[r0:r1], w.shape, block, scale_dtype, w.device))

    def _set_base(self, base: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.weight = nn.Parameter(base[0], requires_grad=False)
        self.register_buffer("weight_scale_inv", base[1])

    def _setup(self, bias, r, alpha, dropout, use_rslora, use_dora, adapter_dtype):
        quant.check_fp8_blockwise(self.weight, self.weight_scale_inv, self.block_size)
        if bias is not None:
            _check_dtype("bias", bias.dtype)
        args = _adapter_args(r, alpha, dropout, use_rslora)
        dtype = _adapter_dtype(adapter_dtype, torch.float32)  # None: fp32, as PEFT over a quantised base
        _init_adapter(self, bias, args, use_dora, dict(device=self.weight.device, dtype=dtype),
                      lambda: dora.weight_sq_fp8(self.weight, self.weight_scale_inv, self.block_size))

    def _norm(self) -> torch.Tensor:
        """max(||W + s B A||, eps) per row, fp32 [out], W dequantised; kept in eval under ``DoraCaching``."""
        return dora.eval_cached(self, (self.weight, self.weight_scale_inv, self.lora_A, self.lora_B),
                                lambda: dora.weight_norm_fp8(self.weight, self.weight_scale_inv, self.block_size,
                                                             self.lora_A, self.lora_B, self.scaling), (self.scaling,))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """An FP8 checkpoint's tensors copied in as they are (the bytes, never through a wider dtype); a scale tensor
        whose shape does not fit ``block_size`` is refused with both shapes, and then nothing of the layer changes."""
        w, s = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_scale_inv")
        if w is not None and s is not None:
            try:
                quant.check_fp8_blockwise(w, s.to(w.device), self.block_size)
                if tuple(w.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"weight has shape {tuple(w.shape)}; this layer's is "
                                     f"{(self.out_features, self.in_features)}")
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{prefix}weight, {prefix}weight_scale_inv: cannot load the FP8 base: {e}")
                return
        elif w is not None and w.dtype != torch.float8_e4m3fn:
            error_msgs.append(f"{prefix}weight: a {w.dtype} weight cannot load into an FP8 base "
                              "(quantise it with fastlora.quant.quantize_fp8_blockwise)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the FP8 weight and its scales; dtype casts leave them as they are (a float8 tensor is
        a floating-point one to ``nn.Module``, which would otherwise cast it to bf16)."""
        order = {id(d): list(d) for d in (self._parameters, self._buffers)}
        kept = {}
        for name in _BASE:
            where = self._parameters if name in self._parameters else self._buffers
            kept[name] = (where, where.pop(name))
        try:
            super()._apply(fn, recurse)
        finally:
            for name, (where, t) in kept.items():
                device = fn(torch.empty(0, device=t.device)).device
                if t is not None and t.device != device:
                    moved = t.detach().to(device)
                    if isinstance(t, nn.Parameter) and torch._has_compatible_shallow_copy_type(t, moved):
                        t.data = moved  # the same Parameter (shared with the module it came from), as nn.Module
                    elif isinstance(t, nn.Parameter):
                        t = nn.Parameter(moved, requires_grad=False)
                    else:
                        t = moved
                where[name] = t
                for key in order[id(where)]:  # the state dict's order as before
                    where[key] = where.pop(key)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lora_linear_fp8(x, self.weight, self.weight_scale_inv, self.bias, self.lora_A, self.lora_B,
                                self.scaling, block_size=self.block_size, dropout_p=self.dropout,
                                training=self.training, seed=None,
                                magnitude=self.lora_magnitude if self.use_dora else None,
                                norm_fn=self._norm if self.use_dora else None,
                                fp8_activations=self.fp8_activations)

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """W [out, in] = float(weight) * its block scale, rounded once to ``dtype``."""
        return quant.dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, self.block_size, dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Linear:
        """A ``fastlora.Linear`` over the dequantised weight (in ``dtype``) sharing this layer's bias and adapter
        parameters (and ``lora_magnitude``): the same function up to the rounding of W to ``dtype``; it merges."""
        return _dense_twin(self, self.dequantized_weight(dtype))

    def merge(self) -> None:
        _refuse_merge(self, "FP8")

    def unmerge(self) -> None:
        raise NotImplementedError("fastlora.LinearFP8 is never merged (see merge)")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, use_dora={self.use_dora}, "
                f"block_size={self.block_size}, scale_dtype={self.weight_scale_inv.dtype}"
                f"{', fp8_activations=True' if self.fp8_activations else ''}")


def _quantize_rows(rows, shape, block, scale_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.quantize_fp8_blockwise`` of the [N, K] weight whose rows r0:r1 ``rows(r0, r1)`` gives, a few row blocks
    at a time: no temporary of more than max(bn, 2^20 / K) rows beside the FP8 result (a layer built or quantised
    here never holds its weight in 16 or 32 bits whole). On the meta device: empty tensors, nothing computed."""
    (N, K), (bn, bk) = shape, block
    scale_shape = (-(-N // bn), -(-K // bk))
    weight = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(scale_shape, dtype=scale_dtype, device=device)
    if weight.is_meta:
        return weight, scale
    step = bn * max(1, (1 << 20) // max(1, K * bn))
    for r0 in range(0, N, step):
        r1 = min(r0 + step, N)
        weight[r0:r1], scale[r0 // bn:-(-r1 // bn)] = quant.quantize_fp8_blockwise(rows(r0, r1), block, scale_dtype)
    return weight, scale


def is_fp8_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear over an FP8 weight that ``LinearFP8`` can share: a ``weight`` tensor in
    float8_e4m3fn and a ``weight_scale_inv`` tensor (transformers' ``FP8Linear``, a checkpoint's layer), and not a
    fastlora layer."""
    w, s = getattr(module, "weight", None), getattr(module, "weight_scale_inv", None)
    return (not isinstance(module, LinearFP8) and isinstance(w, torch.Tensor) and w.dtype == torch.float8_e4m3fn
            and isinstance(s, torch.Tensor))


def fp8_block_size(module: nn.Module) -> tuple[int, int]:
    """The block size of an FP8 linear (``is_fp8_linear``), checked against its scales: its ``block_size``
    attribute (transformers' ``FP8Linear``), else (128, 128). Per-tensor scales and UE8M0 (power-of-two, float8_e8m0fnu)
    scales are refused with ``NotImplementedError``; a scale shape that does not fit the block size with
    ``ValueError``."""
    s = module.weight_scale_inv
    if s.dtype not in quant.FP8_SCALE_DTYPES:
        raise NotImplementedError(f"weight_scale_inv is {s.dtype}: fastlora reads fp32 or bf16 block scales "
                                  "(DeepSeek's, Qwen's); UE8M0 (float8_e8m0fnu) scales are not supported")
    block = getattr(module, "block_size", (128, 128))
    if block is None or s.dim() != 2:
        raise NotImplementedError(f"an FP8 weight with per-tensor scales (weight_scale_inv of shape "
                                  f"{tuple(s.shape)}, block_size {block}) is not supported: fastlora reads "
                                  "block-scaled FP8 (block_size=(128, 128) checkpoints)")
    block = quant._check_block_size(tuple(block))
    quant.check_fp8_blockwise(module.weight, s, block)
    return block
