"""Model-level helpers: ``inject`` fastlora layers by PEFT's target rules, ``merge``/``unmerge`` them all."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.nn as nn

from fastlora.modules import GroupedLinear, Linear

ALL_LINEAR = "all-linear"


def inject(model: nn.Module, target_modules, *, r: int, alpha: float, dropout: float = 0.0,
           use_rslora: bool = False) -> list[str]:
    """Replace the ``nn.Linear`` layers named by ``target_modules`` with ``fastlora.Linear``; return their names.

    ``target_modules`` follows PEFT's ``LoraConfig.target_modules``: a list of names, each matching a module
    whose full name equals it or ends with ``"." + name`` (``["q_proj", "v_proj"]``); a regex string matched
    with ``re.fullmatch`` against the full name; or ``"all-linear"``: every ``nn.Linear`` except the output
    layer (``model.get_output_embeddings()`` for a Hugging Face model, else any module named ``lm_head``).
    The new layers share the base weight and bias. Afterwards every parameter of the model is frozen except
    the ``lora_A``/``lora_B`` of fastlora layers, as ``peft.get_peft_model`` does.
    """
    names = match_modules(model, target_modules)
    for name in names:
        _set_submodule(model, name, Linear.from_linear(model.get_submodule(name), r=r, alpha=alpha,
                                                       dropout=dropout, use_rslora=use_rslora))
    freeze_base(model)
    return names


def match_modules(model: nn.Module, target_modules) -> list[str]:
    """The names of the ``nn.Linear`` layers that ``target_modules`` selects (PEFT's rules, see ``inject``).

    A matched module that is not an ``nn.Linear`` (or is already a fastlora layer) raises ``ValueError``; so
    does a selection that matches nothing.
    """
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            output = _output_layer(model)
            matches = lambda name, mod: (isinstance(mod, nn.Linear) and mod is not output
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
        if isinstance(mod, (Linear, GroupedLinear)):
            raise ValueError(f"target_modules {target_modules!r} matched {name!r}, which is already a "
                             f"fastlora.{type(mod).__name__}")
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"target_modules {target_modules!r} matched {name!r}, a {type(mod).__name__}; only "
                             "nn.Linear layers can be targeted")
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    return names


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter except the adapters of fastlora layers."""
    adapters = set()
    for mod in model.modules():
        if isinstance(mod, (Linear, GroupedLinear)):
            adapters.update((id(mod.lora_A), id(mod.lora_B)))
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def merge(model: nn.Module) -> list[str]:
    """Fold every ``fastlora.Linear`` adapter into its base weight (inference); return the layer names.

    ``GroupedLinear`` stacks are left alone: a per-token adapter cannot be folded into one weight.
    """
    names = _linears(model)
    for name in names:
        model.get_submodule(name).merge()
    return names


def unmerge(model: nn.Module) -> list[str]:
    """Undo ``merge``: subtract every ``fastlora.Linear`` adapter from its base weight; return the layer names."""
    names = _linears(model)
    for name in names:
        model.get_submodule(name).unmerge()
    return names


def _linears(model: nn.Module) -> list[str]:
    names = [name for name, mod in model.named_modules() if isinstance(mod, Linear)]
    if not names:
        raise ValueError("found no fastlora.Linear in the model")
    return names


def _output_layer(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name``, in the train/eval mode of the module it replaces."""
    parent, _, child = name.rpartition(".")
    module.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent), child, module)
