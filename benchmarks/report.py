"""Benchmark output: the stdout table, the markdown file, the JSON record and the PNG plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .sweep import PRE_STAGE, Row

STAGE_SHORT = {PRE_STAGE: "decode+prep", "global_encoder": "global enc", "masked_encoder": "masked enc",
               "decoder": "decoder", "lcas": "LCAS", "head": "head"}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _stage_text(r: Row) -> str:
    return " ".join(f"{STAGE_SHORT.get(n, n)} {v:.3g}" for n, v in r.stages_ms.items())


COLUMNS = ("backend", "prec", "K", "B", "p50 ms", "p95 ms", "img/s", "e2e img/s", "GFLOP/img",
           "TFLOP/s", "% peak", "peak RSS MB", "+RSS MB", "slowest stage", "|dlogit| vs torch")


def _cells(r: Row) -> list[str]:
    name = r.label
    if r.status != "ok":
        return [name, r.precision, _f(r.k, "d"), _f(r.batch, "d"), f"{r.status.upper()}: {r.error}"]
    mem = r.peak_rss_mb if r.device == "cpu" else r.gpu_mem_mb
    return [name, r.precision, str(r.k), str(r.batch), _f(r.p50_ms, ".2f"), _f(r.p95_ms, ".2f"),
            _f(r.img_per_s, ".2f"), _f(r.e2e_img_per_s, ".2f"), _f(r.gflops_per_img, ".3g"),
            _f(r.achieved_tflops, ".3f"), _f(r.pct_of_peak, ".1f"), _f(mem, ".0f"),
            _f(r.rss_growth_mb, ".0f"),
            f"{r.slowest_stage} ({r.stages_ms.get(r.slowest_stage or '', 0):.3g} ms/img)",
            _f(r.max_dlogit_vs_torch, ".1e")]


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table for the terminal (error rows span the measurement columns)."""
    body = [_cells(r) for r in rows]
    widths = [len(c) for c in COLUMNS]
    for cells in body:
        if len(cells) == len(COLUMNS):
            widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    def line(cells: list[str]) -> str:
        if len(cells) < len(COLUMNS):
            return "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)) + "  " + cells[-1]
        return "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                            strict=True)))
    out = [line(list(COLUMNS)), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in body]
    return "\n".join(out)


def format_stages(rows: Sequence[Row]) -> str:
    """Per-stage ms per image for every ok row."""
    lines = []
    for r in rows:
        if r.status == "ok":
            lines.append(f"{r.label:<32} K={r.k} B={r.batch:<3} {_stage_text(r)}")
    return "\n".join(lines)


def ratio_lines(rows: Sequence[Row]) -> list[str]:
    """Throughput of each runtime row over the torch eager fp32 row of the same cell and device."""
    out = []
    for r in rows:
        if r.status != "ok" or r.backend == "torch":
            continue
        t = next((x for x in rows if x.backend == "torch" and x.precision == "fp32" and x.status == "ok"
                  and x.k == r.k and x.batch == r.batch and x.device.split(":")[0] == r.device.split(":")[0]),
                 None)
        if t and t.img_per_s:
            extra = ""
            if r.min_ms and t.min_ms:
                extra += f"; best batch {t.min_ms / r.min_ms:.2f}x"
            if r.cpu_ms and t.cpu_ms:
                extra += f"; CPU time per batch {t.cpu_ms / r.cpu_ms:.2f}x"
            out.append(f"{r.label} vs torch eager fp32 ({t.device}), K={r.k} B={r.batch}: "
                       f"{r.img_per_s / t.img_per_s:.2f}x throughput at p50 "
                       f"({r.img_per_s:.3g} vs {t.img_per_s:.3g} img/s{extra})")
    return out


def format_accuracy(acc: Sequence[dict[str, Any]]) -> str:
    w = max([len(a.get("backend") or "") for a in acc] + [7])
    lines = [f"{'backend':<{w}} {'perturbation':<12} {'K':>2} {'acc':>6} {'AUC':>6} {'TPR@FPR':>8} {'n':>6}"]
    for a in acc:
        lines.append(f"{a.get('backend') or '-':<{w}} {a['perturbation']:<12} {a['k']:>2} "
                     f"{_f(a['accuracy'], '.4f'):>6} "
                     f"{_f(a['auc'], '.4f'):>6} {_f(a['tpr_at_fpr'], '.3f'):>8} "
                     f"{a['n_real'] + a['n_fake']:>6}")
    return "\n".join(lines)


def _flip_cell(f: dict[str, Any]) -> str:
    return f"{f['flipped']}/{f['n']} {_f(f['rate'] * 100 if f['n'] else float('nan'), '.1f')}%"


def format_flips(acc: Sequence[dict[str, Any]]) -> str:
    """Verdict flips against the clean images per (backend, perturbation, K): any change of
    ai / real / uncertain (count/n and %) for all, real and fake images, the ai <-> real flips, the
    share uncertain and the decided accuracy; with an ensemble, the same for its verdicts."""
    ens = any(a.get("ensemble") for a in acc)
    head = ["backend", "perturbation", "K", "flip all", "flip real", "flip fake", "ai<->real", "uncertain",
            "decided acc"]
    if ens:
        head += ["ens flip all", "ens flip real", "ens flip fake", "ens ai<->real", "ens uncertain", "ens decided acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in acc:
        v = a.get("verdicts") or {}
        if not v.get("flip"):
            continue
        f = v["flip"]
        cells = [a.get("backend") or "-", a["perturbation"], str(a["k"]), _flip_cell(f["all"]), _flip_cell(f["real"]),
                 _flip_cell(f["fake"]), f"{f['all']['hard']}/{f['all']['n']}", _f(v["uncertain"], ".3f"),
                 _f(v["decided_accuracy"], ".3f")]
        if ens:
            e = a.get("ensemble") or {}
            if e:
                g = e["flip"]
                cells += [_flip_cell(g["all"]), _flip_cell(g["real"]), _flip_cell(g["fake"]),
                          f"{g['all']['hard']}/{g['all']['n']}", _f(e["uncertain"], ".3f"),
                          _f(e["decided_accuracy"], ".3f")]
            else:
                cells += [""] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_reship_cost(cost: dict[str, Any]) -> str:
    """The re-shipping ensemble's cost rows (benchmarks/reship_cost.py) as markdown."""
    if cost.get("error"):
        return f"re-shipping ensemble cost: error: {cost['error']}"
    lines = [f"Re-shipping ensemble cost (views {', '.join(cost['views'])}; {cost['images']} images, "
             f"{cost['backend']}; {cost['protocol']}):", "",
             "| round | plain img/s | ensemble img/s | slowdown | plain CPU ms/img | ensemble CPU ms/img | CPU ratio |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(cost["rounds"], 1):
        lines.append(f"| {i} | {r['plain_img_s']} | {r['reship_img_s']} | {r['ratio']:.2f}x | {r['plain_cpu_ms']} | "
                     f"{r['reship_cpu_ms']} | {r['cpu_ratio']:.2f}x |")
    lines.append(f"| median | | | {cost['median_slowdown']:.2f}x | | | {cost['median_cpu_ratio']:.2f}x |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole result as a markdown document (environment, latency table, stages, accuracy)."""
    env = result["environment"]
    rows = [Row(**{k: v for k, v in r.items() if k != "label"}) for r in result["rows"]]
    md = [f"# cinemae-bench: {result['bundle']['model_id']} ({result['bundle']['origin']})", ""]
    md.append(f"- machine: {env['machine']}; CPU: {env['cpu']} ({env['cpu_count']} logical cores; "
              f"{' '.join(env.get('cpu_flags', []))})")
    if env.get("gpus"):
        md.append(f"- GPUs: {', '.join(env['gpus'])}")
    md.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()))
    md.append(f"- date: {result['created']}; command: `{result['command']}`")
    if env.get("cpu_nominal_peak"):
        md.append(f"- CPU nominal peak: {env['cpu_nominal_peak']['tflops']} TFLOP/s "
                  f"({env['cpu_nominal_peak']['source']})")
    for key, peak in result.get("peaks", {}).items():
        md.append(f"- peak {key}: {peak['tflops']} TFLOP/s ({peak['source']})")
    md.append(f"- decode+preprocess: {result['inputs']['decode_preprocess_ms']:.3f} ms/img "
              f"({result['inputs']['description']})")
    if result["bundle"].get("note"):
        md.append(f"- **{result['bundle']['note']}**")
    md.append(f"- protocol: {result['protocol']}")
    if env.get("loadavg_start"):
        md.append(f"- load average (1/5/15 min) at start {env['loadavg_start']}, at end {env.get('loadavg_end')}")
    if result.get("warning"):
        md.append(f"- **warning: {result['warning']}**")
    if result.get("interrupted"):
        md.append("- **interrupted: partial results**")
    md += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = _cells(r)
        if len(cells) < len(COLUMNS):
            cells = cells[:-1] + [cells[-1]] + [""] * (len(COLUMNS) - len(cells))
        md.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    ratios = ratio_lines(rows)
    if ratios:
        md += ["", "## Runtime vs torch reference (same run, same inputs)", ""] + [f"- {x}" for x in ratios]
    md += ["", "## Per-stage time (ms per image, median over timed batches)", "", "```", format_stages(rows), "```"]
    if result.get("accuracy"):
        md += ["", f"## Accuracy ({result['accuracy_info']['data']}, backend "
               f"{result['accuracy_info']['backend']})", "", "```", format_accuracy(result["accuracy"]), "```"]
        gens = [(a, g, v) for a in result["accuracy"] for g, v in a.get("per_generator", {}).items()
                if a["perturbation"] == "none"]
        if gens:
            md += ["", "| K | generator | n fake | AUC | TPR@FPR | detected |", "|---|---|---|---|---|---|"]
            for a, g, v in gens:
                md.append(f"| {a['k']} | {g} | {v['n_fake']} | {_f(v['auc'], '.3f')} | "
                          f"{_f(v['tpr_at_fpr'], '.3f')} | {_f(v['detected'], '.3f')} |")
        if any((a.get("verdicts") or {}).get("flip") for a in result["accuracy"]):
            info = result["accuracy_info"]
            md += ["", "## Verdict flips against the clean images", "",
                   f"Rule: {info.get('flip_rule', '')}; threshold {info.get('threshold')}, abstain band "
                   f"{info.get('abstain_band')}" + (f"; ensemble views {info['reship']}" if info.get("reship") else "")
                   + (f" on the {info['reship_on']}" if info.get("reship") and info.get("reship_on") else ""),
                   "", format_flips(result["accuracy"])]
    if result.get("reship_cost"):
        md += ["", "## " + format_reship_cost(result["reship_cost"])]
    return "\n".join(md) + "\n"


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    from ..runtime.atomic import atomic_write

    atomic_write(path, text)


def write_json(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(result, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> str | None:
    """Latency vs K per backend (one line per backend and batch) and, with accuracy, AUC vs K
    per perturbation. Returns None when written, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'cinemae[bench]'): PNG plot skipped"
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    acc = result.get("accuracy") or []
    ncols = 2 if acc else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["label"], r["batch"]), []).append((r["k"], r["p50_ms"] / r["batch"]))
    for (label, b), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label}, B={b}")
    ks = sorted({r["k"] for r in rows} | {a["k"] for a in acc})
    ax.set_xticks(ks)
    ax.set_xlabel("K (masking runs)")
    ax.set_ylabel("p50 latency per image (ms)")
    ax.set_yscale("log")
    ax.set_title(f"latency vs K - {result['bundle']['model_id']}")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    if acc:
        ax2 = axes[0][1]
        by: dict[str, list[tuple[int, float]]] = {}
        for a in acc:
            by.setdefault(a["perturbation"], []).append((a["k"], a["auc"]))
        for name, pts in by.items():
            pts.sort()
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax2.set_xticks(ks)
        ax2.set_xlabel("K (masking runs)")
        ax2.set_ylabel("ROC AUC")
        ax2.set_title("accuracy vs K")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    note = result["bundle"].get("note")
    if note:
        fig.suptitle(note, fontsize=9, color="firebrick")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return None
