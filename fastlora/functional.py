"""Public functions: validate once, then run the fused kernels through ``LoRAFunction``.

CPU tensors take the PyTorch reference unless ``TRITON_INTERPRET=1`` (then the real kernels run in the
interpreter). Under ``torch.autocast`` x, weight and bias are cast to the autocast dtype, as ``nn.Linear``
would; the adapters keep their dtype and their gradients come back in it.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastlora import _configs, _launch, _ops, dispatch, dora, quant, reference
from fastlora._autograd import DoRAFunction, GroupedDoRAFunction, LoRAFunction
from fastlora._compose import ComposedLoRAFunction
from fastlora.grouping import AdapterBatch

_DTYPES = quant.DTYPES


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, seed=None,
                magnitude=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused.

    x [..., K]; weight [N, K]; bias [N] or None; lora_A [r, K]; lora_B [N, r]; scaling a number. Dropout
    (on x, in the LoRA branch only) is active when ``training`` and ``dropout_p > 0``; its mask comes from
    ``seed`` (drawn from torch's CPU generator when None) and is regenerated in backward.

    ``magnitude`` [N] (DoRA, PEFT's ``use_dora=True`` semantics): y = g (x W^T + s T B^T) + b with
    g = magnitude / max(||W + s B A||, eps) per output row, the norm detached; with dropout PEFT's
    x W^T + b + (g - 1) (d(x) W^T) + g s T B^T, T = d(x) A^T. See docs/dora.md.
    """
    _check_x_weight_bias(x, weight, bias)
    N, K = weight.shape
    s, p = _check_lora(x, lora_A, lora_B, N, K, scaling, dropout_p, training)
    if magnitude is not None:
        return _dora_linear(x, weight, bias, lora_A, lora_B, s, magnitude, p, training, seed)
    if not _use_kernels(x, lora_A, lora_B):
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, s, dropout_p=p, training=training)
    x, weight, bias = _autocast(x, weight, bias)
    seed = _seed(seed) if p > 0 else 0
    x2 = x.reshape(-1, K)

    def fused(x2, a, b):
        return LoRAFunction.apply(x2, weight, bias, a, b, s, None, None, None, None, p, seed)

    def composed(x2, a, b):
        return ComposedLoRAFunction.apply(x2, weight, bias, a, b, s, p, seed)

    with torch.autocast(x.device.type, enabled=False):
        training_step = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B))
        path = dispatch.choose(x2, weight, bias, lora_A, lora_B, p, training_step, fused, composed)
        y = (fused if path == "fused" else composed)(x2, lora_A, lora_B)
    return y.reshape(*x.shape[:-1], N)


def _dora_linear(x, weight, bias, lora_A, lora_B, s, magnitude, p, training, seed, norm_fn=None):
    """DoRA after lora_linear's checks; ``norm_fn()``: max(||W + s B A||, eps) from the caller's cache."""
    _check_magnitude(magnitude, x, weight.shape[0])
    K = weight.shape[1]
    if not _use_kernels(x, lora_A, lora_B, magnitude):
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, s, magnitude, dropout_p=p, training=training)
    # from the stored W, before any autocast cast
    norm = norm_fn() if norm_fn is not None else dora.weight_norm(weight, lora_A, lora_B, s)
    x, weight, bias = _autocast(x, weight, bias)
    seed = _seed(seed) if p > 0 else 0
    with torch.autocast(x.device.type, enabled=False):
        y = DoRAFunction.apply(x.reshape(-1, K), weight, bias, lora_A, lora_B, magnitude, norm, s, p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _check_magnitude(magnitude, x, N, n=None):
    """A magnitude for out_features N: (N,) for one adapter, (n, N) for a stack of n (``n`` given)."""
    if n is None:
        _check_optional("magnitude", magnitude, x, (N,), "(out_features,)")
    else:
        _check_optional("magnitude", magnitude, x, (n, N), "(num_adapters, out_features)")
    _check_dtype("magnitude", magnitude.dtype)


def lora_linear_4bit(x, weight, quant_state, bias, lora_A, lora_B, scaling, *, compute_dtype=torch.bfloat16,
                     dropout_p=0.0, training=False, seed=None, magnitude=None):
    """``lora_linear`` over a bitsandbytes 4-bit base: y = x deq(W)^T + b + scaling * (dropout(x) A^T) B^T.

    weight: the packed codes (uint8, (N*K + 1) // 2 bytes, any shape, as bitsandbytes stores them); quant_state:
    a ``fastlora.quant.QuantState4bit`` describing W [N, K]. As bitsandbytes' Linear4bit under PEFT's LoRA layer:
    the base product x deq(W)^T + b runs in ``compute_dtype``, the low-rank branch in x's dtype with the adapters
    as they are (PEFT's QLoRA keeps them fp32), and y comes back in x's dtype; under torch.autocast x is first
    cast to the autocast dtype. W is dequantised tile by tile inside the GEMM (forward and dx), never written out
    in 16 bits.

    ``magnitude`` [N] (QDoRA: DoRA over the 4-bit base, PEFT's semantics as ``lora_linear(magnitude=)``) with W the
    dequantised weight: g = magnitude / max(||W + s B A||, eps), the norm detached, computed in fp32 from the packed
    weight; see docs/dora.md.
    """
    return _lora_linear_4bit(x, weight, quant_state, bias, lora_A, lora_B, scaling, compute_dtype=compute_dtype,
                             dropout_p=dropout_p, training=training, seed=seed, magnitude=magnitude)


def _lora_linear_4bit(x, weight, quant_state, bias, lora_A, lora_B, scaling, *, compute_dtype, dropout_p, training,
                      seed, magnitude, norm_fn=None):
    """``lora_linear_4bit``; ``norm_fn()``: DoRA's max(||W + s B A||, eps) from the caller's cache."""
    if not isinstance(quant_state, quant.QuantState4bit):
        raise TypeError(f"quant_state must be a fastlora.quant.QuantState4bit; got {type(quant_state).__name__}")
    quant_state.validate()
    N, K = quant_state.shape
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    _check_dtype("compute_dtype", compute_dtype)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must equal in_features = {K} (quant_state.shape "
                         f"{tuple(quant_state.shape)}); got x of shape {tuple(x.shape)}")
    _check_dtype("x", x.dtype)
    if K % quant_state.blocksize:
        raise ValueError(f"in_features = {K} must be a multiple of the quantisation blocksize {quant_state.blocksize}: "
                         "the fused 4-bit GEMM reads each weight row as whole blocks (quant_state.shape "
                         f"{tuple(quant_state.shape)})")
    nbytes = weight.numel() * weight.element_size()
    if nbytes != (N * K + 1) // 2 or not weight.is_contiguous():
        raise ValueError(f"weight must hold the (N*K + 1) // 2 = {(N * K + 1) // 2} packed bytes of a {N}x{K} 4-bit "
                         f"weight, contiguous; got shape {tuple(weight.shape)} {weight.dtype} ({nbytes} bytes)")
    _check_device("weight", weight, x)
    _check_device("quant_state.absmax", quant_state.absmax, x)
    x, s, p = _check_quantized_call(x, bias, lora_A, lora_B, N, K, scaling, dropout_p, training, magnitude)
    extra = (compute_dtype,) if magnitude is None else (compute_dtype, magnitude.dtype)
    if not _use_kernels(x, lora_A, lora_B, extra_dtypes=extra):
        w = quant.dequantize_4bit(weight, quant_state, dtype=compute_dtype)
        if magnitude is not None:
            return reference.dora_linear(x, w, bias, lora_A, lora_B, s, magnitude, dropout_p=p, training=training,
                                         compute_dtype=compute_dtype)
        return reference.lora_linear(x, w, bias, lora_A, lora_B, s, dropout_p=p, training=training,
                                     compute_dtype=compute_dtype)
    tensors, qblocks = _ops.quant_args(quant_state, compute_dtype)
    packed = weight.view(torch.uint8).reshape(-1)
    return _quantized_apply(x, packed, bias, lora_A, lora_B, s, p, seed, tensors, qblocks, magnitude,
                            norm_fn or (lambda: dora.weight_norm_4bit(weight, quant_state, lora_A, lora_B, s)))


def _check_quantized_call(x, bias, lora_A, lora_B, N, K, scaling, dropout_p, training, magnitude):
    """The checks a quantised base's call shares once x and its weight are checked: bias, the adapters, the DoRA
    magnitude; returns x (cast as autocast would) with the checked scaling and dropout probability."""
    if bias is not None:
        _check_optional("bias", bias, x, (N,), "(out_features,)")
        _check_dtype("bias", bias.dtype)
    s, p = _check_lora(x, lora_A, lora_B, N, K, scaling, dropout_p, training)
    if magnitude is not None:
        _check_magnitude(magnitude, x, N)
    if _autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return x, s, p


def _quantized_apply(x, w, bias, lora_A, lora_B, s, p, seed, tensors, qblocks, magnitude, norm_fn):
    """The fused LoRA (DoRA with ``magnitude``, its norm from ``norm_fn()``) Function over a quantised W: ``w`` the
    stored codes, ``tensors``/``qblocks`` their ``_ops`` quant arguments."""
    K = x.shape[-1]
    seed = _seed(seed) if p > 0 else 0
    with torch.autocast(x.device.type, enabled=False):
        if magnitude is not None:
            y = DoRAFunction.apply(x.reshape(-1, K), w, bias, lora_A, lora_B, magnitude, norm_fn(), s, p, seed,
                                   tensors, qblocks)
        else:
            y = LoRAFunction.apply(x.reshape(-1, K), w, bias, lora_A, lora_B, s, None, None, None, None, p, seed,
                                   tensors, qblocks)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def lora_linear_fp8(x, weight, weight_scale_inv, bias, lora_A, lora_B, scaling, *, block_size=(128, 128),
                    dropout_p=0.0, training=False, seed=None, magnitude=None, fp8_activations=False):
    """``lora_linear`` over a block-scaled FP8 base (DeepSeek-V3 / transformers' ``fp8`` checkpoints):
    y = x W^T + b + scaling * (dropout(x) A^T) B^T with W[i, j] = float(weight[i, j]) * weight_scale_inv[i // bn,
    j // bk], (bn, bk) = ``block_size``.

    weight float8_e4m3fn [N, K]; weight_scale_inv fp32 or bf16 [ceil(N / bn), ceil(K / bk)] (edge blocks partial:
    N and K need not be multiples of the block). W is dequantised tile by tile inside the GEMM (forward and dx, W8A16),
    never written out in 16 bits: each fp32 product float(q) * s is rounded once to x's dtype, in which the base
    product runs (as ``fastlora.quant.dequantize_fp8_blockwise(..., dtype=x.dtype)`` then ``F.linear``); the
    low-rank branch runs in x's dtype with the adapters as they are. weight and its scales are frozen: no gradient
    flows to them. Under torch.autocast x is first cast to the autocast dtype. ``magnitude`` [N]: DoRA over the FP8
    base, PEFT's semantics as ``lora_linear(magnitude=)``, the norm ||deq(W) + s B A|| computed in fp32.

    ``fp8_activations=True`` (W8A8, opt-in): the forward's base product quantises x inside the GEMM, per token and
    per 128 channels, to e4m3 (sx = amax / 448, as DeepSeek-V3's act_quant) and multiplies the e4m3 codes of x and W
    on fp8 tensor cores, each K step scaled by sx and the W block scale in fp32 (``reference.fake_quant_fp8_act``
    gives the same x; expect ~1-3% relative error against the exact product, the low-rank branch exact as in W8A16).
    The backward is W8A16's: dx = dy W with W dequantised, the adapter gradients from the saved 16-bit x, straight
    through x's quantisation. Needs bf16 or fp16 x (fp32 is refused: cast it or use autocast), ``block_size[1]`` a
    multiple of 128, no ``magnitude``, and on CUDA a GPU with fp8 tensor cores (compute capability 8.9 or newer).
    """
    return _lora_linear_fp8(x, weight, weight_scale_inv, bias, lora_A, lora_B, scaling, block_size=block_size,
                            dropout_p=dropout_p, training=training, seed=seed, magnitude=magnitude,
                            fp8_activations=fp8_activations)


def _check_fp8_activations(fp8_activations, block_size, dora: bool) -> None:
    """Whether the W8A8 forward can run over an FP8 base of ``block_size`` (and DoRA when ``dora``); raises if not."""
    if not isinstance(fp8_activations, bool):
        raise TypeError(f"fp8_activations must be True or False; got {fp8_activations!r}")
    if not fp8_activations:
        return
    if block_size[1] % 128:
        raise ValueError(f"fp8_activations=True needs block_size[1] (the weight block's extent along in_features) to "
                         f"be a multiple of 128: x is quantised per 128 channels in K steps of 128, each inside one "
                         f"weight block; got block_size={tuple(block_size)}")
    if dora:
        raise NotImplementedError("fp8_activations=True with DoRA (magnitude / use_dora) is not supported: DoRA over "
                                  "an FP8 base runs W8A16")


def _lora_linear_fp8(x, weight, weight_scale_inv, bias, lora_A, lora_B, scaling, *, block_size, dropout_p, training,
                     seed, magnitude, norm_fn=None, fp8_activations=False):
    """``lora_linear_fp8``; ``norm_fn`` (DoRA): the layer's norm (``LinearFP8._norm``, cached in eval under
    ``DoraCaching``), else computed here."""
    quant.check_fp8_blockwise(weight, weight_scale_inv, block_size)
    block = (int(block_size[0]), int(block_size[1]))
    N, K = weight.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor; got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must equal in_features = {K} (weight {tuple(weight.shape)}); got x of "
                         f"shape {tuple(x.shape)}")
    _check_dtype("x", x.dtype)
    _check_device("weight", weight, x)
    _check_fp8_activations(fp8_activations, block, magnitude is not None)
    x, s, p = _check_quantized_call(x, bias, lora_A, lora_B, N, K, scaling, dropout_p, training, magnitude)
    if fp8_activations:
        _check_w8a8_call(x)
    w8, scale = weight.detach().contiguous(), weight_scale_inv.detach()  # frozen; the kernels read W row-major
    if not _use_kernels(x, lora_A, lora_B, *(() if magnitude is None else (magnitude,))):
        return reference.lora_linear_fp8(x, w8, scale, bias, lora_A, lora_B, s, block_size=block, dropout_p=p,
                                         training=training, magnitude=magnitude, fp8_activations=fp8_activations)
    tensors, qblocks = [scale.float().contiguous()], [*block, _ops.COMPUTE_DTYPES.index(x.dtype)]
    if fp8_activations:
        qblocks.append(1)
    # ||W||^2 cached (DoraCaching) on the caller's weight tensor
    return _quantized_apply(x, w8, bias, lora_A, lora_B, s, p, seed, tensors, qblocks, magnitude,
                            norm_fn or (lambda: dora.weight_norm_fp8(weight, weight_scale_inv, block, lora_A, lora_B,
                                                                     s)))


def _check_w8a8_call(x) -> None:
    """x (after autocast) and its device as the W8A8 forward needs them."""
    if x.dtype == torch.float32:
        raise ValueError("fp8_activations=True needs bfloat16 or float16 x (the W8A8 forward quantises 16-bit "
                         "activations); got float32 x: cast it, run under torch.autocast, or use fp8_activations=False")
    cap = _configs.target_capability(x.device)
    if cap is not None and cap < (8, 9):
        raise ValueError(f"fp8_activations=True needs fp8 tensor cores (compute capability 8.9 or newer); "
                         f"{x.device} has {cap[0]}.{cap[1]}: use fp8_activations=False (W8A16)")


def grouped_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, *, dropout_p=0.0, training=False,
                        seed=None, check_ids=True, batch=None, rank_offsets=None, magnitude=None):
    """Each token adds its own adapter: y_i = x_i W^T + b + scaling[g] (dropout(x_i) A[g]^T) B[g]^T, g = ids[i].

    lora_A [n, r, K]; lora_B [n, N, r]; scaling a number or an (n,) tensor; adapter_ids integer, shape
    x.shape[:-1], values in [-1, n) (-1: base only), any order. ``check_ids=False`` skips the range check
    (the one host synchronisation) for hot loops and CUDA graphs: out-of-range ids are then undefined
    behaviour. ``batch``: a prebuilt ``AdapterBatch`` for these ids, reused across layers.

    ``rank_offsets`` (int32/int64 [n + 1], 0 = o_0 <= o_1 <= ... <= o_n <= sum r, on x's device): a ragged stack,
    every adapter at its own rank: lora_A [sum r, K], lora_B [N, sum r], adapter g owning rows / columns
    o_g:o_(g+1) (rank 0: it adds nothing). Each token's low-rank work is its own adapter's rank. The offsets'
    values are checked on the host (a second synchronisation) unless ``check_ids=False`` or under torch.compile;
    unchecked, bad offsets are undefined behaviour like bad ids.

    ``magnitude`` (n, out_features): DoRA per adapter, DoRA and plain LoRA adapters mixed in one batch. Row g is
    adapter g's DoRA magnitude m_g, or **all NaN for a plain LoRA adapter** (its tokens then compute exactly the LoRA
    above, dropout included). A DoRA adapter's tokens compute PEFT's DoRA: y_i = c_g (x_i W^T + s_g T_i B_g^T) + b with
    c_g = m_g / max(||W + s_g B_g A_g||, eps) per output column, the norm detached; with dropout x_i W^T + b +
    (c_g - 1) (d(x_i) W^T) + c_g s_g T_i B_g^T, T_i = d(x_i) A_g^T, one mask. Gradients: dm is 0 for NaN rows and for
    adapters no token uses. Checked ids also check that no row mixes NaN with numbers (host read); with
    ``check_ids=False`` a NaN element makes its column plain. See docs/dora.md.

    A 3-D ``weight`` [n, out, in] is a mixture of experts: each token uses its expert's own base weight and adapter,
    y_i = x_i W[e]^T + b[e] + scaling[e] (dropout(x_i) A[e]^T) B[e]^T with e = ids[i], ``bias`` None or [n, out],
    and a token with id -1 (routed to no expert held here) gives an all-zero row. Any strides (an (n, in, out)
    storage passed as ``w.transpose(1, 2)`` is read as it is, never copied). One fused path: tokens sorted by expert
    (``batch``, which several calls may share), each tile on one expert's W with the low-rank term in the same
    accumulator; no per-expert delta W + s B A is formed. The expert weights must be frozen; gradients reach x,
    lora_A, lora_B (zero for experts no token reached) and a bias that requires grad. DoRA (``magnitude``), ragged
    stacks and quantised expert weights are not supported there (``NotImplementedError``). See docs/moe.md.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 3:
        return _expert_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p=dropout_p,
                                   training=training, seed=seed, check_ids=check_ids, batch=batch,
                                   rank_offsets=rank_offsets, magnitude=magnitude)
    return _grouped_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p=dropout_p,
                                training=training, seed=seed, check_ids=check_ids, batch=batch,
                                rank_offsets=rank_offsets, magnitude=magnitude)


def _grouped_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, *, dropout_p=0.0, training=False,
                         seed=None, check_ids=True, batch=None, rank_offsets=None, ragged_width=None, ragged_align=1,
                         magnitude=None, norm_fn=None):
    """``grouped_lora_linear``; ``ragged_width``: T's width for offsets the caller built and trusts (a
    ``GroupedLinear``'s own), whose values are then not read on the host; ``ragged_align``: what they are all
    multiples of; ``norm_fn()``: grouped DoRA's max(||W + s B A||, eps) [n, N] from the caller's cache."""
    _check_x_weight_bias(x, weight, bias)
    N, K = weight.shape
    checking = check_ids and not x.is_meta and not torch.compiler.is_compiling()
    if rank_offsets is not None:
        n, width, align = _check_ragged(x, lora_A, lora_B, rank_offsets, N, K, scaling,
                                        checking and ragged_width is None)
        if ragged_width is not None:
            width, align = ragged_width, ragged_align
    else:
        if lora_A.dim() != 3:
            raise ValueError(f"lora_A must have shape (num_adapters, r, in_features); got {tuple(lora_A.shape)}")
        n, r = lora_A.shape[:2]
        _check_shape("lora_A", lora_A, (n, r, K), "(num_adapters, r, in_features)")
        _check_shape("lora_B", lora_B, (n, N, r), "(num_adapters, out_features, r)")
        _check_adapters(x, lora_A, lora_B, r)
    scale_vec, p, batch = _check_routing(x, adapter_ids, scaling, dropout_p, training, n, "num_adapters", check_ids,
                                         batch)
    if magnitude is not None:
        _check_magnitude(magnitude, x, N, n)
        if checking:
            _check_plain_rows(magnitude)
    if x.device.type == "meta":
        return _grouped_meta(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids, rank_offsets is not None,
                             magnitude)
    if not _use_kernels(x, lora_A, lora_B, *(() if magnitude is None else (magnitude,))):
        if magnitude is not None:
            return reference.grouped_dora_linear(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids, magnitude,
                                                 dropout_p=p, training=training, rank_offsets=rank_offsets)
        return reference.grouped_lora_linear(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids,
                                             dropout_p=p, training=training, rank_offsets=rank_offsets)
    offsets = None if rank_offsets is None else rank_offsets.to(torch.int32)
    if magnitude is not None:  # from the stored W, before any autocast cast
        norm = norm_fn() if norm_fn is not None else dora.grouped_weight_norm(weight, lora_A, lora_B, scale_vec,
                                                                              offsets)
    x, weight, bias = _autocast(x, weight, bias)
    seed = _seed(seed) if p > 0 else 0
    if magnitude is not None:
        shape = (None, 0, 1) if rank_offsets is None else (offsets, width, align)
        with torch.autocast(x.device.type, enabled=False):
            y = GroupedDoRAFunction.apply(x.reshape(-1, K), weight, bias, lora_A, lora_B, magnitude, norm, scale_vec,
                                          batch.perm, batch.sorted_ids, batch.seg_offsets, p, seed, *shape)
        return y.reshape(*x.shape[:-1], N)
    ragged = () if offsets is None else ((), (), offsets, width, align)
    with torch.autocast(x.device.type, enabled=False):
        y = LoRAFunction.apply(x.reshape(-1, K), weight, bias, lora_A, lora_B, 1.0, scale_vec, batch.perm,
                               batch.sorted_ids, batch.seg_offsets, p, seed, *ragged)
    return y.reshape(*x.shape[:-1], N)


def _expert_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, *, dropout_p, training, seed,
                        check_ids, batch, rank_offsets, magnitude):
    """``grouped_lora_linear`` over one base weight per expert (weight [E, N, K]): checks, then the grouped fused
    path with the 3-D weight (``LoRAFunction``; tiles cut at the expert segments run each expert's W)."""
    if magnitude is not None or rank_offsets is not None:
        what = "DoRA (magnitude)" if magnitude is not None else "a ragged stack (rank_offsets)"
        raise NotImplementedError(f"{what} over per-expert weights (weight {tuple(weight.shape)}) is not supported; "
                                  "experts take a padded LoRA stack lora_A (E, r, in), lora_B (E, out, r)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor; got {type(x).__name__}")
    E, N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must equal in_features = {K} (weight (experts, out, in) = "
                         f"{tuple(weight.shape)}); got x of shape {tuple(x.shape)}")
    _check_device("weight", weight, x)
    if bias is not None:
        _check_optional("bias", bias, x, (E, N), "(experts, out_features)")
    if not _autocast_enabled(x.device.type):
        _check_dtype("x", x.dtype)
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"x, weight and bias must share a dtype (or run under torch.autocast); got x "
                            f"{x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"weight (experts, out, in) = {tuple(weight.shape)} requires grad: the expert path trains "
                         "the adapters (and a bias) only; freeze it (weight.requires_grad_(False))")
    if not isinstance(lora_A, torch.Tensor) or not isinstance(lora_B, torch.Tensor):
        raise TypeError("lora_A and lora_B must be tensors")
    if lora_A.dim() != 3 or lora_A.shape[0] != E:
        raise ValueError(f"lora_A must have shape (experts, r, in_features) = ({E}, r, {K}); got "
                         f"{tuple(lora_A.shape)}")
    r = lora_A.shape[1]
    _check_shape("lora_A", lora_A, (E, r, K), "(experts, r, in_features)")
    _check_shape("lora_B", lora_B, (E, N, r), "(experts, out_features, r)")
    _check_adapters(x, lora_A, lora_B, r)
    scale_vec, p, batch = _check_routing(x, adapter_ids, scaling, dropout_p, training, E, "experts", check_ids, batch)
    if x.device.type == "meta":
        return _expert_meta(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids)
    if not _use_kernels(x, lora_A, lora_B):
        return reference.grouped_lora_linear(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids, dropout_p=p,
                                             training=training)
    x, weight, bias = _autocast(x, weight, bias)
    bias = None if bias is None else bias.contiguous()  # the kernel reads row e at e * N
    seed = _seed(seed) if p > 0 else 0
    with torch.autocast(x.device.type, enabled=False):
        y = LoRAFunction.apply(x.reshape(-1, K), weight, bias, lora_A, lora_B, 1.0, scale_vec, batch.perm,
                               batch.sorted_ids, batch.seg_offsets, p, seed)
    return y.reshape(*x.shape[:-1], N)


def _check_routing(x, adapter_ids, scaling, dropout_p, training, n, what, check_ids, batch):
    """The per-token part of a grouped call over ``n`` adapters or experts (``what``, as the messages name the
    count): ids of x's token shape on its device, scaling a number or an (n,) tensor, the dropout; returns (fp32
    scale_vec [n], the effective dropout p, the ``AdapterBatch`` given, checked, or built from the ids)."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a tensor; got {type(adapter_ids).__name__}")
    if adapter_ids.shape != x.shape[:-1]:
        raise ValueError(f"adapter_ids must have shape x.shape[:-1] = {tuple(x.shape[:-1])}; "
                         f"got {tuple(adapter_ids.shape)}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device}, x on {x.device}")
    if isinstance(scaling, torch.Tensor) and scaling.dim() > 0:
        if scaling.shape != (n,):
            raise ValueError(f"scaling must be a number or have shape ({what},) = ({n},); "
                             f"got {tuple(scaling.shape)}")
        scale_vec = scaling.to(device=x.device, dtype=torch.float32)
    else:
        scale_vec = torch.full((n,), _check_scaling(scaling), dtype=torch.float32, device=x.device)
    p = _check_dropout(dropout_p) if training else 0.0
    if batch is None:
        batch = AdapterBatch.build(adapter_ids, n, check_ids=check_ids)
    elif adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64; got {adapter_ids.dtype}")
    else:
        _check_batch(batch, x, n)
    return scale_vec, p, batch


def _expert_meta(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids):
    """The expert forward's shape, dtype and autograd graph on meta tensors (every expert on every token)."""
    linear = torch.nn.functional.linear
    out = x.new_zeros(*x.shape[:-1], weight.shape[1])
    for e in range(weight.shape[0]):
        sel = (adapter_ids == e).unsqueeze(-1).to(x.dtype)
        low = scale_vec[e] * linear(linear(x.to(lora_A.dtype), lora_A[e]), lora_B[e])
        out = out + sel * (linear(x, weight[e], None if bias is None else bias[e]) + low.to(x.dtype))
    return out


def _check_ragged(x, lora_A, lora_B, rank_offsets, N, K, scaling, check_values) -> tuple[int, int, int]:
    """Check a ragged stack (lora_A [sum r, K], lora_B [N, sum r], rank_offsets [n + 1]); return (n, the width of T:
    a power of two >= the largest rank, from the values when they are checked, else from sum r, at most 256; 8 when
    the checked offsets are all multiples of 8 and B's rows start 16-byte aligned, else 1)."""
    if not isinstance(rank_offsets, torch.Tensor):
        raise TypeError(f"rank_offsets must be an integer tensor or None; got {type(rank_offsets).__name__}")
    if rank_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rank_offsets must be int32 or int64; got {rank_offsets.dtype}")
    if rank_offsets.dim() != 1 or rank_offsets.numel() < 2:
        raise ValueError("rank_offsets must be a 1-D tensor of n + 1 offsets (n >= 1 adapters); got shape "
                         f"{tuple(rank_offsets.shape)}")
    if rank_offsets.device != x.device:
        raise ValueError(f"rank_offsets is on {rank_offsets.device}, x on {x.device}")
    n = rank_offsets.numel() - 1
    if lora_A.dim() != 2:
        raise ValueError(f"with rank_offsets, lora_A must have shape (sum of ranks, in_features) = (sum r, {K}); "
                         f"got {tuple(lora_A.shape)}")
    total = lora_A.shape[0]
    _check_shape("lora_A", lora_A, (total, K), "(sum of ranks, in_features)")
    _check_shape("lora_B", lora_B, (N, total), "(out_features, sum of ranks)")
    _check_adapter_tensors(x, lora_A, lora_B)
    if isinstance(scaling, torch.Tensor) and scaling.dim() > 0 and scaling.shape != (n,):
        raise ValueError(f"rank_offsets has {n + 1} entries (n = {n} adapters) but scaling has shape "
                         f"{tuple(scaling.shape)}; they must agree")
    if not check_values or rank_offsets.is_meta:
        return n, min(_launch.block_r(max(total, 1)), _launch.MAX_RANK), 1
    offsets = rank_offsets.tolist()  # the one host synchronisation of the check
    ranks = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    if offsets[0] != 0:
        raise ValueError(f"rank_offsets must start at 0; got {offsets[0]} (rank_offsets {_short(offsets)})")
    if min(ranks) < 0:
        g = min(range(n), key=lambda i: ranks[i])
        raise ValueError(f"rank_offsets must be non-decreasing; rank_offsets[{g + 1}] = {offsets[g + 1]} < "
                         f"rank_offsets[{g}] = {offsets[g]}")
    if offsets[-1] > total:
        raise ValueError(f"rank_offsets ends at {offsets[-1]}, past lora_A's {total} rows (lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)})")
    if max(ranks) > _launch.MAX_RANK:
        g = ranks.index(max(ranks))
        raise ValueError(f"rank_offsets gives adapter {g} rank {ranks[g]}; ranks must be at most {_launch.MAX_RANK}")
    aligned = all(o % 8 == 0 for o in offsets) and _columns_aligned(lora_B)
    return n, _launch.block_r(max(ranks)), 8 if aligned else 1


def _columns_aligned(lora_B) -> bool:
    """Whether a ragged lora_B [N, sum r] has unit column stride and every row starting 16 bytes aligned, so that
    rank columns at multiples of 8 load as vectors. Under torch.compile the storage is trusted (data_ptr() does not
    trace): only a ``GroupedLinear``'s own B, whose storage is aligned, is asked then."""
    aligned = torch.compiler.is_compiling() or lora_B.data_ptr() % 16 == 0
    return lora_B.stride(1) == 1 and lora_B.stride(0) % 8 == 0 and aligned


def _short(values, limit=8):
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...]"


def _check_batch(batch, x, n) -> None:
    """A prebuilt batch must be for x's tokens, n adapters and x's device: the kernels index x and y with its
    permutation. Shapes and devices only, no host synchronisation (its ids are trusted, as with check_ids=False)."""
    if not isinstance(batch, AdapterBatch):
        raise TypeError(f"batch must be a fastlora.AdapterBatch; got {type(batch).__name__}")
    M = math.prod(x.shape[:-1])
    if tuple(batch.shape) != tuple(x.shape[:-1]) or batch.perm.numel() != M or batch.sorted_ids.numel() != M:
        raise ValueError(f"batch was built for tokens of shape {tuple(batch.shape)} ({batch.perm.numel()} tokens); "
                         f"x has tokens of shape {tuple(x.shape[:-1])} ({M} tokens)")
    if batch.num_adapters != n or batch.seg_offsets.numel() != n + 1:
        raise ValueError(f"batch was built for {batch.num_adapters} adapters; lora_A holds {n}")
    for name in ("perm", "sorted_ids", "seg_offsets"):
        t = getattr(batch, name)
        if t.device != x.device or t.dtype != torch.int32:
            raise ValueError(f"batch.{name} must be int32 on x's device {x.device}; got {t.dtype} on {t.device}")


def _check_plain_rows(magnitude) -> None:
    """A magnitude row is all NaN (a plain LoRA adapter) or all numbers (DoRA): one host read."""
    nan = torch.isnan(magnitude)
    mixed = nan.any(1) & ~nan.all(1)
    if bool(mixed.any()):
        g = int(mixed.nonzero()[0, 0])
        raise ValueError(f"magnitude row {g} mixes NaN with numbers (magnitude {tuple(magnitude.shape)}): a row is "
                         "all NaN (plain LoRA adapter) or all finite (DoRA adapter)")


def _grouped_meta(x, weight, bias, lora_A, lora_B, scale_vec, adapter_ids, ragged=False, magnitude=None):
    """Grouped forward without data-dependent indexing, for meta tensors (shape inference, deferred init): every
    adapter on every token, masked by id (a ragged stack: the whole stack at once). Right shape, dtype and autograd
    graph; never runs on real data."""
    if magnitude is not None:  # g per token from ||W|| (the shape of the DoRA graph, not its values)
        g = torch.where(torch.isnan(magnitude), 1.0, magnitude / torch.linalg.vector_norm(weight, dim=1))
        gt = g[adapter_ids.clamp_min(0)].to(x.dtype)
        plain = _grouped_meta(x, weight, None, lora_A, lora_B, scale_vec, adapter_ids, ragged)
        y = gt * plain
        return y if bias is None else y + bias
    if ragged:
        sel = (adapter_ids >= 0).unsqueeze(-1).to(lora_B.dtype)
        low = sel * torch.nn.functional.linear(torch.nn.functional.linear(x.to(lora_A.dtype), lora_A), lora_B)
        return torch.nn.functional.linear(x, weight, bias) + low.to(x.dtype)
    low = 0
    for g in range(lora_A.shape[0]):
        sel = (adapter_ids == g).unsqueeze(-1).to(lora_B.dtype) * scale_vec[g].to(lora_B.dtype)
        low = low + sel * torch.nn.functional.linear(torch.nn.functional.linear(x.to(lora_A.dtype), lora_A[g]),
                                                     lora_B[g])
    base = torch.nn.functional.linear(x, weight, bias)
    return base + torch.as_tensor(low).to(base.dtype)


def dropout_mask(shape, dropout_p: float, seed: int, device=None) -> torch.Tensor:
    """The boolean keep-mask (shape [..., K]) that the kernels draw for ``dropout_p`` and ``seed``.

    Needs CUDA or ``TRITON_INTERPRET=1``; lets the reference reproduce a fused forward bit for bit.
    """
    shape = torch.Size(shape)
    K = shape[-1] if len(shape) else 1
    M = shape.numel() // K if K else 0
    return _launch.dropout_mask(M, K, dropout_p, seed, device or "cpu").reshape(shape)


def _use_kernels(x: torch.Tensor, *adapters: torch.Tensor, extra_dtypes=()) -> bool:
    """CUDA always; CPU only under the interpreter and never for bf16, whose tl.dot the interpreter
    computes wrongly (triton 3.6: relative error ~1e10), so bf16 on CPU takes the reference."""
    if x.device.type == "cuda":
        return True
    if not (_launch.INTERPRET and x.device.type == "cpu"):
        return False
    dtypes = {x.dtype, *(t.dtype for t in adapters), *extra_dtypes}
    if torch.is_autocast_enabled("cpu"):
        dtypes.add(torch.get_autocast_dtype("cpu"))
    return torch.bfloat16 not in dtypes


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False for device types autocast does not know (meta, as nn.Linear treats it)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast(x, weight, bias):
    dev = x.device.type
    if not _autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)


def _seed(seed):
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31); got {seed!r}")
    return int(seed)


def _check_x_weight_bias(x, weight, bias):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features); got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features); got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x's last dimension must equal in_features = {weight.shape[1]} (weight "
                         f"{tuple(weight.shape)}); got x of shape {tuple(x.shape)}")
    if bias is not None:
        _check_optional("bias", bias, x, (weight.shape[0],), "(out_features,)")
    _check_device("weight", weight, x)
    if not _autocast_enabled(x.device.type):
        _check_dtype("x", x.dtype)
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"x, weight and bias must share a dtype (or run under torch.autocast); got x "
                            f"{x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}")


def _check_lora(x, lora_A, lora_B, N, K, scaling, dropout_p, training) -> tuple[float, float]:
    """Check one adapter (lora_A [r, K], lora_B [N, r]) for an N x K base; return (scaling, effective dropout)."""
    _check_shape("lora_A", lora_A, (None, K), "(r, in_features)")
    r = lora_A.shape[0]
    _check_shape("lora_B", lora_B, (N, r), "(out_features, r)")
    _check_adapters(x, lora_A, lora_B, r)
    return _check_scaling(scaling), (_check_dropout(dropout_p) if training else 0.0)


def _check_adapters(x, lora_A, lora_B, r):
    if not 1 <= r <= _launch.MAX_RANK:
        raise ValueError(f"r must be in [1, {_launch.MAX_RANK}]; got lora_A of shape {tuple(lora_A.shape)}")
    _check_adapter_tensors(x, lora_A, lora_B)


def _check_adapter_tensors(x, lora_A, lora_B):
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        _check_device(name, t, x)
        _check_dtype(name, t.dtype)


def _check_optional(name, t, x, expected, meaning):
    """An optional tensor argument given (a bias, a DoRA magnitude): a tensor of shape ``expected`` on x's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None; got {type(t).__name__}")
    _check_shape(name, t, expected, meaning)
    _check_device(name, t, x)


def _check_dtype(name, dtype):
    if dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32; got {dtype}")


def _check_shape(name, t, expected, meaning):
    if t.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, t.shape, strict=True)):
        want = tuple("r" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {meaning} = {want}; got {tuple(t.shape)}")


def _check_device(name, t, x):
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise ValueError(f"scaling must be a number; got a tensor of shape {tuple(scaling.shape)}")
        return float(scaling)
    if not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a number; got {type(scaling).__name__}")
    return float(scaling)


def _check_dropout(p) -> float:
    if not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {p!r}")
    return float(p)
