"""Draw the benchmark PNGs from the JSON that ``bench/run.py`` (pytest-benchmark) wrote.

    python bench/plot.py bench/results/<device>-<date>.json [more.json ...] --out docs/img/bench

Reads only ``extra_info`` (CUDA-event medians), never re-runs anything. Several files (e.g. shards of one
run) are merged; a case present twice keeps the later file's entry. Figures:

    layer-speedup-<mode>-<dtype>.png   speedup over PEFT vs tokens, a panel per (K, N) x r, a line per competitor
    layer-vs-linear-<mode>-<dtype>.png time / nn.Linear time vs tokens (1 = the cuBLAS floor)
    layer-memory-<dtype>.png           training: peak memory above the inputs vs tokens
    grouped-<dtype>.png                multi-adapter: time and ratio to nn.Linear vs number of adapters
    e2e-<dtype>.png                    Llama-shaped training step: tokens/s per competitor
    qlora-speedup-<mode>-<dtype>.png   QLoRA layer (4-bit base): speedup over PEFT's QLoRA, the issue's target dotted
    qlora-vs-linear-<mode>-<dtype>.png QLoRA layer: time / bf16 nn.Linear time on the dequantised W
    qlora-memory-<dtype>.png           QLoRA layer, training: peak memory above the inputs
    qlora-e2e-<dtype>.png              Llama-shaped QLoRA training step: tokens/s per competitor
    dora-e2e-<dtype>.png               Llama-shaped DoRA training step: tokens/s per competitor
    dora-speedup-<mode>-<dtype>.png    DoRA layer: speedup over PEFT DoRA, the issue's target dotted
    dora-vs-linear-<mode>-<dtype>.png  DoRA layer: time / nn.Linear time
    dora-vs-lora-<mode>-<dtype>.png    DoRA layer: time / fastlora LoRA's at the same rank (DoRA's extra cost)
    dora-memory-<dtype>.png            DoRA layer, training: peak memory above the inputs
    qdora-{speedup,vs-linear,vs-lora}-<mode>-<dtype>.png, qdora-memory-<dtype>.png: the same over a 4-bit base
    fp8-speedup-<mode>-<dtype>.png     FP8-base layer (e4m3, 128 x 128 block scales): speedup over the unfused dequant
    fp8-vs-linear-<mode>-<dtype>.png   FP8-base layer: time / nn.Linear time on the dequantised W
    fp8-vs-lora-<mode>-<dtype>.png     FP8-base layer: time / fastlora LoRA's on the dequantised W, the issue's target
    fp8-memory-<dtype>.png             FP8-base layer, training: peak memory above the inputs
    moe-<dtype>.png                    MoE experts block: time / the base experts' time (the issue's 1.15x fwd+bwd
                                       target dotted) and peak memory of one step, a panel per shape x mode
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

STYLE = {
    "linear": ("black", "o", "nn.Linear (no LoRA)"),
    "merged": ("grey", "s", "merged weights"),
    "peft": ("tab:orange", "^", "PEFT"),
    "reference": ("tab:brown", "v", "PyTorch reference"),
    "cublas": ("tab:purple", "D", "cuBLAS addmm + addmm_"),
    "fastlora": ("tab:blue", "*", "fastlora"),
    "fastlora-single": ("tab:cyan", "s", "fastlora, one adapter"),
    "fastlora-grouped": ("tab:blue", "*", "fastlora grouped"),
    "peft-mixed": ("tab:orange", "^", "PEFT mixed batch"),
    "loop": ("tab:brown", "v", "loop over adapters"),
    "qlora-peft": ("tab:orange", "^", "PEFT QLoRA"),
    "qlora-dequant": ("tab:purple", "D", "dequantise + addmm + addmm_"),
    "qlora-fastlora": ("tab:blue", "*", "fastlora.Linear4bit"),
    "fastlora-lora": ("tab:cyan", "s", "fastlora LoRA (same r)"),
    "peft-dora": ("tab:orange", "^", "PEFT DoRA"),
    "peft-dora-cached": ("tab:red", "<", "PEFT DoRA + DoraCaching"),
    "composed": ("tab:purple", "D", "factored norm + cuBLAS + addcmul"),
    "fastlora-dora": ("tab:blue", "*", "fastlora DoRA"),
    "fastlora-dora-cached": ("tab:cyan", ">", "fastlora DoRA + DoraCaching"),
    "qdora-peft": ("tab:orange", "^", "PEFT QDoRA"),
    "qdora-fastlora": ("tab:green", "*", "fastlora.Linear4bit DoRA"),
    "fp8-dequant": ("tab:purple", "D", "dequantise + addmm + addmm_"),
    "fp8-fastlora": ("tab:blue", "*", "fastlora FP8 (W8A16)"),
    "fp8-w8a8": ("tab:cyan", "P", "fastlora FP8 (W8A8 forward)"),
    "experts": ("black", "o", "transformers experts (no LoRA)"),
    "split": ("tab:purple", "D", "split LoRA (grouped_mm x 3)"),
    "peft-baddbmm": ("tab:red", "<", "PEFT target_parameters + baddbmm"),
}
# issue 43's target (H100, bf16): the experts block with LoRA, forward + backward, <= 1.15x the base experts alone.
MOE_TARGET = {"train": 1.15}
MOE_IMPLS = ("experts", "fastlora", "split", "peft", "peft-baddbmm")
MODE_TITLE = {"fwd": "forward (inference)", "train": "forward + backward, dropout 0",
              "train-drop0.1": "forward + backward, dropout 0.1"}


@dataclass(frozen=True)
class LayerSuite:
    """How one single-layer suite is drawn: file prefix, title, the PEFT competitor (speedup baseline) and the
    baseline when PEFT did not run, and target lines {(metric, mode or None): y} with their label."""

    prefix: str
    title: str
    peft: str
    fallback: str
    targets: dict = field(default_factory=dict)
    target_label: str = ""
    lora: str = "fastlora-lora"  # the 'vs-lora' baseline: fastlora LoRA at the same rank


DENSE = LayerSuite("layer", "LoRA linear", "peft", "reference")
# docs/benchmarks.md, QLoRA: issue 12's targets (H100, bf16 compute); the forward one applies from M = 1024 on.
QLORA = LayerSuite("qlora", "QLoRA linear (NF4 base, double quant, blocksize 64, fp32 adapters)", "qlora-peft",
                   "qlora-dequant", {("speedup", "train"): 1.5, ("vs-linear", "fwd"): 1.15}, "target (issue 12)")
# issue 23's DoRA targets (H100, bf16): training <= 1.10x fastlora LoRA and >= 2x PEFT DoRA, inference <= 1.03x LoRA.
DORA = LayerSuite("dora", "DoRA linear", "peft-dora", "composed",
                  {("speedup", "train"): 2.0, ("speedup", "train-drop0.1"): 2.0, ("vs-lora", "train"): 1.10,
                   ("vs-lora", "train-drop0.1"): 1.10, ("vs-lora", "fwd"): 1.03}, "target (issue 23)")
QDORA = LayerSuite("qdora", "QDoRA linear (NF4 base, double quant, blocksize 64, fp32 adapters)", "qdora-peft",
                   "linear", {("vs-lora", "train"): 1.10, ("vs-lora", "fwd"): 1.03}, "target (issue 23)",
                   lora="qlora-fastlora")
# issue 45's W8A16 target (H100, bf16): training <= 1.10x fastlora LoRA on the dequantised W.
FP8 = LayerSuite("fp8", "LoRA over an FP8 base (e4m3, 128x128 fp32 block scales, fp32 adapters)", "fp8-dequant",
                 "linear", {("vs-lora", "train"): 1.10}, "target (issue 45)")
# metric -> (the baseline implementation, its y label): time / baseline time (speedup: baseline / time, the PEFT one)
RELATIVE = {"vs-linear": ("linear", "time / nn.Linear time"), "vs-lora": (None, "time / fastlora LoRA time")}


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    cases: dict[str, dict] = {}
    meta: dict = {}
    for path in paths:
        data = json.loads(path.read_text())
        for b in data.get("benchmarks", []):
            info = b.get("extra_info") or {}
            if "median_ms" in info:
                cases[b["fullname"]] = info
                meta = {k: info.get(k) for k in ("device", "backend", "torch", "triton", "git_sha", "grid")}
    return list(cases.values()), meta


def caption(meta: dict) -> str:
    sha = meta.get("git_sha") or "?"
    sha = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    return (f"{meta.get('device')} | torch {meta.get('torch')} | triton {meta.get('triton')} | fastlora {sha} | "
            f"grid {meta.get('grid')} | CUDA-event medians" if meta.get("backend") == "cuda" else
            f"{meta.get('device')} | torch {meta.get('torch')} | triton {meta.get('triton')} | fastlora {sha}")


def finish(fig, meta: dict, title: str, path: Path) -> Path:
    width = fig.get_figwidth()
    chars = int(width * 9)
    title = "\n".join(textwrap.fill(line, chars) for line in title.splitlines())
    fig.suptitle(title, fontsize=11, y=0.995, va="top")
    fig.text(0.5, 0.005, textwrap.fill(caption(meta), int(width * 14)), ha="center", va="bottom", fontsize=7,
             color="dimgrey")
    if meta.get("backend") != "cuda":
        fig.text(0.5, 0.5, "CPU INTERPRETER SMOKE\nNOT GPU RESULTS", ha="center", va="center",
                 fontsize=4 * width, color="red", alpha=0.25, rotation=20, transform=fig.transFigure)
    top = 1 - (0.19 * (title.count("\n") + 1) + 0.08) / fig.get_figheight()
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _logy(ax):
    """Log y axis with plain tick labels (ratios and MiB read better as 0.5, 2, 30 than as 10^x)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _logx(ax):
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _line(ax, xs, ys, impl):
    color, marker, label = STYLE.get(impl, (None, ".", impl))
    ax.plot(xs, ys, color=color, marker=marker, label=label, linewidth=1.5, markersize=5)


def layer_panels(rows: list[dict], meta: dict, out: Path, metric: str, suite: LayerSuite = DENSE) -> list[Path]:
    """One figure per (mode, dtype); panels (K, N) x r; y from ``metric``: 'speedup' or a key of ``RELATIVE``."""
    written = []
    by_fig = defaultdict(list)
    for r in rows:
        by_fig[(r["mode"], r["dtype"])].append(r)
    for (mode, dtype), rs in sorted(by_fig.items()):
        ms = {(r["K"], r["N"], r["R"], r["M"], r["impl"]): r["median_ms"] for r in rs}
        base_impl = (RELATIVE[metric][0] or suite.lora) if metric in RELATIVE else (
            suite.peft if any(r["impl"] == suite.peft for r in rs) else suite.fallback)
        if not any(r["impl"] == base_impl for r in rs):
            continue
        shapes = sorted({(r["K"], r["N"]) for r in rs})
        ranks = sorted({r["R"] for r in rs})
        fig, axes = plt.subplots(len(shapes), len(ranks), figsize=(max(6.0, 4.2 * len(ranks)), 3.2 * len(shapes) + 0.8),
                                 squeeze=False, sharex=True)
        for i, (K, N) in enumerate(shapes):
            for j, R in enumerate(ranks):
                ax = axes[i][j]
                tokens = sorted({r["M"] for r in rs if (r["K"], r["N"], r["R"]) == (K, N, R)})
                for impl in STYLE:
                    if impl == base_impl:
                        continue
                    pts = [(M, ms[(K, N, R, M, base_impl)] / ms[(K, N, R, M, impl)] if metric == "speedup"
                            else ms[(K, N, R, M, impl)] / ms[(K, N, R, M, base_impl)])
                           for M in tokens if (K, N, R, M, impl) in ms and (K, N, R, M, base_impl) in ms]
                    if pts:
                        _line(ax, *zip(*pts, strict=True), impl)
                ax.axhline(1.0, color=STYLE[base_impl][0], linestyle="--", linewidth=1)
                target = suite.targets.get((metric, mode)) if base_impl != suite.fallback else None
                if target:
                    ax.axhline(target, color="tab:red", linestyle=":", linewidth=1.2, label=suite.target_label)
                _logx(ax)
                _logy(ax)
                ax.set_title(f"K={K} N={N} r={R}", fontsize=10)
                if j == 0:
                    ax.set_ylabel(f"speedup over {STYLE[base_impl][2]}" if metric == "speedup"
                                  else RELATIVE[metric][1])
                if i == len(shapes) - 1:
                    ax.set_xlabel("tokens M")
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        what = "speedup over " + STYLE[base_impl][2] if metric == "speedup" else \
            f"cost relative to {STYLE[base_impl][2]}"
        title = f"{suite.title}, {MODE_TITLE.get(mode, mode)}, {dtype}: {what}"
        written.append(finish(fig, meta, title, out / f"{suite.prefix}-{metric}-{mode}-{dtype}.png"))
    return written


def layer_memory(rows: list[dict], meta: dict, out: Path, suite: LayerSuite = DENSE) -> list[Path]:
    written = []
    rows = [r for r in rows if r["mode"] == "train" and r.get("extra_mem_bytes") is not None]
    for dtype in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dtype]
        shapes = sorted({(r["K"], r["N"]) for r in rs})
        ranks = sorted({r["R"] for r in rs})
        fig, axes = plt.subplots(len(shapes), len(ranks), figsize=(max(6.0, 4.2 * len(ranks)), 3.2 * len(shapes) + 0.8),
                                 squeeze=False, sharex=True)
        for i, (K, N) in enumerate(shapes):
            for j, R in enumerate(ranks):
                ax = axes[i][j]
                for impl in STYLE:
                    pts = sorted((r["M"], r["extra_mem_bytes"] / 2**20) for r in rs
                                 if (r["K"], r["N"], r["R"], r["impl"]) == (K, N, R, impl))
                    if pts:
                        _line(ax, *zip(*pts, strict=True), impl)
                _logx(ax)
                _logy(ax)
                ax.set_title(f"K={K} N={N} r={R}", fontsize=10)
                if j == 0:
                    ax.set_ylabel("peak MiB above inputs")
                if i == len(shapes) - 1:
                    ax.set_xlabel("tokens M")
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        title = f"{suite.title}, forward + backward (dropout 0), {dtype}: peak memory of one step"
        written.append(finish(fig, meta, title, out / f"{suite.prefix}-memory-{dtype}.png"))
    return written


def grouped(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    written = []
    for dtype in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dtype]
        tokens = sorted({r["M"] for r in rs})
        fig, axes = plt.subplots(2, len(tokens), figsize=(max(6.0, 4.2 * len(tokens)), 7.0), squeeze=False, sharex=True)
        for j, M in enumerate(tokens):
            linear = {r["G"]: r["median_ms"] for r in rs if r["M"] == M and r["impl"] == "linear"}
            for impl in STYLE:
                pts = sorted((r["G"], r["median_ms"]) for r in rs if r["M"] == M and r["impl"] == impl)
                if not pts:
                    continue
                _line(axes[0][j], *zip(*pts, strict=True), impl)
                ratio = [(G, t / linear[G]) for G, t in pts if G in linear]
                if ratio and impl != "linear":
                    _line(axes[1][j], *zip(*ratio, strict=True), impl)
            r0 = rs[0]
            axes[0][j].set_title(f"M={M} tokens (K={r0['K']} N={r0['N']} r={r0['R']})", fontsize=10)
            _logy(axes[0][j])
            axes[1][j].axhline(1.0, color="black", linestyle="--", linewidth=1)
            _logy(axes[1][j])
            axes[1][j].set_xlabel("adapters in the batch")
            for ax in axes[:, j]:
                _logx(ax)
                ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("median time per call (ms)")
        axes[1][0].set_ylabel("time / nn.Linear time")
        axes[0][0].legend(fontsize=8)
        title = f"Multi-adapter mixed batch, forward, {dtype}: ids uniformly random per token"
        written.append(finish(fig, meta, title, out / f"grouped-{dtype}.png"))
    return written


def e2e(rows: list[dict], meta: dict, out: Path, variant: str = "") -> list[Path]:
    """Training tokens/s per competitor and rank; ``variant``: "" (LoRA), "qlora" (4-bit bases) or "dora"."""
    qlora = variant == "qlora"
    written = []
    peft_impl = "qlora-peft" if qlora else "peft"
    for dtype in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dtype]
        ranks = sorted({r["R"] for r in rs})
        order = ("reference", "qlora-peft", "qlora-fastlora") if qlora else ("reference", "peft", "fastlora")
        impls = [i for i in order if any(r["impl"] == i for r in rs)]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 1.2 * len(ranks) * len(impls)), 4.5))
        width = 0.8 / max(len(impls), 1)
        for k, impl in enumerate(impls):
            for j, R in enumerate(ranks):
                hit = [r for r in rs if r["R"] == R and r["impl"] == impl]
                if not hit:
                    continue
                tps = hit[0]["tokens_per_s"]
                bar = ax.bar(j + k * width, tps, width, color=STYLE[impl][0], label=STYLE[impl][2] if j == 0 else None)
                peft = [r["tokens_per_s"] for r in rs if r["R"] == R and r["impl"] == peft_impl]
                if peft and impl != peft_impl:
                    ax.bar_label(bar, labels=[f"{tps / peft[0]:.2f}x"], fontsize=8)
        ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(ranks))], [f"r={R}" for R in ranks])
        ax.set_ylabel("training tokens / s")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        r0 = rs[0]
        m = r0["model"]
        base = ", 4-bit NF4 base linears (reference: dequantised weights)" if qlora else ""
        kind = {"qlora": "QLoRA ", "dora": "DoRA "}.get(variant, "")
        title = (f"Llama-shaped {kind}training step, {dtype}{base}: {m['layers']} layers, "
                 f"hidden {m['hidden_size']}, MLP {m['intermediate_size']}, batch {r0['batch']} x {r0['seq']} tokens\n"
                 f"(bar labels: speedup over {STYLE[peft_impl][2]})")
        written.append(finish(fig, meta, title, out / f"{variant + '-' if variant else ''}e2e-{dtype}.png"))
    return written


def moe(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """One figure per dtype: a column per (shape, mode, r, tokens); top, time / the base experts' time per competitor
    (bar labels: the time itself; the 1.15x target dotted in training); bottom, peak memory of one step."""
    written = []
    for dtype in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dtype]
        cols = sorted({(r["shape"], r["mode"], r["R"], r["T"]) for r in rs}, key=lambda c: (c[0], c[1] != "fwd", c))
        fig, axes = plt.subplots(2, len(cols), figsize=(max(6.0, 3.6 * len(cols)), 7.0), squeeze=False)
        for j, (shape, mode, R, T) in enumerate(cols):
            cell = {r["impl"]: r for r in rs if (r["shape"], r["mode"], r["R"], r["T"]) == (shape, mode, R, T)}
            impls = [i for i in MOE_IMPLS if i in cell]
            for ax, key in zip(axes[:, j], ("ratio_to_experts", "extra_mem_bytes"), strict=True):
                pts = [(k, i, cell[i].get(key)) for k, i in enumerate(impls) if cell[i].get(key) is not None]
                for k, impl, v in pts:
                    v = v / 2**20 if key == "extra_mem_bytes" else v
                    bar = ax.bar(k, v, color=STYLE[impl][0], label=STYLE[impl][2])
                    if key == "ratio_to_experts":
                        ax.bar_label(bar, labels=[f"{cell[impl]['median_ms']:.3g} ms"], fontsize=7)
                ax.set_xticks(range(len(impls)), impls, rotation=30, fontsize=8)
                ax.grid(True, axis="y", alpha=0.3)
            axes[0][j].axhline(1.0, color="black", linestyle="--", linewidth=1)
            if MOE_TARGET.get(mode):
                axes[0][j].axhline(MOE_TARGET[mode], color="tab:red", linestyle=":", linewidth=1.2,
                                   label="target (issue 43)")
            r0 = next(iter(cell.values()))
            axes[0][j].set_title(f"{shape} ({r0['E']} experts, H {r0['H']}, I {r0['I']}, top-{r0['top_k']})\n"
                                 f"{MODE_TITLE.get(mode, mode)}, r={R}, {T} tokens", fontsize=9)
        axes[0][0].set_ylabel("time / base experts time")
        axes[1][0].set_ylabel("peak MiB of one step above before")
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
        axes[0][0].legend(handles.values(), handles.keys(), fontsize=7)
        methods = {r.get("memory_method") for r in rs} - {None}
        title = (f"LoRA on MoE experts (gate_up_proj and down_proj, one adapter per expert), {dtype}\n"
                 f"memory: {'; '.join(sorted(methods))[:160]}")
        written.append(finish(fig, meta, title, out / f"moe-{dtype}.png"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draw the fastlora benchmark plots from pytest-benchmark JSON.")
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    args = ap.parse_args(argv)
    rows, meta = load(args.json)
    if not rows:
        print("plot: no benchmark entries with extra_info in " + ", ".join(map(str, args.json)))
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    suite = defaultdict(list)
    for r in rows:
        suite[r.get("suite")].append(r)
    written = []
    written += layer_panels(suite["layer"], meta, args.out, "speedup")
    written += layer_panels(suite["layer"], meta, args.out, "vs-linear")
    mem = layer_memory(suite["layer"], meta, args.out)
    if suite["layer"] and not mem:
        print("plot: no memory figure (no CUDA memory statistics in these results)")
    written += mem
    written += grouped(suite["grouped"], meta, args.out)
    written += e2e(suite["e2e"], meta, args.out)
    written += layer_panels(suite["qlora"], meta, args.out, "speedup", QLORA)
    written += layer_panels(suite["qlora"], meta, args.out, "vs-linear", QLORA)
    written += layer_memory(suite["qlora"], meta, args.out, QLORA)
    written += e2e(suite["qlora-e2e"], meta, args.out, "qlora")
    written += e2e(suite["dora-e2e"], meta, args.out, "dora")
    for metric in ("speedup", "vs-linear", "vs-lora"):
        written += layer_panels(suite["dora"], meta, args.out, metric, DORA)
    written += layer_memory(suite["dora"], meta, args.out, DORA)
    for metric in ("speedup", "vs-linear", "vs-lora"):
        written += layer_panels(suite["qdora"], meta, args.out, metric, QDORA)
    written += layer_memory(suite["qdora"], meta, args.out, QDORA)
    for metric in ("speedup", "vs-linear", "vs-lora"):
        written += layer_panels(suite["fp8"], meta, args.out, metric, FP8)
    written += layer_memory(suite["fp8"], meta, args.out, FP8)
    written += moe(suite["moe"], meta, args.out)
    for path in written:
        print(f"plot: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
