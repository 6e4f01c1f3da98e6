"""Mixture-of-experts LoRA: ``grouped_lora_linear`` with a 3-D weight (one base weight per expert), each token on its
expert's W, bias and adapter inside the grouped GEMM (tiles cut at the expert segments), forward and backward, against
the float64 reference; on CPU the kernels run under the Triton interpreter (fp32 and fp16)."""

import pytest
import torch
from helpers import case_id, created_tensors, gemm_weights
from tolerance import assert_close

import fastlora
from fastlora import reference

NAMES = ("y", "dx", "db", "dA", "dB")


def make_experts(M, K, N, R, E, *, dtype=torch.float32, adapter_dtype=None, bias=True, transposed=False, seed=0,
                 ids=None):
    """x [M, K], weight [E, N, K] (a transposed view of an (E, K, N) storage when ``transposed``: gpt-oss's layout),
    bias [E, N], lora_A [E, R, K], lora_B [E, N, R], per-expert scaling, ids in [-1, E)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    if transposed:
        w = (torch.randn(E, K, N, generator=g) / K**0.5).to(dtype).transpose(1, 2)
    else:
        w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(E, N, generator=g).to(dtype) if bias else None
    ad = adapter_dtype or dtype
    a = (torch.randn(E, R, K, generator=g) / K**0.5).to(ad)
    bb = torch.randn(E, N, R, generator=g).to(ad)
    s = 0.5 + torch.rand(E, generator=g)
    if ids is None:
        ids = torch.randint(-1, E, (M,), generator=g)
    return x, w, b, a, bb, s, ids


def run_experts(x, w, b, a, bb, s, ids, *, p=0.0, seed=0, batch=None):
    """(fastlora y, dx, db, dA, dB; the float64 reference's) for one random dy."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, b, a, bb)]
    x, b, a, bb = leaves
    y = fastlora.grouped_lora_linear(x, w, b, a, bb, s, ids, dropout_p=p, training=p > 0, seed=seed, batch=batch)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, b, a, bb)]
    sr = s.double() if isinstance(s, torch.Tensor) else s
    yr = reference.grouped_lora_linear(ref[0], w.double(), ref[1], ref[2], ref[3], sr, ids, dropout_p=p,
                                       training=p > 0, dropout_mask=mask)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    y.backward(dy)
    yr.backward(dy.double())
    outs = [y] + [t.grad if t is not None else None for t in leaves]
    refs = [yr] + [t.grad if t is not None else None for t in ref]
    return outs, refs


def check(outs, refs, dtype, skip=()):
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        if r is None or name in skip:
            continue
        assert_close(o, r, dtype, name)


# (M, K, N, R, E): no dimension a multiple of a tile; few tokens over many experts (most get none), many over few
CASES = [(37, 72, 40, 4, 5), (1, 33, 65, 3, 7), (130, 96, 48, 8, 3), (19, 40, 24, 16, 32)]


@pytest.mark.parametrize("M,K,N,R,E", CASES, ids=[case_id(M=m, K=k, N=n, R=r, E=e) for m, k, n, r, e in CASES])
@pytest.mark.parametrize("transposed", [False, True], ids=["EoutIn", "EinOut"])
def test_matches_reference_fp32(M, K, N, R, E, transposed, monkeypatch):
    """y, dx, d bias, dA, dB against float64, the weight read through the strides it is stored with; the grouped
    GEMM runs with the 3-D weight (no per-expert loop, no copy of W)."""
    weights = gemm_weights(monkeypatch)
    x, w, b, a, bb, s, ids = make_experts(M, K, N, R, E, transposed=transposed)
    outs, refs = run_experts(x, w, b, a, bb, s, ids)
    check(outs, refs, torch.float32)
    shapes = [tuple(w.shape) for w in weights]
    assert (E, N, K) in shapes and (E, K, N) in shapes  # forward and dx on the expert stack itself


def test_dropout_and_fp16():
    x, w, b, a, bb, s, ids = make_experts(45, 80, 56, 8, 4)
    check(*run_experts(x, w, b, a, bb, s, ids, p=0.25, seed=7), torch.float32)
    x, w, b, a, bb, s, ids = make_experts(45, 80, 56, 8, 4, dtype=torch.float16, adapter_dtype=torch.float32)
    outs, refs = run_experts(x, w, b, a, bb, s, ids)
    assert outs[0].dtype == torch.float16 and outs[3].dtype == torch.float32  # fp32 adapters keep fp32 grads
    check(outs, refs, torch.float16)


@pytest.mark.parametrize("routing", ["all-one-expert", "one-token-each", "none-routed", "one-token"])
def test_routing_extremes(routing):
    """Every token on one expert (the others get no rows: zero gradients), one token per expert, no token routed
    here (all -1: zero output, zero gradients), a one-token batch."""
    M, E = {"one-token-each": (6, 6), "one-token": (1, 4)}.get(routing, (40, 6))
    ids = {"all-one-expert": torch.full((M,), 3), "one-token-each": torch.randperm(6),
           "none-routed": torch.full((M,), -1), "one-token": torch.tensor([2])}[routing]
    x, w, b, a, bb, s, ids = make_experts(M, 64, 48, 4, E, ids=ids)
    outs, refs = run_experts(x, w, b, a, bb, s, ids)
    if routing == "none-routed":
        assert torch.equal(outs[0], torch.zeros_like(outs[0]))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in outs[1:])
    else:
        check(outs, refs, torch.float32)
    if routing == "all-one-expert":
        others = [e for e in range(E) if e != 3]
        assert torch.equal(outs[3][others], torch.zeros_like(outs[3][others]))


def test_shared_routing_and_top_k_copies():
    """A token routed to two experts (top-k 2: its row repeated), one ``AdapterBatch`` shared by two calls (gate_up and
    down of an MoE block) gives what each call builds alone."""
    g = torch.Generator().manual_seed(3)
    T, k, E = 21, 2, 5
    top = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # distinct experts per token
    ids = top.reshape(-1)
    x, w1, b1, a1, bb1, s, _ = make_experts(T * k, 48, 64, 4, E, ids=ids)
    batch = fastlora.AdapterBatch.build(ids, E)
    h = fastlora.grouped_lora_linear(x, w1, b1, a1, bb1, s, ids, batch=batch)
    assert_close(h, reference.grouped_lora_linear(x.double(), w1.double(), b1.double(), a1.double(), bb1.double(),
                                                  s.double(), ids), torch.float32, "gate_up")
    _, w2, b2, a2, bb2, _, _ = make_experts(T * k, 64, 48, 4, E, seed=1, ids=ids)
    check(*run_experts(h.detach(), w2, b2, a2, bb2, s, ids, batch=batch), torch.float32)


def test_no_expert_sized_tensor_is_made():
    """Forward and backward never create a tensor of E * out * in elements (no delta W + s B A, no copy of the
    weight, not even of a transposed (E, in, out) storage)."""
    E, K, N = 8, 96, 80
    x, w, b, a, bb, s, ids = make_experts(50, K, N, 4, E, transposed=True)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    with created_tensors() as seen:
        y = fastlora.grouped_lora_linear(x, w, b, a, bb, s, ids)
        y.sum().backward()
    big = [(n, f) for n, _, f in seen if n >= E * N * K // 2]
    assert not big, big


def test_eval_no_grad_and_scalar_scaling():
    x, w, b, a, bb, _, ids = make_experts(29, 64, 40, 4, 3)
    with torch.no_grad():
        y = fastlora.grouped_lora_linear(x, w, b, a, bb, 2.0, ids)
    ref = reference.grouped_lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0, ids)
    assert_close(y, ref, torch.float32, "y")
    with torch.inference_mode():
        assert_close(fastlora.grouped_lora_linear(x, w, None, a, bb, 2.0, ids),
                     ref - torch.where((ids >= 0)[:, None], b[ids.clamp_min(0)].double(), 0.0), torch.float32, "y")


def test_meta_tensors_give_shapes():
    x, w, b, a, bb, s, ids = (t.to("meta") for t in make_experts(9, 32, 24, 4, 3))
    y = fastlora.grouped_lora_linear(x, w, b, a.requires_grad_(), bb, s, ids)
    assert y.shape == (9, 24) and y.device.type == "meta" and y.requires_grad


def test_errors_name_the_argument():
    x, w, b, a, bb, s, ids = make_experts(8, 32, 24, 4, 3)
    call = lambda **kw: fastlora.grouped_lora_linear(**{**dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb,
                                                                scaling=s, adapter_ids=ids), **kw})
    with pytest.raises(ValueError, match=r"in_features = 32 \(weight \(experts, out, in\) = \(3, 24, 32\)\)"):
        call(x=torch.randn(8, 31))
    with pytest.raises(ValueError, match=r"bias must have shape \(experts, out_features\) = \(3, 24\); got \(24,\)"):
        call(bias=b[0])
    with pytest.raises(ValueError, match=r"lora_A must have shape \(experts, r, in_features\) = \(3, r, 32\)"):
        call(lora_A=a[:2])
    with pytest.raises(ValueError, match=r"lora_B must have shape \(experts, out_features, r\) = \(3, 24, 4\)"):
        call(lora_B=bb[:, :, :3])
    with pytest.raises(ValueError, match=r"scaling must be a number or have shape \(experts,\) = \(3,\)"):
        call(scaling=torch.ones(4))
    with pytest.raises(IndexError, match=r"must lie in \[-1, 3\).*got 3"):
        call(adapter_ids=torch.full((8,), 3))
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        call(adapter_ids=ids[:5])
    with pytest.raises(TypeError, match="x, weight and bias must share a dtype"):
        call(weight=w.half())
    with pytest.raises(ValueError, match=r"weight \(experts, out, in\) = \(3, 24, 32\) requires grad"):
        call(weight=w.clone().requires_grad_())
    with pytest.raises(NotImplementedError, match="DoRA"):
        call(magnitude=torch.ones(3, 24))
