"""``Linear4bit``: a frozen bitsandbytes-format 4-bit base (NF4/FP4, QLoRA) plus a LoRA adapter, fused."""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from fastlora import dora, quant, sharding
from fastlora.functional import _check_dtype, _lora_linear_4bit
from fastlora.modules import (
    Linear,
    _adapter_args,
    _adapter_dtype,
    _check_use_dora,
    _dense_twin,
    _init_adapter,
    _refuse_merge,
)
from fastlora.sharding import RowBlockWeight

_STATE = ("absmax", "code", "absmax2", "code2", "offset")


class Linear4bit(nn.Module):
    """A 4-bit base linear (bitsandbytes' packed format) with a LoRA adapter:
    y = x deq(W)^T + b + (alpha/r) (dropout(x) A^T) B^T; the base product in ``compute_dtype``, the low-rank
    branch in x's dtype, y in x's dtype (PEFT's LoRA over bitsandbytes' Linear4bit).

    ``weight`` holds the packed codes (uint8, frozen), ``quant_state`` the block scales; W is dequantised tile by
    tile inside the fused GEMM, forward and backward. ``lora_A`` (r, in) and ``lora_B`` (out, r) are fp32 (as in
    PEFT's QLoRA); ``lora_B`` starts at zero. A layer built here or by ``from_linear(nn.Linear)`` keeps the
    state as buffers (``quant_absmax`` ...); ``from_linear(bitsandbytes.nn.Linear4bit)`` shares that layer's
    ``Params4bit`` and its quant state as they are.

    ``use_dora=True`` (QDoRA: PEFT's DoRA over the 4-bit base): a trainable ``lora_magnitude`` (out,), fp32 like the
    adapters, initialised as PEFT does to ||W_n|| of the dequantised W (B being zero); y = g (x W^T + s T B^T) + b
    with g = lora_magnitude / max(||W + s B A||, eps) (PEFT's dropout form in training, docs/dora.md). The norm is
    computed in fp32 from the packed weight, every call (kept in eval mode only under ``fastlora.DoraCaching``).
    ``adapter_dtype`` (None: fp32) sets another dtype for lora_A, lora_B and lora_magnitude.

    Merging is refused: folding B A (and, with DoRA, g) into 4-bit codes re-quantises the whole weight (PEFT does it
    and warns of the rounding), after which ``unmerge`` cannot restore the base. ``dequantize()`` gives a
    ``fastlora.Linear`` over the dequantised weight, sharing the adapter (and magnitude), which merges exactly.
    """

    def __init__(self, in_features, out_features, bias=True, *, r=8, alpha=8, dropout=0.0, use_rslora=False,
                 use_dora=False, compute_dtype=torch.bfloat16, quant_type="nf4", blocksize=64, double_quant=True,
                 device=None, adapter_dtype=None):
        super().__init__()
        _check_dtype("compute_dtype", compute_dtype)
        _check_use_dora(use_dora)
        _adapter_dtype(adapter_dtype, torch.float32)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=compute_dtype)
        self._quantize(base, quant_type, blocksize, double_quant)
        self._setup(base.bias, r, alpha, dropout, use_rslora, compute_dtype, use_dora, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r=8, alpha=8, dropout=0.0, use_rslora=False, use_dora=False,
                    compute_dtype=None, quant_type="nf4", blocksize=64, double_quant=True,
                    adapter_dtype=None) -> Linear4bit:
        """Wrap ``linear``: an ``nn.Linear`` is quantised (quant_type, blocksize, double_quant; its weight is not
        kept), a ``bitsandbytes.nn.Linear4bit`` is shared as it is (its format wins; no copy). The bias is shared
        and frozen. compute_dtype None: the bitsandbytes layer's, else bfloat16. ``use_dora``: QDoRA (see the
        class)."""
        _adapter_args(r, alpha, dropout, use_rslora)  # before anything below touches ``linear``
        _check_use_dora(use_dora)
        _adapter_dtype(adapter_dtype, torch.float32)
        if compute_dtype is not None:
            _check_dtype("compute_dtype", compute_dtype)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if _is_bnb_4bit(linear):
            qs = getattr(linear.weight, "quant_state", None)
            if qs is None:
                raise ValueError("the bitsandbytes Linear4bit is not quantised yet (weight.quant_state is None): "
                                 "move it to its device first, e.g. .to('cuda'), as bitsandbytes quantises there")
            if getattr(qs, "packing_format_for_cpu", False):
                _restore_bnb_layout(linear.weight)
            self.weight = linear.weight
            self.weight.requires_grad_(False)
            self._bnb_state = None
            self.quant_type, self.blocksize = qs.quant_type, qs.blocksize
            self.double_quant = getattr(qs, "state2", None) is not None
            self.out_features, self.in_features = self.quant_state.shape
            if compute_dtype is None:
                compute_dtype = getattr(linear, "compute_dtype", None) or torch.bfloat16
        elif isinstance(linear, nn.Linear):
            if isinstance(linear, (Linear, Linear4bit)):
                raise TypeError(f"linear is already a fastlora.{type(linear).__name__}")
            self._quantize(linear, quant_type, blocksize, double_quant)
        else:
            raise TypeError(f"linear must be an nn.Linear or a bitsandbytes.nn.Linear4bit; got {type(linear).__name__}")
        self._setup(linear.bias, r, alpha, dropout, use_rslora, compute_dtype or torch.bfloat16, use_dora,
                    adapter_dtype)
        return self

    def _with_new_adapter(self, *, r, alpha, dropout=0.0, use_rslora=False, use_dora=False,
                          adapter_dtype=None) -> Linear4bit:
        """A new layer over this one's packed weight, quantisation state and bias (shared, not copied), with a fresh
        adapter (and, ``use_dora``, a fresh magnitude ||W_n||); this layer is left as it is."""
        _check_use_dora(use_dora)
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new.weight = self.weight
        for name in ("_bnb_state", "quant_type", "blocksize", "double_quant", "out_features", "in_features"):
            setattr(new, name, getattr(self, name))
        if hasattr(self, "_weight_dtype"):
            new._weight_dtype = self._weight_dtype
        for name in _STATE:
            if "quant_" + name in self._buffers:
                new.register_buffer("quant_" + name, self._buffers["quant_" + name], persistent=False)
        new._setup(self.bias, r, alpha, dropout, use_rslora, self.compute_dtype, use_dora, adapter_dtype)
        return new.train(self.training)

    def _quantize(self, linear: nn.Linear, quant_type, blocksize, double_quant):
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        if w.is_meta:
            packed, state = quant.empty_4bit(w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type,
                                             double_quant=double_quant, device=w.device)
        else:
            packed, state = quant.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                double_quant=double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self._bnb_state = None
        self._set_buffers(state)

    def _set_buffers(self, state: quant.QuantState4bit) -> None:
        """The quantisation state as buffers: moved by ``.to(device)``, written to state dicts in bitsandbytes' keys
        by ``_save_to_state_dict`` (not under their own names)."""
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.double_quant
        self._weight_dtype = state.dtype
        for name in _STATE:
            self.register_buffer("quant_" + name, getattr(state, name), persistent=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """weight, bias, lora_A, lora_B, then the quant state under ``weight.`` as bitsandbytes' ``Linear4bit`` writes
        it, whether this layer quantised its weight or shares a bitsandbytes one: the same keys either way."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if _row_blocks(self.weight) is not None:
            return self._save_row_blocks(destination, prefix)
        for key, value in quant.state_dict_entries(self.quant_state).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    @torch.no_grad()
    def _save_row_blocks(self, destination, prefix) -> None:
        """The keys and bytes of the unsharded layer from a ``RowBlockWeight`` base. Sharded by FSDP2: the layer's
        parts are all-gathered (a collective, as FSDP2's own state dict), then the packed weight and the scales
        are written as DTensors split as torch.chunk splits them, so a full state dict (``full_tensor``) is the
        unsharded layer's byte for byte (but for the double-quant offset's digits in the JSON entry: the same float,
        written at a fixed width), and a distributed checkpoint stores 1/world of them per rank."""
        local, dtensor = sharding.local_weight(self.weight)
        parts = sharding.gather_parts(self.weight)
        state = _state_4bit(local, parts)
        # sharded: the JSON of a fixed length (quant.state_dict_entries), so that a distributed checkpoint loads
        # into a model of another double-quant offset
        entries = {"": parts[0].view(-1, 1), **quant.state_dict_entries(state, fixed_width=dtensor is not None)}
        for key, value in entries.items():
            if dtensor is not None and key in ("", "absmax", "nested_absmax"):
                value = sharding.chunk_dtensor(value, dtensor)
            destination[prefix + "weight" + ("." + key if key else "")] = value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Reads what ``_save_to_state_dict`` (or bitsandbytes' ``Linear4bit``) wrote: the packed weight and its
        quant state move together, so the layer computes the source's function. A bad state changes nothing."""
        if _row_blocks(self.weight) is not None:
            return self._load_row_blocks(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                         error_msgs)
        head = prefix + "weight."
        entries = {k[len(head):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(head)}
        if not entries:
            if strict:
                missing_keys.append(head + "absmax")
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        try:
            state = quant.state_from_entries(entries, device=self.weight.device)
            if tuple(state.shape) != (self.out_features, self.in_features) or self.in_features % state.blocksize:
                raise ValueError(f"its shape {tuple(state.shape)} and blocksize {state.blocksize} do not fit this "
                                 f"layer (out_features, in_features) = ({self.out_features}, {self.in_features})")
        except ValueError as e:
            error_msgs.append(f"{head}*: cannot load the 4-bit quant state: {e}")
            return
        n = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) > n:
            return
        if getattr(self.weight, "quant_state", None) is not None:  # a shared bitsandbytes Params4bit: its state
            self.weight.quant_state = state.to_bnb()
            self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.double_quant
            self._bnb_state = None
        else:
            self._set_buffers(state)

    @torch.no_grad()
    def _load_row_blocks(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """``_load_from_state_dict`` into a ``RowBlockWeight`` base, sharded or not: the entries (plain tensors or
        DTensors, gathered here: a collective when sharded) must describe a weight of this layer's format; each rank
        keeps its own rows. A bad state changes nothing."""
        head = prefix + "weight."
        entries = {k[len(head):]: _full(state_dict.pop(k)) for k in sorted(state_dict) if k.startswith(head)}
        packed = state_dict.pop(prefix + "weight", None)
        local, dtensor = sharding.local_weight(self.weight)
        if dtensor is not None:
            # set_model_state_dict(broadcast_from_rank0=True) leaves the quant state on rank 0 only and this weight's
            # torch.chunk piece on each rank (RowBlockWeight.copy_): share the one, gather the other
            entries = sharding.share_object(entries or None, dtensor) or {}
            piece = sharding.take_piece(self.weight) if packed is self.weight else None
            if sharding.share_object(True if piece is not None else None, dtensor):
                packed = sharding.gather_pieces(piece, dtensor)
        if packed is None or packed is self.weight or not entries:
            if strict:
                missing_keys.append(prefix + "weight" if packed is None or packed is self.weight else head + "absmax")
            return self._load_rest(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                   error_msgs)
        packed = _full(packed)
        try:
            state = quant.state_from_entries(entries, device=local.parts[0].device)
            if _fmt_4bit(state) != local.fmt:
                raise ValueError(f"its format {_fmt_4bit(state)} differs from this layer's {local.fmt} "
                                 "(out_features, in_features, quant_type, blocksize, dtype, double-quant blocksize)")
            n = state.shape[0] * state.shape[1] // 2
            if packed.numel() * packed.element_size() != n:
                raise ValueError(f"weight must hold {n} packed bytes; got {tuple(packed.shape)} {packed.dtype}")
        except ValueError as e:
            error_msgs.append(f"{head}*: cannot load the 4-bit quant state: {e}")
            return
        n = len(error_msgs)
        self._load_rest(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if len(error_msgs) == n:
            parts, shared = _parts_4bit(packed.to(local.parts[0].device), state)
            sharding.load_parts(self.weight, parts)
            for mine, new in zip(local.shared, shared, strict=True):
                mine.copy_(new)

    def _load_rest(self, state_dict, prefix, *args):
        """nn.Module's load of everything but ``weight`` (bias, adapters, magnitude)."""
        weight = self._parameters.pop("weight")
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            self._parameters["weight"] = weight

    def _fqn_modifiers(self) -> dict[str, str]:
        """For ``torch.distributed.checkpoint.state_dict``: the quant-state keys ``weight.absmax`` ... are not
        attributes of the weight tensor; their owner is ``_state_dict_names``, which resolves any dotted name."""
        return {"weight": "_state_dict_names"}

    @property
    def _state_dict_names(self):
        return _ANY_NAME

    @torch.no_grad()
    def to_row_blocks(self) -> Linear4bit:
        """Hold the packed codes and their quant state as one ``fastlora.sharding.RowBlockWeight`` parameter
        (``weight``, the same tensors, no copy), so that ``torch.distributed.fsdp.fully_shard`` shards codes and scales
        alike, by whole quantisation blocks (docs/distributed.md). The function, the state dict keys and bytes are
        unchanged. A bitsandbytes ``Params4bit`` shared with a bitsandbytes layer stops being shared. Returns self."""
        if _row_blocks(self.weight) is not None:
            return self
        state = self.quant_state
        parts, shared = _parts_4bit(self.weight.detach(), state)
        weight = RowBlockWeight(parts, shared, _layout_4bit(state), _fmt_4bit(state), state.shape[0])
        for name in _STATE:
            self._buffers.pop("quant_" + name, None)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self._bnb_state = None
        return self

    @torch.no_grad()
    def quantize_rows_(self, read_rows) -> None:
        """Quantise this layer's base from its full-precision weight W [out, in], reading only the rows this rank
        holds: ``read_rows(r0, r1)`` returns W[r0:r1] (e.g. a safetensors slice), so no rank holds the whole W.
        For a layer after ``to_row_blocks()``, sharded by ``fully_shard`` or not (typically built on the meta
        device, then ``to_empty``). The bytes are those ``quant.quantize_4bit`` gives the whole W (blocks never
        span rows, as in_features is a multiple of the blocksize); the format (quant_type, blocksize, double quant,
        the dtype that ``dequantized_weight`` returns) stays the layer's. With double quant the offset, the mean of
        every block's absmax, needs all of them: all-gathered over the mesh (fp32, 1/blocksize of W's elements; a
        collective every rank must call)."""
        local = _row_blocks(self.weight)
        if local is None:
            raise TypeError("quantize_rows_ needs a weight in row blocks: call to_row_blocks() first")
        _, dtensor = sharding.local_weight(self.weight)
        _, N, K, quant_type, blocksize, dtype, blocksize2 = local.fmt
        r0, r1 = sharding.local_rows(self.weight)
        if r1 > r0:
            w = read_rows(r0, r1)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != (r1 - r0, K):
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"read_rows({r0}, {r1}) must return rows {r0}:{r1} of the weight, shape "
                                 f"({r1 - r0}, {K}); got {got}")
            packed, state = quant.quantize_4bit(w.to(local.device), blocksize=blocksize, quant_type=quant_type,
                                                double_quant=False)
            codes, absmax = packed.reshape(-1), state.absmax
        else:
            codes = torch.empty(0, dtype=torch.uint8, device=local.device)
            absmax = torch.empty(0, dtype=torch.float32, device=local.device)
        parts, shared = [codes, absmax], [quant.CODES[quant_type].to(local.device)]
        if blocksize2 is not None:
            everyone = absmax if dtensor is None else sharding.gather_pieces(absmax, dtensor)
            offset = everyone.mean()
            q, absmax2 = quant._quantize_dynamic(absmax - offset, blocksize2)
            parts = [codes, q, absmax2]
            shared += [quant.DYNAMIC_CODE.to(local.device), offset]
        sharding.write_local(self.weight, parts, shared)

    @torch.no_grad()
    def init_magnitude_(self) -> None:
        """QDoRA: set ``lora_magnitude`` to PEFT's initial ||W_n|| (B being zero) from this layer's base, sharded or
        not: each rank computes the norms of its own rows, then they are all-gathered (fp32, out_features values: a
        collective). For a layer whose base ``quantize_rows_`` filled after building on the meta device."""
        if not self.use_dora:
            raise ValueError("init_magnitude_ is for a DoRA layer (use_dora=True); this one has no lora_magnitude")
        local = _row_blocks(self.weight)
        if local is None and hasattr(self.weight, "_local_tensor"):
            raise TypeError("init_magnitude_ on a weight sharded by FSDP2 needs row blocks: call to_row_blocks() "
                            "before fully_shard")
        if local is None:
            sq = dora.weight_sq_4bit(*self._base())
        else:
            _, dtensor = sharding.local_weight(self.weight)
            r0, r1 = sharding.local_rows(self.weight)
            sq = torch.empty(0, dtype=torch.float32, device=local.device)
            if r1 > r0:  # the rows' own codes and scales: whole blocks (units), decoded as the whole weight's
                lay = local.row_layout
                mine = [p[:lay.count(i, r1) - lay.count(i, r0)] for i, p in enumerate(local.parts)]
                state = _state_4bit(local, mine)
                state.shape = torch.Size((r1 - r0, state.shape[1]))
                sq = dora.weight_sq_4bit(mine[0], state)
            if dtensor is not None:
                sq = sharding.gather_pieces(sq, dtensor)
        norms = sq.sqrt().to(self.lora_magnitude.dtype)
        sharding.load_rows(self.lora_magnitude, lambda r0, r1: norms[r0:r1])

    def _setup(self, bias, r, alpha, dropout, use_rslora, compute_dtype, use_dora=False, adapter_dtype=None):
        _check_dtype("compute_dtype", compute_dtype)
        _check_use_dora(use_dora)
        if self.in_features % self.blocksize:
            raise ValueError(f"in_features = {self.in_features} must be a multiple of the quantisation blocksize "
                             f"{self.blocksize}: the fused 4-bit GEMM reads each weight row as whole blocks")
        args = _adapter_args(r, alpha, dropout, use_rslora)
        self.compute_dtype = compute_dtype
        dtype = _adapter_dtype(adapter_dtype, torch.float32)  # None: fp32 (PEFT's QLoRA)
        _init_adapter(self, bias, args, use_dora, dict(device=self.weight.device, dtype=dtype),
                      lambda: dora.weight_sq_4bit(*self._base()))

    def _norm(self) -> torch.Tensor:
        """max(||W + s B A||, eps) per row, fp32 [out], W dequantised; kept in eval under ``DoraCaching``."""
        packed, state = self._base()
        return dora.eval_cached(self, (packed, state.absmax, self.lora_A, self.lora_B),
                                lambda: dora.weight_norm_4bit(packed, state, self.lora_A, self.lora_B,
                                                              self.scaling), (self.scaling,))

    def _base(self) -> tuple[torch.Tensor, quant.QuantState4bit]:
        """(the packed codes, their quant state): what the fused kernels read."""
        rb = _row_blocks(self.weight)
        if rb is not None:
            return rb.parts[0], self.quant_state
        return self.weight, self.quant_state

    @property
    def quant_state(self) -> quant.QuantState4bit:
        """The block scales of ``weight`` as a ``fastlora.quant.QuantState4bit`` (the same tensors, no copy)."""
        rb = _row_blocks(self.weight)
        if rb is not None:
            if rb.rows != rb.row_layout.rows or rb is not self.weight:
                raise RuntimeError("this Linear4bit's weight is sharded by FSDP2: its quant state exists whole only "
                                   "while FSDP2 has gathered the weight (forward and backward); state_dict() "
                                   "and dequantized_weight() gather it")
            return _state_4bit(rb, rb.parts)
        qs = getattr(self.weight, "quant_state", None)
        if qs is not None:  # bitsandbytes' Params4bit: its state, converted once per device move
            if getattr(qs, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference ran on the shared layer
                _restore_bnb_layout(self.weight)
                self.double_quant = False
            key = (id(qs), id(qs.absmax))
            if self._bnb_state is None or self._bnb_state[0] != key:
                self._bnb_state = (key, quant.QuantState4bit.from_bnb(qs))
            return self._bnb_state[1]
        b = {name: getattr(self, "quant_" + name) for name in _STATE}
        return quant.QuantState4bit(
            absmax=b["absmax"], shape=torch.Size((self.out_features, self.in_features)), dtype=self._weight_dtype,
            blocksize=self.blocksize, quant_type=self.quant_type, code=b["code"], offset=b["offset"],
            absmax2=b["absmax2"], code2=b["code2"], blocksize2=quant.BLOCKSIZE2 if self.double_quant else None)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the quantisation state; dtype casts (``.half()``, ``.to(torch.bfloat16)``) leave it
        fp32/uint8, as bitsandbytes keeps its state, so the packed weight still decodes."""
        state = {name: self._buffers.pop("quant_" + name) for name in _STATE if "quant_" + name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in state.items():
                if t is not None:
                    t = t.to(fn(torch.empty(0, device=t.device)).device)
                self._buffers["quant_" + name] = t
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, state = self._base()
        return _lora_linear_4bit(x, packed, state, self.bias, self.lora_A, self.lora_B, self.scaling,
                                 compute_dtype=self.compute_dtype, dropout_p=self.dropout, training=self.training,
                                 seed=None, magnitude=self.lora_magnitude if self.use_dora else None,
                                 norm_fn=self._norm if self.use_dora else None)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] decoded as bitsandbytes' ``dequantize_4bit`` does, in ``dtype`` (default compute_dtype)."""
        rb = _row_blocks(self.weight)
        if rb is not None:  # sharded or not: the whole weight's parts (gathered: a collective when sharded)
            parts = sharding.gather_parts(self.weight)
            return quant.dequantize_4bit(parts[0], _state_4bit(rb, parts), dtype=dtype or self.compute_dtype)
        return quant.dequantize_4bit(self.weight, self.quant_state, dtype=dtype or self.compute_dtype)

    def dequantize(self) -> Linear:
        """A ``fastlora.Linear`` over the dequantised weight (compute_dtype) that shares this layer's bias and
        adapter parameters (and ``lora_magnitude``); it computes the same function, up to the rounding of W to
        compute_dtype (with DoRA also in the norm), and can ``merge`` exactly."""
        return _dense_twin(self, self.dequantized_weight())

    def merge(self) -> None:
        _refuse_merge(self, "4-bit")

    def unmerge(self) -> None:
        raise NotImplementedError("fastlora.Linear4bit is never merged (see merge)")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, use_dora={self.use_dora}, "
                f"quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit``. Never imports bitsandbytes (its import logs warnings
    on some CPUs): a model that holds one has imported it already."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


@torch.no_grad()
def _restore_bnb_layout(weight) -> None:
    """Put a bitsandbytes ``Params4bit`` that bitsandbytes repacked for its AVX512-BF16 CPU kernel back into the
    format, in place, as bitsandbytes' own ``.cuda()`` and ``state_dict()`` do (``quant.from_bnb_cpu_layout``): the
    bitsandbytes layer and fastlora then read the same bytes again. The scales stay the bf16 values bitsandbytes
    computes with, as fp32 without double quant."""
    qs = weight.quant_state
    packed, state = quant.from_bnb_cpu_layout(weight.data, qs)
    weight.data = packed
    qs.absmax, qs.dtype, qs.nested = state.absmax, state.dtype, False
    qs.packing_format_for_cpu = False


class _AnyName:
    """Every attribute is itself: the owner of the dotted quant-state names in a state dict (``_fqn_modifiers``)."""

    def __getattr__(self, name):
        if name.startswith("_"):  # bitsandbytes' names never do; torch probes for private hooks
            raise AttributeError(name)
        return self


_ANY_NAME = _AnyName()


def _row_blocks(weight) -> RowBlockWeight | None:
    """The ``RowBlockWeight`` of a layer's weight (itself, or the local shard inside FSDP2's DTensor), else None."""
    local = getattr(weight, "_local_tensor", weight)
    return local if isinstance(local, RowBlockWeight) else None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A state-dict value as a whole tensor: a DTensor's ``full_tensor()`` (a collective), else itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _layout_4bit(state: quant.QuantState4bit) -> sharding.RowLayout:
    """Per row: K/2 code bytes, K/blocksize absmax, K/(blocksize * blocksize2) absmax2 (double quant)."""
    N, K = state.shape
    rates = [sharding.rate(K // 2, 1), sharding.rate(K // state.blocksize, 1)]
    if state.double_quant:
        rates.append(sharding.rate(K // state.blocksize, state.blocksize2))
    return sharding.RowLayout(N, tuple(rates), K // 2)


def _fmt_4bit(state: quant.QuantState4bit) -> tuple:
    return ("bnb-4bit", *state.shape, state.quant_type, state.blocksize, state.dtype, state.blocksize2)


def _parts_4bit(packed: torch.Tensor, state: quant.QuantState4bit):
    """(parts, shared) of a packed weight and its state: codes as flat bytes, absmax (and absmax2) sharded by row;
    the codebooks and the double-quant offset replicated."""
    parts = [packed.contiguous().view(torch.uint8).reshape(-1), state.absmax]
    shared = [state.code]
    if state.double_quant:
        parts.append(state.absmax2)
        shared += [state.code2, state.offset]
    return parts, shared


def _state_4bit(rb: RowBlockWeight, parts) -> quant.QuantState4bit:
    """The ``QuantState4bit`` of the whole weight's ``parts`` (``rb``: the layer's RowBlockWeight, for the format)."""
    _, N, K, quant_type, blocksize, dtype, blocksize2 = rb.fmt
    double = blocksize2 is not None
    return quant.QuantState4bit(
        absmax=parts[1], shape=torch.Size((N, K)), dtype=dtype, blocksize=blocksize, quant_type=quant_type,
        code=rb.shared[0], offset=rb.shared[2] if double else None, absmax2=parts[2] if double else None,
        code2=rb.shared[1] if double else None, blocksize2=blocksize2)
