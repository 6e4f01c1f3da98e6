"""Triton kernels of fastlora (installed as ``fastlora.kernels``).

Only ``@triton.jit`` code, the jitted helpers the kernels share, and one config generator per kernel family
live here; launching, validation and autograd are in ``fastlora``.
"""
