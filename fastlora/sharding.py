"""FSDP2 sharding of a quantised base weight by whole row blocks: ``RowBlockWeight``.

A quantised W [N, K] is a few tensors, its parts: the payload (the codes) and the scales. Along dim 0 each part
holds a fixed fraction num/den of an entry per weight row:

    4-bit (bitsandbytes)     codes uint8 [N*K/2]            K/2 per row
                             absmax [N*K/blocksize]         K/blocksize per row
                             absmax2 [ceil(.../256)]        K/(blocksize*256) per row (double quant)
    FP8 (block-scaled)       weight [N, K] (as uint8)       1 per row
                             weight_scale_inv [ceil(N/bn), ceil(K/bk)]   1/bn per row

Rows [r0, r1) with r0 a multiple of ``unit`` = lcm of the reduced dens own entries [ceil(r0 num/den), ceil(r1
num/den)) of every part: whole quantisation blocks, so a rank's scales belong to its own rows. FSDP2 splits the
weight (``aten.split``) into shards of ceil(N/world) rows rounded up to whole units (at most N), each padded with
zeros to that size: every rank holds at most N/world + unit rows of every part. Small replicated tensors
(codebooks, the double-quant offset) ride along in ``shared``; ``fmt`` is the format's own hashable description,
carried untouched.

The outer tensor is uint8 (rows, row_bytes), so FSDP2's ``MixedPrecisionPolicy`` never casts it;
``fsdp_pre_all_gather`` hands FSDP2 the parts as they are and ``fsdp_post_all_gather`` returns views of the
gathered buffers (part i is the first count_i(N) entries of its output, the shards being in rank order, only the
last ones padded): raw bytes in, raw bytes out, no copy, no dequantisation. A shard keeps its parts in one buffer,
16-byte aligned: at world size 1 torch 2.13's FSDP2 copies only the first all-gather input, so it gets that buffer.
A format (``fastlora.Linear4bit``; an FP8 base the same way) reads the parts of the gathered weight and feeds its
fused kernels with them. docs/distributed.md has the whole story.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

aten = torch.ops.aten
_ALIGN = 16  # bytes: where each part starts in a packed shard, so any dtype's view of it is aligned


@dataclass(frozen=True)
class RowLayout:
    """How the parts of a quantised weight of ``rows`` rows divide by row: ``rates[i] = (num, den)`` entries of part i
    per row (reduced), ``row_bytes`` the outer width (the payload's bytes per row)."""

    rows: int
    rates: tuple[tuple[int, int], ...]
    row_bytes: int

    def __post_init__(self):
        if self.rows < 0 or self.row_bytes <= 0:
            raise ValueError(f"rows must be >= 0 and row_bytes > 0; got rows={self.rows}, row_bytes={self.row_bytes}")
        for num, den in self.rates:
            if num <= 0 or den <= 0 or math.gcd(num, den) != 1:
                raise ValueError(f"rates must be reduced positive fractions (num, den); got {self.rates}")

    @property
    def unit(self) -> int:
        """The fewest rows that own whole entries of every part."""
        return math.lcm(*(den for _, den in self.rates))

    def count(self, i: int, rows: int) -> int:
        """Entries of part i that rows [0, rows) own (ceil: the last, partial block belongs to the last rows)."""
        num, den = self.rates[i]
        return -(-rows * num // den)

    def shard_rows(self, split_rows: int) -> int:
        """Rows per shard when FSDP2 asks for ``split_rows``: rounded up to whole units, at most all rows."""
        return min(-(-max(split_rows, 1) // self.unit) * self.unit, max(self.rows, 1))


def rate(num: int, den: int) -> tuple[int, int]:
    """num/den entries per row, reduced (``RowLayout.rates``)."""
    g = math.gcd(num, den)
    return num // g, den // g


class RowBlockWeight(torch.Tensor):
    """A quantised weight as its parts (see the module docstring), sharded by FSDP2 on whole row blocks.

    ``parts[i]`` holds ``row_layout.count(i, rows)`` entries on dim 0: the whole weight (rows = row_layout.rows) or
    one FSDP2 shard (rows = its padded row count; rows past row_layout.rows are zero padding). ``fmt``: the format's
    hashable description, ``shared``: its replicated tensors. Frozen: no gradient.
    """

    @staticmethod
    def __new__(cls, parts, shared, layout: RowLayout, fmt, rows: int, size=None, buffer=None):
        parts, shared = tuple(parts), tuple(shared)
        if len(parts) != len(layout.rates) or not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError(f"parts must be {len(layout.rates)} tensors, one per rate of the layout {layout.rates}; "
                             f"got {[type(p).__name__ for p in parts]}")
        for i, p in enumerate(parts):
            if p.shape[0] != layout.count(i, rows) or not p.is_contiguous():
                raise ValueError(f"part {i} must be contiguous with {layout.count(i, rows)} entries on dim 0 for "
                                 f"{rows} rows (rates {layout.rates}); got shape {tuple(p.shape)}")
        size = torch.Size((rows, layout.row_bytes) if size is None else size)
        if math.prod(size) != rows * layout.row_bytes:
            raise ValueError(f"size {tuple(size)} must hold rows * row_bytes = {rows} * {layout.row_bytes} elements")
        t = torch.Tensor._make_wrapper_subclass(cls, size, dtype=torch.uint8, device=parts[0].device,
                                                requires_grad=False)
        t._parts, t._shared, t._layout, t._fmt, t._rows = parts, shared, layout, fmt, rows
        t._buffer = buffer  # uint8, when the parts are views of one buffer (``_packed``)
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return self._parts

    @property
    def shared(self) -> tuple[torch.Tensor, ...]:
        return self._shared

    @property
    def row_layout(self) -> RowLayout:  # not ``layout``: torch.Tensor.layout is torch.strided
        return self._layout

    @property
    def fmt(self):
        return self._fmt

    @property
    def rows(self) -> int:
        return self._rows

    def nbytes_held(self) -> int:
        """Bytes of the parts this tensor holds (a shard's, padding included; ``shared`` not counted)."""
        return sum(p.numel() * p.element_size() for p in self._parts)

    def nbytes_whole(self) -> int:
        """Bytes of the whole weight's parts (``shared`` not counted)."""
        return sum(self._layout.count(i, self._layout.rows) * math.prod(p.shape[1:]) * p.element_size()
                   for i, p in enumerate(self._parts))

    def __repr__(self) -> str:
        return (f"RowBlockWeight(rows={self._rows} of {self._layout.rows}, parts="
                f"{[(tuple(p.shape), p.dtype) for p in self._parts]}, fmt={self._fmt})")

    def __tensor_flatten__(self):
        names = [f"p{i}" for i in range(len(self._parts))] + [f"s{i}" for i in range(len(self._shared))]
        return names, (len(self._parts), self._layout, self._fmt, self._rows, tuple(self.shape))

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        n, layout, fmt, rows, _ = ctx
        parts = [inner[f"p{i}"] for i in range(n)]
        shared = [inner[k] for k in sorted((k for k in inner if k.startswith("s")), key=lambda k: int(k[1:]))]
        return RowBlockWeight(parts, shared, layout, fmt, rows, outer_size)

    def _with(self, parts=None, shared=None, rows=None, size=None) -> RowBlockWeight:
        rows = self._rows if rows is None else rows
        if size is None:
            size = tuple(self.shape) if rows == self._rows else None
        return RowBlockWeight(self._parts if parts is None else parts, self._shared if shared is None else shared,
                              self._layout, self._fmt, rows, size, self._buffer if parts is None else None)

    def _views(self, buffer: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """The parts for ``rows`` rows as views of one uint8 ``buffer``, each starting 16-byte aligned."""
        views, at = [], 0
        for i, p in enumerate(self._parts):
            shape = (self._layout.count(i, rows), *p.shape[1:])
            n = math.prod(shape) * p.element_size()
            views.append(buffer[at:at + n].view(p.dtype).view(shape))
            at += -(-n // _ALIGN) * _ALIGN
        return views

    def _packed(self, rows: int, device=None, size=None) -> RowBlockWeight:
        """Zero parts for ``rows`` rows, views of one buffer (FSDP2 at world size 1 all-gathers only one input)."""
        total = sum(-(-math.prod((self._layout.count(i, rows), *p.shape[1:])) * p.element_size() // _ALIGN) * _ALIGN
                    for i, p in enumerate(self._parts))
        buffer = torch.zeros(total, dtype=torch.uint8, device=self.device if device is None else device)
        return RowBlockWeight(self._views(buffer, rows), self._shared, self._layout, self._fmt, rows, size, buffer)

    def _zeros(self, rows: int, size=None) -> RowBlockWeight:
        return self._packed(rows, size=size)

    def _split(self, split_rows: int) -> list[RowBlockWeight]:
        """Shards of ``layout.shard_rows(split_rows)`` rows each (whole units), every one padded to that size."""
        lay, step = self._layout, self._layout.shard_rows(split_rows)
        out = []
        for r0 in range(0, self._rows, step):
            r1 = min(r0 + step, self._rows)
            shard = self._packed(step)
            for i, (p, piece) in enumerate(zip(self._parts, shard.parts, strict=True)):
                a, b = lay.count(i, r0), lay.count(i, r1)
                piece[:b - a].copy_(p[a:b])
            out.append(shard)
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(f"RowBlockWeight (a frozen quantised weight) does not support {func}; read its "
                                      "parts (fastlora.sharding) or the layer's dequantized_weight() instead")
        return handler(*args, **kwargs)

    # FSDP2's all-gather extension: the parts go out as they are (raw bytes, never cast), the gathered weight is
    # views of the outputs.
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if mesh.size() > 1:
            return self._parts, None
        # torch 2.13's FSDP2 copies only the first all-gather input at world size 1: hand it the shard's one buffer
        buffer = self._buffer
        if buffer is None:
            buffer = self._packed(self._rows)._buffer
            for mine, p in zip(self._views(buffer, self._rows), self._parts, strict=True):
                mine.copy_(p)
        return (buffer,), self._rows

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        lay = self._layout
        if metadata is not None:  # world size 1: one buffer (fsdp_pre_all_gather)
            all_gather_outputs = self._views(all_gather_outputs[0], metadata)
        parts = tuple(o[:lay.count(i, lay.rows)] for i, o in enumerate(all_gather_outputs))
        if out is not None:
            out._parts = parts
            return None
        return RowBlockWeight(parts, self._shared, lay, self._fmt, lay.rows), ()


def _alias(t, *a, **k):
    return t._with()


def _split(t, split_size, dim=0):
    if dim != 0:
        raise NotImplementedError(f"RowBlockWeight splits on dim 0 only (FSDP2's Shard(0)); got dim {dim}")
    return t._split(split_size)


def _new_empty(t, size, **kwargs):
    # FSDP2 pads the shard list with ``chunks[0].new_empty(0)``: an all-padding shard of the same size
    return t._zeros(t._rows)


def _new_zeros(t, size, **kwargs):
    size = tuple(size)
    rows = size[0] if len(size) == 2 and size[1] == t._layout.row_bytes else None
    if rows is None:
        raise NotImplementedError(f"RowBlockWeight.new_zeros needs a size (rows, {t._layout.row_bytes}); got {size}")
    return t._zeros(rows)


def _slice(t, dim=0, start=None, end=None, step=1):
    start = 0 if start is None else start
    end = t._rows if end is None else min(end, t._rows)
    if dim != 0 or step != 1 or start != 0 or end != t._rows:
        raise NotImplementedError(f"RowBlockWeight slices only whole (dim 0, 0:{t._rows}); got dim {dim}, "
                                  f"{start}:{end}:{step}")
    return t._with()


def _copy_(dst, src, non_blocking=False):
    if not isinstance(src, RowBlockWeight):
        # torch.distributed.checkpoint's set_model_state_dict(broadcast_from_rank0=True) copies this rank's torch.chunk
        # piece of the format's unsharded weight here; rows cannot be placed from a piece, so it is kept for the
        # layer's loader, which gathers the pieces (``take_piece``).
        dst._parts[0]._fastlora_piece = src.detach().clone()
        return dst
    if src._layout != dst._layout or src._fmt != dst._fmt or [p.shape for p in src._parts] != \
            [p.shape for p in dst._parts]:
        raise NotImplementedError("RowBlockWeight.copy_ takes another RowBlockWeight of the same layout and rows; got "
                                  f"one of {src._rows} rows, {src._fmt}, for {dst._rows} rows, {dst._fmt}")
    for d, s in zip(dst._parts + dst._shared, src._parts + src._shared, strict=True):
        d.copy_(s)
    return dst


def _view(t, size):
    size = tuple(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size = tuple(t.numel() // max(known, 1) if s == -1 else s for s in size)
    if math.prod(size) != t.numel():
        raise RuntimeError(f"RowBlockWeight of shape {tuple(t.shape)} cannot be viewed as {size}")
    return t._with(size=size)


def _as_strided(t, size, stride, storage_offset=0):
    size = tuple(size)
    if storage_offset or math.prod(size) != t.numel() or tuple(stride) != _contiguous(size):
        raise NotImplementedError(f"RowBlockWeight.as_strided takes only a contiguous size of {t.numel()} elements; "
                                  f"got {size}, {tuple(stride)}, offset {storage_offset}")
    return t._with(size=size)


def _contiguous(size):
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _to_copy(t, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    if dtype is not None and dtype != torch.uint8:
        raise TypeError(f"a RowBlockWeight holds raw quantised bytes and is never cast; got dtype {dtype}")
    return _map(t, (lambda p: p.to(device, non_blocking=non_blocking)) if device is not None else torch.clone)


def _map(t, fn) -> RowBlockWeight:
    """``fn`` (a copy: clone, move, pin) applied to the parts and the shared tensors; a packed shard stays packed."""
    shared = [fn(s) for s in t._shared]
    if t._buffer is None:
        return t._with(parts=[fn(p) for p in t._parts], shared=shared)
    buffer = fn(t._buffer)
    return RowBlockWeight(t._views(buffer, t._rows), shared, t._layout, t._fmt, t._rows, tuple(t.shape), buffer)


def _empty_like(t, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    # ``module.to_empty(device=)`` after building on the meta device: zeros of the same rows; the format writes them
    if dtype is not None and dtype != torch.uint8:
        raise TypeError(f"a RowBlockWeight holds raw quantised bytes and is never cast; got dtype {dtype}")
    device = t.device if device is None else device
    new = t._packed(t._rows, device, tuple(t.shape))
    new._shared = tuple(torch.zeros(s.shape, dtype=s.dtype, device=device) for s in t._shared)
    return new


def _clone(t, memory_format=None):
    return _map(t, torch.clone)


def _is_pinned(t, device=None):
    return all(p.is_pinned() for p in t._parts)


def _pin_memory(t, device=None):
    return _map(t, torch.Tensor.pin_memory)


_OPS = {
    aten.detach.default: _alias, aten.alias.default: _alias, aten.split.Tensor: _split,
    aten.new_empty.default: _new_empty, aten.new_zeros.default: _new_zeros, aten.slice.Tensor: _slice,
    aten.copy_.default: _copy_, aten.view.default: _view, aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided, aten._to_copy.default: _to_copy, aten.clone.default: _clone,
    aten.empty_like.default: _empty_like,
    aten.is_pinned.default: _is_pinned, aten._pin_memory.default: _pin_memory,
}


def local_weight(weight: torch.Tensor) -> tuple[RowBlockWeight, object]:
    """(the RowBlockWeight, the FSDP2 DTensor around it or None) of a layer's ``weight`` parameter."""
    local = getattr(weight, "_local_tensor", None)
    if local is not None:
        return local, weight
    return weight, None


def _mesh_group(dtensor):
    mesh = dtensor.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"RowBlockWeight state dicts support a 1-D FSDP2 mesh; got {mesh.ndim}-D ({mesh})")
    return mesh.get_group(), mesh.get_local_rank(), mesh.size()


def gather_parts(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The whole weight's parts from a layer's ``weight`` (a RowBlockWeight, or FSDP2's sharded DTensor around one,
    all-gathered: a collective every rank of the mesh must call)."""
    local, dtensor = local_weight(weight)
    if dtensor is None:
        return local.parts
    group, _, world = _mesh_group(dtensor)
    lay, full = local.row_layout, []
    for i, p in enumerate(local.parts):
        out = p.new_empty((world * p.shape[0], *p.shape[1:]))
        dist.all_gather_into_tensor(out, p.contiguous(), group=group)
        full.append(out[:lay.count(i, lay.rows)])
    return tuple(full)


@torch.no_grad()
def local_rows(weight: torch.Tensor) -> tuple[int, int]:
    """Rows [r0, r1) of the whole weight whose data this rank holds (all rows when not sharded)."""
    local, dtensor = local_weight(weight)
    r0 = 0 if dtensor is None else _mesh_group(dtensor)[1] * local.rows
    return min(r0, local.row_layout.rows), min(r0 + local.rows, local.row_layout.rows)


@torch.no_grad()
def write_local(weight: torch.Tensor, parts, shared=None) -> None:
    """Set this rank's parts to ``parts`` (the entries of its rows ``local_rows``, unpadded; the padding is zeroed)
    and, given, the replicated ``shared``."""
    local, _ = local_weight(weight)
    r0, r1 = local_rows(weight)
    for i, (mine, new) in enumerate(zip(local.parts, parts, strict=True)):
        n = local.row_layout.count(i, r1) - local.row_layout.count(i, r0)
        if tuple(new.shape) != (n, *mine.shape[1:]) or new.dtype != mine.dtype:
            raise ValueError(f"part {i} of rows [{r0}, {r1}) must be {mine.dtype} of shape {(n, *mine.shape[1:])}; "
                             f"got {new.dtype} {tuple(new.shape)}")
        mine[:n].copy_(new)
        mine[n:].zero_()
    for mine, new in zip(local.shared, shared or (), strict=shared is not None):
        mine.copy_(new)


@torch.no_grad()
def load_parts(weight: torch.Tensor, parts) -> None:
    """Write the whole weight's ``parts`` (every rank holding all of them) into a layer's ``weight``: a RowBlockWeight
    copies them, a sharded one keeps its own rows. No collective."""
    local, _ = local_weight(weight)
    lay = local.row_layout
    for i, (mine, full) in enumerate(zip(local.parts, parts, strict=True)):
        if tuple(full.shape) != (lay.count(i, lay.rows), *mine.shape[1:]) or full.dtype != mine.dtype:
            raise ValueError(f"part {i} must be {mine.dtype} of shape {(lay.count(i, lay.rows), *mine.shape[1:])}; "
                             f"got {full.dtype} {tuple(full.shape)}")
    r0, r1 = local_rows(weight)
    write_local(weight, [full[lay.count(i, r0):lay.count(i, r1)] for i, full in enumerate(parts)])


def chunk_dtensor(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` as a DTensor sharded like FSDP2's ``like`` (Shard(0), torch.chunk's split): this rank's chunk, copied,
    so ``full`` can be freed. For state dicts in a format's own (unsharded) shapes."""
    from torch.distributed.tensor import DTensor, Shard

    _, rank, world = _mesh_group(like)
    chunks = list(torch.chunk(full, world, dim=0))
    mine = chunks[rank].clone() if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))
    return DTensor.from_local(mine, like.device_mesh, [Shard(0)], run_check=False, shape=full.shape,
                              stride=full.stride())


def take_piece(weight: torch.Tensor) -> torch.Tensor | None:
    """The torch.chunk piece of an unsharded weight that ``copy_`` kept on this rank's shard (see ``_copy_``), once."""
    local, _ = local_weight(weight)
    return local.parts[0].__dict__.pop("_fastlora_piece", None)


def gather_pieces(piece: torch.Tensor, like) -> torch.Tensor:
    """The whole tensor from every rank's torch.chunk ``piece`` of it along dim 0 (a collective on ``like``'s mesh)."""
    group, _, world = _mesh_group(like)
    sizes = [None] * world
    dist.all_gather_object(sizes, piece.shape[0], group=group)
    step = max(sizes)
    padded = piece.new_zeros((step, *piece.shape[1:]))
    padded[:piece.shape[0]].copy_(piece)
    out = piece.new_empty((world * step, *piece.shape[1:]))
    dist.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * step:r * step + n] for r, n in enumerate(sizes)])


def share_object(obj, like):
    """``obj`` from the first rank of ``like``'s mesh that has one (not None), on every rank (a collective)."""
    group, _, world = _mesh_group(like)
    has = [None] * world
    dist.all_gather_object(has, obj is not None, group=group)
    if all(has) or not any(has):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group_src=has.index(True), group=group)
    return box[0]


@torch.no_grad()
def load_rows(param: torch.Tensor, read_rows) -> None:
    """Fill a plain parameter that FSDP2 shards (a DTensor, Shard(0): torch.chunk's split) or an unsharded one with
    rows of its whole value, reading only this rank's: ``read_rows(r0, r1)`` returns rows r0:r1 (e.g. a safetensors
    slice). For the parameters around the quantised layers (embeddings, norms, an unquantised head)."""
    n = param.shape[0]
    if hasattr(param, "device_mesh"):
        _, rank, world = _mesh_group(param)
        step = -(-n // world)
        r0, r1 = min(rank * step, n), min(rank * step + step, n)
        local = param.to_local()
    else:
        r0, r1, local = 0, n, param
    if r1 > r0:
        rows = read_rows(r0, r1)
        if tuple(rows.shape) != (r1 - r0, *param.shape[1:]):
            raise ValueError(f"read_rows({r0}, {r1}) must return shape {(r1 - r0, *param.shape[1:])}; got "
                             f"{tuple(rows.shape)}")
        local[:r1 - r0].copy_(rows)


@contextlib.contextmanager
def gathered_trainable(model: torch.nn.Module):
    """Within the block, every trainable parameter that FSDP2 shards is its whole value (all-gathered, a collective;
    adapters are small), so code that reads plain tensors (``fastlora.save_adapter``) works on one rank; restored
    after. The quantised bases stay sharded."""
    swapped = []
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                        swapped.append((module, name, p))
                        module._parameters[name] = torch.nn.Parameter(p.full_tensor(), requires_grad=False)
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
