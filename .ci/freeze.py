"""Print .ci/constraints.txt from the packages installed in this environment.

    python3 -m venv /tmp/v && . /tmp/v/bin/activate && pip install torch==2.13.0 triton==3.7.1 \
        && pip install -e ".[test,bench]" && python -m pytest -q && python .ci/freeze.py > .ci/constraints.txt

Pins every installed distribution except fastlora, pip and the packages torch and triton bring or pin (torch's
requirements, recursively, and the CUDA wheels' nvidia-*/cuda-* parts): pinning one of those could make pip
change a GPU user's torch. numpy is left to pyproject's bound. A package that needs a newer Python than 3.10 is
pinned only for the Pythons it supports (its Requires-Python as an environment marker).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

LEFT_OUT = {"fastlora", "pip", "setuptools", "wheel", "numpy", "torch", "triton"}
LEFT_OUT_PREFIXES = ("nvidia-", "cuda-")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str) -> set[str]:
    """root and every distribution its requirements (without extras) reach."""
    seen, todo = set(), [root]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def python_marker(requires_python: str | None) -> str:
    """'; python_version >= "3.11"' when the package drops Pythons this project supports (>= 3.10)."""
    if not requires_python:
        return ""
    spec = SpecifierSet(requires_python)
    for minor in range(10, 20):
        if f"3.{minor}" in spec:
            return "" if minor == 10 else f'; python_version >= "3.{minor}"'
    return ""


def main() -> int:
    skip = {canonical(n) for n in LEFT_OUT} | closure("torch") | closure("triton")
    lines = {}
    for dist in md.distributions():
        name = canonical(dist.metadata["Name"])
        if name in skip or name.startswith(LEFT_OUT_PREFIXES):
            continue
        lines[name] = f"{name}=={dist.version}{python_marker(dist.metadata.get('Requires-Python'))}"
    print("# The versions CI last passed with (.ci/run and the README's commands install with -c this file).")
    print("# Regenerate: python .ci/freeze.py (its docstring). torch, triton, numpy and torch's own requirements are")
    print("# not pinned here: pinning them could change a GPU user's torch.")
    print(f"# Python {sys.version_info.major}.{sys.version_info.minor}, torch {md.version('torch')}, "
          f"triton {md.version('triton')}.")
    print("\n".join(lines[k] for k in sorted(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
