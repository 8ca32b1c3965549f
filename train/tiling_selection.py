"""Compare tilings of a backbone on the selection sets only, before any is measured on (b).

    python -m cinemae.train.tiling_selection --bundle runs/photo32-backbone \
        --configs '{"v2": {"max_side": 512}, "cj75": {"max_side": 512, "canonical_jpeg": 75}}' \
        --seeds 0 1 --cache runs/crop-cache --out selection.json

For each tiling (the keys of ``tiles``: ``max_side``, ``canonical_jpeg``, ``n``; borders trimmed
always; ``augment`` N: the head also trains on N seeded random re-shippings of every training image,
as ``photo_tiles --reship-augment``; ``blind`` k: the classifier cannot read the k directions along
which re-shipping moves the global feature, estimated on ``blind_views`` N (default 4) seeded random
re-shippings of the training images, :func:`photo_tiles.shift_directions`; ``balance`` alpha: each
training image weighs 1 / (images of its generator or real collection) ** alpha,
:func:`photo_tiles.group_weights`; ``lr`` and ``weight_decay``: the head's AdamW, default 1e-3 and
0.05) the training split of
photos-train (minus the held-out sources, :func:`photo_tiles.split_sources`) is cut into crops, a head
is trained by version 1's recipe (per-crop BCE, K=2) for each seed, and it is measured on the
validation images and on (a) the held-out sources, each as delivered and re-shipped the eight ways of the bench
(``runtime.reship.RESHIP_SET``): AUC, FPR / TPR at the head's own threshold (5% FPR on the
validation reals), and per re-shipping the share of images whose verdict flips; the same at
version 3's threshold rule (5% FPR on the validation and (a) reals together, ``at_val_heldout``),
and, free of any threshold, how far re-shipping moves the logits (:func:`logit_shift`); run it once
per backbone to compare backbones.
``../shared/data/photos`` is never read here.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.evaluation import auc
from .photo_tiles import (
    DEFAULT_HELDOUT,
    Features,
    crop_features,
    fake_labels,
    fit_heads,
    group_weights,
    image_scores,
    read_labels,
    split_sources,
    tiled_copy,
)

log = logging.getLogger(__name__)


def view_scores(head: Any, fs: Features, n: int) -> np.ndarray:
    """p [V, n]: each image's p from each view's crops (view 0 = as delivered), K=2."""
    return np.array([image_scores(head, fs, n, 2, v) for v in range(int(fs["view"].max()) + 1)])


def flip_summary(p: np.ndarray, y: np.ndarray, thr: float, names: list[str]) -> dict[str, Any]:
    """p [1 + len(names), n], y [n] 1 = fake -> AUC, FPR / TPR at ``thr`` as delivered, and per view
    the share of verdicts (the runtime's rule, no abstain band) that differ from the delivered one's
    (the bench's ``flip_rates``)."""
    from ..benchmarks.accuracy import flip_rates
    from ..runtime.reship import decide

    y = np.asarray(y).astype(int)
    verdicts = [[decide(float(x), thr, (thr, thr)) for x in row] for row in p]
    flips = {nm: flip_rates(verdicts[0], verdicts[v + 1], y)["all"]["rate"] for v, nm in enumerate(names)}
    return {"n": len(y), "auc": auc(y, p[0]), "fpr": float((p[0][y == 0] >= thr).mean()),
            "tpr": float((p[0][y == 1] >= thr).mean()), "flips": flips,
            "mean_flip": float(np.mean(list(flips.values()))), "max_flip": float(max(flips.values()))}


def logit_shift(p: np.ndarray, names: list[str]) -> dict[str, Any]:
    """p [1 + len(names), n] -> per re-shipping the median over images of |logit change| divided by
    the standard deviation of the delivered logits: how far re-delivery moves a verdict's evidence,
    as a share of what separates images, whatever the threshold (and its mean over re-shippings)."""
    lg = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1 - 1e-7))
    spread = float(np.std(lg[0]))
    per = {nm: float(np.median(np.abs(lg[v + 1] - lg[0])) / spread) for v, nm in enumerate(names)}
    return {"logit_spread": spread, "median_shift_over_spread": per, "mean": float(np.mean(list(per.values())))}


def select(bundle: str, train_dir: Path, configs: dict[str, dict[str, Any]], seeds: list[int],
           cache: Path | None, backend: str = "openvino", epochs: int = 30,
           precision: str = "fp32") -> dict[str, Any]:
    """{config/seed: {"val": flip_summary, "heldout": flip_summary, "threshold": float}}; the crop
    features from ``backend`` at ``precision`` (bf16: OpenVINO on AMX, about twice as fast here)."""
    from ..runtime.bundle import resolve_bundle
    from ..runtime.detector import Detector
    from ..runtime.evaluation import threshold_at_fpr
    from ..runtime.reship import RESHIP_SET
    from .head import TrainConfig

    base = resolve_bundle(bundle)
    train_rows, held, is_val = split_sources(read_labels(train_dir), DEFAULT_HELDOUT, 0)
    val_rows = [r for r, v in zip(train_rows, is_val, strict=True) if v]

    views = list(RESHIP_SET)
    out: dict[str, Any] = {}
    for name, c in configs.items():
        with tempfile.TemporaryDirectory() as tmp:
            tb = tiled_copy(base.root, Path(tmp) / "t", int(c.get("n", 64)), True, c.get("max_side"),
                            c.get("canonical_jpeg"))
            with Detector(tb, backend=backend, device="cpu", precision=precision, provenance=False) as det:
                blind_rows = (crop_features(det, train_rows, int(c.get("blind_views", 4)), 0, cache)
                              if c.get("blind") else None)
                fs = {"train": crop_features(det, train_rows, int(c.get("augment", 0)), 0, cache),
                      "val": crop_features(det, val_rows, views, 0, cache),
                      "heldout": crop_features(det, held, views, 0, cache)}
        weight = group_weights(train_rows, float(c["balance"])) if c.get("balance") else None
        for seed in seeds:
            cfg = TrainConfig(epochs=epochs, batch=256, lr=float(c.get("lr", 1e-3)),
                              weight_decay=float(c.get("weight_decay", 0.05)), seed=seed, threads=2)
            blind = (blind_rows, int(c["blind"])) if blind_rows is not None else None
            th, thr = fit_heads(fs["train"], fake_labels(train_rows), is_val, (2,), cfg, "mean", blind=blind,
                                image_weight=weight)[2]
            pv, ph = view_scores(th.head, fs["val"], len(val_rows)), view_scores(th.head, fs["heldout"], len(held))
            yv, yh = fake_labels(val_rows), fake_labels(held)
            thr_vh = threshold_at_fpr(np.concatenate([pv[0][~yv], ph[0][~yh]]), 0.05)
            r = {"config": c, "seed": seed, "threshold": float(thr), "features": f"{backend} {precision}",
                 "val": flip_summary(pv, yv, thr, views), "heldout": flip_summary(ph, yh, thr, views),
                 "at_val_heldout": {"threshold": float(thr_vh), "val": flip_summary(pv, yv, thr_vh, views),
                                    "heldout": flip_summary(ph, yh, thr_vh, views)},
                 "logit_shift": logit_shift(np.concatenate([pv, ph], axis=1), views)}
            out[f"{name}/seed{seed}"] = r
            log.info("%s seed %d: val AUC %.3f mean flip %.3f; (a) AUC %.3f mean flip %.3f; at version 3's "
                     "threshold rule %.3f / %.3f; logit shift / spread %.3f", name, seed,
                     r["val"]["auc"], r["val"]["mean_flip"], r["heldout"]["auc"], r["heldout"]["mean_flip"],
                     r["at_val_heldout"]["val"]["mean_flip"], r["at_val_heldout"]["heldout"]["mean_flip"],
                     r["logit_shift"]["mean"])
    return out


def seed_summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per config, over its seeds: the stage-1 reading (mean of the validation and (a) mean flips at
    version 3's threshold rule) as mean, sample sd, min and max, with the mean validation AUC, (a)
    AUC and logit shift. A head's flip varies by 0.6-0.7 points between seeds (train/RECIPE.md
    section 15), so a rule meant to separate candidates a point apart reads five or more seeds."""
    import statistics

    by: dict[str, list[dict[str, Any]]] = {}
    for key, r in results.items():
        by.setdefault(key.rsplit("/seed", 1)[0], []).append(r)
    out: dict[str, dict[str, float]] = {}
    for name, rows in by.items():
        flips = [(r["at_val_heldout"]["val"]["mean_flip"] + r["at_val_heldout"]["heldout"]["mean_flip"]) / 2
                 for r in rows]
        out[name] = {"seeds": len(rows), "flip_mean": statistics.mean(flips),
                     "flip_sd": statistics.stdev(flips) if len(flips) > 1 else float("nan"),
                     "flip_min": min(flips), "flip_max": max(flips),
                     "val_auc": statistics.mean(r["val"]["auc"] for r in rows),
                     "heldout_auc": statistics.mean(r["heldout"]["auc"] for r in rows),
                     "logit_shift": statistics.mean(r["logit_shift"]["mean"] for r in rows)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="the backbone bundle (its head is replaced per seed)")
    ap.add_argument("--train-dir", default="../shared/data/photos-train")
    ap.add_argument("--configs", required=True,
                    help='JSON {name: {"max_side": 512, "canonical_jpeg": 75, "n": 64, "augment": 4, "blind": 4, '
                         '"balance": 0.5}}')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--precision", default="fp32", help="of the crop features (bf16: OpenVINO, AMX)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = select(args.bundle, Path(args.train_dir), json.loads(args.configs), args.seeds,
                 Path(args.cache) if args.cache else None, args.backend, precision=args.precision)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for name, m in seed_summary(res).items():
        log.info("%s over %d seeds: flip at version 3's rule %.4f (sd %.4f, %.4f..%.4f); val AUC %.4f, "
                 "(a) AUC %.4f, logit shift / spread %.3f", name, m["seeds"], m["flip_mean"], m["flip_sd"],
                 m["flip_min"], m["flip_max"], m["val_auc"], m["heldout_auc"], m["logit_shift"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
