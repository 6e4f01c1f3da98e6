"""DoRA's norm caches (issue 42): by default nothing is cached, so an edit made any way, ``.data`` included, is seen
by the next call; ``fastlora.DoraCaching`` (opt-in, as PEFT's) caches with the documented semantics; a forward under
``torch.inference_mode`` leaves nothing that breaks a later forward with autograd. Linear, Linear4bit and
GroupedLinear with use_dora, against the float64 reference on the tensors as they are after the edit (tier A)."""

import pytest
import torch
import torch.nn as nn
from helpers import f64
from tolerance import assert_close

import fastlora
from fastlora import dora, reference

FP32 = torch.float32
KINDS = ["linear", "4bit", "grouped"]
IDS = [0, 2, 2, 1, 0, -1]


def make(kind, device):
    torch.manual_seed(0)
    if kind == "linear":
        layer = fastlora.Linear(64, 24, r=4, alpha=8, use_dora=True, device=device)
    elif kind == "4bit":
        layer = fastlora.Linear4bit(64, 24, r=4, alpha=8, use_dora=True, double_quant=False, compute_dtype=FP32,
                                    device=device)
    else:
        layer = fastlora.GroupedLinear(64, 24, ranks=[4, 8, 2], alpha=8, use_dora=True, device=device)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.3)
        layer.lora_magnitude.mul_(torch.rand(layer.lora_magnitude.shape, device=device) + 0.5)
    return layer


def call(layer, x):
    if isinstance(layer, fastlora.GroupedLinear):
        return layer(x, torch.tensor(IDS, device=x.device))
    return layer(x)


def ref_leaves(layer, x):
    """float64 leaves (x, A, B, m) requiring grad and the reference output built from them and the current base."""
    leaves = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude)
    xr, ar, br, mr = (t.detach().double().requires_grad_() for t in leaves)
    if isinstance(layer, fastlora.GroupedLinear):
        ids = torch.tensor(IDS, device=x.device)
        yr = reference.grouped_dora_linear(xr, *f64(layer.weight, layer.bias), ar, br, layer.scaling.double(), ids,
                                           mr, rank_offsets=layer.rank_offsets)
    else:
        w = layer.dequantized_weight(torch.float64) if isinstance(layer, fastlora.Linear4bit) else \
            layer.weight.double()
        yr = reference.dora_linear(xr, w, layer.bias.double(), ar, br, layer.scaling, mr)
    return yr, (xr, ar, br, mr)


def base_data(layer, which):
    """The tensor ``which`` names, as ``.data`` (an alias whose edits do not bump the parameter's version)."""
    if which == "absmax":
        return layer.quant_state.absmax.data
    return getattr(layer, which).data


def edit(layer, which):
    t = base_data(layer, which)
    if t.dtype == torch.uint8:  # packed 4-bit codes: rewrite the first rows' codes
        t.view(-1)[:200] = 0x77
    elif which == "scaling":
        t.mul_(-1.5)
    else:
        t.add_(0.5) if which.startswith("lora") else t.mul_(1.5)


CASES = [(k, w, "eval") for k in KINDS for w in ("lora_A", "lora_B", "weight")] + \
    [("4bit", "absmax", "eval"), ("grouped", "scaling", "eval")] + [(k, "weight", "train") for k in KINDS]


@pytest.mark.parametrize("kind,which,mode", CASES, ids=[f"{k}-{w}-{m}" for k, w, m in CASES])
def test_edits_through_data_are_seen_by_default(kind, which, mode, device):
    """Issue 42's repro: one forward, then an edit through ``.data`` (EMA updates, weight surgery, some loaders),
    which no version counter sees: the next forward is the reference on the edited tensors."""
    layer = make(kind, device).train(mode == "train")
    x = torch.randn(len(IDS), 64, device=device)
    before = call(layer, x)
    edit(layer, which)
    after = call(layer, x)
    assert_close(after, ref_leaves(layer, x)[0], FP32, f"y after {which}.data changed")
    assert (after - before).abs().max() > 1e-3, "the edit changes the output"


@pytest.mark.parametrize("kind", KINDS)
def test_caching_is_opt_in_and_trusts_version_counters(kind, device):
    """``DoraCaching``: the eval norm is computed once and reused; an update that bumps a version counter is seen, one
    through ``.data`` is not until caching is switched on again; a training forward and leaving the block drop it."""
    layer = make(kind, device).eval()
    x = torch.randn(len(IDS), 64, device=device)
    call(layer, x)
    assert layer._norm_cache is None, "nothing cached by default"
    with fastlora.DoraCaching():
        first = call(layer, x)
        first_norm = layer._norm_cache[1]
        assert layer._norm() is first_norm, "eval reuses the norm"
        with torch.no_grad():
            layer.lora_B.mul_(1.5)  # an optimizer step: bumps the version counter
        stepped = call(layer, x)
        norm = layer._norm_cache[1]
        assert norm is not first_norm
        assert_close(stepped, ref_leaves(layer, x)[0], FP32, "y after an in-place step")
        assert (stepped - first).abs().max() > 1e-3
        layer.lora_A.data.add_(0.5)
        call(layer, x)
        assert layer._norm_cache[1] is norm, "a .data edit is not seen while caching is on (documented)"
        with fastlora.DoraCaching():  # switched on again: fresh caches
            assert_close(call(layer, x), ref_leaves(layer, x)[0], FP32, "y after caching is switched on again")
        call(layer.train(), x)
        assert layer._norm_cache is None, "a training forward drops the eval norm"
        layer.eval()
        call(layer, x)
        assert layer._norm_cache is not None
    call(layer, x)
    assert layer._norm_cache is None, "off again: dropped"


@pytest.mark.parametrize("which", ["dense", "4bit"])
def test_weight_sq_cached_only_while_caching_is_on(which, device):
    layer = make("linear" if which == "dense" else "4bit", device)
    fn = (lambda: dora.weight_sq(layer.weight)) if which == "dense" else \
        (lambda: dora.weight_sq_4bit(layer.weight, layer.quant_state))
    assert fn() is not fn(), "recomputed each call by default"
    with fastlora.DoraCaching():
        first = fn()
        assert fn() is first
        with torch.inference_mode():
            assert fn() is not first, "an inference-mode value is kept apart"
    assert fn() is not first


@pytest.mark.parametrize("caching", [False, True], ids=["default", "caching"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_forward_then_autograd(kind, caching, device):
    """Issue 42: a forward under torch.inference_mode, then an eval forward with autograd on and its backward (PEFT
    runs the same sequence), then a training step: all match the reference."""
    layer = make(kind, device).eval()
    x = torch.randn(len(IDS), 64, device=device)
    with fastlora.DoraCaching(caching):
        with torch.inference_mode():
            y0 = call(layer, x)
        assert_close(y0, ref_leaves(layer, x)[0], FP32, "y under inference_mode")
        for mode in ("eval", "train"):
            layer.train(mode == "train").zero_grad(set_to_none=True)
            xs = x.clone().requires_grad_()
            y = call(layer, xs)
            yr, (xr, ar, br, mr) = ref_leaves(layer, x)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
            y.backward(dy)
            yr.backward(dy.double())
            got = [y, xs.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad]
            expected = [yr, xr.grad, ar.grad, br.grad, torch.nan_to_num(mr.grad)]
            for name, g, e in zip(("y", "dx", "dA", "dB", "dm"), got, expected, strict=True):
                assert_close(g, e, FP32, f"{mode} {name}")
