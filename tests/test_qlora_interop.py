"""QLoRA interop on CPU: a tiny Llama loaded 4-bit by transformers + bitsandbytes (``from_pretrained`` with
``BitsAndBytesConfig(load_in_4bit=True)`` works on CPU with bitsandbytes 0.50), PEFT's QLoRA over it, and
``from_peft``/``inject`` giving ``fastlora.Linear4bit`` layers, against PEFT and a float64 oracle.

The oracle runs the model in float64 with every 4-bit W decoded exactly (``quant.dequantize_4bit`` in float64)
and each LoRA layer as ``reference.lora_linear``. bf16 compute takes fastlora's PyTorch reference path on CPU
(the interpreter's bf16 dots are wrong); fp32 compute runs the 4-bit kernels under the Triton interpreter.
"""

import pytest

pytest.importorskip("bitsandbytes", reason="the QLoRA tests need fastlora[qlora]")
pytest.importorskip("peft", reason="the QLoRA tests need fastlora[peft]")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tiny import float64_oracle, logits_and_grads, randomize_lora_B, tiny_llama, tokens, trainer_losses  # noqa: E402
from tolerance import assert_close  # noqa: E402

import fastlora  # noqa: E402
from fastlora import quant, reference  # noqa: E402
from fastlora.model import freeze_base  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
SOME = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny_llama with random q/k/v/o biases and intermediate size 128, saved once; tests load it 4-bit
    (quantisation is deterministic). The fused 4-bit GEMM needs in_features % 64 == 0 (tiny_llama's 96 is not)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = True
    config.intermediate_size = 128
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def load_4bit(path, compute_dtype=BF16, dtype=FP32):
    """A QLoRA user's model: every decoder linear a bitsandbytes Linear4bit (nf4, double quant), lm_head not;
    the other weights in ``dtype``."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)


def peft_qlora(path, targets, compute_dtype=BF16, dtype=FP32, **lora):
    """PEFT's QLoRA (r=8, alpha=16, fp32 adapters) with random non-zero lora_B: the same adapters on every call."""
    from peft import LoraConfig, get_peft_model

    model = load_4bit(path, compute_dtype, dtype)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, **lora))
    randomize_lora_B(peft_model)
    return peft_model


def oracle(path, model, dtype=FP32):
    """A float64 copy of ``model`` (from ``path``, weights rounded to ``dtype`` as loaded) with every 4-bit W
    decoded exactly; fastlora.Linear4bit layers become float64 fastlora.Linear running the reference."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(path, dtype=dtype).double().eval()
    for name, layer in model.named_modules():
        if isinstance(layer, fastlora.Linear4bit):
            packed, state = layer.weight, layer.quant_state
        elif isinstance(layer, bnb.nn.Linear4bit):
            qs = layer.weight.quant_state
            if getattr(qs, "packing_format_for_cpu", False):  # bitsandbytes ran it on an AVX512-BF16 CPU
                packed, state = quant.from_bnb_cpu_layout(layer.weight.data, qs)
            else:
                packed, state = layer.weight, quant.QuantState4bit.from_bnb(qs)
        else:
            continue
        base = ref.get_submodule(name)
        with torch.no_grad():
            base.weight.copy_(quant.dequantize_4bit(packed, state, dtype=torch.float64))
        if isinstance(layer, fastlora.Linear4bit):
            wrapped = fastlora.Linear.from_linear(base, r=layer.r, alpha=layer.alpha)
            wrapped.scaling = layer.scaling
            wrapped.lora_A = nn.Parameter(layer.lora_A.detach().double())
            wrapped.lora_B = nn.Parameter(layer.lora_B.detach().double())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, wrapped)
    freeze_base(ref)
    return float64_oracle(ref)


def peft_logits_and_grads(peft_model, ids):
    """PEFT's logits and LoRA gradients, keyed by the converted model's names (``...q_proj.lora_A``)."""
    out, grads = logits_and_grads(peft_model, ids)
    return out, {n.removeprefix("base_model.model.").replace(".default.weight", ""): g for n, g in grads.items()}


def rel_error(actual, expected):
    return ((actual.detach().double() - expected.detach().double()).norm() / expected.double().norm()).item()


def names_4bit(model):
    return [n for n, m in model.named_modules() if isinstance(m, fastlora.Linear4bit)]


CASES = {
    # The usual QLoRA set-up with 16-bit activations: bf16 compute takes fastlora's CPU reference path.
    "bf16-model-all-linear": (BF16, BF16, "all-linear"),
    # fp32 compute: the 4-bit kernels run under the Triton interpreter.
    "fp32-compute": (FP32, FP32, SOME),
}


@pytest.mark.parametrize("case", list(CASES))
def test_from_peft_matches_peft(saved, case):
    dtype, compute_dtype, targets = CASES[case]
    peft_model = peft_qlora(saved, targets, compute_dtype, dtype)
    model = fastlora.from_peft(peft_qlora(saved, targets, compute_dtype, dtype))
    names = names_4bit(model)
    assert names == [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert len(names) == (14 if targets == "all-linear" else 6) and type(model.lm_head) is nn.Linear
    layer = model.get_submodule(names[0])
    assert layer.compute_dtype == compute_dtype and layer.scaling == 2.0 and layer.lora_A.dtype == FP32
    torch.testing.assert_close(layer.lora_A, peft_model.base_model.model.get_submodule(names[0]).lora_A.default.weight,
                               rtol=0, atol=0)  # the same init on both sides

    # Train mode, as QLoRA runs. In eval mode without grad, bitsandbytes' AVX512-BF16 CPU kernel would run the
    # layers that are not targeted in bf16 whatever compute_dtype says (docs/qlora.md), on both sides.
    model.train(), peft_model.train()
    ids = tokens()
    out, grads = logits_and_grads(model, ids)
    peft_out, peft_grads = peft_logits_and_grads(peft_model, ids)
    ref_out, ref_grads = logits_and_grads(oracle(saved, model, dtype), ids)
    assert grads.keys() == peft_grads.keys() == ref_grads.keys() and len(grads) == 2 * len(names)
    pairs = [("logits", out, peft_out, ref_out)] + [(n, grads[n], peft_grads[n], ref_grads[n]) for n in grads]
    for name, got, peft, ref in pairs:
        if compute_dtype == FP32:
            assert_close(got, ref, FP32, f"{name} vs float64")
            assert_close(got, peft, FP32, f"{name} vs PEFT")
        else:
            # bf16 everywhere: PEFT's own error against float64 is ~2.5e-2 on the logits (up to ~4e-2 on the
            # gradients), above REL_TOL[bf16]; fastlora must stay within 2x PEFT's error.
            peft_err = rel_error(peft, ref)
            assert rel_error(got, ref) <= 2 * peft_err, f"{name}: {rel_error(got, ref):.3e} > 2 x {peft_err:.3e}"


def test_layer_with_fp32_activations_is_as_accurate_as_peft(saved):
    """fp32 activations, bf16 compute (QLoRA after prepare_model_for_kbit_training, or an fp32 model): PEFT runs
    the base in bf16 (x rounded, the result cast back to fp32) and the low-rank branch on the fp32 x."""
    name = "model.layers.0.self_attn.q_proj"
    peft_layer = peft_qlora(saved, SOME).base_model.model.get_submodule(name)
    layer = fastlora.from_peft(peft_qlora(saved, SOME)).get_submodule(name)
    w = quant.dequantize_4bit(layer.weight, layer.quant_state, dtype=torch.float64)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))

    def run(forward, x, a, b):
        x = x.detach().requires_grad_()
        y = forward(x)
        y.backward(dy.to(y.dtype))
        return [y, x.grad, a.grad, b.grad]

    a64, b64 = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    bias = layer.bias.detach().double()  # the bf16 rounding of the bias is part of the error
    ref = run(lambda x: reference.lora_linear(x, w, bias, a64, b64, layer.scaling), x.double(), a64, b64)
    got = run(layer, x, layer.lora_A, layer.lora_B)
    peft = run(peft_layer, x, peft_layer.lora_A.default.weight, peft_layer.lora_B.default.weight)
    for what, g, p, r in zip(("y", "dx", "dA", "dB"), got, peft, ref, strict=True):
        assert rel_error(g, r) <= 2 * rel_error(p, r), f"{what}: {rel_error(g, r):.3e} > 2 x {rel_error(p, r):.3e}"


def test_trainer_loss_curve_matches_peft(saved):
    """HF Trainer refuses a quantised model that is not a PeftModel, so the converted PeftModel is trained."""
    peft_model = peft_qlora(saved, "all-linear", dtype=BF16)
    converted = peft_qlora(saved, "all-linear", dtype=BF16)
    model = fastlora.from_peft(converted)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses, peft_losses = trainer_losses(converted), trainer_losses(peft_model)
    assert len(losses) == 4 and (losses[0] - losses[-1]).abs() > 0.05, losses  # the adapters learn something
    # bf16 activations: fastlora's CPU path rounds where PEFT does (measured: equal losses); 1e-3 is an eighth
    # of bf16's eps and ~2% of how far the loss moves in 4 steps.
    torch.testing.assert_close(losses, peft_losses, rtol=1e-3, atol=0)
    trained = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
               for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_error(p, init[name]) > 0.01, f"{name} did not train"
            assert_close(p, trained[name], BF16, f"{name} after 4 steps vs PEFT")


def test_inject_wraps_bnb_layers(saved):
    import bitsandbytes as bnb

    model = load_4bit(saved, compute_dtype=FP32)
    bnb_layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    names = fastlora.inject(model, "all-linear", r=8, alpha=16)
    assert names == list(bnb_layers) and len(names) == 14
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, fastlora.Linear4bit) and layer.compute_dtype == FP32
        assert layer.weight is bnb_layers[name].weight and layer.bias is bnb_layers[name].bias  # shared, no copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}

    randomize_lora_B(model)
    out, grads = logits_and_grads(model, tokens())
    ref_out, ref_grads = logits_and_grads(oracle(saved, model), tokens())
    assert_close(out, ref_out, FP32, "logits vs float64")
    for name in grads:
        assert_close(grads[name], ref_grads[name], FP32, f"{name} vs float64")


def _repack_for_cpu(model, targets=SOME):
    """What bitsandbytes does to its Linear4bit layers the first time they run on an AVX512-BF16 CPU in eval mode
    without grad, done to the ``targets`` layers: a real forward where this CPU takes that path, else the same
    in-place call it makes. Returns {name: (standard packed bytes, fp32 scales as bf16)} from before.

    Only layers fastlora will wrap: bitsandbytes cannot train through a layer it repacked (its bias is added in
    place to a result that needs grad), so the other layers stay in the format, as in a real training run."""
    import copy

    import bitsandbytes as bnb

    before = {}
    for name, mod in model.named_modules():
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")  # PEFT's names -> the model's
        if isinstance(mod, bnb.nn.Linear4bit) and any(name.endswith(t) for t in targets):
            state = quant.QuantState4bit.from_bnb(copy.deepcopy(mod.weight.quant_state))
            before[name] = (mod.weight.data.clone(), quant.dequantize_absmax(state).to(BF16).float())
            if getattr(mod, "support_avx512bf16_for_cpu", False):
                with torch.no_grad():
                    mod.eval()(torch.randn(2, mod.in_features, dtype=mod.compute_dtype or FP32))
            else:
                mod.weight.data, mod.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
                    mod.weight.data, mod.weight.quant_state)
            assert mod.weight.quant_state.packing_format_for_cpu
    return before


def _check_read_back(model, before):
    """Every fastlora.Linear4bit over a repacked weight reads the original codes and the bf16 scales, shared with
    its bitsandbytes layer, which is back in the format."""
    for name in names_4bit(model):
        layer = model.get_submodule(name)
        state = layer.quant_state
        packed, absmax = before[name]
        assert torch.equal(layer.weight.data, packed) and torch.equal(state.absmax, absmax)
        assert not state.double_quant and not layer.weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize("path", ["inject", "from_linear", "load_adapter", "from_peft", "wrapped-then-repacked"])
def test_repacked_bnb_layers_are_read_back(saved, tmp_path, path):
    """bitsandbytes' AVX512-BF16 CPU layout (quant_state.packing_format_for_cpu) is put back into the format on every
    path into fastlora (and under a layer already wrapped), losslessly for the codes; the result computes the
    float64 oracle's function."""
    model = load_4bit(saved, compute_dtype=FP32)
    if path == "from_peft":
        peft_model = peft_qlora(saved, SOME, compute_dtype=FP32)
        before = _repack_for_cpu(peft_model)
        model = fastlora.from_peft(peft_model)
    elif path == "load_adapter":
        source = fastlora.from_peft(peft_qlora(saved, SOME, compute_dtype=FP32))
        fastlora.save_adapter(source, tmp_path)
        before = _repack_for_cpu(model)
        fastlora.load_adapter(model, tmp_path)
    elif path == "from_linear":
        name = "model.layers.1.mlp.down_proj"
        before = _repack_for_cpu(model, [name])
        layer = fastlora.Linear4bit.from_linear(model.get_submodule(name), r=4, alpha=8)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        freeze_base(model)
    elif path == "inject":
        before = _repack_for_cpu(model)
        fastlora.inject(model, SOME, r=8, alpha=16)
    else:
        import bitsandbytes as bnb

        bnb_layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        fastlora.inject(model, SOME, r=8, alpha=16)
        wrapped = nn.ModuleDict({n.replace(".", "/"): m for n, m in bnb_layers.items()})
        before = {n.replace("/", "."): v for n, v in _repack_for_cpu(wrapped).items()}
    randomize_lora_B(model)
    model.train()  # the bitsandbytes layers left in the model keep to the format (no repacking in train mode)
    out, grads = logits_and_grads(model, tokens())
    _check_read_back(model, before)
    ref_out, ref_grads = logits_and_grads(oracle(saved, model), tokens())
    assert_close(out, ref_out, FP32, "logits vs float64")
    for name in grads:
        assert_close(grads[name], ref_grads[name], FP32, f"{name} vs float64")


def test_from_peft_plain_lora_linear_over_bnb():
    """Without ``is_loaded_in_4bit`` PEFT wraps a bitsandbytes Linear4bit in its plain ``lora.Linear``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=FP32, quant_type="nf4").to("cpu")  # quantises here
    peft_model = get_peft_model(nn.Sequential(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    assert type(peft_model.base_model.model[0]).__module__ == "peft.tuners.lora.layer"
    randomize_lora_B(peft_model)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    expected = peft_model(x)
    model = fastlora.from_peft(peft_model)
    assert isinstance(model[0], fastlora.Linear4bit) and model[0].weight is base.weight
    assert_close(model(x), expected, FP32, "fastlora.Linear4bit vs PEFT lora.Linear over bitsandbytes")


def test_save_adapter_loads_in_peft(saved, tmp_path):
    from peft import PeftModel

    model = fastlora.from_peft(peft_qlora(saved, SOME, dtype=BF16))
    expected = model(tokens()).logits.detach()
    assert fastlora.save_adapter(model, tmp_path) == names_4bit(model)
    peft_model = PeftModel.from_pretrained(load_4bit(saved, dtype=BF16), tmp_path)
    assert_close(peft_model(tokens()).logits, expected, BF16, "PEFT with the adapter fastlora saved")


def test_load_adapter_saved_by_peft(saved, tmp_path):
    peft_model = peft_qlora(saved, SOME, dtype=BF16)
    expected = peft_model(tokens()).logits.detach()
    peft_model.save_pretrained(tmp_path)
    model = load_4bit(saved, dtype=BF16)
    names = fastlora.load_adapter(model, tmp_path)
    assert sorted(names) == sorted(names_4bit(model)) and len(names) == 6
    assert_close(model(tokens()).logits, expected, BF16, "fastlora with the adapter PEFT saved")
    fastlora.save_adapter(model, tmp_path / "again")  # and back: the same tensors
    assert fastlora.load_adapter(model, tmp_path / "again") == names
    assert_close(model(tokens()).logits, expected, BF16, "after a fastlora save/load round trip")


def test_merge_refuses_4bit_layers_and_changes_nothing():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear4bit(64, 64, compute_dtype=FP32).to("cpu"))
    assert fastlora.inject(model, "all-linear", r=4, alpha=4) == ["0", "1"]
    randomize_lora_B(model)
    weight = model[0].weight.detach().clone()
    with pytest.raises(NotImplementedError, match="merge of layer '1': fastlora.Linear4bit cannot merge"):
        fastlora.merge(model)
    assert not model[0].merged and torch.equal(model[0].weight, weight)  # refused before anything merged
    with pytest.raises(NotImplementedError, match="unmerge of layer '1'"):
        fastlora.unmerge(model)


def test_from_peft_errors(saved):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    merged = peft_qlora(saved, ["q_proj"])
    merged.merge_adapter()  # PEFT re-quantises W + s B A into the 4-bit weight
    with pytest.raises(NotImplementedError, match=r"'model.layers.0.self_attn.q_proj'.*merged into the 4-bit base"):
        fastlora.from_peft(merged)
    assert type(merged.base_model.model.model.layers[1].self_attn.q_proj).__name__ == "Linear4bit"  # untouched

    eight = nn.Sequential(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu"))  # int8 on .to()
    with pytest.raises(NotImplementedError, match="Linear8bitLt with a torch.int8 weight"):
        fastlora.inject(eight, "all-linear", r=4, alpha=4)
    with pytest.raises(NotImplementedError, match="'0'.*Linear8bitLt"):
        fastlora.from_peft(get_peft_model(eight, LoraConfig(r=4, target_modules=["0"])))
    unquantised = nn.Sequential(bnb.nn.Linear4bit(64, 32))  # bitsandbytes quantises on the first .to(device)
    with pytest.raises(ValueError, match="'0': the bitsandbytes Linear4bit is not quantised yet"):
        fastlora.inject(unquantised, "all-linear", r=4, alpha=4)
