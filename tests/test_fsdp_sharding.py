"""``fastlora.sharding.RowBlockWeight``, the format-independent piece FSDP2 shards quantised bases with: its row
arithmetic and errors in one process, ``Linear4bit.to_row_blocks`` (same function, same state dict), and a
block-scaled FP8 weight sharded by the same piece on 2 CPU processes (gloo), its gathered parts fed to
``fastlora.lora_linear_fp8``."""

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from test_distributed import WORLD, fsdp2_available, init_worker, spawn
from tolerance import assert_close

import fastlora
from fastlora import quant, sharding
from fastlora.linear4bit import Linear4bit
from fastlora.sharding import RowBlockWeight, RowLayout

# FP8: N = 72 rows in blocks of 16 (a unit: 16 rows; 5 row blocks, the last of 8 rows), K = 64 in blocks of 32
FN, FK, FBLOCK = 72, 64, (16, 32)
SPAWN_S = 300  # the workers, kernels under the interpreter, on a machine shared with other jobs


def fp8_parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(FN, FK, generator=g) / FK**0.5
    w[:FN // 3] *= 8.0  # block scales that differ by row block
    weight, scale = quant.quantize_fp8_blockwise(w, FBLOCK)
    return weight, scale


def fp8_row_blocks(weight, scale) -> RowBlockWeight:
    """An FP8 weight as a RowBlockWeight: the e4m3 bytes (1 entry per row, K bytes each) and the block scales (1 entry
    per 16 rows); a unit of 16 rows."""
    layout = RowLayout(FN, (sharding.rate(1, 1), sharding.rate(1, FBLOCK[0])), FK)
    return RowBlockWeight([weight.view(torch.uint8), scale], [], layout, ("fp8", FN, FK, FBLOCK), FN)


class FP8Base(nn.Module):
    """A minimal FP8 LoRA layer over a RowBlockWeight (what a LinearFP8 would do with it)."""

    def __init__(self, weight, scale, r=4):
        super().__init__()
        self.weight = nn.Parameter(fp8_row_blocks(weight, scale), requires_grad=False)
        g = torch.Generator().manual_seed(7)
        self.lora_A = nn.Parameter(torch.randn(r, FK, generator=g) / FK**0.5)
        self.lora_B = nn.Parameter(torch.randn(FN, r, generator=g))

    def forward(self, x):
        codes, scale = self.weight.parts
        return fastlora.lora_linear_fp8(x, codes.view(torch.float8_e4m3fn), scale, None, self.lora_A, self.lora_B,
                                        0.5, block_size=FBLOCK)


def test_layout_counts_and_units():
    layout = RowLayout(72, (sharding.rate(128, 1), sharding.rate(8, 256), sharding.rate(1, 16)), 128)
    assert layout.rates == ((128, 1), (1, 32), (1, 16)) and layout.unit == 32
    assert [layout.count(i, 72) for i in range(3)] == [72 * 128, 3, 5]  # partial last blocks belong to the last rows
    assert [layout.count(i, 64) for i in range(3)] == [64 * 128, 2, 4]
    assert layout.shard_rows(36) == 64 and layout.shard_rows(1) == 32 and layout.shard_rows(100) == 72
    with pytest.raises(ValueError, match="reduced positive fractions"):
        RowLayout(8, ((2, 4),), 16)


def test_split_pads_whole_units():
    weight, scale = fp8_parts()
    w = fp8_row_blocks(weight, scale)
    chunks = torch.chunk(w, 3)  # FSDP2's split at world 3: 24 rows asked, 32 given (two units)
    assert [c.rows for c in chunks] == [32, 32, 32] and [tuple(c.shape) for c in chunks] == [(32, FK)] * 3
    for i, c in enumerate(chunks):
        r0, r1 = 32 * i, min(32 * i + 32, FN)
        assert torch.equal(c.parts[0][:r1 - r0], weight.view(torch.uint8)[r0:r1])
        assert torch.count_nonzero(c.parts[0][r1 - r0:]) == 0  # padding
        assert torch.equal(c.parts[1][:-(-(r1 - r0) // 16)], scale[r0 // 16:-(-r1 // 16)])
        assert c._buffer is not None and c.parts[1].data_ptr() % 16 == 0  # one buffer, aligned parts


def test_errors_name_what_is_wrong():
    weight, scale = fp8_parts()
    w = fp8_row_blocks(weight, scale)
    with pytest.raises(ValueError, match=r"part 1 must be contiguous with 5 entries"):
        RowBlockWeight([weight.view(torch.uint8), scale[:4]], [], w.row_layout, w.fmt, FN)
    with pytest.raises(ValueError, match=r"parts must be 2 tensors, one per rate"):
        RowBlockWeight([weight.view(torch.uint8)], [], w.row_layout, w.fmt, FN)
    with pytest.raises(NotImplementedError, match="does not support aten.add"):
        w + 1
    with pytest.raises(TypeError, match="never cast"):
        w.to(torch.float16)
    with pytest.raises(NotImplementedError, match="splits on dim 0 only"):
        torch.chunk(w, 2, dim=1)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "absmax"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_to_row_blocks_keeps_function_and_state_dict(double_quant, use_dora):
    torch.manual_seed(0)
    layer = Linear4bit(128, 40, r=4, quant_type="fp4", blocksize=32, double_quant=double_quant, use_dora=use_dora,
                       compute_dtype=torch.float32)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    before, y = layer.state_dict(), layer(x)
    packed, state, plain = layer.weight.detach().clone(), layer.quant_state, copy.deepcopy(layer)
    layer.to_row_blocks()
    assert isinstance(layer.weight, RowBlockWeight) and not list(layer.buffers())
    assert torch.equal(layer(x), y)
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert torch.equal(layer.dequantized_weight(), quant.dequantize_4bit(packed, state, dtype=torch.float32))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    for copied, same in ((copy.deepcopy(layer), layer),
                         (torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), layer),
                         (copy.deepcopy(layer).half().to("cpu"), plain.half())):  # a cast leaves the packed bytes
        assert isinstance(copied.weight, RowBlockWeight) and torch.equal(copied.weight.parts[0], packed.reshape(-1))
        xd = x.to(copied.lora_A.dtype)
        assert torch.equal(copied(xd), same(xd))
    other = Linear4bit(128, 40, r=4, quant_type="fp4", blocksize=32, double_quant=double_quant, use_dora=use_dora,
                       compute_dtype=torch.float32).to_row_blocks()
    other.load_state_dict(before)
    assert torch.equal(other(x), y)


def test_row_block_errors():
    layer = Linear4bit(128, 40, r=4, blocksize=32, compute_dtype=torch.float32)
    with pytest.raises(TypeError, match="call to_row_blocks"):
        layer.quantize_rows_(lambda r0, r1: torch.zeros(r1 - r0, 128))
    layer.to_row_blocks()
    with pytest.raises(ValueError, match=r"read_rows\(0, 40\) must return rows 0:40 of the weight, shape \(40, 128\); "
                                         r"got \(40, 64\)"):
        layer.quantize_rows_(lambda r0, r1: torch.zeros(r1 - r0, 64))
    fp4 = Linear4bit(128, 40, r=4, quant_type="fp4", blocksize=32, compute_dtype=torch.float32).state_dict()
    with pytest.raises(RuntimeError, match=r"differs from this layer's \('bnb-4bit', 40, 128, 'nf4'"):
        layer.load_state_dict(fp4)
    with pytest.raises(ValueError, match="init_magnitude_ is for a DoRA layer"):
        layer.init_magnitude_()
    w = torch.randn(40, 128)
    layer.quantize_rows_(lambda r0, r1: w[r0:r1])
    packed, state = quant.quantize_4bit(w, blocksize=32)
    assert torch.equal(layer.weight.parts[0], packed.reshape(-1))
    assert torch.equal(layer.weight.parts[1], state.absmax) and torch.equal(layer.weight.parts[2], state.absmax2)
    assert torch.equal(layer.quant_state.offset, state.offset)
    dora = Linear4bit(128, 40, r=4, blocksize=32, use_dora=True, compute_dtype=torch.float32)
    expected = dora.lora_magnitude.detach().clone()
    dora.to_row_blocks().lora_magnitude.data.zero_()
    dora.init_magnitude_()
    assert torch.equal(dora.lora_magnitude, expected)


def _fp8_worker(rank, port, out):
    from torch.distributed.fsdp import fully_shard

    init_worker(rank, port)
    weight, scale = fp8_parts()
    layer = FP8Base(weight, scale)
    fully_shard(layer)
    seen = {}
    layer.register_forward_pre_hook(lambda m, a: seen.setdefault("parts", [p.clone() for p in m.weight.parts]) and None)
    x = torch.randn(6, FK, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    y.sum().backward()
    local = layer.weight._local_tensor
    result = dict(y=y.detach(), gA=layer.lora_A.grad.full_tensor(), gB=layer.lora_B.grad.full_tensor(),
                  seen=seen["parts"], held=local.nbytes_held(), whole=local.nbytes_whole(), rows=local.rows)
    dist.barrier()
    torch.save(result, f"{out}/fp8_{rank}.pt")


@pytest.mark.skipif(not fsdp2_available(), reason="needs fully_shard and gloo")
def test_fp8_base_sharded_by_the_same_piece(tmp_path):
    spawn(_fp8_worker, str(tmp_path), timeout=SPAWN_S)
    weight, scale = fp8_parts()
    layer = FP8Base(weight, scale)
    x = torch.randn(6, FK, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    y.sum().backward()
    unit_bytes = 16 * FK + scale.shape[1] * scale.element_size()  # 16 rows of codes and their row of scales
    for r in range(WORLD):
        got = torch.load(tmp_path / f"fp8_{r}.pt")
        assert torch.equal(got["seen"][0], weight.view(torch.uint8)) and torch.equal(got["seen"][1], scale)
        assert torch.equal(got["y"], y.detach()), f"rank {r}: output differs from one process"
        assert_close(got["gA"], layer.lora_A.grad, torch.float32, "lora_A grad")
        assert_close(got["gB"], layer.lora_B.grad, torch.float32, "lora_B grad")
        assert got["rows"] == 48  # ceil(72 / 2) = 36 rows asked, three units of 16 given
        assert got["held"] <= got["whole"] / WORLD + unit_bytes and got["held"] < got["whole"], got


def test_fixed_width_quant_state_json():
    """Sharded state dicts write the double-quant offset at a fixed width: one JSON length per format, the same float
    for fastlora and for bitsandbytes."""
    g = torch.Generator().manual_seed(0)
    states = [quant.quantize_4bit(torch.randn(40, 128, generator=g) * s, blocksize=32) for s in (1.0, 3e-7, 123.0)]
    key = "quant_state.bitsandbytes__nf4"
    texts = [quant.state_dict_entries(st, fixed_width=True)[key] for _, st in states]
    assert len({t.numel() for t in texts}) == 1, [bytes(t.tolist()) for t in texts]
    assert len({quant.state_dict_entries(st)[key].numel() for _, st in states}) > 1  # the shortest repr varies
    for _, st in states:
        entries = quant.state_dict_entries(st, fixed_width=True)
        assert torch.equal(quant.state_from_entries(entries).offset, st.offset)
    bnb = pytest.importorskip("bitsandbytes.functional")
    for packed, st in states:
        qs = bnb.QuantState.from_dict(dict(quant.state_dict_entries(st, fixed_width=True)), device="cpu")
        assert qs.offset.item() == st.offset.item()
        assert torch.equal(bnb.dequantize_4bit(packed, qs), quant.dequantize_4bit(packed, st))
