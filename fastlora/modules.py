"""nn.Modules: ``Linear`` (one adapter, PEFT layout) and ``GroupedLinear`` (a stack of adapters, per-token ids)."""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora import dora
from fastlora._launch import MAX_RANK, block_r
from fastlora.functional import (
    _check_lora,
    _check_x_weight_bias,
    _columns_aligned,
    _dora_linear,
    _grouped_lora_linear,
    _short,
    lora_linear,
)
from fastlora.grouping import AdapterBatch
from fastlora.reference import DORA_EPS


def _adapter_args(r, alpha, dropout, use_rslora) -> tuple[int, int | float, float, bool, float]:
    """(r, alpha, dropout, use_rslora, scaling) checked and as plain Python numbers (numpy scalars converted), before a
    layer sets any of them, so a bad value changes nothing."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= MAX_RANK:
        raise ValueError(f"r must be an int in [1, {MAX_RANK}]; got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite real number; got {alpha!r} ({type(alpha).__name__})")
    dropout = _check_dropout_arg(dropout)
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool; got {use_rslora!r}")
    r, alpha = int(r), int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
    return r, alpha, dropout, use_rslora, alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_dropout_arg(dropout) -> float:
    """A layer's dropout probability, checked where it enters (not at the first training forward), as a float."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    return float(dropout)


def _check_use_dora(use_dora) -> None:
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool; got {type(use_dora).__name__}")


ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _adapter_dtype(adapter_dtype, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of new adapters (lora_A, lora_B, DoRA's magnitude) over a base of ``base_dtype``: ``adapter_dtype``
    if given, else PEFT's rule (``autocast_adapter_dtype=True``, its default): fp32 over a 16-bit base (an Adam step
    on a 16-bit adapter is lost below its spacing; GradScaler refuses fp16 gradients), the base's dtype otherwise."""
    if adapter_dtype is None:
        return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
    if adapter_dtype not in ADAPTER_DTYPES:
        raise TypeError(f"adapter_dtype must be torch.float16, torch.bfloat16, torch.float32 or None (fp32 over a "
                        f"16-bit base, else the base's dtype); got {adapter_dtype!r}")
    return adapter_dtype


def _init_adapter(layer, bias, args, use_dora, kw, weight_sq) -> None:
    """What the single-adapter layers (``Linear``, ``Linear4bit``) set alike: ``args`` (from ``_adapter_args``), the
    frozen bias, lora_A (Kaiming) and lora_B (zeros) of ``kw``'s device and dtype, and with ``use_dora``
    ``lora_magnitude`` = sqrt(weight_sq()), PEFT's initial ||W + s B A|| per row (= ||W_n||: B starts at zero)."""
    layer.r, layer.alpha, layer.dropout, layer.use_rslora, layer.scaling = args
    layer.bias = bias
    if bias is not None:
        bias.requires_grad_(False)
    layer.lora_A = nn.Parameter(torch.empty(layer.r, layer.in_features, **kw))
    layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, layer.r, **kw))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    layer.merged = False
    layer.use_dora = use_dora
    layer._norm_cache = None  # (versions and storages of what the norm reads; the norm) in eval mode
    if use_dora:
        layer.lora_magnitude = nn.Parameter(weight_sq().sqrt().to(kw["dtype"]))


@torch.no_grad()
def _dense_twin(layer, weight: torch.Tensor) -> Linear:
    """A ``fastlora.Linear`` over ``weight`` (a quantised layer's dequantised W, [out, in]) sharing ``layer``'s bias,
    adapter parameters, scaling and ``lora_magnitude``, in its train/eval mode: what ``dequantize()`` returns."""
    base = nn.Linear(layer.in_features, layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.copy_(weight)
    base.bias = layer.bias
    twin = Linear.from_linear(base, r=layer.r, alpha=layer.alpha, dropout=layer.dropout, use_rslora=layer.use_rslora,
                              use_dora=layer.use_dora)
    twin.scaling = layer.scaling
    twin.lora_A, twin.lora_B = layer.lora_A, layer.lora_B
    if layer.use_dora:
        twin.lora_magnitude = layer.lora_magnitude
    return twin.train(layer.training)


def _refuse_merge(layer, kind: str) -> None:
    """A quantised layer's ``merge``, refused: folding B A (DoRA: and g) into the ``kind`` weight re-quantises it."""
    what = "its DoRA adapter (g (W + s B A))" if layer.use_dora else "its adapter"
    raise NotImplementedError(
        f"fastlora.{type(layer).__name__} cannot merge {what} into the {kind} weight: that re-quantises the whole base "
        "(lossy, and unmerge could not restore it). Call .dequantize() for a fastlora.Linear over the "
        "dequantised weight and merge that.")


class Linear(nn.Module):
    """``nn.Linear`` plus a LoRA adapter: y = x W^T + b + (alpha/r) (dropout(x) A^T) B^T.

    W and b are frozen; ``lora_A`` (r, in) is kaiming-uniform, ``lora_B`` (out, r) zeros, so a fresh layer
    equals its base. The state dict keys and layouts match PEFT's (``lora_A``/``lora_B`` weights).

    ``use_dora=True`` (PEFT's DoRA): a trainable ``lora_magnitude`` (out,), initialised as PEFT does to
    ||W + s B A|| per row (= ||W_n||, B being zero), and y = g (x W^T + s T B^T) + b with g = lora_magnitude /
    max(||W + s B A||, eps) (PEFT's dropout form in training, docs/dora.md). The norm is computed every call;
    only under ``fastlora.DoraCaching`` is it kept in eval mode (docs/dora.md, "Caching the norm").

    ``adapter_dtype``: the dtype of lora_A, lora_B (and lora_magnitude). None (default) is PEFT's rule: fp32 over a
    bf16/fp16 base (``get_peft_model``'s ``autocast_adapter_dtype=True``; the kernels take fp32 adapters under
    16-bit activations and return their gradients in fp32), the base's dtype otherwise.
    """

    def __init__(self, in_features, out_features, bias=True, *, r=8, alpha=8, dropout=0.0, use_rslora=False,
                 use_dora=False, device=None, dtype=None, adapter_dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora, use_dora, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r=8, alpha=8, dropout=0.0, use_rslora=False, use_dora=False,
                    adapter_dtype=None) -> Linear:
        """Wrap ``linear``: the new layer shares (and freezes) its weight and bias parameters. ``adapter_dtype``: see
        the class (None: fp32 over a 16-bit weight)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, use_dora, adapter_dtype)
        return self

    def _setup(self, weight, bias, r, alpha, dropout, use_rslora, use_dora=False, adapter_dtype=None):
        args = _adapter_args(r, alpha, dropout, use_rslora)
        _check_use_dora(use_dora)
        dtype = _adapter_dtype(adapter_dtype, weight.dtype)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.weight.requires_grad_(False)
        self._merged_g = None  # what unmerge() needs: g of the merge and the rows it zeroed
        _init_adapter(self, bias, args, use_dora, dict(device=weight.device, dtype=dtype),
                      lambda: dora.weight_sq(self.weight))

    def _norm(self) -> torch.Tensor:
        """max(||W + s B A||, eps) per row, fp32 [out]; kept in eval mode under ``DoraCaching``."""
        return dora.eval_cached(self, (self.weight, self.lora_A, self.lora_B),
                                lambda: dora.weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling),
                                (self.scaling,))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in the base weight's dtype (computed in fp32)."""
        return self._delta_fp32().to(self.weight.dtype)

    def _delta_fp32(self) -> torch.Tensor:
        """scaling * B A in fp32: merge and unmerge add it to W in fp32 and round once, as PEFT's merge of fp32
        adapters into a 16-bit W."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight (inference); forward then runs the plain linear. DoRA (as PEFT):
        W <- g (W + s B A), g from the unmerged weight's norm, kept (with the rows g zeroes) for unmerge."""
        if self.merged:
            return
        if self.use_dora:
            w = self.weight.float() + self._delta_fp32()  # W + s B A, as PEFT merges it
            g = self.lora_magnitude.float() / torch.linalg.vector_norm(w, dim=1).clamp_min(DORA_EPS)
            self._keep_merge_scale(g)
            self.weight.copy_(w * g[:, None])
        else:
            self.weight.add_(self._delta_fp32())  # computed in fp32 (or W's wider dtype), rounded once
        self.merged = True

    def _keep_merge_scale(self, g: torch.Tensor) -> None:
        """Record a DoRA merge's scale g (fp32 [out]) for ``unmerge``, with the weight rows g zeroes as they are now
        (which a merge by g cannot give back)."""
        zeroed = (g == 0).nonzero().squeeze(1)
        self._merged_g = (g, zeroed, self.weight.detach()[zeroed].clone())

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.use_dora:
            g, zeroed, rows = self._merged_g
            self.weight.copy_(self.weight.float() / torch.where(g == 0, 1.0, g)[:, None] - self._delta_fp32())
            self.weight[zeroed] = rows
            self._merged_g = None
        else:
            self.weight.sub_(self._delta_fp32())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            _check_x_weight_bias(x, self.weight, self.bias)
            s, p = _check_lora(x, self.lora_A, self.lora_B, self.out_features, self.in_features, self.scaling,
                               self.dropout, self.training)
            return _dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, s, self.lora_magnitude, p,
                                self.training, None, self._norm)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, use_dora={self.use_dora}, "
                f"merged={self.merged}")


class GroupedLinear(nn.Module):
    """A frozen base linear with a ragged stack of adapters, each at its own rank; each token picks one (or -1).

    Adapter g owns rows ``rank_offsets[g]:rank_offsets[g + 1]`` of ``lora_A`` (sum r, in) and those columns of
    ``lora_B`` (out, sum r): its rank r_g rounded up to a multiple of 8 (zero rows / columns past r_g), the total
    to a multiple of 16, so every adapter's columns of B start 16 bytes aligned (vector loads, cp.async). The layer
    holds about sum r_g * (in + out) adapter values, never n * r_max * (in + out).
    ``scaling`` is an (n,) buffer (alpha/r each; adapters loaded with other alphas set their own entry), and
    ``rank_offsets`` an int32 (n + 1,) buffer; ``ranks`` is the same on the host. ``GroupedLinear(in, out,
    num_adapters=n, r=8)`` makes n adapters of rank r; ``ranks=[8, 64, 256]`` one per entry (rank 0: an empty slot).
    ``removed``: adapter ids evicted by ``fastlora.remove_adapters`` (rank 0; using one raises ``ValueError``).

    DoRA: ``lora_magnitude`` (n, out) is a trainable parameter when some adapter is DoRA, else None (a plain stack holds
    and computes nothing more). Row g is adapter g's magnitude, or NaN for a plain LoRA adapter (and for empty or
    removed slots): one batch mixes both (``grouped_lora_linear(magnitude=)``, docs/dora.md). ``use_dora=True`` makes
    every adapter DoRA, initialised as PEFT does (||W_n||: B starts at zero). The norm is computed every call; only
    under ``fastlora.DoraCaching`` is it kept in eval mode.

    ``adapter_dtype``: the stacks' dtype (lora_A, lora_B, lora_magnitude); None: fp32 over a bf16/fp16 base (PEFT's
    rule, as ``Linear``), the base's dtype otherwise.
    """

    def __init__(self, in_features, out_features, bias=True, *, num_adapters=None, r=8, alpha=8, dropout=0.0,
                 ranks=None, use_dora=False, device=None, dtype=None, adapter_dtype=None):
        super().__init__()
        if ranks is None:
            if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
                raise ValueError(f"num_adapters must be a positive int; got {num_adapters!r}")
            r, alpha, dropout, _, scale = _adapter_args(r, alpha, dropout, False)
            ranks = [r] * num_adapters
            scales = [scale] * num_adapters
        else:
            if num_adapters is not None and num_adapters != len(ranks):
                raise ValueError(f"num_adapters = {num_adapters} but ranks has {len(ranks)} entries")
            ranks = list(ranks)
            if not ranks:
                raise ValueError("ranks must name at least one adapter; got none")
            scales = []
            for rank in ranks:
                if isinstance(rank, numbers.Integral) and rank == 0:
                    scales.append(0.0)
                    continue
                rank, alpha, dropout, _, scale = _adapter_args(rank, alpha, dropout, False)
                scales.append(scale)
            ranks = [int(rank) for rank in ranks]
        _check_use_dora(use_dora)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        starts, total = _layout(ranks)
        kw = dict(device=base.weight.device, dtype=_adapter_dtype(adapter_dtype, base.weight.dtype))
        lora_A = torch.zeros(total, in_features, **kw)
        for o, rank in zip(starts, ranks, strict=True):
            if rank:
                nn.init.kaiming_uniform_(lora_A[o:o + rank], a=math.sqrt(5))
        magnitude = None
        if use_dora:  # PEFT's initial magnitude ||W + s B A|| = ||W_n||; empty slots plain (NaN)
            norm = dora.weight_sq(base.weight).sqrt().to(kw["dtype"])
            magnitude = norm.expand(len(ranks), -1).clone()
            magnitude[torch.tensor([rank == 0 for rank in ranks], device=norm.device)] = float("nan")
        self._setup(base.weight.requires_grad_(False), base.bias.requires_grad_(False) if bias else None,
                    lora_A, torch.zeros(out_features, total, **kw), ranks,
                    torch.tensor(scales, dtype=torch.float32, device=base.weight.device), dropout, frozenset(),
                    magnitude)
        self.alpha = alpha

    @classmethod
    def from_stack(cls, weight, bias, lora_A, lora_B, ranks, scaling, *, dropout=0.0, removed=(),
                   magnitude=None) -> GroupedLinear:
        """A layer over ``weight``/``bias`` (shared, frozen) holding a ragged stack built elsewhere, laid out as
        ``_layout(ranks)``: lora_A (total, in), lora_B (out, total), adapter g at rank ``ranks[g]``; ``scaling`` fp32
        (n,); ``magnitude`` (n, out) or None: DoRA rows, NaN for plain adapters. The tensors are taken as they are (no
        copy). Parts that disagree raise ``ValueError`` naming the argument and both shapes, before anything is set."""
        ranks = _check_stack(weight, lora_A, lora_B, ranks, scaling, magnitude)
        dropout = _check_dropout_arg(dropout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self._setup(weight, bias, lora_A, lora_B, ranks, scaling, dropout, frozenset(removed), magnitude)
        self.alpha = None  # per adapter: see the scaling buffer
        return self

    def _setup(self, weight, bias, lora_A, lora_B, ranks, scaling, dropout, removed, magnitude=None):
        starts, _ = _layout(ranks)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias
        self.lora_A, self.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
        self.ranks = list(ranks)
        self.num_adapters = len(ranks)
        self.r = max(ranks)
        self.dropout = dropout
        self.removed = removed
        self.register_buffer("scaling", scaling)
        end = starts[-1] + _slot(ranks[-1])
        self.register_buffer("rank_offsets", torch.tensor([*starts, end], dtype=torch.int32, device=weight.device))
        self.lora_magnitude = None if magnitude is None else nn.Parameter(magnitude)
        self._norm_cache = None  # (versions and storages of W, A, B, scaling, the norm) in eval mode
        self._context: _AdapterContext | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse (nothing of this layer loaded) a stack laid out for other ranks: ``rank_offsets`` must equal this
        layer's, and each adapter's rows past its rank (zero padding to a multiple of 8) must be zero, else ``ranks``,
        ``adapter(g)`` and ``add_adapters``/``remove_adapters`` would cut adapters at the wrong rank."""
        offsets, a, b = (state_dict.get(prefix + k) for k in ("rank_offsets", "lora_A", "lora_B"))
        starts, _ = _layout(self.ranks)
        own = [*starts, starts[-1] + _slot(self.ranks[-1])]  # what rank_offsets holds, from the host-side ranks
        why = None
        if offsets is None:
            if a is not None or b is not None:
                why = "it has lora_A/lora_B but no rank_offsets, so its adapters' ranks are unknown"
        elif offsets.is_meta:
            pass
        elif tuple(offsets.shape) != (len(own),) or offsets.tolist() != own:
            why = (f"its rank_offsets {_short(offsets.tolist())} differ from this layer's {_short(own)} "
                   f"(ranks {_short(self.ranks)})")
        elif (a is not None and b is not None and not (a.is_meta or b.is_meta) and a.shape == self.lora_A.shape
              and b.shape == self.lora_B.shape):
            for g, (o, rank) in enumerate(zip(own, self.ranks, strict=False)):
                end = o + _slot(rank)
                if a[o + rank:end].count_nonzero() or b[:, o + rank:end].count_nonzero():
                    why = (f"adapter {g} has non-zero values past this layer's rank {rank} (rows {o + rank}:{end} of "
                           f"lora_A / columns of lora_B): it was saved at a larger rank")
                    break
        if why is not None:
            error_msgs.append(f"GroupedLinear {prefix[:-1] or '(root)'!r}: cannot load a stack laid out for other "
                              f"ranks: {why}. Build the layer with the saved ranks (GroupedLinear(..., ranks=...)) "
                              "or load the adapters with fastlora.add_adapters; nothing of this layer was loaded")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def use_dora(self) -> bool:
        """Whether the stack holds a magnitude (some adapter may be DoRA)."""
        return self.lora_magnitude is not None

    def _norm(self) -> torch.Tensor:
        """max(||W + s_g B_g A_g||, eps) for every adapter, fp32 [n, out]; kept in eval under ``DoraCaching``."""
        args = (self.weight, self.lora_A, self.lora_B, self.scaling, self.rank_offsets)
        return dora.eval_cached(self, args, lambda: dora.grouped_weight_norm(*args))

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = None
        check = True
        if adapter_ids is None:
            if self._context is None:
                raise ValueError("GroupedLinear needs adapter_ids: pass them to forward or run the model "
                                 "inside `with fastlora.use_adapters(model, adapter_ids)`")
            adapter_ids, batch = self._context.ids_for(x.shape[:-1], self.num_adapters, x.device, self.removed)
            check = self._context.check_ids  # the batch checked the ids; this checks the magnitude's NaN rows
        elif self.removed and not torch.compiler.is_compiling():
            _check_removed(adapter_ids, self.removed)
        # the offsets are this layer's own (checked when built): no host read, T as wide as the largest rank
        align = 8 if _columns_aligned(self.lora_B) else 1
        return _grouped_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, adapter_ids,
                                    dropout_p=self.dropout, training=self.training, check_ids=check, batch=batch,
                                    rank_offsets=self.rank_offsets, ragged_width=block_r(_slot(max(self.r, 1))),
                                    ragged_align=align, magnitude=self.lora_magnitude,
                                    norm_fn=self._norm if self.lora_magnitude is not None else None)

    def adapter(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A [r_g, in], lora_B [out, r_g]) of adapter g: views into the stack."""
        o = _layout(self.ranks)[0][g]
        return self.lora_A[o:o + self.ranks[g]], self.lora_B[:, o:o + self.ranks[g]]

    def magnitude(self, g: int) -> torch.Tensor | None:
        """Adapter g's DoRA magnitude [out] (a view), or None for a plain adapter (no magnitude, or a NaN row)."""
        if self.lora_magnitude is None:
            return None
        row = self.lora_magnitude[g]
        return None if bool(torch.isnan(row).all()) else row

    def extra_repr(self) -> str:
        ranks = self.ranks if len(self.ranks) <= 8 else f"{self.ranks[:8]}..."
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"num_adapters={self.num_adapters}, ranks={ranks}, dropout={self.dropout}"
                + (", use_dora=True" if self.use_dora else "")
                + (f", removed={sorted(self.removed)}" if self.removed else ""))


def _slot(rank: int) -> int:
    """The rows a rank-``rank`` adapter takes in a layer's stack: rank rounded up to a multiple of 8."""
    return -(-rank // 8) * 8


def _layout(ranks: list[int]) -> tuple[list[int], int]:
    """(start row of each adapter, total rows) of a layer's ragged stack: each adapter in ``_slot(rank)`` rows, the
    total rounded up to a multiple of 16 (B's row stride: Triton then knows every row starts aligned)."""
    starts, o = [], 0
    for r in ranks:
        starts.append(o)
        o += _slot(r)
    return starts, -(-o // 16) * 16


def _check_stack(weight, lora_A, lora_B, ranks, scaling, magnitude) -> list[int]:
    """``GroupedLinear.from_stack``'s parts checked against each other and ``_layout(ranks)``; the ranks as ints."""
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("scaling", scaling)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features); got {tuple(weight.shape)}")
    ranks = list(ranks)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 <= r <= MAX_RANK
                        for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of ints in [0, {MAX_RANK}]; got {_short(ranks)}")
    ranks = [int(r) for r in ranks]
    (N, K), n, total = weight.shape, len(ranks), _layout(ranks)[1]
    layout = f"for ranks {_short(ranks)} (the layout: each rank rounded up to a multiple of 8, the sum to 16)"
    if tuple(lora_A.shape) != (total, K):
        raise ValueError(f"lora_A must have shape (sum of slots, in_features) = ({total}, {K}) {layout} and weight "
                         f"{tuple(weight.shape)}; got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, total):
        raise ValueError(f"lora_B must have shape (out_features, sum of slots) = ({N}, {total}) {layout} and weight "
                         f"{tuple(weight.shape)}; got {tuple(lora_B.shape)}")
    if tuple(scaling.shape) != (n,):
        raise ValueError(f"scaling must have shape (num_adapters,) = ({n},) for {n} ranks; got {tuple(scaling.shape)}")
    if magnitude is not None and (not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (n, N)):
        shape = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise ValueError(f"magnitude must be None or have shape (num_adapters, out_features) = ({n}, {N}); "
                         f"got {shape}")
    return ranks


def _check_removed(adapter_ids: torch.Tensor, removed) -> None:
    """Raise if any id was evicted by ``remove_adapters`` (one host read, with the range check's)."""
    if adapter_ids.is_meta or not adapter_ids.numel():
        return
    dead = torch.tensor(sorted(removed), device=adapter_ids.device, dtype=adapter_ids.dtype)
    hit = torch.isin(adapter_ids.reshape(-1), dead)
    if bool(hit.any()):
        value = int(adapter_ids.reshape(-1)[hit.nonzero()[0, 0]])
        raise ValueError(f"adapter id {value} was removed (fastlora.remove_adapters) and not reused by a later "
                         f"add; removed ids: {sorted(removed)}")


class _AdapterContext:
    """The ids of one ``use_adapters`` block, with one ``AdapterBatch`` per token shape shared by all layers."""

    def __init__(self, adapter_ids: torch.Tensor, check_ids: bool):
        if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dim() not in (1, 2):
            raise ValueError("adapter_ids must be a tensor of shape (batch,) or (batch, seq); got "
                             f"{getattr(adapter_ids, 'shape', type(adapter_ids).__name__)}")
        if adapter_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter_ids must be int32 or int64; got {adapter_ids.dtype}")
        self.ids = adapter_ids
        self.check_ids = check_ids
        self._batches: dict = {}

    def ids_for(self, token_shape: torch.Size, num_adapters: int, device: torch.device, removed=frozenset()):
        key = (tuple(token_shape), num_adapters, device, removed)
        if key not in self._batches:
            ids = self.ids
            if ids.dim() == 1 and len(token_shape) >= 1 and token_shape[0] == ids.shape[0]:
                ids = ids.reshape(ids.shape[0], *([1] * (len(token_shape) - 1))).expand(token_shape)
            if tuple(ids.shape) != tuple(token_shape):
                raise ValueError(f"use_adapters got adapter_ids of shape {tuple(self.ids.shape)}, which matches "
                                 f"neither the batch nor the tokens of an input with token shape "
                                 f"{tuple(token_shape)}")
            ids = ids.to(device)
            if removed and self.check_ids and not torch.compiler.is_compiling():
                _check_removed(ids, removed)
            self._batches[key] = (ids, AdapterBatch.build(ids, num_adapters, check_ids=self.check_ids))
        return self._batches[key]


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_ids: torch.Tensor, *, check_ids: bool = True):
    """Run every ``GroupedLinear`` in ``model`` with these ids: (batch,) per sample or (batch, seq) per token.

    The token grouping is built once per token shape and shared by all layers; the forward signature of the
    model does not change, so a Hugging Face model can serve a mixed batch.
    """
    layers = [m for m in model.modules() if isinstance(m, GroupedLinear)]
    if not layers:
        raise ValueError("use_adapters found no fastlora.GroupedLinear in the model")
    ctx = _AdapterContext(adapter_ids, check_ids)
    previous = [m._context for m in layers]
    for m in layers:
        m._context = ctx
    try:
        yield ctx
    finally:
        for m, prev in zip(layers, previous, strict=True):
            m._context = prev
