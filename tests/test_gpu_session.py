"""The GPU session's command (bench/gpu_session.sh) dry-run on CPU, and the carried kernel cache's plumbing.

The dry run is the same command as on the device: every stage runs (the interpreter, tiny shapes, one bench cell
per suite here, the end-to-end suite left out for time) and writes the same files the device returns.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_cache  # noqa: E402
import gpu_check  # noqa: E402

# One cell per suite; the end-to-end suite (a model and its reference per cell: ~30 s here) is left to the manual
# full dry run (docs/gpu-session.md), its plumbing being the other suites'.
SUITES = ("layer", "grouped", "qlora", "dora", "fp8", "moe")
ONE_CELL_PER_SUITE = ("fwd-fp16-K64-N64-r8-M1-fastlora and not dora or qlora-fwd-fp16-K64-N64-r8-M1-qlora-fastlora or "
                      "G4-M32-fastlora-grouped or dora-train-drop0.1-fp16-K64-N64-r8-M16-fastlora-dora or "
                      "fp8-train-fp16-K64-N96-r8-M16-fp8-fastlora or "
                      "moe-train-fp16-tiny-gpt-oss-E4-H40-I24-k2-r4-T13-fastlora")
MIB = 1 << 20


def _session(tmp_path, *args):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)  # the session decides: no CUDA, so the interpreter
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the dry run is the no-CUDA path")
def test_dry_run_writes_the_device_files(tmp_path):
    proc, out = _session(tmp_path, "--suites", ",".join(SUITES), "--bench-filter", ONE_CELL_PER_SUITE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * MIB for p in out.iterdir()), files
    bench_json = [f for f in files if f.startswith("cpu-dryrun-")]
    assert set(files) == {"session.json", "logs.tar.xz", "plots.tar", *bench_json} and len(bench_json) == 1

    s = json.loads((out / "session.json").read_text())
    stages = {st["name"]: st for st in s["stages"]}
    assert list(stages) == ["env", "install", "cache", "check", "bench", "plots"]
    assert s["info"]["triton"] and s["info"]["torch"] and s["info"]["git_sha"]
    assert stages["install"]["status"] == "skipped" and "pip install" in stages["install"]["would_run"][0]
    check = stages["check"]
    every = gpu_check.checks(small=True)
    bf16 = sum(c.dtype == "bf16" for c in every)  # skipped without CUDA
    assert check["status"] == "ok" and check["runs"] == 1
    assert check["counts"] == {"pass": len(every) - bf16, "fail": 0, "skipped": bf16, "not_run": 0}
    for rec in check["checks"]:
        if rec["status"] == "pass":
            assert set(rec["errors"]) == {"y", "dx", "dA", "dB"} | ({"dm"} if "dora" in rec["family"] else set())
            assert all(0 < e <= rec["bound"] for e in rec["errors"].values()), rec
    suites = {r["suite"]: r for r in stages["bench"]["suites"]}
    assert tuple(suites) == SUITES
    assert all(r["status"] == "ok" and r["cells"]["timed"] == 1 and r["cells"]["failed"] == 0
               for r in suites.values()), suites

    benches = json.loads((out / bench_json[0]).read_text())["benchmarks"]
    assert {b["extra_info"]["suite"] for b in benches} == set(SUITES)
    assert all(b["extra_info"]["git_sha"] == s["info"]["git_sha"] for b in benches)
    with tarfile.open(out / "logs.tar.xz") as tar:
        assert {"check.log", "bench.log", "checks.jsonl"} <= set(tar.getnames())


def test_spent_budget_skips_stages_and_still_writes_files(tmp_path):
    proc, out = _session(tmp_path, "--total", "1")
    s = json.loads((out / "session.json").read_text())
    stages = {st["name"]: st for st in s["stages"]}
    assert stages["check"]["status"] == "skipped" and "budget" in stages["check"]["reason"]
    assert all(r["status"] == "skipped" for r in stages["bench"]["suites"])
    assert {"session.json", "logs.tar.xz", "plots.tar"} <= {p.name for p in out.iterdir()}


def _fake_kernel(cache: Path, digest: str, name: str):
    d = cache / digest
    d.mkdir(parents=True)
    children = {}
    for ext in ("json", "cubin", "ptx", "ttir", "source"):
        (d / f"{name}.{ext}").write_text(f"{digest} {ext}")
        children[f"{name}.{ext}"] = str(d / f"{name}.{ext}")
    (d / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))


def test_prune_keeps_metadata_and_cubin_and_archive_round_trips(tmp_path):
    cache = tmp_path / "cache"
    _fake_kernel(cache, "aa", "_lora_gemm_kernel")
    _fake_kernel(cache, "bb", "_lora_grad_kernel")
    (cache / "cc").mkdir()  # a directory without a group file (e.g. a launcher built elsewhere): dropped
    (cache / "cc" / "x.so").write_text("x")
    kept, raw = gpu_cache._prune(str(cache))
    assert kept == 2 and raw > 0 and sorted(os.listdir(cache)) == ["aa", "bb"]
    assert sorted(os.listdir(cache / "aa")) == ["__grp___lora_gemm_kernel.json", "_lora_gemm_kernel.cubin",
                                                "_lora_gemm_kernel.json"]
    group = json.loads((cache / "aa" / "__grp___lora_gemm_kernel.json").read_text())["child_paths"]
    assert group == {n: str(cache / "aa" / n) for n in ("_lora_gemm_kernel.json", "_lora_gemm_kernel.cubin")}

    archive = tmp_path / "a.tar.xz"
    gpu_cache._archive(str(cache), archive)
    first = archive.read_bytes()
    gpu_cache._archive(str(cache), archive)
    assert archive.read_bytes() == first  # reproducible: same files, same bytes
    assert gpu_cache.unpack(archive, str(tmp_path / "there")) == 2
    assert (tmp_path / "there" / "bb" / "_lora_grad_kernel.cubin").read_text() == "bb cubin"


def test_pinned_triton_key_names_the_target_libtriton(monkeypatch):
    from triton.runtime import cache

    monkeypatch.setattr(cache, "triton_key", cache.triton_key)  # restored after the test
    local = gpu_cache.libtriton_sha256()
    before = cache.triton_key()
    assert local in before
    assert gpu_cache.pin_triton_key("f" * 64)
    after = cache.triton_key()
    assert local not in after and "f" * 64 in after and after == before.replace(local, "f" * 64)


def test_compile_log_summary(tmp_path):
    log = tmp_path / "c.jsonl"
    recs = [{"kind": "kernel", "name": "_lora_gemm_kernel", "hit": True, "seconds": 0.01},
            {"kind": "kernel", "name": "_lora_gemm_kernel", "hit": False, "seconds": 2.5},
            {"kind": "launcher", "name": "__triton_launcher", "seconds": 1.5},
            {"kind": "autotune", "name": "_lora_gemm_kernel", "configs": 12, "seconds": 3.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = gpu_cache.summarize_log(str(log))
    assert (s["kernel_hits"], s["kernel_misses"], s["miss_seconds"]) == (1, 1, 2.5)
    assert s["misses_by_kernel"] == {"_lora_gemm_kernel": 1}
    assert (s["launcher_builds"], s["autotuned_keys"], s["autotune_configs"]) == (1, 1, 12)


def test_quick_calls_cover_every_suite_of_the_quick_grid():
    import harness

    g = harness.GRIDS["quick"]
    calls = gpu_cache.quick_calls()
    assert {c.G for c in calls} == {1, *g.adapters}
    assert {(c.K, c.N) for c in calls if c.quant == "nf4" and c.M in g.tokens} >= set(g.shapes)
    moe = {T * harness.MOE_SHAPES[s].k for s in g.moe["shapes"] for T in g.moe["tokens"]}  # bench_moe: T * k rows
    assert {c.M for c in calls} == {*g.tokens, *g.grouped_tokens, g.e2e["batch"] * g.e2e["seq"], *moe}
    assert any(not c.bias and c.train and c.N == 1024 for c in calls)  # the Llama k/v projections
    fp8 = {(c.K, c.N, c.M, c.r, c.train) for c in calls if c.quant == "fp8" and c.fp32_adapters}  # bench_fp8
    assert fp8 == {(K, N, M, r, t) for K, N in g.fp8["shapes"] for M in g.fp8["tokens"] for r in g.fp8["ranks"]
                   for t in (False, True)}


def test_status_tells_match_libtriton_only_mismatch_and_stale(tmp_path):
    import hashlib

    from triton.runtime import cache

    manifest = tmp_path / "m.json"
    lib = gpu_cache.libtriton_sha256()
    base = {"target": {"libtriton_sha256": lib}, "ptxas": gpu_cache.ptxas_version(),
            "sources": gpu_cache.sources_digest(), **gpu_cache.target_hashes(device_target=False)}

    def status(**changes):
        manifest.write_text(json.dumps({**base, **changes}))
        return gpu_cache.status(manifest)

    here = status(triton_key_sha256=gpu_cache.key_digest())
    assert (here["key"], here["stale_sources"], here["ptxas_match"], here["target_match"]) == ("match", [], True, True)
    other = hashlib.sha256(cache.triton_key().replace(lib, "f" * 64).encode()).hexdigest()
    assert status(triton_key_sha256=other, target={"libtriton_sha256": "f" * 64})["key"].startswith("libtriton-only")
    assert status(triton_key_sha256="0" * 64)["key"].startswith("mismatch")
    other_triton = status(triton_key_sha256="0" * 64, target={"libtriton_sha256": lib, "triton": "0.0.0"})
    assert other_triton["key"].startswith("mismatch (triton ") and other_triton["archive_triton"] == "0.0.0"
    edited = dict(base["sources"], **{"kernels/gemm.py": "0" * 16})
    assert status(triton_key_sha256=gpu_cache.key_digest(), sources=edited)["stale_sources"] == ["kernels/gemm.py"]


def test_committed_archive_serves_every_kernel_of_the_session():
    st = gpu_cache.status()
    if "archive" in st:
        pytest.skip(st["archive"])
    if st["stale_sources"] or st["key"].startswith("mismatch"):
        pytest.skip(f"archive not for this tree/triton (stale {st['stale_sources']}, key {st['key']}): rebuild with "
                    "`python bench/gpu_cache.py build`")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_POISON")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_cache.py"), "verify"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    variants = json.loads(gpu_cache.MANIFEST.read_text())["variants"]
    assert (result["kernel_misses"], result["kernel_hits"], result["unpacked"]) == (0, variants, variants)


def test_check_tier_runs_only_the_checks_not_yet_recorded(tmp_path):
    """The session restarts gpu_check after a lost CUDA context; a restart must not redo recorded checks."""
    every = gpu_check.checks(small=True)
    left = next(c for c in every if c.family == "dense-ptr" and c.dtype == "fp32")
    jsonl = tmp_path / "checks.jsonl"
    jsonl.write_text("".join(json.dumps({"name": c.name, "status": "pass"}) + "\n" for c in every if c is not left))
    assert gpu_check.main(["--jsonl", str(jsonl), "--small"]) == 0
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(recs) == len(every) and recs[-1]["name"] == left.name and recs[-1]["status"] == "pass"
    assert set(recs[-1]["errors"]) == {"y", "dx", "dA", "dB"}
