"""FSDP2 (``fully_shard``) shards ``fastlora.Linear4bit``'s 4-bit base, codes and scales, by whole row blocks
(``to_row_blocks``, ``fastlora.sharding.RowBlockWeight``), on 2 CPU processes (gloo, kernels under the interpreter).

References: the same model in one process, unsharded, on the existing ``Linear4bit`` path (buffers, not row blocks);
the bytes the gathered weight feeds the kernels are compared with its packed codes and quant state byte for byte."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from test_distributed import WORLD, fsdp2_available, init_worker, spawn
from tolerance import assert_close

from fastlora.linear4bit import Linear4bit

pytestmark = pytest.mark.skipif(not fsdp2_available(), reason="needs fully_shard and gloo")

# K/blocksize = 8 (layer 1) and 3 (layer 2): with double quant a unit is 32 and 256 rows, so layer 1 splits 64 + 32
# rows (uneven, padded) and layer 2 (40 rows < one unit) sits whole on rank 0, rank 1 holding only padding.
K, H, N, BLOCK = 256, 96, 40, 32
BATCH, STEPS, LR = 8, 2, 0.1
CASES = [("nf4", True, False), ("nf4", False, True), ("fp4", True, True), ("fp4", False, False)]
SPAWN_S = 300  # the workers, kernels under the interpreter, on a machine shared with other jobs


def case_id(case):
    quant_type, double_quant, use_dora = case
    return f"{quant_type}-{'dq' if double_quant else 'absmax'}-{'qdora' if use_dora else 'qlora'}"


def make_model(case, seed=0):
    quant_type, double_quant, use_dora = case
    torch.manual_seed(seed)
    kw = dict(quant_type=quant_type, blocksize=BLOCK, double_quant=double_quant, use_dora=use_dora,
              compute_dtype=torch.float32)
    model = nn.Sequential(Linear4bit(K, H, r=4, alpha=8, **kw), nn.GELU(), Linear4bit(H, N, r=2, alpha=4, **kw))
    for layer in model[::2]:
        nn.init.normal_(layer.lora_B)
    return model


def shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for layer in model[::2]:
        fully_shard(layer.to_row_blocks(), **kw)
    return fully_shard(model, **kw)


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, BATCH, K, generator=g), torch.randn(STEPS, BATCH, N, generator=g)


def base_bytes(layer):
    """The unsharded layer's parts as the kernels read them: packed codes, absmax (and absmax2)."""
    packed, state = layer._base()
    parts = [packed.reshape(-1), state.absmax] + ([state.absmax2] if state.double_quant else [])
    return [p.detach().clone() for p in parts]


def capture_gathered(model):
    """Record, at each layer's first forward, the parts of the weight FSDP2 gathered for it."""
    seen = {}

    def hook(layer, args, name):
        if name not in seen:
            seen[name] = [p.clone() for p in layer.weight.parts]

    for i, layer in enumerate(model[::2] if isinstance(model, nn.Sequential) else model):
        layer.register_forward_pre_hook(lambda m, a, name=f"layer{i}": hook(m, a, name))
    return seen


def train(model, xs, ys, *, scale=1.0):
    """STEPS of SGD on mean squared error: (loss per step, {name: [grad per step]}) of the trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=LR)
    losses, grads = [], {n: [] for n in params}
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).sum() / (BATCH * N) * scale
        loss.backward()
        losses.append(loss.detach().clone())
        for n, p in params.items():
            g = p.grad
            grads[n].append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
        opt.step()
    return losses, grads


def held(layer, world):
    """(bytes of the base this rank holds, bytes of the whole base, bytes of one unit and of ceil(N/world) rows)."""
    local = layer.weight._local_tensor
    lay = local.row_layout

    def nbytes(rows):
        return sum(lay.count(i, rows) * p.element_size() for i, p in enumerate(local.parts))

    return local.nbytes_held(), nbytes(lay.rows), nbytes(lay.unit), nbytes(-(-lay.rows // world))


def _train_worker(rank, port, case, out, world=WORLD):
    init_worker(rank, port, world)
    model = make_model(case)
    shard(model)
    seen = capture_gathered(model)
    xs, ys = data()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses, grads = train(model, xs[:, rows], ys[:, rows], scale=world)  # FSDP2 averages grads over ranks
    for loss in losses:
        dist.all_reduce(loss)
    extra = {n: b for n, b in model.named_buffers()}
    result = dict(held=[held(layer, world) for layer in model[::2]], buffers=sorted(extra),
                  quant_dtypes=[layer.weight.dtype for layer in model[::2]])
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        result.update(losses=[loss / world for loss in losses], grads=grads, seen=seen, full=full)
    torch.save(result, f"{out}/rank{rank}.pt")


def assert_same_entry(got, expected, key):
    """A state dict entry equals the unsharded layer's byte for byte; the quant state's JSON, sharded, may write the
    double-quant offset at a fixed width (``quant.state_dict_entries(fixed_width=True)``): the same float."""
    if "quant_state.bitsandbytes__" in key and not torch.equal(got, expected):
        g, e = (json.loads(bytes(t.tolist())) for t in (got, expected))
        assert g == e and "nested_offset" in g, f"{key}: {g} != {e}"
        return
    assert_same_bytes(got, expected, key)


def assert_same_bytes(got, expected, name):
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"{name}: {got.dtype} {tuple(got.shape)} != {expected.dtype} {tuple(expected.shape)}"
    diff = (got.contiguous().view(torch.uint8) != expected.contiguous().view(torch.uint8)).nonzero()
    assert diff.numel() == 0, f"{name}: {diff.shape[0]} bytes differ, first at {diff[:5].tolist()}"


@pytest.mark.parametrize("case,world", [(case, WORLD) for case in CASES] + [(CASES[2], 1)],
                         ids=[case_id(case) for case in CASES] + [f"{case_id(CASES[2])}-world1"])
def test_sharded_training_matches_one_process(case, world, tmp_path):
    """World 1 too: there FSDP2 (torch 2.13) copies one all-gather input only, the shard's one buffer."""
    spawn(_train_worker, case, str(tmp_path), world, timeout=SPAWN_S, nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    reference = make_model(case)
    state0 = reference.state_dict()
    parts = [base_bytes(layer) for layer in reference[::2]]
    losses, grads = train(reference, *data())

    got = ranks[0]
    for step in range(STEPS):
        assert_close(got["losses"][step], losses[step], torch.float32, f"loss step {step}")
    assert got["grads"].keys() == grads.keys() and len(grads) == (6 if case[2] else 4)
    for name in grads:
        for step in range(STEPS):
            assert_close(got["grads"][name][step], grads[name][step], torch.float32, f"{name} step {step}")
    for i, expected in enumerate(parts):  # the kernels read the unsharded layer's bytes
        assert len(got["seen"][f"layer{i}"]) == len(expected)
        for j, (g, e) in enumerate(zip(got["seen"][f"layer{i}"], expected, strict=True)):
            assert_same_bytes(g, e, f"layer{i} gathered part {j}")
    # the full state dict: bitsandbytes' keys, the unsharded layer's bytes; the adapters as trained
    trained = reference.state_dict()
    assert got["full"].keys() == state0.keys()
    for key, value in got["full"].items():
        if "lora_" in key:
            assert_close(value, trained[key], torch.float32, key)
        else:
            assert_same_entry(value, state0[key], key)
    for r, result in enumerate(ranks):
        assert result["buffers"] == [], f"rank {r} keeps replicated buffers {result['buffers']}"
        assert result["quant_dtypes"] == [torch.uint8] * 2
        for i, (mine, total, unit, even) in enumerate(result["held"]):
            assert mine <= even + unit, f"rank {r} layer{i}: holds {mine} of {total} bytes; bound {even} + {unit}"
            if unit < even and world > 1:
                assert mine < total, f"rank {r} layer{i}: holds all {total} bytes"


# Byte pairs that read as float16/bfloat16 Inf and NaN patterns (little-endian): a cast of the packed bytes, or a
# float copy that canonicalises NaN, would change them.
SPECIAL = [0x80, 0x7F, 0xC0, 0x7F, 0x81, 0x7F, 0x01, 0xFF, 0x00, 0x7C, 0x00, 0x7E, 0x01, 0xFC, 0xFF, 0xFF]


def special_layer(case, seed=0):
    """A layer whose packed codes (and double-quant absmax codes) hold NaN/Inf byte patterns in both ranks' rows."""
    model = make_model(case, seed)
    layer = model[0]
    special = torch.tensor(SPECIAL, dtype=torch.uint8)
    with torch.no_grad():
        flat = layer.weight.view(-1)
        for at in (0, flat.numel() // 2 + 6, flat.numel() - len(SPECIAL)):
            flat[at:at + len(SPECIAL)] = special
        if layer.double_quant:
            layer.quant_absmax[:len(SPECIAL)] = special
            layer.quant_absmax[-len(SPECIAL):] = special
    return layer


def _mixed_precision_worker(rank, port, out):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    init_worker(rank, port)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    result = {}
    for dtype in (torch.bfloat16, torch.float16):
        layer = special_layer(CASES[2]).to_row_blocks()  # fp4, double quant, QDoRA
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
        seen = capture_gathered([layer])
        y = layer(x)
        y.float().sum().backward()
        result[dtype] = dict(y=y.detach(), parts=seen["layer0"], outer=layer.weight.dtype,
                             grad=layer.lora_A.grad.full_tensor())
    if rank == 0:
        torch.save(result, f"{out}/mp.pt")


def test_mixed_precision_never_casts_the_payload(tmp_path):
    spawn(_mixed_precision_worker, str(tmp_path), timeout=SPAWN_S)
    result = torch.load(tmp_path / "mp.pt")
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    for dtype, got in result.items():
        layer = special_layer(CASES[2])
        for j, (g, e) in enumerate(zip(got["parts"], base_bytes(layer), strict=True)):
            assert_same_bytes(g, e, f"{dtype} gathered part {j}")
        assert got["outer"] == torch.uint8
        # FSDP2's policy casts the floating parameters (adapters, magnitude, bias) and the input, nothing else
        for name in ("lora_A", "lora_B", "lora_magnitude", "bias"):
            setattr(layer, name, nn.Parameter(getattr(layer, name).detach().to(dtype)))
        y = layer(x.to(dtype))
        y.float().sum().backward()
        assert got["y"].dtype == dtype and torch.equal(got["y"], y.detach()), f"{dtype}: output differs"
        assert_close(got["grad"], layer.lora_A.grad, dtype, f"{dtype} lora_A grad")


def _state_worker(rank, port, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    init_worker(rank, port)
    full = StateDictOptions(full_state_dict=True)
    case = CASES[2]  # fp4, double quant, QDoRA: every part and the magnitude
    # another base and adapter than the models below start with; a fresh dict per call, as set_model_state_dict
    # writes its own values into the dict it is given
    source = make_model(case, seed=1).state_dict
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    result = {}

    model = shard(make_model(case, seed=0))
    result["initial"] = get_model_state_dict(model, options=full)
    set_model_state_dict(model, source(), options=full)
    result["loaded_full"] = get_model_state_dict(model, options=full)
    result["y_full"] = model(x).detach()

    other = shard(make_model(case, seed=2))
    set_model_state_dict(other, source() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    result["loaded_broadcast"] = get_model_state_dict(other, options=full)
    result["y_broadcast"] = other(x).detach()

    sharded = get_model_state_dict(model)
    result["sharded_types"] = {k: type(v).__name__ for k, v in sharded.items()}
    dcp.save(sharded, checkpoint_id=f"{out}/dcp")
    restored = shard(make_model(case, seed=3))
    state = get_model_state_dict(restored)
    dcp.load(state, checkpoint_id=f"{out}/dcp")
    set_model_state_dict(restored, state)
    result["loaded_dcp"] = get_model_state_dict(restored, options=full)
    result["y_dcp"] = restored(x).detach()
    result["dcp_shards"] = all(torch.equal(a, b) for la, lb in zip(model[::2], restored[::2], strict=True)
                               for a, b in zip(la.weight._local_tensor.parts, lb.weight._local_tensor.parts,
                                               strict=True))
    torch.save(result, f"{out}/state{rank}.pt")


def test_state_dicts_and_checkpoints(tmp_path):
    spawn(_state_worker, str(tmp_path), timeout=SPAWN_S)
    case = CASES[2]
    initial, source = make_model(case, seed=0).state_dict(), make_model(case, seed=1)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    expected = source(x).detach()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"state{r}.pt")
        for name, want in (("initial", initial), ("loaded_full", source.state_dict()),
                           ("loaded_broadcast", source.state_dict()), ("loaded_dcp", source.state_dict())):
            assert got[name].keys() == want.keys(), f"rank {r} {name}: keys {sorted(got[name])}"
            for key in want:
                assert_same_entry(got[name][key], want[key], f"rank {r} {name} {key}")
        for how in ("full", "broadcast", "dcp"):
            assert torch.equal(got[f"y_{how}"], expected), f"rank {r}: the model loaded by {how} computes otherwise"
        assert got["dcp_shards"], f"rank {r}: the shards restored from the checkpoint differ from the saved ones"
        types = got["sharded_types"]
        assert all(types[f"{layer}.weight{key}"] == "DTensor" for layer in (0, 2)
                   for key in ("", ".absmax", ".nested_absmax")), types


def full_weights(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(H, K, generator=g) / K**0.5).to(torch.bfloat16),
            (torch.randn(N, H, generator=g) / H**0.5).to(torch.bfloat16)]


def _meta_worker(rank, port, case, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    init_worker(rank, port)
    with torch.device("meta"):
        model = make_model(case)
    shard(model)
    model.to_empty(device="cpu")
    weights, asked = full_weights(), []

    def reader(i):
        def read_rows(r0, r1):
            asked.append((i, r0, r1))
            return weights[i][r0:r1]
        return read_rows

    for i, layer in enumerate(model[::2]):
        layer.quantize_rows_(reader(i))
        if layer.use_dora:
            layer.init_magnitude_()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.save(dict(state={k: v for k, v in state.items() if "weight" in k or "magnitude" in k}, asked=asked),
               f"{out}/meta{rank}.pt")


@pytest.mark.parametrize("case", CASES[:2], ids=case_id)
def test_meta_model_quantised_shard_by_shard(case, tmp_path):
    """Built on the meta device, sharded, then each rank quantises only its rows: the bytes of quantize_4bit on the
    whole weight, and no rank reads more than its rows; QDoRA's magnitude from the rows' norms (init_magnitude_)."""
    spawn(_meta_worker, case, str(tmp_path), timeout=SPAWN_S)
    quant_type, double_quant, _ = case
    expected = {}
    for i, w in enumerate(full_weights()):
        base = nn.Linear(w.shape[1], w.shape[0], bias=False)  # fp32, as the layers' format (compute_dtype)
        base.weight.data.copy_(w)  # the bf16 values: quantize_4bit reads them in fp32 either way
        layer = Linear4bit.from_linear(base, quant_type=quant_type, blocksize=BLOCK, double_quant=double_quant,
                                       use_dora=case[2])
        expected.update({f"{2 * i}.{k}": v for k, v in layer.state_dict().items() if k.startswith("weight")
                         or "magnitude" in k})
    read = {}
    for r in range(WORLD):
        got = torch.load(tmp_path / f"meta{r}.pt")
        assert got["state"].keys() == expected.keys() and any("magnitude" in k for k in expected) == case[2]
        for key, value in expected.items():
            if "magnitude" in key:  # each rank's row norms, gathered: PEFT's initial ||W_n||
                assert_close(got["state"][key], value, torch.float32, f"rank {r} {key}")
            else:
                assert_same_entry(got["state"][key], value, f"rank {r} {key}")
        for i, r0, r1 in got["asked"]:
            read[i] = read.get(i, 0) + (r1 - r0)
            rows, blocks_per_row = (H, K // BLOCK) if i == 0 else (N, H // BLOCK)
            unit = 256 // math.gcd(256, blocks_per_row) if double_quant else 1  # rows of whole absmax2 blocks
            assert r1 - r0 <= -(-rows // WORLD) + unit, f"rank {r} read rows {r0}:{r1} of layer {i}"
    assert read == {0: H, 1: N}, f"rows read per layer {read}"
