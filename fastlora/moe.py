"""``Experts``: LoRA on the 3-D expert weights of a transformers-5 mixture-of-experts block (PEFT's
``target_parameters``), the rank-r term computed inside each expert's grouped GEMM.

transformers 5 stores the experts of Qwen3-MoE, Mixtral, gpt-oss, DeepSeek and most other MoE families as one module
per block holding 3-D parameters and declares their layout with ``@use_experts_implementation``: ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I), or, with ``is_transposed`` (gpt-oss), (E, H, 2I) and (E, I, H); ``has_bias``
adds ``gate_up_proj_bias`` (E, 2I) and ``down_proj_bias`` (E, H); ``has_gate=False`` has ``up_proj`` instead of
``gate_up_proj``. Its forward is ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.

An ``Experts`` module replaces it, keeps that forward contract and shares its parameters (same ``Parameter``
objects, same state-dict keys). Each targeted projection holds one adapter per expert in PEFT's ``ParamWrapper``
layout, so PEFT's parameters are shared as they are and saved as PEFT saves them:
``lora_A[name]`` (E*r, in), expert e's A_e = rows e*r:(e+1)*r; ``lora_B[name]`` (out, r*E), B_e = columns j*E + e.
Expert e of that projection computes W_e x + b_e + s B_e A_e x with s = alpha / r (alpha / sqrt(r) with rsLoRA).

The routing is done once per block (docs/moe.md): ids = top_k_index flattened (T*k rows, token t's j-th choice at
row t*k + j; the expert-parallel sentinel id E becomes -1, an all-zero row), one ``AdapterBatch`` for both
projections, the gate_up call, the family's own activation (the experts module's ``_apply_gate``), the down call,
the top-k weights applied and the k rows of each token summed.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from fastlora import functional
from fastlora.grouping import AdapterBatch
from fastlora.modules import _adapter_args, _adapter_dtype

BASE_LAYER = "base_layer"  # PEFT nests one ParamWrapper per targeted parameter; inner ones are ``.base_layer``


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module with 3-D expert weights (``@use_experts_implementation``)
    or a fastlora ``Experts``."""
    return isinstance(module, Experts) or (
        hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "has_bias")
        and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def projections(module: nn.Module) -> list[str]:
    """The expert projections of an experts module (or ``Experts``), in its parameter order (PEFT nests its wrappers
    in that order)."""
    names = {"gate_up_proj" if module.has_gate else "up_proj", "down_proj"}
    return [n for n, _ in module.named_parameters(recurse=False) if n in names]


def check_experts(name: str, module: nn.Module) -> None:
    """Raise, naming the module, unless ``Experts`` can wrap the experts module at ``name``."""
    if isinstance(module, Experts):
        return
    cls = type(module)
    if not is_experts(module):
        raise ValueError(f"{name!r} is a {cls.__name__}, not a transformers experts module with 3-D expert weights "
                         "(declared by @use_experts_implementation)")
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(f"{name!r}: {cls.__name__} normalises each expert's output (has_post_expert_norm); "
                                  "fastlora's experts do not")
    shapes = {}
    for p in projections(module):
        w = getattr(module, p)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name}.{p} must be a 3-D tensor (experts, ...); got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if not w.is_floating_point() or w.element_size() < 2:
            raise NotImplementedError(f"{name}.{p} is a {w.dtype} tensor; fastlora's experts need 16/32-bit weights")
        shapes[p] = expert_shape(module, p)
    E = getattr(module, "num_experts", shapes["down_proj"][0])
    up = "gate_up_proj" if module.has_gate else "up_proj"
    (e1, n1, k1), (e2, n2, k2) = shapes[up], shapes["down_proj"]
    width = 2 * k2 if module.has_gate else k2
    if e1 != E or e2 != E or n1 != width or k1 != n2:
        raise ValueError(f"{name!r}: {up} (experts, out, in) = {shapes[up]} and down_proj = {shapes['down_proj']} do "
                         f"not fit num_experts = {E} (need ({E}, {'2 * ' if module.has_gate else ''}I, H) and "
                         f"({E}, H, I))")
    if module.has_bias:
        for p in (up, "down_proj"):
            b = getattr(module, f"{p}_bias", None)
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != shapes[p][:2]:
                raise ValueError(f"{name}.{p}_bias must have shape (experts, out_features) = {shapes[p][:2]}; got "
                                 f"{tuple(b.shape) if isinstance(b, torch.Tensor) else b!r}")


def expert_shape(module: nn.Module, projection: str) -> tuple[int, int, int]:
    """(E, out_features, in_features) of an expert projection, whatever its storage layout."""
    E, d1, d2 = getattr(module, projection).shape
    return (E, d2, d1) if module.is_transposed else (E, d1, d2)


def parameter_matches(key: str, targets: list[str]) -> bool:
    """PEFT's ``target_parameters`` rule: the parameter's full name equals a target or ends with "." + it."""
    return any(key == t or key.endswith("." + t) for t in targets)


def match_parameters(model: nn.Module, target_parameters) -> dict[str, list[str]]:
    """{experts module name: [its targeted projections, in parameter order]} for PEFT's ``target_parameters``.

    A matched parameter that is not an expert projection of an experts module (a bias, a router weight, a 2-D
    parameter) raises ``NotImplementedError``; a selection that matches nothing raises ``ValueError``.
    """
    if isinstance(target_parameters, str) or not all(isinstance(t, str) for t in target_parameters):
        raise TypeError(f"target_parameters must be a list of parameter names; got {target_parameters!r}")
    targets = list(target_parameters)
    if not targets:
        raise ValueError("target_parameters must name at least one parameter; got []")
    found = {}
    for name, mod, p in base_parameters(model):
        if not parameter_matches(f"{name}.{p}" if name else p, targets):
            continue
        if not name:
            raise ValueError(f"target_parameters {targets} matched {p!r} on the model itself; only parameters "
                             "of its submodules can be targeted")
        if isinstance(mod, Experts):
            raise ValueError(f"target_parameters {targets} matched {name}.{p}, whose module is already a "
                             "fastlora.Experts")
        if not is_experts(mod) or p not in projections(mod):
            raise NotImplementedError(f"target_parameters {targets} matched {name}.{p}, which is not the 3-D "
                                      "gate_up_proj / up_proj / down_proj of a transformers experts module; "
                                      "fastlora adapts only those")
        found.setdefault(name, []).append(p)
    if not found:
        raise ValueError(f"target_parameters {targets} matched no expert weight in the model")
    for name in found:
        check_experts(name, model.get_submodule(name))
    return found


def base_parameters(model: nn.Module):
    """(module name, module, parameter name) of every parameter PEFT's ``target_parameters`` can see: the model's own,
    not the adapters fastlora added (``Experts``' ``lora_A``/``lora_B`` dicts)."""
    adapters = {id(d) for mod in model.modules() if isinstance(mod, Experts) for d in (mod.lora_A, mod.lora_B)}
    for name, mod in model.named_modules():
        if id(mod) not in adapters:
            for p, _ in mod.named_parameters(recurse=False):
                yield name, mod, p


def peft_keys(name: str, targeted: list[str]) -> dict[str, str]:
    """{projection: the module name PEFT's adapter file gives its adapter}: PEFT wraps the targeted parameters in
    parameter order, the first innermost, so projection i of n is ``name`` + ``.base_layer`` * (n - 1 - i)."""
    n = len(targeted)
    return {p: name + f".{BASE_LAYER}" * (n - 1 - i) for i, p in enumerate(targeted)}


class Experts(nn.Module):
    """LoRA on the expert weights of a transformers experts module; same forward contract, shared parameters.

    ``base``: the experts module (``Qwen3MoeExperts``, ``MixtralExperts``, ``GptOssExperts``, ...) or an ``Experts``
    (its adapters are not taken); its expert weights and biases become this module's parameters under the same names
    (the same objects: no copy). ``.base`` keeps a shallow copy of the experts module without its parameters, for its
    activation (``_apply_gate``, e.g. gpt-oss's clamped SwiGLU, called as is): nothing but this module refers to the
    weights, so replacing them (FSDP2 sharding, ``load_state_dict(assign=True)``) leaves no stale copy alive.
    ``adapters``: {projection: (r, alpha, use_rslora)} for the targeted projections (``gate_up_proj``/``up_proj``,
    ``down_proj``); an untargeted one runs the base weight alone. New adapters are PEFT's: ``lora_A``
    Kaiming-uniform, ``lora_B`` zero, in ``adapter_dtype`` (None: fp32 over a 16-bit base, else the base's dtype).
    ``check_ids`` (default True): the forward checks top_k_index's range (one host read per block); False skips it
    (CUDA graphs), out-of-range ids being then undefined behaviour.
    """

    def __init__(self, base: nn.Module, adapters: dict, *, adapter_dtype=None):
        super().__init__()
        if isinstance(base, Experts):
            host = base.base
        else:
            check_experts(type(base).__name__, base)
            host = copy.copy(base)
            host.__dict__["_parameters"] = {}  # the activation's attributes without the weights
        names = projections(base)
        unknown = sorted(set(adapters).difference(names))
        if not adapters or unknown:
            raise ValueError(f"adapters must name some of the projections {names}; got {sorted(adapters)}")
        object.__setattr__(self, "base", host)  # not a submodule: it holds no parameters
        self.num_experts = expert_shape(base, "down_proj")[0]
        self.has_gate, self.has_bias = base.has_gate, base.has_bias
        self.is_transposed = base.is_transposed
        self.check_ids = True
        for p, param in base.named_parameters(recurse=False):  # an Experts' adapters are in submodules: not here
            self.register_parameter(p, param)
        self.r, self.alpha, self.use_rslora, self.scaling = {}, {}, {}, {}
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for p in names:
            if p not in adapters:
                continue
            r, alpha, use_rslora = adapters[p]
            self.r[p], self.alpha[p], _, self.use_rslora[p], self.scaling[p] = _adapter_args(r, alpha, 0.0, use_rslora)
            E, N, K = expert_shape(base, p)
            w = getattr(base, p)
            kw = dict(device=w.device, dtype=_adapter_dtype(adapter_dtype, w.dtype))
            self.lora_A[p] = nn.Parameter(torch.empty(E * self.r[p], K, **kw))
            self.lora_B[p] = nn.Parameter(torch.zeros(N, self.r[p] * E, **kw))
            nn.init.kaiming_uniform_(self.lora_A[p], a=math.sqrt(5))  # PEFT's init of the (E*r, in) weight

    @property
    def targeted(self) -> list[str]:
        """The projections holding adapters, in parameter order."""
        return [p for p in projections(self) if p in self.lora_A]

    def set_adapter(self, projection: str, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float) -> None:
        """Use ``lora_A`` (E*r, in) / ``lora_B`` (out, r*E) themselves (PEFT's parameters, no copy) as the adapter of
        ``projection``, r taken from their shapes; ``alpha`` is left as it is, ``scaling`` replaces the scale."""
        if projection not in self.lora_A:
            raise ValueError(f"projection must be one of the adapted projections {self.targeted}; got {projection!r}")
        E, N, K = expert_shape(self, projection)
        if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] % E or not lora_A.shape[0]:
            raise ValueError(f"{projection}.lora_A must have shape (experts * r, in_features) = ({E} * r, {K}); got "
                             f"{tuple(lora_A.shape)}")
        r = lora_A.shape[0] // E
        if tuple(lora_B.shape) != (N, r * E):
            raise ValueError(f"{projection}.lora_B must have shape (out_features, r * experts) = ({N}, {r * E}); got "
                             f"{tuple(lora_B.shape)}")
        self.lora_A[projection], self.lora_B[projection] = lora_A, lora_B
        self.r[projection], self.scaling[projection] = r, scaling

    def expert_adapter(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) of ``projection``: views of ``lora_A``/``lora_B``, no copy."""
        E, N, K = expert_shape(self, projection)
        r = self.r[projection]
        return self.lora_A[projection].view(E, r, K), self.lora_B[projection].view(N, r, E).permute(2, 0, 1)

    def _project(self, projection: str, x: torch.Tensor, ids: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        w = getattr(self, projection)
        weight = w.transpose(1, 2) if self.is_transposed else w  # [E, out, in]: a view, read through its strides
        bias = getattr(self, f"{projection}_bias") if self.has_bias else None
        if projection in self.lora_A:
            a, b = self.expert_adapter(projection)
            s = self.scaling[projection]
        else:  # base only: a zero rank-1 adapter, scaled by 0
            E, N, K = weight.shape
            a, b, s = x.new_zeros(E, 1, K), x.new_zeros(E, N, 1), 0.0
        return functional.grouped_lora_linear(x, weight, bias, a, b, s, ids, check_ids=False, batch=batch)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H]; top_k_index [T, k] (ids in [0, E], E: a token's slot held by another rank under
        expert parallelism, which adds nothing); top_k_weights [T, k]. Returns [T, H] in hidden_states' dtype."""
        E = self.num_experts
        H = expert_shape(self, "down_proj")[1]
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
            raise ValueError(f"hidden_states must have shape (tokens, hidden) = (T, {H}); got "
                             f"{tuple(getattr(hidden_states, 'shape', ()))}")
        T = hidden_states.shape[:-1].numel()
        if top_k_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"top_k_index must be int32 or int64; got {top_k_index.dtype}")
        if top_k_index.dim() < 1 or top_k_index.shape[:-1].numel() != T:
            raise ValueError(f"top_k_index must have shape (tokens, top_k) = ({T}, k); got {tuple(top_k_index.shape)}")
        k = top_k_index.shape[-1]
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}; got "
                             f"{tuple(top_k_weights.shape)}")
        ids = top_k_index.reshape(-1)
        if self.check_ids and ids.numel() and not torch.compiler.is_compiling():
            bad = (ids < 0) | (ids > E)
            if bool(bad.any()):
                raise IndexError(f"top_k_index must lie in [0, {E}] for {E} experts ({E}: another rank's expert); "
                                 f"got {int(ids[bad.nonzero()[0, 0]])}")
        ids = torch.where(ids == E, -1, ids)  # an expert-parallel sentinel: a zero row
        batch = AdapterBatch.build(ids, E, check_ids=False)
        x = hidden_states.reshape(T, H).repeat_interleave(k, dim=0)  # row t*k + j: token t, its j-th expert
        up = "gate_up_proj" if self.has_gate else "up_proj"
        h = self._project(up, x, ids, batch)
        h = self.base._apply_gate(h) if self.has_gate else self.base.act_fn(h)
        y = self._project("down_proj", h, ids, batch)
        y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
        return y.view(T, k, H).sum(dim=1).reshape(hidden_states.shape).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        parts = [f"{p}: r={self.r[p]}, alpha={self.alpha[p]}" for p in self.targeted]
        return f"{type(self.base).__name__}, experts={self.num_experts}, " + "; ".join(parts)
