"""LoRA on MoE expert weights at model level (issue 43, items 2 and 3): ``fastlora.Experts`` against PEFT's
``target_parameters`` (logits, gradients, SGD step, adapter files both ways), against a float64 merged-weight oracle
(routing edge cases), no E*out*in tensor, and the refusals."""

import copy
import json

import pytest
import torch
from tiny import MOE_FAMILIES, logits_and_grads, randomize_lora_B, tiny_moe, tokens
from tolerance import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import moe

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERTS = "model.layers.0.mlp.experts"


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    kw = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": TARGETS, **kw}
    return get_peft_model(model, LoraConfig(**kw))


def _saved(path):
    from safetensors.torch import load_file

    with open(path / "adapter_config.json") as f:
        return json.load(f), load_file(path / "adapter_model.safetensors")


def _assert_same_files(a, b, fields=("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")):
    """Two adapter folders hold the same tensors under the same keys and the same config ``fields``."""
    (ca, ta), (cb, tb) = _saved(a), _saved(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert_close(ta[key], tb[key], torch.float32, key)
    for field in fields:
        assert ca.get(field) == cb.get(field), field


def _lora_effect(model, ids, logits):
    """The adapters must move the logits well beyond the tolerance, or the comparisons could not fail."""
    with fastlora_disabled(model):
        base = model(ids).logits
    assert (logits - base).norm() > 1e-2 * base.norm()


class fastlora_disabled:
    """Scale every fastlora adapter by 0 inside the block (the base model alone)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = []
        for mod in self.model.modules():
            if isinstance(mod, fastlora.Experts):
                self.saved.append((mod, dict(mod.scaling)))
                mod.scaling = {p: 0.0 for p in mod.scaling}
            elif isinstance(mod, fastlora.Linear):
                self.saved.append((mod, mod.scaling))
                mod.scaling = 0.0

    def __exit__(self, *exc):
        for mod, s in self.saved:
            mod.scaling = s


# ---------------------------------------------------------------------------------------------- from_peft


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_from_peft_matches_peft(family, tmp_path):
    """Same logits, gradients and trainable parameters as PEFT's target_parameters; PEFT's parameters shared; one SGD
    step on each side saves the same adapter."""
    pm = _peft(tiny_moe(family, layers=1))
    randomize_lora_B(pm)
    ids = tokens()
    ref = copy.deepcopy(pm)
    out_peft, grads_peft = logits_and_grads(pm, ids)
    grads_peft = {id(p): p.grad.clone() for p in pm.parameters() if p.requires_grad}
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    wrappers = pm.base_model.model.model.layers[0].mlp.experts
    peft_A = wrappers.base_layer.lora_A["default"].weight  # the inner wrapper: gate_up_proj

    model = fastlora.from_peft(pm)
    layer = model.get_submodule(EXPERTS)
    assert isinstance(layer, fastlora.Experts) and layer.targeted == ["gate_up_proj", "down_proj"]
    assert layer.lora_A["gate_up_proj"] is peft_A and layer.gate_up_proj is wrappers.base_layer.base_layer.gate_up_proj
    assert layer.scaling == {"gate_up_proj": 2.0, "down_proj": 2.0}
    out, _ = logits_and_grads(model, ids)
    assert_close(out, out_peft, torch.float32, "logits")
    _lora_effect(model, ids, out)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    grads = {id(p): p.grad for p in model.parameters() if p.requires_grad}
    assert grads.keys() == grads_peft.keys()
    for key in grads:
        assert_close(grads[key], grads_peft[key], torch.float32, f"grad of parameter {key}")

    before = peft_A.detach().clone()
    for m in (model, ref):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        logits_and_grads(m, ids)
        opt.step()
    assert (peft_A - before).norm() > 1e-3 * before.norm()  # the step moved the shared PEFT parameter
    fastlora.save_adapter(model, tmp_path / "fastlora")
    ref.save_pretrained(tmp_path / "peft")
    _assert_same_files(tmp_path / "fastlora", tmp_path / "peft")


def test_from_peft_rank_and_alpha_patterns_and_one_projection(tmp_path):
    """Per-projection rank/alpha (PEFT's patterns on the parameter's full name) and a model targeting down_proj only
    (PEFT's key without base_layer), converted and saved as PEFT saves them."""
    from peft import PeftModel

    pm = _peft(tiny_moe("qwen3_moe", layers=2), target_modules=[], target_parameters=["down_proj"],
               rank_pattern={"layers.1.mlp.experts.down_proj": 3}, alpha_pattern={"layers.0.mlp.experts.down_proj": 8})
    randomize_lora_B(pm)
    ids = tokens()
    ref = copy.deepcopy(pm)
    out_peft = pm(ids).logits
    model = fastlora.from_peft(pm)
    l0, l1 = model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts
    assert (l0.r, l0.alpha, l0.scaling) == ({"down_proj": 2}, {"down_proj": 8}, {"down_proj": 4.0})
    assert (l1.r, l1.alpha) == ({"down_proj": 3}, {"down_proj": 4})
    assert_close(model(ids).logits, out_peft, torch.float32, "logits")
    fastlora.save_adapter(model, tmp_path / "fastlora")
    ref.save_pretrained(tmp_path / "peft")
    _assert_same_files(tmp_path / "fastlora", tmp_path / "peft", fields=("use_rslora", "target_modules"))
    config = _saved(tmp_path / "fastlora")[0]  # the same ranks and alphas, written as fastlora's patterns
    assert (config["target_modules"], config["target_parameters"]) == ([], ["down_proj"])
    loaded = PeftModel.from_pretrained(tiny_moe("qwen3_moe", layers=2), tmp_path / "fastlora")
    assert_close(loaded(ids).logits, out_peft, torch.float32, "PEFT over fastlora's file")


def test_from_peft_refuses_merged_and_non_expert_parameters():
    pm = _peft(tiny_moe("mixtral", layers=1))
    pm.base_model.model.model.layers[0].mlp.experts.merge()
    with pytest.raises(NotImplementedError, match=r"ParamWrapper 'model.layers.0.mlp.experts'.*merged"):
        fastlora.from_peft(pm)
    pm = _peft(tiny_moe("mixtral", layers=1), target_modules=[], target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(NotImplementedError, match=r"'model.layers.0.self_attn.q_proj'.*wraps a Linear"):
        fastlora.from_peft(pm)


# ------------------------------------------------------------------------------------- inject, save, load


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_inject_save_load_against_peft(family, tmp_path):
    """inject builds PEFT's adapter shapes and init; PEFT loads what fastlora saves (same logits) and fastlora loads
    what PEFT saves (same logits, and saving it again gives PEFT's file)."""
    from peft import PeftModel

    base = tiny_moe(family, layers=1)
    ids = tokens()
    base_out = base(ids).logits
    pm = _peft(copy.deepcopy(base))
    model = copy.deepcopy(base)
    names = fastlora.inject(model, ["q_proj"], target_parameters=TARGETS, r=2, alpha=4)
    assert names == ["model.layers.0.self_attn.q_proj", EXPERTS]
    layer = model.get_submodule(EXPERTS)
    peft_shapes = sorted(tuple(p.shape) for p in pm.parameters() if p.requires_grad)
    assert sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad) == peft_shapes
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{EXPERTS}.lora_{ab}.{p}" for ab in "AB" for p in ("gate_up_proj", "down_proj")} | {
        f"model.layers.0.self_attn.q_proj.lora_{ab}" for ab in "AB"}
    for p in ("gate_up_proj", "down_proj"):
        K = moe.expert_shape(layer, p)[2]
        a = layer.lora_A[p]
        assert not layer.lora_B[p].any() and 0.5 / K**0.5 < a.abs().max() <= 1 / K**0.5  # Kaiming-uniform(sqrt 5)
    assert_close(model(ids).logits, base_out, torch.float32, "fresh adapters equal the base")
    keys, base_keys = set(model.state_dict()), set(base.state_dict())  # the experts' own keys are kept
    assert base_keys <= keys and all(".lora_" in key for key in keys - base_keys)

    randomize_lora_B(model)
    out = model(ids).logits
    _lora_effect(model, ids, out)
    assert_close(copy.deepcopy(model)(ids).logits, out, torch.float32, "a deep copy")
    assert fastlora.save_adapter(model, tmp_path / "fl") == names
    config, tensors = _saved(tmp_path / "fl")
    assert config["target_parameters"] == ["down_proj", "gate_up_proj"] and config["lora_dropout"] == 0.0
    assert f"base_model.model.{EXPERTS}.base_layer.lora_A.weight" in tensors  # gate_up_proj, PEFT's inner wrapper
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fl")
    assert_close(loaded(ids).logits, out, torch.float32, "PEFT over fastlora's file")

    randomize_lora_B(pm, seed=3)
    out_peft = pm(ids).logits
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    assert fastlora.load_adapter(model, tmp_path / "peft") == ["model.layers.0.self_attn.q_proj", EXPERTS]
    assert_close(model(ids).logits, out_peft, torch.float32, "fastlora over PEFT's file")
    fastlora.save_adapter(model, tmp_path / "again")
    _assert_same_files(tmp_path / "again", tmp_path / "peft")
    fastlora.load_adapter(model, tmp_path / "fl")  # into fastlora.Experts: the adapter is replaced
    assert_close(model(ids).logits, out, torch.float32, "reloaded over fastlora.Experts")


def test_load_refuses_bad_expert_tensors_and_leaves_the_model(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_moe("qwen3_moe", layers=1)
    fastlora.inject(model, ["q_proj"], target_parameters=TARGETS, r=2, alpha=4)
    fastlora.save_adapter(model, tmp_path)
    fresh = tiny_moe("qwen3_moe", layers=1)
    before = [(n, type(m)) for n, m in fresh.named_modules()]
    flags = [p.requires_grad for p in fresh.parameters()]
    file = tmp_path / "adapter_model.safetensors"
    good = load_file(file)
    key = f"base_model.model.{EXPERTS}.base_layer.lora_B.weight"
    for bad, match in [
        ({**good, key: torch.zeros(48, 9)},
         r"base_layer.lora_B.weight \(model.layers.0.mlp.experts.gate_up_proj\) "
         r"must have shape \(out_features, r \* experts\) = \(48, 8\); got \(48, 9\)"),
        ({**good, key.replace("lora_B", "lora_A"): torch.zeros(7, 32)},
         r"lora_A.weight.*= \(4 \* r, 32\); got \(7, 32\)"),
        ({k: v for k, v in good.items() if "base_layer" not in k}, r"base_layer.lora_A.weight.*gate_up_proj.*missing"),
        ({**good, f"base_model.model.{EXPERTS}.base_layer.base_layer.lora_A.weight": torch.zeros(8, 32),
          f"base_model.model.{EXPERTS}.base_layer.base_layer.lora_B.weight": torch.zeros(48, 8)},
         r"base_layer.base_layer.lora_A.weight is not an expert adapter PEFT would make"),
    ]:
        save_file(bad, file)
        with pytest.raises(ValueError, match=match):
            fastlora.load_adapter(fresh, tmp_path)
        assert [(n, type(m)) for n, m in fresh.named_modules()] == before
        assert [p.requires_grad for p in fresh.parameters()] == flags
    save_file(good, file)
    with pytest.raises(NotImplementedError, match="target_parameters.*only fastlora.load_adapter"):
        fastlora.load_adapters_grouped(fresh, [tmp_path])


def test_inject_refusals(tmp_path):
    model = tiny_moe("gpt_oss", layers=1)
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(NotImplementedError, match=r"matched model.layers.0.mlp.experts.gate_up_proj_bias"):
        fastlora.inject(model, None, target_parameters=["gate_up_proj_bias"], r=2, alpha=4)
    with pytest.raises(ValueError, match=r"target_parameters \['up_proj'\] matched no expert weight"):
        fastlora.inject(model, None, target_parameters=["up_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="dropout=0.1: expert adapters"):
        fastlora.inject(model, None, target_parameters=TARGETS, r=2, alpha=4, dropout=0.1)
    with pytest.raises(ValueError, match=r"r must be an int in \[1,"):
        fastlora.inject(model, None, target_parameters=TARGETS, r=0, alpha=4)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    fastlora.inject(model, None, target_parameters=["down_proj"], r=2, alpha=4)
    layer = model.get_submodule(EXPERTS)
    assert layer.targeted == ["down_proj"] and not any(p.requires_grad for n, p in model.named_parameters()
                                                          if "lora" not in n)
    with pytest.raises(ValueError, match=r"matched model.layers.0.mlp.experts.down_proj, whose module is already a "
                                         "fastlora.Experts"):
        fastlora.inject(model, None, target_parameters=["down_proj"], r=2, alpha=4)
    fastlora.inject(model, ["q_proj"], r=2, alpha=4, use_dora=True)
    with pytest.raises(ValueError, match="target_parameters.*do not work with use_dora.*nothing was written"):
        fastlora.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- the module against an oracle


def _experts(family, top_k=2, experts=4, seed=0):
    """A fastlora.Experts over a tiny family's first experts module, random adapters (r 3 / 2), fp32."""
    model = tiny_moe(family, layers=1, experts=experts, top_k=top_k, seed=seed)
    fastlora.inject(model, None, target_parameters=TARGETS, r=3, alpha=6)
    layer = model.get_submodule(EXPERTS)
    layer.set_adapter("down_proj", torch.nn.Parameter(torch.randn(experts * 2, 24)),
                      torch.nn.Parameter(torch.randn(32, 2 * experts)), 1.5)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def _oracle(layer, x, top_k_index, top_k_weights):
    """transformers' own eager loop on a float64 copy with merged weights W_e + s B_e A_e (the adapters as float64
    leaves, for gradients); an expert-parallel sentinel slot is sent to expert 0 with weight 0."""
    assert not list(layer.base.parameters())  # Experts.base: the experts module's behaviour without its weights
    ref = copy.copy(layer.base)
    ref.config = copy.copy(ref.config)
    ref.config._experts_implementation = "eager"
    leaves = {}
    for p, w in layer.named_parameters(recurse=False):
        w = w.detach().double()
        if p in layer.targeted:
            a, b = (t.detach().double().requires_grad_() for t in (layer.lora_A[p], layer.lora_B[p]))
            leaves[p] = (a, b)
            E = layer.num_experts
            A = a.view(E, -1, a.shape[1])
            B = b.view(b.shape[0], -1, E).permute(2, 0, 1)
            delta = layer.scaling[p] * B @ A  # [E, out, in]
            w = w + (delta.transpose(1, 2) if layer.is_transposed else delta)
        setattr(ref, p, w)
    sentinel = top_k_index == layer.num_experts
    xr = x.detach().double().requires_grad_()
    y = ref(xr, top_k_index.masked_fill(sentinel, 0), top_k_weights.double().masked_fill(sentinel, 0))
    return y, xr, leaves


def _run(layer, x, idx, w, train=True):
    x = x.clone().requires_grad_(train)
    y = layer(x, idx, w)
    if train:
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return y, x


def _weights(T, k, generator):
    """Top-k weights as a router's softmax gives them: they carry gradient back to the router."""
    return torch.rand(T, k, generator=generator).requires_grad_()


ROUTES = {  # (tokens, top_k, top_k_index): 4 experts
    "spread": (7, 2, [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3], [2, 0]]),
    "top1-one-expert-idle": (5, 1, [[2], [0], [2], [1], [0]]),  # expert 3 gets no token
    "all-to-one-and-one-token-expert": (4, 2, [[1, 3], [1, 0], [1, 0], [1, 0]]),  # 1: all, 3: one token, 2: none
    "one-token": (1, 2, [[3, 1]]),
    "one-token-top1": (1, 1, [[0]]),
    "expert-parallel-sentinel": (5, 2, [[0, 4], [4, 4], [1, 2], [4, 3], [2, 0]]),  # 4: an expert on another rank
}


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("route", list(ROUTES), ids=list(ROUTES))
def test_experts_match_merged_oracle(family, route):
    """Outputs and gradients (x, every lora_A/B) against transformers' eager experts loop over W + s B A in float64:
    experts with 0, 1 and all tokens, top-k 1 and 2, one-token batches, sentinel slots."""
    T, k, index = ROUTES[route]
    layer = _experts(family, top_k=k)
    layer.zero_grad()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 32, generator=g)
    idx = torch.tensor(index)
    w = _weights(T, k, g)
    y, xg = _run(layer, x, idx, w)
    wr = w.detach().double().requires_grad_()
    yr, xr, leaves = _oracle(layer, x, idx, wr)
    yr.backward(torch.randn(yr.shape, generator=torch.Generator().manual_seed(3)).double())
    assert_close(y, yr, torch.float32, "y")
    assert_close(xg.grad, xr.grad, torch.float32, "dx")
    assert_close(w.grad, wr.grad, torch.float32, "d top_k_weights")
    used = set(idx[idx < 4].tolist())
    for p, (a, b) in leaves.items():
        assert_close(layer.lora_A[p].grad, a.grad, torch.float32, f"d lora_A {p}")
        assert_close(layer.lora_B[p].grad, b.grad, torch.float32, f"d lora_B {p}")
        E, r = layer.num_experts, layer.r[p]
        for e in set(range(E)) - used:  # an expert without tokens gets exactly zero gradient
            assert not layer.lora_A[p].grad[e * r:(e + 1) * r].any()
            assert not layer.lora_B[p].grad[:, e::E].any()


def test_experts_without_gate_nemotron_h():
    """has_gate=False (NemotronH's experts: up_proj, act_fn(up), down_proj), module level, against the oracle."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    torch.manual_seed(0)
    base = NemotronHExperts(NemotronHConfig(hidden_size=32, moe_intermediate_size=24, n_routed_experts=4,
                                            num_experts_per_tok=2))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2).requires_grad_(False)
    layer = fastlora.Experts(base, {"up_proj": (2, 4, False), "down_proj": (3, 3, True)})
    assert layer.targeted == ["up_proj", "down_proj"] and layer.scaling["down_proj"] == 3 / 3**0.5
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    T, k, index = ROUTES["spread"]
    x, idx, w = torch.randn(T, 32), torch.tensor(index), torch.rand(T, k)
    y, xg = _run(layer, x, idx, w)
    yr, xr, leaves = _oracle(layer, x, idx, w)
    yr.backward(torch.randn(yr.shape, generator=torch.Generator().manual_seed(3)).double())
    assert_close(y, yr, torch.float32, "y")
    assert_close(xg.grad, xr.grad, torch.float32, "dx")
    for p, (a, b) in leaves.items():
        assert_close(layer.lora_A[p].grad, a.grad, torch.float32, f"d lora_A {p}")
        assert_close(layer.lora_B[p].grad, b.grad, torch.float32, f"d lora_B {p}")


def test_experts_eval_no_grad_and_3d_leading_shape():
    layer = _experts("qwen3_moe").eval()
    g = torch.Generator().manual_seed(1)
    x, idx, w = torch.randn(6, 32, generator=g), torch.randint(0, 4, (6, 2), generator=g), torch.rand(6, 2, generator=g)
    with torch.no_grad():
        y = layer(x, idx, w)
    assert not y.requires_grad
    yr = _oracle(layer, x, idx, w)[0]
    assert_close(y, yr, torch.float32, "no_grad")
    with torch.inference_mode():
        assert_close(layer(x.view(2, 3, 32), idx.view(2, 3, 2), w.view(2, 3, 2)), yr.view(2, 3, 32), torch.float32,
                     "[B, S, H]")


def test_experts_forward_errors():
    layer = _experts("mixtral")
    x, idx, w = torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(tokens, hidden\) = \(T, 32\); "
                                         r"got \(3, 31\)"):
        layer(torch.randn(3, 31), idx, w)
    with pytest.raises(ValueError, match=r"top_k_index must have shape \(tokens, top_k\) = \(3, k\); got \(2, 2\)"):
        layer(x, idx[:2], w)
    with pytest.raises(ValueError, match=r"top_k_weights must have top_k_index's shape \(3, 2\); got \(3, 1\)"):
        layer(x, idx, w[:, :1])
    with pytest.raises(TypeError, match="top_k_index must be int32 or int64; got torch.float32"):
        layer(x, idx.float(), w)
    with pytest.raises(IndexError, match=r"top_k_index must lie in \[0, 4\] for 4 experts.*got 5"):
        layer(x, idx + 5, w)
    with pytest.raises(ValueError, match=r"down_proj.lora_A must have shape \(experts \* r, in_features\) = "
                                         r"\(4 \* r, 24\); got \(8, 25\)"):
        layer.set_adapter("down_proj", torch.nn.Parameter(torch.zeros(8, 25)), layer.lora_B["down_proj"], 1.0)
    with pytest.raises(ValueError, match=r"down_proj.lora_B must have shape \(out_features, r \* experts\) = "
                                         r"\(32, 8\); got \(8, 32\)"):
        layer.set_adapter("down_proj", layer.lora_A["down_proj"], torch.nn.Parameter(torch.zeros(8, 32)), 1.0)


# ------------------------------------------------------------------------- item 3: no per-expert delta


class _Allocations(TorchDispatchMode):
    """The element counts of the floating-point tensors each op allocates (outputs that alias no input)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_no_expert_sized_tensor_forward_backward(family):
    """fastlora's forward and backward allocate nothing of E*out*in elements (no delta, no transposed or contiguous
    copy of the experts, gpt-oss's (E, in, out) storage included); PEFT's target_parameters path does."""
    E = 8
    model = tiny_moe(family, layers=1, experts=E)
    smallest = min(getattr(model.get_submodule(EXPERTS), p).numel() for p in ("gate_up_proj", "down_proj"))
    ids = tokens(batch=1, seq=5)
    pm = _peft(copy.deepcopy(model), target_modules=[])
    randomize_lora_B(pm)
    with _Allocations() as seen:
        pm(ids).logits.sum().backward()
    assert max(seen.sizes)[0] >= smallest, "PEFT's path was expected to build W + delta"
    fastlora.inject(model, None, target_parameters=TARGETS, r=2, alpha=4)
    randomize_lora_B(model)
    with _Allocations() as seen:
        model(ids).logits.sum().backward()
    assert model.get_submodule(EXPERTS).lora_A["gate_up_proj"].grad.any()
    big = [s for s in seen.sizes if s[0] >= smallest]
    assert not big, f"tensors of >= {smallest} elements (E*out*in) allocated: {big[:5]}"


def test_activation_checkpointing_same_gradients():
    """transformers' activation checkpointing recomputes the experts in backward: same logits and gradients."""
    model = tiny_moe("mixtral", layers=1).train()
    fastlora.inject(model, ["q_proj"], target_parameters=TARGETS, r=2, alpha=4)
    randomize_lora_B(model)
    ckpt = copy.deepcopy(model)
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    ckpt.enable_input_require_grads()
    out, grads = logits_and_grads(model, tokens())
    out_ckpt, grads_ckpt = logits_and_grads(ckpt, tokens())
    assert_close(out_ckpt, out, torch.float32, "logits")
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 6
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], torch.float32, name)


def _fake_experts(E=4, H=32, inter=24, up_out=None, dtype=torch.float32, **flags):
    """A minimal experts class declared as transformers declares its own (``@use_experts_implementation``)."""
    from types import SimpleNamespace

    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(**flags)
    class Fake(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(E, up_out or 2 * inter, H, dtype=dtype),
                                                   requires_grad=False)
            self.down_proj = torch.nn.Parameter(torch.zeros(E, H, inter, dtype=dtype), requires_grad=False)
            self.act_fn = torch.nn.SiLU()

    return Fake(SimpleNamespace(_experts_implementation=None))


def test_experts_module_refusals():
    with pytest.raises(NotImplementedError, match="normalises each expert's output"):
        fastlora.Experts(_fake_experts(has_post_expert_norm=True), {"down_proj": (2, 4, False)})
    with pytest.raises(ValueError, match=r"gate_up_proj \(experts, out, in\) = \(4, 40, 32\) and down_proj = "
                                         r"\(4, 32, 24\) do not fit num_experts = 4"):
        fastlora.Experts(_fake_experts(up_out=40), {"down_proj": (2, 4, False)})
    with pytest.raises(NotImplementedError, match="gate_up_proj is a torch.int8 tensor"):
        fastlora.Experts(_fake_experts(dtype=torch.int8), {"down_proj": (2, 4, False)})
    with pytest.raises(ValueError, match=r"adapters must name some of the projections \['gate_up_proj', "
                                         r"'down_proj'\]; got \['up_proj'\]"):
        fastlora.Experts(_fake_experts(), {"up_proj": (2, 4, False)})
    with pytest.raises(ValueError, match="is a Linear, not a transformers experts module"):
        fastlora.Experts(torch.nn.Linear(2, 2), {"down_proj": (2, 4, False)})
