"""inject (PEFT's target rules), freezing, merge/unmerge: outputs and gradients against a float64 oracle."""

import copy

import pytest
import torch
import torch.nn as nn
from tiny import float64_oracle, logits_and_grads, randomize_lora_B, tiny_llama, tokens
from tolerance import assert_close

import fastlora

PEFT_SPECS = {
    "suffixes": ["q_proj", "v_proj", "down_proj"],
    "full-name": ["model.layers.1.mlp.up_proj"],
    "regex": r".*layers\.0\..*_proj",
    "all-linear": "all-linear",
}


@pytest.mark.parametrize("spec", list(PEFT_SPECS.values()), ids=list(PEFT_SPECS))
def test_targets_match_peft(spec):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as PeftLinear

    model = tiny_llama()
    names = fastlora.inject(copy.deepcopy(model), spec, r=2, alpha=2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=copy.copy(spec)))
    expected = [n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PeftLinear)]
    assert names == expected


def test_inject_replaces_freezes_and_matches_oracle():
    model = tiny_llama()
    base_out = model(tokens()).logits.detach()
    names = fastlora.inject(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    assert len(names) == 6
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, fastlora.Linear) and layer.r == 4 and layer.scaling == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    assert isinstance(model.lm_head, nn.Linear)
    assert_close(model(tokens()).logits, base_out, torch.float32, "fresh adapters (B = 0) equal the base")

    randomize_lora_B(model)
    out, grads = logits_and_grads(model, tokens())
    ref_out, ref_grads = logits_and_grads(float64_oracle(model), tokens())
    assert_close(out, ref_out, torch.float32, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], torch.float32, name)


def test_inject_shares_the_base_weight():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    fastlora.inject(model, ["q_proj"], r=2, alpha=4, dropout=0.1)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight is q.weight and layer.bias is None and layer.dropout == 0.1


def test_all_linear_skips_lm_head_on_a_plain_module():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(16, 16))
    model.add_module("lm_head", nn.Linear(16, 8))
    assert fastlora.inject(model, "ALL-LINEAR", r=2, alpha=2) == ["body"]
    assert type(model.lm_head) is nn.Linear


def test_inject_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        fastlora.inject(model, "q_proj", r=2, alpha=2)  # a regex must match the full name
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp', a LlamaMLP"):
        fastlora.inject(model, ["mlp"], r=2, alpha=2)
    with pytest.raises(TypeError, match="target_modules"):
        fastlora.inject(model, 3, r=2, alpha=2)
    with pytest.raises(TypeError, match="target_modules"):
        fastlora.inject(model, [], r=2, alpha=2)
    fastlora.inject(model, ["k_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already a fastlora.Linear"):
        fastlora.inject(model, ["k_proj"], r=2, alpha=2)


def test_merge_unmerge():
    model = tiny_llama()
    names = fastlora.inject(model, "all-linear", r=4, alpha=8)
    randomize_lora_B(model)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    out = model(tokens()).logits.detach()
    assert fastlora.merge(model) == names
    assert all(model.get_submodule(n).merged for n in names)
    assert_close(model(tokens()).logits, out, torch.float32, "merged logits")
    assert fastlora.unmerge(model) == names
    for n in names:
        assert_close(model.get_submodule(n).weight, weights[n], torch.float32, f"{n} weight after unmerge")
    assert_close(model(tokens()).logits, out, torch.float32, "unmerged logits")


def test_merge_needs_fastlora_layers():
    with pytest.raises(ValueError, match="no fastlora.Linear"):
        fastlora.merge(nn.Linear(4, 4))


def test_plain_models_never_import_bitsandbytes(tmp_path):
    """Importing bitsandbytes logs warnings on some CPUs (AVX512-BF16 without the `kernels` package): fastlora's
    entry points on a model without bitsandbytes layers must not import it (checked in a fresh interpreter)."""
    import subprocess
    import sys

    pytest.importorskip("safetensors")
    code = f"""
import sys, torch, fastlora
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
fastlora.inject(model, "all-linear", r=2, alpha=4)
fastlora.save_adapter(model, {str(tmp_path / "ad")!r})
fastlora.load_adapter(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)), {str(tmp_path / "ad")!r})
print("bitsandbytes" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
