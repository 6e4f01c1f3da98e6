"""Triton's kernel cache for the GPU session, compiled here for sm_90 and carried there.

    python bench/gpu_cache.py build      # compile, prune, archive: bench/cache/sm90-triton.tar.xz + its manifest
    python bench/gpu_cache.py status     # does this machine's Triton read the archive's keys? is it stale?
    python bench/gpu_cache.py unpack     # into CACHE_DIR (the GPU session does this)
    python bench/gpu_cache.py verify     # unpack, then every call of the session must hit the cache (no GPU)

Triton keys a compiled kernel by triton_key() (Triton's version and the hashes of its Python sources and of
libtriton.so), the kernel's source and specialisation, the backend's hash (ptxas's ``--version`` and the arch),
the compile options and the cache-invalidating environment variables; nothing names the machine. ``build``
drives exactly the calls the session makes (``bench/gpu_check.py``'s checks with their forced configs, the
quick grid's fastlora calls with every autotune candidate its pruning keeps) through ``bench/sm90.py``'s
compile-only driver (target cuda:90, the H100/H200 device properties), into CACHE_DIR. Two things differ
from the device and are handled, not assumed:

- libtriton.so: the device runs Python 3.12 (its cp312 wheel), this machine may not. The Python sources are
  the same in every triton 3.6.0 wheel, libtriton.so differs per Python; the build computes triton_key() with
  the cp312 wheel's libtriton hash (TARGET) in place of the local one. The session compares the device's own
  key with the manifest's and, where only libtriton differs, pins the manifest's (FASTLORA_LIBTRITON_SHA256).
- cache group files (``__grp__*.json``) hold absolute paths: CACHE_DIR is one fixed path here and there.

The archive keeps what Triton loads a kernel from (the metadata JSON and the cubin) and rewrites each group
file to list just those. ``activate()`` (called by each session stage) applies the pin, logs every compile
(cache hit or miss, seconds), every launcher build and every autotuned key to FASTLORA_COMPILE_LOG, and with
FASTLORA_AUTOTUNE_MS="warmup,rep" times each autotune candidate with that do_bench instead of Triton's 25/100 ms.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE_DIR = "/tmp/fastlora-triton-cache"
ARCHIVE = BENCH / "cache" / "sm90-triton.tar.xz"
MANIFEST = BENCH / "cache" / "sm90-triton.json"
# The wheel the device's torch 2.11 imports (Python 3.12.3, triton 3.6.0, docs: .library/device/KINDS.md):
# sha256 of triton/_C/libtriton.so from the RECORD of PyPI's
# triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl.
TARGET = {"triton": "3.6.0", "python": "cp312",
          "libtriton_sha256": "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87"}
# The files whose change makes the archive stale: the kernels, the launchers' pruning and flags, the calls.
SOURCES = ("kernels/*.py", "fastlora/_launch.py", "fastlora/_configs.py", "fastlora/_ops.py", "fastlora/_autograd.py",
           "fastlora/functional.py", "bench/gpu_check.py", "bench/gpu_cache.py", "bench/harness.py",
           "bench/sm90.py")
KEEP = (".json", ".cubin")  # what CompiledKernel reads: the metadata and the binary


# ------------------------------------------------------------------------------------------------ keys


def libtriton_sha256() -> str:
    import triton

    h = hashlib.sha256()
    with open(os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pin_triton_key(target_sha256: str) -> bool:
    """Make triton_key() name libtriton.so by ``target_sha256``; True when that changed the key."""
    from triton.runtime import cache

    local = libtriton_sha256()
    if local == target_sha256:
        return False
    key = cache.triton_key().replace(local, target_sha256)
    cache.triton_key = lambda: key
    return True


def key_digest() -> str:
    from triton.runtime import cache

    return hashlib.sha256(cache.triton_key().encode()).hexdigest()


def sources_digest() -> dict:
    files = sorted(p for pattern in SOURCES for p in glob.glob(str(ROOT / pattern)))
    return {os.path.relpath(p, ROOT): hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in files}


def ptxas_version() -> str:
    """The last line of ``ptxas --version`` (the build), for the ptxas Triton would run for sm_90."""
    from triton import knobs

    out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
    return (out.strip().splitlines() or ["?"])[-1]


def target_hashes(device_target: bool) -> dict:
    """What the cache key takes from the target: the backend's hash (ptxas version, arch) and the options' hash
    for one launch's options, from the active driver's target (the device's, or the compile-only one) or, with
    ``device_target`` False, from cuda:90 named directly."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import driver

    target = driver.active.get_current_target() if device_target else GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": 4, "num_stages": 3})
    return {"driver_target": f"{target.backend}:{target.arch}", "backend_hash": backend.hash(),
            "options_sha256": options.hash()}


# ------------------------------------------------------------------------------------------------ logging


def activate() -> dict:
    """In a session stage: pin the triton key (FASTLORA_LIBTRITON_SHA256) and log compiles and launcher builds
    as JSON lines to FASTLORA_COMPILE_LOG. Returns what it did."""
    done = {}
    if os.environ.get("FASTLORA_LIBTRITON_SHA256"):
        done["pinned"] = pin_triton_key(os.environ["FASTLORA_LIBTRITON_SHA256"])
    path = os.environ.get("FASTLORA_COMPILE_LOG")
    if path:
        _log_compiles(path)
        done["log"] = path
    if os.environ.get("FASTLORA_AUTOTUNE_MS"):  # "warmup,rep": a shorter timing of each autotune candidate
        import functools

        import triton.testing

        from fastlora import _configs

        warmup, rep = (float(v) for v in os.environ["FASTLORA_AUTOTUNE_MS"].split(","))
        for t in (_configs._gemm_tuned, _configs._shrink_tuned, _configs._grad_tuned):
            t.do_bench = functools.partial(triton.testing.do_bench, warmup=warmup, rep=rep)
        done["autotune_ms"] = (warmup, rep)
    return done


def _log_compiles(path: str) -> None:
    from triton import knobs
    from triton.runtime import autotuner, build

    def write(rec):
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        us = times.ir_initialization + sum(t for _, t in times.lowering_stages) + times.store_results
        write({"kind": "kernel", "name": getattr(src, "name", "?"), "hit": bool(cache_hit),
               "seconds": round(us * 1e-6, 4), "hash": metadata.get("hash") if isinstance(metadata, dict) else None})

    knobs.compilation.listener = listener
    base = build._build

    def timed(name, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return base(name, *args, **kwargs)
        finally:
            write({"kind": "launcher", "name": name, "seconds": round(time.perf_counter() - t0, 3)})

    build._build = timed
    tuned = autotuner.Autotuner.run

    def run(self, *args, **kwargs):
        n = len(self.cache)
        out = tuned(self, *args, **kwargs)
        if len(self.cache) > n:  # a new key: every kept candidate was compiled (or loaded) and timed
            write({"kind": "autotune", "name": self.base_fn.__name__, "configs": len(self.configs_timings),
                   "seconds": round(self.bench_time, 3)})
        return out

    autotuner.Autotuner.run = run


def dump_tuning(path: str) -> None:
    """The autotuner's pick per key and dispatch's decisions, to pin or compare next time."""
    from fastlora import _configs, dispatch

    out = {"dispatch": dispatch.decisions()}
    for name in ("_gemm_tuned", "_shrink_tuned", "_grad_tuned"):
        out[name] = {repr(k): str(c) for k, c in getattr(_configs, name).cache.items()}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def summarize_log(path: str) -> dict:
    """Hits, misses and seconds from a compile log (kernels and launcher builds)."""
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    kern = [r for r in recs if r["kind"] == "kernel"]
    miss = [r for r in kern if not r["hit"]]
    launch = [r for r in recs if r["kind"] == "launcher"]
    tunes = [r for r in recs if r["kind"] == "autotune"]
    by_name: dict = {}
    for r in miss:
        by_name[r["name"]] = by_name.get(r["name"], 0) + 1
    return {"kernel_hits": len(kern) - len(miss), "kernel_misses": len(miss),
            "miss_seconds": round(sum(r["seconds"] for r in miss), 2), "misses_by_kernel": by_name,
            "launcher_builds": len(launch), "launcher_seconds": round(sum(r["seconds"] for r in launch), 2),
            "autotuned_keys": len(tunes), "autotune_configs": sum(r["configs"] for r in tunes),
            "autotune_seconds": round(sum(r["seconds"] for r in tunes), 2)}


# ------------------------------------------------------------------------------------------------ calls


def quick_calls():
    """The fastlora calls of the quick bench grid (layer, grouped, QLoRA, DoRA, FP8, MoE and end-to-end suites) as
    ``bench/sm90.py`` cases: same shapes, dtypes, flags and autograd, so the same kernels compile."""
    import harness
    from sm90 import Case

    g = harness.GRIDS["quick"]
    out = []
    for dtype in g.dtypes:
        for K, N in g.shapes:
            for M in g.tokens:
                for R in g.ranks:  # bench_layer: fwd (no grad) and training at each dropout
                    out += [Case(dtype, M, K, N, R, train=False)]
                    out += [Case(dtype, M, K, N, R, p) for p in g.train_dropouts]
                for R in g.qlora_ranks:  # bench_qlora: nf4 double quant, fp32 adapters, fwd and train
                    out += [Case(dtype, M, K, N, R, train=train, quant="nf4") for train in (False, True)]
        K, N = g.grouped_shape  # bench_grouped: inference, one adapter for all tokens, then G adapters
        for M in g.grouped_tokens:
            out += [Case(dtype, M, K, N, g.grouped_rank, train=False)]
            out += [Case(dtype, M, K, N, g.grouped_rank, train=False, G=G) for G in g.adapters]
        d = g.dora  # bench_dora: fastlora LoRA and DoRA, inference and training at each dropout
        for K, N in d.get("shapes", g.shapes):
            for M in d.get("tokens", g.tokens):
                for R in d["ranks"]:
                    out += [Case(dtype, M, K, N, R, train=False, dora=True)]
                    out += [Case(dtype, M, K, N, R, p, dora=dora) for p in d["dropouts"] for dora in (False, True)]
                    out += [Case(dtype, M, K, N, R, train=t, quant="nf4", dora=True) for t in (False, True)]  # QDoRA
        for K, N in g.fp8.get("shapes", g.shapes):  # bench_fp8: fp32 adapters over the FP8 base and the dequantised W
            for M in g.fp8.get("tokens", g.tokens):
                for R in g.fp8["ranks"]:
                    out += [Case(dtype, M, K, N, R, train=t, quant=q, fp32_adapters=True) for t in (False, True)
                            for q in ("fp8", "w8a8", "")]
        m = g.moe  # bench_moe's fastlora cells: fastlora.Experts, gate_up then down over the T * k routed rows
        if "fastlora" in m.get("impls", ("fastlora",)):
            for s in (harness.MOE_SHAPES[name] for name in m["shapes"]):
                gpt = s.layout == "gpt-oss"
                out += [Case(dtype, T * s.k, K, N, R, bias=gpt, train=mode == "train", experts=s.E, transposed=gpt)
                        for T in m["tokens"] for R in m["ranks"] for mode in m.get("modes", ("fwd", "train"))
                        for K, N in ((s.H, 2 * s.inter), (s.inter, s.H))]
        cfg = g.e2e["config"]  # bench_e2e: every linear of a Llama block but lm_head, no bias, training
        h, inter = cfg["hidden_size"], cfg["intermediate_size"]
        kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
        M = g.e2e["batch"] * g.e2e["seq"]
        for K, N in ((h, h), (h, kv), (h, inter), (inter, h)):
            for R in g.e2e["ranks"]:
                out += [Case(dtype, M, K, N, R, bias=False, quant=q) for q in ("", "nf4")]
                out += [Case(dtype, M, K, N, R, bias=False, dora=True)]  # the DoRA variant
    return out


# ------------------------------------------------------------------------------------------------ build


def _count_tunes(record: dict):
    """Count autotune keys and candidates (as the device's autotuner would see them) while compiling."""
    from triton.runtime import autotuner

    base = autotuner.Autotuner.prune_configs

    def prune(self, kwargs):
        kept = base(self, kwargs)
        args = {**self.nargs, **kwargs}
        key = tuple(args[k] for k in self.keys if k in args) + tuple(
            str(v.dtype) for v in args.values() if hasattr(v, "dtype"))
        record.setdefault(self.base_fn.__name__, {})[repr(key)] = len(kept)
        return kept

    autotuner.Autotuner.prune_configs = prune
    return lambda: setattr(autotuner.Autotuner, "prune_configs", base)


def _count_launchers(sources: set):
    """Collect the source of the C launcher each compiled kernel needs (one gcc build per distinct source on the
    device, cached there by Triton; not built here: it links the device's libcuda and Python 3.12)."""
    import sm90
    from triton.backends.nvidia.driver import make_launcher

    base = sm90._Recorder.add

    def add(self, fn, args, kwargs, compiled):
        src = compiled.src
        constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in src.constants.items()}
        sources.add(make_launcher(constants, dict(src.signature), getattr(compiled.metadata, "tensordesc_meta",
                                                                           None)))
        return base(self, fn, args, kwargs, compiled)

    sm90._Recorder.add = add
    return lambda: setattr(sm90._Recorder, "add", base)


def _session_calls(rec):
    """Drive (inside ``compile_only``) every call the session makes: the checks with their forced configs (and
    the dropout mask the reference draws), then, after yielding "quick", the quick grid's fastlora calls."""
    import gpu_check

    import fastlora

    for c in gpu_check.checks(small=False):
        rec.case = c.name
        t = c.inputs("cpu")
        c.run(t)
        if c.p:
            fastlora.dropout_mask(t["x"].shape, gpu_check.DROPOUT, 7, "cpu")
    yield "quick"
    for case in quick_calls():
        rec.case = str(case)
        case.run()


def build(jobs_note: str = "") -> dict:
    """Compile every variant the session launches into an empty CACHE_DIR, prune, archive, write the manifest."""
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    os.makedirs(CACHE_DIR)
    os.environ["TRITON_CACHE_DIR"] = CACHE_DIR
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import sm90
    import torch
    import triton

    if triton.__version__ != TARGET["triton"]:
        raise SystemExit(f"triton {triton.__version__} here; the device has {TARGET['triton']}")
    local_lib = libtriton_sha256()
    sources = sources_digest()  # before compiling: an edit during the build leaves the archive stale
    pin_triton_key(TARGET["libtriton_sha256"])
    t0 = time.perf_counter()
    tunes: dict = {}
    undo = lambda: None
    launchers: set = set()
    undo_launchers = _count_launchers(launchers)
    with sm90.compile_only(90) as rec:
        hashes = target_hashes(device_target=True)  # the compile-only driver's target and defaults
        try:
            for part in _session_calls(rec):
                if part == "quick":
                    n_check = len(rec.variants)
                    undo = _count_tunes(tunes)
        finally:
            undo()
            undo_launchers()
    seconds = time.perf_counter() - t0
    variants = list(rec.variants.values())
    errors = [f"{v.kernel} {v.constexprs} [{v.case}]: {v.error}" for v in variants if v.error]
    kept, raw = _prune(CACHE_DIR)
    ARCHIVE.parent.mkdir(exist_ok=True)
    _archive(CACHE_DIR, ARCHIVE)
    import harness

    manifest = {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": harness.git_sha(),  # "-dirty": built from uncommitted sources (``sources`` says which state)
        "build_seconds": round(seconds, 1),
        "build_machine": f"{os.cpu_count()} CPUs, one process{jobs_note}",
        "cache_dir": CACHE_DIR,
        "target": dict(TARGET, capability=90),
        "triton_key_sha256": key_digest(),
        "local_libtriton_sha256": local_lib,
        "ptxas": ptxas_version(),
        **hashes,
        "torch_here": torch.__version__,
        "sources": sources,
        "variants": len(variants) - len(errors),
        "variants_check_tier": n_check,
        "compile_errors": errors,
        "kernels_in_archive": kept,
        "bytes_unpruned": raw,
        "bytes_pruned": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CACHE_DIR) for f in fs),
        "archive_bytes": ARCHIVE.stat().st_size,
        "launchers": len(launchers),
        "autotune_keys": {k: len(v) for k, v in tunes.items()},
        "autotune_candidates": {k: sum(v.values()) for k, v in tunes.items()},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _prune(cache_dir: str) -> tuple[int, int]:
    """Keep each kernel's metadata JSON and cubin, rewrite its group file to list those; drop the rest (IR, PTX,
    directories without a group). Returns (kernels kept, bytes before)."""
    raw, kept = 0, 0
    for d in sorted(os.listdir(cache_dir)):
        path = os.path.join(cache_dir, d)
        files = os.listdir(path)
        raw += sum(os.path.getsize(os.path.join(path, f)) for f in files)
        groups = [f for f in files if f.startswith("__grp__")]
        if len(groups) != 1:
            shutil.rmtree(path)
            continue
        with open(os.path.join(path, groups[0])) as f:
            children = json.load(f)["child_paths"]
        keep = {name: p for name, p in children.items() if name.endswith(KEEP)}
        for f in files:
            if f != groups[0] and f not in keep:
                os.remove(os.path.join(path, f))
        with open(os.path.join(path, groups[0]), "w") as f:
            json.dump({"child_paths": keep}, f)
        kept += 1
    return kept, raw


def _archive(src: str, dest: Path) -> None:
    """A reproducible tar.xz of ``src``: sorted names, zero times and owners, paths relative to it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d, dirs, files in sorted(os.walk(src)):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(d, name)
                info = tar.gettarinfo(full, arcname=os.path.relpath(full, src))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(full, "rb") as f:
                    tar.addfile(info, f)
    import lzma

    dest.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))


def verify() -> dict:
    """Unpack the archive into CACHE_DIR (replacing what is there), pin the key as the session does, drive the
    session's calls through the compile-only driver: every kernel must come from the cache (``kernel_misses``
    0). The device-free half of the proof; the session's own hit/miss counts are the other."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels are not cached")
    import triton

    built_for = json.loads(MANIFEST.read_text())["target"]["triton"]
    if triton.__version__ != built_for:
        raise SystemExit(f"triton {triton.__version__} here; the archive holds triton {built_for}'s kernels, which "
                         "this one never loads (`status` says so): nothing to verify")
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = CACHE_DIR
    unpacked = unpack()
    import sm90

    log = os.path.join(CACHE_DIR, "verify-compiles.jsonl")
    pin_triton_key(json.loads(MANIFEST.read_text())["target"]["libtriton_sha256"])
    _log_compiles(log)
    t0 = time.perf_counter()
    base = sm90._Recorder.add
    sm90._Recorder.add = lambda self, fn, args, kwargs, compiled: self.variants.setdefault(compiled.hash, fn)
    try:
        with sm90.compile_only(90) as rec:
            for _ in _session_calls(rec):
                pass
    finally:
        sm90._Recorder.add = base
    out = {"unpacked": unpacked, "variants": len(rec.variants), "seconds": round(time.perf_counter() - t0, 1),
           **summarize_log(log)}
    os.remove(log)
    return out


def unpack(archive: Path = ARCHIVE, cache_dir: str = CACHE_DIR) -> int:
    """Extract the archive into ``cache_dir`` (the path its group files name); returns the kernels unpacked."""
    os.makedirs(cache_dir, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(cache_dir, filter="data")
        return sum(1 for n in tar.getnames() if os.path.basename(n).startswith("__grp__"))


def status(manifest_path: Path = MANIFEST) -> dict:
    """This machine's Triton against the manifest: key match (or a libtriton-only difference), stale sources."""
    import triton

    if not manifest_path.exists():
        return {"archive": "absent: run python bench/gpu_cache.py build"}
    m = json.loads(manifest_path.read_text())
    here = key_digest()
    lib = libtriton_sha256()
    ptxas = ptxas_version()
    import torch

    hashes = target_hashes(device_target=torch.cuda.is_available())
    built_for = m["target"].get("triton")
    out = {"triton": triton.__version__, "archive_triton": built_for, "libtriton_sha256": lib,
           "triton_key_sha256": here, "archive_key_sha256": m["triton_key_sha256"], "ptxas": ptxas,
           "ptxas_match": ptxas == m["ptxas"],
           **hashes, "target_match": all(hashes[k] == m.get(k) for k in hashes),
           "cache_invalidating_env": _invalidating_env()}
    if here == m["triton_key_sha256"]:
        out["key"] = "match"
    elif built_for and triton.__version__ != built_for:  # its sources differ: no pin can make the keys meet
        out["key"] = (f"mismatch (triton {triton.__version__} here, the archive holds triton {built_for}'s kernels: "
                      f"none loads, every kernel compiles on first use; build needs triton {built_for})")
    else:
        from triton.runtime import cache

        pinned = hashlib.sha256(cache.triton_key().replace(lib, m["target"]["libtriton_sha256"]).encode())
        out["key"] = ("libtriton-only (same triton sources; pin FASTLORA_LIBTRITON_SHA256)"
                      if pinned.hexdigest() == m["triton_key_sha256"] else "mismatch (other triton sources)")
    now = sources_digest()
    out["stale_sources"] = sorted(k for k in set(now) | set(m["sources"]) if now.get(k) != m["sources"].get(k))
    return out


def _invalidating_env() -> dict:
    from triton._C.libtriton import get_cache_invalidating_env_vars

    return dict(get_cache_invalidating_env_vars())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("build", "status", "unpack", "verify"))
    args = ap.parse_args(argv)
    if args.command == "build":
        m = build()
        print(json.dumps({k: v for k, v in m.items() if k != "sources"}, indent=1))
        return 1 if m["compile_errors"] else 0
    if args.command == "unpack":
        print(f"{unpack()} kernels unpacked into {CACHE_DIR}")
        return 0
    if args.command == "verify":
        result = verify()
        print(json.dumps(result, indent=1))
        return 1 if result["kernel_misses"] or not result["variants"] else 0
    print(json.dumps(status(), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())
