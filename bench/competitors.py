"""The implementations every comparison times, built from one set of weights so their outputs must agree.

Single adapter: ``linear`` (nn.Linear, no LoRA: the cuBLAS floor), ``merged`` (B A folded into W: the
inference floor), ``peft`` (peft.tuners.lora.Linear), ``reference`` (fastlora.reference: three matmuls and
an add), ``cublas`` (addmm for the base, then an in-place addmm_ of the low-rank product, Unsloth style),
``fastlora`` (fastlora.Linear). Multi-adapter: ``linear``, ``fastlora-single`` (one adapter for all tokens:
the grouped floor), ``fastlora-grouped``, ``peft-mixed`` (PEFT's adapter_names mixed batch) and ``loop``
(one low-rank product per adapter over its rows, row indices built once per batch).

QLoRA (a 4-bit base: NF4, double quant, blocksize 64, quantised once; fp32 adapters as in PEFT's QLoRA):
``linear`` (nn.Linear on the dequantised W in the compute dtype, no LoRA: the floor), ``qlora-peft`` (PEFT's
LoRA over a bitsandbytes Linear4bit), ``qlora-dequant`` (W dequantised every call, forward and again in
backward, then addmm and the low-rank addmm_) and ``qlora-fastlora`` (fastlora.Linear4bit).

FP8 (a block-scaled float8_e4m3fn base, 128 x 128 blocks, fp32 scales, quantised once; fp32 adapters as PEFT keeps
them): ``linear`` (nn.Linear on the dequantised W in the compute dtype, no LoRA: the floor), ``fastlora-lora``
(fastlora.lora_linear over the dequantised W, the same fp32 adapters: the bf16 LoRA the FP8 base is measured
against), ``fp8-dequant`` (unfused: W dequantised on every call, forward and again in backward, then
addmm and the low-rank addmm_), ``fp8-fastlora`` (fastlora.lora_linear_fp8, W8A16) and ``fp8-w8a8`` (the same with
fp8_activations=True: x quantised per token and 128 channels inside the forward GEMM, fp8 MMAs; its backward is
W8A16's; 16-bit activations on sm_89 or later, else the cell is skipped).

MoE experts (an experts block of transformers 5: hidden_states, top_k_index, top_k_weights -> out; one adapter per
expert on gate_up_proj and down_proj, PEFT's ``target_parameters`` layout): ``experts`` (transformers' experts module
alone, no LoRA, its ``grouped_mm`` implementation where F.grouped_mm runs), ``peft`` (PEFT ``target_parameters`` over
it), ``peft-baddbmm`` (a PEFT option to fold with baddbmm: none in the installed PEFT, see ``peft_baddbmm_skip``),
``split`` (sort once, then per projection the base grouped GEMM and two grouped LoRA GEMMs with torch ops) and
``fastlora`` (``fastlora.Experts`` over the same module: the rank-r term inside each expert's grouped GEMM).
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools

import harness
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora
from fastlora import quant, reference

LAYER = ("linear", "merged", "peft", "reference", "cublas", "fastlora")
GROUPED = ("linear", "fastlora-single", "peft-mixed", "loop", "fastlora-grouped")
QLORA = ("linear", "qlora-peft", "qlora-dequant", "qlora-fastlora")
FP8 = ("linear", "fastlora-lora", "fp8-dequant", "fp8-fastlora", "fp8-w8a8")
# QLoRA's usual format (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_use_double_quant=True)); bitsandbytes' default blocksize.
QUANT = dict(quant_type="nf4", blocksize=64, double_quant=True)


class Problem:
    """Random frozen base (W, b) and adapters (A, B nonzero, so the low-rank branch shows in the output)."""

    def __init__(self, K, N, R, dtype, device, num_adapters=None, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        kw = dict(dtype=dtype, device=device)

        def rand(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(**kw)

        self.K, self.N, self.R, self.dtype, self.device = K, N, R, dtype, device
        self.alpha = 2 * R
        self.scaling = self.alpha / R
        self.W = rand(N, K, scale=K ** -0.5)
        self.b = rand(N, scale=0.1)
        shape_a = (R, K) if num_adapters is None else (num_adapters, R, K)
        shape_b = (N, R) if num_adapters is None else (num_adapters, N, R)
        self.A = rand(*shape_a, scale=K ** -0.5)
        self.B = rand(*shape_b, scale=R ** -0.5)
        self.num_adapters = num_adapters

    def base_linear(self) -> nn.Linear:
        lin = nn.Linear(self.K, self.N, device="meta")
        lin.weight = nn.Parameter(self.W, requires_grad=False)
        lin.bias = nn.Parameter(self.b, requires_grad=False)
        return lin


class Impl:
    """``forward(x)`` (any dropout drawn from torch's RNG or fastlora's seed); ``params`` the trainable tensors."""

    def __init__(self, forward, params, checked_forward=None, info=None):
        self.forward = forward
        self.params = list(params)
        self.info = info or {}  # recorded in the case's extra_info
        # forward(x, seed) whose dropout mask the check can rebuild; None: forward after torch.manual_seed(seed)
        self.checked_forward = checked_forward


def layer_impl(name: str, pb: Problem, dropout: float, train: bool) -> Impl:
    W, b, s = pb.W, pb.b, pb.scaling
    p = dropout if train else 0.0
    if name == "linear":
        return Impl(lambda x: F.linear(x, W, b), [])
    if name == "merged":
        Wm = (W.float() + s * (pb.B.float() @ pb.A.float())).to(W.dtype)
        return Impl(lambda x: F.linear(x, Wm, b), [])
    A = pb.A.clone().requires_grad_(train)
    B = pb.B.clone().requires_grad_(train)
    if name == "reference":
        return Impl(lambda x: reference.lora_linear(x, W, b, A, B, s, dropout_p=p, training=train), [A, B])
    if name == "cublas":
        def cublas(x):
            x2 = x.reshape(-1, pb.K)
            y = torch.addmm(b, x2, W.t())
            xd = F.dropout(x2, p) if p else x2
            y.addmm_(xd @ A.t(), B.t(), alpha=s)
            return y.reshape(*x.shape[:-1], pb.N)
        return Impl(cublas, [A, B])
    if name == "fastlora":
        mod = fastlora.Linear.from_linear(pb.base_linear(), r=pb.R, alpha=pb.alpha, dropout=dropout,
                                          adapter_dtype=pb.dtype)  # as the PEFT competitor (docs/benchmarks.md)
        set_params(mod, [mod.lora_A, mod.lora_B], [pb.A, pb.B], train)

        def seeded(x, seed):
            return fastlora.lora_linear(x, W, b, mod.lora_A, mod.lora_B, s, dropout_p=p, training=train, seed=seed)
        return Impl(mod, [mod.lora_A, mod.lora_B], seeded)
    if name == "peft":
        layer = peft_layer(pb, dropout, ["default"])
        params = set_params(layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight], [pb.A, pb.B],
                            train)
        return Impl(layer, params)
    raise ValueError(f"unknown competitor {name!r}")


def set_params(module: nn.Module, params: list, values: list, train: bool) -> list:
    """A competitor's trainable tensors ``params`` set to ``values`` (the problem's, so all competitors agree),
    requiring grad and ``module`` in training mode when ``train``; returns ``params``."""
    with torch.no_grad():
        for t, v in zip(params, values, strict=True):
            t.copy_(v)
    module.train(train)
    for t in params:
        t.requires_grad_(train)
    return params


def grouped_impl(name: str, pb: Problem, ids: torch.Tensor) -> Impl:
    """Inference (no grad) implementations for a mixed batch; ``ids`` [M] uniformly random in [0, n)."""
    W, b, s, n = pb.W, pb.b, pb.scaling, pb.num_adapters
    if name == "linear":
        return Impl(lambda x: F.linear(x, W, b), [])
    if name == "fastlora-single":
        A0, B0 = pb.A[0], pb.B[0]
        return Impl(lambda x: fastlora.lora_linear(x, W, b, A0, B0, s), [])
    if name == "fastlora-grouped":
        batch = fastlora.AdapterBatch.build(ids, n)
        scale = torch.full((n,), s, dtype=torch.float32, device=pb.device)
        return Impl(lambda x: fastlora.grouped_lora_linear(x, W, b, pb.A, pb.B, scale, ids, check_ids=False,
                                                           batch=batch), [])
    if name == "loop":
        rows = [(g, (ids == g).nonzero().squeeze(1)) for g in range(n)]
        rows = [(g, r) for g, r in rows if r.numel()]

        def loop(x):
            y = torch.addmm(b, x, W.t())
            for g, r in rows:
                xs = x.index_select(0, r)
                y.index_add_(0, r, (xs @ pb.A[g].t()) @ pb.B[g].t(), alpha=s)
            return y
        return Impl(loop, [])
    if name == "peft-mixed":
        return Impl(_peft_mixed(pb.base_linear(), list(pb.A), list(pb.B), [pb.R] * n, ids), [])
    raise ValueError(f"unknown competitor {name!r}")


MIXED = ("linear", "peft-mixed", "fastlora-padded", "fastlora-ragged")


class MixedProblem:
    """A base (W, b) and adapters at mixed ranks (``ranks``; A_i [r_i, K], B_i [N, r_i], alpha_i = 2 r_i)."""

    def __init__(self, K, N, ranks, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        kw = dict(dtype=dtype, device=device)
        self.K, self.N, self.ranks, self.dtype, self.device = K, N, tuple(ranks), dtype, device
        self.W = (torch.randn(N, K, generator=g) * K ** -0.5).to(**kw)
        self.b = (torch.randn(N, generator=g) * 0.1).to(**kw)
        self.A = [(torch.randn(r, K, generator=g) * K ** -0.5).to(**kw) for r in ranks]
        self.B = [(torch.randn(N, r, generator=g) * r ** -0.5).to(**kw) for r in ranks]
        self.scaling = torch.full((len(ranks),), 2.0, dtype=torch.float32, device=device)
        # the ragged stack: adapter i in rows / columns offsets[i]:offsets[i + 1]
        self.A_ragged, self.B_ragged = torch.cat(self.A), torch.cat(self.B, dim=1)
        self.offsets = torch.tensor([0, *itertools.accumulate(ranks)], dtype=torch.int32, device=device)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Today's stack: every adapter zero-padded to the largest rank, (n, r_max, K) and (n, N, r_max)."""
        n, rmax = len(self.ranks), max(self.ranks)
        A = torch.zeros(n, rmax, self.K, dtype=self.dtype, device=self.device)
        B = torch.zeros(n, self.N, rmax, dtype=self.dtype, device=self.device)
        for i, r in enumerate(self.ranks):
            A[i, :r], B[i, :, :r] = self.A[i], self.B[i]
        return A, B


def mixed_impl(name: str, mp: MixedProblem, ids: torch.Tensor) -> Impl:
    """Inference implementations for a mixed batch over adapters at mixed ranks; ``info`` has the adapter bytes."""
    W, b, n = mp.W, mp.b, len(mp.ranks)
    if name == "linear":
        return Impl(lambda x: F.linear(x, W, b), [])
    if name in ("fastlora-ragged", "fastlora-padded"):
        batch = fastlora.AdapterBatch.build(ids, n)
        if name == "fastlora-ragged":
            A, B, offsets = mp.A_ragged, mp.B_ragged, mp.offsets
        else:
            (A, B), offsets = mp.padded(), None
        kw = dict(check_ids=False, batch=batch, rank_offsets=offsets)
        return Impl(lambda x: fastlora.grouped_lora_linear(x, W, b, A, B, mp.scaling, ids, **kw), [],
                    info=dict(adapter_bytes=(A.numel() + B.numel()) * A.element_size()))
    if name == "peft-mixed":
        nbytes = sum(a.numel() + bb.numel() for a, bb in zip(mp.A, mp.B, strict=True)) * W.element_size()
        return Impl(_peft_mixed(_linear(W, b), mp.A, mp.B, mp.ranks, ids), [], info=dict(adapter_bytes=nbytes))
    raise ValueError(f"unknown competitor {name!r}")


def _linear(W, b) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], device="meta")
    lin.weight = nn.Parameter(W, requires_grad=False)
    lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


def _peft_mixed(base: nn.Linear, As, Bs, ranks, ids: torch.Tensor):
    """PEFT's mixed batch (``adapter_names``, inference): adapter g = (As[g], Bs[g]) at rank ranks[g] over ``base``,
    token i using adapter ids[i]."""
    names = [f"a{g}" for g in range(len(ranks))]
    layer = peft_layer(None, 0.0, names, base=base, ranks=ranks)
    layer.eval()
    with torch.no_grad():
        for nm, a, bb in zip(names, As, Bs, strict=True):
            layer.lora_A[nm].weight.copy_(a)
            layer.lora_B[nm].weight.copy_(bb)
    adapter_names = [names[g] for g in ids.tolist()]
    return lambda x: layer(x, adapter_names=adapter_names)


def peft_layer(pb: Problem | None, dropout: float, names: list[str], base: nn.Linear | None = None, ranks=None,
               use_dora: bool = False):
    """A peft LoRA Linear (from get_peft_model on a one-layer module) with adapters ``names`` in pb.dtype; ``base``
    and ``ranks`` (one per name, alpha = 2 r each) for adapters at mixed ranks; ``use_dora``: PEFT's DoRA."""
    from peft import LoraConfig, get_peft_model

    base = pb.base_linear() if base is None else base
    ranks = [pb.R] * len(names) if ranks is None else ranks
    model = nn.Sequential(collections.OrderedDict(proj=base))
    cfgs = [LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], use_dora=use_dora)
            for r in ranks]
    peft_model = get_peft_model(model, cfgs[0], adapter_name=names[0], autocast_adapter_dtype=False)
    for nm, cfg in zip(names[1:], cfgs[1:], strict=True):
        peft_model.add_adapter(nm, copy.copy(cfg))
    layer = peft_model.base_model.model.proj
    layer.to(base.weight.dtype)  # add_adapter creates fp32 adapters; compare at the base dtype, as fastlora runs
    return layer


def quantize(W: torch.Tensor) -> tuple[torch.Tensor, quant.QuantState4bit]:
    """W [N, K] in ``QUANT``'s format: bitsandbytes' quantiser where it runs (what a QLoRA user's model holds),
    else fastlora.quant's (the same format; on CPU the same bytes)."""
    if harness.bnb_unavailable() is None:
        import bitsandbytes.functional as bnbF

        packed, state = bnbF.quantize_4bit(W, blocksize=QUANT["blocksize"], quant_type=QUANT["quant_type"],
                                           compress_statistics=QUANT["double_quant"])
        return packed, quant.QuantState4bit.from_bnb(state)
    return quant.quantize_4bit(W, **QUANT)


def bnb_linear4bit(packed: torch.Tensor, state: quant.QuantState4bit, bias: torch.Tensor | None,
                   compute_dtype: torch.dtype) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` over copies of ``packed`` and ``state`` (bitsandbytes' CPU inference path
    may repack its weight in place, which must not reach the other competitors) and the frozen ``bias``."""
    import bitsandbytes as bnb

    N, K = state.shape
    layer = bnb.nn.Linear4bit(K, N, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=state.double_quant, quant_type=state.quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(packed.clone(), requires_grad=False, quant_state=copy.deepcopy(state).to_bnb(),
                                     blocksize=state.blocksize, compress_statistics=state.double_quant,
                                     quant_type=state.quant_type, module=layer, bnb_quantized=True)
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return layer


class QProblem:
    """A ``Problem`` whose W is quantised once (``quantize``); every competitor computes with what it decodes to.

    ``W`` the dequantised weight in the compute dtype (``pb.dtype``, the activations' dtype), ``W32`` in float32
    (the check's reference), ``A`` and ``B`` the adapters in float32 (PEFT's QLoRA keeps them so).
    """

    def __init__(self, pb: Problem):
        self.pb = pb
        self.packed, self.state = quantize(pb.W)
        self.W = quant.dequantize_4bit(self.packed, self.state, dtype=pb.dtype)
        self.W32 = quant.dequantize_4bit(self.packed, self.state, dtype=torch.float32)
        self.A, self.B = pb.A.float(), pb.B.float()
        self.w_bytes = sum(t.numel() * t.element_size() for t in (
            self.packed, self.state.absmax, self.state.absmax2, self.state.offset) if t is not None)

    def dequantizer(self) -> tuple:
        """(W(), how): the compute-dtype W decoded anew on each call, by bitsandbytes where it runs."""
        if harness.bnb_unavailable() is None:
            import bitsandbytes.functional as bnbF

            state = self.state.to_bnb()
            return (lambda: bnbF.dequantize_4bit(self.packed, state)), "bitsandbytes.functional.dequantize_4bit"
        dtype = self.pb.dtype
        return (lambda: quant.dequantize_4bit(self.packed, self.state, dtype=dtype)), "fastlora.quant.dequantize_4bit"


class _DequantMatmul(torch.autograd.Function):
    """x W^T + b with W = dequant() decoded in forward and again in backward (W is never saved), as
    bitsandbytes' matmul_4bit and Unsloth do; the bias and W frozen."""

    @staticmethod
    def forward(ctx, x2, bias, dequant):
        ctx.dequant = dequant
        return torch.addmm(bias, x2, dequant().t())

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.dequant(), None, None


def qlora_impl(name: str, qp: QProblem, train: bool, magnitude: torch.Tensor | None = None) -> Impl:
    """The QLoRA competitors (dropout 0); ``Impl.info`` says how each was built where that varies. ``magnitude``
    (fp32 [N]): the QDoRA forms of ``qlora-fastlora`` and ``qlora-peft`` (``use_dora=True``, the magnitude trained
    with the adapters)."""
    pb = qp.pb
    dora = dict(use_dora=True) if magnitude is not None else {}
    b, s, dtype = pb.b, pb.scaling, pb.dtype
    if name == "linear":
        return Impl(lambda x: F.linear(x, qp.W, b), [])
    A = qp.A.clone().requires_grad_(train)
    B = qp.B.clone().requires_grad_(train)
    values = [A, B] + ([magnitude] if magnitude is not None else [])
    if name == "qlora-dequant":
        dequant, how = qp.dequantizer()

        def composed(x):
            x2 = x.reshape(-1, pb.K)
            y = _DequantMatmul.apply(x2, b, dequant)
            y.addmm_(x2 @ A.to(dtype).t(), B.to(dtype).t(), alpha=s)  # adapters cast to bf16, as Unsloth does
            return y.reshape(*x.shape[:-1], pb.N)
        return Impl(composed, [A, B], info=dict(dequantized_by=how))
    if name == "qlora-fastlora":
        if harness.bnb_unavailable() is None:
            base, how = bnb_linear4bit(qp.packed, qp.state, b, dtype), "Linear4bit.from_linear(bitsandbytes Linear4bit)"
        else:
            base, how = pb.base_linear(), "Linear4bit.from_linear(nn.Linear): fastlora.quant, checked byte-equal"
        mod = fastlora.Linear4bit.from_linear(base, r=pb.R, alpha=pb.alpha, compute_dtype=dtype, **QUANT, **dora)
        if not (torch.equal(mod.weight.data, qp.packed) and torch.equal(mod.quant_state.absmax, qp.state.absmax)):
            raise AssertionError("qlora-fastlora does not hold the weights every other competitor decodes")
        params = set_params(mod, [mod.lora_A, mod.lora_B] + ([mod.lora_magnitude] if dora else []), values, train)
        return Impl(mod, params, info=dict(built_by=how))
    if name == "qlora-peft":
        from peft import LoraConfig, get_peft_model

        model = nn.Sequential(collections.OrderedDict(proj=bnb_linear4bit(qp.packed, qp.state, b, dtype)))
        model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT then wraps in its bnb Linear4bit
        layer = get_peft_model(model, LoraConfig(r=pb.R, lora_alpha=pb.alpha, lora_dropout=0.0,
                                                 target_modules=["proj"], **dora)).base_model.model.proj
        if type(layer).__module__ != "peft.tuners.lora.bnb":
            raise AssertionError(f"PEFT wrapped the bitsandbytes layer in {type(layer)}, not its bnb Linear4bit")
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        params += [layer.lora_magnitude_vector["default"].weight] if dora else []
        return Impl(layer, set_params(layer, params, values, train))
    raise ValueError(f"unknown QLoRA competitor {name!r}")


class FP8Problem:
    """A ``Problem`` whose W is quantised once to block-scaled FP8 (``quant.quantize_fp8_blockwise``, DeepSeek-V3's
    format: e4m3 codes, one fp32 scale per ``block`` of W); every competitor computes with what it decodes to.

    ``W`` the dequantised weight in the compute dtype (``pb.dtype``), ``W32`` in float32 (the check's reference),
    ``A`` and ``B`` the adapters in float32, ``w_bytes`` the stored weight (codes and scales).
    """

    def __init__(self, pb: Problem, block: tuple[int, int] = (128, 128)):
        self.pb, self.block = pb, block
        self.weight, self.scale = quant.quantize_fp8_blockwise(pb.W, block_size=block, scale_dtype=torch.float32)
        self.W = quant.dequantize_fp8_blockwise(self.weight, self.scale, block_size=block, dtype=pb.dtype)
        self.W32 = quant.dequantize_fp8_blockwise(self.weight, self.scale, block_size=block, dtype=torch.float32)
        self.A, self.B = pb.A.float(), pb.B.float()
        self.w_bytes = sum(t.numel() * t.element_size() for t in (self.weight, self.scale))

    def dequantizer(self) -> tuple:
        """(W(), how): the compute-dtype W decoded anew on each call, the fp32 product of codes and scales rounded once
        as ``quant.dequantize_fp8_blockwise``; when the blocks tile W exactly, by one broadcast product over a
        [N / bn, bn, K / bk, bk] view (no scale expanded to [N, K]), checked equal to it here."""
        (N, K), (bn, bk), dtype = self.weight.shape, self.block, self.pb.dtype
        if N % bn or K % bk:
            return (lambda: quant.dequantize_fp8_blockwise(self.weight, self.scale, self.block, dtype),
                    "fastlora.quant.dequantize_fp8_blockwise")
        codes, scale = self.weight.view(N // bn, bn, K // bk, bk), self.scale.float()[:, None, :, None]

        def dequant():
            return (codes.float() * scale).to(dtype).view(N, K)
        if not torch.equal(dequant(), self.W):
            raise AssertionError("fp8-dequant's broadcast decode differs from quant.dequantize_fp8_blockwise")
        return dequant, "torch: fp32 codes x scales broadcast over the blocks, rounded once to the compute dtype"


def fp8_impl(name: str, fp: FP8Problem, train: bool) -> Impl:
    """The FP8-base competitors (dropout 0); ``Impl.info['weight_bytes']``: the base weight each keeps resident."""
    pb = fp.pb
    b, s, dtype = pb.b, pb.scaling, pb.dtype
    dense = dict(weight_bytes=fp.W.numel() * fp.W.element_size())
    if name == "linear":
        return Impl(lambda x: F.linear(x, fp.W, b), [], info=dense)
    A = fp.A.clone().requires_grad_(train)
    B = fp.B.clone().requires_grad_(train)
    if name == "fastlora-lora":
        return Impl(lambda x: fastlora.lora_linear(x, fp.W, b, A, B, s), [A, B], info=dense)
    if name == "fp8-dequant":
        dequant, how = fp.dequantizer()

        def composed(x):
            x2 = x.reshape(-1, pb.K)
            y = _DequantMatmul.apply(x2, b, dequant)
            y.addmm_(x2 @ A.to(dtype).t(), B.to(dtype).t(), alpha=s)  # adapters cast to x's dtype, as qlora-dequant
            return y.reshape(*x.shape[:-1], pb.N)
        return Impl(composed, [A, B], info=dict(weight_bytes=fp.w_bytes, dequantized_by=how))
    if name in ("fp8-fastlora", "fp8-w8a8"):
        w8a8 = name == "fp8-w8a8"
        return Impl(lambda x: fastlora.lora_linear_fp8(x, fp.weight, fp.scale, b, A, B, s, block_size=fp.block,
                                                       fp8_activations=w8a8),
                    [A, B], info=dict(weight_bytes=fp.w_bytes))
    raise ValueError(f"unknown FP8 competitor {name!r}")


class ReferenceLinear(nn.Module):
    """A LoRA linear computed by ``fastlora.reference`` (the end-to-end baseline that needs no PEFT); adapters in
    ``adapter_dtype`` (default the weight's); ``dora``: PEFT's DoRA (``reference.dora_linear``), the magnitude
    ``lora_magnitude`` starting at ||W_n|| as PEFT's does (B = 0)."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, adapter_dtype: torch.dtype | None = None,
                 dora: bool = False):
        super().__init__()
        self.weight = linear.weight.requires_grad_(False)
        self.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        kw = dict(device=linear.weight.device, dtype=adapter_dtype or linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(r, linear.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, **kw))
        self.lora_magnitude = nn.Parameter(
            torch.linalg.vector_norm(self.weight.float(), dim=1).to(kw["dtype"])) if dora else None
        self.scaling = alpha / r

    def forward(self, x):
        if self.lora_magnitude is not None:
            return reference.dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                         self.lora_magnitude)
        return reference.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)


def inject(model: nn.Module, impl: str, r: int, alpha: float, dora: bool = False) -> tuple[nn.Module, str]:
    """LoRA (``dora``: PEFT's DoRA) on every nn.Linear but ``lm_head`` (PEFT's "all-linear"); returns the model and
    how it was done."""
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", use_dora=dora)
        return (get_peft_model(model, cfg, autocast_adapter_dtype=False),
                f"peft.get_peft_model(all-linear{', use_dora=True' if dora else ''})")
    if impl == "fastlora":
        fastlora.inject(model, "all-linear", r=r, alpha=alpha, use_dora=dora, adapter_dtype=model.dtype)
        how = f"fastlora.inject(all-linear{', use_dora=True' if dora else ''}, adapter_dtype={model.dtype})"
    else:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and name != "lm_head":
                    setattr(module, name, ReferenceLinear(child, r, alpha, dora=dora))
        how = f"bench: ReferenceLinear on each nn.Linear{', use_dora=True' if dora else ''}"
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model, how


def inject_4bit(model: nn.Module, impl: str, r: int, alpha: float) -> tuple[nn.Module, str]:
    """QLoRA on every nn.Linear but ``lm_head``: each base quantised once (``quantize``) into a bitsandbytes
    Linear4bit with the model's dtype as compute dtype (what ``from_pretrained`` with ``load_in_4bit`` builds),
    then LoRA with fp32 adapters. ``impl``: ``qlora-peft`` (get_peft_model, bitsandbytes needed),
    ``qlora-fastlora`` (fastlora.inject; without bitsandbytes each nn.Linear becomes a fastlora.Linear4bit in the
    bench), ``reference`` (the dequantised W in an nn.Linear, fastlora.reference with fp32 adapters)."""
    dtype = next(model.parameters()).dtype
    bnb = harness.bnb_unavailable() is None
    if impl == "qlora-peft" and not bnb:
        raise RuntimeError(harness.bnb_unavailable())
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            if impl == "qlora-fastlora" and not bnb:
                new = fastlora.Linear4bit.from_linear(child, r=r, alpha=alpha, compute_dtype=dtype, **QUANT)
            else:
                packed, state = quantize(child.weight.detach())
                if impl == "reference":
                    with torch.no_grad():
                        child.weight.copy_(quant.dequantize_4bit(packed, state, dtype=dtype))
                    new = ReferenceLinear(child, r, alpha, adapter_dtype=torch.float32)
                else:
                    new = bnb_linear4bit(packed, state, child.bias, dtype)
            setattr(module, name, new)
    if impl == "qlora-peft":
        from peft import LoraConfig, get_peft_model

        model.is_loaded_in_4bit = True  # as from_pretrained(load_in_4bit) leaves it: PEFT's bnb Linear4bit wraps
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
        model, how = get_peft_model(model, cfg), "peft.get_peft_model(all-linear) over bitsandbytes Linear4bit"
    elif impl == "qlora-fastlora" and bnb:
        fastlora.inject(model, "all-linear", r=r, alpha=alpha)
        how = "fastlora.inject(all-linear) over bitsandbytes Linear4bit"
    elif impl == "qlora-fastlora":
        how = "bench: fastlora.Linear4bit.from_linear on each nn.Linear (no bitsandbytes: fastlora.quant)"
    elif impl == "reference":
        how = "bench: ReferenceLinear (fp32 adapters) on each dequantised nn.Linear"
    else:
        raise ValueError(f"unknown QLoRA end-to-end competitor {impl!r}")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model, how


def adapter_pairs(model: nn.Module):
    """(key, A, B) for every LoRA layer; key is the module path from ``layers.`` on, the same in every wrapper."""
    for name, m in model.named_modules():
        A = getattr(m, "lora_A", None)
        if A is None or "layers." not in name:
            continue
        key = name[name.index("layers."):]
        if isinstance(A, nn.ModuleDict):
            yield key, A["default"].weight, m.lora_B["default"].weight
        else:
            yield key, A, m.lora_B


# ------------------------------------------------------------------------------------------------ MoE experts

MOE = ("experts", "peft", "peft-baddbmm", "split", "fastlora")
PROJECTIONS = ("gate_up_proj", "down_proj")


class MoeProblem:
    """An experts block of ``shape`` (``harness.MoeShape``) in ``dtype``: random frozen expert weights (and gpt-oss's
    biases) stored as transformers stores them, and one rank-R adapter per expert for ``gate_up_proj`` and
    ``down_proj`` in PEFT's ``target_parameters`` layout (``lora_A`` (E*R, in): expert e's A_e = rows e*R:(e+1)*R;
    ``lora_B`` (out, R*E): B_e = columns j*E + e), B nonzero so the low-rank term shows; scaling alpha / R = 2.

    ``module(implementation)`` builds a transformers experts module (Qwen3MoeExperts / GptOssExperts) over these weights
    (new Parameters sharing their storage, frozen) with that ``config._experts_implementation``."""

    def __init__(self, shape, R: int, dtype: torch.dtype, device, seed: int = 0):
        from transformers import GptOssConfig, Qwen3MoeConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        g = torch.Generator(device=device).manual_seed(seed)  # on the device: the Qwen block's stack is 1.2 GB in bf16
        self.shape, self.R, self.dtype, self.device = shape, R, dtype, device
        E, H, inter = shape.E, shape.H, shape.inter
        self.gpt_oss = shape.layout == "gpt-oss"
        if self.gpt_oss:
            self.cls, self.config = GptOssExperts, GptOssConfig(
                hidden_size=H, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=shape.k)
        else:
            self.cls, self.config = Qwen3MoeExperts, Qwen3MoeConfig(
                hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=shape.k,
                hidden_act="silu")
        self.alpha, self.scaling = 2 * R, 2.0
        # (experts, out, in) of each projection
        self.dims = {"gate_up_proj": (E, 2 * inter, H), "down_proj": (E, H, inter)}

        def rand(*size, scale):
            return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

        self.weights, self.adapters = {}, {}
        for p, (_, N, K) in self.dims.items():
            self.weights[p] = rand(E, K, N, scale=K ** -0.5) if self.gpt_oss else rand(E, N, K, scale=K ** -0.5)
            if self.gpt_oss:
                self.weights[f"{p}_bias"] = rand(E, N, scale=0.1)
            self.adapters[p] = (rand(E * R, K, scale=K ** -0.5), rand(N, R * E, scale=R ** -0.5))
        self.gate = self.module(None)._apply_gate  # the family's activation (gpt-oss: clamped SwiGLU, interleaved)

    def module(self, implementation: str | None) -> nn.Module:
        config = copy.copy(self.config)
        config._experts_implementation = implementation
        with torch.device("meta"):
            mod = self.cls(config)
        for name, t in self.weights.items():
            setattr(mod, name, nn.Parameter(t, requires_grad=False))
        return mod

    def expert_weight(self, p: str, dtype=None) -> torch.Tensor:
        """[E, out, in] of projection ``p`` (gpt-oss's (E, in, out) storage as a transposed view), in ``dtype``."""
        w = self.weights[p] if dtype is None else self.weights[p].to(dtype)
        return w.transpose(1, 2) if self.gpt_oss else w

    def bias(self, p: str, dtype=None):
        """[E, out] bias of projection ``p`` (gpt-oss) in ``dtype``, or None."""
        b = self.weights.get(f"{p}_bias")
        return None if b is None else b.to(dtype or b.dtype)

    def expert_adapter(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, R, in], B [E, out, R]) views of PEFT's (E*R, in) and (out, R*E) adapter tensors."""
        E, R = self.shape.E, self.R
        return A.view(E, R, A.shape[1]), B.view(B.shape[0], R, E).permute(2, 0, 1)

    def routing(self, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """top_k_index [T, k] (k distinct experts per token, uniformly random) and top_k_weights [T, k] (a softmax over
        the token's k choices, in ``dtype``), as a router with norm_topk_prob gives them."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        E, k = self.shape.E, self.shape.k
        index = torch.rand(T, E, generator=g).topk(k, dim=1).indices
        weights = torch.randn(T, k, generator=g).softmax(dim=1)
        return index.to(self.device), weights.to(dtype=self.dtype, device=self.device)

    def reference(self, x, top_k_index, top_k_weights, adapters: list | None) -> torch.Tensor:
        """The block in float32 from ``fastlora.reference`` (a loop over experts per projection): x's k copies, gate_up,
        the family's activation, down, the top-k weights, the k rows of each token summed. ``adapters``: [A, B] per
        projection in PEFT's layout (float32), or None for the base experts alone."""
        T, k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        h = x.float().repeat_interleave(k, dim=0)
        for i, p in enumerate(PROJECTIONS):
            if adapters is None:
                E, N, K = self.dims[p]
                A, B, s = h.new_zeros(E, 1, K), h.new_zeros(E, N, 1), 0.0
            else:
                (A, B), s = self.expert_adapter(*adapters[2 * i:2 * i + 2]), self.scaling
            h = reference.grouped_lora_linear(h, self.expert_weight(p, torch.float32), self.bias(p, torch.float32),
                                              A, B, s, ids)
            if p == "gate_up_proj":
                h = self.gate(h)
        h = h * top_k_weights.float().reshape(-1, 1)
        return h.view(T, k, -1).sum(dim=1)


@functools.cache
def grouped_mm_unavailable(device: str, dtype: torch.dtype) -> str | None:
    """None when ``torch.nn.functional.grouped_mm`` runs forward and backward on ``device`` in ``dtype`` (an empty
    group, a transposed weight view, dims that are multiples of 16); else why not."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    try:
        x = torch.randn(48, 32, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(3, 16, 32, device=device, dtype=dtype).transpose(1, 2)
        y = F.grouped_mm(x, w, offs=torch.tensor([16, 16, 48], dtype=torch.int32, device=device))
        y.backward(torch.randn_like(y))
        harness.sync()
    except Exception as e:  # an unsupported dtype or device: the reason says which
        return f"torch.nn.functional.grouped_mm cannot run on {device} in {dtype}: {type(e).__name__}: {e}"[:300]
    return None


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, fused: bool) -> torch.Tensor:
    """x [S, K] sorted by expert, w [E, K, N], offs int32 [E] (cumulative row ends): ``F.grouped_mm`` when ``fused``,
    else one mm per expert over its rows (the fallback where grouped_mm cannot run)."""
    if fused:
        return F.grouped_mm(x, w, offs=offs)
    ends = offs.tolist()
    return torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True))])


@functools.cache
def base_implementation(device: str, dtype: torch.dtype) -> str:
    """transformers' experts implementation for the base experts: 'grouped_mm' where F.grouped_mm runs, else 'eager'
    (the loop over experts)."""
    return "grouped_mm" if grouped_mm_unavailable(device, dtype) is None else "eager"


def peft_baddbmm_skip() -> str:
    """Why ``peft-baddbmm`` has no cell of its own with the installed PEFT (``harness.NOT_APPLICABLE`` + the reason)."""
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    if hasattr(ParamWrapper, "get_delta_factors"):
        return (f"{harness.NOT_APPLICABLE}peft {peft.__version__} has no baddbmm option: its target_parameters path "
                "already folds W + s B A into one baddbmm per expert stack (ParamWrapper.get_delta_factors, "
                "_LoraFactorsProxy; PEFT #3577), which the 'peft' cells time")
    return f"{harness.NOT_APPLICABLE}peft {peft.__version__} has no baddbmm fold for target_parameters (PEFT #3577)"


class _ExpertsModel(nn.Module):
    """The experts module as a model's submodule ``experts``, so PEFT's ``target_parameters`` can name its weights."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.experts(hidden_states, top_k_index, top_k_weights)


def moe_impl(name: str, mp: MoeProblem, train: bool) -> Impl:
    """The experts-block competitors: ``forward(hidden_states, top_k_index, top_k_weights)``; ``params`` the adapters
    [gate_up A, gate_up B, down A, down B] in PEFT's layout (none for ``experts``); ``info`` how each was built."""
    dev, dtype = str(mp.device), mp.dtype
    impl = base_implementation(dev, dtype)
    values = [t for p in PROJECTIONS for t in mp.adapters[p]]
    if name == "experts":
        return Impl(mp.module(impl), [], info=dict(experts_implementation=impl))
    if name == "fastlora":
        mod = fastlora.Experts(mp.module(impl), {p: (mp.R, mp.alpha, False) for p in PROJECTIONS}, adapter_dtype=dtype)
        params = set_params(mod, [t for p in PROJECTIONS for t in (mod.lora_A[p], mod.lora_B[p])], values, train)
        return Impl(mod, params, info=dict(built_by="fastlora.Experts(transformers experts module)"))
    if name == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.layer import ParamWrapper

        cfg = LoraConfig(r=mp.R, lora_alpha=mp.alpha, lora_dropout=0.0,
                         target_parameters=[f"experts.{p}" for p in PROJECTIONS])
        model = get_peft_model(_ExpertsModel(mp.module(impl)), cfg, autocast_adapter_dtype=False)
        wrappers = {m.parameter_name: m for m in model.modules() if isinstance(m, ParamWrapper)}
        params = [t for p in PROJECTIONS for t in (wrappers[p].lora_A["default"].weight,
                                                    wrappers[p].lora_B["default"].weight)]
        fold = "baddbmm" if hasattr(ParamWrapper, "get_delta_factors") else "delta"
        return Impl(model.base_model.model.experts, set_params(model, params, values, train),
                    info=dict(experts_implementation=impl, peft_fold=fold))
    if name == "split":
        return _split_impl(mp, train, values)
    raise ValueError(f"unknown MoE competitor {name!r}")


def _split_impl(mp: MoeProblem, train: bool, values: list) -> Impl:
    """Split LoRA (Unsloth's composition) with torch ops: rows sorted by expert once per block, then per projection the
    base grouped GEMM (+ bias) and two grouped LoRA GEMMs, (x A_e^T) B_e^T, with ``F.grouped_mm`` (a loop of mm where
    it cannot run); B_e^T made contiguous per call (an E x R x out copy: PEFT's layout has no unit stride there)."""
    E, k, R = mp.shape.E, mp.shape.k, mp.R
    fused = grouped_mm_unavailable(str(mp.device), mp.dtype) is None
    params = [t.clone().requires_grad_(train) for t in values]
    weights = {p: mp.expert_weight(p).transpose(1, 2) for p in PROJECTIONS}  # [E, in, out] views
    biases = {p: mp.weights.get(f"{p}_bias") for p in PROJECTIONS}

    def forward(x, top_k_index, top_k_weights):
        T, H = x.shape
        ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        offs = torch.bincount(ids, minlength=E).cumsum(0).to(torch.int32)
        rows = perm // k
        h = x[rows]
        for i, p in enumerate(PROJECTIONS):
            A, B = params[2 * i], params[2 * i + 1]
            N, K = weights[p].shape[2], weights[p].shape[1]
            y = _grouped_mm(h, weights[p], offs, fused)
            if biases[p] is not None:
                y = y + biases[p][ids]
            t = _grouped_mm(h, A.view(E, R, K).transpose(1, 2), offs, fused)  # [S, R]
            y = y + mp.scaling * _grouped_mm(t, B.view(N, R, E).permute(2, 1, 0).contiguous(), offs, fused)
            h = mp.gate(y) if p == "gate_up_proj" else y
        h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return h[inv].view(T, k, H).sum(dim=1).to(x.dtype)

    how = "F.grouped_mm" if fused else f"mm per expert ({grouped_mm_unavailable(str(mp.device), mp.dtype)})"
    return Impl(forward, params, info=dict(grouped_mm=how))
