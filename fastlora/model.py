"""Model-level helpers: ``inject`` fastlora layers by PEFT's target rules, ``merge``/``unmerge`` them all.

bitsandbytes stays optional and is never imported here: ``linear4bit._is_bnb_4bit`` looks for it in ``sys.modules``.
Its ``Linear4bit`` subclasses ``nn.Linear``, so "all-linear" selects it, as PEFT does; ``inject`` wraps it in a
``fastlora.Linear4bit`` that shares its packed weight and quant state.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from fastlora import moe, quant
from fastlora.linear4bit import Linear4bit, _is_bnb_4bit
from fastlora.linear_fp8 import LinearFP8, fp8_block_size, is_fp8_linear
from fastlora.modules import GroupedLinear, Linear, _adapter_args, _adapter_dtype, _check_use_dora

ALL_LINEAR = "all-linear"
_QUANTIZED = (Linear4bit, LinearFP8)  # single-adapter layers over a quantised base: they never merge
_SINGLE = (Linear, *_QUANTIZED)  # one adapter per layer: what save_adapter writes and load_adapter fills
_FASTLORA = (*_SINGLE, GroupedLinear)


def inject(model: nn.Module, target_modules, *, r: int, alpha: float, dropout: float = 0.0,
           use_rslora: bool = False, use_dora: bool = False, adapter_dtype=None, target_parameters=None) -> list[str]:
    """Replace the ``nn.Linear`` layers named by ``target_modules`` with fastlora layers; return their names.

    An ``nn.Linear`` becomes a ``fastlora.Linear``; a bitsandbytes ``Linear4bit`` (what ``from_pretrained`` with
    ``BitsAndBytesConfig(load_in_4bit=True)`` builds) becomes a ``fastlora.Linear4bit`` sharing its packed weight,
    quant state and compute dtype, with fp32 adapters (as PEFT's QLoRA). Other quantised linears (bitsandbytes
    ``Linear8bitLt``, any non-float weight) raise ``NotImplementedError``. Nothing is replaced unless every
    selected layer can be.

    ``target_modules`` follows PEFT's ``LoraConfig.target_modules``: a list of names, each matching a module
    whose full name equals it or ends with ``"." + name`` (``["q_proj", "v_proj"]``); a regex string matched
    with ``re.fullmatch`` against the full name; or ``"all-linear"``: every ``nn.Linear`` except the output
    layer (``model.get_output_embeddings()`` for a Hugging Face model, else any module named ``lm_head``).
    The new layers share the base weight and bias. Afterwards every parameter of the model is frozen except
    the adapters (``lora_A``/``lora_B``, and ``lora_magnitude`` with DoRA) of fastlora layers, as
    ``peft.get_peft_model`` does.

    ``use_dora=True`` (PEFT's ``LoraConfig(use_dora=True)``): every new layer is a DoRA layer with a trainable
    ``lora_magnitude`` initialised as PEFT does (docs/dora.md); a 4-bit target becomes a
    ``fastlora.Linear4bit(use_dora=True)`` (QDoRA).

    A block-scaled FP8 linear (transformers' ``FP8Linear`` from an FP8 checkpoint, or any module holding a
    float8_e4m3fn ``weight`` and its ``weight_scale_inv``) becomes a ``fastlora.LinearFP8`` sharing those tensors, with
    fp32 adapters; per-tensor and UE8M0 scales raise ``NotImplementedError``.

    Adapters are fp32 over bf16/fp16 (and 4-bit) bases, as ``get_peft_model`` makes them (its default
    ``autocast_adapter_dtype=True``): in 16 bits an Adam step below the value's spacing is lost, and GradScaler
    refuses fp16 gradients. Over an fp32 base they are fp32. ``adapter_dtype`` (torch.float16, bfloat16 or float32)
    overrides this for every new layer.

    ``target_parameters`` (PEFT's ``LoraConfig.target_parameters``, e.g. ``["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"]``): LoRA on the 3-D expert weights of transformers' MoE experts modules. A name selects
    the parameters whose full name equals it or ends with ``"." + name``; each experts module holding selected
    projections becomes a ``fastlora.Experts`` (docs/moe.md) sharing its parameters, with one rank-r adapter per
    expert and projection initialised as PEFT's ``ParamWrapper`` (lora_A (E*r, in) Kaiming-uniform, lora_B zero).
    ``target_modules`` may then be None or ``[]`` (no linear layer). As PEFT, expert adapters refuse ``dropout`` > 0
    and ``use_dora``. Returns the linear layers' names, then the experts modules'.
    """
    _adapter_args(r, alpha, dropout, use_rslora)
    _check_use_dora(use_dora)
    _adapter_dtype(adapter_dtype, torch.float32)
    experts = {}
    if target_parameters is not None:
        if dropout or use_dora:
            raise ValueError(f"target_parameters with {'use_dora=True' if use_dora else f'dropout={dropout}'}: expert "
                             "adapters (PEFT's ParamWrapper) support neither dropout nor DoRA")
        experts = moe.match_parameters(model, target_parameters)
    names = [] if experts and target_modules in (None, []) else match_modules(model, target_modules)
    kw = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora, adapter_dtype=adapter_dtype)
    for name in names:  # every base checked before any layer is built
        check_base(name, model.get_submodule(name))
    with _transaction(model):
        layers = {name: _wrap(model.get_submodule(name), kw) for name in names}
        for name, targeted in experts.items():
            layers[name] = moe.Experts(model.get_submodule(name), {p: (r, alpha, use_rslora) for p in targeted},
                                       adapter_dtype=adapter_dtype)
    _swap_in(model, layers)
    return list(layers)


def _wrap(linear: nn.Module, kw: dict) -> Linear | Linear4bit | LinearFP8:
    """A fastlora layer over the base ``linear`` (checked by ``check_base``)."""
    return layer_class(linear).from_linear(linear, **kw)


def layer_class(base: nn.Module) -> type:
    """The fastlora layer that wraps a base linear: ``Linear4bit`` over a bitsandbytes 4-bit one, ``LinearFP8`` over
    a block-scaled FP8 one, ``Linear`` over any other ``nn.Linear``."""
    if _is_bnb_4bit(base):
        return Linear4bit
    return LinearFP8 if is_fp8_linear(base) else Linear


def check_base(name: str, base: nn.Module) -> None:
    """Raise, naming the layer, unless ``layer_class(base).from_linear`` can wrap the base linear at ``name``."""
    if _is_bnb_4bit(base):
        _check_bnb_4bit(name, base)
    elif is_fp8_linear(base):
        try:
            fp8_block_size(base)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name!r}: fastlora cannot read this FP8 linear's scales: {e}") from e
        except NotImplementedError as e:
            raise NotImplementedError(f"{name!r}: {e}") from e
    else:
        _check_unquantized(name, base)


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a base linear or fastlora layer (a 4-bit weight is stored packed)."""
    if isinstance(base, _QUANTIZED) or _is_bnb_4bit(base):
        return base.out_features, base.in_features
    return tuple(base.weight.shape)


def _check_unquantized(name: str, linear: nn.Linear) -> None:
    """Raise for an ``nn.Linear`` subclass that quantises its weight (bitsandbytes ``Linear8bitLt``, ...)."""
    cls = type(linear)
    if (cls.__module__.partition(".")[0] == "bitsandbytes" or not linear.weight.is_floating_point()
            or linear.weight.element_size() < 2):
        raise NotImplementedError(f"{name!r} is a {cls.__module__}.{cls.__name__} with a {linear.weight.dtype} "
                                  "weight; fastlora supports nn.Linear, bitsandbytes Linear4bit (4-bit) and "
                                  "block-scaled FP8 (float8_e4m3fn weight with a weight_scale_inv) bases")


def _check_bnb_4bit(name: str, linear: nn.Module) -> None:
    """Raise if the bitsandbytes ``Linear4bit`` at ``name`` cannot be shared by a ``fastlora.Linear4bit``.

    bitsandbytes quantises a ``Params4bit`` when it is first moved to a device (``.to("cpu")``, ``.cuda()``;
    ``from_pretrained`` does it while loading); before that the weight is still float. (A weight that its CPU
    inference path repacked for AVX512-BF16, ``quant_state.packing_format_for_cpu``, is put back into the format by
    ``Linear4bit.from_linear``.)
    """
    qs = getattr(linear.weight, "quant_state", None)
    if qs is None:
        raise ValueError(f"{name!r}: the bitsandbytes Linear4bit is not quantised yet (weight.quant_state is None); "
                         "bitsandbytes quantises when the layer is moved to a device, e.g. .to('cpu') or .cuda()")
    try:
        if getattr(qs, "packing_format_for_cpu", False):
            state = quant.from_bnb_cpu_layout(linear.weight.data, qs)[1]  # a dry run: nothing is changed yet
        else:
            state = quant.QuantState4bit.from_bnb(qs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name!r}: fastlora cannot read this bitsandbytes Linear4bit's quant state: {e}") from e
    if state.shape[1] % state.blocksize:
        raise ValueError(f"{name!r}: in_features = {state.shape[1]} must be a multiple of the quantisation blocksize "
                         f"{state.blocksize}: the fused 4-bit GEMM reads each weight row as whole blocks")


@contextlib.contextmanager
def _transaction(model: nn.Module):
    """Undo what building new layers does to a model's parameters (``requires_grad``) if the block raises, so a
    failed ``inject``/``load_adapter`` leaves the model as it was. Modules are swapped in only after the block."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def match_modules(model: nn.Module, target_modules) -> list[str]:
    """The names of the ``nn.Linear`` layers that ``target_modules`` selects (PEFT's rules, see ``inject``).

    A matched module that is not an ``nn.Linear`` (or is already a fastlora layer) raises ``ValueError``; so
    does a selection that matches nothing.
    """
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            output = _output_layer(model)
            matches = lambda name, mod: ((isinstance(mod, nn.Linear) or is_fp8_linear(mod)) and mod is not output
                                         and name.rpartition(".")[2] != "lm_head")
        else:
            pattern = re.compile(target_modules)
            matches = lambda name, mod: pattern.fullmatch(name) is not None
    elif isinstance(target_modules, Iterable):
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"target_modules must be a non-empty list of module names; got {target_modules!r}")
        matches = lambda name, mod: any(name == t or name.endswith("." + t) for t in targets)
    else:
        raise TypeError("target_modules must be a list of module names, a regex string or 'all-linear'; "
                        f"got {type(target_modules).__name__}")
    names = []
    for name, mod in model.named_modules():
        if not name or not matches(name, mod):
            continue
        if isinstance(mod, _FASTLORA):
            raise ValueError(f"target_modules {target_modules!r} matched {name!r}, which is already a "
                             f"fastlora.{type(mod).__name__}")
        if not isinstance(mod, nn.Linear) and not is_fp8_linear(mod):
            raise ValueError(f"target_modules {target_modules!r} matched {name!r}, a {type(mod).__name__}; only "
                             "nn.Linear layers (and FP8 linears) can be targeted")
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    return names


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter except the adapters of fastlora layers (``lora_A``, ``lora_B`` and
    the DoRA ``lora_magnitude``) and of ``fastlora.Experts`` modules."""
    adapters = set()
    for mod in model.modules():
        if isinstance(mod, _FASTLORA):
            adapters.update(id(p) for p in (mod.lora_A, mod.lora_B, getattr(mod, "lora_magnitude", None))
                            if p is not None)
        elif isinstance(mod, moe.Experts):
            adapters.update(id(p) for p in (*mod.lora_A.values(), *mod.lora_B.values()))
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def merge(model: nn.Module) -> list[str]:
    """Fold every ``fastlora.Linear`` adapter into its base weight (inference); return the layer names.

    ``GroupedLinear`` stacks are left alone: a per-token adapter cannot be folded into one weight. A model with
    ``fastlora.Linear4bit`` layers raises their ``NotImplementedError`` (naming the first such layer) before
    anything is merged: folding an adapter into 4-bit codes re-quantises the base (so do ``fastlora.LinearFP8``
    layers). ``layer.dequantize()`` gives a
    mergeable ``fastlora.Linear``.
    """
    return _apply(model, "merge")


def unmerge(model: nn.Module) -> list[str]:
    """Undo ``merge``: subtract every ``fastlora.Linear`` adapter from its base weight; return the layer names."""
    return _apply(model, "unmerge")


def _apply(model: nn.Module, method: str) -> list[str]:
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, _SINGLE)}
    if not layers:
        raise ValueError("found no fastlora.Linear, fastlora.Linear4bit or fastlora.LinearFP8 in the model")
    # quantised layers first: they refuse, and must do so before any full-precision layer has changed.
    for name, layer in sorted(layers.items(), key=lambda item: not isinstance(item[1], _QUANTIZED)):
        try:
            getattr(layer, method)()
        except NotImplementedError as e:
            raise NotImplementedError(f"{method} of layer {name!r}: {e}") from e
    return list(layers)


def _output_layer(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _swap_in(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put the built ``layers`` ({name: module}) into ``model``, then freeze all but the adapters (the last step of
    every transaction: nothing in it can fail)."""
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    freeze_base(model)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name``, in the train/eval mode of the module it replaces."""
    parent, _, child = name.rpartition(".")
    module.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent), child, module)
