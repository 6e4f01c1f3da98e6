"""Run the fastlora benchmark suite, write its JSON, draw the plots.

    python bench/run.py                      # GPU: the default grid (bf16); no GPU: a small CPU smoke grid
    python bench/run.py --quick              # a subset, a few minutes on a GPU
    python bench/run.py --full               # default grid + fp16 + a second rank end to end
    python bench/run.py --shard 2/3          # one of three slices of the grid (fits a 10-minute limit)
    python bench/run.py --suite layer --filter "fwd and K4096-N4096"
    python bench/run.py --suite qlora,e2e --filter qlora   # the QLoRA cases only (4-bit base, layer and e2e)
    python bench/run.py --suite fp8          # LoRA over a block-scaled FP8 base (one layer)
    python bench/run.py --suite moe          # LoRA on MoE experts (a transformers experts block)

Wraps ``pytest bench/ --benchmark-json=bench/results/<device>-<date>.json`` (one progress line per case),
then ``bench/plot.py``. Without CUDA it sets TRITON_INTERPRET=1, runs tiny shapes with few repetitions and
writes ``bench/results/cpu-smoke-<date>.json``: a check of the plumbing, not a performance result.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PUBLISHED_IMG = ROOT / "docs" / "img" / "bench"
SUITES = ("layer", "grouped", "e2e", "qlora", "dora", "fp8", "moe")
HEADLINE = "peft"  # the competitor every suite compares with (its impl names contain this)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Arguments after `--` go to pytest unchanged.")
    grid = ap.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_const", const="quick", dest="grid", help="subset grid")
    grid.add_argument("--full", action="store_const", const="full", dest="grid",
                      help="full grid: bf16 and fp16, two end-to-end ranks")
    grid.add_argument("--grid", choices=("smoke", "quick", "default", "full"),
                      help="grid by name (default: 'default' with CUDA, 'smoke' without)")
    ap.add_argument("--filter", "-k", metavar="EXPR", help="pytest -k expression on the case ids, e.g. "
                    "'fwd and r16 and not peft'")
    ap.add_argument("--suite", default=",".join(SUITES),
                    help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    ap.add_argument("--shard", metavar="I/N", help="run the I-th of N slices (comparison groups kept whole)")
    ap.add_argument("--dtypes", metavar="LIST", help="override the grid's dtypes, e.g. fp16 or bf16,fp16")
    ap.add_argument("--name", help="result file stem (default: <device>-<date>[-<grid>][-shardIofN])")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory for the JSON (default: bench/results)")
    ap.add_argument("--img", type=Path, help="plot directory (default: docs/img/bench for a complete GPU "
                    "default/full run or its shards, else bench/results/img/<stem>)")
    ap.add_argument("--no-plot", action="store_true", help="only run the benchmarks")
    ap.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shard and not re.fullmatch(r"\d+/\d+", args.shard):
        ap.error(f"--shard must look like 2/3; got {args.shard}")
    bad = set(args.suite.split(",")) - set(SUITES)
    if bad:
        ap.error(f"--suite must be a subset of {','.join(SUITES)}; got {','.join(sorted(bad))}")
    return args


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # triton is not imported here, so TRITON_INTERPRET can still take effect in the child

    cuda = torch.cuda.is_available()
    grid = args.grid or ("default" if cuda else "smoke")
    date = datetime.date.today().isoformat()
    if args.name:
        stem = args.name
    elif cuda:
        stem = f"{slug(torch.cuda.get_device_name())}-{date}" + ("" if grid == "default" else f"-{grid}")
        if args.dtypes:
            stem += f"-{slug(args.dtypes)}"
        if args.shard:
            i, n = args.shard.split("/")
            stem += f"-shard{i}of{n}"
    else:
        stem = f"cpu-smoke-{date}" + ("" if grid == "smoke" else f"-{grid}")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results.resolve() / f"{stem}.json"

    env = dict(os.environ, FASTLORA_BENCH_GRID=grid, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if args.dtypes:
        env["FASTLORA_BENCH_DTYPES"] = args.dtypes
    if args.shard:
        env["FASTLORA_BENCH_SHARD"] = args.shard
    if not cuda:
        env["TRITON_INTERPRET"] = "1"
        banner("NO CUDA DEVICE: running the CPU smoke grid under TRITON_INTERPRET=1. Its timings are CPU/"
               "interpreter figures that check the plumbing; they are NOT GPU results.")

    skips_file = Path(tempfile.mkstemp(prefix="fastlora-skips-", suffix=".json")[1])
    env["FASTLORA_BENCH_SKIPS"] = str(skips_file)
    files = [str(BENCH / f"bench_{s}.py") for s in args.suite.split(",")]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
           "-o", "python_files=bench_*.py", f"--benchmark-json={out}", "--benchmark-quiet",
           "--benchmark-sort=fullname"]
    if args.filter:
        cmd += ["-k", args.filter]
    cmd += args.pytest_args
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    elapsed = time.perf_counter() - t0
    print(f"\nbenchmarks: pytest exit code {rc}, {elapsed:.0f} s; results: {out}"
          if out.exists() else f"\nbenchmarks: pytest exit code {rc}, {elapsed:.0f} s; no JSON written", flush=True)

    if not args.no_plot and out.exists():
        sources = [out]
        if args.shard:  # the plots cover every shard of this run written so far
            sources = sorted(out.parent.glob(re.sub(r"shard\d+of", "shard*of", stem) + ".json"))
        complete_grid = cuda and grid in ("default", "full") and not args.filter and not args.dtypes
        img = args.img or (PUBLISHED_IMG if complete_grid and not args.name else RESULTS / "img" / stem)
        plot_cmd = [sys.executable, str(BENCH / "plot.py"), *map(str, sources), "--out", str(img)]
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no plots. Draw them elsewhere with\n  " + " ".join(plot_cmd))
        else:
            print("$ " + " ".join(plot_cmd), flush=True)
            rc = rc or subprocess.call(plot_cmd, cwd=ROOT)
    if not cuda:
        banner(f"CPU smoke run finished in {time.perf_counter() - t0:.0f} s. The numbers in {out.name} and its "
               "plots are CPU/interpreter figures, NOT GPU results; do not publish or commit them.")
    skips_rc = report_skips(skips_file)
    return rc or skips_rc


def report_skips(path: Path) -> int:
    """Print the skipped cells by competitor, last, with a banner when some were the headline competitor's (PEFT),
    a spent session budget and a form the installed PEFT does not have (``harness.NOT_APPLICABLE``) aside; 3 when
    PEFT was not installed (leave it out on purpose with --filter "not peft")."""
    try:
        skips = json.loads(path.read_text() or "[]")
    finally:
        path.unlink(missing_ok=True)
    lines = "\n".join(f"  {s['impl']}: {s['cells']} cells: {s['reason']}" for s in skips)
    headline = [s for s in skips if HEADLINE in s["impl"] and not s["budget_spent"] and not s.get("not_applicable")]
    absent = any(s["not_installed"] for s in headline)
    if headline:
        banner(f"{sum(s['cells'] for s in headline)} CELLS OF THE HEADLINE COMPETITOR (PEFT) WERE SKIPPED: "
               + ("it is not installed, so the comparisons this run is for are missing; exit code 3."
                  if absent else "their speedups are missing from this run.")
               + "\nSkipped cells by competitor:\n" + lines)
    elif skips:
        print("skipped cells by competitor:\n" + lines, flush=True)
    return 3 if absent else 0


def banner(text: str) -> None:
    print("\n" + "=" * 100 + "\n" + text + "\n" + "=" * 100, flush=True)


if __name__ == "__main__":
    sys.exit(main())
