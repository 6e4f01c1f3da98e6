"""DoRA (PEFT's use_dora=True): the fused kernels against the float64 reference formula, forward and every gradient
(x, A, B, magnitude), dropout semantics, what is saved, the norm and its caches, zero-norm rows, the module (merge,
eval cache), torch.compile, meta tensors and PEFT's own DoRA layer (tier A: interpreter)."""

import pytest
import torch
import torch.nn as nn
from helpers import case_id, compiled_matches_eager, dora_layer_backward, f64, make_dense, saved_elements
from tolerance import assert_close

import fastlora
from fastlora import dora, reference

NAMES = ("y", "dx", "dA", "dB", "dm")
# (M, K, N, R): odd sizes, M = 1, r = 1 ... 256 (BLOCK_R padding both ways, several low-rank chunks)
SHAPES = [(1, 33, 40, 1), (17, 130, 96, 8), (63, 70, 50, 12), (9, 64, 48, 256), (3, 16, 200, 3)]


def make_dora(M, K, N, R, dtype, device, *, bias=True, seed=0):
    x, w, b, a, bb = make_dense(M, K, N, R, dtype, device, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    m = (torch.rand(N, generator=g) + 0.5).to(dtype).to(device)  # not ||W + sBA||: g far from 1
    return x, w, b, a, bb, m


def run_dora(x, w, b, a, bb, m, s, *, p=0.0, seed=0, need=(True, True, True, True)):
    """(fastlora outputs, float64 reference outputs): y and the gradients asked for by ``need`` (x, A, B, m)."""
    x, a, bb, m = (t.detach().requires_grad_(n) for t, n in zip((x, a, bb, m), need, strict=True))
    y = fastlora.lora_linear(x, w, b, a, bb, s, magnitude=m, dropout_p=p, training=p > 0, seed=seed)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    xr, wr, br, ar, bbr, mr = f64(x, w, b, a, bb, m)
    yr = reference.dora_linear(xr, wr, br, ar, bbr, s, mr, dropout_p=p, training=p > 0, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    pairs = [(t.grad, r.grad) for t, r, n in zip((x, a, bb, m), (xr, ar, bbr, mr), need, strict=True) if n]
    return [y, *(p[0] for p in pairs)], [yr, *(p[1] for p in pairs)]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,R", SHAPES, ids=[case_id(M=m, K=k, N=n, R=r) for m, k, n, r in SHAPES])
def test_matches_reference(M, K, N, R, dtype, p, device):
    outs, refs = run_dora(*make_dora(M, K, N, R, dtype, device), 0.75, p=p, seed=7)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("scaling", [-1.5, 16.0])
def test_no_bias_and_scalings(scaling, p, device):
    outs, refs = run_dora(*make_dora(19, 45, 37, 4, torch.float32, device, bias=False), scaling, p=p)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_leading_dims_and_noncontiguous_x(device):
    x, w, b, a, bb, m = make_dora(0, 48, 32, 8, torch.float32, device)
    xs = torch.randn(3, 7, 2 * 48, device=device)[..., ::2]  # stride 2 along K, 21 tokens
    outs, refs = run_dora(xs, w, b, a, bb, m, 2.0)
    assert outs[0].shape == (3, 7, 32)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_fp32_adapters_and_magnitude_with_fp16_activations(device):
    x, w, b, a, bb, m = make_dora(21, 70, 40, 8, torch.float16, device)
    a, bb, m = a.float(), bb.float(), m.float()
    outs, refs = run_dora(x, w, b, a, bb, m, 0.5, p=0.1)
    assert outs[0].dtype == torch.float16 and all(o.dtype == torch.float32 for o in outs[2:])
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float16, name)


def test_dropout_is_one_mask_in_both_terms(device):
    """Training with p > 0: y = x W^T + b + d(x) ((g - 1) W + g s B A)^T with ONE mask d, the same one the shrink
    drew for the low-rank branch (PEFT: the (g - 1) base term runs on the dropped x)."""
    x, w, b, a, bb, m = make_dora(23, 64, 40, 4, torch.float32, device)
    s, p = 1.25, 0.4
    y = fastlora.lora_linear(x, w, b, a, bb, s, magnitude=m, dropout_p=p, training=True, seed=11)
    keep = fastlora.dropout_mask(x.shape, p, 11, device).double()
    xd, wd, ad, bd = x.double(), w.double(), a.double(), bb.double()
    norm = torch.linalg.vector_norm(wd + s * bd @ ad, dim=1)
    g = m.double() / norm
    combined = (g - 1)[:, None] * wd + g[:, None] * s * (bd @ ad)  # [N, K]
    expected = xd @ wd.t() + b.double() + (xd * keep / (1 - p)) @ combined.t()
    assert_close(y, expected, torch.float32, "y")
    again = fastlora.lora_linear(x, w, b, a, bb, s, magnitude=m, dropout_p=p, training=True, seed=11)
    assert torch.equal(y, again), "the mask is a function of the seed"
    evaluated = fastlora.lora_linear(x, w, b, a, bb, s, magnitude=m, dropout_p=p, training=False)
    assert (y - evaluated).abs().max() > 1e-3, "training applies dropout, eval does not"


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, True, False), (False, False, False, True),
                                  (False, True, False, True)], ids=["dx", "dA-dB", "dm", "dA-dm"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_each_gradient_alone(need, p, device):
    outs, refs = run_dora(*make_dora(13, 40, 24, 4, torch.float32, device), 0.5, p=p, need=need)
    assert len(outs) == 1 + sum(need)
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert_close(o, r, torch.float32, f"output {i}")


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_saves_an_mxn_tensor_only_when_the_magnitude_trains(p, device):
    M, K, N = 40, 24, 56  # M x N larger than every other saved tensor (x: M x K, W: N x K)
    x, w, b, a, bb, m = make_dora(M, K, N, 4, torch.float32, device)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()

    def call(mag):
        return lambda: fastlora.lora_linear(x, w, b, a, bb, 1.0, magnitude=mag, dropout_p=p, training=p > 0, seed=1)

    frozen = saved_elements(call(m))
    trained = saved_elements(call(m.clone().requires_grad_()))
    lora = saved_elements(lambda: fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=p, training=p > 0, seed=1))
    assert M * N not in frozen
    assert trained.count(M * N) == 1
    assert sum(frozen) <= sum(lora) + 2 * N + 1  # LoRA's tensors, plus g [N] and the norm [N]


def test_unfrozen_weight_and_bias_gradients(device):
    for p in (0.0, 0.3):
        x, w, b, a, bb, m = make_dora(11, 36, 20, 4, torch.float32, device)
        w, b = w.requires_grad_(), b.requires_grad_()
        y = fastlora.lora_linear(x, w, b, a, bb, 1.0, magnitude=m, dropout_p=p, training=p > 0, seed=2)
        dy = torch.randn_like(y)
        y.backward(dy)
        mask = fastlora.dropout_mask(x.shape, p, 2, device) if p > 0 else None
        wr, br = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        reference.dora_linear(x.double(), wr, br, a.double(), bb.double(), 1.0, m.double(), dropout_p=p,
                              training=p > 0, dropout_mask=mask).backward(dy.double())
        assert_close(w.grad, wr.grad, torch.float32, f"dW p={p}")
        assert_close(b.grad, br.grad, torch.float32, f"db p={p}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("R", [1, 7, 64, 256])
def test_weight_norm_without_the_out_by_in_matrix(R, dtype, device):
    _, w, _, a, bb = make_dense(1, 90, 70, R, dtype, device)
    s = 0.3
    norm = dora.weight_norm(w, a, bb, s)
    exact = torch.linalg.vector_norm(w.double() + s * bb.double() @ a.double(), dim=1)
    assert norm.dtype == torch.float32 and norm.shape == (70,)
    assert_close(norm, exact, torch.float32, "norm", tol=1e-5)  # fp32 throughout, inputs exact in fp32


def test_weight_sq_cache_follows_the_weight(device, dora_caching):
    w = torch.randn(30, 20, device=device)
    first = dora.weight_sq(w)
    assert dora.weight_sq(w) is first, "cached while W is unchanged"
    with torch.no_grad():
        w[3] *= 2
    second = dora.weight_sq(w)
    assert second is not first
    assert_close(second, w.double().square().sum(1), torch.float32, "||W||^2 after an in-place update")
    a, bb = torch.randn(2, 20, device=device), torch.randn(30, 2, device=device)
    x = torch.randn(5, 20, device=device)
    m = torch.rand(30, device=device) + 0.5
    y = fastlora.lora_linear(x, w, None, a, bb, 1.0, magnitude=m)
    with torch.no_grad():
        w.mul_(0.5)
    y2 = fastlora.lora_linear(x, w, None, a, bb, 1.0, magnitude=m)
    ref = reference.dora_linear(*f64(x, w, None, a, bb), 1.0, m.double())
    assert_close(y2, ref, torch.float32, "y after W changed in place")
    assert not torch.allclose(y, y2)


def test_zero_norm_rows_and_zero_magnitude(device):
    """PEFT divides by the norm (NaN for a zero row of a fresh layer); fastlora divides by max(norm, eps): a row of W
    that is zero with B's row zero has m = 0 at init, g = 0 and y = b there, gradients finite."""
    torch.manual_seed(0)
    base = nn.Linear(24, 12, device=device)
    with torch.no_grad():
        base.weight[[2, 7]] = 0
    layer = fastlora.Linear.from_linear(base, r=4, alpha=8, use_dora=True)
    assert layer.lora_magnitude[2] == 0 and layer.lora_magnitude[7] == 0, "PEFT's init: m = ||W_n|| = 0"
    x = torch.randn(9, 24, device=device, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 2], layer.bias[2].expand(9)), "a zero row gives the bias"
    y.square().sum().backward()
    for t in (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad):
        assert torch.isfinite(t).all()
    # m = 0 on a row of non-zero norm: g = 0, the row is the bias (no dropout)
    x2, w, b, a, bb, m = make_dora(7, 30, 16, 4, torch.float32, device)
    m[5] = 0
    outs, refs = run_dora(x2, w, b, a, bb, m, 1.0)
    assert torch.equal(outs[0][:, 5].detach(), b[5].expand(7))
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_bad_magnitude_is_rejected(device):
    x, w, b, a, bb, m = make_dora(3, 16, 8, 2, torch.float32, device)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out_features,\) = \(8,\); got \(9,\)"):
        fastlora.lora_linear(x, w, b, a, bb, 1.0, magnitude=torch.ones(9))
    with pytest.raises(TypeError, match="magnitude must be a tensor"):
        fastlora.lora_linear(x, w, b, a, bb, 1.0, magnitude=[1.0] * 8)
    with pytest.raises(TypeError, match="magnitude must be float16, bfloat16 or float32"):
        fastlora.lora_linear(x, w, b, a, bb, 1.0, magnitude=torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        fastlora.Linear(16, 8, use_dora="yes")


# ------------------------------------------------------------------------------------------------ the module


def dora_layer(device, *, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = fastlora.Linear(40, 24, bias=bias, r=4, alpha=8, dropout=dropout, use_dora=True, device=device)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.3)
        layer.lora_magnitude.mul_(torch.rand(24, device=device) + 0.5)
    return layer


def test_linear_initial_magnitude_is_the_weight_norm_and_output_the_base(device):
    layer = fastlora.Linear(40, 24, r=4, alpha=8, use_dora=True, device=device)
    assert layer.lora_magnitude.shape == (24,) and layer.lora_magnitude.requires_grad
    assert_close(layer.lora_magnitude, torch.linalg.vector_norm(layer.weight.double(), dim=1), torch.float32, "m")
    x = torch.randn(6, 40, device=device)
    base = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert_close(layer(x), base, torch.float32, "fresh DoRA layer = base")
    wrapped = fastlora.Linear.from_linear(nn.Linear(40, 24, device=device), r=4, use_dora=True)
    assert wrapped.use_dora and wrapped.lora_magnitude.shape == (24,)
    assert "use_dora=True" in repr(wrapped)


def test_linear_matches_reference_and_trains_the_magnitude(device):
    layer = dora_layer(device, bias=False).train()
    x = torch.randn(2, 9, 40, device=device, requires_grad=True)
    y = layer(x)
    xr, wr, ar, br, mr = f64(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude)
    yr = reference.dora_linear(xr, wr, None, ar, br, layer.scaling, mr)
    outs, refs = dora_layer_backward(layer, x, y, yr, xr, ar, br, mr)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    assert layer.weight.grad is None


@pytest.mark.parametrize("which", ["lora_A", "lora_B", "lora_magnitude", "weight"])
def test_eval_cache_follows_in_place_updates(which, device, dora_caching):
    layer = dora_layer(device).eval()
    x = torch.randn(5, 40, device=device)
    before = layer(x)
    assert layer._norm_cache is not None
    assert layer._norm() is layer._norm_cache[1], "eval reuses the norm"
    with torch.no_grad():
        getattr(layer, which).mul_(1.5)  # an optimizer step between evaluations
    after = layer(x)
    ref = reference.dora_linear(*f64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B), layer.scaling,
                                layer.lora_magnitude.double())
    assert_close(after, ref, torch.float32, f"y after {which} changed")
    assert (after - before).abs().max() > 1e-4


def test_merge_and_unmerge(device):
    layer = dora_layer(device).eval()
    with torch.no_grad():
        layer.weight[3] = 0
        layer.lora_B[3] = 0
        layer.lora_magnitude[5] = 0  # g = 0: merged row 5 is zero, unmerge restores it exactly
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 40, device=device)
    y = layer(x)
    layer.merge()
    assert layer.merged and torch.all(layer.weight[5] == 0)
    assert_close(layer(x), y.double(), torch.float32, "merged forward")
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight[5], w0[5]) and torch.equal(layer.weight[3], w0[3])
    assert_close(layer.weight, w0.double(), torch.float32, "unmerged W", tol=1e-6)
    assert_close(layer(x), y.double(), torch.float32, "forward after unmerge")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_meta_tensors_infer_shapes_like_nn_linear(train):
    x = torch.empty(3, 5, 64, device="meta", requires_grad=True)
    ref = torch.nn.Linear(64, 32, device="meta")(x)
    layer = fastlora.Linear(64, 32, r=4, dropout=0.1, use_dora=True, device="meta").train(train)
    assert layer.lora_magnitude.device.type == "meta"
    y = layer(x)
    assert (y.shape, y.device, y.dtype) == (ref.shape, ref.device, ref.dtype)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora_magnitude.grad.shape == (32,)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph_matches_eager(mode):
    torch.manual_seed(0)
    model = nn.Sequential(fastlora.Linear(32, 48, r=4, alpha=8, use_dora=True), nn.GELU(),
                          fastlora.Linear(48, 20, bias=False, r=3, alpha=-2, use_dora=True)).train(mode == "train")
    for layer in model[::2]:
        with torch.no_grad():
            nn.init.normal_(layer.lora_B)
            layer.lora_magnitude.mul_(torch.rand(layer.out_features) + 0.5)
    compiled_matches_eager(model, 32, 10, assert_close)


# ------------------------------------------------------------------------------------------------ PEFT


def test_same_outputs_and_gradients_as_peft_dora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 56), nn.ReLU(), nn.Linear(56, 24, bias=False))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    ours = []
    for name in ("0", "2"):
        mod = model.base_model.model.get_submodule(name)
        with torch.no_grad():
            nn.init.normal_(mod.lora_B["default"].weight, std=0.2)
            mod.lora_magnitude_vector["default"].weight.mul_(torch.rand(mod.out_features) + 0.5)
        layer = fastlora.Linear.from_linear(mod.base_layer, r=4, alpha=8, use_dora=True)
        with torch.no_grad():
            layer.lora_A.copy_(mod.lora_A["default"].weight)
            layer.lora_B.copy_(mod.lora_B["default"].weight)
            layer.lora_magnitude.copy_(mod.lora_magnitude_vector["default"].weight)
        ours.append((mod, layer))
    mine = nn.Sequential(ours[0][1], nn.ReLU(), ours[1][1])
    x = torch.randn(2, 7, 40)
    dy = torch.randn(2, 7, 24)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        mine.train(mode == "train")
        model.zero_grad()
        mine.zero_grad()
        y_peft = model(x)
        y = mine(x)
        assert_close(y, y_peft, torch.float32, f"{mode} y")
        y_peft.backward(dy)
        y.backward(dy)
        for i, (mod, layer) in enumerate(ours):
            for theirs, got, name in ((mod.lora_A["default"].weight, layer.lora_A, "dA"),
                                      (mod.lora_B["default"].weight, layer.lora_B, "dB"),
                                      (mod.lora_magnitude_vector["default"].weight, layer.lora_magnitude, "dm")):
                assert_close(got.grad, theirs.grad, torch.float32, f"{mode} layer {i} {name}", tol=1e-5)


def test_zero_weight_rows_where_peft_gives_nan():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 12))
    with torch.no_grad():
        base[0].weight[[2, 7]] = 0
    layer = fastlora.Linear.from_linear(base[0], r=4, alpha=8, use_dora=True)  # before PEFT wraps the same base
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    x = torch.randn(5, 24)
    theirs = model(x)
    assert torch.isnan(theirs[:, [2, 7]]).all(), "PEFT: 0 / 0 on a zero row"
    ours = layer(x)
    assert torch.isfinite(ours).all()
    assert_close(ours[:, [0, 1, 3]], theirs[:, [0, 1, 3]], torch.float32, "other rows as PEFT")
    assert torch.equal(ours[:, 2], base[0].bias[2].expand(5))
