"""The first GPU session in one command: versions, install, carried kernel cache, correctness tier, quick grid.

    bash bench/gpu_session.sh                 # on the device ($OUT set); docs/gpu-session.md has the exact call
    python bench/gpu_session.py --out DIR     # the same; without CUDA a dry run of every stage on CPU

Stages, each a subprocess with a wall-clock budget (a hung or crashed stage, an illegal address included,
costs only its own budget): ``env`` (GPU, driver, torch/triton/CUDA, the cache's key against this Triton),
``install`` (the checkout, editable, no deps; bitsandbytes from a carried ``.whl/``), ``cache`` (unpack the
sm_90 archive of ``bench/gpu_cache.py``), ``check`` (``bench/gpu_check.py``), ``bench`` (``bench/run.py
--quick``, one suite per subprocess, later cells skipped once the budget is spent), ``plots``. What a stage
skipped is recorded. Files written to --out (the device returns at most 8):

    session.json           stages (status, seconds, budget, skipped), versions and git SHA, checks, compile
                           cache hits and misses, autotune picks and dispatch decisions
    <device>-<date>-quick.json  the quick grid's pytest-benchmark JSON (bench/plot.py reads it)
    logs.tar.xz            every stage's output and the compile logs
    plots.tar              the PNGs bench/plot.py drew (empty when it could not)

Without CUDA: TRITON_INTERPRET=1, the checks' small shapes and the smoke grid; nothing is installed and the
sm_90 archive is only test-unpacked. Those timings mean nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import gpu_cache  # noqa: E402

SUITES = ("layer", "grouped", "qlora", "e2e", "dora", "fp8", "moe")
# Seconds per stage (the arithmetic behind them: docs/gpu-session.md). The total is the session's ceiling.
BUDGET = {"env": 30, "install": 90, "cache": 30, "check": 90, "bench": 240, "plots": 40}
TOTAL = 480
# Each autotune candidate timed over 5 ms warm-up + 20 ms (Triton's default 25 + 100): the quick grid's 981
# candidates at 86 keys would take ~2.3 minutes at the default (docs/gpu-session.md). The cells themselves keep
# harness.measure's 25 + 100 ms.
AUTOTUNE_MS = "5,20"
# The bench stage's pytest plugin and the plots stage's library: without them the session stops before it starts.
BENCH_TOOLS = {"pytest_benchmark": "pytest-benchmark", "matplotlib": "matplotlib"}


class Session:
    def __init__(self, out: Path, work: Path, total: float, cuda: bool):
        self.out, self.work, self.cuda = out, work, cuda
        self.start = time.monotonic()
        self.deadline = self.start + total
        self.stages: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), str(BENCH), os.environ.get("PYTHONPATH")) if p))
        if not cuda:
            self.env["TRITON_INTERPRET"] = "1"

    def left(self, budget: float, reserve: float = 0.0) -> float:
        return max(0.0, min(budget, self.deadline - reserve - time.monotonic()))

    def run(self, name: str, cmd: list[str], budget: float, env: dict | None = None) -> dict:
        """Run one command with a timeout, its output appended to <work>/<name>.log; returns its record."""
        log = self.work / f"{name}.log"
        t0 = time.monotonic()
        rec = {"cmd": " ".join(cmd), "budget_s": round(budget, 1)}
        if budget < 1:
            return dict(rec, status="skipped", reason="session budget spent", seconds=0.0)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=budget).returncode
                rec.update(status="ok" if rc == 0 else "fail", rc=rc)
            except subprocess.TimeoutExpired:
                rec.update(status="timeout", reason=f"killed at its budget, {budget:.0f} s")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        print(f"  {name}: {rec['status']} in {rec['seconds']} s (budget {budget:.0f} s)", flush=True)
        return rec

    def stage(self, name: str, rec: dict) -> dict:
        rec = dict(name=name, **rec)
        self.stages.append(rec)
        return rec


def env_stage(s: Session) -> dict:
    """Versions, the GPU, and the carried cache's key against this Triton; pins the key when only libtriton.so
    differs and drops TRITON_PTXAS_PATH (the archive was compiled by the wheel's own ptxas)."""
    t0 = time.monotonic()
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if s.cuda else "cpu",
            "git_sha": os.environ.get("FASTLORA_GIT_SHA") or _git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if s.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_gib=round(
            p.total_memory / 2**30, 1), smi=_cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                                    "clocks.sm,clocks.max.sm,temperature.gpu,power.draw",
                                                    "--format=csv,noheader"]))
    cache = gpu_cache.status()
    if str(cache.get("key", "")).startswith("libtriton-only"):
        m = json.loads(gpu_cache.MANIFEST.read_text())
        s.env["FASTLORA_LIBTRITON_SHA256"] = m["target"]["libtriton_sha256"]
        cache["pinned"] = True
    if "TRITON_PTXAS_PATH" in s.env:
        cache["dropped_env"] = {"TRITON_PTXAS_PATH": s.env.pop("TRITON_PTXAS_PATH")}
    info["cache_status"] = cache
    s.env["FASTLORA_GIT_SHA"] = info["git_sha"]  # the device's copy of the tree has no .git
    for k, v in info.items():
        print(f"  {k}: {v}", flush=True)
    return {"status": "ok", "seconds": round(time.monotonic() - t0, 1), "budget_s": BUDGET["env"], "info": info}


def install_stage(s: Session) -> dict:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("bitsandbytes-*.whl"))
    cmds = [[*pip, "-e", "."]] + ([[*pip, *wheels]] if wheels else [])
    if not s.cuda:
        return {"status": "skipped", "reason": "dry run: nothing installed", "would_run": [" ".join(c) for c in cmds]}
    recs = [s.run("install", c, s.left(BUDGET["install"])) for c in cmds]
    bad = [r for r in recs if r["status"] != "ok"]
    rec = {"status": bad[0]["status"] if bad else "ok", "seconds": round(sum(r["seconds"] for r in recs), 1),
           "budget_s": BUDGET["install"], "commands": recs,
           "bitsandbytes": wheels or "no wheel under .whl/: the PEFT-QLoRA cells skip"}
    if recs[0]["status"] != "ok":  # no setuptools/wheel there: import the checkout through a shim instead
        rec["shim"] = _shim(s)
    return rec


def _shim(s: Session) -> str:
    """A ``fastlora`` package of links to the checkout's files, ``kernels/`` as ``fastlora.kernels`` (what the
    editable install maps), first on the stages' PYTHONPATH."""
    pkg = s.work / "site" / "fastlora"
    pkg.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "fastlora").glob("*.py"):
        (pkg / f.name).symlink_to(f)
    (pkg / "kernels").symlink_to(ROOT / "kernels")
    s.env["PYTHONPATH"] = os.pathsep.join([str(pkg.parent), s.env["PYTHONPATH"]])
    return str(pkg)


def cache_stage(s: Session) -> dict:
    t0 = time.monotonic()
    if not gpu_cache.ARCHIVE.exists():
        return {"status": "skipped", "reason": f"{gpu_cache.ARCHIVE.relative_to(ROOT)} absent: every kernel "
                "compiles on the device (python bench/gpu_cache.py build makes it)", "seconds": 0.0}
    # Dry run: test-unpack elsewhere; the interpreter compiles nothing.
    target = gpu_cache.CACHE_DIR if s.cuda else str(s.work / "triton-cache-test")
    n = gpu_cache.unpack(cache_dir=target)
    if s.cuda:
        s.env["TRITON_CACHE_DIR"] = target
    m = json.loads(gpu_cache.MANIFEST.read_text())
    return {"status": "ok", "seconds": round(time.monotonic() - t0, 1), "budget_s": BUDGET["cache"],
            "kernels_unpacked": n, "into": target, "archive_bytes": gpu_cache.ARCHIVE.stat().st_size,
            "manifest_variants": m.get("variants"), "built": m.get("built")}


def check_stage(s: Session) -> dict:
    jsonl = s.work / "checks.jsonl"
    env = dict(s.env, FASTLORA_POISON="1", FASTLORA_COMPILE_LOG=str(s.work / "compile-check.jsonl"))
    end = time.monotonic() + s.left(BUDGET["check"], reserve=BUDGET["bench"] // 2 + BUDGET["plots"])
    runs = []
    while len(runs) < 4:  # again after a lost CUDA context or a crash: the checks not yet recorded
        budget = max(0.0, end - time.monotonic())
        cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--jsonl", str(jsonl), "--budget",
               f"{max(0.0, budget - 20):.0f}"]
        runs.append(s.run("check", cmd + ([] if s.cuda else ["--small"]), budget, env))
        if runs[-1].get("rc") in (None, 0, 1):  # finished, timed out or skipped
            break
    rec = dict(runs[-1], seconds=round(sum(r.get("seconds", 0) for r in runs), 1), runs=len(runs))
    checks = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    import gpu_check

    total = len(gpu_check.checks(small=not s.cuda))
    rec["counts"] = {k: sum(c["status"] == k for c in checks) for k in ("pass", "fail", "skipped")}
    rec["counts"]["not_run"] = total - len(checks)
    if rec["counts"]["fail"]:
        rec["status"] = "fail"
    rec["compiles"] = gpu_cache.summarize_log(env["FASTLORA_COMPILE_LOG"])
    rec["checks"] = checks
    return rec


def bench_stage(s: Session, args) -> dict:
    """The quick grid (dry run: the smoke grid), one suite per subprocess; each cell starts only before the
    budget's deadline (FASTLORA_BENCH_DEADLINE, read by bench/conftest.py)."""
    budget = s.left(BUDGET["bench"], reserve=BUDGET["plots"])
    deadline = time.time() + budget - 30  # room for the last cell to finish and pytest to write its JSON
    grid = "quick" if s.cuda else "smoke"
    suites, recs = args.suites.split(","), []
    for suite in suites:
        env = dict(s.env, FASTLORA_BENCH_DEADLINE=f"{deadline:.0f}", FASTLORA_AUTOTUNE_MS=AUTOTUNE_MS,
                   FASTLORA_COMPILE_LOG=str(s.work / "compile-bench.jsonl"),
                   FASTLORA_TUNING_LOG=str(s.work / f"tuning-{suite}.json"))
        cmd = [sys.executable, str(BENCH / "run.py"), "--grid", grid, "--suite", suite, "--no-plot",
               "--results", str(s.work), "--name", f"bench-{suite}"]
        if args.bench_filter:
            cmd += ["--filter", args.bench_filter]
        rec = s.run("bench", cmd, max(0.0, min(s.left(budget), deadline + 30 - time.time())), env)
        rec["suite"] = suite
        rec["cells"] = _cells(s.work / f"bench-{suite}.json", s.work / "bench.log", suite)
        recs.append(rec)
    merged = _merge_bench([s.work / f"bench-{suite}.json" for suite in suites])
    status = "ok" if all(r["status"] == "ok" for r in recs) else "partial"
    tuning = {p.stem: json.loads(p.read_text()) for p in sorted(s.work.glob("tuning-*.json"))}
    return {"status": status, "seconds": round(sum(r["seconds"] for r in recs), 1), "budget_s": round(budget, 1),
            "grid": grid, "autotune_ms": AUTOTUNE_MS, "suites": recs,
            "benchmarks": len(merged.get("benchmarks", [])), "merged": merged,
            "compiles": gpu_cache.summarize_log(str(s.work / "compile-bench.jsonl")), "tuning": tuning}


def _cells(path: Path, log: Path, suite: str) -> dict:
    """Timed cells in the suite's JSON; failed and skipped ones from its progress lines."""
    timed = len(json.loads(path.read_text()).get("benchmarks", [])) if path.exists() else 0
    text = log.read_text() if log.exists() else ""
    part = text.rsplit(f"--suite {suite}", 1)[-1]
    return {"timed": timed, "failed": len(re.findall(r"\] \S+ +FAILED", part)),
            "skipped": len(re.findall(r"\] \S+ +SKIPPED", part)),
            "skipped_for_budget": len(re.findall(r"SKIPPED .*session budget spent", part))}


def _merge_bench(paths: list[Path]) -> dict:
    merged: dict = {}
    for p in paths:
        if not p.exists():
            continue
        data = json.loads(p.read_text())
        if not merged:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    return merged


def plots_stage(s: Session, bench_json: Path) -> dict:
    img = s.work / "img"
    img.mkdir(exist_ok=True)
    if not bench_json.exists():
        return {"status": "skipped", "reason": "no benchmark JSON", "seconds": 0.0}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "matplotlib is not installed", "seconds": 0.0}
    rec = s.run("plots", [sys.executable, str(BENCH / "plot.py"), str(bench_json), "--out", str(img)],
                s.left(BUDGET["plots"]))
    rec["pngs"] = sorted(p.name for p in img.glob("*.png"))
    return rec


def pack(s: Session, bench_json: Path, stem: str, info: dict) -> list[str]:
    """session.json, the bench JSON, logs.tar.xz, plots.tar: four files in --out."""
    s.out.mkdir(parents=True, exist_ok=True)
    written = []
    if bench_json.exists():
        (s.out / f"{stem}.json").write_bytes(bench_json.read_bytes())
        written.append(f"{stem}.json")
    with tarfile.open(s.out / "logs.tar.xz", "w:xz") as tar:
        for p in sorted(s.work.iterdir()):
            if p.suffix in (".log", ".jsonl") or p.name.startswith("tuning-"):
                tar.add(p, arcname=p.name)
    with tarfile.open(s.out / "plots.tar", "w") as tar:
        for p in sorted((s.work / "img").glob("*.png")):
            tar.add(p, arcname=p.name)
    written += ["logs.tar.xz", "plots.tar", "session.json"]
    summary = {"info": info, "cuda": s.cuda, "total_seconds": round(time.monotonic() - s.start, 1),
               "total_budget_s": round(s.deadline - s.start), "files": written, "stages": s.stages}
    (s.out / "session.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or BENCH / "results" / "session"))
    ap.add_argument("--total", type=float, default=TOTAL, help=f"seconds for the whole session ({TOTAL})")
    ap.add_argument("--suites", default=",".join(SUITES), help="bench suites, in order")
    ap.add_argument("--bench-filter", help="pytest -k expression for the bench cells (the CI dry run uses one)")
    ap.add_argument("--skip-check", action="store_true", help="no correctness tier (a rerun of bench cells)")
    args = ap.parse_args(argv)
    missing = [dist for module, dist in BENCH_TOOLS.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"gpu_session: {' and '.join(missing)} missing (the [bench] tools): pip install -e '.[bench]', or "
              "on the device `pip install --no-deps` their wheels carried in .whl/", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    print(f"fastlora GPU session ({'CUDA' if cuda else 'DRY RUN on CPU: interpreter, tiny shapes'}); "
          f"budget {args.total:.0f} s; out {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastlora-session-") as tmp:
        s = Session(args.out, Path(tmp), args.total, cuda)
        env = s.stage("env", _guarded(env_stage, s))
        info = env.get("info") or {"device": "cuda" if cuda else "cpu", "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")}
        s.stage("install", _guarded(install_stage, s))
        s.stage("cache", _guarded(cache_stage, s))
        s.stage("check", _guarded(check_stage, s) if not args.skip_check
                else {"status": "skipped", "reason": "--skip-check"})
        bench = _guarded(bench_stage, s, args)
        merged = bench.pop("merged", None)
        s.stage("bench", bench)
        stem = _stem(info)
        bench_json = s.work / f"{stem}.json"
        if merged:
            bench_json.write_text(json.dumps(merged, indent=1))
        s.stage("plots", _guarded(plots_stage, s, bench_json))
        files = pack(s, bench_json, stem, info)
    _print_summary(s, files)
    return 0 if all(st["status"] in ("ok", "skipped") for st in s.stages) else 1


def _guarded(stage, *args) -> dict:
    """A stage's record, or its exception as a failed record: the later stages and the files still come."""
    t0 = time.monotonic()
    try:
        return stage(*args)
    except Exception as exc:
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:1000],
                "seconds": round(time.monotonic() - t0, 1)}


def _stem(info: dict) -> str:
    date = info["date"][:10]
    device = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    return f"{device}-{date}-quick" if info["device"] != "cpu" else f"cpu-dryrun-{date}"


def _print_summary(s: Session, files: list[str]) -> None:
    print("\nstage      status    seconds  budget  notes")
    for st in s.stages:
        note = st.get("reason") or st.get("error", "")
        if st["name"] == "check" and "counts" in st:
            c = st["compiles"]
            note = f"{st['counts']}  compiles {c['kernel_hits']} hit / {c['kernel_misses']} miss"
        if st["name"] == "bench" and "suites" in st:
            note = (f"{st['benchmarks']} cells timed; compiles {st['compiles']['kernel_hits']} hit / "
                    f"{st['compiles']['kernel_misses']} miss; " + ", ".join(
                        f"{r['suite']} {r['status']}" for r in st["suites"]))
        print(f"{st['name']:<10} {st['status']:<9} {st.get('seconds', 0):>7} {st.get('budget_s', ''):>7}  {note}")
    print(f"total {time.monotonic() - s.start:.0f} s; files in {s.out}: {', '.join(files)}", flush=True)


def _git_sha() -> str:
    sha = _cmd(["git", "rev-parse", "HEAD"])
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha or "") else "unknown (set FASTLORA_GIT_SHA)"


def _cmd(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main())
