"""``fastlora.LinearFP8``: a block-scaled FP8 base (as DeepSeek/Qwen FP8 checkpoints ship it) with a LoRA or DoRA
adapter. The layer against the float64 reference on its exactly dequantised weight (kernels under the interpreter on
CPU), its construction from an ``nn.Linear`` and from a checkpoint's FP8 layer (shared, not copied), state dicts in
the checkpoint's keys, dtype casts, merge refusal, and the errors."""

import pytest
import torch
import torch.nn as nn
from helpers import CheckpointFP8Linear, created_tensors, f64, gemm_weights, wide_float_sizes
from tolerance import assert_close

import fastlora
from fastlora import quant, reference

FP8 = torch.float8_e4m3fn


def _random_adapter(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        if layer.use_dora:
            layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude.shape, generator=g))


def _oracle(layer, x):
    """The float64 reference of ``layer`` on x (leaves for x and the adapter, to compare gradients)."""
    xr, ar, br = f64(x, layer.lora_A, layer.lora_B)
    mr = f64(layer.lora_magnitude)[0] if layer.use_dora else None
    bias = None if layer.bias is None else layer.bias.detach().double()
    y = reference.lora_linear_fp8(xr, layer.weight, layer.weight_scale_inv, bias, ar, br, layer.scaling,
                                  block_size=layer.block_size, magnitude=mr)
    return y, [xr, ar, br] + ([mr] if mr is not None else [])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("K,N,block,bias", [(200, 136, (128, 128), True), (96, 70, (64, 32), False)],
                         ids=["200x136-128x128-bias", "96x70-64x32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_matches_reference(K, N, block, bias, dora, dtype, monkeypatch):
    """Forward and every gradient (x, lora_A, lora_B, lora_magnitude) of the fused kernels against float64; the
    kernels really run (``_launch.gemm`` is called), the base stays frozen and the adapters fp32."""
    torch.manual_seed(0)
    layer = fastlora.LinearFP8.from_linear(nn.Linear(K, N, bias=bias), r=6, alpha=12, use_dora=dora,
                                           block_size=block)
    assert layer.weight.dtype == FP8 and layer.lora_A.dtype == torch.float32 and not layer.weight.requires_grad
    _random_adapter(layer)
    if bias:
        layer.bias.data = layer.bias.data.to(dtype)
    calls = gemm_weights(monkeypatch)
    x = torch.randn(3, 11, K).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and calls
    yr, leaves = _oracle(layer, x)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    params = [x, layer.lora_A, layer.lora_B] + ([layer.lora_magnitude] if dora else [])
    outs, refs = [y] + [p.grad for p in params], [yr] + [t.grad for t in leaves]
    for name, p, ref in zip(("y", "dx", "dA", "dB", "dm"), outs, refs, strict=False):
        assert_close(p, ref, dtype, name)
    assert layer.weight.grad is None and layer.weight_scale_inv.grad is None


def test_fresh_layer_is_the_dequantized_base():
    """lora_B starts at zero and the magnitude at ||W_n||: a fresh layer (built here or from an nn.Linear, LoRA or
    DoRA) computes x deq(W)^T + b, deq(W) within e4m3's rounding of the nn.Linear's W."""
    torch.manual_seed(0)
    lin = nn.Linear(300, 260)
    x = torch.randn(5, 300)
    for layer in (fastlora.LinearFP8.from_linear(lin, r=4), fastlora.LinearFP8.from_linear(lin, r=4, use_dora=True),
                  fastlora.LinearFP8(300, 260, r=4, use_dora=True)):
        w = layer.dequantized_weight(torch.float64)
        with torch.no_grad():
            assert_close(layer(x), x.double() @ w.T + layer.bias.double(), torch.float32, "y")
    q = fastlora.LinearFP8.from_linear(lin, r=4).dequantized_weight(torch.float32)
    assert ((q - lin.weight).abs() <= lin.weight.abs() / 16 + 1e-6).all()  # e4m3: 3 mantissa bits


def test_built_layer_never_holds_its_weight_wide():
    """The constructor quantises a row block at a time: no 16/32-bit tensor of the whole weight's size is made."""
    N, K = 1024, 4096
    with created_tensors() as seen:
        layer = fastlora.LinearFP8(K, N, r=4, block_size=(128, 128))
    assert layer.weight.shape == (N, K) and max(wide_float_sizes(seen)) <= 2 * 128 * K < N * K  # 2^20 at a time
    assert layer.weight_scale_inv.shape == (8, 32)
    w = layer.dequantized_weight(torch.float32)
    assert 0 < w.abs().max() <= 1 / K**0.5 and w.std() > 0.3 / K**0.5  # nn.Linear's uniform init, quantised


def test_from_checkpoint_layer_shares_its_tensors():
    """A checkpoint's FP8 layer (weight + weight_scale_inv + block_size, bf16 scales as Qwen ships them) is wrapped
    without a copy: the same tensors, its block size; the result is the reference on them."""
    torch.manual_seed(0)
    base = CheckpointFP8Linear(torch.randn(130, 200), torch.randn(130), block_size=(64, 128),
                               scale_dtype=torch.bfloat16)
    layer = fastlora.LinearFP8.from_linear(base, r=4, alpha=4, block_size=(128, 128))
    assert layer.weight is base.weight and layer.weight_scale_inv is base.weight_scale_inv
    assert layer.bias is base.bias and layer.block_size == (64, 128) and not layer.bias.requires_grad
    _random_adapter(layer)
    x = torch.randn(7, 200)
    with torch.no_grad():
        assert_close(layer(x), _oracle(layer, x)[0], torch.float32, "y")
        assert_close(layer(x) - layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T, base(x), torch.float32, "base")
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv", "bias", "lora_A", "lora_B"}


def test_transformers_fp8_linear_is_wrapped_by_inject():
    """transformers' ``FP8Linear`` (what ``from_pretrained`` of an FP8 checkpoint builds) inside a model:
    ``fastlora.inject`` makes it a ``fastlora.LinearFP8`` over the same tensors."""
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    torch.manual_seed(0)
    fp8 = finegrained.FP8Linear(256, 192, block_size=(128, 128), has_bias=True)
    q, s = quant.quantize_fp8_blockwise(torch.randn(192, 256))
    with torch.no_grad():
        fp8.weight.copy_(q)
        fp8.weight_scale_inv.copy_(s)
        fp8.bias.normal_()
    model = nn.Sequential(nn.Linear(256, 256), fp8)
    assert fastlora.inject(model, ["1"], r=8, alpha=16) == ["1"]
    layer = model[1]
    assert isinstance(layer, fastlora.LinearFP8) and layer.weight is fp8.weight
    assert layer.weight_scale_inv is fp8.weight_scale_inv and layer.block_size == (128, 128)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.lora_A", "1.lora_B"]
    _random_adapter(layer)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert_close(layer(x), _oracle(layer, x)[0], torch.float32, "y")


def test_inject_selects_fp8_layers_among_others():
    """"all-linear" over a model mixing nn.Linear and FP8 layers: each gets its own fastlora layer."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(a=nn.Linear(64, 96), b=CheckpointFP8Linear(torch.randn(80, 96)), c=nn.Linear(80, 8),
                               lm_head=nn.Linear(8, 8)))
    assert fastlora.inject(model, "all-linear", r=4, alpha=8) == ["a", "b", "c"]
    assert [type(m) for m in model.values()] == [fastlora.Linear, fastlora.LinearFP8, fastlora.Linear, nn.Linear]


def test_dtype_casts_keep_the_fp8_base():
    """``.half()`` / ``.to(torch.bfloat16)`` cast the bias and the adapters and leave the e4m3 weight and its scales
    (nn.Module counts float8 as floating point and would otherwise cast it); the order of the state dict is kept."""
    layer = fastlora.LinearFP8(200, 72, r=4)
    keys = list(layer.state_dict())
    w, s = layer.weight.clone(), layer.weight_scale_inv.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.to("cpu")):
        cast(layer)
        assert layer.weight.dtype == FP8 and layer.weight_scale_inv.dtype == torch.float32
        assert torch.equal(layer.weight.view(torch.uint8), w.view(torch.uint8))
        assert torch.equal(layer.weight_scale_inv, s)
        assert isinstance(layer.weight, nn.Parameter) and list(layer.state_dict()) == keys
    layer.half()
    assert layer.bias.dtype == layer.lora_A.dtype == torch.float16
    meta = layer.to("meta")
    assert meta.weight.device.type == meta.weight_scale_inv.device.type == "meta"


def test_checkpoint_loads_byte_for_byte_without_wide_weights(tmp_path):
    """An FP8 checkpoint written by safetensors (weight + weight_scale_inv keys, as DeepSeek/Qwen ship them) loads
    straight into a model of ``LinearFP8`` layers: the same bytes and scales, only the adapters missing, and no
    16/32-bit tensor of a weight's size made while building the model or loading it."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    K, N = 2048, 1280
    dense = nn.Sequential(nn.Linear(K, N), nn.Linear(N, K, bias=False))
    ckpt = {}
    for i, lin in enumerate(dense):
        q, s = quant.quantize_fp8_blockwise(lin.weight.detach(), scale_dtype=torch.bfloat16)
        ckpt[f"{i}.weight"], ckpt[f"{i}.weight_scale_inv"] = q, s
        if lin.bias is not None:
            ckpt[f"{i}.bias"] = lin.bias.detach().to(torch.bfloat16)
    save_file(ckpt, tmp_path / "model.safetensors")
    with created_tensors() as seen:
        model = nn.Sequential(fastlora.LinearFP8(K, N, r=8, dtype=torch.bfloat16, scale_dtype=torch.bfloat16),
                              fastlora.LinearFP8(N, K, bias=False, r=8, scale_dtype=torch.bfloat16))
        result = model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert max(wide_float_sizes(seen)) < N * K
    assert sorted(result.missing_keys) == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"]
    assert not result.unexpected_keys
    for i in range(2):
        assert torch.equal(model[i].weight.view(torch.uint8), ckpt[f"{i}.weight"].view(torch.uint8))
        assert torch.equal(model[i].weight_scale_inv, ckpt[f"{i}.weight_scale_inv"])
    x = torch.randn(3, K)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), quant.dequantize_fp8_blockwise(
            ckpt["0.weight"], ckpt["0.weight_scale_inv"], dtype=torch.float64), ckpt["0.bias"].double())
        assert_close(model[0](x), ref, torch.float32, "y")


def test_bad_checkpoint_tensors_are_refused_and_change_nothing():
    layer = fastlora.LinearFP8(200, 136, r=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = {k: v.clone() for k, v in before.items()}
    bad_scale = {**sd, "weight_scale_inv": torch.ones(3, 2)}
    with pytest.raises(RuntimeError, match=r"weight_scale_inv.*\(2, 2\).*\(136, 200\).*\(3, 2\)"):
        layer.load_state_dict(bad_scale)
    with pytest.raises(RuntimeError, match=r"weight: a torch.bfloat16 weight cannot load into an FP8 base"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "weight_scale_inv"}
                              | {"weight": torch.zeros(136, 200, dtype=torch.bfloat16)}, strict=False)
    with pytest.raises(RuntimeError, match=r"weight has shape \(136, 199\); this layer's is \(136, 200\)"):
        layer.load_state_dict({**sd, "weight": sd["weight"][:, :199].contiguous()})
    for k, v in layer.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype == FP8 else v, before[k].view(torch.uint8)
                           if v.dtype == FP8 else before[k]), k


def test_unsupported_scales_are_refused():
    """Per-tensor scales and UE8M0 (power-of-two) scales: NotImplementedError naming what is supported, from the
    layer and from ``inject`` (naming the layer), before the model changes."""
    base = CheckpointFP8Linear(torch.randn(64, 64))
    per_tensor = CheckpointFP8Linear(torch.randn(64, 64))
    per_tensor.block_size = None
    per_tensor.weight_scale_inv = nn.Parameter(torch.tensor(0.5), requires_grad=False)
    with pytest.raises(NotImplementedError, match="per-tensor scales"):
        fastlora.LinearFP8.from_linear(per_tensor)
    model = nn.Sequential(base, per_tensor)
    with pytest.raises(NotImplementedError, match="'1': an FP8 weight with per-tensor scales"):
        fastlora.inject(model, "all-linear", r=4, alpha=4)
    assert model[0] is base and model[1] is per_tensor
    if hasattr(torch, "float8_e8m0fnu"):
        ue8m0 = CheckpointFP8Linear(torch.randn(64, 64))
        ue8m0.weight_scale_inv = nn.Parameter(torch.ones(1, 1, dtype=torch.float8_e8m0fnu), requires_grad=False)
        with pytest.raises(NotImplementedError, match="UE8M0"):
            fastlora.LinearFP8.from_linear(ue8m0)
    wrong = CheckpointFP8Linear(torch.randn(64, 300))
    wrong.block_size = (64, 64)
    with pytest.raises(ValueError, match=r"'0': fastlora cannot read this FP8 linear's scales.*\(1, 5\)"):
        fastlora.inject(nn.Sequential(wrong), ["0"], r=4, alpha=4)


def test_argument_errors():
    with pytest.raises(ValueError, match="block_size must be two positive ints"):
        fastlora.LinearFP8(64, 64, block_size=(128,))
    with pytest.raises(TypeError, match="scale_dtype must be torch.float32 or torch.bfloat16"):
        fastlora.LinearFP8(64, 64, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="r must be an int"):
        fastlora.LinearFP8.from_linear(nn.Linear(64, 64), r=0)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        fastlora.LinearFP8.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="adapter_dtype"):
        fastlora.LinearFP8(64, 64, adapter_dtype=torch.float64)
    layer = fastlora.LinearFP8(64, 64, r=4)
    with pytest.raises(ValueError, match="in_features = 64"):
        layer(torch.randn(2, 63))


def test_merge_is_refused_and_dequantize_merges():
    """merge would re-quantise the base: refused (also by ``fastlora.merge`` before any other layer changes);
    ``dequantize()`` gives a ``fastlora.Linear`` sharing the adapter that computes the same function and merges."""
    torch.manual_seed(0)
    layer = fastlora.LinearFP8.from_linear(nn.Linear(160, 96), r=4, alpha=8, use_dora=True)
    _random_adapter(layer)
    with pytest.raises(NotImplementedError, match="cannot merge its DoRA adapter"):
        layer.merge()
    dense = nn.Linear(96, 96)
    model = nn.Sequential(layer, fastlora.Linear.from_linear(dense, r=2))
    w = dense.weight.clone()
    with pytest.raises(NotImplementedError, match="merge of layer '0'"):
        fastlora.merge(model)
    assert torch.equal(dense.weight, w) and not model[1].merged
    lin = layer.dequantize(torch.float32)
    assert lin.lora_A is layer.lora_A and lin.lora_magnitude is layer.lora_magnitude
    x = torch.randn(6, 160)
    with torch.no_grad():
        y = layer(x)
        assert_close(lin(x), y, torch.float32, "dequantized")
        lin.merge()
        assert_close(lin(x), y, torch.float32, "merged")
