"""Test set-up: without CUDA the real kernels run under the Triton interpreter, with NaN-poisoned outputs."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLORA_POISON", "1")
# torch 2.13's inductor cache does not key its CPU kernels on ATEN_CPU_CAPABILITY: on an AVX512 machine, a run
# with ATEN_CPU_CAPABILITY=avx2 reused kernels the default run had built (and the reverse), giving wrong outputs,
# NaN and "malloc(): unaligned tcache chunk detected" in plain torch, no fastlora involved. One cache per capability.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA (compiled Triton kernels); CPU runs the interpreter tier only")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def dora_caching():
    """``fastlora.DoraCaching`` switched on for the test (it is off by default)."""
    import fastlora

    with fastlora.DoraCaching():
        yield
