"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module name>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]), module names relative to the model passed in (the model given to ``PeftModel.from_pretrained``).
``save_adapter``/``load_adapter`` move one adapter between fastlora and PEFT; ``load_adapters_grouped``
stacks several saved adapters into ``GroupedLinear`` layers for mixed-adapter batches.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
import torch.nn as nn

from fastlora.linear4bit import Linear4bit, _is_bnb_4bit
from fastlora.model import _set_submodule, freeze_base
from fastlora.modules import GroupedLinear, Linear

_SINGLE = (Linear, Linear4bit)  # one-adapter layers: what save_adapter writes and load_adapter fills

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.(?P<part>lora_A|lora_B)\.weight")
# LoraConfig fields whose non-default value changes the layer's math; fastlora implements none of them.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                "trainable_token_indices": None, "target_parameters": None, "use_bdlora": None,
                "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None, "velora_config": None,
                "monteclora_config": None, "use_qalora": False, "layer_replication": None}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write every ``fastlora.Linear`` / ``fastlora.Linear4bit`` adapter of ``model`` to directory ``path`` in
    PEFT's format (a 4-bit model's adapter loads into PEFT over the same bitsandbytes base).

    The config's ``r``/``lora_alpha`` are the most common values; layers that differ get ``rank_pattern``/
    ``alpha_pattern`` entries (as PEFT writes them). ``lora_dropout`` is the most common dropout (it does not
    change saved weights). Layers with different ``use_rslora`` raise ``ValueError``. Returns the layer names.
    """
    from safetensors.torch import save_file

    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, _SINGLE)}
    if not layers:
        raise ValueError("save_adapter found no fastlora.Linear or fastlora.Linear4bit in the model")
    rslora = {mod.use_rslora for mod in layers.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter needs one use_rslora for all layers (PEFT's config has one); got both")
    r = Counter(mod.r for mod in layers.values()).most_common(1)[0][0]
    alpha = Counter(mod.alpha for mod in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": Counter(mod.dropout for mod in layers.values()).most_common(1)[0][0],
        "use_rslora": rslora.pop(),
        "target_modules": _target_modules(model, list(layers)),
        "rank_pattern": {name: mod.r for name, mod in layers.items() if mod.r != r},
        "alpha_pattern": {name: mod.alpha for name, mod in layers.items() if mod.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "inference_mode": True,
    }
    tensors = {}
    for name, mod in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return list(layers)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a PEFT-format LoRA adapter from directory ``path`` into ``model``; return the layer names.

    Each layer named in the file must be an ``nn.Linear`` (wrapped into a ``fastlora.Linear`` sharing its
    weight), a bitsandbytes ``Linear4bit`` (wrapped into a ``fastlora.Linear4bit`` sharing its packed weight), an
    unmerged ``fastlora.Linear`` or a ``fastlora.Linear4bit`` (its adapter is replaced). Rank comes from the
    tensors, alpha from ``lora_alpha``/``alpha_pattern``, dropout and ``use_rslora`` from the config. Afterwards
    only the adapters of fastlora layers require grad (as ``inject``). DoRA, ``lora_bias``, ``fan_in_fan_out`` and
    ``modules_to_save`` adapters raise ``NotImplementedError``.
    """
    config, weights = read_adapter(path)
    bases = {name: _base_of(model, name, a, b, path) for name, (a, b) in weights.items()}  # check all first
    for name, (a, b) in weights.items():
        mod = bases[name]
        kw = dict(r=a.shape[0], alpha=_alpha(config, name), dropout=float(config.get("lora_dropout", 0.0)),
                  use_rslora=bool(config.get("use_rslora", False)))
        if isinstance(mod, Linear4bit):  # new adapter parameters (fp32) over the same packed weight
            layer = mod
            layer._setup(mod.bias, compute_dtype=mod.compute_dtype, **kw)
        elif _is_bnb_4bit(mod):
            layer = Linear4bit.from_linear(mod, **kw)
        else:
            layer = Linear.from_linear(_as_linear(mod.weight, mod.bias), **kw)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        _set_submodule(model, name, layer)
    freeze_base(model)
    return list(weights)


def load_adapters_grouped(model: nn.Module, paths, *, dropout: float = 0.0) -> list[str]:
    """Stack the PEFT-format adapters in ``paths`` into ``GroupedLinear`` layers; adapter id i is ``paths[i]``.

    Every layer named in any file (an ``nn.Linear`` or unmerged ``fastlora.Linear``) becomes a ``GroupedLinear``
    with ``num_adapters=len(paths)`` sharing the base weight. Lower ranks are zero-padded to the largest r;
    ``scaling[i]`` is alpha_i/r_i (alpha_i/sqrt(r_i) with use_rslora), 0 where adapter i lacks the layer. Run
    the model inside ``fastlora.use_adapters(model, ids)``. ``dropout`` applies to every adapter (0 for
    serving). Returns the layer names; afterwards only the stacks' adapters require grad.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("load_adapters_grouped needs at least one adapter path; got none")
    loaded = [read_adapter(p) for p in paths]
    files = {name for _, weights in loaded for name in weights}
    names = [name for name, _ in model.named_modules() if name in files]
    missing = files.difference(names)
    if missing:
        raise ValueError(f"adapters have weights for {sorted(missing)}, which are not modules of the model")
    bases = {}
    for name in names:  # check every layer of every file before replacing anything
        for path, (_, weights) in zip(paths, loaded, strict=True):
            if name in weights:
                bases[name] = _base_of(model, name, *weights[name], path)
    r_max = max(a.shape[0] for _, weights in loaded for a, _ in weights.values())
    n = len(paths)
    for name in names:
        weight, bias = bases[name].weight, bases[name].bias
        if isinstance(bases[name], Linear4bit) or _is_bnb_4bit(bases[name]):
            raise NotImplementedError(f"{name!r} has a 4-bit base: load_adapters_grouped stacks adapters over "
                                      "16/32-bit bases only (there is no grouped 4-bit layer)")
        N, K = weight.shape
        layer = GroupedLinear(K, N, bias is not None, num_adapters=n, r=r_max, dropout=dropout, device="meta",
                              dtype=weight.dtype)
        lora_A = torch.zeros(n, r_max, K, dtype=weight.dtype, device=weight.device)
        lora_B = torch.zeros(n, N, r_max, dtype=weight.dtype, device=weight.device)
        scaling = torch.zeros(n, dtype=torch.float32, device=weight.device)
        for i, (config, weights) in enumerate(loaded):
            if name not in weights:
                continue
            a, b = weights[name]
            r = a.shape[0]
            lora_A[i, :r] = a
            lora_B[i, :, :r] = b
            alpha = _alpha(config, name)
            scaling[i] = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
        layer.weight, layer.bias = weight, bias
        layer.lora_A, layer.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
        layer.scaling = scaling
        layer.alpha = None  # per adapter: see the scaling buffer
        _set_submodule(model, name, layer)
    freeze_base(model)
    return names


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config dict, {module name: (lora_A [r, in], lora_B [out, r])}) from a PEFT-format adapter directory."""
    from safetensors.torch import load_file

    config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path} is not an adapter directory: {f} is missing")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"{path}: only LoRA adapters are supported; got peft_type {config['peft_type']!r}")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise NotImplementedError(f"{path}: adapter uses {key}={config[key]!r}, which fastlora does not support")
    if config.get("init_lora_weights") == "mica":  # a LoRA variant in PEFT, selected through the init option
        raise NotImplementedError(f"{path}: adapter uses init_lora_weights='mica', which fastlora does not support")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"{path}: adapter trains biases (bias={config['bias']!r}); fastlora does not")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_file).items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise NotImplementedError(f"{path}: tensor {key!r} is not a LoRA A/B weight (DoRA, lora_bias, "
                                      "embedding or modules_to_save adapters are not supported)")
        parts.setdefault(m["name"], {})[m["part"]] = tensor
    weights = {}
    for name, pair in parts.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: layer {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
        weights[name] = (pair["lora_A"], pair["lora_B"])
    if not weights:
        raise ValueError(f"{path}: the adapter file holds no LoRA weights")
    return config, weights


def _base_of(model, name, a, b, source):
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source}: adapter has weights for {name!r}, which is not a module of the model") from None
    if isinstance(mod, Linear):
        if mod.merged:
            raise ValueError(f"{name!r} is a merged fastlora.Linear; unmerge it before loading an adapter into it")
    elif not isinstance(mod, (nn.Linear, Linear4bit)):
        raise ValueError(f"{source}: adapter layer {name!r} is a {type(mod).__name__}; it must be an nn.Linear, "
                         "a bitsandbytes Linear4bit, a fastlora.Linear or a fastlora.Linear4bit")
    if isinstance(mod, Linear4bit) or _is_bnb_4bit(mod):  # the weight is the packed [N*K/2, 1] bytes
        N, K = mod.out_features, mod.in_features
    else:
        N, K = mod.weight.shape
    _check_pair(name, a, b, N, K, source)
    return mod


def _check_pair(name, a, b, N, K, source):
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"{source}: {name}.lora_A must have shape (r, in_features) = (r, {K}); "
                         f"got {tuple(a.shape)}")
    if b.shape != (N, a.shape[0]):
        raise ValueError(f"{source}: {name}.lora_B must have shape (out_features, r) = ({N}, {a.shape[0]}); "
                         f"got {tuple(b.shape)}")


def _alpha(config: dict, name: str) -> float:
    """alpha for layer ``name``: PEFT's ``alpha_pattern`` (key matched as a name suffix regex), else lora_alpha."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return config.get("lora_alpha", 8)


def _as_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` shell around existing parameters (``Linear.from_linear`` reads only weight and bias)."""
    shell = nn.Linear(0, 0, bias=False, device="meta")
    shell.weight, shell.bias = weight, bias
    return shell


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules`` for ``names``: the last name components when they select exactly ``names``."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    selected = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, *_SINGLE)) and any(n == s or n.endswith("." + s) for s in suffixes)]
    return suffixes if sorted(selected) == sorted(names) else sorted(names)
