"""Grouped multi-adapter LoRA: per-token adapters against the per-token float64 reference."""

import pytest
import torch
from helpers import case_id, make_grouped, run_stack
from tolerance import assert_close

import fastlora

NAMES = ("y", "dx", "dA", "dB")


def _ids(M, n, seed, lo=-1):
    return torch.randint(lo, n, (M,), generator=torch.Generator().manual_seed(seed))


CASES = [  # (M, K, N, R, n)
    (41, 70, 50, 8, 5),
    (70, 33, 64, 12, 33),
    (20, 48, 40, 4, 1),
    (32, 64, 96, 16, 32),  # decode: few tokens, many adapters
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,R,n", CASES, ids=[case_id(M=m, K=k, N=nn, R=r, G=g) for m, k, nn, r, g in CASES])
def test_unsorted_ids_match_reference(M, K, N, R, n, dtype, device):
    ids = _ids(M, n, seed=M).to(device)
    scaling = torch.linspace(-1.0, 2.0, n)
    outs, refs = run_stack(*make_grouped(M, K, N, R, n, dtype, device), scaling, ids)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)


def test_decode_each_token_its_own_adapter(device):
    M = n = 32
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    outs, refs = run_stack(*make_grouped(M, 64, 48, 8, n, torch.float32, device), 0.5, ids)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_unused_adapters_get_exactly_zero_gradient(device):
    n = 9
    ids = torch.tensor([0, 3, 3, -1, 7, 0, 3, -1] * 3, device=device)
    outs, refs = run_stack(*make_grouped(ids.numel(), 40, 30, 4, n, torch.float32, device), 1.0, ids)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    unused = [g for g in range(n) if g not in (0, 3, 7)]
    assert torch.count_nonzero(outs[2][unused]) == 0 and torch.count_nonzero(outs[3][unused]) == 0
    assert torch.count_nonzero(outs[2][[0, 3, 7]]) > 0


def test_all_base_only(device):
    x, w, b, a, bb = make_grouped(25, 40, 30, 4, 3, torch.float32, device)
    ids = torch.full((25,), -1, device=device)
    outs, refs = run_stack(x, w, b, a, bb, 1.0, ids)
    assert_close(outs[0], torch.nn.functional.linear(x.double(), w.double(), b.double()), torch.float32, "y")
    assert torch.count_nonzero(outs[2]) == 0 and torch.count_nonzero(outs[3]) == 0
    assert_close(outs[1], refs[1], torch.float32, "dx")


def test_all_one_adapter_equals_dense(device):
    x, w, b, a, bb = make_grouped(37, 50, 45, 8, 4, torch.float32, device)
    ids = torch.full((37,), 2, device=device, dtype=torch.int32)
    y = fastlora.grouped_lora_linear(x, w, b, a, bb, 0.7, ids)
    dense = fastlora.lora_linear(x, w, b, a[2], bb[2], 0.7)
    assert_close(y, dense.double(), torch.float32, "y")


def test_dropout_matches_reference_with_kernel_mask(device):
    M, n = 45, 6
    ids = _ids(M, n, seed=3).to(device)
    outs, refs = run_stack(*make_grouped(M, 70, 40, 8, n, torch.float32, device), 1.5, ids, p=0.25, seed=99)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_leading_dims_and_int64_ids(device):
    x, w, b, a, bb = make_grouped(12, 40, 24, 4, 3, torch.float32, device)
    x3 = x.reshape(3, 4, 40)
    ids = torch.tensor([[0, 1, 2, -1], [2, 2, 2, 2], [-1, -1, 0, 1]], device=device, dtype=torch.int64)
    y = fastlora.grouped_lora_linear(x3, w, b, a, bb, 1.0, ids)
    ref = fastlora.reference.grouped_lora_linear(x3.double(), w.double(), b.double(), a.double(), bb.double(), 1.0,
                                                 ids)
    assert y.shape == (3, 4, 24)
    assert_close(y, ref, torch.float32, "y")


def test_adapter_batch_worked_example():
    batch = fastlora.AdapterBatch.build(torch.tensor([2, 0, -1, 2, 0, 0]), 3)
    assert batch.perm.tolist() == [2, 1, 4, 5, 0, 3]
    assert batch.sorted_ids.tolist() == [-1, 0, 0, 0, 2, 2]
    assert batch.seg_offsets.tolist() == [1, 4, 4, 6]


@pytest.mark.parametrize("bad", [3, -2, 100])
def test_bad_ids_raise_index_error_naming_value(bad, device):
    x, w, b, a, bb = make_grouped(6, 16, 8, 2, 3, torch.float32, device)
    ids = torch.tensor([0, 1, bad, 2, 0, 1], device=device)
    with pytest.raises(IndexError, match=f"got {bad}"):
        fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids)


def test_unchecked_ids_still_correct(device):
    x, w, b, a, bb = make_grouped(10, 16, 8, 2, 3, torch.float32, device)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, 1, 0], device=device)
    y = fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids, check_ids=False)
    ref = fastlora.reference.grouped_lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0,
                                                 ids)
    assert_close(y, ref, torch.float32, "y")


def test_bad_shapes_raise(device):
    x, w, b, a, bb = make_grouped(6, 16, 8, 2, 3, torch.float32, device)
    ids = torch.zeros(6, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids[:5])
    with pytest.raises(ValueError, match="lora_B must have shape"):
        fastlora.grouped_lora_linear(x, w, b, a, bb[:, :, :1], 1.0, ids)
    with pytest.raises(ValueError, match="scaling must be"):
        fastlora.grouped_lora_linear(x, w, b, a, bb, torch.ones(4), ids)
    with pytest.raises(TypeError, match="int32 or int64"):
        fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids.float())


def test_grouped_linear_module_and_use_adapters(device):
    torch.manual_seed(0)
    layer = fastlora.GroupedLinear(24, 16, num_adapters=4, r=4, alpha=8, device=device)
    torch.nn.init.normal_(layer.lora_B)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), fastlora.GroupedLinear(16, 8, num_adapters=4,
                                                                                device=device))
    x = torch.randn(3, 5, 24, device=device)
    per_sample = torch.tensor([2, -1, 0], device=device)
    with fastlora.use_adapters(model, per_sample):
        y = model(x)
    per_token = per_sample[:, None].expand(3, 5)
    h = torch.relu(layer(x, per_token))
    expected = model[2](h, per_token)
    assert_close(y, expected.double(), torch.float32, "y")
    with pytest.raises(ValueError, match="needs adapter_ids"):
        model(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,n", [(32, 32), (4096, 32), (1000, 128), (257, 1)])
def test_gpu_grouped_matrix(M, n, dtype):
    ids = _ids(M, n, seed=M).cuda()
    outs, refs = run_stack(*make_grouped(M, 1024, 768, 16, n, dtype, "cuda"), 2.0, ids, p=0.1, seed=1)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)
