"""Token grouping for multi-adapter batches, built once per batch on the device and shared by every layer.

Worked example, 6 tokens and n = 3 adapters, ids = [2, 0, -1, 2, 0, 0]:

    perm        = [2, 1, 4, 5, 0, 3]   stable sort of the tokens by id (sorted position -> token)
    sorted_ids  = [-1, 0, 0, 0, 2, 2]  ids[perm]
    seg_offsets = [1, 4, 4, 6]         adapter g owns sorted positions [seg[g], seg[g+1]); adapter 1 is empty

The kernels walk rows in sorted order, read x at token perm[i] and write y at the same token, so the output
comes back in the caller's order without a permutation copy. Building it costs a sort and a searchsorted, and
needs no host synchronisation (the range check that does is optional).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterBatch:
    num_adapters: int
    shape: torch.Size  # the token shape, x.shape[:-1]
    perm: torch.Tensor  # int32 [M]
    sorted_ids: torch.Tensor  # int32 [M]
    seg_offsets: torch.Tensor  # int32 [n + 1]

    @classmethod
    def build(cls, adapter_ids: torch.Tensor, num_adapters: int, *, check_ids: bool = True) -> AdapterBatch:
        if adapter_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter_ids must be int32 or int64; got {adapter_ids.dtype}")
        ids = adapter_ids.reshape(-1)
        # The range check reads a value on the host; torch.compile(fullgraph=True) cannot, so it is skipped there,
        # and meta tensors (shape inference) have no values to read.
        if check_ids and ids.numel() and not ids.is_meta and not torch.compiler.is_compiling():
            bad = (ids < -1) | (ids >= num_adapters)
            if bool(bad.any()):
                value = int(ids[bad.nonzero()[0, 0]])
                raise IndexError(f"adapter_ids must lie in [-1, {num_adapters}) for {num_adapters} adapters; "
                                 f"got {value}")
        sorted_ids, perm = torch.sort(ids, stable=True)
        bounds = torch.arange(num_adapters + 1, device=ids.device, dtype=sorted_ids.dtype)
        seg = torch.searchsorted(sorted_ids, bounds)
        return cls(num_adapters, adapter_ids.shape, perm.to(torch.int32), sorted_ids.to(torch.int32),
                   seg.to(torch.int32))
