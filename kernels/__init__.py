"""Triton kernels of fastlora (installed as ``fastlora.kernels``).

Only ``@triton.jit`` code, the jitted helpers the kernels share, and one config generator per kernel family
live here; launching, validation and autograd are in ``fastlora``.

The top-level name ``kernels`` belongs to Hugging Face's distribution, which transformers imports. When this
folder answers to it (the repo root is first on ``sys.path`` under ``python -m pytest`` or ``python -c``), it
hands the name on: to the next ``kernels`` on ``sys.path`` if there is one, else to an empty namespace module,
which is what Python gives for a stray folder (``from kernels import x`` raises ImportError, and transformers
reads it as not installed). docs/design.md, "Import names".
"""

if __name__ == "kernels":
    import os as _os
    import sys as _sys
    from importlib.machinery import ModuleSpec as _ModuleSpec
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _path = [p for p in _sys.path if _os.path.realpath(p or ".") != _root]
    _spec = _PathFinder.find_spec("kernels", _path)
    if _spec is None:
        _sys.modules["kernels"] = _module_from_spec(_ModuleSpec("kernels", None, is_package=True))
    else:
        _other = _module_from_spec(_spec)
        _sys.modules["kernels"] = _other
        try:
            _spec.loader.exec_module(_other)
        except BaseException:
            del _sys.modules["kernels"]
            raise
