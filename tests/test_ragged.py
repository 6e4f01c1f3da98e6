"""Ragged adapter stacks: every adapter at its own rank in one grouped call (``rank_offsets``), against the float64
reference; the layers and model helpers that store adapters that way and add / remove them at run time."""

import pytest
import torch
from helpers import adapter_slice, f64, offsets_of, run_stack
from tolerance import assert_close

import fastlora
from fastlora import reference

NAMES = ("y", "dx", "dA", "dB")


def make_ragged(M, K, N, ranks, dtype, device, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    a = (torch.randn(total, K, generator=g) / K**0.5).to(dtype).to(device)
    bb = torch.randn(N, total, generator=g).to(dtype).to(device)
    return x, w, b, a, bb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_ranks_1_to_256_in_one_call(dtype, device):
    ranks = [1, 4, 16, 64, 256, 8]  # adapter 5 unused
    M, K, N = 45, 70, 50
    x, w, b, a, bb = make_ragged(M, K, N, ranks, dtype, device)
    ids = torch.randint(-1, 5, (M,), generator=torch.Generator().manual_seed(1)).to(device)
    assert {-1, 0, 1, 2, 3, 4} <= set(ids.tolist())
    offsets = offsets_of(ranks, device)
    scaling = torch.linspace(-1.0, 2.0, len(ranks))
    outs, refs = run_stack(x, w, b, a, bb, scaling, ids, offsets)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, dtype, name)
    assert outs[2].shape == a.shape and outs[3].shape == bb.shape
    assert torch.count_nonzero(adapter_slice(outs[2], 5, offsets, 0)) == 0
    assert torch.count_nonzero(adapter_slice(outs[3], 5, offsets, 1)) == 0
    for g in range(5):  # every used adapter, the rank-1 one included, gets a gradient
        assert torch.count_nonzero(adapter_slice(outs[2], g, offsets, 0)) > 0
    base = torch.nn.functional.linear(x.double(), w.double(), b.double())
    rows = (ids == -1).nonzero().squeeze(1)
    assert_close(outs[0][rows], base[rows], dtype, "y of base-only tokens")


def test_ragged_equals_padded_stack(device):
    """The same adapters as a zero-padded (n, r_max, K) stack through the existing grouped path."""
    ranks = [3, 16, 9]
    M, K, N = 30, 40, 24
    x, w, b, a, bb = make_ragged(M, K, N, ranks, torch.float32, device, seed=3)
    offsets = offsets_of(ranks, device)
    pa = torch.zeros(3, 16, K, device=device)
    pb = torch.zeros(3, N, 16, device=device)
    for g, r in enumerate(ranks):
        pa[g, :r] = adapter_slice(a, g, offsets, 0)
        pb[g, :, :r] = adapter_slice(bb, g, offsets, 1)
    ids = torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(2)).to(device)
    y = fastlora.grouped_lora_linear(x, w, b, a, bb, 0.5, ids, rank_offsets=offsets)
    padded = fastlora.grouped_lora_linear(x, w, b, pa, pb, 0.5, ids)
    assert_close(y, padded.double(), torch.float32, "y")


def test_dropout_with_kernel_mask(device):
    ranks = [8, 32, 2]
    M = 40
    x, w, b, a, bb = make_ragged(M, 70, 40, ranks, torch.float32, device, seed=4)
    ids = torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(4)).to(device)
    outs, refs = run_stack(x, w, b, a, bb, 1.5, ids, offsets_of(ranks, device), p=0.25, seed=99)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


def test_rank_zero_adapters_add_nothing(device):
    ranks = [0, 8, 0, 4]
    M = 24
    x, w, b, a, bb = make_ragged(M, 40, 30, ranks, torch.float32, device, seed=5)
    ids = torch.tensor([0, 1, 2, 3, -1, 0] * 4, device=device)
    offsets = offsets_of(ranks, device, torch.int64)  # int64 offsets are taken too
    outs, refs = run_stack(x, w, b, a, bb, 2.0, ids, offsets)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    base = torch.nn.functional.linear(x.double(), w.double(), b.double())
    rows = ((ids == 0) | (ids == 2)).nonzero().squeeze(1)
    assert_close(outs[0][rows], base[rows], torch.float32, "y of rank-0 tokens")


def test_all_ranks_zero(device):
    x, w, b, a, bb = make_ragged(10, 16, 8, [0, 0], torch.float32, device)
    ids = torch.tensor([0, 1, -1, 0, 1, 1, 0, 0, -1, 1], device=device)
    outs, _ = run_stack(x, w, b, a, bb, 1.0, ids, offsets_of([0, 0], device))
    assert_close(outs[0], torch.nn.functional.linear(x.double(), w.double(), b.double()), torch.float32, "y")
    assert outs[2].shape == (0, 16) and outs[3].shape == (8, 0)


def test_storage_tail_past_the_last_offset_gets_zero_gradient(device):
    """Rows of A past rank_offsets[-1] (free storage) are no adapter's: zero gradient, never read."""
    ranks = [4, 8]
    x, w, b, a, bb = make_ragged(20, 24, 16, [*ranks, 5], torch.float32, device, seed=6)
    ids = torch.randint(-1, 2, (20,), generator=torch.Generator().manual_seed(6)).to(device)
    outs, refs = run_stack(x, w, b, a, bb, 1.0, ids, offsets_of(ranks, device))
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)
    assert torch.count_nonzero(outs[2][12:]) == 0 and torch.count_nonzero(outs[3][:, 12:]) == 0


def test_unchecked_offsets_and_decode(device):
    """check_ids=False skips both host reads (ids, offsets); T's width then comes from sum r."""
    ranks = [2, 16, 64, 1]
    M = 4  # decode: each token its own adapter
    x, w, b, a, bb = make_ragged(M, 32, 24, ranks, torch.float32, device, seed=8)
    ids = torch.tensor([3, 2, 1, 0], device=device)
    outs, refs = run_stack(x, w, b, a, bb, 0.5, ids, offsets_of(ranks, device), check_ids=False)
    for name, o, r in zip(NAMES, outs, refs, strict=True):
        assert_close(o, r, torch.float32, name)


BAD_OFFSETS = [  # (offsets, error pattern) for a stack of 12 rank rows and 3 adapters
    (torch.tensor([0, 4, 2, 12], dtype=torch.int32), r"rank_offsets must be non-decreasing.*\[2\] = 2 < .*\[1\] = 4"),
    (torch.tensor([1, 4, 8, 12], dtype=torch.int32), "rank_offsets must start at 0; got 1"),
    (torch.tensor([0, 4, 8, 13], dtype=torch.int32), "rank_offsets ends at 13, past lora_A's 12 rows"),
    (torch.tensor([0, 4, 8, 12], dtype=torch.float32), "rank_offsets must be int32 or int64"),
    (torch.tensor([0], dtype=torch.int32), r"rank_offsets must be a 1-D tensor of n \+ 1 offsets"),
    (torch.tensor([[0, 4], [8, 12]], dtype=torch.int32), r"rank_offsets must be a 1-D tensor.*\(2, 2\)"),
    (torch.tensor([0, 4, 8, 12], dtype=torch.int32, device="meta"), "rank_offsets is on meta"),
    (torch.tensor([0, 4, 12], dtype=torch.int32), r"rank_offsets has 3 entries \(n = 2 adapters\) but scaling"),
]


@pytest.mark.parametrize("offsets,match", BAD_OFFSETS, ids=["decreasing", "not-from-0", "past-A", "float", "short",
                                                            "2d", "device", "length-vs-scaling"])
def test_bad_offsets_raise_naming_rank_offsets(offsets, match, device):
    x, w, b, a, bb = make_ragged(6, 16, 8, [12], torch.float32, device)
    ids = torch.tensor([0, 1, 2, -1, 0, 1], device=device)
    offsets = offsets if offsets.is_meta else offsets.to(device)
    with pytest.raises(ValueError, match=match):
        fastlora.grouped_lora_linear(x, w, b, a, bb, torch.ones(3), ids, rank_offsets=offsets)


def test_bad_ragged_shapes_and_ranks_raise(device):
    x, w, b, a, bb = make_ragged(6, 16, 8, [12], torch.float32, device)
    ids = torch.tensor([0, 1, 1, -1, 0, 1], device=device)
    offsets = torch.tensor([0, 4, 12], device=device)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(out_features, sum of ranks\) = \(8, 12\)"):
        fastlora.grouped_lora_linear(x, w, b, a, bb[:, :10], 1.0, ids, rank_offsets=offsets)
    with pytest.raises(ValueError, match=r"with rank_offsets, lora_A must have shape \(sum of ranks, in_features\)"):
        fastlora.grouped_lora_linear(x, w, b, a.reshape(2, 6, 16), bb, 1.0, ids, rank_offsets=offsets)
    with pytest.raises(TypeError, match="rank_offsets must be an integer tensor"):
        fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids, rank_offsets=[0, 4, 12])
    x, w, b, a, bb = make_ragged(6, 16, 8, [300], torch.float32, device)
    with pytest.raises(ValueError, match="rank_offsets gives adapter 1 rank 299; ranks must be at most 256"):
        fastlora.grouped_lora_linear(x, w, b, a, bb, 1.0, ids, rank_offsets=torch.tensor([0, 1, 300]).to(device))


# ------------------------------------------------------------------------------------------ layers and models


def test_grouped_linear_stores_each_adapter_at_its_own_rank(device):
    torch.manual_seed(0)
    layer = fastlora.GroupedLinear(40, 24, ranks=[2, 16, 0, 8], alpha=8, device=device)
    torch.nn.init.normal_(layer.lora_B)
    # ranks rounded up to multiples of 8 (aligned columns of B), the total to 16
    assert layer.lora_A.shape == (32, 40) and layer.lora_B.shape == (24, 32)
    assert layer.rank_offsets.tolist() == [0, 8, 24, 24, 32] and layer.ranks == [2, 16, 0, 8]
    assert torch.count_nonzero(layer.lora_A[2:8]) == 0 and torch.count_nonzero(layer.adapter(0)[0]) == 2 * 40
    assert layer.scaling.tolist() == [4.0, 0.5, 0.0, 1.0]
    x = torch.randn(3, 7, 40, device=device)
    ids = torch.randint(-1, 4, (3, 7), generator=torch.Generator().manual_seed(0)).to(device)
    y = layer(x, ids)
    ref = reference.grouped_lora_linear(*f64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B),
                                        layer.scaling.double(), ids, rank_offsets=layer.rank_offsets)
    assert_close(y, ref, torch.float32, "y")
    with pytest.raises(ValueError, match="r must be an int in"):
        fastlora.GroupedLinear(40, 24, ranks=[2, 300])


def test_compile_fullgraph_ragged(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = fastlora.GroupedLinear(32, 24, ranks=[2, 16, 0, 8], alpha=8, device=device)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(9, 32, device=device)
    ids = torch.tensor([3, 0, -1, 1, 1, 2, 0, 3, 1], device=device)

    def run(fn):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        with fastlora.use_adapters(layer, ids):
            y = fn(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device))
        return [y, xi.grad, layer.lora_A.grad, layer.lora_B.grad]

    try:
        got = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
        # the functional form too: offsets not read on the host while compiling, T's width from sum r
        fn = torch.compile(lambda xi: fastlora.grouped_lora_linear(
            xi, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, ids,
            rank_offsets=layer.rank_offsets), fullgraph=True, backend="aot_eager")
        functional = run(fn)
    finally:
        torch._dynamo.reset()
    expected = run(layer)
    for i, (g, f, e) in enumerate(zip(got, functional, expected, strict=True)):
        assert_close(g, e.double(), torch.float32, f"module output {i}")
        assert_close(f, e.double(), torch.float32, f"functional output {i}")


def tiny_llama():
    from tiny import tiny_llama as build  # needs transformers: imported here, so the kernel tests above run without

    return build()


# ranks 2 / 64 / 8 on different modules (and one pattern), the mix on a tiny Llama (hidden 64)
CONFIGS = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
           dict(r=64, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
           dict(r=8, lora_alpha=8, target_modules=["down_proj", "k_proj"], rank_pattern={"k_proj": 4}),
           dict(r=16, lora_alpha=32, target_modules=["gate_proj", "v_proj"])]


def save_peft(path, seed, **config):
    """A PEFT adapter over tiny_llama() (the same base every time), its weights drawn from ``seed``."""
    peft = pytest.importorskip("peft")
    from tiny import randomize_lora_B

    base = tiny_llama()
    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.LoraConfig(**config))
    randomize_lora_B(pm, seed=seed)
    pm.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def peft_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragged-adapters")
    return [save_peft(root / str(i), 10 + i, **c) for i, c in enumerate(CONFIGS)]


@pytest.fixture(scope="module")
def peft_refs(peft_paths):
    from peft import PeftModel

    base = tiny_llama().double()
    return [PeftModel.from_pretrained(tiny_llama().double(), str(p)).eval() for p in peft_paths], base


def lora_values(model):
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def grouped(model):
    return [m for m in model.modules() if isinstance(m, fastlora.GroupedLinear)]


def assert_storage(model):
    """Each layer holds its live adapters at their own ranks, each rounded up to 8 and the total to 16: at most
    (sum r + 8 per adapter + 15) * (in + out) values."""
    for m in grouped(model):
        rows = m.lora_A.shape[0]
        assert rows == -(-sum(-(-r // 8) * 8 for r in m.ranks) // 16) * 16
        assert rows <= sum(m.ranks) + 8 * sum(r > 0 for r in m.ranks) + 15
        assert m.lora_B.shape == (m.out_features, rows)


def assert_rows_match(model, ids, paths_of, refs, base, seed=0):
    """Row b of a mixed batch equals the PEFT model of adapter ids[b] (float64), or the base for -1."""
    from tiny import tokens

    x = tokens(batch=len(ids), seq=5, seed=seed)
    with fastlora.use_adapters(model, torch.tensor(ids)):
        out = model(x).logits
    for row, i in enumerate(ids):
        ref = base if i < 0 else refs[paths_of[i]]
        assert_close(out[row], ref(x[row:row + 1]).logits[0], torch.float32, f"row {row} (adapter {i})")


def test_tiny_llama_mixed_ranks_equal_each_peft_model(peft_paths, peft_refs):
    refs, base = peft_refs
    model = tiny_llama()
    fastlora.load_adapters_grouped(model, peft_paths[:3])
    q = model.model.layers[0].self_attn.q_proj
    assert q.ranks == [2, 64, 0] and model.model.layers[1].self_attn.k_proj.ranks == [0, 0, 4]
    assert_storage(model)
    peft_values = sum(lora_values(r) for r in refs[:3])  # PEFT holds each adapter at its own rank
    assert peft_values < lora_values(model) < 1.35 * peft_values  # rank 2 and 4 adapters take 8 rows
    padded = sum(3 * max(m.ranks) * (m.in_features + m.out_features) for m in grouped(model))
    assert lora_values(model) < padded / 2
    assert_rows_match(model, [2, 0, -1, 1, 0, 2], [0, 1, 2], refs, base)


def test_add_remove_add(peft_paths, peft_refs):
    refs, base = peft_refs
    model = tiny_llama()
    assert fastlora.add_adapters(model, peft_paths[:2]) == [0, 1]  # a plain model becomes grouped
    assert fastlora.add_adapters(model, [peft_paths[2]]) == [2]
    q = model.model.layers[0].self_attn.q_proj
    assert q.ranks == [2, 64, 0] and q.num_adapters == 3
    assert_storage(model)
    assert_rows_match(model, [2, 1, 0, -1], [0, 1, 2], refs, base, seed=1)
    fastlora.remove_adapters(model, [1])
    assert model.model.layers[0].self_attn.q_proj.ranks == [2, 0, 0]
    assert_storage(model)  # the evicted rank-64 rows are gone
    assert_rows_match(model, [2, 0, -1], [0, None, 2], refs, base, seed=2)  # the others keep their ids
    x = torch.randint(0, 128, (2, 5))
    removed = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="adapter id 1 was removed"), fastlora.use_adapters(model, removed):
        model(x)
    q = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="adapter id 1 was removed"):
        q(torch.randn(3, 64), torch.tensor([0, 1, -1]))
    with fastlora.use_adapters(model, torch.tensor([0, 1]), check_ids=False):  # unchecked: nothing, not stale
        unchecked = model(x).logits
    assert_close(unchecked[1], base(x[1:2]).logits[0], torch.float32, "removed id, unchecked")
    with pytest.raises(ValueError, match="already removed"):
        fastlora.remove_adapters(model, [1])
    with pytest.raises(IndexError, match="adapter id 3 is out of range"):
        fastlora.remove_adapters(model, [3])
    assert fastlora.add_adapters(model, [peft_paths[3]]) == [1]  # the freed id is reused
    assert_rows_match(model, [1, 2, 0, 1], [0, 3, 2], refs, base, seed=3)
    assert fastlora.add_adapters(model, [peft_paths[1]]) == [3]


def test_add_remove_cycles_keep_storage_constant(peft_paths):
    model = tiny_llama()
    fastlora.load_adapters_grouped(model, peft_paths[:2])
    start = (lora_values(model), model.model.layers[0].self_attn.q_proj.num_adapters)
    for _ in range(3):
        fastlora.remove_adapters(model, [0])
        assert fastlora.add_adapters(model, [peft_paths[2]]) == [0]
        fastlora.remove_adapters(model, [0])
        assert fastlora.add_adapters(model, [peft_paths[0]]) == [0]
        assert (lora_values(model), model.model.layers[0].self_attn.q_proj.num_adapters) == start


def test_failed_add_or_remove_changes_nothing(peft_paths, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(peft_paths[2], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.lora_B.weight"))
    weights[key] = weights[key][:, :3].contiguous()
    save_file(weights, bad / "adapter_model.safetensors")
    model = tiny_llama()
    fastlora.load_adapters_grouped(model, peft_paths[:2])
    fastlora.remove_adapters(model, [0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(FileNotFoundError):
        fastlora.add_adapters(model, [peft_paths[2], tmp_path / "missing"])
    with pytest.raises(ValueError, match=r"down_proj.lora_B must have shape \(out_features, r\) = \(64, 8\)"):
        fastlora.add_adapters(model, [peft_paths[3], bad])
    with pytest.raises(ValueError, match="must not repeat"):
        fastlora.remove_adapters(model, [1, 1])
    with pytest.raises(TypeError, match="adapter ids must be ints"):
        fastlora.remove_adapters(model, [1.0])
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert dict(model.named_modules()).keys() == modules.keys()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.model.layers[0].self_attn.q_proj.removed == {0}
