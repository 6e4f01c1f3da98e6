"""Validate-free launchers: allocate, choose a config, compute the grid, launch.

Callers (``fastlora._ops``) pass shapes that ``fastlora.functional`` already checked. On CUDA the kernels are
autotuned, keyed on a power-of-two bucket of M so a new batch size does not retune; under
``TRITON_INTERPRET=1`` a fixed small config runs so the CPU tests exercise several tiles and masks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from fastlora.kernels.dropout import _dropout_mask_kernel
from fastlora.kernels.gemm import _lora_gemm_kernel, gemm_configs
from fastlora.kernels.grad import _lora_grad_kernel, grad_configs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tests set this so every buffer a kernel should fully write starts as NaN.
POISON = os.environ.get("FASTLORA_POISON") == "1"

MAX_RANK = 256
INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
INTERPRET_SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "GROUP_M": 1}
INTERPRET_GRAD = {"BLOCK_M": 16, "BLOCK_P": 32}


def empty(shape, dtype, device) -> torch.Tensor:
    if POISON:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def block_r(r: int) -> int:
    """BLOCK_R: next power of two >= r, at least 16 (the smallest tl.dot operand dimension)."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 follows torch's matmul setting, as nn.Linear does; 16-bit inputs ignore it."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def target_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability the kernels are compiled for: the CUDA device's, else None (interpreter).

    The one place the launchers ask which GPU generation they target; ``bench/sm90.py`` replaces it to
    compile the Hopper branches for CPU tensors.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def _smem_prune(configs, named_args, **kwargs):
    elt = named_args["x_ptr"].element_size()
    limit = _smem_limit(named_args["x_ptr"].device.index or 0)
    kept = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        bn = c.kwargs.get("BLOCK_N", kwargs.get("BLOCK_N", 64))
        if c.num_stages * (bm * bk + bk * bn) * elt <= limit:
            kept.append(c)
    return kept or configs[-1:]


@functools.cache
def _smem_limit(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["max_shared_mem"]


_GEMM_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "HAS_LORA", "W_GROUPED", "B_GROUPED", "X_DROPOUT", "OUT_DROPOUT"]
_gemm_tuned = triton.autotune(gemm_configs(shrink=False), key=_GEMM_KEY,
                              prune_configs_by={"early_config_prune": _smem_prune})(_lora_gemm_kernel)
_shrink_tuned = triton.autotune(gemm_configs(shrink=True), key=_GEMM_KEY,
                                prune_configs_by={"early_config_prune": _smem_prune})(_lora_gemm_kernel)
_grad_tuned = triton.autotune(grad_configs(), key=["M_BUCKET", "P", "BLOCK_R", "GROUPED", "Z_DROPOUT"])(
    _lora_grad_kernel)


def gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    shrink: bool = False,
    bias: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scaling: float = 1.0,
    scale_vec: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    x_dropout: bool = False,
    out_dropout: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict | None = None,
) -> torch.Tensor:
    """out [M, N] = drop?(x) w^T + bias + scale * drop?(t b^T), see ``_lora_gemm_kernel``.

    x [M, K]; w [N, K] or, grouped by ``ids``, [G, N, K]; t [M, R]; b [N, R] or [G, N, R]; perm/ids [M]
    (sorted order -> token, adapter id of each sorted row). ``shrink`` marks N = R (a rank-sized output).
    """
    M, K = x.shape
    N = w.shape[-2]
    out = empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return out
    has_lora = t is not None
    R = t.shape[1] if has_lora else (N if shrink else 0)
    br = block_r(R) if (has_lora or shrink) else 16
    w_grouped = w.dim() == 3
    b_grouped = has_lora and b.dim() == 3
    dummy = out
    args = (
        x, w, bias if bias is not None else dummy, t if has_lora else dummy, b if has_lora else dummy, out,
        perm if perm is not None else dummy, ids if ids is not None else dummy,
        scale_vec if scale_vec is not None else dummy,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1),
        w.stride(0) if w_grouped else 0, w.stride(-2), w.stride(-1),
        t.stride(0) if has_lora else 0, t.stride(1) if has_lora else 0,
        b.stride(0) if b_grouped else 0, b.stride(-2) if has_lora else 0, b.stride(-1) if has_lora else 0,
        out.stride(0), out.stride(1),
        float(scaling), float(dropout_p), int(seed),
    )
    flags = dict(
        BLOCK_R=br, HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_PERM=perm is not None,
        W_GROUPED=w_grouped, B_GROUPED=b_grouped, HAS_SCALE_VEC=scale_vec is not None,
        X_DROPOUT=x_dropout, OUT_DROPOUT=out_dropout, INPUT_PRECISION=input_precision(x.dtype, x.device),
    )
    if shrink:
        flags["BLOCK_N"] = br

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if config is None and not INTERPRET:
        (_shrink_tuned if shrink else _gemm_tuned)[grid](*args, **flags)
        return out
    cfg = dict(config or (INTERPRET_SHRINK if shrink else INTERPRET_GEMM))
    launch = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    if shrink:
        launch.pop("BLOCK_N", None)
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    meta = {**launch, **flags}
    _lora_gemm_kernel[grid(meta)](*args, **launch, **flags, **opts)
    return out


def grad(
    z: torch.Tensor,
    v: torch.Tensor,
    *,
    num_adapters: int = 1,
    scaling: float = 1.0,
    scale_vec: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    seg: torch.Tensor | None = None,
    z_dropout: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict | None = None,
) -> torch.Tensor:
    """fp32 [G, P, R] = scale_g * sum_m Z[m]^T V[m] over each adapter's tokens (see ``_lora_grad_kernel``).

    z [M, P], v [M, R]; with ``seg`` (G+1 offsets into sorted order) and ``perm`` the sum is per adapter.
    """
    M, P = z.shape
    R = v.shape[1]
    G = num_adapters
    split = _num_splits(M, P, G, z.device)
    part = empty((split, G, P, R), torch.float32, z.device)
    if P == 0 or R == 0:
        return part.sum(0)
    dummy = part
    args = (
        z, v, part, perm if perm is not None else dummy, seg if seg is not None else dummy,
        scale_vec if scale_vec is not None else dummy,
        M, P, R, m_bucket(M),
        z.stride(0), z.stride(1), v.stride(0), v.stride(1),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        float(scaling), float(dropout_p), int(seed),
    )
    flags = dict(
        BLOCK_R=block_r(R), HAS_PERM=perm is not None, GROUPED=seg is not None,
        HAS_SCALE_VEC=scale_vec is not None, Z_DROPOUT=z_dropout,
        INPUT_PRECISION=input_precision(z.dtype, z.device),
    )

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]), G, split)

    if config is None and not INTERPRET:
        _grad_tuned[grid](*args, **flags)
    else:
        cfg = dict(config or INTERPRET_GRAD)
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        _lora_grad_kernel[grid(cfg)](*args, **cfg, **flags, **opts)
    return part.sum(0) if split > 1 else part[0]


def _num_splits(M: int, P: int, G: int, device: torch.device) -> int:
    """Token splits for the gradient reduction: enough programs to fill the GPU, each >= 256 tokens."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(3, triton.cdiv(M, 16 * G)))
    programs = triton.cdiv(P, 64) * G
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    by_rows = max(1, M // (256 * G))
    return max(1, min(triton.cdiv(target, programs), by_rows, 64))


def dropout_mask(M: int, K: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The [M, K] boolean keep-mask the fused kernels draw for (dropout_p, seed)."""
    out = empty((M, K), torch.int8, device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, float(dropout_p), int(seed), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
