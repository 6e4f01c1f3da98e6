"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module name>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]), module names relative to the model passed in (the model given to ``PeftModel.from_pretrained``).
DoRA adapters (``"use_dora": true`` in the config) add ``base_model.model.<module name>.lora_magnitude_vector``
([out]; PEFT 0.21's ``save_pretrained`` drops the ``.weight`` of its ``lora_magnitude_vector.<adapter>.weight``
parameter, as every PEFT since the DoRA refactor does, for compatibility with older files).
``save_adapter``/``load_adapter`` move one adapter between fastlora and PEFT; ``load_adapters_grouped``
stacks several saved adapters into ``GroupedLinear`` layers for mixed-adapter batches, each at its own rank, and
``add_adapters``/``remove_adapters`` load and evict them at run time.
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

from fastlora import _files, moe
from fastlora.linear4bit import _is_bnb_4bit
from fastlora.linear_fp8 import is_fp8_linear
from fastlora.model import _QUANTIZED, _SINGLE, _swap_in, _transaction, base_shape, check_base, layer_class
from fastlora.modules import GroupedLinear, Linear, _adapter_args, _adapter_dtype, _check_dropout_arg, _layout

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude: base_model.model.<name>.lora_magnitude_vector, [out]
_KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|" + MAGNITUDE + ")")
# LoraConfig fields whose non-default value changes the layer's math; fastlora implements none of them.
_UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                "trainable_token_indices": None, "use_bdlora": None,
                "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None, "velora_config": None,
                "monteclora_config": None, "use_qalora": False, "layer_replication": None}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write every ``fastlora.Linear`` / ``Linear4bit`` / ``LinearFP8`` adapter of ``model`` to directory ``path`` in
    PEFT's format (a 4-bit model's adapter loads into PEFT over the same bitsandbytes base; an FP8 model's over the
    same model in bf16 or FP8: the file does not depend on the base's format).

    The config's ``r``/``lora_alpha`` are the most common values; layers that differ get ``rank_pattern``/
    ``alpha_pattern`` entries (as PEFT writes them). ``lora_dropout`` is the most common dropout (it does not
    change saved weights). Layers with different ``use_rslora`` raise ``ValueError``. Returns the layer names.
    DoRA layers: ``"use_dora": true`` and each magnitude under ``base_model.model.<name>.lora_magnitude_vector``, as
    PEFT writes them; PEFT's config has one ``use_dora``, so a model mixing DoRA and plain layers raises
    ``ValueError`` (nothing written).

    ``fastlora.Experts`` modules (LoRA on MoE expert weights) are written as PEFT's ``target_parameters``: the config
    lists them (the shortest parameter-name suffixes that select exactly them), each projection's lora_A (E*r, in) and
    lora_B (out, r*E) under the key PEFT gives its nested ``ParamWrapper`` (``<experts>.base_layer.lora_A.weight`` for
    the inner one of two), rank and alpha patterns keyed by the parameter's full name; ``lora_dropout`` is then 0
    (PEFT refuses any other value with ``target_parameters``) and DoRA layers cannot be saved with them.

    Safe to interrupt: the files are written inside ``path`` (created as ``os.makedirs`` would; an existing folder,
    mount point or symlink is written into, never replaced) under hidden names, fsynced and renamed into place, the
    config out first and in last. A failed write raises and leaves the old adapter; a crash leaves the old adapter,
    the new one, or a folder without a config that ``load_adapter`` (and PEFT) refuse, never a mix that loads.
    Other files in ``path`` are kept (``fastlora._files``).
    """
    from safetensors.torch import save

    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, _SINGLE)}
    experts = {name: mod for name, mod in model.named_modules() if isinstance(mod, moe.Experts)}
    if not layers and not experts:
        raise ValueError("save_adapter found no fastlora.Linear, fastlora.Linear4bit, fastlora.LinearFP8 or "
                         "fastlora.Experts in the model")
    dora = [name for name, mod in layers.items() if getattr(mod, "use_dora", False)]
    if dora and len(dora) < len(layers):
        plain = [name for name in layers if name not in dora]
        raise ValueError(f"save_adapter needs all layers DoRA or none (PEFT's config has one use_dora); DoRA: "
                         f"{_some(dora)}, plain LoRA: {_some(plain)}; nothing was written")
    if dora and experts:
        raise ValueError(f"save_adapter: PEFT's target_parameters (expert adapters: {_some(list(experts))}) do not "
                         f"work with use_dora, which DoRA layers {_some(dora)} need; nothing was written")
    # every adapter as (PEFT's pattern key, r, alpha): a layer's name, or an expert weight's full parameter name
    specs = [(name, mod.r, mod.alpha) for name, mod in layers.items()]
    specs += [(f"{name}.{p}", mod.r[p], mod.alpha[p]) for name, mod in experts.items() for p in mod.targeted]
    rslora = {mod.use_rslora for mod in layers.values()}
    rslora.update(mod.use_rslora[p] for mod in experts.values() for p in mod.targeted)
    if len(rslora) > 1:
        raise ValueError("save_adapter needs one use_rslora for all layers (PEFT's config has one); got both")
    r = Counter(spec[1] for spec in specs).most_common(1)[0][0]
    alpha = Counter(spec[2] for spec in specs).most_common(1)[0][0]
    # PEFT's ParamWrapper refuses lora_dropout != 0; dropout does not change the saved weights
    dropout = 0.0 if experts else Counter(mod.dropout for mod in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": _target_modules(model, list(layers)),
        "target_parameters": _target_parameters(model, experts) if experts else None,
        "rank_pattern": {key: kr for key, kr, _ in specs if kr != r},
        "alpha_pattern": {key: ka for key, _, ka in specs if ka != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": bool(dora),
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
        if dora:
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = mod.lora_magnitude.detach().cpu().contiguous()
    for name, mod in experts.items():
        for p, key in moe.peft_keys(name, mod.targeted).items():
            tensors[f"{PREFIX}{key}.lora_A.weight"] = mod.lora_A[p].detach().cpu().contiguous()
            tensors[f"{PREFIX}{key}.lora_B.weight"] = mod.lora_B[p].detach().cpu().contiguous()
    files = {CONFIG_NAME: text.encode(), WEIGHTS_NAME: save(tensors, metadata={"format": "pt"})}
    _files.replace_files(path, files, commit=CONFIG_NAME)
    return [*layers, *experts]


def _some(names: list[str]) -> str:
    return f"{names[:3]}{' ...' if len(names) > 3 else ''}"


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


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_dtype=None) -> list[str]:
    """Load a PEFT-format LoRA adapter from directory ``path`` into ``model``; return the layer names.

    Each layer named in the file must be an ``nn.Linear`` (wrapped into a ``fastlora.Linear`` sharing its
    weight), a bitsandbytes ``Linear4bit`` (wrapped into a ``fastlora.Linear4bit`` sharing its packed weight), a
    block-scaled FP8 linear (transformers' ``FP8Linear``: a ``fastlora.LinearFP8`` sharing its weight and scales), an
    unmerged ``fastlora.Linear``, a ``fastlora.Linear4bit`` or a ``fastlora.LinearFP8`` (its adapter is replaced).
    Rank comes from the tensors, alpha from ``lora_alpha``/``alpha_pattern``, dropout and ``use_rslora`` from the
    config. Afterwards only the adapters of fastlora layers require grad (as ``inject``). A DoRA adapter
    (``"use_dora": true``) builds DoRA layers holding the file's magnitudes (over a 4-bit base:
    ``fastlora.Linear4bit(use_dora=True)``; over an FP8 one ``fastlora.LinearFP8(use_dora=True)``).
    ``lora_bias``, ``fan_in_fan_out`` and ``modules_to_save`` adapters raise
    ``NotImplementedError``. An adapter with ``target_parameters`` (PEFT's LoRA on MoE expert weights) makes each
    experts module it names (a transformers experts module or a ``fastlora.Experts``) a ``fastlora.Experts`` sharing
    its expert weights (``save_adapter`` describes the keys); a missing or misshapen expert tensor raises
    ``ValueError`` naming its key. A transaction: the files, every tensor's shape and dtype and every base are checked
    and the new layers built before any is swapped in; a failure leaves the model as it was.

    The adapters are cast to ``adapter_dtype``; None (default) is PEFT's rule (``PeftModel.from_pretrained``'s
    ``autocast_adapter_dtype=True``): fp32 over a bf16/fp16 or 4-bit base, whatever the file's dtype, the base's
    dtype over an fp32 base.
    """
    _adapter_dtype(adapter_dtype, torch.float32)
    config, weights, magnitudes = read_adapter_with_magnitudes(path, target_parameters=True)
    experts, weights = _expert_adapters(model, config, weights, path)
    plan = []  # everything is checked and every new layer built before the model changes
    for name, (a, b) in weights.items():
        kw = dict(_layer_args(config, name, a.shape[0], path), use_dora=name in magnitudes, adapter_dtype=adapter_dtype)
        plan.append((name, _base_of(model, name, a, b, path), kw, a, b, magnitudes.get(name)))
    with _transaction(model):
        layers = {name: _loaded_layer(mod, kw, a, b, m) for name, mod, kw, a, b, m in plan}
        for name, (mod, adapters) in experts.items():
            layers[name] = _loaded_experts(mod, adapters, adapter_dtype)
    _swap_in(model, layers)
    return list(layers)


def _loaded_layer(mod: nn.Module, kw: dict, a: torch.Tensor, b: torch.Tensor,
                  m: torch.Tensor | None = None) -> nn.Module:
    """A new fastlora layer over ``mod``'s base (shared) holding adapter (a, b) and, for DoRA (``kw["use_dora"]``),
    magnitude m; ``mod`` itself is not changed."""
    if isinstance(mod, _QUANTIZED):  # new adapter parameters (fp32) over the same quantised weight
        layer = mod._with_new_adapter(**kw)
    elif _is_bnb_4bit(mod) or is_fp8_linear(mod):
        layer = layer_class(mod).from_linear(mod, **kw)
    else:
        layer = Linear.from_linear(_as_linear(mod.weight, mod.bias), **kw)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        if m is not None:
            layer.lora_magnitude.copy_(m)
    return layer


def load_adapters_grouped(model: nn.Module, paths, *, dropout: float = 0.0, adapter_dtype=None) -> list[str]:
    """Stack the PEFT-format adapters in ``paths`` into ``GroupedLinear`` layers; adapter id i is ``paths[i]``.

    Every layer named in any file (an ``nn.Linear`` or unmerged ``fastlora.Linear``) becomes a ``GroupedLinear``
    with ``num_adapters=len(paths)`` sharing the base weight, each adapter stored at its own rank (a ragged stack:
    sum r_i * (in + out) values, rank 0 where adapter i lacks the layer). ``scaling[i]`` is alpha_i/r_i
    (alpha_i/sqrt(r_i) with use_rslora), 0 where adapter i lacks the layer. Run the model inside
    ``fastlora.use_adapters(model, ids)``. ``dropout`` applies to every adapter (0 for serving). DoRA folders
    (``"use_dora": true``) and plain ones mix: a layer with any DoRA adapter gets a ``lora_magnitude`` (n, out) with
    the files' magnitudes and NaN rows for the plain adapters (``grouped_lora_linear``'s convention). Returns the layer
    names; afterwards only the stacks' adapters require grad. A transaction like ``load_adapter``: everything is
    read, checked and built off the model first, so a failure leaves the model as it was. ``dropout`` outside [0, 1)
    raises ``ValueError`` before anything is read. The stacks are ``adapter_dtype``; None: fp32 over a bf16/fp16
    base (PEFT's rule, as ``load_adapter``), the base's dtype otherwise.
    """
    dropout = _check_dropout_arg(dropout)
    _adapter_dtype(adapter_dtype, torch.float32)
    paths = list(paths)
    if not paths:
        raise ValueError("load_adapters_grouped needs at least one adapter path; got none")
    loaded = [read_adapter_with_magnitudes(p) for p in paths]
    bases = _grouped_bases(model, paths, loaded, {})
    with _transaction(model):
        layers = {name: _stack(base.weight, base.bias, [_entry(c, w, name, m.get(name)) for c, w, m in loaded],
                               dropout, dtype=adapter_dtype) for name, base in bases.items()}
    _swap_in(model, layers)
    return list(layers)


def add_adapters(model: nn.Module, paths, *, dropout: float = 0.0, adapter_dtype=None) -> list[int]:
    """Load the PEFT-format adapters in ``paths`` into a grouped model while it serves; return their adapter ids.

    ``model``: one that ``load_adapters_grouped`` / ``add_adapters`` built (its ``GroupedLinear`` layers share one id
    space), or a plain model (then this is ``load_adapters_grouped`` and the ids are 0, 1, ...). Each new adapter
    takes the lowest id that ``remove_adapters`` freed, else the next new one; the other ids keep their adapters.
    Layers named in a file that are not grouped yet (an ``nn.Linear`` or unmerged ``fastlora.Linear``) become
    ``GroupedLinear`` (``dropout`` for them; the others keep theirs). Storage: every layer is rebuilt compact, each
    live adapter at its own rank (no gaps, no padding), so add/remove cycles never grow it. A transaction: all files
    are read and checked and every new layer built off the model before any is swapped in; a failure changes
    nothing. Optimizers holding the old ``lora_A``/``lora_B`` parameters must be rebuilt. ``adapter_dtype``, like
    ``dropout``, is for the layers that become grouped (None: fp32 over a bf16/fp16 base); the others keep their
    stacks' dtype. A ``dropout`` outside [0, 1) raises ``ValueError`` before anything is read.
    """
    dropout = _check_dropout_arg(dropout)
    _adapter_dtype(adapter_dtype, torch.float32)
    paths = list(paths)
    if not paths:
        raise ValueError("add_adapters needs at least one adapter path; got none")
    grouped = _grouped_layers(model)
    if not grouped:
        load_adapters_grouped(model, paths, dropout=dropout, adapter_dtype=adapter_dtype)
        return list(range(len(paths)))
    n, removed = _id_space(grouped)
    loaded = [read_adapter_with_magnitudes(p) for p in paths]
    free = sorted(removed)
    ids = []
    for _ in paths:
        ids.append(free.pop(0) if free else max([n - 1, *ids]) + 1)
    total = max(n, max(ids) + 1)
    bases = _grouped_bases(model, paths, loaded, grouped)
    with _transaction(model):
        layers = {}
        for name, base in bases.items():
            entries = _entries(grouped[name], total) if name in grouped else [None] * total
            for i, (config, weights, magnitudes) in zip(ids, loaded, strict=True):
                entries[i] = _entry(config, weights, name, magnitudes.get(name))
            old = grouped.get(name)
            layers[name] = _stack(base.weight, base.bias, entries, dropout if old is None else old.dropout,
                                  removed.difference(ids), adapter_dtype if old is None else old.lora_A.dtype)
    _swap_in(model, layers)
    return ids


def remove_adapters(model: nn.Module, ids) -> None:
    """Evict adapters ``ids`` from every ``GroupedLinear`` of ``model`` (built by ``load_adapters_grouped`` /
    ``add_adapters``). The other ids keep their adapters; a removed id used again raises ``ValueError`` (with the
    ids check on: ``use_adapters``/``forward`` default) until ``add_adapters`` reuses it; unchecked it adds nothing
    (rank 0, scaling 0), never the evicted weights. Every layer is rebuilt compact (the evicted rows are freed; the
    id slot stays, one offset and one scale, for reuse). Bad ids (not ints, out of range, already removed, repeated)
    raise before anything changes.
    """
    grouped = _grouped_layers(model)
    if not grouped:
        raise ValueError("remove_adapters found no fastlora.GroupedLinear in the model")
    n, removed = _id_space(grouped)
    ids = list(ids) if not isinstance(ids, int) else [ids]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"adapter ids must be ints; got {i!r}")
        if not 0 <= i < n:
            raise IndexError(f"adapter id {i} is out of range: the model has ids 0..{n - 1}")
        if i in removed:
            raise ValueError(f"adapter id {i} was already removed")
    if len(set(ids)) != len(ids):
        raise ValueError(f"ids must not repeat; got {ids}")
    layers = {}
    for name, layer in grouped.items():
        entries = _entries(layer, n)
        for i in ids:
            entries[i] = None
        layers[name] = _stack(layer.weight, layer.bias, entries, layer.dropout, removed.union(int(i) for i in ids),
                              layer.lora_A.dtype)
    _swap_in(model, layers)


def _grouped_layers(model: nn.Module) -> dict[str, GroupedLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, GroupedLinear)}


def _id_space(grouped: dict[str, GroupedLinear]) -> tuple[int, frozenset]:
    """(adapter ids, removed ids) that every grouped layer of a model shares."""
    spaces = {(layer.num_adapters, layer.removed) for layer in grouped.values()}
    if len(spaces) > 1:
        raise ValueError("the model's GroupedLinear layers disagree on their adapter ids (num_adapters / removed): "
                         "they were not built together by load_adapters_grouped / add_adapters")
    return spaces.pop()


def _grouped_bases(model, paths, loaded, grouped) -> dict[str, nn.Module]:
    """{layer name: its base module} for every layer named in a file (``loaded``: what
    ``read_adapter_with_magnitudes`` returned for each path) or already grouped, each file's tensors checked against
    its layer, before anything is built."""
    files = {name for _, weights, _ in loaded for name in weights}
    names = [name for name, _ in model.named_modules() if name in files or name in grouped]
    missing = files.difference(names)
    if missing:
        raise ValueError(f"adapters have weights for {sorted(missing)}, which are not modules of the model")
    bases = {}
    for name in names:
        for path, (config, weights, _) in zip(paths, loaded, strict=True):
            if name not in weights:
                continue
            if name in grouped:
                _check_pair(name, *weights[name], grouped[name].out_features, grouped[name].in_features, path)
            else:
                bases[name] = _base_of(model, name, *weights[name], path)
            _layer_args(config, name, weights[name][0].shape[0], path)
        if name in grouped:
            bases[name] = grouped[name]
        elif isinstance(bases[name], _QUANTIZED) or _is_bnb_4bit(bases[name]) or is_fp8_linear(bases[name]):
            raise NotImplementedError(f"{name!r} has a quantised (4-bit or FP8) base: grouped adapters stack over "
                                      "16/32-bit bases only (there is no grouped quantised layer)")
    return bases


def _entry(config: dict, weights: dict, name: str, magnitude: torch.Tensor | None = None):
    """(lora_A, lora_B, scaling, magnitude) of layer ``name`` in one adapter file, or None if the file lacks the layer.
    ``magnitude``: the layer's DoRA magnitude [out] from that file, or None for a plain LoRA adapter (what loading a
    DoRA file passes; ``_stack`` keeps the rows in step with the adapters)."""
    if name not in weights:
        return None
    a, b = weights[name]
    scaling = _adapter_args(a.shape[0], _alpha(config, name), 0.0, config.get("use_rslora", False))[4]  # checked
    return a, b, scaling, magnitude


def _entries(layer: GroupedLinear, total: int) -> list:
    """A grouped layer's adapters as ``_entry`` tuples (None: rank 0), padded with None to ``total`` ids."""
    scaling = layer.scaling.tolist()
    out = [(*layer.adapter(g), scaling[g], layer.magnitude(g)) if layer.ranks[g] else None
           for g in range(layer.num_adapters)]
    return out + [None] * (total - len(out))


def _stack(weight, bias, entries: list, dropout: float, removed=frozenset(), dtype=None) -> GroupedLinear:
    """A new ``GroupedLinear`` over ``weight``/``bias`` with adapter i = entries[i] (None: rank 0), compact, its stacks
    in ``dtype`` (None: fp32 over a 16-bit weight, else its dtype). The stack has a magnitude (n, out) when some entry
    has one (DoRA), its other rows NaN (plain adapters, empty slots)."""
    N, K = weight.shape
    ranks = [0 if e is None else e[0].shape[0] for e in entries]
    starts, total = _layout(ranks)
    kw = dict(dtype=_adapter_dtype(dtype, weight.dtype), device=weight.device)
    lora_A, lora_B = torch.zeros(total, K, **kw), torch.zeros(N, total, **kw)
    scaling = torch.zeros(len(entries), dtype=torch.float32, device=weight.device)
    dora = any(e is not None and e[3] is not None for e in entries)
    magnitude = torch.full((len(entries), N), float("nan"), **kw) if dora else None
    with torch.no_grad():
        for i, (o, e) in enumerate(zip(starts, entries, strict=True)):
            if e is None:
                continue
            a, b, s, m = e
            lora_A[o:o + a.shape[0]] = a
            lora_B[:, o:o + a.shape[0]] = b
            scaling[i] = s
            if m is not None:
                magnitude[i] = m
    return GroupedLinear.from_stack(weight, bias, lora_A, lora_B, ranks, scaling, dropout=dropout, removed=removed,
                                    magnitude=magnitude)


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config dict, {module name: (lora_A [r, in], lora_B [out, r])}) from a PEFT-format LoRA adapter directory.

    A DoRA adapter (``"use_dora": true``) raises ``NotImplementedError``: this reader's callers would drop its
    magnitudes. ``read_adapter_with_magnitudes`` reads both kinds.
    """
    config, weights, magnitudes = read_adapter_with_magnitudes(path)
    if magnitudes:
        raise NotImplementedError(f"{path} is a DoRA adapter (use_dora: true), which this caller does not support "
                                  "(read_adapter returns no magnitudes; see read_adapter_with_magnitudes)")
    return config, weights


def read_adapter_with_magnitudes(path: str | os.PathLike, *, target_parameters: bool = False) -> tuple[
        dict, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(config, {module name: (lora_A [r, in], lora_B [out, r])}, {module name: magnitude [out]}) from a PEFT-format
    LoRA or DoRA adapter directory: ``read_adapter`` plus DoRA's magnitudes.

    The magnitudes are ``{}`` for a plain LoRA adapter; for a DoRA one (``"use_dora": true``) they name exactly the
    layers of the weights, each a floating-point tensor of shape (out_features,) = (lora_B.shape[0],), in the file's
    dtype. Anything else (a missing magnitude, one in a non-DoRA file, a bad shape or dtype) raises ``ValueError``
    naming the file, the key and the shapes. Nothing here looks at a model.

    An adapter with ``target_parameters`` (expert weights) raises ``NotImplementedError`` unless ``target_parameters``
    is True (``load_adapter``'s call); then its expert tensors come back under PEFT's module names
    (``<experts>.base_layer`` ...) for ``load_adapter`` to sort out.
    """
    from safetensors.torch import load_file

    config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            left = _files.leftovers(path, (CONFIG_NAME, WEIGHTS_NAME))
            if left:
                raise FileNotFoundError(f"{path}: a save_adapter into it did not finish: {f} is missing (left behind: "
                                        f"{left}; the '.old' files are the previous adapter's). Save it again")
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
    if config.get("target_parameters"):
        if not target_parameters:
            raise NotImplementedError(f"{path}: adapter uses target_parameters={config['target_parameters']!r} (LoRA "
                                      "on MoE expert weights), which only fastlora.load_adapter supports")
        if config.get("use_dora", False):
            raise NotImplementedError(f"{path}: adapter uses target_parameters with use_dora, which PEFT cannot "
                                      "build (its ParamWrapper refuses DoRA)")
    if config.get("init_lora_weights") == "mica":  # a LoRA variant in PEFT, selected through the init option
        raise NotImplementedError(f"{path}: adapter uses init_lora_weights='mica', which fastlora does not support")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"{path}: adapter trains biases (bias={config['bias']!r}); fastlora does not")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_file).items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise NotImplementedError(f"{path}: tensor {key!r} is not a LoRA A/B weight or a DoRA magnitude "
                                      "(lora_bias, embedding or modules_to_save adapters are not supported)")
        parts.setdefault(m["name"], {})[m["part"] or MAGNITUDE] = tensor
    weights, magnitudes = {}, {}
    dora = config.get("use_dora", False)
    for name, pair in parts.items():
        if not {"lora_A", "lora_B"} <= set(pair):
            raise ValueError(f"{path}: layer {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
        weights[name] = (pair["lora_A"], pair["lora_B"])
        key = f"{PREFIX}{name}.{MAGNITUDE}"
        if MAGNITUDE not in pair:
            if dora:
                raise ValueError(f"{weights_file}: {key} is missing: {CONFIG_NAME} says use_dora: true, so every "
                                 "layer needs its DoRA magnitude")
            continue
        m, out = pair[MAGNITUDE], pair["lora_B"].shape[0]
        if not dora:
            raise ValueError(f"{weights_file}: {key} is a DoRA magnitude but {CONFIG_NAME} says use_dora: false")
        if not m.is_floating_point():
            raise ValueError(f"{weights_file}: {key} must be a floating-point tensor; got {m.dtype}")
        if m.shape != (out,):
            raise ValueError(f"{weights_file}: {key} must have shape (out_features,) = ({out},) as lora_B "
                             f"{tuple(pair['lora_B'].shape)}; got {tuple(m.shape)}")
        magnitudes[name] = m
    if not weights:
        raise ValueError(f"{path}: the adapter file holds no LoRA weights")
    return config, weights, magnitudes


def _base_of(model, name, a, b, source):
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source}: adapter has weights for {name!r}, which is not a module of the model") from None
    if isinstance(mod, Linear):
        if mod.merged:
            raise ValueError(f"{name!r} is a merged fastlora.Linear; unmerge it before loading an adapter into it")
    elif not isinstance(mod, (nn.Linear, *_QUANTIZED)) and not is_fp8_linear(mod):
        raise ValueError(f"{source}: adapter layer {name!r} is a {type(mod).__name__}; it must be an nn.Linear, "
                         "a bitsandbytes Linear4bit, an FP8 linear or a fastlora.Linear / Linear4bit / LinearFP8")
    if not isinstance(mod, _SINGLE):
        check_base(name, mod)
    _check_pair(name, a, b, *base_shape(mod), source)
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
    for field in ("use_rslora", "use_dora"):
        if not isinstance(config.get(field, False), bool):
            raise ValueError(f"{source}: {field} must be true or false; got {config[field]!r}")


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


def _target_parameters(model: nn.Module, experts: dict) -> list[str]:
    """PEFT ``target_parameters`` for the adapted expert weights of ``experts`` ({name: fastlora.Experts}): the
    shortest name suffixes (one component, then two, ...) that select exactly those parameters of the model."""
    keys = sorted(f"{name}.{p}" for name, mod in experts.items() for p in mod.targeted)
    every = [f"{n}.{p}" for n, _, p in moe.base_parameters(model) if n]
    for k in range(1, max(key.count(".") for key in keys) + 1):
        suffixes = sorted({".".join(key.split(".")[-k:]) for key in keys})
        if sorted(key for key in every if moe.parameter_matches(key, suffixes)) == keys:
            return suffixes
    return keys


def _expert_adapters(model: nn.Module, config: dict, weights: dict, source) -> tuple[dict, dict]:
    """Split an adapter file's weights ({PEFT module name: (lora_A, lora_B)}) into expert adapters
    ({experts module name: (module, {projection: (lora_A, lora_B, layer args)})}) and the others (unchanged), checking
    every expert tensor's shape. PEFT names projection i of the n that ``target_parameters`` selects in a module
    ``<module>`` + ``.base_layer`` * (n - 1 - i) (``moe.peft_keys``)."""
    targets = config.get("target_parameters") or []
    if not targets:
        return {}, weights
    found, rest = {}, {}
    for key, pair in weights.items():
        name, depth = key, 0
        while name.endswith("." + moe.BASE_LAYER):
            name, depth = name[:-len(moe.BASE_LAYER) - 1], depth + 1
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or not moe.is_experts(mod):
            rest[key] = pair
            continue
        found.setdefault(name, (mod, {}))[1][depth] = (key, pair)
    out = {}
    for name, (mod, by_depth) in found.items():
        moe.check_experts(name, mod)
        targeted = [p for p in moe.projections(mod) if moe.parameter_matches(f"{name}.{p}", targets)]
        keys = moe.peft_keys(name, targeted)
        for depth, (key, _) in by_depth.items():
            if depth >= len(targeted):
                raise ValueError(f"{source}: {PREFIX}{key}.lora_A.weight is not an expert adapter PEFT would make: "
                                 f"target_parameters {targets} select {len(targeted)} of {name!r}'s projections "
                                 f"{targeted}")
        adapters = {}
        for i, p in enumerate(targeted):
            depth = len(targeted) - 1 - i
            if depth not in by_depth:
                raise ValueError(f"{source}: {PREFIX}{keys[p]}.lora_A.weight ({name}.{p}, selected by "
                                 f"target_parameters {targets}) is missing")
            a, b = by_depth[depth][1]
            E, N, K = moe.expert_shape(mod, p)
            key = f"{PREFIX}{keys[p]}"
            if a.dim() != 2 or a.shape[1] != K or a.shape[0] % E or not a.shape[0]:
                raise ValueError(f"{source}: {key}.lora_A.weight ({name}.{p}) must have shape (experts * r, "
                                 f"in_features) = ({E} * r, {K}); got {tuple(a.shape)}")
            r = a.shape[0] // E
            if b.shape != (N, r * E):
                raise ValueError(f"{source}: {key}.lora_B.weight ({name}.{p}) must have shape (out_features, r * "
                                 f"experts) = ({N}, {r * E}); got {tuple(b.shape)}")
            kw = _layer_args(config, f"{name}.{p}", r, source)
            adapters[p] = (a, b, (kw["r"], kw["alpha"], kw["use_rslora"]))
        out[name] = (mod, adapters)
    return out, rest


def _loaded_experts(mod: nn.Module, adapters: dict, adapter_dtype) -> moe.Experts:
    """A new ``fastlora.Experts`` over ``mod``'s experts (shared) holding ``adapters``; ``mod`` is not changed."""
    layer = moe.Experts(mod, {p: spec for p, (_, _, spec) in adapters.items()}, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        for p, (a, b, _) in adapters.items():
            layer.lora_A[p].copy_(a)
            layer.lora_B[p].copy_(b)
    return layer


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules`` for ``names``: the last name components when they select exactly ``names``."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    selected = [n for n, m in model.named_modules()
                if (isinstance(m, (nn.Linear, *_SINGLE)) or is_fp8_linear(m))
                and any(n == s or n.endswith("." + s) for s in suffixes)]
    return suffixes if sorted(selected) == sorted(names) else sorted(names)
