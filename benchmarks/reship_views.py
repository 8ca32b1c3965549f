"""Which views should the re-shipping ensemble use? Score every candidate view of every
(re-shipped) image once, then evaluate every subset of at most ``--max-views`` candidates offline.

    python -m cinemae.benchmarks.reship_views --data ../shared/data/photos \\
        --out benchmarks/results/reship_views_cifake32_photos.json

For each subset and each re-shipping of ``--perturb`` (default: the ``reship`` set): the share of
images whose ensemble verdict changes between the clean and the re-shipped image (any change of
ai / real / uncertain, and ai <-> real), the share ``uncertain`` on the clean images and the
accuracy of the decided ones. The images are those the subsets are judged on: a subset picked here
is tuned to them (say so when quoting it). Backend: ONNX Runtime CPU fp32, the bundle's K, threshold
and abstain band; preprocessing as ``cinemae-bench --perturb`` (benchmarks.accuracy.prepare_groups).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from typing import Any

import numpy as np

CANDIDATES = ("jpeg:60", "jpeg:75", "jpeg:90", "shrink:0.5", "shrink:0.75", "crop:0.9", "crop:0.8", "crop:0.7",
              "letterbox:16x9", "letterbox:4x3", "upscale:2", "upscale:1.5")


def score_views(det: Any, items: list[Any], perturbations: list[Any], candidates: Any,
                log: Any = print) -> dict[str, tuple[list[str], list[int], list[list[str]]]]:
    """perturbation name -> (item names, labels, per item the verdicts [original, *candidates])."""
    from .accuracy import _verdicts, prepare_groups, view_logits

    bb = det.bundle.backbone
    out = {}
    for pert in perturbations:
        names: list[str] = []
        labels: list[int] = []
        verdicts: list[list[str]] = []
        for c in range(0, len(items), 16):
            p = prepare_groups(items[c:c + 16], pert, bb.img_size, det.bundle.crop_ratio, det.tiles, candidates)
            if not p.counts:
                continue
            lg = np.concatenate([det.run_arrays(p.rows[i:i + 64]).logit for i in range(0, len(p.rows), 64)])
            for v in view_logits(lg, p.counts, det.tiles):
                verdicts.append(_verdicts(np.asarray(v), det.threshold, det.abstain_band))
            names += p.names
            labels += p.labels.tolist()
        out[pert.name] = (names, labels, verdicts)
        log(f"  scored {pert.name}: {len(names)} images x {1 + len(candidates.views)} views")
    return out


def evaluate_subsets(scored: dict[str, tuple[list[str], list[int], list[list[str]]]], candidates: list[str],
                     max_views: int) -> list[dict[str, Any]]:
    """One record per subset (the empty one = no ensemble): flips per re-shipping, uncertain, accuracy."""
    from ..runtime.reship import ensemble_verdict
    from .accuracy import flip_rates, verdict_summary

    clean_names, clean_labels, clean_v = scored["none"]
    pos = {n: i for i, n in enumerate(clean_names)}
    out = []
    for r in range(0, max_views + 1):
        for sub in itertools.combinations(range(len(candidates)), r):
            def ens(v: list[str], sub: tuple[int, ...] = sub) -> str:
                return ensemble_verdict(v[0], [v[1 + i] for i in sub])

            base = [ens(v) for v in clean_v]
            rec: dict[str, Any] = {"views": [candidates[i] for i in sub],
                                   **verdict_summary(base, np.asarray(clean_labels)), "flips": {}}
            for name, (names, labels, vs) in scored.items():
                if name == "none":
                    continue
                both = [(pos[n], j) for j, n in enumerate(names) if n in pos]
                f = flip_rates([base[i] for i, _ in both], [ens(vs[j]) for _, j in both],
                               np.asarray([labels[j] for _, j in both]))
                rec["flips"][name] = {"rate": f["all"]["rate"], "hard_rate": f["all"]["hard_rate"],
                                      "flipped": f["all"]["flipped"], "hard": f["all"]["hard"], "n": f["all"]["n"]}
            rec["max_hard_rate"] = max(x["hard_rate"] for x in rec["flips"].values())
            rec["max_rate"] = max(x["rate"] for x in rec["flips"].values())
            out.append(rec)
    return out


def markdown_table(recs: list[dict[str, Any]], top: int = 20) -> str:
    """The single views and the ``top`` subsets with the fewest ai <-> real flips (ties: fewer uncertain)."""
    head = "| views | max ai<->real | max any change | " + " | ".join(
        f"{p} any/hard" for p in recs[0]["flips"]) + " | uncertain (clean) | decided acc |"
    lines = [head, "|" + "---|" * (5 + len(recs[0]["flips"]))]
    best = sorted(recs, key=lambda r: (r["max_hard_rate"], r["uncertain"], len(r["views"])))[:top]
    for r in [x for x in recs if len(x["views"]) <= 1] + best:
        cells = [",".join(r["views"]) or "(no ensemble)", f"{100 * r['max_hard_rate']:.1f}%",
                 f"{100 * r['max_rate']:.1f}%"]
        cells += [f"{x['flipped']}/{x['hard']}" for x in r["flips"].values()]
        cells += [f"{r['uncertain']:.3f}", f"{r['decided_accuracy']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cinemae.benchmarks.reship_views", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle (default: the embedded one)")
    ap.add_argument("--data", required=True, help="labelled set (as cinemae-bench --data)")
    ap.add_argument("--limit", type=int, default=200, help="images per class")
    ap.add_argument("--perturb", default="reship", help="re-shippings to judge the views by")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="candidate views")
    ap.add_argument("--max-views", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON file (a .md beside it holds the table)")
    args = ap.parse_args(argv)

    from pathlib import Path

    from ..runtime.detector import Detector
    from ..runtime.reship import ReshipEnsemble
    from .datasets import load_labeled
    from .perturb import parse_perturbations

    cands = ReshipEnsemble.parse(args.candidates)
    if cands is None:
        print("reship_views: give candidate views", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")  # the embedded model's domain warning
    items = load_labeled(args.data, args.limit)
    with Detector(args.bundle, backend="onnxruntime", device="cpu", provenance=False, threads=args.threads) as det:
        scored = score_views(det, items, parse_perturbations(args.perturb), cands,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        info = {"bundle": det.bundle.fingerprint(), "k": det.k, "threshold": det.threshold,
                "abstain_band": list(det.abstain_band), "tiles": None if det.tiles is None else det.tiles.to_manifest()}
    recs = evaluate_subsets(scored, cands.names, args.max_views)
    result = {"command": "python -m cinemae.benchmarks.reship_views " + " ".join(argv or sys.argv[1:]),
              "data": args.data, "n_images": len(scored["none"][0]), **info, "candidates": cands.names,
              "subsets": recs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    table = markdown_table(recs)
    Path(args.out).with_suffix(".md").write_text(
        f"# Candidate views of the re-shipping ensemble\n\n- command: `{result['command']}`\n"
        f"- bundle {info['bundle']['id']} (K={info['k']}, threshold {info['threshold']:.4f}, abstain band "
        f"{info['abstain_band']}), {result['n_images']} images of {args.data}, ONNX Runtime CPU fp32\n"
        "- cells per re-shipping: images whose ensemble verdict changed (any / ai<->real) out of "
        f"{result['n_images']}; the views were judged on these same images\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
