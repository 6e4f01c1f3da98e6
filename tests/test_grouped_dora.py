"""Grouped DoRA: one batch mixing DoRA and plain LoRA adapters (a NaN magnitude row = plain), padded and ragged stacks,
against the float64 per-token reference; every gradient (x, A, B, m) incl. the zeros of unused adapters and NaN rows;
equivalences (all-plain = no magnitude, one adapter = dense DoRA); GroupedLinear and the stack helpers that keep the
magnitude rows in step with add / remove; torch.compile, meta (tier A: interpreter)."""

import pytest
import torch
import torch.nn as nn
from helpers import adapter_slice, f64, offsets_of, run_stack
from tolerance import assert_close

import fastlora
from fastlora import adapters, reference

NAMES = ("y", "dx", "dA", "dB", "dm")
NAN = float("nan")


def make_stack(M, K, N, ranks, dtype, device, *, ragged, plain=(), seed=0):
    """x, W, b, A, B, magnitude (NaN rows for ``plain``) and offsets (None when padded: every rank = max)."""
    g = torch.Generator().manual_seed(seed)
    n, r = len(ranks), max(ranks)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    lead = (sum(ranks),) if ragged else (n, r)
    a = (torch.randn(*lead, K, generator=g) / K**0.5).to(dtype).to(device)
    bb = torch.randn(*((N, sum(ranks)) if ragged else (n, N, r)), generator=g).to(dtype).to(device)
    m = (torch.rand(n, N, generator=g) + 0.5).to(dtype).to(device)  # far from ||W + sBA||: g far from 1
    m[list(plain)] = NAN
    return x, w, b, a, bb, m, offsets_of(ranks, device) if ragged else None


# (stack, dtype, p): padded r = 12 and ragged r 1 ... 256 with a rank-0 DoRA adapter; fp16 and the dropout form each
CASES = [("padded", torch.float32, 0.0), ("padded", torch.float16, 0.3), ("ragged", torch.float32, 0.3),
         ("ragged", torch.float16, 0.0)]


@pytest.mark.parametrize("stack,dtype,p", CASES,
                         ids=[f"{s}-{'fp32' if d == torch.float32 else 'fp16'}-p{p:g}" for s, d, p in CASES])
def test_mixed_batch_matches_reference(stack, dtype, p, device):
    """Adapters 0, 2, 4 DoRA, 1 and 3 plain; adapter 4 unused, -1 tokens base only; ragged: adapter 2 at rank 0, ranks
    up to 256 (p = 0) or 40 (dropout)."""
    ragged = stack == "ragged"
    ranks = ([1, 256, 0, 64, 8] if p == 0 else [1, 40, 0, 16, 8]) if ragged else [12] * 5
    M, K, N = 29, 45, 37
    x, w, b, a, bb, m, offsets = make_stack(M, K, N, ranks, dtype, device, ragged=ragged, plain=(1, 3))
    ids = torch.randint(-1, 4, (M,), generator=torch.Generator().manual_seed(1)).to(device)
    assert {-1, 0, 1, 2, 3} <= set(ids.tolist())
    scaling = torch.tensor([0.5, -1.0, 2.0, 0.75, 1.5])
    outs, refs = run_stack(x, w, b, a, bb, scaling, ids, offsets, m=m, p=p, seed=5)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)
    y, _, dA, dB, dm = outs
    for t in (adapter_slice(dA, 4, offsets, 0), adapter_slice(dB, 4, offsets, 1), dm[4]):
        assert torch.count_nonzero(t) == 0, "an unused adapter gets zero gradients"
    assert torch.count_nonzero(dm[[1, 3]]) == 0, "NaN rows: dm exactly 0"
    assert torch.count_nonzero(dm[2]) > 0, "a DoRA adapter trains its magnitude (ragged: even at rank 0)"
    rows = (ids == -1).nonzero().squeeze(1)
    base = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert_close(y[rows], base[rows], dtype, "y of base-only tokens")


@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
def test_all_nan_magnitude_is_plain_lora(ragged, device):
    """g = 1 exactly on every plain row: outputs and gradients as without a magnitude (dropout form too)."""
    ranks = [8, 3, 16] if ragged else [8] * 3
    x, w, b, a, bb, m, offsets = make_stack(21, 40, 36, ranks, torch.float32, device, ragged=ragged, seed=2)
    m.fill_(NAN)
    ids = torch.randint(-1, 3, (21,), generator=torch.Generator().manual_seed(2)).to(device)
    kw = dict(dropout_p=0.25, training=True, seed=9, rank_offsets=offsets)
    got, want = [], []
    for mag, out in ((m.clone().requires_grad_(), got), (None, want)):
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, a, bb))
        y = fastlora.grouped_lora_linear(xs, w, b, As, Bs, 1.5, ids, magnitude=mag, **kw)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y))
        out += [y, xs.grad, As.grad, Bs.grad]
        if mag is not None:
            assert torch.count_nonzero(mag.grad) == 0
    for name, g_, w_ in zip(NAMES, got, want, strict=False):
        assert_close(g_, w_.double(), torch.float32, name, tol=1e-6)


def test_one_dora_adapter_equals_dense_dora(device):
    M, K, N, R = 21, 45, 37, 5
    x, w, b, a, bb, m, _ = make_stack(M, K, N, [R], torch.float32, device, ragged=False, seed=4)
    ids = torch.zeros(M, dtype=torch.int64, device=device)
    results = []
    for grouped in (True, False):
        xs, As, Bs, ms = (t.detach().clone().requires_grad_() for t in (x, a[0] if not grouped else a,
                                                                        bb[0] if not grouped else bb,
                                                                        m if grouped else m[0]))
        if grouped:
            y = fastlora.grouped_lora_linear(xs, w, b, As, Bs, 0.8, ids, magnitude=ms, dropout_p=0.2, training=True,
                                             seed=4)
        else:
            y = fastlora.lora_linear(xs, w, b, As, Bs, 0.8, magnitude=ms, dropout_p=0.2, training=True, seed=4)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y))
        results.append([t.reshape(-1) for t in (y, xs.grad, As.grad, Bs.grad, ms.grad)])
    for name, g_, d_ in zip(NAMES, *results, strict=True):
        assert_close(g_, d_.double(), torch.float32, name, tol=1e-6)


def test_unchecked_ids_prebuilt_batch_and_unfrozen_weight(device):
    ranks = [4] * 3
    x, w, b, a, bb, m, _ = make_stack(26, 36, 28, ranks, torch.float32, device, ragged=False, plain=(0,), seed=6)
    ids = torch.randint(-1, 3, (26,), generator=torch.Generator().manual_seed(6)).to(device)
    batch = fastlora.AdapterBatch.build(ids, 3)
    outs, refs = run_stack(x, w, b, a, bb, 1.25, ids, None, m=m, check_ids=False, batch=batch)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    ws = w.clone().requires_grad_()
    y = fastlora.grouped_lora_linear(x, ws, b, a, bb, 1.25, ids, magnitude=m, dropout_p=0.2, training=True, seed=1)
    dy = torch.randn_like(y)
    y.backward(dy)
    wr = w.double().requires_grad_()
    mask = fastlora.dropout_mask(x.shape, 0.2, 1, device)
    reference.grouped_dora_linear(x.double(), wr, b.double(), a.double(), bb.double(), 1.25, ids, m.double(),
                                  dropout_p=0.2, training=True, dropout_mask=mask).backward(dy.double())
    assert_close(ws.grad, wr.grad, torch.float32, "dW")


def test_bad_magnitude_is_rejected(device):
    x, w, b, a, bb, m, _ = make_stack(4, 16, 8, [2, 2], torch.float32, device, ragged=False)
    ids = torch.tensor([0, 1, -1, 0], device=device)
    call = lambda mag: fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids, magnitude=mag)  # noqa: E731
    with pytest.raises(ValueError, match=r"magnitude must have shape \(num_adapters, out_features\) = \(2, 8\); "
                                         r"got \(8,\)"):
        call(m[0])
    with pytest.raises(TypeError, match="magnitude must be float16, bfloat16 or float32"):
        call(m.to(torch.int32))
    with pytest.raises(ValueError, match="magnitude is on meta but x is on"):
        call(m.to("meta"))
    mixed = m.clone()
    mixed[1, 3] = NAN
    with pytest.raises(ValueError, match="magnitude row 1 mixes NaN with numbers"):
        call(mixed)


# ------------------------------------------------------------------------------------------------ GroupedLinear


def dora_stack(device, seed=0):
    """GroupedLinear(use_dora=True), ranks [4, 0, 8]: B random, magnitudes moved off their initial value."""
    torch.manual_seed(seed)
    layer = fastlora.GroupedLinear(40, 24, ranks=[4, 0, 8], alpha=8, use_dora=True, device=device)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.3)
        layer.lora_magnitude.mul_(torch.rand(3, 24, device=device) + 0.5)
    return layer


def layer_reference(layer, x, ids):
    return reference.grouped_dora_linear(*f64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B),
                                         layer.scaling.double(), ids, layer.lora_magnitude.double(),
                                         rank_offsets=layer.rank_offsets)


def test_grouped_linear_use_dora_initialisation_and_training(device):
    fresh = fastlora.GroupedLinear(40, 24, ranks=[4, 0, 8], use_dora=True, device=device)
    norm = torch.linalg.vector_norm(fresh.weight.double(), dim=1)
    assert fresh.lora_magnitude.shape == (3, 24) and fresh.lora_magnitude.requires_grad
    assert_close(fresh.lora_magnitude[[0, 2]], norm.expand(2, -1), torch.float32, "m = ||W_n|| (PEFT's init)")
    assert torch.isnan(fresh.lora_magnitude[1]).all(), "an empty slot is plain"
    x = torch.randn(10, 40, device=device)
    ids = torch.tensor([0, 1, 2, -1, 0] * 2, device=device)
    assert_close(fresh(x, ids), nn.functional.linear(x.double(), fresh.weight.double(), fresh.bias.double()),
                 torch.float32, "fresh DoRA stack = base")
    plain = fastlora.GroupedLinear(40, 24, ranks=[4, 8], device=device)
    assert plain.lora_magnitude is None and "lora_magnitude" not in dict(plain.named_parameters())
    layer = dora_stack(device).train()
    xs = x.clone().requires_grad_()
    y = layer(xs, ids)
    y.backward(torch.ones_like(y))
    yr = layer_reference(layer, x, ids)
    assert_close(y, yr, torch.float32, "y")
    assert torch.count_nonzero(layer.lora_magnitude.grad[1]) == 0
    assert "use_dora=True" in repr(layer)


@pytest.mark.parametrize("which", ["lora_B", "lora_magnitude", "scaling"])
def test_grouped_linear_eval_norm_cache_follows_updates(which, device, dora_caching):
    layer = dora_stack(device, seed=1).eval()
    x = torch.randn(6, 40, device=device)
    ids = torch.tensor([0, 2, 2, 1, 0, -1], device=device)
    before = layer(x, ids)
    assert layer._norm() is layer._norm_cache[1], "eval reuses the norm"
    with torch.no_grad():
        getattr(layer, which).mul_(1.5)
    after = layer(x, ids)
    assert_close(after, layer_reference(layer, x, ids), torch.float32, f"y after {which} changed")
    assert (after - before).abs().max() > 1e-4


def test_stack_helpers_keep_magnitude_rows_in_step(device, tmp_path):
    """_stack / _entries (what loading uses) and add / remove_adapters: rows follow their adapters; a plain adapter
    added to a DoRA-capable stack gets a NaN row; removing the last DoRA adapter leaves a plain stack."""
    torch.manual_seed(0)
    w, b = torch.randn(24, 40, device=device), torch.randn(24, device=device)
    ms = [torch.rand(24, device=device) + 0.5 for _ in range(2)]
    entries = [(torch.randn(r, 40, device=device), torch.randn(24, r, device=device), 0.5, m)
               for r, m in ((4, ms[0]), (8, None), (2, ms[1]))]
    model = nn.Sequential(adapters._stack(w, b, entries, 0.0))
    layer = model[0]
    assert layer.magnitude(0) is not None and layer.magnitude(1) is None
    assert torch.equal(layer.lora_magnitude[2], ms[1]) and torch.isnan(layer.lora_magnitude[1]).all()
    x = torch.randn(9, 40, device=device)
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0, 0, 2], device=device)
    y = layer(x, ids)
    fastlora.remove_adapters(model, [0])
    layer = model[0]
    assert torch.isnan(layer.lora_magnitude[0]).all() and torch.equal(layer.lora_magnitude[2], ms[1])
    keep = ids != 0
    assert_close(layer(x[keep], ids[keep]), y[keep].double(), torch.float32, "after removing adapter 0", tol=1e-6)
    src = nn.Sequential(fastlora.Linear.from_linear(nn.Linear(40, 24, device=device), r=4))  # a plain LoRA file
    fastlora.save_adapter(src, tmp_path / "plain")
    assert fastlora.add_adapters(model, [tmp_path / "plain"]) == [0]
    layer = model[0]
    assert torch.isnan(layer.lora_magnitude[0]).all() and layer.magnitude(2) is not None
    assert_close(layer(x[keep], ids[keep]), y[keep].double(), torch.float32, "after adding a plain one", tol=1e-6)
    fastlora.remove_adapters(model, [2])
    assert model[0].lora_magnitude is None, "no DoRA adapter left: a plain stack"
    plain = nn.Sequential(adapters._stack(w, b, [e[:3] + (None,) for e in entries], 0.0))
    assert plain[0].lora_magnitude is None
    grown = adapters._stack(w, b, [*adapters._entries(plain[0], 3)[:2], entries[2]], 0.0)
    assert torch.isnan(grown.lora_magnitude[:2]).all() and torch.equal(grown.lora_magnitude[2], ms[1])


def test_compile_fullgraph_and_meta(device):
    torch._dynamo.reset()
    layer = dora_stack(device, seed=2).train()
    ids = torch.tensor([2, 0, -1, 0, 2, 1, 2], device=device)

    def step(fn):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(7, 40, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
        y = fn(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device))
        return [y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad]

    compiled = torch.compile(lambda x: layer(x, ids), fullgraph=True, backend="aot_eager")
    got, expected = step(compiled), step(lambda x: layer(x, ids))
    torch._dynamo.reset()
    for name, g_, e_ in zip(NAMES, got, expected, strict=True):
        assert_close(g_, e_.double(), torch.float32, name)
    meta = fastlora.GroupedLinear(64, 32, ranks=[4, 8], dropout=0.1, use_dora=True, device="meta").train()
    xm = torch.empty(3, 5, 64, device="meta", requires_grad=True)
    ym = meta(xm, torch.zeros(3, 5, dtype=torch.int64, device="meta"))
    assert ym.shape == (3, 5, 32) and ym.device.type == "meta"
    ym.sum().backward()
    assert meta.lora_magnitude.grad.shape == (2, 32) and xm.grad.shape == xm.shape
