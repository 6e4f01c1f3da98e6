"""LoRA and DoRA over an FP8 model, with PEFT: a tiny Llama whose projections are block-scaled FP8 layers (as an FP8
checkpoint loads), ``fastlora.inject`` / ``load_adapter`` making them ``fastlora.LinearFP8``, and PEFT's ordinary
adapter files both ways against PEFT over a dense copy of the same model (its weights the dequantised FP8 ones):
fp32 (the FP8 kernels under the interpreter) to the fp32 tolerance, and PEFT over a bf16 copy within bf16's."""

import copy

import pytest

pytest.importorskip("peft", reason="the FP8 interop tests need fastlora[peft]")

import torch  # noqa: E402
from helpers import CheckpointFP8Linear  # noqa: E402
from tiny import randomize_lora_B, tiny_llama, tokens  # noqa: E402
from tolerance import assert_close  # noqa: E402

import fastlora  # noqa: E402
from fastlora import quant  # noqa: E402

FP32, BF16 = torch.float32, torch.bfloat16
SOME = ["q_proj", "v_proj", "down_proj"]


def fp8_and_dense(targets=SOME):
    """(tiny Llama with ``targets`` as FP8 checkpoint layers, 64 x 32 blocks so that several blocks and partial ones
    occur; the same model with those weights dequantised to fp32)."""
    model = tiny_llama()
    dense = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if name.rpartition(".")[2] in targets:
            fp8 = CheckpointFP8Linear(mod.weight.detach(), None if mod.bias is None else mod.bias.detach(),
                                      block_size=(64, 32))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fp8)
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(quant.dequantize_fp8_blockwise(
                    fp8.weight, fp8.weight_scale_inv, (64, 32)))
    return model.eval(), dense.eval()


def lora_grads(model, ids, dy):
    model.zero_grad(set_to_none=True)
    out = model(ids).logits
    out.backward(dy)
    return out, {_layer_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _layer_key(name: str) -> str:
    """A trainable parameter's name, PEFT's or fastlora's, as '<layer path>.<lora_A|lora_B|magnitude>'."""
    name = name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")
    return name.replace("lora_magnitude_vector", "lora_magnitude")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_saved_over_fp8_loads_in_peft_over_dense(dora, tmp_path):
    """inject over the FP8 layers, train-like adapters, save_adapter; PEFT loads the folder over the dense copy and
    gives the same logits (fp32) and, over a bf16 copy, the same within bf16."""
    from peft import PeftModel

    model, dense = fp8_and_dense()
    names = fastlora.inject(model, SOME, r=4, alpha=8, use_dora=dora)
    assert len(names) == 6 and all(isinstance(model.get_submodule(n), fastlora.LinearFP8) for n in names)
    randomize_lora_B(model)
    if dora:
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).lora_magnitude.mul_(1.25)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    assert fastlora.save_adapter(model, tmp_path) == names
    peft_model = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path)
    with torch.no_grad():
        assert_close(peft_model(ids).logits, expected, FP32, "PEFT over the dense copy")
        bf16 = PeftModel.from_pretrained(copy.deepcopy(dense).to(BF16), tmp_path)
        assert_close(bf16(ids).logits.float(), expected, BF16, "PEFT over a bf16 copy")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_saved_by_peft_loads_over_fp8(dora, tmp_path):
    """PEFT trains over the dense copy and saves; ``load_adapter`` over the FP8 model builds ``LinearFP8`` layers
    (fp32 adapters) with the same logits and the same adapter gradients for one output gradient."""
    from peft import LoraConfig, get_peft_model

    model, dense = fp8_and_dense()
    peft_model = get_peft_model(dense, LoraConfig(target_modules=SOME, r=4, lora_alpha=8, use_dora=dora))
    randomize_lora_B(peft_model)
    peft_model.save_pretrained(tmp_path)
    names = fastlora.load_adapter(model, tmp_path)
    assert sorted(names) == sorted(n for n, m in model.named_modules() if isinstance(m, fastlora.LinearFP8))
    assert len(names) == 6 and all(model.get_submodule(n).lora_A.dtype == FP32 for n in names)
    ids = tokens()
    dy = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(3))
    expected, peft_grads = lora_grads(peft_model, ids, dy)
    out, grads = lora_grads(model, ids, dy)
    assert_close(out, expected, FP32, "logits")
    assert set(grads) == set(peft_grads) and len(grads) == 6 * (3 if dora else 2)
    for key, g in grads.items():
        assert_close(g, peft_grads[key], FP32, key)


def test_load_adapter_refuses_a_mismatched_file_and_changes_nothing(tmp_path):
    """An adapter for other shapes: refused with the key named; the FP8 model keeps its layers."""
    from peft import LoraConfig, get_peft_model

    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 48, bias=False)
    get_peft_model(other, LoraConfig(target_modules=SOME, r=4, lora_alpha=8)).save_pretrained(tmp_path)
    model, _ = fp8_and_dense()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_B must have shape .*\(64, 4\)"):
        fastlora.load_adapter(model, tmp_path)
    assert dict(model.named_modules()) == before
    assert model.model.embed_tokens.weight.requires_grad  # nothing frozen either


def test_from_peft_over_transformers_fp8_linear():
    """PEFT's LoRA layer over transformers' ``FP8Linear`` (what an FP8 checkpoint loads as): ``from_peft`` makes a
    ``fastlora.LinearFP8`` that shares the FP8 weight, its scales and PEFT's adapter parameters, and computes the
    reference on the dequantised weight."""
    from peft import LoraConfig, get_peft_model

    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    torch.manual_seed(0)
    fp8 = finegrained.FP8Linear(192, 136, block_size=(128, 128), has_bias=True)
    q, s = quant.quantize_fp8_blockwise(torch.randn(136, 192))
    with torch.no_grad():
        fp8.weight.copy_(q)
        fp8.weight_scale_inv.copy_(s)
        fp8.bias.normal_()
    model = torch.nn.ModuleDict(dict(proj=fp8))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["proj"], r=4, lora_alpha=8))
    randomize_lora_B(peft_model)
    peft_layer = peft_model.base_model.model.proj
    out = fastlora.from_peft(peft_model)
    layer = out.proj
    assert isinstance(layer, fastlora.LinearFP8) and layer.weight is fp8.weight
    assert layer.weight_scale_inv is fp8.weight_scale_inv and layer.lora_A is peft_layer.lora_A["default"].weight
    x = torch.randn(5, 192)
    w = quant.dequantize_fp8_blockwise(q, s, dtype=torch.float64)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    ref = x.double() @ w.T + fp8.bias.detach().double() + 2.0 * (x.double() @ a.T) @ b.T
    with torch.no_grad():
        assert_close(layer(x), ref, FP32, "y")
