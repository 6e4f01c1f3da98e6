"""The per-GPU config models of the GEMM core and the gradient kernel: which autotune configs a variant may take
(register and shared-memory rules, each one a spill the static sm_90 / sm_80 report measured: bench/sm90.py,
docs/perf-notes.md), the autotune keys, and the device queries they rest on.

``fastlora._launch`` chooses among what is left and launches; nothing here allocates or launches.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from fastlora.kernels.gemm import DX, DX_DROP, FWD_DROP, W8A8_TILES, _lora_gemm_kernel, gemm_configs
from fastlora.kernels.grad import _lora_grad_kernel, grad_configs
from fastlora.kernels.weight4 import FP8
from fastlora.kernels.weight8 import X_FP8

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# DoRA modes that keep a second accumulator (the dropout forms, kernels/gemm.py), and those that scale dx's dy tiles
# in the K loop (grouped: a [BLOCK_M, BLOCK_K] fp32 gather of g per step, pipelined like an operand).
DUAL_DORA = (FWD_DROP.value, DX_DROP.value)
DX_DORA = (DX.value, DX_DROP.value)

def target_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability the kernels are compiled for: the CUDA device's, else None (interpreter).

    The one place the launchers ask which GPU generation they target; ``bench/sm90.py`` replaces it to
    compile the Hopper branches for CPU tensors.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def _smem_limit(device: torch.device) -> int:
    return _device_props(device.index or 0)["max_shared_mem"]


# Persistent programs under the interpreter: few, so each walks several tiles.
INTERPRET_PROGRAMS = 3


def num_sms(device: torch.device) -> int:
    if INTERPRET:
        return INTERPRET_PROGRAMS
    return _device_props(device.index or 0)["multiprocessor_count"]


@functools.cache
def _device_props(device_index: int) -> dict:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)


# The main GEMM walks R in chunks of this many (T chunk registers; 64 spilled at BLOCK_M 128 on sm_90).
LORA_CHUNK = 32
# ... and on the FMA path (fp32 without tf32), where both chunks sit in registers: at 32 its 8-warp main tiles
# kept 8-16 bytes of stack at R = 64 (255 registers).
FMA_LORA_CHUNK = 16
# Register budget in fp32 elements per thread. Every rule below removes configs that spilled in the static sm_90 /
# sm_80 report (bench/sm90.py; numbers in docs/perf-notes.md).
MAX_ACC_PER_THREAD = 128
# Before Hopper, mma.sync keeps both operands' fragments in registers beside the accumulator (wgmma reads B from shared
# memory): on sm_80 every LoRA main GEMM at 128 accumulator elements (128x256 and 256x128 with 8 warps, 128x128 with
# 4) spilled 8-80 bytes.
MMA_SYNC_MAX_ACC = 64
# fp32 without tf32 runs tl.dot on FMA units with both operand tiles in registers: accumulator + operand elements
# per thread past this spilled 16-2248 bytes; in the GEMM core also at 80 (128x128x16 / 8 warps: 8-48 bytes at 255
# registers, no longer a candidate), while every gradient-kernel tile up to 80 compiled clean.
FMA_BUDGET = 72
FMA_GRAD_BUDGET = 80
# ... and with a 4-bit W dequantised to fp32 (bitsandbytes compute dtype float32, the transformers default):
# 128x64x32 / 8 warps (56) spilled 336-392 bytes at 255 registers on sm_90 and sm_80, 64x64x32 / 8 warps (32)
# compiled clean.
FMA_W4_BUDGET = 48
# 4-bit W (QLoRA): dequantised W elements per thread, and accumulator + W elements per thread; past these, tiles
# spilled 8-72 bytes on sm_90 and 40-3024 bytes on sm_80 (mma.sync keeps operand fragments in registers too).
MAX_W4_PER_THREAD = 64
W4_BUDGET = 160
W4_BUDGET_MMA_SYNC = 80
# ... and accumulator + W + X elements per thread when fp32 X tiles are converted in registers (8-24 bytes past it).
W4_BUDGET_WIDE_X = 88


# ptxas options for the FMA path's GEMM-core kernels: one block per SM is enough (--minnctapersm=1). Left to its own
# occupancy target (two or three blocks per SM: 80-168 registers) ptxas parked 8-48 bytes of loop-invariant values
# on the stack in 19 (sm_90) and 23 (sm_80) FMA variants; with this, the one-trip tile loop (kernels/gemm.py) and
# FMA_LORA_CHUNK, in none (docs/perf-notes.md). Appended to the user's PTXAS_OPTIONS, if any.
FMA_PTXAS_OPTIONS = "--minnctapersm=1"


def _is_fma(elt: int, input_precision: str) -> bool:
    """Whether tl.dot runs on FMA units: 4-byte operands without tf32."""
    return elt == 4 and input_precision == "ieee"


def _mma_sync(capability: tuple[int, int] | None) -> bool:
    """Whether Triton's dots run as mma.sync there: before Hopper and on sm_120 (wgmma is 9.x, tcgen05 10.x-11.x)."""
    return capability is not None and (capability[0] < 9 or capability[0] >= 12)


def _tile_mma_sync(capability: tuple[int, int] | None, block_m: int) -> bool:
    """Whether a tile's dots run as mma.sync: on ``_mma_sync`` targets, and on Hopper under 64 rows (wgmma takes 64
    rows per warp group), where the operand fragments sit in registers as before Hopper."""
    return _mma_sync(capability) or (capability is not None and capability[0] == 9 and block_m < 64)


def fp8_fits(cfg: dict, flags: dict, acc: int, w: int, elt: int) -> bool:
    """The FP8 W's own limits beside the 4-bit ones (bench/sm90.py; acc, w: accumulator and W elements per thread).
    Scales per element (a reduction block that BLOCK_K does not divide, e.g. 64 x 32 blocks) in K steps of 128: dx
    32x64x128 / 4 warps with dropout spilled 40 B at 255 registers on sm_90, 16x64x128 24 B, and the forward's
    32x64x128 staged its scale tiles in 196 KB of shared memory on sm_80 (the 64-wide K steps clean). Measured on
    sm_90, in dx at 255 registers: DoRA's dropout form 32x64x128 / 4 warps 8 B (16x64x128 clean); tf32 with dropout
    64x128x64 / 4 warps 16 B (64x64x64, 16x64x128 clean)."""
    bk = cfg["BLOCK_K"]
    reduction_block = flags["QBLOCK"] if flags["W_TRANS"] else flags["QBLOCK2"]
    if reduction_block % bk and bk >= 128:
        return False
    if flags.get("DORA") == DX_DROP.value and cfg["BLOCK_M"] >= 32 and bk >= 128:
        return False
    return not (flags["W_TRANS"] and elt == 4 and flags["OUT_DROPOUT"] and acc + w > 96)


def gemm_fits_registers(cfg: dict, num_warps: int, *, block_n: int, flags: dict, elt: int,
                        capability: tuple[int, int] | None, x_elt: int | None = None) -> bool:
    """Whether a GEMM-core config stays within the register file of ``capability`` (None: no limit from the MMA
    generation): the accumulator, plus what each variant keeps live beside it (dropout masks, the per-adapter loop,
    the Philox draw of the dropout shrink, a dequantised 4-bit W tile). ``elt``: the bytes of the dot's operands;
    ``x_elt``: of X as loaded, when wider (fp32 activations over a 4-bit base)."""
    if flags.get("X_FORMAT") == X_FP8.value:
        return True  # W8A8: only its own tiles (W8A8_TILES, chosen by ``_prune_gemm``), clean on sm_90
    threads = 32 * num_warps
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    dual = flags.get("DORA") in DUAL_DORA  # DoRA with dropout: two accumulators, counted as one of twice the size
    acc = bm * block_n // threads * (2 if dual else 1)
    grouped_dora = flags.get("DORA") and flags["B_GROUPED"]
    g_tile = bm * bk // threads if grouped_dora and flags["DORA"] in DX_DORA else 0  # grouped dx: g per (row, k)
    if flags["X_DROPOUT"] and bk < 32:
        return False  # the mask is packed 32 columns to a word
    if flags.get("W_FORMAT") and flags.get("DORA") in (FWD_DROP.value, DX.value, DX_DROP.value) and elt == 4:
        # QDoRA in fp32 (measured): the dropout forward keeps x and keep * x beside the dequantised W tile and two
        # accumulators: tf32 16x64x128 / 4 warps kept 16 B of stack at 255 registers (sm_90), FMA 64x64x32 / 8 warps
        # 8 B (in the K loop) and 32x64x32 / 4 warps 8 B. dx scales dy in registers: tf32 16x64x128 / 4 warps 8 B on
        # sm_90, 32 B with dropout on sm_80. 32x64x32 (which the 4-bit rules below would not keep) compiled clean.
        small = bm == 32 and bk == 32
        if _is_fma(elt, flags["INPUT_PRECISION"]):
            if flags["DORA"] == FWD_DROP.value:
                return small and num_warps == 8
        elif small or flags["DORA"] == FWD_DROP.value or _mma_sync(capability):
            return small
        elif flags["DORA"] == DX.value and bk >= 128:
            return False  # sm_90 tf32 dx: 64x64x64 / 4 warps kept (clean), 16x64x128 not
    if flags.get("W_FORMAT") and flags.get("DORA") == FWD_DROP.value and bm >= 32 and bk >= 128:
        return False  # 16-bit QDoRA dropout forward 32x64x128 / 4 warps: 8 B at 255 registers (16x64x128, 64x64x64
        # / 4 warps clean)
    if flags.get("W_FORMAT"):  # the dequantised W tile (4-bit or FP8) is in registers beside the accumulator
        w = bk * block_n // threads
        if flags["W_FORMAT"] == FP8.value and not fp8_fits(cfg, flags, acc, w, elt):
            return False
        budget = W4_BUDGET_MMA_SYNC if _mma_sync(capability) else W4_BUDGET
        if w > MAX_W4_PER_THREAD or acc + w > budget or (bm < 64 and bk < 64):
            return False
        if (x_elt or elt) > elt and acc + w + bm * bk // threads > W4_BUDGET_WIDE_X:
            return False  # fp32 X tiles converted to the compute dtype in registers
        if flags["W_TRANS"] and elt == 4 and bm * bk // threads > (16 if _mma_sync(capability) else 32):
            return False  # tf32 dx over a 4-bit W: 128x64x64 / 4 warps kept 8 B of stack at 255 registers on sm_90,
            # 64x64x64 / 4 warps 16-32 B on sm_80 (64x128x64 and 64x64x64 on sm_90, 16x64x128 on both: clean)
    if _is_fma(elt, flags["INPUT_PRECISION"]):
        operands = (bm * bk + bk * block_n) // threads
        if g_tile and num_warps == 8 and bm >= (64 if dual else 128):
            return False  # grouped DoRA dx on 8 warps: 128x64x32 16 B, with dropout 64x64x32 8-16 B, at 255 registers
            # (sm_90; 64x64x32 without dropout and 32x64x32 on 4 and 8 warps clean)
        if flags["HAS_LORA"] and flags["W_KMAJOR"] and not flags.get("W_FORMAT") and num_warps == 8 and bm >= 128:
            return False  # the forward's main GEMM (W read K-major, low-rank term), 128x64x32 / 8 warps: 255 registers
            # on triton 3.6.0, 8 B of stack on 3.7.1 at every R; its dx twin and the norm GEMM (no low-rank term) clean
        budget = FMA_W4_BUDGET if flags.get("W_FORMAT") else FMA_BUDGET
        return acc + operands <= budget and acc + 2 * bm * bk // threads <= MAX_ACC_PER_THREAD
    mma_sync = _mma_sync(capability)
    if acc > (MMA_SYNC_MAX_ACC if mma_sync else MAX_ACC_PER_THREAD):
        return False
    shrink = "BLOCK_N" in flags  # the launcher fixes the shrink's BLOCK_N (N = R)
    if shrink and mma_sync and elt == 2 and bk >= 256:
        return False  # 16x16x256 at r = 8, M = 16 (bf16, fp16): 8 B of stack at 255 registers on sm_80
    if shrink and _tile_mma_sync(capability, bm) and elt == 4 and num_warps == 4 and acc >= MMA_SYNC_MAX_ACC:
        return False  # tf32 32x256x32 (r = 256): 8 B at 255 registers on sm_80, 72 B on sm_90 with triton 3.7.1 (under
        # 64 rows: mma.sync there too); 64x256x32 / 8 warps compiles clean
    if shrink and mma_sync and elt == 4 and flags["X_DROPOUT"]:  # tf32 dropout shrink before Hopper: 4-warp
        # 64x16x32 kept 8-24 B at 168 registers, 64x256x32 / 8 warps 8 B at 255 (M = 1); the 8-warp tiles within
        # these bounds compiled clean (32-128 rows, r = 8 ... 256, 80-243 registers)
        return (num_warps == 8 and bm >= 32 and acc < MMA_SYNC_MAX_ACC
                and acc + 4 * bm * bk // threads <= MAX_ACC_PER_THREAD)
    if not shrink and bk <= 32 and not (grouped_dora and (dual or g_tile) and elt == 4):
        return False  # the FMA path's main tiles (16-bit 32x64x32 grouped: 8 B of stack; tensor cores take 64+); tf32
        # grouped DoRA dx and dropout forms keep them: their larger candidates spilled or exceed shared memory (below)
    if flags["B_GROUPED"] and bm < 64 and elt == 4 and not dual:
        return False  # tf32 grouped main GEMM under 64 rows (mma.sync): 32x64x32, a tf32 tile until BLOCK_K <= 32
        # became FMA-only, kept 8-16 B of stack at 96 registers. Grouped DoRA's dropout forms keep them: no larger tf32
        # tile fits two accumulators
    if shrink and num_warps == 8 and bk == 32 and (bm * bk < 8 * threads or (mma_sync and acc < MMA_SYNC_MAX_ACC)):
        return False  # small 8-warp shrinks: 8 B of stack at 48-128 regs (sm_90 32x16x32; sm_80 128x16x32, 64x64x32)
    if flags["W_GROUPED"] and shrink and bk >= 256:
        return False  # the segmented shrink (grouped or ragged, tiles cut at adapter offsets): ragged 16x64x256 / 4
        # warps 8 B of stack at 255 registers (16x16x256 unaligned: 32 B); grouped 16x16x256 (r = 16, the forward's
        # K-major A stack) 8 B at 80 registers with triton 3.7.1 (clean on 3.6.0; the dense shrink clean on both)
    if flags["W_GROUPED"] and flags["HAS_LORA"] and bm < 64 and bm * bk + bk * block_n > 16 * 128 + 128 * 64:
        return False  # experts' main GEMMs (segment tiles, the low-rank term, mma.sync-style operands under 64 rows):
        # beyond 16x64x128 they kept 8-16 B of stack outside the K loop at ptxas's 128 / 168-register targets: with
        # triton 3.7.1 16x64x256, 32x64x128 and 32x128x128 (forward), also 16x128x128 on sm_80; with 3.6.0 the dx
        # 32x128x128 / 4 warps (sm_90). 16x64x128 clean on both tritons and targets
    if flags.get("RAGGED") and not shrink and ((bm >= 128 and num_warps == 4) or (flags["RAGGED"] == 1 and bk >= 128)):
        return False  # ragged_dot's loops beside the K loop: 128x64x64 / 4 warps 16 B (88 B unaligned); unaligned
        # (scalar B loads) 32x64x128 / 4 warps 16-24 B at 128 registers, 16x64x128 8 B
    full = acc * elt // 2 >= MAX_ACC_PER_THREAD  # tf32 operand fragments take twice the registers of 16-bit ones
    if full and flags.get("DORA"):
        return False  # DoRA's epilogue (g, Z) or dy tiles scaled in registers: 8-72 B at 128 accumulator elements
    if dual and (acc > MMA_SYNC_MAX_ACC or (bk >= 128 and acc >= MMA_SYNC_MAX_ACC)):
        return False  # two accumulators of 64 (128x128 / 8 warps, 128x64 and 64x128 / 4 warps: 8-400 B on sm_90),
        # or of 32 beside the 128-column keep-mask (32x128x128 / 4 warps: 8 B); 64x64x64 / 4 warps is clean
    if grouped_dora and g_tile >= 64:
        return False  # grouped DoRA dx: g gathered per (row, k) beside the accumulator; 128x64x64 / 4 warps: 24-56 B
    if grouped_dora and bm < 64 and acc + g_tile + bk * block_n // threads > (96 if dual else 160):
        return False  # grouped DoRA dx under 64 rows (mma.sync-style operands in registers): 16x64x256 / 4 warps
        # 64-88 B, 32x128x128 / 4 160-216 B; with dropout 16x128x128 8 B, 32x64x128 (fp16) 8 B (16x64x128 and, without
        # dropout, 16x128x128 and 32x64x128 clean)
    if grouped_dora and dual and bm < 64 and (bm * bk // threads >= 32 or (elt == 4 and bk >= 128)):
        return False  # grouped DoRA forward with dropout: 32x64x128 / 4 warps 32 B at 168 registers (bf16, padded);
        # tf32 16x64x128 / 4 warps, forward and dx, 8-24 B at 255
    if grouped_dora and dual and not g_tile and elt == 4 and bm < 64 and num_warps == 8:
        return False  # tf32 grouped DoRA forward with dropout, 32x64x32 / 8 warps: 8 B at 80 registers (sm_90)
    if grouped_dora and mma_sync and acc + g_tile > MMA_SYNC_MAX_ACC:
        return False  # sm_80, grouped DoRA: dx 64x128x64 / 4 warps 144-160 B, with dropout 64x64x64 / 4 40-80 B (g's
        # gather beside mma.sync's operands)
    if flags.get("RAGGED") and flags["B_GROUPED"] and mma_sync and acc >= MMA_SYNC_MAX_ACC and num_warps == 4:
        return False  # ragged_dot beside mma.sync's operands, 64x128x64 / 4 warps: grouped DoRA's forward 8-24 B, the
        # ragged LoRA forward 8 B with triton 3.7.1 (sm_80; its dx and no-bias twins at 255 registers); 64x64x64 and
        # 16x64x128 clean
    if dual and mma_sync and bk * block_n // threads > 64:
        return False  # mma.sync keeps W's fragments in registers for both dots: 16x128x128, 16x64x256 / 4 warps
        # spilled 8-56 B on sm_80 (32x64x128 and 16x64x128 clean)
    if full and (flags["B_GROUPED"] or (flags["OUT_DROPOUT"] and (
            flags["BLOCK_R"] >= 32 or (block_n > 128 and not cfg.get("USE_TMA"))))):
        return False  # 8-56 bytes spilled (16 B for tf32 dx at 128x64x64 / 4 warps, 64 accumulator elements); dx with
        # dropout at BLOCK_R 16 on pointers, 128x256x64 / 8 warps: 8 B at 255 registers with triton 3.7.1 (its TMA twin
        # and 256x128x64 clean on 3.6.0 and 3.7.1)
    if flags["X_DROPOUT"] and mma_sync and bk >= 64 and acc >= 32:
        return False  # 16-bit dropout shrink on mma.sync: 64x64x64 / 4 and 128x64x64 / 8 warps (r = 64) at 255
        # registers, the latter 8 B of stack with triton 3.7.1 (sm_80); BLOCK_K 32 (64x64x32 / 4: 206) and the 16-column
        # tiles (128x16x64 / 8: 244-255) clean
    if flags["X_DROPOUT"]:  # Philox state per x element: 384-930 bytes spilled past this (tf32: 16-48 B at 64x64x64)
        return bm >= 64 and acc + 2 * bm * bk * (elt // 2) // threads <= MAX_ACC_PER_THREAD
    return True


def gemm_smem(cfg: dict, num_stages: int, *, elt: int, out_elt: int, block_n: int, block_r: int, lora: bool,
              g_tile: bool = False, w_elt: int | None = None) -> int:
    """Shared memory of one GEMM-core config: the pipelined main loop or the (earlier, reused) low-rank chunk
    buffers, plus the TMA store's staging tile and barriers; ``g_tile``: grouped DoRA's dx, whose fp32 g gather
    [BLOCK_M, BLOCK_K] is pipelined with the operands; ``w_elt``: W's bytes per element when not ``elt`` (the W8A8
    forward's e4m3 tiles: 1). Checked against every compiled variant by bench/sm90.py (an upper bound, within a few KB
    for the large tiles; the g stages within 8-17 KB)."""
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    smem = num_stages * (bm * bk * elt + bk * block_n * (w_elt or elt) + (bm * bk * 4 if g_tile else 0))
    if lora:
        smem = max(smem, 2 * (bm * block_r + block_r * block_n) * elt)
    if cfg.get("USE_TMA"):
        smem += bm * block_n * out_elt
    return smem + 1024


def _prune_gemm(configs, named_args, **kwargs):
    x, out = named_args["x_ptr"], named_args["out_ptr"]
    limit = _smem_limit(x.device)
    capability = target_capability(x.device)
    w8a8 = kwargs.get("X_FORMAT") == X_FP8.value
    kept = []
    for c in configs:
        bn = c.kwargs.get("BLOCK_N", kwargs.get("BLOCK_N"))
        if c.kwargs["USE_TMA"] and not kwargs["TMA_OK"]:
            continue
        tile = (c.kwargs["BLOCK_M"], bn, c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
        if "BLOCK_N" not in kwargs and (tile in W8A8_TILES) != w8a8:
            continue  # main GEMMs: the W8A8 forward takes its own tiles, and only it
        if x.shape[0] == 1 and c.kwargs["BLOCK_M"] * bn >= MAX_ACC_PER_THREAD * 32 * c.num_warps:
            continue  # a full accumulator for one row; 8 B of stack at 128x256 in the M = 1 specialisation
        elt = kwargs["W_COMPUTE"].primitive_bitwidth // 8  # the dot's operands (X's dtype, or the 4-bit compute)
        if not gemm_fits_registers(c.kwargs, c.num_warps, block_n=bn, flags=kwargs, elt=elt, capability=capability,
                                   x_elt=x.element_size()):
            continue
        smem = gemm_smem(c.kwargs, c.num_stages, elt=x.element_size(), out_elt=out.element_size(), block_n=bn,
                         block_r=kwargs["BLOCK_R"], lora=kwargs["HAS_LORA"],
                         g_tile=bool(kwargs.get("DORA") in DX_DORA and kwargs["B_GROUPED"]), w_elt=1 if w8a8 else None)
        if smem <= limit:
            kept.append(c)
    if not kept:
        raise ValueError(f"no GEMM config fits shared memory ({limit} bytes) for {x.dtype}, "
                         f"BLOCK_N {kwargs.get('BLOCK_N')}")
    return kept


def grad_smem(cfg: dict, num_stages: int, *, elt: int, block_r: int, col_dot: bool = False) -> int:
    """Shared memory of one gradient-kernel config: pipelined Z tiles (and COL_DOT's Y tiles) and fp32 V tiles."""
    return num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_P"] * elt * (2 if col_dot else 1) + block_r * 4)


def _prune_grad(configs, named_args, **kwargs):
    z = named_args["z_ptr"]
    limit = _smem_limit(z.device)
    br = kwargs["BLOCK_R"]
    fma = _is_fma(z.element_size(), kwargs["INPUT_PRECISION"])
    mma_sync = _mma_sync(target_capability(z.device))

    def fits(c):
        threads = 32 * c.num_warps
        bm, bp = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"]
        acc = bp * br // threads
        if fma:  # a ragged rank chunk's offsets: 32x128 (BLOCK_R 32) / 4 warps with dropout (72) kept 8 B of stack,
            # 64x64 / 8 warps (32) 8 B at 48 registers
            if kwargs["RAGGED"] and c.num_warps == 8:
                return False
            if kwargs["COL_DOT"] and mma_sync and (bm, bp, c.num_warps) == (32, 64, 4):
                return False  # grouped DoRA's column dot at BLOCK_R 16 on sm_80: 8 B at 64 registers (ptxas's own
                # occupancy target; 32x32, 32x128, 64x64 on 4 and 8 warps clean)
            budget = FMA_GRAD_BUDGET - 16 if kwargs["RAGGED"] and kwargs["Z_DROPOUT"] else FMA_GRAD_BUDGET
            return acc + bm * (bp + br) // threads <= budget
        if mma_sync:  # both operands' fragments in registers (sm_80, measured by bench/sm90.py):
            if acc > MMA_SYNC_MAX_ACC or ((kwargs["Z_DROPOUT"] or kwargs["COL_DOT"]) and acc >= MMA_SYNC_MAX_ACC):
                return False  # tf32 32x64 at r = 256: 8 B at 255 registers; 32x32 dropout at r = 256: 8 B at 128;
                # DoRA's column dot (a second [BLOCK_M, BLOCK_P] tile): fp16 64x128 / 4 warps at r = 64, 8 B at 255
            if c.num_warps == 8 and bm * bp // threads >= 64:
                return False  # 128x128 / 8 warps: 16 B at 128 registers (M = 16, r = 8)
        return acc <= MAX_ACC_PER_THREAD

    kept = [c for c in configs
            if fits(c) and grad_smem(c.kwargs, c.num_stages, elt=z.element_size(), block_r=br,
                                     col_dot=kwargs["COL_DOT"]) <= limit]
    if not kept:
        raise ValueError(f"no gradient config fits shared memory ({limit} bytes) for {z.dtype}, BLOCK_R {br}")
    return kept


def _set_tma_blocks(nargs):
    """Autotune pre-hook: give the host-side TMA descriptors this config's block shapes."""
    if not nargs["USE_TMA"]:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_KMAJOR"] else [bk, bn]
    nargs["out_desc"].block_shape = [bm, bn]


def _with_tma_hook(configs):
    for c in configs:
        if c.kwargs.get("USE_TMA"):
            c.pre_hook = _set_tma_blocks
    return configs


_GEMM_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "HAS_LORA", "W_GROUPED", "B_GROUPED", "RAGGED", "X_DROPOUT",
             "OUT_DROPOUT", "TMA_OK", "W_KMAJOR", "W_FORMAT", "W_TRANS", "W_COMPUTE", "X_FORMAT", "INPUT_PRECISION",
             "DORA", "STORE_Z"]
_gemm_tuned = triton.autotune(_with_tma_hook(gemm_configs(shrink=False) + gemm_configs(shrink=False, w8a8=True)),
                              key=_GEMM_KEY,
                              prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_kernel)
_shrink_tuned = triton.autotune(gemm_configs(shrink=True), key=_GEMM_KEY,
                                prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_kernel)
_grad_tuned = triton.autotune(grad_configs(),
                              key=["M_BUCKET", "P", "BLOCK_R", "GROUPED", "RAGGED", "Z_DROPOUT", "INPUT_PRECISION",
                                   "COL_DOT"],
                              prune_configs_by={"early_config_prune": _prune_grad})(_lora_grad_kernel)
