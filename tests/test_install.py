"""Installing and importing fastlora as users do.

- From the repo root (``python -m pytest``, ``python -c``) the folder ``kernels/`` never shadows Hugging Face's
  ``kernels``, which transformers imports; without that package, ``import kernels`` gives an empty namespace.
- A wheel built from this tree, unpacked outside it, imports and runs the kernels.
- pip installs that wheel beside the CUDA wheels of torch 2.11, 2.13 and 2.14 without changing torch: the resolver
  runs offline over stub wheels carrying those wheels' real requirements (``tests/data/torch-*.metadata``, the
  Requires-Dist lines of the cp311 manylinux_2_28 x86_64 wheels on PyPI).
- The README's commands and ``.ci/run`` install with ``.ci/constraints.txt``, which pins nothing torch needs.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TORCH_WHEELS = sorted(DATA.glob("torch-*.metadata"))


def python(code: str, cwd: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    proc_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc_env.update(env)
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, env=proc_env,
                          capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_repo_root_gives_hugging_faces_kernels():
    pytest.importorskip("transformers", reason="needs fastlora[peft]")
    try:
        version = md.version("kernels")
    except md.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (the test extra installs it)")
    out = ok(python("""
        import transformers.models.llama
        import fastlora
        import fastlora.kernels.gemm
        import kernels
        print(kernels.__file__)
        print(kernels.__version__)
        print(fastlora.kernels.gemm.__file__)
        """, ROOT))
    hf_file, hf_version, ours = out.split()
    assert Path(hf_file).resolve().parent != ROOT / "kernels", hf_file
    assert hf_version == version
    assert Path(ours).resolve() == ROOT / "kernels" / "gemm.py"


def _tree(tmp_path: Path, other: bool) -> tuple[Path, Path]:
    """A repo root holding a copy of kernels/__init__.py (and a module beside it), and a site folder holding
    another distribution's ``kernels`` when ``other``."""
    root, site = tmp_path / "repo", tmp_path / "site"
    (root / "kernels").mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "__init__.py", root / "kernels" / "__init__.py")
    (root / "kernels" / "gemm.py").write_text("OURS = True\n")
    site.mkdir()
    if other:
        (site / "kernels").mkdir()
        (site / "kernels" / "__init__.py").write_text("__version__ = '9.9'\nfrom kernels.layer import get_layer\n")
        (site / "kernels" / "layer.py").write_text("def get_layer():\n    return 'theirs'\n")
    return root, site


def test_kernels_name_goes_to_the_other_distribution(tmp_path):
    root, site = _tree(tmp_path, other=True)
    out = ok(python("""
        import importlib.util, sys
        import kernels
        import kernels.layer
        from kernels import get_layer
        assert kernels.__version__ == "9.9" and get_layer() == "theirs"
        assert importlib.util.find_spec("kernels").origin == kernels.__file__
        print(kernels.__file__)
        try:
            import kernels.gemm
        except ModuleNotFoundError as e:
            print("no gemm:", e.name)
        """, root, "-S", PYTHONPATH=str(site)))
    lines = out.splitlines()
    assert Path(lines[0]).resolve() == (site / "kernels" / "__init__.py").resolve()
    assert lines[1] == "no gemm: kernels.gemm"


def test_kernels_name_without_the_other_distribution_is_an_empty_namespace(tmp_path):
    root, site = _tree(tmp_path, other=False)
    out = ok(python("""
        import importlib, importlib.util
        import kernels
        # transformers' probe: a spec, then an import without __file__ or __version__ = not installed
        assert importlib.util.find_spec("kernels") is not None
        mod = importlib.import_module("kernels")
        assert getattr(mod, "__file__", None) is None and not hasattr(mod, "__version__"), vars(mod)
        for stmt in ("from kernels import get_kernel", "import kernels.gemm"):
            try:
                exec(stmt)
            except ImportError as e:
                print(type(e).__name__)
            else:
                print("imported")
        """, root, "-S", PYTHONPATH=str(site)))
    assert out.split() == ["ImportError", "ModuleNotFoundError"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """fastlora's wheel, built without network from a copy of the tree (the build writes beside its sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fastlora", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--isolated", "--no-deps",
                           "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = (tmp / "dist").glob("fastlora-*.whl")
    return whl


def test_wheel_runs_the_kernels_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "fastlora" / "kernels" / "gemm.py").is_file()
    assert not (site / "kernels").exists()
    out = ok(python("""
        import torch, fastlora, fastlora.kernels.gemm
        from fastlora import _launch, reference
        from pathlib import Path
        print(Path(fastlora.__file__).parent, Path(fastlora.kernels.gemm.__file__).parent)
        calls = []
        gemm = _launch.gemm
        def counted(*args, **kwargs):
            calls.append(1)
            return gemm(*args, **kwargs)
        _launch.gemm = counted
        torch.manual_seed(0)
        M, K, N, R = 17, 40, 24, 8
        x, W, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        A, B = torch.randn(R, K), torch.randn(N, R)
        y = fastlora.lora_linear(x, W, b, A, B, 0.5)
        ref = reference.lora_linear(*(t.double() for t in (x, W, b, A, B)), 0.5)
        print(float((y.double() - ref).norm() / ref.norm()), len(calls))
        """, tmp_path, PYTHONPATH=str(site), TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))
    dirs, result = out.splitlines()
    assert dirs.split() == [str(site / "fastlora"), str(site / "fastlora" / "kernels")]
    err, launches = result.split()
    assert float(err) < 1e-4 and int(launches) >= 1, result


def _stub_wheel(index: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name}-{version}.dist-info"
    meta = "".join(["Metadata-Version: 2.1\n", f"Name: {name}\n", f"Version: {version}\n"]
                   + [f"Requires-Dist: {r}\n" for r in requires])
    wheel_file = "Wheel-Version: 1.0\nGenerator: fastlora-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files = {f"{dist}/METADATA": meta, f"{dist}/WHEEL": wheel_file}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(index / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def _torch_wheel(path: Path) -> tuple[str, list[Requirement]]:
    text = path.read_text()
    version = re.search(r"^Version: (\S+)$", text, re.M).group(1)
    return version, [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", text, re.M)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's triton requirement is Linux-only")
@pytest.mark.parametrize("torch_metadata", TORCH_WHEELS, ids=lambda p: p.stem)
def test_pip_keeps_the_users_torch(wheel, tmp_path, torch_metadata):
    """`pip install fastlora` beside a CUDA torch: the resolver must keep that torch and take its triton."""
    ours = [Requirement(r) for r in md.Distribution.at(_unpacked_dist_info(wheel, tmp_path)).requires or []]
    core = {canonicalize_name(r.name) for r in ours if r.marker is None}
    assert {"torch", "triton"} <= core, ours
    index = tmp_path / "index"
    index.mkdir()
    version, torch_reqs = _torch_wheel(torch_metadata)
    shared = [str(r) for r in torch_reqs if canonicalize_name(r.name) in core]
    assert any(canonicalize_name(r.name) == "triton" for r in torch_reqs), torch_metadata
    _stub_wheel(index, "torch", version, shared)
    for other, older in (("torch", "2.9.0"), ("torch", "2.10.0")):  # older torches pinning older tritons
        _stub_wheel(index, other, older, ['triton==3.5.1; platform_system == "Linux"'])
    for v in ("3.2.0", "3.5.1", "3.6.0", "3.7.1", "3.8.0", "3.9.0"):
        _stub_wheel(index, "triton", v, [])
    for v in ("2.3.5", "2.4.1"):
        _stub_wheel(index, "numpy", v, [])
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--isolated", "--dry-run",
                           "--ignore-installed", "--no-index", "--find-links", str(index), "--report", str(report),
                           str(wheel), f"torch=={version}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip cannot install fastlora beside torch {version}:\n{proc.stderr[-3000:]}"
    picked = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    assert picked["torch"] == version
    (triton_req,) = [r for r in torch_reqs if canonicalize_name(r.name) == "triton"]
    assert picked["triton"] in triton_req.specifier, (picked, str(triton_req))


def _unpacked_dist_info(wheel: Path, tmp_path: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        z.extract(names[0], tmp_path / "meta")
    return (tmp_path / "meta" / names[0]).parent


def test_readme_and_ci_install_with_the_constraints():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^ {4}(pip install .+)$", readme, re.M)
    assert commands[:2] == ['pip install -c .ci/constraints.txt -e ".[bench]" && python bench/run.py',
                            'pip install -c .ci/constraints.txt -e ".[test]" && python -m pytest'], commands
    assert 'pip install -q -c .ci/constraints.txt -e ".[test]" && python3 -m pytest -q' in ci


def test_constraints_pin_nothing_torch_needs():
    """Every line pins one version; none names torch, triton, numpy or anything a torch wheel requires."""
    torch_needs = {canonicalize_name(r.name) for p in TORCH_WHEELS for r in _torch_wheel(p)[1]
                   if "extra" not in str(r.marker)}
    torch_needs |= {"torch", "triton", "numpy", "mpmath", "markupsafe"}  # and sympy's and jinja2's own
    lines = [ln for ln in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) > 10
    for line in lines:
        req = Requirement(line)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
        name = canonicalize_name(req.name)
        assert name not in torch_needs and not name.startswith(("nvidia-", "cuda-")), line
