"""GroupedLinear's state and boundaries (issue 42, items 3 and 7): ``load_state_dict`` refuses a stack laid out for
other ranks; ``use_adapters`` checks the magnitude's NaN rows as ``forward(x, ids)`` does; grouped loaders and
``from_stack`` refuse a bad dropout where it enters; ``from_stack`` names the argument and both shapes."""

import collections
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from tolerance import assert_close

import fastlora

K, N = 40, 24


def stack(ranks, seed, use_dora=False):
    """GroupedLinear(K, N, ranks) with random B (and magnitudes moved off their init), in a model at ``proj``."""
    torch.manual_seed(seed)
    layer = fastlora.GroupedLinear(K, N, ranks=ranks, alpha=16, use_dora=use_dora)
    with torch.no_grad():
        for g in range(len(ranks)):
            layer.adapter(g)[1].normal_(std=0.5)
        if use_dora:
            layer.lora_magnitude.mul_(torch.rand(len(ranks), N) + 0.5)
    return nn.Sequential(collections.OrderedDict(proj=layer))


def snapshot(model):
    layer = model.proj
    return ({k: v.clone() for k, v in model.state_dict().items()}, list(layer.ranks), layer.r, layer.lora_A)


def assert_unchanged(model, before):
    state, ranks, r, lora_A = before
    layer = model.proj
    assert layer.ranks == ranks and layer.r == r and layer.lora_A is lora_A
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), state[k].nan_to_num()), k


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, K, generator=g)
    return x, torch.randint(-1, n, (3, 7), generator=g)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_load_state_dict_refuses_a_stack_of_other_ranks(strict):
    """The issue's case: ranks [8, 24] and [16, 16] have the same shapes (32 rows) but other offsets; before, it loaded
    ('All keys matched') with ``ranks`` stale, adapter 1 cut at rank 16 and remove_adapters corrupting survivors."""
    src, dst = stack([8, 24], seed=0), stack([16, 16], seed=1)
    assert src.proj.lora_A.shape == dst.proj.lora_A.shape
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=r"GroupedLinear 'proj'.*rank_offsets \[0, 8, 32\] differ from this "
                                           r"layer's \[0, 16, 32\] \(ranks \[16, 16\]\)"):
        dst.load_state_dict(src.state_dict(), strict=strict)
    assert_unchanged(dst, before)


def test_load_state_dict_refuses_other_adapter_counts_and_missing_offsets():
    """[8, 8, 8] into [8, 16]: lora_A/lora_B of one shape, rank_offsets and scaling not; torch alone would load the
    stacks and then raise, leaving the layer half loaded. A state without rank_offsets has no known layout."""
    src, dst = stack([8, 8, 8], seed=0), stack([8, 16], seed=1)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=r"'proj'.*rank_offsets \[0, 8, 16, 24\] differ"):
        dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, before)
    state = {k: v for k, v in stack([8, 16], seed=2).state_dict().items() if not k.endswith("rank_offsets")}
    with pytest.raises(RuntimeError, match="no rank_offsets"):
        dst.load_state_dict(state, strict=False)
    assert_unchanged(dst, before)


def test_load_state_dict_refuses_a_larger_rank_in_the_same_slot():
    """Ranks 8 and 5 both take an 8-row slot (same offsets); a rank-8 state in a rank-5 layer would be cut to 5 rows
    by adapter() / add_adapters / remove_adapters while forward used 8."""
    src, dst = stack([3, 8], seed=0), stack([3, 5], seed=1)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=r"adapter 1 has non-zero values past this layer's rank 5 \(rows 13:16"):
        dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, before)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_load_state_dict_of_the_same_ranks_moves_the_function(use_dora):
    """Matching layouts load (a rank-5 state into a rank-8 slot too: its padding is zero), compute the source's
    function, and remove_adapters afterwards keeps the survivors exact."""
    src, dst = stack([8, 24, 5], seed=0, use_dora=use_dora), stack([8, 24, 8], seed=1, use_dora=use_dora)
    dst.load_state_dict(src.state_dict())
    x, ids = inputs(3)
    want = src.proj(x, ids)
    assert_close(dst.proj(x, ids), want.double(), torch.float32, "loaded stack", tol=1e-6)
    fastlora.remove_adapters(dst, [0])
    keep = ids != 0
    assert_close(dst.proj(x[keep], ids[keep]), want[keep].double(), torch.float32, "after remove_adapters", tol=1e-6)


def test_use_adapters_refuses_a_magnitude_row_mixing_nan_and_numbers():
    """forward(x, ids) refuses such a row (a diverged DoRA adapter); use_adapters ran it as plain LoRA, silently."""
    model = stack([4, 8], seed=0, use_dora=True)
    with torch.no_grad():
        model.proj.lora_magnitude[1, :3] = float("nan")
    x, ids = inputs(2)
    with pytest.raises(ValueError, match="magnitude row 1 mixes NaN with numbers"):
        model.proj(x, ids)
    with pytest.raises(ValueError, match="magnitude row 1 mixes NaN with numbers"):
        with fastlora.use_adapters(model, ids):
            model(x)
    with fastlora.use_adapters(model, ids, check_ids=False):  # unchecked: per element, as documented
        assert torch.isfinite(model(x)).all()
    with torch.no_grad():
        model.proj.lora_magnitude[1] = float("nan")  # a whole row: a plain adapter, accepted
    with fastlora.use_adapters(model, ids):
        assert torch.isfinite(model(x)).all()


def save_lora(path, r=4):
    """A PEFT-format plain LoRA folder for a model with one nn.Linear(K, N) at ``proj``."""
    path.mkdir()
    g = torch.Generator().manual_seed(r)
    save_file({"base_model.model.proj.lora_A.weight": torch.randn(r, K, generator=g),
               "base_model.model.proj.lora_B.weight": torch.randn(N, r, generator=g)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                          "target_modules": ["proj"]}))
    return path


@pytest.mark.parametrize("dropout", [1.5, 1.0, -0.1, float("nan"), True, "0.1"])
def test_grouped_loaders_refuse_a_bad_dropout_where_it_enters(tmp_path, dropout):
    """docs/design.md: bad values are refused where they enter; before, dropout=1.5 built the stacks and failed only
    at the first training forward."""
    path = save_lora(tmp_path / "a")
    plain = nn.Sequential(collections.OrderedDict(proj=nn.Linear(K, N)))
    for load in (fastlora.load_adapters_grouped, fastlora.add_adapters):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            load(plain, [path], dropout=dropout)
        assert type(plain.proj) is nn.Linear and plain.proj.weight.requires_grad
    grouped = nn.Sequential(collections.OrderedDict(proj=nn.Linear(K, N)))
    fastlora.load_adapters_grouped(grouped, [path], dropout=0.25)
    layer = grouped.proj
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fastlora.add_adapters(grouped, [save_lora(tmp_path / "b", r=8)], dropout=dropout)
    assert grouped.proj is layer and layer.dropout == 0.25 and layer.num_adapters == 1
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fastlora.GroupedLinear.from_stack(layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.ranks,
                                          layer.scaling, dropout=dropout)


def test_from_stack_names_the_argument_and_both_shapes():
    w, b = torch.randn(N, K), torch.randn(N)
    ranks = [8, 24]  # slots 8 + 24 = 32 rows
    a, bb, s, m = torch.zeros(32, K), torch.zeros(N, 32), torch.ones(2), torch.ones(2, N)
    layer = fastlora.GroupedLinear.from_stack(w, b, a, bb, ranks, s, magnitude=m, dropout=0.1)
    assert layer.ranks == ranks and layer.rank_offsets.tolist() == [0, 8, 32] and layer.dropout == 0.1
    cases = [
        (dict(lora_A=torch.zeros(24, K)), r"lora_A must have shape \(sum of slots, in_features\) = \(32, 40\) for "
                                          r"ranks \[8, 24\].*weight \(24, 40\); got \(24, 40\)"),
        (dict(lora_A=torch.zeros(32, K + 1)), r"lora_A .* = \(32, 40\).*got \(32, 41\)"),
        (dict(lora_B=torch.zeros(N, 16)), r"lora_B must have shape \(out_features, sum of slots\) = \(24, 32\).*"
                                          r"got \(24, 16\)"),
        (dict(scaling=torch.ones(3)), r"scaling must have shape \(num_adapters,\) = \(2,\) for 2 ranks; got \(3,\)"),
        (dict(magnitude=torch.ones(2, N - 1)), r"magnitude must be None or have shape \(num_adapters, out_features\) "
                                               r"= \(2, 24\); got \(2, 23\)"),
        (dict(ranks=[8, -1]), r"ranks must be a non-empty list of ints in \[0, 256\]; got \[8, -1\]"),
        (dict(ranks=[]), r"ranks must be a non-empty list"),
        (dict(weight=torch.randn(N)), r"weight must have shape \(out_features, in_features\); got \(24,\)"),
    ]
    for change, match in cases:
        kw = dict(weight=w, bias=b, lora_A=a, lora_B=bb, ranks=ranks, scaling=s, magnitude=m)
        kw.update(change)
        with pytest.raises(ValueError, match=match):
            fastlora.GroupedLinear.from_stack(**kw)
    with pytest.raises(TypeError, match="scaling must be a tensor"):
        fastlora.GroupedLinear.from_stack(w, b, a, bb, ranks, [1.0, 1.0])
