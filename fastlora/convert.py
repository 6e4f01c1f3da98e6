"""``from_peft``: swap a PEFT LoRA model's ``lora.Linear`` layers for ``fastlora.Linear``, in place.

QLoRA: PEFT wraps a bitsandbytes ``Linear4bit`` in ``peft.tuners.lora.bnb.Linear4bit`` (0.21: when the model
says ``is_loaded_in_4bit``, else in a plain ``lora.Linear``, as bitsandbytes' layer subclasses ``nn.Linear``).
Its forward runs the base in the bitsandbytes layer's ``compute_dtype`` (x cast to it, the result cast back
to x's dtype), then ``lora_B(lora_A(dropout(x.to(lora dtype)))) * scaling`` in the adapters' dtype (fp32: its
``autocast_adapter_dtype=True`` upcasts 16-bit adapters), cast to the result's dtype and added. Either wrapper
becomes a ``fastlora.Linear4bit`` sharing the bitsandbytes weight, bias and quant state.

DoRA: PEFT keeps the magnitude in ``lora_magnitude_vector[adapter].weight`` (a ``DoraLinearLayer``) and marks the
layer with a ``DoraLinearVariant`` in ``lora_variant``; the new layer is built with ``use_dora=True`` and shares
that parameter as its ``lora_magnitude``. A merged DoRA layer keeps PEFT's cached ``{adapter}-weight_norm`` (the
norm the merge divided by), from which the new layer's unmerge factor is taken.
"""

from __future__ import annotations

import torch.nn as nn

from fastlora import moe
from fastlora.linear4bit import Linear4bit
from fastlora.linear_fp8 import LinearFP8
from fastlora.model import _set_submodule, check_base, layer_class
from fastlora.modules import Linear


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Convert every PEFT LoRA ``Linear`` layer in ``peft_model`` into a ``fastlora.Linear``; return the base model.

    ``peft_model`` is a ``PeftModel``, a ``LoraModel`` or any module holding PEFT LoRA layers. Returned is the
    unwrapped model (``peft_model.base_model.model`` for a ``PeftModel``): its module names are the ones in PEFT's
    adapter files, so ``fastlora.save_adapter`` on it writes what ``PeftModel.from_pretrained`` reads.

    Each new layer shares the base ``weight``/``bias`` and the active adapter's ``lora_A``/``lora_B`` parameters
    themselves (an optimizer built over the PEFT model keeps training them), and copies r, alpha, scaling,
    dropout p and the merged state, so outputs and trainable parameters are unchanged. A layer over a
    bitsandbytes ``Linear4bit`` (QLoRA) becomes a ``fastlora.Linear4bit`` that shares the packed weight, quant
    state, bias and compute dtype. A DoRA layer (``use_dora=True``) becomes a DoRA layer sharing PEFT's magnitude
    parameter as ``lora_magnitude`` (over a 4-bit base: ``fastlora.Linear4bit(use_dora=True)``, QDoRA). A layer
    over a block-scaled FP8 linear (transformers' ``FP8Linear``) becomes a ``fastlora.LinearFP8`` sharing its weight
    and scales.

    PEFT's ``target_parameters`` on a transformers MoE experts module (``lora.ParamWrapper``s, nested one per targeted
    parameter: ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``) become one
    ``fastlora.Experts`` sharing the expert weights and each wrapper's ``lora_A``/``lora_B`` parameters as they are
    (PEFT's (E*r, in) and (out, r*E) layout), with its scaling; a merged wrapper, one over a 2-D parameter or a
    bias, and an experts module fastlora cannot run raise ``NotImplementedError`` naming it. Everything
    is checked before anything is replaced: the other LoRA variants, ``lora_bias``, ``fan_in_fan_out``/Conv1D
    bases, several active adapters, disabled adapters, adapters merged into a quantised base, non-Linear LoRA layers
    (Embedding, Conv, 8-bit and other quantized bases) and ``modules_to_save``/trainable-token wrappers raise
    ``NotImplementedError`` naming the layer.

    HF ``Trainer`` refuses a quantised model that is not a ``PeftModel`` ("purely quantized models"): train a
    converted QLoRA model by passing the ``PeftModel`` (converted in place) to the Trainer, not the return value.
    """
    from peft.tuners.lora import bnb as peft_bnb  # its LoRA layers over bitsandbytes, defined if that is installed
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    root = _unwrap(peft_model)
    plan, experts = [], []
    for name, mod in root.named_modules():
        if isinstance(mod, AuxiliaryTrainingWrapper):
            raise NotImplementedError(f"{name!r} is a PEFT {type(mod).__name__} (modules_to_save or trainable "
                                      "tokens); fastlora converts LoRA Linear layers only")
        if not isinstance(mod, BaseTunerLayer):
            continue
        if type(mod) is ParamWrapper:
            if not any(w is mod for _, chain in experts for w in chain):  # an inner wrapper: part of its chain
                experts.append((name, _check_param_chain(name, mod)))
            continue
        if type(mod) is not PeftLinear and type(mod) is not getattr(peft_bnb, "Linear4bit", None):
            if type(mod) is getattr(peft_bnb, "Linear8bitLt", None):
                raise NotImplementedError(f"{name!r} is a PEFT LoRA layer over a bitsandbytes 8-bit base "
                                          "(Linear8bitLt); fastlora supports 4-bit (Linear4bit) bases only")
            raise NotImplementedError(f"{name!r} is a PEFT {type(mod).__name__}; fastlora converts only "
                                      "peft.tuners.lora.layer.Linear over an nn.Linear and "
                                      "peft.tuners.lora.bnb.Linear4bit over a bitsandbytes Linear4bit")
        plan.append((name, mod, _check_layer(name, mod)))
    if not plan and not experts:
        raise ValueError("from_peft found no PEFT LoRA Linear layer or ParamWrapper in the model")
    layers = [(name, _convert(mod, adapter)) for name, mod, adapter in plan]
    layers += [(name, _convert_experts(chain)) for name, chain in experts]
    for name, layer in layers:
        _set_submodule(root, name, layer)
    return root


def _unwrap(model: nn.Module) -> nn.Module:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _check_layer(name: str, mod) -> str:
    """The active adapter's name, after checking the layer uses only what fastlora.Linear implements."""
    def fail(why):
        raise NotImplementedError(f"PEFT LoRA layer {name!r}: {why}; fastlora does not support it")

    if mod.disable_adapters:
        fail("its adapters are disabled")
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if len(active) != 1:
        fail(f"it has {len(active)} active adapters {active} (fastlora needs exactly one)")
    adapter = active[0]
    if mod.merged_adapters not in ([], [adapter]):
        fail(f"merged adapters {mod.merged_adapters} differ from the active adapter {adapter!r}")
    dora = _is_dora(mod, adapter)
    variant = getattr(mod, "lora_variant", {}).get(adapter)
    if variant is not None and not dora:
        fail(f"LoRA variant {type(variant).__name__}")
    if mod.lora_bias.get(adapter, False) or mod.lora_B[adapter].bias is not None:
        fail("lora_bias=True")
    if getattr(mod, "fan_in_fan_out", False) or getattr(mod, "is_target_conv_1d_layer", False):
        fail("fan_in_fan_out / a Conv1D base layer")
    base = mod.get_base_layer()
    if not isinstance(base, nn.Linear):
        fail(f"a {type(base).__name__} base layer (needs nn.Linear)")
    kind = {Linear4bit: "4-bit", LinearFP8: "FP8"}.get(layer_class(base))
    if kind and mod.merged:
        fail(f"its adapter is merged into the {kind} base (re-quantised); call unmerge_adapter() first")
    check_base(name, base)
    if dora:
        m = mod.lora_magnitude_vector[adapter].weight
        if m.shape != (base.out_features,) or not m.is_floating_point():
            fail(f"its DoRA magnitude is a {m.dtype} tensor of shape {tuple(m.shape)}, not ({base.out_features},)")
        if mod.merged and getattr(mod, "_caches", {}).get(f"{adapter}-weight_norm") is None:
            fail("it is a merged DoRA layer without PEFT's cached weight norm; call unmerge_adapter() first")
    dropout = mod.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        fail(f"dropout module {type(dropout).__name__}")
    return adapter


def _is_dora(mod, adapter: str) -> bool:
    """Whether PEFT layer ``mod`` runs ``adapter`` as DoRA (0.21 marks it by a ``DoraLinearVariant``; older
    versions by ``use_dora`` alone; both keep the magnitude in ``lora_magnitude_vector``)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    variant = getattr(mod, "lora_variant", {}).get(adapter)
    if variant is not None:
        return type(variant) is DoraLinearVariant
    return bool(mod.use_dora.get(adapter, False)) or adapter in mod.lora_magnitude_vector


def _convert(mod, adapter: str) -> nn.Module:
    dropout = mod.lora_dropout[adapter]
    base = mod.get_base_layer()
    cls = layer_class(base)
    dora = _is_dora(mod, adapter)
    layer = cls.from_linear(
        base, r=mod.r[adapter], alpha=mod.lora_alpha[adapter],
        dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0, use_rslora=mod.use_rslora.get(adapter, False),
        use_dora=dora)
    layer.scaling = mod.scaling[adapter]  # may have been rescaled (PEFT's scale_layer)
    layer.lora_A = mod.lora_A[adapter].weight
    layer.lora_B = mod.lora_B[adapter].weight
    if dora:
        layer.lora_magnitude = mod.lora_magnitude_vector[adapter].weight
    if cls is Linear:
        layer.merged = mod.merged
        if dora and mod.merged:
            _take_merged_dora(layer, mod, adapter)
    return layer


def _take_merged_dora(layer: Linear, mod, adapter: str) -> None:
    """What ``Linear.unmerge`` needs from a DoRA layer PEFT merged: g = m / the norm PEFT's merge divided by (its
    cached ``{adapter}-weight_norm``), so unmerging divides by the same g as PEFT's ``unmerge``. Rows with g = 0 were
    zeroed by the merge and cannot be recovered (PEFT's unmerge gives NaN there); they stay zero."""
    norm = getattr(mod, "_caches", {}).get(f"{adapter}-weight_norm")
    layer._keep_merge_scale(layer.lora_magnitude.detach().float() / norm.float())


def _check_param_chain(name: str, outer) -> list:
    """The nested PEFT ParamWrappers at ``name``, outermost first, after checking that ``fastlora.Experts`` runs them
    as PEFT does: one active adapter (the same in all), unmerged, on expert projections of a supported experts
    module."""
    from peft.tuners.lora.layer import ParamWrapper

    def fail(why):
        raise NotImplementedError(f"PEFT ParamWrapper {name!r}: {why}; fastlora does not support it")

    chain, mod = [], outer
    while type(mod) is ParamWrapper:
        chain.append(mod)
        mod = mod.base_layer
    base = mod
    if not moe.is_experts(base) or isinstance(base, moe.Experts):
        fail(f"it wraps a {type(base).__name__}, not a transformers experts module with 3-D expert weights")
    try:
        moe.check_experts(name, base)
    except ValueError as e:
        raise NotImplementedError(str(e)) from e
    adapters = set()
    for w in chain:
        if w.disable_adapters:
            fail("its adapters are disabled")
        active = [a for a in w.active_adapters if a in w.lora_A]
        if len(active) != 1:
            fail(f"{w.parameter_name} has {len(active)} active adapters {active} (fastlora needs exactly one)")
        adapters.add(active[0])
        if w.merged:
            fail(f"{w.parameter_name} is merged into the expert weights; call unmerge_adapter() first")
        if w.parameter_name not in moe.projections(base):
            fail(f"it targets {w.parameter_name!r}, not an expert projection {moe.projections(base)}")
        if w.lora_bias.get(active[0], False) or w.lora_B[active[0]].bias is not None:
            fail("lora_bias=True")
        E, N, K = moe.expert_shape(base, w.parameter_name)
        a, b = w.lora_A[active[0]].weight, w.lora_B[active[0]].weight
        r = w.r[active[0]]
        shape = (w.num_experts, w.in_features, w.out_features)
        if shape != (E, K, N) or a.shape != (E * r, K) or b.shape != (N, r * E):
            fail(f"{w.parameter_name}'s adapter lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} does not fit "
                 f"(experts, out, in) = {(E, N, K)} at r = {r}")
    if len(adapters) != 1:
        fail(f"its wrappers run different adapters {sorted(adapters)}")
    if len({w.parameter_name for w in chain}) != len(chain):
        fail("a parameter is wrapped twice")
    return chain


def _convert_experts(chain) -> moe.Experts:
    base = chain[-1].base_layer
    adapter = next(a for a in chain[0].active_adapters if a in chain[0].lora_A)
    spec = {w.parameter_name: (w.r[adapter], w.lora_alpha[adapter], w.use_rslora.get(adapter, False)) for w in chain}
    layer = moe.Experts(base, spec)
    for w in chain:
        layer.set_adapter(w.parameter_name, w.lora_A[adapter].weight, w.lora_B[adapter].weight, w.scaling[adapter])
    layer.train(chain[0].training)
    return layer
