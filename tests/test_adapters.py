"""from_peft and PEFT-format adapter files, both ways, against PEFT itself run in float64."""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from tiny import logits_and_grads, randomize_lora_B, tiny_llama, tokens
from tolerance import assert_close

import fastlora

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402


def peft_llama(**config):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    kw.update(config)
    model = get_peft_model(tiny_llama(), LoraConfig(**kw))
    randomize_lora_B(model)
    return model.eval()


def peft_oracle(peft_model):
    return copy.deepcopy(peft_model).double()


def fastlora_name(peft_name):
    """base_model.model.X.lora_A.default.weight -> X.lora_A (the same parameter in the converted model)."""
    return peft_name.removeprefix("base_model.model.").replace(".default.weight", "")


def assert_model_matches(model, ref, ids, *, name_map=lambda n: n):
    out, grads = logits_and_grads(model, ids)
    ref_out, ref_grads = logits_and_grads(ref, ids)
    assert_close(out, ref_out, torch.float32, "logits")
    ref_grads = {name_map(n): g for n, g in ref_grads.items()}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], torch.float32, name)


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "lora_dropout": 0.1, "rank_pattern": {"v_proj": 2},
                                         "alpha_pattern": {"down_proj": 3}}], ids=["plain", "rslora-dropout-pattern"])
def test_from_peft_matches_peft(config):
    pm = peft_llama(**config)
    ref = peft_oracle(pm)
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    model = fastlora.from_peft(pm)
    assert model is pm.base_model.model
    assert not any(isinstance(m, PeftLinear) for m in model.modules())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fastlora.Linear)}
    assert len(layers) == 6
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    for name, layer in layers.items():
        peft_layer = ref.get_submodule("base_model.model." + name)
        assert layer.scaling == peft_layer.scaling["default"]
        assert layer.dropout == config.get("lora_dropout", 0.0)
    assert_model_matches(model, ref, tokens(), name_map=fastlora_name)


def test_from_peft_fp16_base_with_fp32_adapters():
    def half_peft():
        pm = get_peft_model(tiny_llama().half(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        randomize_lora_B(pm)
        return pm.eval()

    pm = half_peft()
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    expected = peft_oracle(pm)(tokens()).logits
    peft_error = (half_peft()(tokens()).logits.double() - expected).norm() / expected.norm()
    model = fastlora.from_peft(pm)
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    # bounded by PEFT's own fp16 error (measured: fastlora 6.9e-4, PEFT 6.6e-4)
    assert_close(model(tokens()).logits, expected, torch.float16, "fp16 logits", tol=2 * peft_error.item())


def test_from_peft_keeps_the_merged_state():
    pm = peft_llama()
    ref = peft_oracle(pm)
    pm.base_model.merge_adapter()
    model = fastlora.from_peft(pm)
    assert all(m.merged for m in model.modules() if isinstance(m, fastlora.Linear))
    assert_close(model(tokens()).logits, ref(tokens()).logits, torch.float32, "merged logits")
    fastlora.unmerge(model)
    assert_model_matches(model, ref, tokens(), name_map=fastlora_name)


def _two_active(model):
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])


def _gpt2_fan_in_fan_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    return get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))


UNSUPPORTED = {
    "lora-bias": (lambda: peft_llama(lora_bias=True), "q_proj.*lora_bias"),
    "embedding": (lambda: peft_llama(target_modules=["embed_tokens", "q_proj"]), "embed_tokens.*Embedding"),
    "two-active": (lambda: _two_active(pm := peft_llama()) or pm, "q_proj.*2 active adapters"),
    "modules-to-save": (lambda: peft_llama(modules_to_save=["lm_head"]), "lm_head.*ModulesToSaveWrapper"),
    "fan-in-fan-out": (_gpt2_fan_in_fan_out, "c_attn.*fan_in_fan_out"),
}


@pytest.mark.parametrize("make,match", list(UNSUPPORTED.values()), ids=list(UNSUPPORTED))
def test_from_peft_rejects_unsupported(make, match):
    pm = make()
    with pytest.raises(NotImplementedError, match=match):
        fastlora.from_peft(pm)
    assert not any(isinstance(m, fastlora.Linear) for m in pm.modules()), "nothing replaced on error"


def test_from_peft_needs_lora_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        fastlora.from_peft(tiny_llama())


def test_fastlora_adapter_loads_in_peft(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    fastlora.inject(model, ["q_proj", "o_proj"], r=4, alpha=8)
    fastlora.inject(model, ["v_proj"], r=2, alpha=3, use_rslora=False)
    randomize_lora_B(model)
    names = fastlora.save_adapter(model, tmp_path)
    assert len(names) == 6
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert config["rank_pattern"] == {n: 2 for n in names if n.endswith("v_proj")}
    ref = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(tmp_path)).eval()
    assert sum(isinstance(m, PeftLinear) for m in ref.modules()) == 6
    assert_close(model(tokens()).logits, ref(tokens()).logits, torch.float32, "logits")


def test_target_modules_fall_back_to_full_names(tmp_path):
    model = tiny_llama()
    fastlora.inject(model, ["model.layers.1.self_attn.q_proj"], r=2, alpha=2)
    fastlora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("into", ["nn.Linear", "fastlora.Linear"])
def test_peft_adapter_loads_in_fastlora(tmp_path, into):
    pm = peft_llama(use_rslora=True, lora_dropout=0.05, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 5})
    pm.save_pretrained(str(tmp_path))
    ref = peft_oracle(pm)
    model = tiny_llama()
    if into == "fastlora.Linear":
        fastlora.inject(model, ["q_proj", "v_proj", "down_proj"], r=8, alpha=1)
    names = fastlora.load_adapter(model, tmp_path)
    assert len(names) == 6
    for name in names:
        layer, peft_layer = model.get_submodule(name), ref.get_submodule("base_model.model." + name)
        assert isinstance(layer, fastlora.Linear) and layer.r == peft_layer.r["default"]
        assert layer.scaling == pytest.approx(peft_layer.scaling["default"]) and layer.dropout == 0.05
    assert_model_matches(model, ref, tokens(), name_map=fastlora_name)


def test_round_trip_fastlora_peft_fastlora(tmp_path):
    model = tiny_llama()
    fastlora.inject(model, "all-linear", r=3, alpha=6)
    randomize_lora_B(model)
    fastlora.save_adapter(model, tmp_path / "a")
    pm = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    pm.save_pretrained(str(tmp_path / "b"))
    back = tiny_llama()
    fastlora.load_adapter(back, tmp_path / "b")
    for (n, p), (m, q) in zip(model.named_parameters(), back.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n


def _save_tiny(tmp_path, **config):
    pm = peft_llama(**config)
    pm.save_pretrained(str(tmp_path))
    return tmp_path


def test_load_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastlora.load_adapter(tiny_llama(), tmp_path / "missing")
    path = _save_tiny(tmp_path / "ok")
    small = tiny_llama()
    small.model.layers = small.model.layers[:1]
    with pytest.raises(ValueError, match="'model.layers.1.* not a module of the model"):
        fastlora.load_adapter(small, path)
    assert not any(isinstance(m, fastlora.Linear) for m in small.modules()), "nothing replaced on error"
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = nn.Linear(64, 48, bias=False)
    with pytest.raises(ValueError, match=r"q_proj.lora_B must have shape \(out_features, r\) = \(48, 4\)"):
        fastlora.load_adapter(other, path)
    merged = tiny_llama()
    fastlora.inject(merged, ["q_proj"], r=2, alpha=2)
    fastlora.merge(merged)
    with pytest.raises(ValueError, match="merged fastlora.Linear"):
        fastlora.load_adapter(merged, path)


def test_grouped_mixed_batch_equals_each_adapter(tmp_path):
    configs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
               dict(r=8, lora_alpha=4, target_modules=["down_proj"])]
    paths = [_save_tiny(tmp_path / str(i), **c) for i, c in enumerate(configs)]
    model = tiny_llama()
    names = fastlora.load_adapters_grouped(model, paths)
    assert len(names) == 10
    for name in names:
        layer = model.get_submodule(name)
        ranks = [c["r"] if name.rpartition(".")[2] in c["target_modules"] else 0 for c in configs]
        assert isinstance(layer, fastlora.GroupedLinear) and layer.ranks == ranks  # each at its own rank
        rows = -(-sum(-(-r // 8) * 8 for r in ranks) // 16) * 16  # ranks rounded up to 8, the total to 16
        assert layer.lora_A.shape == (rows, layer.in_features)
        assert layer.lora_B.shape == (layer.out_features, rows)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    q = model.model.layers[0].self_attn.q_proj
    assert torch.allclose(q.scaling, torch.tensor([2.0, 16 / 2**0.5, 0.0]))

    ids = torch.tensor([2, 0, -1, 1, 0])
    x = tokens(batch=5, seq=6)
    with fastlora.use_adapters(model, ids):
        out = model(x).logits
    base = tiny_llama().double()
    refs = [PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval() for p in paths]
    for row, i in enumerate(ids.tolist()):
        ref = base if i < 0 else refs[i]
        assert_close(out[row], ref(x[row:row + 1]).logits[0], torch.float32, f"row {row} (adapter {i})")


def test_grouped_loads_into_fastlora_linear_and_checks(tmp_path):
    path = _save_tiny(tmp_path / "a")
    model = tiny_llama()
    fastlora.inject(model, ["q_proj"], r=2, alpha=2)
    names = fastlora.load_adapters_grouped(model, [path, path])
    assert all(isinstance(model.get_submodule(n), fastlora.GroupedLinear) for n in names)
    with pytest.raises(ValueError, match="at least one adapter path"):
        fastlora.load_adapters_grouped(model, [])


def test_save_needs_fastlora_layers(tmp_path):
    with pytest.raises(ValueError, match="no fastlora.Linear"):
        fastlora.save_adapter(tiny_llama(), tmp_path)
    assert not os.listdir(tmp_path)
