"""One tolerance policy: relative Frobenius error against a float64 reference, per-dtype bounds."""

import torch

# fp32: ieee dots (tf32 off, torch's default). tf32: ~3e-4 measured elsewhere for K ~ 4k. 16-bit: rounding of
# the inputs and the output dominates.
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOL = 3e-3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str, tol: float = None):
    """Assert rel. Frobenius error <= tol (default REL_TOL[dtype]); reports max abs error and its coordinates."""
    tol = REL_TOL[dtype] if tol is None else tol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten poisoned output?) at " \
        f"{(~torch.isfinite(a)).nonzero()[:5].tolist()}"
    diff = (a - e).abs()
    denom = e.norm().item()
    rel = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    if rel > tol:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: relative error {rel:.3e} > {tol:.1e}; worst at {idx}: "
                             f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}")
