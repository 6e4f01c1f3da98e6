"""DoRA interop with PEFT and Hugging Face on a tiny Llama: from_peft, inject(use_dora=True), adapter files both
ways (PEFT's ``lora_magnitude_vector`` key), models mixing DoRA and plain LoRA layers, HF Trainer, and failures
that leave the model unchanged. PEFT itself run in float64 is the oracle (tier A: the interpreter)."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from test_failures import assert_unchanged, snapshot
from tiny import logits_and_grads, randomize_lora_B, tiny_llama, tokens, trainer_losses
from tolerance import assert_close

import fastlora
from fastlora import adapters

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = {"q-v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"  # PEFT 0.21's key, verified below


def randomize_magnitudes(model, seed=3):
    """Magnitudes away from their initial ||W_n||, so g differs per row (PEFT and fastlora names alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def peft_dora(targets=TARGETS["q-v"], **config):
    kw = dict(r=4, lora_alpha=8, use_dora=True, target_modules=copy.copy(targets))
    kw.update(config)
    model = get_peft_model(tiny_llama(), LoraConfig(**kw))
    randomize_lora_B(model)
    randomize_magnitudes(model)
    return model.eval()


def fastlora_name(peft_name):
    """base_model.model.X.lora_magnitude_vector.default.weight -> X.lora_magnitude (lora_A, lora_B alike)."""
    return (peft_name.removeprefix("base_model.model.").replace(".default.weight", "")
            .replace("lora_magnitude_vector", "lora_magnitude"))


def assert_matches_peft(model, peft_ref, ids=None):
    """Logits and the gradient of every trainable parameter (lora_A, lora_B, lora_magnitude) against PEFT."""
    ids = tokens() if ids is None else ids
    out, grads = logits_and_grads(model, ids)
    ref_out, ref_grads = logits_and_grads(peft_ref, ids)
    assert_close(out, ref_out, torch.float32, "logits")
    ref_grads = {fastlora_name(n): g for n, g in ref_grads.items()}
    assert grads.keys() == ref_grads.keys()
    assert any(n.endswith("lora_magnitude") for n in grads)
    for name in grads:
        assert_close(grads[name], ref_grads[name], torch.float32, name)


@pytest.mark.parametrize("targets", list(TARGETS.values()), ids=list(TARGETS))
def test_from_peft_matches_peft(targets):
    pm = peft_dora(targets, lora_dropout=0.1)  # eval: dropout off, but carried over
    ref = copy.deepcopy(pm).double()
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    magnitudes = {n: m.lora_magnitude_vector["default"].weight for n, m in pm.base_model.model.named_modules()
                  if hasattr(m, "lora_magnitude_vector")}
    model = fastlora.from_peft(pm)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fastlora.Linear)}
    assert len(layers) == (4 if targets == TARGETS["q-v"] else 14) and layers.keys() == magnitudes.keys()
    for name, layer in layers.items():
        assert layer.use_dora and layer.dropout == 0.1
        assert layer.lora_magnitude is magnitudes[name]  # shared, not copied
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert_matches_peft(model, ref)


def test_from_peft_fp16_base_with_fp32_adapters():
    def half_peft():
        pm = get_peft_model(tiny_llama().half(), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                            target_modules=["q_proj", "v_proj"]))
        randomize_lora_B(pm)
        randomize_magnitudes(pm)
        return pm.eval()

    pm = half_peft()
    expected = copy.deepcopy(pm).double()(tokens()).logits
    peft_error = (half_peft()(tokens()).logits.double() - expected).norm() / expected.norm()
    model = fastlora.from_peft(pm)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float16 and q.lora_A.dtype == q.lora_magnitude.dtype == torch.float32
    # bounded by PEFT's own fp16 error (measured: fastlora 6.1e-4, PEFT 5.8e-4)
    assert_close(model(tokens()).logits, expected, torch.float16, "fp16 logits", tol=2 * peft_error.item())


def test_from_peft_keeps_a_merged_dora_layer():
    pm = peft_dora()
    ref = copy.deepcopy(pm).double()
    pm.base_model.merge_adapter()
    model = fastlora.from_peft(pm)
    assert all(m.merged for m in model.modules() if isinstance(m, fastlora.Linear))
    assert_close(model(tokens()).logits, ref(tokens()).logits, torch.float32, "merged logits")
    fastlora.unmerge(model)  # divides by PEFT's g (its cached norm)
    assert_matches_peft(model, ref)


@pytest.mark.parametrize("targets", list(TARGETS.values()), ids=list(TARGETS))
def test_inject_matches_get_peft_model(targets):
    model = tiny_llama()
    names = fastlora.inject(model, targets, r=4, alpha=8, use_dora=True)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=copy.copy(targets)))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {fastlora_name(n) for n, p in pm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name in names:
            layer, peft_layer = model.get_submodule(name), pm.base_model.model.get_submodule(name)
            assert_close(layer.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight, torch.float32,
                         f"{name}: PEFT's initial magnitude")
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
    randomize_lora_B(model)
    randomize_lora_B(pm)
    assert_matches_peft(model, copy.deepcopy(pm).double().eval())


def test_trainer_loss_curve_matches_peft():
    peft_model, converted = peft_dora().train(), peft_dora().train()
    model = fastlora.from_peft(converted)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses, peft_losses = trainer_losses(converted), trainer_losses(peft_model)
    assert len(losses) == 4 and (losses[0] - losses[-1]).abs() > 0.05, losses  # the adapters learn something
    # fp32 both; measured: the logged (4-digit) losses equal, the parameters within 2e-7 relative
    torch.testing.assert_close(losses, peft_losses, rtol=1e-5, atol=0)
    trained = {fastlora_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, init[name]), f"{name} did not train"
            assert_close(p, trained[name], torch.float32, f"{name} after 4 steps vs PEFT")


def test_fastlora_dora_adapter_loads_in_peft(tmp_path):
    model = tiny_llama()
    fastlora.inject(model, ["q_proj", "o_proj"], r=4, alpha=8, use_dora=True)
    fastlora.inject(model, ["v_proj"], r=2, alpha=3, use_dora=True)
    randomize_lora_B(model)
    randomize_magnitudes(model)
    names = fastlora.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / adapters.CONFIG_NAME).read_text())
    assert config["use_dora"] is True and config["rank_pattern"] == {n: 2 for n in names if n.endswith("v_proj")}
    ref = PeftModel.from_pretrained(tiny_llama().double(), str(tmp_path / "ours")).eval()
    assert_close(model(tokens()).logits, ref(tokens()).logits, torch.float32, "logits")
    # PEFT writes the same keys (its magnitude key without ".weight") and the same tensors
    from safetensors.torch import load_file

    ref.float().save_pretrained(str(tmp_path / "peft"))
    ours, theirs = (load_file(tmp_path / d / adapters.WEIGHTS_NAME) for d in ("ours", "peft"))
    assert KEY in ours and ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("into", ["nn.Linear", "fastlora.Linear"])
def test_peft_dora_adapter_loads_in_fastlora(tmp_path, into):
    pm = peft_dora(TARGETS["q-v"] + ["down_proj"], use_rslora=True, lora_dropout=0.05, rank_pattern={"down_proj": 2})
    pm.save_pretrained(str(tmp_path))
    ref = copy.deepcopy(pm).double()
    model = tiny_llama()
    if into == "fastlora.Linear":  # plain LoRA layers there: replaced by DoRA ones
        fastlora.inject(model, ["q_proj", "v_proj", "down_proj"], r=8, alpha=1)
    names = fastlora.load_adapter(model, tmp_path)
    assert len(names) == 6
    for name in names:
        layer, peft_layer = model.get_submodule(name), pm.base_model.model.get_submodule(name)
        assert layer.use_dora and layer.r == peft_layer.r["default"] and layer.dropout == 0.05
        assert torch.equal(layer.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight)
    assert_matches_peft(model, ref)


def test_round_trip_fastlora_peft_fastlora(tmp_path):
    model = tiny_llama()
    fastlora.inject(model, "all-linear", r=3, alpha=6, use_dora=True)
    randomize_lora_B(model)
    randomize_magnitudes(model)
    fastlora.save_adapter(model, tmp_path / "a")
    PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).save_pretrained(str(tmp_path / "b"))
    back = tiny_llama()
    fastlora.load_adapter(back, tmp_path / "b")
    for (n, p), (m, q) in zip(model.named_parameters(), back.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n


def test_dora_and_plain_layers_in_one_model(tmp_path):
    """A DoRA adapter on q/v and a plain one on o/down: PEFT runs both active (one per layer); fastlora loads both
    files into one model, converts the PEFT model, and refuses to save the mix as one PEFT config."""
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]))
    randomize_lora_B(plain, seed=9)
    plain.save_pretrained(str(tmp_path / "plain"))
    peft_dora().save_pretrained(str(tmp_path / "dora"))

    def peft_mix():
        pm = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain"), is_trainable=True)
        pm.load_adapter(str(tmp_path / "dora"), adapter_name="dora", is_trainable=True)
        pm.base_model.set_adapter(["default", "dora"])
        return pm.eval()

    ref = copy.deepcopy(peft_mix()).double()
    model = tiny_llama()
    fastlora.load_adapter(model, tmp_path / "plain")
    fastlora.load_adapter(model, tmp_path / "dora")
    dora = {n: m.use_dora for n, m in model.named_modules() if isinstance(m, fastlora.Linear)}
    assert len(dora) == 8 and sum(dora.values()) == 4
    ids = tokens()
    ref_out = ref(ids).logits
    assert_close(model(ids).logits, ref_out, torch.float32, "fastlora.load_adapter x 2 vs PEFT")
    assert_close(fastlora.from_peft(peft_mix())(ids).logits, ref_out, torch.float32, "from_peft vs PEFT")
    with pytest.raises(ValueError, match=r"all layers DoRA or none.*nothing was written"):
        fastlora.save_adapter(model, tmp_path / "mix")
    assert not (tmp_path / "mix").exists()


def test_merge_unmerge_dora_model():
    model = tiny_llama()
    names = fastlora.inject(model, ["q_proj", "down_proj"], r=4, alpha=8, use_dora=True)
    randomize_lora_B(model)
    randomize_magnitudes(model)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    out = model(tokens()).logits.detach()
    assert fastlora.merge(model) == names
    assert_close(model(tokens()).logits, out, torch.float32, "merged logits")
    assert fastlora.unmerge(model) == names
    for n in names:
        assert_close(model.get_submodule(n).weight, weights[n], torch.float32, f"{n} weight after unmerge")


def _rewrite(path, change):
    """Apply ``change`` to the tensors of the adapter at ``path`` ({key: tensor} -> None) and save them back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / adapters.WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, path / adapters.WEIGHTS_NAME)


BAD_FILES = {
    "shape": (lambda t: t.update({KEY: t[KEY][:-1]}), ValueError, r"\.q_proj\.lora_magnitude_vector must have shape "
              r"\(out_features,\) = \(64,\) as lora_B \(64, 4\); got \(63,\)"),
    "dtype": (lambda t: t.update({KEY: t[KEY].to(torch.int32)}), ValueError,
              r"\.q_proj\.lora_magnitude_vector must be a floating-point tensor; got torch.int32"),
    "missing": (lambda t: t.pop(KEY), ValueError, r"\.q_proj\.lora_magnitude_vector is missing: .*use_dora: true"),
}


@pytest.mark.parametrize("change,error,match", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_magnitude_in_a_file_changes_nothing(tmp_path, change, error, match):
    peft_dora().save_pretrained(str(tmp_path))
    _rewrite(tmp_path, change)
    model = tiny_llama()
    fastlora.inject(model, ["q_proj", "v_proj"], r=2, alpha=4)
    randomize_lora_B(model)
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        fastlora.load_adapter(model, tmp_path)
    assert adapters.WEIGHTS_NAME in str(info.value)  # names the file
    assert_unchanged(before, snapshot(model))


def test_magnitude_in_a_plain_file_and_read_adapter(tmp_path):
    peft_dora().save_pretrained(str(tmp_path))
    config, weights, magnitudes = adapters.read_adapter_with_magnitudes(tmp_path)
    assert config["use_dora"] and magnitudes.keys() == weights.keys() and len(weights) == 4
    with pytest.raises(NotImplementedError, match="DoRA adapter.*read_adapter_with_magnitudes"):
        adapters.read_adapter(tmp_path)  # its callers would drop the magnitudes
    config["use_dora"] = False
    (tmp_path / adapters.CONFIG_NAME).write_text(json.dumps(config))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lora_magnitude_vector is a DoRA magnitude but adapter_config.json says "
                                         "use_dora: false"):
        fastlora.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


def test_inject_checks_use_dora():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        fastlora.inject(model, "all-linear", r=2, alpha=2, use_dora=1)
    assert type(model[0]) is nn.Linear


def test_grouped_layers_mix_dora_and_plain_folders(tmp_path):
    """load_adapters_grouped / add_adapters over a DoRA folder and a plain one: each sequence of one batch gets its
    own adapter's PEFT logits (DoRA, plain LoRA, base only); the stacks' magnitudes hold NaN rows for plain adapters."""
    dora = peft_dora()  # q_proj, v_proj
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"])).eval()
    randomize_lora_B(plain, seed=5)
    dora.save_pretrained(str(tmp_path / "dora"))
    plain.save_pretrained(str(tmp_path / "plain"))
    ids = tokens(batch=3)
    want = torch.cat([dora(ids[:1]).logits, plain(ids[1:2]).logits, tiny_llama()(ids[2:]).logits])

    model = tiny_llama()
    fastlora.load_adapters_grouped(model, [tmp_path / "dora", tmp_path / "plain"])
    q, k = (model.get_submodule(f"model.layers.0.self_attn.{p}") for p in ("q_proj", "k_proj"))
    assert q.lora_magnitude.shape == (2, 64) and torch.isnan(q.lora_magnitude[1]).all()
    assert torch.equal(q.lora_magnitude[0], dora.get_submodule(
        "base_model.model.model.layers.0.self_attn.q_proj").lora_magnitude_vector["default"].weight.detach())
    assert k.lora_magnitude is None  # no DoRA adapter has k_proj: a plain stack
    with fastlora.use_adapters(model, torch.tensor([0, 1, -1])[:, None].expand(3, ids.shape[1])):
        assert_close(model(ids).logits, want, torch.float32, "grouped DoRA + plain vs PEFT")

    served = tiny_llama()
    fastlora.load_adapters_grouped(served, [tmp_path / "plain"])
    assert fastlora.add_adapters(served, [tmp_path / "dora"]) == [1]  # a DoRA folder into a plain grouped model
    with fastlora.use_adapters(served, torch.tensor([1, 0, -1])[:, None].expand(3, ids.shape[1])):
        assert_close(served(ids).logits, want, torch.float32, "add_adapters(DoRA) vs PEFT")
