"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module name>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]), module names relative to the model passed in (the model given to ``PeftModel.from_pretrained``).
``save_adapter``/``load_adapter`` move one adapter between fastlora and PEFT; ``load_adapters_grouped``
stacks several saved adapters into ``GroupedLinear`` layers for mixed-adapter batches.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections import Counter

import torch
import torch.nn as nn

from fastlora import _files
from fastlora.linear4bit import Linear4bit, _is_bnb_4bit
from fastlora.model import _check_bnb_4bit, _set_submodule, _transaction, freeze_base
from fastlora.modules import GroupedLinear, Linear, _adapter_args

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

    Atomic: both files are written beside ``path`` and replace the old ones in one step, so a crash or a failed
    write leaves the old adapter or the new one, never a mix; other files in ``path`` are kept (``fastlora._files``).
    """
    from safetensors.torch import save

    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, _SINGLE)}
    if not layers:
        raise ValueError("save_adapter found no fastlora.Linear or fastlora.Linear4bit in the model")
    dora = [name for name, mod in layers.items() if getattr(mod, "use_dora", False)]
    if dora:
        raise NotImplementedError(f"save_adapter does not write DoRA adapters yet (PEFT's magnitude keys); layers "
                                  f"{dora[:3]}{' ...' if len(dora) > 3 else ''} use DoRA")
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
    try:
        text = json.dumps(_plain(config), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapter: the config cannot be written as JSON ({e}); nothing was written") from e
    tensors = {}
    for name, mod in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().cpu().contiguous()
    files = {CONFIG_NAME: text.encode(), WEIGHTS_NAME: save(tensors, metadata={"format": "pt"})}
    _files.replace_files(path, files, name_first_out=CONFIG_NAME)
    return list(layers)


def _plain(value):
    """``value`` with numpy (and other ``numbers``) scalars as the Python int/float JSON writes; others unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


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
    plan = []  # everything is checked and every new layer built before the model changes
    for name, (a, b) in weights.items():
        plan.append((name, _base_of(model, name, a, b, path), _layer_args(config, name, a.shape[0], path), a, b))
    with _transaction(model):
        layers = {name: _loaded_layer(mod, kw, a, b) for name, mod, kw, a, b in plan}
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    freeze_base(model)
    return list(weights)


def _loaded_layer(mod: nn.Module, kw: dict, a: torch.Tensor, b: torch.Tensor) -> Linear | Linear4bit:
    """A new fastlora layer over ``mod``'s base (shared) holding adapter (a, b); ``mod`` itself is not changed."""
    if isinstance(mod, Linear4bit):  # new adapter parameters (fp32) over the same packed weight
        layer = mod._with_new_adapter(**kw)
    elif _is_bnb_4bit(mod):
        layer = Linear4bit.from_linear(mod, **kw)
    else:
        layer = Linear.from_linear(_as_linear(mod.weight, mod.bias), **kw)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return layer


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
        for path, (config, weights) in zip(paths, loaded, strict=True):
            if name in weights:
                bases[name] = _base_of(model, name, *weights[name], path)
                _layer_args(config, name, weights[name][0].shape[0], path)
        if isinstance(bases[name], Linear4bit) or _is_bnb_4bit(bases[name]):
            raise NotImplementedError(f"{name!r} has a 4-bit base: load_adapters_grouped stacks adapters over "
                                      "16/32-bit bases only (there is no grouped 4-bit layer)")
    r_max = max(a.shape[0] for _, weights in loaded for a, _ in weights.values())
    n = len(paths)
    layers = {}
    for name in names:
        weight, bias = bases[name].weight, bases[name].bias
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
        layers[name] = layer
    for name, layer in layers.items():
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
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object; got {type(config).__name__}")
    _check_config(config, config_file)
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
    if _is_bnb_4bit(mod):
        _check_bnb_4bit(name, mod)
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


def _check_config(config: dict, source: str) -> None:
    """The fields fastlora reads, as the types PEFT writes: a bad value is named with its file, not met later."""
    def number(field, value, integral=False):
        kind = numbers.Integral if integral else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            raise ValueError(f"{source}: {field} must be {'an int' if integral else 'a number'}; got {value!r}")

    for field, integral in (("lora_alpha", False), ("lora_dropout", False), ("r", True)):
        if config.get(field) is not None:
            number(field, config[field], integral)
    for field, integral in (("alpha_pattern", False), ("rank_pattern", True)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{source}: {field} must be an object of module-name patterns; got {pattern!r}")
        for key, value in pattern.items():
            number(f"{field}[{key!r}]", value, integral)
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{source}: use_rslora must be true or false; got {config['use_rslora']!r}")


def _layer_args(config: dict, name: str, r: int, source) -> dict:
    """Layer ``name``'s r, alpha, dropout and use_rslora from an adapter (r from its tensors), checked."""
    kw = dict(r=r, alpha=_alpha(config, name), dropout=config.get("lora_dropout", 0.0),
              use_rslora=config.get("use_rslora", False))
    try:
        _adapter_args(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: layer {name!r}: {e} (from {CONFIG_NAME} and the lora_A shape)") from None
    return kw


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
