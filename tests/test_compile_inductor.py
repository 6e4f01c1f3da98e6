"""torch.compile(backend="inductor", fullgraph=True), the backend users compile with, over every fastlora custom op
(fastlora::lora_*, dora_*, dora_norm_4bit, grouped_dora_*): forward and gradients equal eager. Inductor checks each
op's real output strides against its fake implementation's, which aot_eager (tests/test_compile.py) does not.
Kept to two small compiles per test: inductor builds C++ on the CPU."""

import pytest
import torch
import torch.nn as nn
from tolerance import assert_close

import fastlora


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomize(model):
    """B != 0 and magnitudes away from ||W + s B A||, so every term and gradient is live."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (fastlora.Linear, fastlora.Linear4bit, fastlora.GroupedLinear)):
                nn.init.normal_(layer.lora_B, std=0.3)
                if getattr(layer, "lora_magnitude", None) is not None:
                    layer.lora_magnitude.mul_(torch.rand(layer.lora_magnitude.shape) + 0.5)


def _run(fn, params, x):
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return [y, x.grad] + [p.grad for p in params]


def _matches_eager(fn, params, x):
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got, expected = _run(compiled, params, x), _run(fn, params, x)
    assert len(got) == len(expected) == 2 + len(params)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g is not None, f"output {i}: no gradient"
        assert_close(g, e, torch.float32, f"output {i}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_layer_kind(mode):
    """Linear, Linear4bit and GroupedLinear (ragged), each plain and DoRA, in one model inside use_adapters."""
    torch.manual_seed(0)
    f32 = dict(compute_dtype=torch.float32)
    model = nn.Sequential(
        fastlora.Linear(32, 64, r=4, alpha=8), nn.GELU(),
        fastlora.Linear(64, 64, r=3, alpha=-2, use_dora=True), nn.GELU(),
        fastlora.Linear4bit(64, 64, r=4, alpha=8, **f32), nn.GELU(),
        fastlora.Linear4bit(64, 40, r=4, alpha=8, use_dora=True, blocksize=32, double_quant=False, **f32), nn.GELU(),
        fastlora.GroupedLinear(40, 36, ranks=[4, 0, 8], alpha=8), nn.GELU(),
        fastlora.GroupedLinear(36, 20, ranks=[4, 8, 2], alpha=8, use_dora=True),
    ).train(mode == "train")
    _randomize(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.tensor([2, 0, -1, 1, 1, 0, 2])
    with fastlora.use_adapters(model, ids):
        _matches_eager(model, params, torch.randn(7, 32))


def test_functional_forms_with_dropout_and_padded_stacks():
    """The functional forms with dropout (an explicit seed: the same mask compiled or not), plain and DoRA, dense,
    4-bit and grouped over a padded stack (lora_A [n, r, K]) with one plain DoRA row (NaN)."""
    torch.manual_seed(0)
    n, K, N, r = 3, 64, 24, 4
    w, b = torch.randn(N, K), torch.randn(N)
    a, bb, m = torch.randn(r, K) * 0.2, torch.randn(N, r) * 0.3, torch.rand(N) + 0.5
    ga, gb = torch.randn(n, r, K) * 0.2, torch.randn(n, N, r) * 0.3
    gm = torch.rand(n, N) + 0.5
    gm[1] = float("nan")
    q = fastlora.Linear4bit(K, N, r=r, compute_dtype=torch.float32)
    params = [t.requires_grad_() for t in (a, bb, m, ga, gb, gm)]
    ids = torch.tensor([2, 0, -1, 1, 1, 0, 2])
    scaling = torch.tensor([2.0, 0.5, -1.0])
    drop = dict(dropout_p=0.25, training=True, seed=1234)

    def fn(x):
        return (fastlora.lora_linear(x, w, b, a, bb, 2.0, **drop)
                + fastlora.lora_linear(x, w, b, a, bb, 2.0, magnitude=m, **drop)
                + fastlora.lora_linear_4bit(x, q.weight, q.quant_state, b, a, bb, 2.0, compute_dtype=torch.float32,
                                            magnitude=m, **drop)
                + fastlora.grouped_lora_linear(x, w, b, ga, gb, scaling, ids, **drop)
                + fastlora.grouped_lora_linear(x, w, b, ga, gb, scaling, ids, magnitude=gm, **drop))

    _matches_eager(fn, params, torch.randn(7, K))
    assert torch.count_nonzero(gm.grad[1]) == 0
