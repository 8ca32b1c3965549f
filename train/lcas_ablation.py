"""Does the LCAS add anything? K=2 against K=0 for a shipped tiled photo bundle, measured as it ships.

    python -m cinemae.train.lcas_ablation --backbone runs/photo32d12-backbone --bundle photo32 \
        --report benchmarks/results/photo32_report.json --reship-augment 4 --cache runs/crop-cache \
        --out benchmarks/results/photo32_lcas_ablation.json --markdown benchmarks/results/photo32_lcas_ablation.md

Two heads by the shipped recipe (per-crop BCE on 64 native crops of every training image of
photos-train minus the report's held-out sources, each also re-shipped ``--reship-augment`` times;
the epoch picked on the validation images; ``photo_tiles.fit_heads``, seed ``--seed``): K=2 (the
global feature and the three LCAS statistics) and K=0 (the global feature alone, the statistics
zero). Both then score the validation images, (a) and (b) **with the shipped bundle's tiling**
(its number of crops, border trim and max_side), and each gets the shipped threshold rule (5% FPR on
the validation reals, with ``val+heldout`` also on (a)'s reals). The report pairs K=2 with K=0 on
the same images (bootstrap intervals) and per generator and real source, beside the shipped head's own
scores from ``--report`` (the retrained K=2 differs from it only by the crop rows' last digits).

``--backbone`` is a bundle with the shipped encoder and decoder graphs whose head is untrained
(``build_default.export_stage`` of the shipped ``mae.pth``): its crop rows are the ones the
selection runs cache. Nothing is trained on ``../shared/data/photos``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .photo_tiles import (
    crop_features,
    evaluate,
    fake_labels,
    fit_heads,
    image_scores,
    markdown,
    read_labels,
    split_sources,
    tiled_copy,
)

log = logging.getLogger(__name__)


def same_graphs(a: Any, b: Any) -> bool:
    """True when two bundles' encoder and decoder graphs have the same sha256 (their manifests')."""
    fa, fb = a.manifest.get("files", {}), b.manifest.get("files", {})
    return all(fa.get(g) is not None and fa.get(g) == fb.get(g) for g in ("encoder.onnx", "decoder.onnx"))


def ablate(backbone: str, bundle: str, report: dict[str, Any], train_dir: Path, augment: int, seed: int,
           cache: Path | None, backend: str = "openvino", epochs: int = 30) -> dict[str, Any]:
    """The K=2 / K=0 report (``photo_tiles.run``'s form: per set, metrics, scores, paired intervals)."""
    from ..runtime.bundle import resolve_bundle
    from ..runtime.detector import Detector
    from ..runtime.evaluation import threshold_at_fpr
    from ..runtime.tiles import TileSpec
    from .calibrate import paired_comparison
    from .head import TrainConfig

    base, shipped = resolve_bundle(backbone), resolve_bundle(bundle)
    if not same_graphs(base, shipped):
        raise ValueError(f"{backbone} does not hold {bundle}'s encoder and decoder graphs")
    spec = TileSpec.from_manifest(shipped.manifest)
    calibrate = report.get("threshold_recalibrated", {}).get("calibrate", "val")
    train_rows, _, is_val = split_sources(read_labels(train_dir), tuple(report["heldout_sources"]), seed)
    val_rows = [r for r, v in zip(train_rows, is_val, strict=True) if v]
    sets = {"val": val_rows, "heldout": report["heldout"]["images"], "photos": report["photos"]["images"]}
    cfg = TrainConfig(epochs=epochs, batch=256, lr=1e-3, weight_decay=0.05, seed=seed, threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        t64 = tiled_copy(base.root, Path(tmp) / "t64", 64, spec.trim_borders, spec.max_side, spec.canonical_jpeg)
        with Detector(t64, backend=backend, device="cpu", provenance=False) as det:
            fs_train = crop_features(det, train_rows, augment, seed, cache)
        heads = fit_heads(fs_train, fake_labels(train_rows), is_val, (2, 0), cfg, "mean")
        tn = tiled_copy(base.root, Path(tmp) / "tn", spec.n, spec.trim_borders, spec.max_side, spec.canonical_jpeg)
        with Detector(tn, backend=backend, device="cpu", provenance=False) as det:
            feats = {name: crop_features(det, rows, 0, 0, cache) for name, rows in sets.items()}
    p = {k: {name: image_scores(heads[k][0].head, feats[name], len(rows), k) for name, rows in sets.items()}
         for k in (2, 0)}
    y_val, y_held = fake_labels(val_rows), fake_labels(sets["heldout"])
    thr = {}
    for k in (2, 0):
        reals = p[k]["val"][~y_val]
        if calibrate == "val+heldout":
            reals = np.concatenate([reals, p[k]["heldout"][~y_held]])
        thr[k] = float(threshold_at_fpr(reals, 0.05))
    out: dict[str, Any] = {
        "what": "K=2 against K=0, both by the shipped head recipe and scored with the shipped tiling",
        "bundle": bundle, "model_version": shipped.manifest.get("model_version"), "tiles": spec.n,
        "trim_borders": spec.trim_borders, "max_side": spec.max_side, "reship_augment": augment, "seed": seed,
        "heldout_sources": report["heldout_sources"], "threshold_rule": f"5% FPR on the reals of {calibrate}",
        "best_epoch": {f"k{k}": heads[k][0].best_epoch for k in (2, 0)}, "features": f"{backend} fp32"}
    for name in ("heldout", "photos"):
        rows = sets[name]
        y = fake_labels(rows).astype(int)
        prev = report[name]["scores"]["tiles_head_k2"]
        sc = {"shipped_k2": (np.asarray(prev["p"]), float(prev["threshold"])),
              "tiles_head_k2": (p[2][name], thr[2]), "tiles_head_k0": (p[0][name], thr[0])}
        r: dict[str, Any] = {m: evaluate(f"{name} {m}", rows, s, t) for m, (s, t) in sc.items()}
        r["images"] = rows
        r["scores"] = {m: {"p": [float(v) for v in s], "threshold": t} for m, (s, t) in sc.items()}
        r["paired_k2_vs_k0"] = paired_comparison(y, *sc["tiles_head_k0"], *sc["tiles_head_k2"])
        r["retrained_vs_shipped_max_abs_dp"] = float(np.max(np.abs(sc["tiles_head_k2"][0] - sc["shipped_k2"][0])))
        out[name] = r
        c = r["paired_k2_vs_k0"]
        log.info("%s: K=2 - K=0 AUC %+.4f (%+.4f..%+.4f); retrained K=2 vs shipped: max |dp| %.4f", name,
                 c["auc_diff"], *c["auc_diff_ci95"], r["retrained_vs_shipped_max_abs_dp"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", required=True, help="bundle with the shipped graphs and an untrained head")
    ap.add_argument("--bundle", default="photo32", help="the shipped tiled bundle (name or path)")
    ap.add_argument("--report", required=True, help="the shipped bundle's report (photo_tiles --retile)")
    ap.add_argument("--train-dir", default="../shared/data/photos-train")
    ap.add_argument("--reship-augment", type=int, default=0, metavar="N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = ablate(args.backbone, args.bundle, json.loads(Path(args.report).read_text()), Path(args.train_dir),
                 args.reship_augment, args.seed, Path(args.cache) if args.cache else None, args.backend, args.epochs)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    if args.markdown:
        head = (f"# {args.bundle} version {res['model_version']}: K=2 against K=0 (does the LCAS add anything?)\n\n"
                f"Both heads by the shipped recipe (seed {res['seed']}, {res['reship_augment']} re-shippings per "
                f"training image, best epochs K=2 {res['best_epoch']['k2']}, K=0 {res['best_epoch']['k0']}), "
                f"scored with the shipped tiling ({res['tiles']} crops), threshold {res['threshold_rule']}; "
                "`python -m cinemae.train.lcas_ablation` (train/RECIPE.md section 19). The shipped head's own "
                "scores are beside them.\n\n")
        Path(args.markdown).write_text(head + markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
