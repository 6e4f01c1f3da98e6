"""The main job's honesty: a competitor that fails to import is an error, never "not installed"; skipped PEFT cells
fail `bench/run.py` and are named in its last lines; the GPU session stops at once without the [bench] tools."""

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
    with pytest.raises(pytest.skip.Exception, match="no_such_dep is not installed: pip install -e '.\\[peft\\]'"):
        harness.require("no_such_dep", "peft")
    with pytest.raises(ImportError, match="CUDAProperties"):
        harness.require("broken_dep", "peft")
    harness.require("json", "peft")


@pytest.mark.parametrize("skips, rc", [
    ([{"impl": "peft", "reason": "peft is not installed", "cells": 4, "budget_spent": False}], 3),
    ([{"impl": "qlora-peft", "reason": "session budget spent", "cells": 2, "budget_spent": True}], 0),
    ([{"impl": "fastlora", "reason": "needs CUDA", "cells": 1, "budget_spent": False}], 0),
    ([], 0),
], ids=["peft-skipped", "budget-spent", "other-competitor", "none"])
def test_report_skips_fails_without_the_headline_competitor(tmp_path, capsys, skips, rc):
    path = tmp_path / "skips.json"
    path.write_text(json.dumps(skips))
    assert run.report_skips(path) == rc
    out = capsys.readouterr().out
    assert not path.exists()
    for s in skips:
        assert f"{s['impl']}: {s['cells']} cells: {s['reason']}" in out
    assert ("HEADLINE COMPETITOR (PEFT) WAS SKIPPED in 4 cells" in out) == (rc == 3)


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
    assert "pytest-benchmark missing" in line and "pip install -e '.[bench]'" in line and "matplotlib" not in line
