"""fastlora.Linear: PEFT layout and defaults, merge/unmerge, from_linear, trainable set, input errors."""

import pytest
import torch
from tolerance import assert_close

import fastlora


def test_fresh_layer_equals_its_base(device):
    torch.manual_seed(0)
    layer = fastlora.Linear(40, 24, device=device)
    assert layer.lora_A.shape == (8, 40) and layer.lora_B.shape == (24, 8) and layer.scaling == 1.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(5, 40, device=device)
    assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias).double(), torch.float32, "y")


def test_only_lora_parameters_train(device):
    layer = fastlora.Linear(16, 8, r=4, alpha=16, device=device)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.scaling == 4.0
    assert fastlora.Linear(16, 8, r=4, alpha=16, use_rslora=True).scaling == 8.0


def test_merge_unmerge_round_trip(device):
    torch.manual_seed(1)
    layer = fastlora.Linear(48, 32, r=4, alpha=8, device=device)
    torch.nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 48, device=device)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y.double(), torch.float32, "merged")
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, w0.double(), torch.float32, "weight")
    assert_close(layer(x), y.double(), torch.float32, "unmerged")


def test_from_linear_shares_storage(device):
    base = torch.nn.Linear(20, 12, device=device)
    layer = fastlora.Linear.from_linear(base, r=2, alpha=4, dropout=0.1)
    assert layer.weight.data_ptr() == base.weight.data_ptr() and layer.bias.data_ptr() == base.bias.data_ptr()
    assert not base.weight.requires_grad and layer.dropout == 0.1 and layer.scaling == 2.0
    with torch.no_grad():
        base.weight.add_(1.0)
    assert torch.equal(layer.weight, base.weight)
    with pytest.raises(TypeError, match="nn.Linear"):
        fastlora.Linear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_training_step_updates_only_adapters(device):
    torch.manual_seed(2)
    model = torch.nn.Sequential(fastlora.Linear(32, 32, r=4, device=device), torch.nn.GELU(),
                                fastlora.Linear(32, 8, r=4, dropout=0.1, device=device))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    w = [m.weight.detach().clone() for m in (model[0], model[2])]
    b0 = model[2].lora_B.detach().clone()
    loss = model(torch.randn(6, 32, device=device)).square().mean()
    loss.backward()
    opt.step()
    assert torch.equal(w[0], model[0].weight) and torch.equal(w[1], model[2].weight)
    assert not torch.equal(b0, model[2].lora_B)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: {**a, "x": a["x"][:, :-1]}, ValueError, r"x's last dimension must equal in_features = 16"),
        (lambda a: {**a, "lora_A": a["lora_A"][:, :-1]}, ValueError, r"lora_A must have shape \(r, in_features\)"),
        (lambda a: {**a, "lora_B": a["lora_B"][:, :2]}, ValueError,
         r"lora_B must have shape .* = \(8, 4\); got \(8, 2\)"),
        (lambda a: {**a, "bias": a["bias"][:3]}, ValueError, r"bias must have shape"),
        (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "share a dtype"),
        (lambda a: {**a, "lora_A": a["lora_A"].int()}, TypeError, "lora_A must be float16"),
        (lambda a: {**a, "scaling": "2"}, TypeError, "scaling must be a number"),
        (lambda a: {**a, "lora_A": torch.zeros(300, 16), "lora_B": torch.zeros(8, 300)}, ValueError, "r must be in"),
    ],
    ids=["x-K", "A-shape", "B-shape", "bias", "dtype", "A-dtype", "scaling", "rank"],
)
def test_bad_input_errors(mutate, exc, match):
    args = dict(x=torch.randn(3, 16), weight=torch.randn(8, 16), bias=torch.randn(8), lora_A=torch.randn(4, 16),
                lora_B=torch.randn(8, 4), scaling=1.0)
    with pytest.raises(exc, match=match):
        fastlora.lora_linear(**mutate(args))


def test_bad_dropout_and_seed():
    args = (torch.randn(3, 16), torch.randn(8, 16), None, torch.randn(4, 16), torch.randn(8, 4), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        fastlora.lora_linear(*args, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="seed"):
        fastlora.lora_linear(*args, dropout_p=0.1, training=True, seed=-1)
    with pytest.raises(ValueError, match="dropout"):
        fastlora.Linear(4, 4, dropout=1.5)


@pytest.mark.parametrize("dev,dtype", [("cpu", torch.float16),
                                       pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=["cpu-fp16", "cuda-bf16"])
def test_autocast_computes_like_nn_linear(dev, dtype):
    torch.manual_seed(3)
    layer = fastlora.Linear(32, 16, r=4, device=dev)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32, device=dev)
    with torch.autocast(dev, dtype=dtype):
        y = layer(x)
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == base.dtype == dtype
    ref = fastlora.reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                         layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
    assert_close(y, ref, dtype, "y")


def test_bf16_on_cpu_takes_the_reference():
    """The interpreter's bf16 tl.dot is wrong, so CPU bf16 must not reach the kernels (it would be silently wrong)."""
    torch.manual_seed(4)
    x, w, b = torch.randn(6, 40), torch.randn(24, 40) / 7, torch.randn(24)
    a, bb = torch.randn(4, 40) / 7, torch.randn(24, 4)
    args16 = [t.bfloat16() for t in (x, w, b, a, bb)]
    y = fastlora.lora_linear(*args16, 0.5)
    ref = fastlora.reference.lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.5)
    assert_close(y, ref, torch.bfloat16, "y")
    ids = torch.tensor([0, -1, 1, 1, 0, -1])
    yg = fastlora.grouped_lora_linear(args16[0], args16[1], args16[2], torch.stack([args16[3]] * 2),
                                      torch.stack([args16[4]] * 2), 0.5, ids)
    refg = fastlora.reference.grouped_lora_linear(x.double(), w.double(), b.double(),
                                                  torch.stack([a.double()] * 2), torch.stack([bb.double()] * 2),
                                                  0.5, ids)
    assert_close(yg, refg, torch.bfloat16, "grouped y")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_meta_tensors_infer_shapes_like_nn_linear(train):
    x = torch.empty(3, 5, 64, device="meta", requires_grad=True)
    ref = torch.nn.Linear(64, 32, device="meta")(x)
    layer = fastlora.Linear(64, 32, r=4, dropout=0.1, device="meta").train(train)
    y = layer(x)
    assert (y.shape, y.device, y.dtype) == (ref.shape, ref.device, ref.dtype)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora_A.grad.shape == layer.lora_A.shape
    grouped = fastlora.GroupedLinear(64, 32, num_adapters=3, r=4, dropout=0.1, device="meta").train(train)
    yg = grouped(x, torch.zeros(3, 5, dtype=torch.long, device="meta"))
    assert (yg.shape, yg.device) == (ref.shape, ref.device)
