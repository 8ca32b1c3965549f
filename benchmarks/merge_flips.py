"""Verdict flips of one data set measured in parts -> one table.

``cinemae-bench --perturb ... --reship ...`` over a few hundred photos with a tiled bundle takes
hours on a small CPU. Run it over disjoint parts of the data instead (``--data PART.csv`` each, in
turn: a part's ``bench.json`` is complete when written, so an interruption loses only the part
under way) and merge their records here. Only counts merge: per backend, perturbation and K, the
images that flipped (and hard flips, ai <-> real) for each class, plain and with the ensemble, and
the verdicts given (ai / real / uncertain). AUC and TPR need every score and are not recomputed;
read them in the parts.

The parts must be the same measurement: the same bundle (model, backbone, tiles, threshold, abstain
band), backend, perturbations and ensemble views; a record that differs is refused with what
differs. Parts that list their images (``accuracy_info.items``) must not share one; older records
that do not are merged with ``disjoint`` saying it was not checked.

    python -m cinemae.benchmarks.merge_flips runs/a/bench.json runs/b/bench.json \\
        --out merged.json --markdown merged.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAME = ("threshold", "abstain_band", "tiles", "reship", "reship_on", "perturbations")


class MergeError(ValueError):
    """The records are not parts of one measurement."""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (n > 0)."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _identity(rec: dict[str, Any]) -> dict[str, Any]:
    b = rec.get("bundle") or {}
    info = rec.get("accuracy_info") or {}
    return {"model_id": b.get("model_id"), "backbone": b.get("backbone"), "backend": info.get("backend"),
            **{k: info.get(k) for k in SAME}}


def _counts(block: dict[str, Any]) -> dict[str, Any]:
    """The summable part of a row's ``verdicts`` or ``ensemble`` block."""
    return {"ai": block["ai"], "real": block["real"], "uncertain": block["uncertain_n"],
            "flip": {c: {"n": block["flip"][c]["n"], "flipped": block["flip"][c]["flipped"],
                         "hard": block["flip"][c]["hard"]} for c in ("all", "real", "fake")}}


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"ai": a["ai"] + b["ai"], "real": a["real"] + b["real"], "uncertain": a["uncertain"] + b["uncertain"],
            "flip": {c: {k: a["flip"][c][k] + b["flip"][c][k] for k in ("n", "flipped", "hard")}
                     for c in ("all", "real", "fake")}}


def _rates(c: dict[str, Any]) -> dict[str, Any]:
    out = dict(c)
    n = c["ai"] + c["real"] + c["uncertain"]
    out["uncertain_share"] = c["uncertain"] / n if n else None
    for cls, f in c["flip"].items():
        if f["n"]:
            f = out["flip"][cls] = {**f, "rate": f["flipped"] / f["n"], "hard_rate": f["hard"] / f["n"]}
            f["rate_ci95"] = wilson(f["flipped"], f["n"])
            f["hard_rate_ci95"] = wilson(f["hard"], f["n"])
    return out


def merge(records: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """bench.json records of disjoint parts -> {"identity", "parts", "n_items", "disjoint", "rows"}.
    Raises MergeError when they are not parts of one measurement."""
    if not records:
        raise MergeError("nothing to merge")
    names = list(names or [f"part {i + 1}" for i in range(len(records))])
    ident = _identity(records[0])
    for nm, rec in zip(names[1:], records[1:], strict=True):
        other = _identity(rec)
        diff = sorted(k for k in ident if ident[k] != other[k])
        if diff:
            raise MergeError(f"{nm} is another measurement than {names[0]}: {', '.join(diff)} differ")
    seen: dict[str, str] = {}
    listed = all("items" in (r.get("accuracy_info") or {}) for r in records)
    if listed:
        for nm, rec in zip(names, records, strict=True):
            for it in rec["accuracy_info"]["items"]:
                if it in seen:
                    raise MergeError(f"{it} is in both {seen[it]} and {nm}: the parts must be disjoint")
                seen[it] = nm
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for nm, rec in zip(names, records, strict=True):
        keys = set()
        for a in rec.get("accuracy") or []:
            key = (a["backend"], a["perturbation"], int(a["k"]))
            keys.add(key)
            plain = _counts(a["verdicts"])
            ens = _counts(a["ensemble"]) if a.get("ensemble") else None
            if key not in rows:
                rows[key] = {"plain": plain, "ensemble": ens}
            else:
                rows[key]["plain"] = _add(rows[key]["plain"], plain)
                if (rows[key]["ensemble"] is None) != (ens is None):
                    raise MergeError(f"{nm}: {key} has an ensemble in some parts only")
                if ens is not None:
                    rows[key]["ensemble"] = _add(rows[key]["ensemble"], ens)
        if rows and keys != set(rows):
            raise MergeError(f"{nm} has other rows ({sorted(keys ^ set(rows))}) than the parts before it")
    return {"identity": ident, "parts": names,
            "n_items": sum((r.get("accuracy_info") or {}).get("n_items", 0) for r in records),
            "disjoint": "checked (every part lists its images)" if listed else
                        "not checked: a part does not list its images (made before bench.json did)",
            "rows": [{"backend": b, "perturbation": p, "k": k, "plain": _rates(v["plain"]),
                      "ensemble": _rates(v["ensemble"]) if v["ensemble"] else None}
                     for (b, p, k), v in rows.items()]}


def _cell(f: dict[str, Any], hard: bool = False) -> str:
    if not f["n"]:
        return "-"
    if hard:
        lo, hi = f["hard_rate_ci95"]
        return f"{f['hard']}/{f['n']} {100 * f['hard_rate']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"
    lo, hi = f["rate_ci95"]
    return f"{f['flipped']}/{f['n']} {100 * f['rate']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def markdown(m: dict[str, Any]) -> str:
    """The merged flips as a markdown table (counts, rates, 95% Wilson intervals)."""
    ident = m["identity"]
    lines = [f"# Verdict flips, merged from {len(m['parts'])} parts ({m['n_items']} images)", "",
             f"- model: {ident['model_id']}; backend {ident['backend']}; threshold {ident['threshold']}; "
             f"ensemble views {ident['reship']}",
             f"- parts: {', '.join(m['parts'])}; disjoint: {m['disjoint']}",
             "- flip = the verdict (ai / real / uncertain) differs from the clean image's; hard = ai <-> real; "
             "intervals: 95% Wilson. AUC and TPR are in the parts (scores do not merge).", "",
             "| backend | perturbation | K | flip all | flip real | flip fake | hard | ens flip all | ens flip real "
             "| ens flip fake | ens hard | ens uncertain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        p, e = r["plain"]["flip"], r["ensemble"]
        ens = ["-"] * 5 if e is None else [
            _cell(e["flip"]["all"]), _cell(e["flip"]["real"]), _cell(e["flip"]["fake"]),
            _cell(e["flip"]["all"], hard=True), f"{e['uncertain']}/{e['ai'] + e['real'] + e['uncertain']}"]
        lines.append(f"| {r['backend']} | {r['perturbation']} | {r['k']} | {_cell(p['all'])} | {_cell(p['real'])} | "
                     f"{_cell(p['fake'])} | {_cell(p['all'], hard=True)} | " + " | ".join(ens) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", help="bench.json of each part")
    ap.add_argument("--out", required=True, help="merged JSON")
    ap.add_argument("--markdown", default=None, help="merged table (markdown)")
    a = ap.parse_args(argv)
    try:
        recs = [json.loads(Path(p).read_text()) for p in a.records]
        m = merge(recs, a.records)
    except (OSError, ValueError, KeyError) as e:  # MergeError is a ValueError
        print(f"merge_flips: {e}", file=sys.stderr)
        return 2
    Path(a.out).write_text(json.dumps(m, indent=1) + "\n")
    md = markdown(m)
    if a.markdown:
        Path(a.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
