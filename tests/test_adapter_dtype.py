"""Adapter dtype: fp32 adapters over bf16/fp16 bases wherever fastlora creates them, as PEFT's default
``autocast_adapter_dtype=True`` makes them (issue 42, item 1), and the ``adapter_dtype=`` opt-out."""

import collections
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from tolerance import assert_close

import fastlora

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]
TARGETS = ["q_proj", "v_proj"]


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_layers_make_fp32_adapters_over_a_16bit_base(dtype, use_dora):
    base = nn.Linear(24, 16, dtype=dtype)
    layers = [fastlora.Linear(24, 16, r=4, use_dora=use_dora, dtype=dtype),
              fastlora.Linear.from_linear(base, r=4, use_dora=use_dora),
              fastlora.GroupedLinear(24, 16, ranks=[4, 0, 8], use_dora=use_dora, dtype=dtype)]
    for layer in layers:
        params = adapter_params(layer)
        assert len(params) == (3 if use_dora else 2)
        assert {p.dtype for p in params.values()} == {torch.float32}, type(layer).__name__
        assert layer.weight.dtype == dtype
    if use_dora:  # PEFT's initial magnitude ||W_n||, now kept in fp32 (g = 1 at init, not 1 +- bf16 rounding)
        want = torch.linalg.vector_norm(base.weight.double(), dim=1)
        assert_close(layers[1].lora_magnitude, want, torch.float32, "magnitude")
        assert_close(layers[2].lora_magnitude[2], layers[2].weight.double().norm(dim=1), torch.float32, "grouped m")


def test_adapter_dtype_opt_out_and_fp32_bases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        layer = fastlora.Linear(8, 8, r=2, use_dora=True, dtype=torch.bfloat16, adapter_dtype=dtype)
        grouped = fastlora.GroupedLinear(8, 8, num_adapters=2, r=2, use_dora=True, dtype=torch.float16,
                                         adapter_dtype=dtype)
        for p in (*adapter_params(layer).values(), *adapter_params(grouped).values()):
            assert p.dtype == dtype
    for layer in (fastlora.Linear(8, 8, r=2), fastlora.GroupedLinear(8, 8, num_adapters=2)):
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # fp32 base: fp32, as PEFT
    assert fastlora.Linear(8, 8, r=2, dtype=torch.float64).lora_A.dtype == torch.float64  # PEFT upcasts 16-bit only


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "float32", 32])
def test_bad_adapter_dtype_raises_naming_it(bad):
    base = nn.Linear(8, 8, dtype=torch.bfloat16)
    for build in (lambda: fastlora.Linear(8, 8, adapter_dtype=bad),
                  lambda: fastlora.Linear.from_linear(base, adapter_dtype=bad),
                  lambda: fastlora.GroupedLinear(8, 8, num_adapters=1, adapter_dtype=bad),
                  lambda: fastlora.Linear4bit(64, 8, adapter_dtype=bad)):
        with pytest.raises(TypeError, match="adapter_dtype must be"):
            build()
    assert base.weight.requires_grad  # refused before from_linear froze the base


def test_linear4bit_adapters_fp32_by_default_and_opt_out():
    for layer in (fastlora.Linear4bit(64, 16, r=4, use_dora=True, compute_dtype=torch.float16),
                  fastlora.Linear4bit.from_linear(nn.Linear(64, 16, dtype=torch.bfloat16), r=4, use_dora=True)):
        assert {p.dtype for p in adapter_params(layer).values()} == {torch.float32}
    layer = fastlora.Linear4bit(64, 16, r=4, use_dora=True, compute_dtype=torch.float16, adapter_dtype=torch.float16)
    assert {p.dtype for p in adapter_params(layer).values()} == {torch.float16}
    new = layer._with_new_adapter(r=2, alpha=4)
    assert new.lora_A.dtype == torch.float32


# -- models: inject / load_adapter / save_adapter against PEFT -------------------------------------------------------

def tiny(dtype):
    from tiny import tiny_llama  # needs transformers: imported here, so the layer tests above run without

    return tiny_llama().to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_inject_adapter_dtypes_match_get_peft_model(dtype, use_dora):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          use_dora=use_dora))
    model = tiny(dtype)
    names = fastlora.inject(model, TARGETS, r=4, alpha=8, use_dora=use_dora)
    for name in names:
        ours, theirs = model.get_submodule(name), pm.base_model.model.get_submodule(name)
        pairs = [(ours.lora_A, theirs.lora_A["default"].weight), (ours.lora_B, theirs.lora_B["default"].weight)]
        if use_dora:
            pairs.append((ours.lora_magnitude, theirs.lora_magnitude_vector["default"].weight))
        for mine, peft_param in pairs:
            assert mine.dtype == peft_param.dtype == torch.float32, name
            assert mine.requires_grad
        assert ours.weight.dtype == dtype
    low = tiny(dtype)
    fastlora.inject(low, TARGETS, r=4, alpha=8, use_dora=use_dora, adapter_dtype=dtype)
    assert {p.dtype for p in adapter_params(low).values()} == {dtype}
    with pytest.raises(TypeError, match="adapter_dtype"):
        fastlora.inject(tiny(dtype), TARGETS, r=4, alpha=8, adapter_dtype=torch.int32)


def adam_steps(model, steps=3, lr=1e-4):
    """``steps`` Adam steps on one batch; {name: fraction of the entries that moved} for every adapter parameter."""
    from tiny import tokens

    params = adapter_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    ids = tokens()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return {n: (p.detach() != before[n]).double().mean().item() for n, p in params.items()}


def test_bf16_dora_adam_moves_every_adapter_entry():
    """The issue's run: a bf16 tiny Llama, inject(use_dora=True), 3 Adam steps at lr 1e-4. With bf16 adapters 0% of the
    magnitude (values ~0.15, bf16 spacing 1e-3 > the step) and ~25% of lora_A moved; PEFT (fp32 adapters) moves all.
    lora_B starts at zero, so lora_A gets its first gradient at step 2."""
    model = tiny(torch.bfloat16)
    fastlora.inject(model, TARGETS, r=4, alpha=8, use_dora=True)
    moved = adam_steps(model)
    assert len(moved) == 3 * 2 * len(TARGETS)
    assert all(f == 1.0 for f in moved.values()), {n: f for n, f in moved.items() if f < 1.0}


def test_fp16_gradscaler_recipe_runs():
    """torch.amp.GradScaler over a fp16 model: its unscale refuses fp16 gradients ('Attempting to unscale FP16
    gradients'); fp32 adapters give fp32 gradients, so the usual recipe trains."""
    from tiny import tokens

    model = tiny(torch.float16).train()
    fastlora.inject(model, TARGETS, r=4, alpha=8, use_dora=True)
    params = adapter_params(model)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ids = tokens()
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(model(ids, labels=ids).loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**10  # no step skipped for inf/NaN gradients
    for name, p in params.items():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        if "lora_B" in name:
            assert p.count_nonzero() == p.numel(), name  # trained away from its zero init


def save_peft_16bit(path, dtype, use_dora):
    """A PEFT adapter over tiny(dtype) saved with 16-bit tensors (``autocast_adapter_dtype=False``), lora_B random."""
    peft = pytest.importorskip("peft")
    from tiny import randomize_lora_B

    torch.manual_seed(3)
    pm = peft.get_peft_model(tiny(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          use_dora=use_dora), autocast_adapter_dtype=False)
    randomize_lora_B(pm, seed=4)
    pm.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_load_adapter_upcasts_a_16bit_file_as_peft_does(tmp_path, use_dora):
    from safetensors.torch import load_file
    from tiny import tokens

    peft = pytest.importorskip("peft")
    dtype = torch.bfloat16
    path = save_peft_16bit(tmp_path / "a", dtype, use_dora)
    stored = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {dtype}
    ref = peft.PeftModel.from_pretrained(tiny(dtype), str(path), is_trainable=True)
    model = tiny(dtype)
    names = fastlora.load_adapter(model, path)
    for name in names:
        ours, theirs = model.get_submodule(name), ref.base_model.model.get_submodule(name)
        assert ours.lora_A.dtype == theirs.lora_A["default"].weight.dtype == torch.float32
        assert torch.equal(ours.lora_A, theirs.lora_A["default"].weight)
        assert torch.equal(ours.lora_B, theirs.lora_B["default"].weight)
        if use_dora:
            assert ours.lora_magnitude.dtype == torch.float32
            assert torch.equal(ours.lora_magnitude, theirs.lora_magnitude_vector["default"].weight)
    ids = tokens()
    with torch.no_grad():
        assert_close(model.eval()(ids).logits, ref.eval()(ids).logits.double(), torch.bfloat16, "logits vs PEFT")
    kept = tiny(dtype)
    fastlora.load_adapter(kept, path, adapter_dtype=dtype)
    assert kept.get_submodule(names[0]).lora_A.dtype == dtype


def test_save_adapter_writes_fp32_like_peft(tmp_path):
    """Over a bf16 base both write fp32 tensors (PEFT saves adapters in their own dtype); the config is PEFT's."""
    from safetensors.torch import load_file

    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny(torch.bfloat16), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   use_dora=True))
    pm.save_pretrained(str(tmp_path / "peft"))
    model = tiny(torch.bfloat16)
    fastlora.inject(model, TARGETS, r=4, alpha=8, use_dora=True)
    fastlora.save_adapter(model, tmp_path / "ours")
    theirs, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert sorted(ours) == sorted(theirs)
    assert {k: t.dtype for k, t in ours.items()} == {k: t.dtype for k, t in theirs.items()}
    assert {t.dtype for t in ours.values()} == {torch.float32}
    with open(tmp_path / "ours" / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_of_fp32_adapters_into_a_bf16_base_is_peft_s(use_dora):
    """merge adds the fp32 update to W in fp32 and rounds once, as PEFT's merge: the merged bf16 weight equals PEFT's
    bit for bit (rounding s B A to bf16 first, then the sum, differed in ~30% of the entries). unmerge restores W to
    within bf16 rounding, and the merged layer computes the unmerged one's function."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(48, 40, dtype=torch.bfloat16)
    theirs = peft.get_peft_model(nn.Sequential(collections.OrderedDict(proj=copy.deepcopy(base))),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=use_dora))
    proj = theirs.base_model.model.proj
    layer = fastlora.Linear.from_linear(base, r=4, alpha=8, use_dora=use_dora).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        pairs = [(layer.lora_A, proj.lora_A["default"].weight), (layer.lora_B, proj.lora_B["default"].weight)]
        if use_dora:
            layer.lora_magnitude.mul_(torch.rand(40) + 0.5)
            pairs.append((layer.lora_magnitude, proj.lora_magnitude_vector["default"].weight))
        for mine, peft_param in pairs:
            assert mine.dtype == peft_param.dtype == torch.float32
            peft_param.copy_(mine)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 48).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        proj.merge()
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight, proj.base_layer.weight), "merged W differs from PEFT's"
        assert_close(layer(x), y.double(), torch.bfloat16, "merged forward")
        layer.unmerge()
    assert_close(layer.weight, w0.double(), torch.bfloat16, "unmerged weight")


def test_grouped_loaders_make_fp32_stacks_over_a_16bit_base(tmp_path):
    """load_adapters_grouped (a bf16 DoRA file and a plain one), add_adapters and remove_adapters: fp32 stacks and
    magnitude over the bf16 base; an explicit adapter_dtype stays, and add/remove keep a layer's stack dtype."""
    dtype = torch.bfloat16
    paths = [save_peft_16bit(tmp_path / "dora", dtype, True), save_peft_16bit(tmp_path / "plain", dtype, False)]
    model = tiny(dtype)
    fastlora.load_adapters_grouped(model, paths[:1])
    layers = [m for m in model.modules() if isinstance(m, fastlora.GroupedLinear)]
    assert layers and all(m.lora_A.dtype == m.lora_B.dtype == m.lora_magnitude.dtype == torch.float32
                          and m.weight.dtype == dtype for m in layers)
    fastlora.add_adapters(model, paths[1:])
    fastlora.remove_adapters(model, [0])
    layers = [m for m in model.modules() if isinstance(m, fastlora.GroupedLinear)]
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in layers)
    low = tiny(dtype)
    fastlora.add_adapters(low, paths[:1], adapter_dtype=dtype)
    fastlora.add_adapters(low, paths[1:], adapter_dtype=torch.float32)  # existing layers keep their stacks' dtype
    assert all(m.lora_A.dtype == m.lora_magnitude.dtype == dtype
               for m in low.modules() if isinstance(m, fastlora.GroupedLinear))
    before = dict(low.named_parameters())
    with pytest.raises(TypeError, match="adapter_dtype"):
        fastlora.add_adapters(low, paths[:1], adapter_dtype="bf16")
    assert all(p is before[n] for n, p in low.named_parameters())  # the same parameters: no layer was swapped
