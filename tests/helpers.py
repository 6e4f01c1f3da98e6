"""Random problem builders and the float64 oracle runs shared by the kernel tests."""

import contextlib

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import quant, reference


def case_id(**kw) -> str:
    return "-".join(f"{k}{v}" for k, v in kw.items())


def make_dense(M, K, N, R, dtype, device, *, bias=True, adapter_dtype=None, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (M,) if lead is None else lead
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    ad = adapter_dtype or dtype
    a = (torch.randn(R, K, generator=g) / K**0.5).to(ad).to(device)
    bb = torch.randn(N, R, generator=g).to(ad).to(device)
    return x, w, b, a, bb


def make_grouped(M, K, N, R, n, dtype, device, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    a = (torch.randn(n, R, K, generator=g) / K**0.5).to(dtype).to(device)
    bb = torch.randn(n, N, R, generator=g).to(dtype).to(device)
    return x, w, b, a, bb


def f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def run_dense(x, w, b, a, bb, s, *, p=0.0, seed=0, grads=True):
    """(fastlora outputs, float64 reference outputs): y and, with grads, dx, dA, dB for one random dy."""
    x, a, bb = (t.detach().requires_grad_(grads) for t in (x, a, bb))
    y = fastlora.lora_linear(x, w, b, a, bb, s, dropout_p=p, training=p > 0, seed=seed)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    xr, wr, br, ar, bbr = f64(x, w, b, a, bb)
    yr = reference.lora_linear(xr, wr, br, ar, bbr, s, dropout_p=p, training=p > 0, dropout_mask=mask)
    if not grads:
        return [y], [yr]
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    return [y, x.grad, a.grad, bb.grad], [yr, xr.grad, ar.grad, bbr.grad]


def offsets_of(ranks, device="cpu", dtype=torch.int32):
    """rank_offsets [n + 1] of a ragged stack whose adapter g has rank ranks[g]."""
    return torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=dtype, device=device)


def adapter_slice(t, g, offsets, dim):
    """Adapter g's part of a stack (or of its gradient): [g] padded (``offsets`` None), ragged its rows (dim 0: A,
    dA) or columns (dim 1: B, dB)."""
    if offsets is None:
        return t[g]
    return t.narrow(dim, int(offsets[g]), int(offsets[g + 1] - offsets[g]))


def run_stack(x, w, b, a, bb, s, ids, offsets=None, *, m=None, p=0.0, seed=0, **kw):
    """Grouped LoRA over a padded (``offsets`` None) or ragged stack, grouped DoRA with a magnitude ``m``: (fastlora
    y, dx, dA, dB and, with m, dm; the same from the float64 reference) for one seeded random dy."""
    leaves = [t.detach().requires_grad_() for t in (x, a, bb, *([] if m is None else [m]))]
    x, a, bb, *mag = leaves
    dora = dict(magnitude=mag[0]) if mag else {}
    y = fastlora.grouped_lora_linear(x, w, b, a, bb, s, ids, dropout_p=p, training=p > 0, seed=seed,
                                     rank_offsets=offsets, **dora, **kw)
    mask = fastlora.dropout_mask(x.shape, p, seed, x.device) if p > 0 else None
    xr, wr, br, ar, bbr, *mr = f64(x, w, b, a, bb, *mag)
    sr = s.double() if isinstance(s, torch.Tensor) else s
    ref = dict(dropout_p=p, training=p > 0, dropout_mask=mask, rank_offsets=offsets)
    yr = (reference.grouped_dora_linear(xr, wr, br, ar, bbr, sr, ids, mr[0], **ref) if mag
          else reference.grouped_lora_linear(xr, wr, br, ar, bbr, sr, ids, **ref))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y.backward(dy)
    yr.backward(dy.double())
    return [y, *(t.grad for t in leaves)], [yr, *(t.grad for t in (xr, ar, bbr, *mr))]


def dora_layer_backward(layer, x, y, yr, xr, ar, br, mr):
    """Backpropagate one random dy through a DoRA layer's output ``y`` and its float64 reference ``yr`` (built from
    the leaves xr, ar, br, mr): (fastlora outputs, reference outputs) y, dx, dA, dB, dm."""
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    return ([y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad],
            [yr, xr.grad, ar.grad, br.grad, mr.grad])


def compiled_matches_eager(model, in_features: int, tokens: int, assert_close) -> None:
    """torch.compile(fullgraph, aot_eager) of ``model`` gives eager's output and gradients (x and every trainable
    parameter) for one random input [tokens, in_features] and output gradient."""
    def run(m):
        m.zero_grad(set_to_none=True)
        x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(3)).requires_grad_()
        y = m(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        return [y, x.grad] + [p.grad for p in m.parameters() if p.requires_grad]

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, expected = run(compiled), run(model)
    torch._dynamo.reset()
    assert len(got) == len(expected) == 2 + sum(p.requires_grad for p in model.parameters())
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g, e, torch.float32, f"output {i}")


def saved_elements(fn):
    """The numel of every tensor autograd saves while ``fn`` runs (views of inputs included)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@contextlib.contextmanager
def created_tensors():
    """Yield a list that gets (numel, dtype, op name) of every tensor an op returns while the block runs (a
    ``TorchDispatchMode``: what was allocated, views included), to assert that no large temporary is made."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.append((t.numel(), t.dtype, str(func)))
            return out

    with Record():
        yield seen


def gemm_weights(monkeypatch) -> list:
    """A list that gets the W operand (a tensor, ``Packed4bit`` or ``BlockFP8``) of every ``_launch.gemm`` call from
    now on: proof that the fused kernels ran, and with which weight."""
    from fastlora import _launch

    seen, gemm = [], _launch.gemm
    monkeypatch.setattr(_launch, "gemm", lambda x, w, **kw: seen.append(w) or gemm(x, w, **kw))
    return seen


def wide_float_sizes(seen) -> list[int]:
    """The numel of the 16- or 32-bit floating-point tensors among ``created_tensors``' records."""
    return [n for n, dtype, _ in seen if dtype.is_floating_point and dtype.itemsize >= 2]


class CheckpointFP8Linear(nn.Module):
    """What an FP8 checkpoint's linear looks like once loaded (transformers' ``FP8Linear`` without its kernels): an
    e4m3 ``weight`` and fp32/bf16 ``weight_scale_inv`` parameters, a ``block_size``."""

    def __init__(self, w: torch.Tensor, bias=None, block_size=(128, 128), scale_dtype=torch.float32):
        super().__init__()
        q, s = quant.quantize_fp8_blockwise(w, block_size, scale_dtype)
        self.block_size = block_size
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(s, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x):
        w = quant.dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, self.block_size, dtype=x.dtype)
        return nn.functional.linear(x, w, self.bias)
