"""The main job's honesty: a competitor that fails to import is an error, never "not installed"; skipped PEFT cells
fail `bench/run.py` and are named in its last lines; the GPU session stops at once without the [bench] tools."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import run  # noqa: E402


def test_require_skips_only_what_is_not_installed(tmp_path, monkeypatch):
    (tmp_path / "broken_dep").mkdir()
    (tmp_path / "broken_dep" / "__init__.py").write_text("raise ImportError('cannot import name CUDAProperties')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="^not installed: no_such_dep \\(pip install -e '.\\[peft\\]'\\)"):
        harness.require("no_such_dep", "peft")
    with pytest.raises(ImportError, match="CUDAProperties"):
        harness.require("broken_dep", "peft")
    harness.require("json", "peft")


def _skip(impl, reason, cells, budget_spent=False, not_installed=False, not_applicable=False):
    return dict(impl=impl, reason=reason, cells=cells, budget_spent=budget_spent, not_installed=not_installed,
                not_applicable=not_applicable)


@pytest.mark.parametrize("skips, rc, banner", [
    ([_skip("peft", "not installed: peft", 4, not_installed=True), _skip("fastlora", "needs CUDA", 1)], 3, 4),
    ([_skip("qdora-peft", "CUDA only", 2)], 0, 2),
    ([_skip("qlora-peft", "session budget spent", 2, budget_spent=True)], 0, None),
    ([_skip("fastlora", "needs CUDA", 1)], 0, None),
    ([_skip("peft-baddbmm", "not applicable: peft 0.21.2 has no baddbmm option", 4, not_applicable=True)], 0, None),
    ([], 0, None),
], ids=["peft-not-installed", "peft-cannot-run-here", "budget-spent", "other-competitor", "peft-form-not-applicable",
        "none"])
def test_report_skips_names_the_headline_competitor_last(tmp_path, capsys, skips, rc, banner):
    path = tmp_path / "skips.json"
    path.write_text(json.dumps(skips))
    assert run.report_skips(path) == rc
    out = capsys.readouterr().out
    assert not path.exists()
    for s in skips:
        assert f"{s['impl']}: {s['cells']} cells: {s['reason']}" in out
    assert (f"{banner} CELLS OF THE HEADLINE COMPETITOR (PEFT) WERE SKIPPED" in out) == (banner is not None), out
    assert ("exit code 3" in out) == (rc == 3)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the smoke grid is the no-CUDA path")
def test_broken_peft_import_is_an_error_not_a_skip(tmp_path):
    """A peft that is installed but cannot be imported (what the shadowed `kernels` did): the cell fails with the
    import's own error, the run exits non-zero, and nothing says "not installed"."""
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text("raise ImportError('peft import broke: CUDAProperties')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "layer", "--no-plot",
                           "--results", str(tmp_path / "results"), "--filter", "fwd-fp16-K64-N64-r8-M1-peft"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "peft import broke: CUDAProperties" in out and "not installed" not in out, out[-3000:]


def test_gpu_session_stops_at_once_without_the_bench_tools(tmp_path):
    hide = ("import importlib.util as u, runpy, sys\n"
            "real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'pytest_benchmark' else real(name, *a)\n"
            f"sys.argv = ['gpu_session.py', '--out', {str(tmp_path / 'out')!r}]\n"
            "runpy.run_path('bench/gpu_session.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()
    (line,) = proc.stderr.strip().splitlines()
    also = " and matplotlib" if importlib.util.find_spec("matplotlib") is None else ""  # the test extra lacks it
    assert f"gpu_session: pytest-benchmark{also} missing" in line and "pip install -e '.[bench]'" in line, line
