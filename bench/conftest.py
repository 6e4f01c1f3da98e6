"""Benchmark session plumbing: sharding, one progress line per case, provenance in the JSON's machine_info.

``run.py`` sets the environment: FASTLORA_BENCH_GRID (smoke/quick/default/full), FASTLORA_BENCH_DTYPES,
FASTLORA_BENCH_SHARD ("i/n": run the i-th of n contiguous slices, whole comparison groups kept together).
``bench/gpu_session.py`` adds FASTLORA_BENCH_DEADLINE (epoch seconds: later cells are skipped, with that reason),
FASTLORA_COMPILE_LOG and FASTLORA_TUNING_LOG (see ``gpu_cache.activate`` and ``gpu_cache.dump_tuning``).
FASTLORA_BENCH_SKIPS names a JSON file that receives the skipped cells counted by competitor and reason (``run.py``
reports them in its last lines).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

import gpu_cache
import harness
import pytest

_progress = {"done": 0, "total": 0}
_impl: dict[str, str] = {}  # nodeid -> the competitor its cell times
_skips: Counter = Counter()  # (competitor, reason) -> cells
DEADLINE_REASON = "session budget spent (FASTLORA_BENCH_DEADLINE)"


def pytest_report_header(config):
    g = harness.grid()
    lines = [f"fastlora bench: grid={g.name} dtypes={','.join(g.dtypes)} device={harness.provenance()['device']}"]
    if not harness.CUDA:
        lines.append("NO CUDA: smoke run under TRITON_INTERPRET=1; timings are CPU/interpreter figures, "
                     "NOT GPU results")
    return lines


def _group(item) -> str:
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    return getattr(case, "group", None) or item.nodeid


def pytest_configure(config):
    gpu_cache.activate()


def pytest_runtest_setup(item):
    deadline = os.environ.get("FASTLORA_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(DEADLINE_REASON)


def pytest_sessionfinish(session):
    if os.environ.get("FASTLORA_TUNING_LOG"):
        gpu_cache.dump_tuning(os.environ["FASTLORA_TUNING_LOG"])
    if os.environ.get("FASTLORA_BENCH_SKIPS"):
        with open(os.environ["FASTLORA_BENCH_SKIPS"], "w") as f:
            json.dump([{"impl": impl, "reason": reason, "cells": n, "budget_spent": reason == DEADLINE_REASON,
                        "not_installed": reason.startswith(harness.NOT_INSTALLED),
                        "not_applicable": reason.startswith(harness.NOT_APPLICABLE)}
                       for (impl, reason), n in sorted(_skips.items())], f, indent=1)


def pytest_terminal_summary(terminalreporter):
    if _skips:
        terminalreporter.write_line("skipped cells by competitor:")
        for (impl, reason), n in sorted(_skips.items()):
            terminalreporter.write_line(f"  {impl}: {n} ({reason})")


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("FASTLORA_BENCH_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        if not 1 <= i <= n:
            raise pytest.UsageError(f"FASTLORA_BENCH_SHARD must be i/n with 1 <= i <= n; got {shard}")
        groups: list[list] = []
        for item in items:
            if groups and _group(groups[-1][0]) == _group(item):
                groups[-1].append(item)
            else:
                groups.append([item])
        bounds = [round(k * len(items) / n) for k in range(n + 1)]
        keep, seen = [], 0
        for grp in groups:  # a group belongs to the shard its first item falls in
            if bounds[i - 1] <= seen < bounds[i]:
                keep.extend(grp)
            seen += len(grp)
        kept = set(keep)
        deselected = [it for it in items if it not in kept]
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


def pytest_collection_finish(session):
    _progress["total"] = len(session.items)
    for item in session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        _impl[item.nodeid] = getattr(case, "impl", None) or item.name


def pytest_report_teststatus(report, config):
    if report.when == "call" and report.passed:
        return "passed", "", "PASSED"
    return None


def pytest_runtest_logreport(report):
    if report.when == "setup" and report.passed:
        return
    if report.when == "teardown" and not report.failed:
        return
    if report.when == "call" or report.skipped or report.failed:
        _progress["done"] += report.when != "teardown"
        name = report.nodeid.split("[", 1)[-1].rstrip("]")
        if report.passed:
            status = dict(report.user_properties).get("summary", "")
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            reason = reason.removeprefix("Skipped: ")
            _skips[(_impl.get(report.nodeid, report.nodeid), reason)] += 1
            status = "SKIPPED " + reason
        else:
            status = "FAILED " + (report.longreprtext.strip().splitlines() or [""])[-1][:200]
        width = len(str(_progress["total"]))
        sys.stdout.write(f"\n[{_progress['done']:{width}d}/{_progress['total']}] {name:<58} {status}")
        sys.stdout.flush()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastlora"] = harness.provenance()
