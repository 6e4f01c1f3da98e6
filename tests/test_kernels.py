"""Kernel branches the public-API tests do not reach on their own: the TMA persistent main GEMM (forced under
the interpreter, which runs tensor descriptors), the packed dropout mask the forward hands to backward, and the
grouped shrink's segment-aligned tiles."""

import pytest
import torch
from helpers import case_id, make_dense, make_grouped, run_dense, run_stack
from tolerance import assert_close

import fastlora
from fastlora import _launch, _ops

NAMES = ("y", "dx", "dA", "dB")
# 16-byte-aligned rows (TMA-eligible) with edges that are multiples of no tile, and sizes that are not aligned.
TMA_SHAPES = [(37, 64, 72, 8), (70, 96, 40, 20), (5, 32, 200, 3)]


@pytest.fixture
def tma_default(monkeypatch):
    """Make the interpreter's default main-GEMM config the persistent TMA one."""
    monkeypatch.setitem(_launch.INTERPRET_GEMM, "USE_TMA", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,R", TMA_SHAPES, ids=[case_id(M=m, K=k, N=n, R=r) for m, k, n, r in TMA_SHAPES])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
def test_tma_path_matches_reference(M, K, N, R, dtype, p, device, tma_default):
    x, w, b, a, bb = make_dense(M, K, N, R, dtype, device)
    out = torch.empty(M, N, dtype=dtype, device=device)
    x_desc, w_desc, _, kmajor = _launch._descriptors(x, w, out, True)
    assert x_desc is not None and kmajor, "forward operands must be TMA-eligible in this test"
    assert _launch._descriptors(torch.empty_like(w.t().contiguous()), w.t(), torch.empty_like(x), True)[3] is False
    outs, refs = run_dense(x, w, b, a, bb, 0.5, p=p, seed=3)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)


def test_tma_persistent_walks_several_tiles(device, tma_default):
    # 3 programs over cdiv(64/16) * cdiv(96/32) = 12 tiles: each program runs 4 of them.
    x, w, b, a, bb = make_dense(64, 32, 96, 4, torch.float32, device)
    t = (x.double() @ a.double().t()).float()
    y = _launch.gemm(x, w, out_dtype=x.dtype, bias=b, t=t, b=bb, scaling=2.0)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double()) + 2.0 * t.double() @ bb.double().t()
    assert_close(y, ref, torch.float32, "y")


def test_unaligned_falls_back_to_pointers(device, tma_default):
    x, w, b, a, bb = make_dense(9, 30, 26, 4, torch.float16, device)  # rows of 60 / 52 bytes
    assert _launch._descriptors(x, w, torch.empty(9, 26, dtype=x.dtype, device=device), True)[0] is None
    outs, refs = run_dense(x, w, b, a, bb, 1.0, p=0.1, seed=9)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float16, name)


@pytest.mark.parametrize("M,K", [(19, 70), (33, 64), (4, 5)], ids=["K70", "K64", "K5"])
def test_forward_saves_the_packed_kernel_mask(M, K, device):
    x, w, b, a, bb = make_dense(M, K, 24, 4, torch.float32, device)
    p, seed = 0.3, 77
    _, _, bits = _ops.lora_forward(x, w, b, a, bb, 1.0, None, None, None, None, p, seed, [], [])
    assert bits.shape == (M, -(-K // 32)) and bits.dtype == torch.int32
    cols = torch.arange(K, device=device)
    unpacked = ((bits[:, cols // 32] >> (cols % 32)) & 1).bool()
    assert torch.equal(unpacked, fastlora.dropout_mask((M, K), p, seed, device))
    pad = (bits[:, -1] >> (K % 32)) if K % 32 else torch.zeros(M, dtype=torch.int32, device=device)
    assert not pad.any(), "bits past K must be zero"
    _, _, none = _ops.lora_forward(x, w, b, a, bb, 1.0, None, None, None, None, 0.0, seed, [], [])
    assert none.numel() == 0


def test_grouped_dropout_mask_follows_tokens(device):
    x, w, b, a, bb = make_grouped(45, 70, 33, 8, 3, torch.float32, device)
    ids = torch.randint(-1, 3, (45,), generator=torch.Generator().manual_seed(4)).to(device)
    outs, refs = run_stack(x, w, b, a, bb, torch.tensor([0.5, 2.0, -1.0]), ids, p=0.25, seed=21)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_grouped_shrink_tiles_at_adapter_segments(device):
    # More adapters than one scan step of the offsets (SEG_CHUNK = 64), most of them empty, segments shorter and
    # longer than a 16-row tile; base-only rows must come out exactly zero although every output starts as NaN.
    M, K, R, n = 150, 40, 4, 70
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, n, (M,), generator=g)
    ids[:40] = 66
    x = torch.randn(M, K, generator=g).to(device)
    a = torch.randn(n, R, K, generator=g).to(device)
    batch = fastlora.AdapterBatch.build(ids.to(device), n)
    t = _launch.gemm(x, a, out_dtype=torch.float32, shrink=True, perm=batch.perm, ids=batch.sorted_ids,
                     seg=batch.seg_offsets)
    used = ids >= 0
    ref = torch.zeros(M, R, dtype=torch.float64)
    ref[used] = torch.einsum("mk,mrk->mr", x.cpu().double()[used], a.cpu().double()[ids[used]])
    assert torch.equal(t.cpu()[~used], torch.zeros(int((~used).sum()), R))
    assert_close(t, ref.to(device), torch.float32, "T")
