"""A photo head on native-resolution tiles of a small MAE backbone, evaluated leave-sources-out.

    python -m cinemae.train.photo_tiles --mae export/weights/photo32/mae.pth \
        --train-dir ../shared/data/photos-train --eval-dir ../shared/data/photos \
        --tiles 64 --trim-borders --reship-augment 4 --final-fit --report report.json [--out-bundle DIR]

Only the head is trained here (the backbone comes from ``pretrain_mae.py --images`` or a bundle),
on crop rows. Steps:

1. split photos-train by **source repository** (labels.csv's ``source``): the held-out sources'
   reals and generators are never seen by the evaluation head (``--heldout-sources``);
2. every image -> up to ``--tiles`` 32 x 32 crops at native resolution (a grid; uniform border bars
   cut first with ``--trim-borders``); one row per crop (pooled global feature [D], LCAS
   statistics [3] at K=2), labelled with its image's label; crops at native resolution are 32 px
   whatever the image's size, so the head cannot read the image size off its input (the
   README's shortcut: half the reals are small). With ``--reship-augment N`` every training image
   also gives the crops of N random re-shippings of itself (``train/reship_augment.py``: JPEG,
   resize, crop, letterbox), so the head learns verdicts that survive re-delivery;
3. a head on the training crops (K=2, and K=0 for the comparison), early-stopped on 15% of the
   training **images** (their crops and views together); an image's logit is the mean of its
   crops'; threshold = 5% FPR on the validation reals as delivered (image level);
4. on (a) the held-out sources and (b) ``--eval-dir`` (never trained on): AUC, TPR at 5% FPR,
   FPR of reals at each model's own threshold, per generator / real source, for the new head
   (K=2 and K=0), cifake32 (one resized view) and, with ``--compare``, a previous report's model;
   paired bootstrap (``train.calibrate.paired_comparison``) against each;
5. with ``--final-fit`` the shipped head is the same recipe refit on all of photos-train (held-out
   sources included): more generators for the model users get. It is measured on (b), which no
   head ever saw; its (a) numbers are the evaluation head's (a head cannot be tested on its own
   training data).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.evaluation import probabilities
from ..runtime.tiles import mean_logit_by_image

log = logging.getLogger(__name__)
DEFAULT_HELDOUT = ("Inf-imagine/Sentry", "declan-wright/Image-Dataset", "openai/dalle-2-preview",
                   "coodie/quant", "JingyunLiang/SwinIR", "CompVis/stable-diffusion")


def read_labels(root: Path) -> list[dict[str, str]]:
    """labels.csv rows with ``path`` made absolute and ``group`` = generator or source (photos has no generator)."""
    rows = []
    with open(root / "labels.csv", newline="") as f:
        for r in csv.DictReader(f):
            r["path"] = str(root / r["path"])
            r["group"] = r.get("generator") or r.get("source") or "?"
            rows.append(r)
    return rows


def fake_labels(rows: list[dict[str, str]]) -> np.ndarray:
    """[N] bool: True where the labels.csv row is a generated image."""
    return np.array([r["label"] == "fake" for r in rows])


def split_sources(rows: list[dict[str, str]], held: tuple[str, ...], seed: int
                  ) -> tuple[list[dict[str, str]], list[dict[str, str]], np.ndarray]:
    """photos-train rows -> (training rows, held-out rows, is_val [len(training rows)]): whole sources
    starting with ``held`` are held out; 15% of the rest (``default_rng(seed)``) validate."""
    train_rows = [r for r in rows if not r["source"].startswith(held)]
    test_rows = [r for r in rows if r["source"].startswith(held)]
    return train_rows, test_rows, np.random.default_rng(seed).random(len(train_rows)) < 0.15


def group_weights(rows: list[dict[str, str]], alpha: float) -> np.ndarray:
    """Per image [N]: 1 / n_g ** alpha, n_g the images of its ``generator`` (for reals, its
    collection) among ``rows``, rescaled so that each class's weights average 1 (each class keeps
    its share of the loss). alpha 0: all 1 (the unweighted recipe); 1: every generator, and every
    real collection, weighs the same in its class; 0.5 between. photos-train's training split is
    61% one source's SD 1.5 fine-tunes (120 of 197 fakes), which this counters."""
    counts = Counter(r["generator"] for r in rows)
    w = np.array([counts[r["generator"]] ** -float(alpha) for r in rows], np.float64)
    y = fake_labels(rows)
    for cls in (False, True):
        if (y == cls).any():
            w[y == cls] /= w[y == cls].mean()
    return w.astype(np.float32)


def tiled_copy(bundle_root: Path, out: Path, n: int, trim_borders: bool = False, max_side: int | None = None,
               canonical_jpeg: int | None = None) -> Path:
    """A copy of the bundle whose manifest asks for an n-crop native grid (uniform border bars cut
    first with ``trim_borders``; images over ``max_side`` shrunk to it; every picture re-encoded as
    JPEG at quality ``canonical_jpeg`` before it is cut)."""
    from ..runtime.tiles import TileSpec

    shutil.copytree(bundle_root, out)
    m = json.loads((out / "cinemae.json").read_text())
    m["tiles"] = TileSpec("grid", n, "native", 0, "mean_logit", trim_borders, max_side,
                          canonical_jpeg).to_manifest()
    (out / "cinemae.json").write_text(json.dumps(m, indent=2) + "\n")
    return out


Features = dict[str, np.ndarray]  # feature [R, D], stats [R, 3], logit [R], owner [R] (image), view [R] (0 = original)


def _cache_file(cache: Path, det: Any, rows: list[dict[str, str]], views: int | str, seed: int) -> Path:
    """Where :func:`crop_features` keeps one set's rows: keyed by the graphs, the tiles, the images and
    the views, so a changed backbone, tiling or augmentation never reads stale rows."""
    import hashlib

    from .features import bundle_key

    key = {"features": bundle_key(det.bundle, det.k),  # graphs, preprocessing, masks, tiles
           "head": det.bundle.manifest.get("files", {}).get("head.onnx"),  # the rows' logit column
           "paths": [r["path"] for r in rows], "views": views,
           "seed": seed if isinstance(views, int) and views else None}
    if det.backend.precision != "fp32":  # rows of a reduced precision are others' (fp32 keys predate the field)
        key["precision"] = det.backend.precision
    return cache / f"crops-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.npz"


def crop_features(det: Any, rows: list[dict[str, str]], views: int | Sequence[str] = 0, seed: int = 0,
                  cache: Path | None = None) -> Features:
    """Every image's crops and those of its views, scored by the bundle -> rows (see :data:`Features`).

    views: an int N draws N random re-shippings per image (:mod:`cinemae.train.reship_augment`,
    seeded by ``seed`` and the image's index); a sequence of re-shipping chains (``shrink:0.5+jpeg:75``)
    gives every image the same fixed views, in that order (view v = the v-th chain)."""
    from ..runtime.preprocess import load_image
    from ..runtime.tiles import tile_views
    from .reship_augment import apply_view, draw_views, parse_view

    fixed = None if isinstance(views, int) else [parse_view(c) for c in views]
    f = _cache_file(cache, det, rows, views if fixed is None else "|".join(views), seed) if cache else None
    if f is not None and f.exists():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    s = det.bundle.backbone.img_size
    for i, r in enumerate(rows):
        rgb = load_image(r["path"], det.max_pixels, det.max_bytes, det.formats)
        chains = fixed if fixed is not None else (draw_views(views, seed, i) if views else [])  # type: ignore[arg-type]
        parts = [tile_views(rgb, s, det.tiles, det.max_pixels)[0]]
        parts += [tile_views(apply_view(rgb, v, det.max_pixels), s, det.tiles, det.max_pixels)[0] for v in chains]
        res = det.run_arrays(np.concatenate(parts), want_feature=True)
        out["feature"].append(res.feature.astype(np.float32))
        out["stats"].append(res.stats.astype(np.float32))
        out["logit"].append(res.logit.astype(np.float64))
        out["owner"].append(np.full(sum(len(x) for x in parts), i))
        out["view"].append(np.repeat(np.arange(len(parts)), [len(x) for x in parts]))
        if (i + 1) % 50 == 0:
            log.info("  %d/%d images", i + 1, len(rows))
    feats = {k: np.concatenate(v) for k, v in out.items()}
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, **feats)
        tmp.replace(f)
    return feats


def shift_directions(fs: Features, keep: np.ndarray, g_mean: np.ndarray, g_std: np.ndarray, k: int) -> np.ndarray:
    """The k directions along which re-shipping moves the pooled global feature most -> U [k, D]
    (orthonormal rows), in the space standardised by ``g_mean`` / ``g_std`` [D].

    fs: crop rows with re-shipped views (view 0 = as delivered); keep: [N] bool, the images used
    (training images only). Each image and view v > 0 gives one shift, the mean over its crops of
    the standardised feature of view v minus that of view 0 (crops need not correspond: a crop or a
    half-size copy has other crops); U = the top right singular vectors of those shifts (uncentred:
    the mean shift is part of what re-shipping does)."""
    z = (fs["feature"].astype(np.float64) - g_mean) / g_std
    own, view = fs["owner"], fs["view"]
    n, views = len(keep), int(view.max()) + 1  # keep has one entry per image, with rows or not
    key = own * views + view
    cnt = np.bincount(key, minlength=n * views)
    mean = np.stack([np.bincount(key, weights=z[:, j], minlength=n * views) for j in range(z.shape[1])], 1)
    mean = (mean / np.maximum(cnt, 1)[:, None]).reshape(n, views, -1)
    ok = (cnt.reshape(n, views) > 0) & keep[:, None]
    shifts = (mean[:, 1:] - mean[:, :1])[ok[:, 1:] & ok[:, :1]]
    if not len(shifts):
        raise ValueError("no re-shipped views of the kept images to estimate shift directions from")
    return np.linalg.svd(shifts, full_matrices=False)[2][:k].astype(np.float32)


def fit_heads(fs: Features, labels: np.ndarray, is_val: np.ndarray, ks: tuple[int, ...], cfg: Any,
              pooling: str, consistency: float | None = None, bce: str = "image",
              blind: tuple[Features, int] | None = None, image_weight: np.ndarray | None = None
              ) -> dict[int, tuple[Any, float]]:
    """Heads on crop rows (every view of the non-validation images), early-stopped on the validation
    images' rows (their views too) -> {k: (trained head, threshold)}; threshold = 5% FPR on the
    validation reals as delivered (view 0), image logit = mean crop logit.

    consistency None: per-crop BCE (``train.head.train_head``, each crop labelled with its image's
    label); a number: the image-level loss of ``train.head.train_head_images`` (BCE of each
    delivered image's mean crop logit, plus that weight x the variance of an image's logits over
    its views). labels: [N] 1 = fake per image; is_val: [N] bool.

    blind (fs_views, k): per-crop BCE heads whose classifier cannot read the k directions along which
    re-shipping moves the global feature (:func:`shift_directions` on ``fs_views``, rows of the same
    images with re-shipped views, the validation images left out; ``train.head.blind_projector``).

    image_weight: [N] per image (:func:`group_weights`); every crop row of an image, in training and
    in the validation loss that picks the epoch, weighs its image's weight (per-crop BCE only)."""
    from ..runtime.evaluation import threshold_at_fpr
    from .head import head_logits, train_head, train_head_images

    g, s, own, view = fs["feature"], fs["stats"], fs["owner"], fs["view"]
    y = labels.astype(np.float32)
    tr, va = ~is_val[own], is_val[own]
    orig = va & (view == 0)
    val_ids, tr_ids = np.flatnonzero(is_val), np.flatnonzero(~is_val)
    val_index = np.searchsorted(val_ids, own[orig])
    u = None  # the same directions for every k: they depend on the training rows' g alone
    if blind is not None:
        if consistency is not None:
            raise ValueError("blind directions are for per-crop BCE heads (consistency None)")
        gm, gs = g[tr].mean(axis=0), np.maximum(g[tr].std(axis=0), 1e-6)  # the head's own standardisation
        u = shift_directions(blind[0], ~is_val, gm, gs, blind[1])
    if image_weight is not None and consistency is not None:
        raise ValueError("image weights are for per-crop BCE heads (consistency None)")
    rw = None if image_weight is None else np.asarray(image_weight, np.float32)[own]  # [R] each row's image's
    heads = {}
    for k in ks:
        sk = s if k else np.zeros_like(s)
        if consistency is None:
            th = train_head(g[tr], sk[tr], y[own][tr], g[va], sk[va], y[own][va], fusion="add", pooling=pooling,
                            k=k, cfg=cfg, blind=u, weight=None if rw is None else rw[tr],
                            val_weight=None if rw is None else rw[va])
        else:
            th = train_head_images(g[tr], sk[tr], np.searchsorted(tr_ids, own[tr]), view[tr], y[tr_ids],
                                   (g[va], sk[va], np.searchsorted(val_ids, own[va]), view[va], y[val_ids]),
                                   fusion="add", pooling=pooling, k=k, cfg=cfg, consistency=consistency, bce=bce)
        lv = mean_logit_by_image(head_logits(th.head, g[orig], sk[orig]), val_index, int(is_val.sum()))
        heads[k] = (th, threshold_at_fpr(probabilities(lv)[labels[is_val] == 0], 0.05))
    return heads


def image_scores(head: Any, fs: Features, n: int, k: int, view: int = 0) -> np.ndarray:
    """p per image from the crops of one view (0 = as delivered, v = the v-th re-shipping):
    sigmoid of the mean crop logit. [n]"""
    from .head import head_logits

    o = fs["view"] == view
    sk = fs["stats"][o] if k else np.zeros_like(fs["stats"][o])
    return probabilities(mean_logit_by_image(head_logits(head, fs["feature"][o], sk), fs["owner"][o], n))


def _images(fs: Features, keep: np.ndarray) -> Features:
    """The rows of the images with ``keep`` [N] true, their owners renumbered 0..kept-1 in order."""
    rows = keep[fs["owner"]]
    sub = {k: v[rows] for k, v in fs.items()}
    sub["owner"] = np.searchsorted(np.flatnonzero(keep), sub["owner"])
    return sub


def _concat(a: Features, b: Features, offset: int) -> Features:
    return {k: np.concatenate([a[k], b[k] + offset if k == "owner" else b[k]]) for k in a}


def source_folds(sources: list[str], n_folds: int) -> np.ndarray:
    """[N] fold of each image: whole sources per fold, largest first onto the emptiest fold."""
    sizes: dict[str, int] = defaultdict(int)
    for src in sources:
        sizes[src] += 1
    load = np.zeros(n_folds, int)
    fold_of = {}
    for src, c in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        f = int(np.argmin(load))
        fold_of[src] = f
        load[f] += c
    return np.array([fold_of[src] for src in sources])


def oof_scores(fs: Features, labels: np.ndarray, folds: np.ndarray, cfg: Any, pooling: str,
               consistency: float | None, seed: int) -> np.ndarray:
    """Out-of-fold p [N] of every image as delivered: for each fold, the recipe of :func:`fit_heads`
    (K=2) trained on the other folds scores this fold's images, which it never saw."""
    p = np.zeros(len(labels))
    for f in np.unique(folds):
        keep = folds != f
        idx = np.flatnonzero(keep)
        is_val = np.random.default_rng([seed, int(f)]).random(len(idx)) < 0.15
        th, _ = fit_heads(_images(fs, keep), labels[idx], is_val, (2,), cfg, pooling, consistency)[2]
        p[~keep] = image_scores(th.head, _images(fs, ~keep), int((~keep).sum()), 2)
    return p



def per_group(rows: list[dict[str, str]], p: np.ndarray, thr: float) -> dict[str, Any]:
    """Per generator (fakes, each against every real of the set) and per real source."""
    from ..runtime.evaluation import auc

    y = fake_labels(rows)
    out: dict[str, Any] = {}
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r["label"], r["group"])].append(i)
    for (lab, g), idx in sorted(groups.items()):
        idx = np.array(idx)
        hit = float((p[idx] >= thr).mean())
        if lab == "fake":
            sel = np.concatenate([np.flatnonzero(~y), idx])
            out[f"fake:{g}"] = {"n": len(idx), "tpr": hit, "auc_vs_all_reals": auc(y[sel], p[sel])}
        else:
            out[f"real:{g}"] = {"n": len(idx), "fpr": hit}
    return out


def evaluate(name: str, rows: list[dict[str, str]], p: np.ndarray, thr: float) -> dict[str, Any]:
    from .calibrate import metrics

    y = fake_labels(rows).astype(int)
    m = metrics(y, p, thr)
    log.info("%s: n=%d AUC %.4f TPR@5%%FPR %.4f FPR(real)@thr %.4f TPR@thr %.4f", name, m["n"], m["auc"],
             m["tpr_at_5pct_fpr"], m["at_threshold"]["fpr"], m["at_threshold"]["tpr"])
    return {"metrics": m, "per_group": per_group(rows, p, thr)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..runtime.bundle import resolve_bundle
    from ..runtime.detector import Detector
    from .calibrate import paired_comparison
    from .head import TrainConfig, write_head

    if args.mae:  # a pretraining run's weights: export them first (an untrained head; only the backbone is used)
        from .build_default import export_stage

        work = Path(args.work or Path(args.mae).parent / "bundle")
        base = resolve_bundle(export_stage(Path(args.mae), work, pooling="mean", k=2, model_id=args.model_id))
    else:
        base = resolve_bundle(args.bundle)
    # the CIFAKE model by name: every new head is compared with it (the default bundle is a photo
    # model since photo32 shipped; --compare pairs with that one)
    default = resolve_bundle("cifake32")
    same_backbone = base.root.resolve() == default.root.resolve()
    rows = read_labels(Path(args.train_dir))
    held = tuple(args.heldout_sources)
    train_rows, test_rows, is_val = split_sources(rows, held, args.seed)
    eval_rows = read_labels(Path(args.eval_dir))
    report: dict[str, Any] = {"heldout_sources": list(held), "tiles": args.tiles,
                              "trim_borders": bool(args.trim_borders), "max_side": args.max_side,
                              "canonical_jpeg": args.canonical_jpeg, "model_version": args.model_version or "1",
                              "reship_augment": args.reship_augment,
                              "consistency": args.consistency, "balance": args.balance,
                              "n_train_images": int((~is_val).sum()), "n_val_images": int(is_val.sum()),
                              "n_heldout": len(test_rows), "n_eval": len(eval_rows)}
    cache = Path(args.cache) if args.cache else None
    pooling = base.manifest.get("head", {}).get("pooling", "mean")
    with tempfile.TemporaryDirectory() as tmp:
        tb = tiled_copy(base.root, Path(tmp) / "tiled", args.tiles, args.trim_borders, args.max_side,
                        args.canonical_jpeg)
        det = Detector(tb, backend=args.backend, device="cpu", provenance=False)
        plain = Detector(default, backend="onnxruntime", device="cpu", provenance=False)
        sets = {"train": train_rows, "heldout": test_rows, "photos": eval_rows}
        views = {"train": args.reship_augment, "heldout": args.reship_augment if args.final_fit else 0, "photos": 0}
        feats = {k: crop_features(det, v, views[k], args.seed, cache) for k, v in sets.items()}
        for k, v in feats.items():
            log.info("%s: %d images -> %d crop rows (%d views each)", k, len(sets[k]), len(v["owner"]), views[k])
        y_train = fake_labels(train_rows)
        cfg = TrainConfig(epochs=args.epochs, batch=256, lr=1e-3, weight_decay=0.05, seed=args.seed, threads=2)
        weight = group_weights(train_rows, args.balance) if args.balance else None
        heads = fit_heads(feats["train"], y_train, is_val, (2, 0), cfg, pooling, args.consistency,
                          image_weight=weight)
        final = None
        if args.final_fit:  # the shipped head: the same recipe on every source of photos-train
            all_rows = train_rows + test_rows
            is_val_all = np.random.default_rng(args.seed + 1).random(len(all_rows)) < 0.15
            fs_all = _concat(feats["train"], feats["heldout"], len(train_rows))
            y_all = fake_labels(all_rows)
            final = fit_heads(fs_all, y_all, is_val_all, (2,), cfg, pooling, args.consistency,
                              image_weight=group_weights(all_rows, args.balance) if args.balance else None)[2]
            report["final_fit"] = {"n_train_images": int((~is_val_all).sum()), "n_val_images": int(is_val_all.sum()),
                                   "threshold_val": float(final[1])}
            if args.oof_folds:  # threshold: every real of photos-train, scored by heads that never saw its source
                from ..runtime.evaluation import auc, threshold_at_fpr

                folds = source_folds([r["source"] for r in all_rows], args.oof_folds)
                p_oof = oof_scores(fs_all, y_all.astype(int), folds, cfg, pooling, args.consistency, args.seed)
                thr = threshold_at_fpr(p_oof[~y_all], 0.05)
                final = (final[0], thr)
                report["final_fit"]["threshold_rule"] = (
                    f"5% FPR on the out-of-fold p of all {int((~y_all).sum())} reals of photos-train "
                    f"({args.oof_folds} folds of whole sources: each real scored by a head that never saw its source)")
                report["final_fit"]["threshold"] = float(thr)
                report["final_fit"]["oof_auc_leave_sources_out"] = float(auc(y_all.astype(int), p_oof))
                log.info("final head threshold %.4f from %d out-of-fold reals (val-split threshold %.4f); "
                         "out-of-fold AUC (leave sources out) %.4f", thr, int((~y_all).sum()),
                         report["final_fit"]["threshold_val"], report["final_fit"]["oof_auc_leave_sources_out"])
        previous = json.loads(Path(args.compare).read_text()) if args.compare else None
        for name in ("heldout", "photos"):
            fs = feats[name]
            n = len(sets[name])
            sc = {"cifake32": (np.array([r.score for r in plain.detect_many([x["path"] for x in sets[name]])]),
                               plain.threshold)}
            if same_backbone:  # the shipped head on the same tiles (a new backbone has no trained head)
                o = fs["view"] == 0
                lg = mean_logit_by_image(fs["logit"][o], fs["owner"][o], n)
                sc["cifake32_tiles"] = (probabilities(lg), base.threshold)
            for k, (th, thr) in heads.items():
                sc[f"tiles_head_k{k}"] = (image_scores(th.head, fs, n, k), thr)
            if final is not None and name == "photos":  # the held-out sources are in the final fit's training data
                sc["final_k2"] = (image_scores(final[0].head, fs, n, 2), final[1])
            y = fake_labels(sets[name]).astype(int)
            report[name] = {m: evaluate(f"{name} {m}", sets[name], p, t) for m, (p, t) in sc.items()}
            # per-image scores, so later comparisons (another backbone, another head) can be paired
            report[name]["images"] = [{"path": r["path"], "label": r["label"], "group": r["group"]} for r in sets[name]]
            report[name]["scores"] = {m: {"p": [float(v) for v in p], "threshold": float(t)}
                                      for m, (p, t) in sc.items()}
            report[name]["paired_vs_cifake32"] = {
                m: paired_comparison(y, *sc["cifake32"], p, t, seed=args.seed) for m, (p, t) in sc.items()
                if m != "cifake32"}
            # what the LCAS statistics add: the K=2 head against the K=0 head (global feature only), paired
            report[name]["paired_k2_vs_k0"] = paired_comparison(y, *sc["tiles_head_k0"], *sc["tiles_head_k2"],
                                                                 seed=args.seed)
            if previous is not None:  # a previous report's model on the same images (paired: same order required)
                prev = previous.get(name, {})
                if [r["path"] for r in prev.get("images", [])] == [r["path"] for r in sets[name]]:
                    pp = prev["scores"]["tiles_head_k2"]
                    sc_prev = (np.asarray(pp["p"]), float(pp["threshold"]))
                    report[name]["previous"] = {"report": str(args.compare), "metrics": evaluate(
                        f"{name} previous", sets[name], *sc_prev)["metrics"]}
                    report[name]["scores"]["previous"] = {"p": [float(v) for v in sc_prev[0]],
                                                          "threshold": sc_prev[1]}
                    report[name]["paired_vs_previous"] = {
                        m: paired_comparison(y, *sc_prev, p, t, seed=args.seed) for m, (p, t) in sc.items()
                        if m.startswith(("tiles_head_k2", "final"))}
            for m, c in [*report[name]["paired_vs_cifake32"].items(),
                         ("k2 vs k0 (not cifake32)", report[name]["paired_k2_vs_k0"])]:
                log.info("%s %s - cifake32: AUC %+.4f (95%% CI %+.4f..%+.4f), accuracy %+.4f (CI %+.4f..%+.4f)",
                         name, m, c["auc_diff"], *c["auc_diff_ci95"], c["accuracy_diff"], *c["accuracy_diff_ci95"])
        det.close()
        plain.close()
        shipped = "final_k2" if final is not None else "tiles_head_k2"
        report["shipped_model"] = shipped
        c = report["photos"]["paired_vs_cifake32"][shipped]
        report["ship"] = bool(c["auc_diff_ci95"][0] > 0)
        log.info("ship %s as the default: %s (AUC difference on photos vs cifake32 %+.4f, CI %s)",
                 shipped, report["ship"], c["auc_diff"], c["auc_diff_ci95"])
        if args.report:  # first: a failure while writing the bundle must not lose the measurements
            Path(args.report).write_text(json.dumps(report, indent=1, default=float) + "\n")
        if args.out_bundle:
            th, thr = final if final is not None else heads[2]
            decision = {"threshold": thr, "abstain_band": [thr, thr], "calibration": {
                "rule": "threshold = smallest p with <= 5% false positives on the real validation images "
                        "(mean crop logit per image)"}}
            what = args.what or (f"{base.manifest.get('model_id', base.root.name)} MAE + head on "
                                 f"native {base.backbone.img_size}-px crops")
            training = {"k": 2, "what": what,
                        "data": {"train_dir": "all of photos-train (the held-out sources were held out only "
                                              "for the evaluation head)" if final is not None else
                                              "photos-train minus held-out sources",
                                 **{k: ({m: v for m, v in r.items() if m not in ("images", "scores")}
                                        if isinstance(r, dict) else r) for k, r in report.items()}},
                        "epochs": args.epochs, "seed": args.seed}
            training = json.loads(json.dumps(training, default=float))  # numpy scalars -> JSON numbers
            write_head(tb, th.head, decision, training, out=args.out_bundle,
                       extra_manifest={"tiles": json.loads((tb / "cinemae.json").read_text())["tiles"]})
    return report


SETS = {"heldout": "(a) photos-train, held-out sources (their reals and generators never seen in training)",
        "photos": "(b) ../shared/data/photos (never trained on)"}
MODELS = {"cifake32": "cifake32 (one 32-px view)", "previous": "the photo32 shipped before",
          "tiles_head_k2": "new, K=2", "tiles_head_k0": "new, K=0 (no LCAS)",
          "final_k2": "new, K=2, refit on all of photos-train (shipped)",
          "cifake32_tiles": "cifake32 head on the tiles", "shipped_k2": "the shipped head (K=2)"}


def group_table(images: list[dict[str, str]], scores: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows per generator (AUC against every real of the set, TPR at 5% FPR, TPR at the
    model's own threshold) and per real source (FPR at the model's threshold), one column group per model."""
    from ..runtime.evaluation import auc, threshold_at_fpr

    models = [m for m in MODELS if m in scores]
    y = fake_labels(images)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(images):
        groups[(r["label"], r["group"])].append(i)
    head = "| group | n | " + " | ".join(f"{MODELS[m]}: AUC / TPR@5%FPR / at thr" for m in models) + " |"
    out = [head, "|" + "---|" * (2 + len(models))]
    cells: dict[str, list[str]] = {}
    for m in models:
        p, thr = np.asarray(scores[m]["p"]), float(scores[m]["threshold"])
        t5 = threshold_at_fpr(p[~y], 0.05)
        for (lab, g), idx in sorted(groups.items(), key=lambda kv: (kv[0][0] != "fake", kv[0][1])):
            idx = np.asarray(idx)
            if lab == "fake":
                sel = np.concatenate([np.flatnonzero(~y), idx])
                c = f"{auc(y[sel], p[sel]):.3f} / {(p[idx] >= t5).mean():.2f} / {(p[idx] >= thr).mean():.2f}"
            else:
                c = f"FPR at thr {(p[idx] >= thr).mean():.2f}"
            cells.setdefault(f"{lab}: {g} | {len(idx)}", []).append(c)
    out += [f"| {k} | " + " | ".join(v) + " |" for k, v in cells.items()]
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as the tables the issue asks for: per set, each model's metrics and the paired
    comparisons, then per generator and per real source."""
    lines = []
    for name, title in SETS.items():
        r = report.get(name)
        if not r:
            continue
        lines += [f"### {title}", "", "| model | n | AUC | TPR@5%FPR | threshold | FPR of reals at it | TPR at it |",
                  "|---|---|---|---|---|---|---|"]
        for m in MODELS:
            if m in r:
                mm = r[m]["metrics"]
                a = mm["at_threshold"]
                lines.append(f"| {MODELS[m]} | {mm['n']} | {mm['auc']:.4f} | {mm['tpr_at_5pct_fpr']:.3f} | "
                             f"{a['threshold']:.4f} | {a['fpr']:.3f} | {a['tpr']:.3f} |")
        lines += ["", "Paired bootstrap (images resampled, 2000 times), difference b - a with 95% interval:", ""]
        comps = [(f"{MODELS[m]} - cifake32", c) for m, c in r.get("paired_vs_cifake32", {}).items()]
        comps += [(f"{MODELS[m]} - {MODELS['previous']}", c) for m, c in r.get("paired_vs_previous", {}).items()]
        if "paired_k2_vs_k0" in r:
            comps.append(("new K=2 - new K=0", r["paired_k2_vs_k0"]))
        for label, c in comps:
            lo, hi = c["auc_diff_ci95"]
            lines.append(f"- {label}: AUC {c['auc_diff']:+.4f} ({lo:+.4f}..{hi:+.4f}), "
                         f"accuracy at own threshold {c['accuracy_diff']:+.4f} "
                         f"({c['accuracy_diff_ci95'][0]:+.4f}..{c['accuracy_diff_ci95'][1]:+.4f})")
        if "scores" in r:
            lines += ["", "Per generator (fakes, each against every real of the set) and per real source:", ""]
            lines += group_table(r["images"], r["scores"])
        lines.append("")
    return "\n".join(lines)


def tiling_words(tiles: dict[str, Any]) -> str:
    """What a manifest's ``tiles`` entry does before the grid, in words for the description."""
    return ((", uniform border bars cut first" if tiles.get("trim_borders") else "")
            + (f", images over {tiles['max_side']} px shrunk to it" if tiles.get("max_side") else "")
            + (f", every picture re-encoded once as JPEG quality {tiles['canonical_jpeg']} so that the model always "
               "sees the same last compression" if tiles.get("canonical_jpeg") else ""))


PHOTO_DESCRIPTION = (
    "Photo model: the small MAE of cifake32{shape} "
    "pretrained further on native-resolution 32-px crops of real photographs (photos-train, sources held out "
    "of the evaluation excluded){pretrain}, with a CINEMAE head (K=2) trained on crops of real photos and of images "
    "from several generators ({trained_on}){augment}. Every image is scored as up to {n} 32-px crops taken at native "
    "resolution (a grid{trim}), and its logit is the mean of the crops' logits, so no image is shrunk to 32 px. "
    "Measured (train/RECIPE.md, benchmarks/results/photo32_report.md): AUC {b_auc:.3f} on ../shared/data/photos "
    "(never trained on; most of its fakes are SD 1.5 fine-tunes, a family seen in training), real-photo "
    "false-positive rate {b_fpr:.1%} at the shipped threshold; on sources held out of training{a_who} AUC "
    "{a_auc:.3f} and real false-positive rate {a_fpr:.1%}. It is a small CPU-trained model, not the paper's "
    "ViT-L/16 on GenImage: generators unlike its training data are detected little better than chance. The "
    "CIFAKE model stays available as --bundle cifake32."
)


def backbone_words(manifest: dict[str, Any]) -> str:
    """The backbone's shape, from a manifest's ``backbone`` entry, in words for the description;
    " grown to N blocks" when it is deeper than cifake32's 6 (``pretrain_mae --grow-depth``)."""
    b = manifest["backbone"]
    grown = f", grown to {b['depth']} blocks" if b["depth"] != 6 else ""
    return (f" (ViT, patch {b['patch_size']}, {b['embed_dim']} wide, 6 blocks{grown}; decoder "
            f"{b['decoder_embed_dim']}x{b['decoder_depth']}; pixel targets)")


def augment_words(n: int, balance: float = 0.0) -> str:
    """How the head saw its training images (``--reship-augment N``, ``--balance ALPHA``), in words for
    the description."""
    return ((f", each training image also seen as {n} random re-shippings (JPEG, resize, crop, letterbox)"
             if n else "")
            + (f", each image weighted by 1 / (images of its generator or collection)^{balance:g} so that no one "
               "generator dominates" if balance else ""))


def pretraining_words(manifest: dict[str, Any]) -> str:
    """How the backbone's last pretraining stage saw its photos, in words for the description
    (``pretrain_mae --reship``: a share of the reals re-delivered every epoch)."""
    aug = manifest.get("provenance", {}).get("backbone_pretraining", {}).get("augmentation", "")
    return (", in the last stage half of them re-delivered at random every epoch (JPEG 30-95, resized, cropped "
            "or letterboxed) so that it learns real photos as sites pass them on" if "re-shipped" in aug else "")


def manifest_metrics(report: dict[str, Any], set_name: str, model: str) -> dict[str, Any]:
    """One model's numbers on one set of a report, as a manifest's ``evaluation`` states them."""
    mm = report[set_name][model]["metrics"]
    return {"n": mm["n"], "auc": mm["auc"], "tpr_at_5pct_fpr": mm["tpr_at_5pct_fpr"],
            "threshold": mm["at_threshold"]["threshold"], "fpr_real_at_threshold": mm["at_threshold"]["fpr"],
            "tpr_at_threshold": mm["at_threshold"]["tpr"]}


def install(bundle_dir: Path, report: dict[str, Any], mae: Path, name: str = "photo32") -> Path:
    """Install a trained tiled bundle as the embedded ``NAME`` (``build_default.install_embedded``)
    with a plain description and the report's measured numbers (of the model it ships,
    ``report["shipped_model"]``) in its manifest."""
    from ..runtime.bundle import Bundle, embedded_bundle_path
    from .build_default import install_embedded

    shipped = report.get("shipped_model", "tiles_head_k2")
    final = shipped == "final_k2"

    at = functools.partial(manifest_metrics, report)
    stage = Bundle(bundle_dir).manifest
    tiles = stage["tiles"]
    aug = report.get("reship_augment", 0)
    updates = {
        "model_id": f"cinemae-{name}", "model_version": str(report.get("model_version", "1")),
        "description": PHOTO_DESCRIPTION.format(
            shape=backbone_words(stage), pretrain=pretraining_words(stage),
            trained_on="all of photos-train" if final else "photos-train minus six held-out sources",
            augment=augment_words(aug, float(report.get("balance") or 0.0)),
            n=tiles["n"], trim=tiling_words(tiles),
            b_auc=report["photos"][shipped]["metrics"]["auc"],
            b_fpr=report["photos"][shipped]["metrics"]["at_threshold"]["fpr"],
            a_who=" (by the same recipe trained without them)" if final else "",
            a_auc=report["heldout"]["tiles_head_k2"]["metrics"]["auc"],
            a_fpr=report["heldout"]["tiles_head_k2"]["metrics"]["at_threshold"]["fpr"]),
        "evaluation": {
            "photos_never_trained_on": {
                "this_model": at("photos", shipped), "cifake32": at("photos", "cifake32"),
                "paired_vs_cifake32": report["photos"]["paired_vs_cifake32"][shipped],
                **({"previous": report["photos"]["previous"]["metrics"],
                    "paired_vs_previous": report["photos"]["paired_vs_previous"][shipped]}
                   if shipped in report["photos"].get("paired_vs_previous", {}) else {})},
            "heldout_sources": {
                "sources": report["heldout_sources"],
                "model": "the same recipe without these sources" if final else "this model",
                "this_model": at("heldout", "tiles_head_k2"), "cifake32": at("heldout", "cifake32"),
                "paired_vs_cifake32": report["heldout"]["paired_vs_cifake32"]["tiles_head_k2"]},
            "report": "benchmarks/results/photo32_report.md"}}
    old = embedded_bundle_path(name)
    versions = dict(Bundle(old, verify=False).manifest.get("provenance", {}).get("versions", {})) if old else {}
    if versions:  # a new model under a name that had others: their history stays in the manifest
        v = updates["model_version"]
        versions[v] = (f"model_version {v} by train/photo_tiles.py --install: new backbone weights, graphs and "
                       f"head, tiles {tiles}; evaluation measured again")
        updates["provenance"] = {**stage.get("provenance", {}), "versions": versions}
    return install_embedded(bundle_dir, name, mae, note="written by train/photo_tiles.py --install",
                            updates=json.loads(json.dumps(updates, default=float)))


def new_source_fpr(p: np.ndarray, groups: list[str], pool: np.ndarray, target: float = 0.05) -> dict[str, Any]:
    """How often a threshold rule flags real photos of a source it was not calibrated on.

    p [N] scores of real images, groups [N] their source, pool [N] bool: the reals the rule
    calibrates on (5% FPR). Leave one source out: for each source, the threshold from the pool
    without that source, and the share of that source's reals at or above it (a source outside the
    pool is simply scored at the full pool's threshold). -> {"fpr": pooled over all N, "per_source":
    {source: {"n", "fpr"}}}."""
    from ..runtime.evaluation import threshold_at_fpr

    g = np.asarray(groups)
    flagged = np.zeros(len(p), bool)
    per = {}
    for src in sorted(set(groups)):
        mine = g == src
        thr = threshold_at_fpr(p[pool & ~mine], target)
        flagged[mine] = p[mine] >= thr
        per[src] = {"n": int(mine.sum()), "fpr": float(flagged[mine].mean())}
    return {"fpr": float(flagged.mean()), "n": len(p), "per_source": per}


def retile(name: str, previous_report: dict[str, Any], trim_borders: bool, max_side: int | None,
           version: str, backend: str = "onnxruntime", n: int | None = None,
           train_dir: Path | None = None, seed: int = 0, canonical_jpeg: int | None = None,
           calibrate: str = "val") -> dict[str, Any]:
    """Change how the embedded bundle ``NAME`` tiles an image (``trim_borders``, ``max_side``,
    ``canonical_jpeg``, and the number of crops ``n`` when given), its head unchanged, and measure
    it again: the report's two sets are scored through the runtime (Detector, fp32) with the new
    tiling -> a report in :func:`run`'s form, with ``previous`` = the bundle as it was (the previous
    report's scores and threshold) and cifake32 as it was.

    With ``train_dir`` the threshold is calibrated again at 5% FPR, on the new tiling's scores, over
    ``calibrate``: ``val``, the real validation images of the training sources (:func:`run`'s split:
    photos-train minus the report's held-out sources, ``rng(seed) < 0.15``), the bundle's original
    rule; or ``val+heldout``, those and the reals of the held-out sources (a) (none of them seen by
    the head), so the threshold holds on sources unlike the training data. Either way the report
    gives, for both rules, the false-positive rate on a source left out of calibration
    (:func:`new_source_fpr`), and with ``val+heldout`` the FPR of (a)'s reals is a calibration
    number, not a test. Nothing is written here."""
    from ..runtime.bundle import resolve_bundle
    from ..runtime.detector import Detector
    from ..runtime.evaluation import threshold_at_fpr
    from ..runtime.tiles import TileSpec
    from .calibrate import paired_comparison

    if calibrate not in ("val", "val+heldout"):
        raise ValueError(f"calibrate must be val or val+heldout, not {calibrate!r}")
    src = resolve_bundle(name)
    report: dict[str, Any] = {k: v for k, v in previous_report.items() if k not in ("heldout", "photos", "ship")}
    report.update({"trim_borders": trim_borders, "max_side": max_side, "canonical_jpeg": canonical_jpeg,
                   "model_version": version,
                   "shipped_model": "tiles_head_k2", "retiled_from": {
                       "tiles": src.manifest.get("tiles"), "model_version": src.manifest.get("model_version"),
                       "threshold": src.threshold}})
    with tempfile.TemporaryDirectory() as tmp:
        tb = Path(tmp) / "retiled"
        shutil.copytree(src.root, tb)
        m = json.loads((tb / "cinemae.json").read_text())
        was = TileSpec.from_manifest(m)
        spec = dataclasses.replace(was, n=n or was.n, trim_borders=trim_borders, max_side=max_side,
                                   canonical_jpeg=canonical_jpeg)
        m["tiles"] = spec.to_manifest()
        report["tiles"] = spec.n
        (tb / "cinemae.json").write_text(json.dumps(m, indent=2) + "\n")
        with Detector(tb, backend=backend, device="cpu", provenance=False) as det:
            threshold = det.threshold
            p_new = {}
            for set_name in ("heldout", "photos"):
                rows = previous_report[set_name]["images"]
                res = list(det.detect_many([r["path"] for r in rows]))
                bad = [(r["path"], x.error) for r, x in zip(rows, res, strict=True) if x.error]
                if bad:
                    raise RuntimeError(f"{len(bad)} images failed to score, e.g. {bad[0]}")
                p_new[set_name] = np.array([x.score for x in res])
            if train_dir is not None:
                train_rows, _, is_val = split_sources(read_labels(train_dir),
                                                      tuple(previous_report["heldout_sources"]), seed)
                val_reals = [r for r, v in zip(train_rows, is_val, strict=True) if v and r["label"] == "real"]
                p_val = np.array([x.score for x in det.detect_many([r["path"] for r in val_reals])])
                held_rows = previous_report["heldout"]["images"]
                held_real = np.array([r["label"] == "real" for r in held_rows])
                p_reals = np.concatenate([p_val, p_new["heldout"][held_real]])
                groups = [r["group"] for r in val_reals] + [r["group"] for r, k in zip(held_rows, held_real,
                                                                                       strict=True) if k]
                in_val = np.arange(len(p_reals)) < len(p_val)
                pools = {"val": in_val, "val+heldout": np.ones(len(p_reals), bool)}
                threshold = threshold_at_fpr(p_reals[pools[calibrate]], 0.05)
                rules = {"val": "threshold = smallest p with <= 5% false positives on the real validation images "
                                "(mean crop logit per image)",
                         "val+heldout": "threshold = smallest p with <= 5% false positives on the real validation "
                                        "images and the reals of the held-out sources (a), none seen by the head "
                                        "(mean crop logit per image)"}
                report["threshold_recalibrated"] = {
                    "before": float(det.threshold), "after": float(threshold), "calibrate": calibrate,
                    "n_val_reals": len(val_reals), "n_calibration_reals": int(pools[calibrate].sum()),
                    "rule": rules[calibrate] + ", with the new tiling",
                    "new_source_fpr": {k: new_source_fpr(p_reals, groups, v) for k, v in pools.items()}}
                log.info("threshold %.4f -> %.4f (5%% FPR on %d reals: %s); FPR on a source left out of "
                         "calibration: val rule %.3f, val+heldout rule %.3f", det.threshold, threshold,
                         int(pools[calibrate].sum()), calibrate,
                         report["threshold_recalibrated"]["new_source_fpr"]["val"]["fpr"],
                         report["threshold_recalibrated"]["new_source_fpr"]["val+heldout"]["fpr"])
            for set_name in ("heldout", "photos"):
                prev = previous_report[set_name]
                rows = prev["images"]
                y = fake_labels(rows).astype(int)
                old = prev["scores"]
                previous = old.get("tiles_head_k2")
                sc = {"cifake32": (np.asarray(old["cifake32"]["p"]), old["cifake32"]["threshold"]),
                      "previous": (np.asarray(previous["p"]), previous["threshold"]),
                      "tiles_head_k2": (p_new[set_name], threshold)}
                out = {m_: evaluate(f"{set_name} {m_}", rows, p_, t_) for m_, (p_, t_) in sc.items()}
                out["images"] = rows
                out["scores"] = {m_: {"p": [float(v) for v in p_], "threshold": float(t_)}
                                 for m_, (p_, t_) in sc.items()}
                out["paired_vs_cifake32"] = {m_: paired_comparison(y, *sc["cifake32"], *sc[m_])
                                             for m_ in ("previous", "tiles_head_k2")}
                out["paired_vs_previous"] = {
                    "tiles_head_k2": paired_comparison(y, *sc["previous"], *sc["tiles_head_k2"])}
                changed = np.flatnonzero(np.abs(p_new[set_name] - sc["previous"][0]) > 1e-4)
                out["changed_by_retiling"] = [{"path": rows[i]["path"], "p_before": float(sc["previous"][0][i]),
                                               "p_after": float(p_new[set_name][i])} for i in changed]
                log.info("%s: %d of %d images scored differently after retiling", set_name, len(changed), len(rows))
                report[set_name] = out
    report["retiled_bundle"] = m
    return report


def install_retiled(name: str, report: dict[str, Any], train_dir: Path | None) -> Path:
    """Write the retiled manifest (tiles, version, evaluation, description) into the embedded bundle
    ``NAME`` (its graphs are untouched), verify it, and measure its recheck margins again."""
    from ..runtime.bundle import Bundle, embedded_bundle_path, write_manifest

    dst = embedded_bundle_path(name)
    if dst is None:
        raise FileNotFoundError(f"no embedded bundle {name!r}")
    b = Bundle(dst)
    m = dict(b.manifest)
    m["tiles"] = report["retiled_bundle"]["tiles"]
    m["model_version"] = str(report["model_version"])
    if "threshold_recalibrated" in report:
        thr = report["threshold_recalibrated"]["after"]
        m["decision"] = {**m["decision"], "threshold": thr, "abstain_band": [thr, thr],
                         "calibration": {"rule": report["threshold_recalibrated"]["rule"]}}

    at = functools.partial(manifest_metrics, report)
    ev = dict(m.get("evaluation", {}))
    ev["photos_never_trained_on"] = {
        "this_model": at("photos", "tiles_head_k2"), "cifake32": at("photos", "cifake32"),
        "paired_vs_cifake32": report["photos"]["paired_vs_cifake32"]["tiles_head_k2"],
        "before_retiling": at("photos", "previous"),
        "paired_vs_before_retiling": report["photos"]["paired_vs_previous"]["tiles_head_k2"]}
    ev["heldout_sources"] = {
        **ev.get("heldout_sources", {}), "this_model": at("heldout", "tiles_head_k2"),
        "cifake32": at("heldout", "cifake32"),
        "paired_vs_cifake32": report["heldout"]["paired_vs_cifake32"]["tiles_head_k2"],
        "before_retiling": at("heldout", "previous")}
    cal = report.get("threshold_recalibrated", {})
    a_who, a_fpr = "", ev["heldout_sources"]["this_model"]["fpr_real_at_threshold"]
    if cal:
        ev["threshold_calibration"] = {k: cal[k] for k in ("rule", "calibrate", "n_calibration_reals",
                                                           "new_source_fpr")}
    if cal.get("calibrate") == "val+heldout":  # (a)'s reals set the threshold: their FPR is no test
        ev["heldout_sources"]["this_model"]["fpr_real_at_threshold_note"] = (
            "these reals are in the threshold's calibration set; threshold_calibration.new_source_fpr is the "
            "estimate for a source the threshold never saw")
        a_who = " (its real false-positive rate estimated with each source left out of the threshold's calibration)"
        a_fpr = cal["new_source_fpr"]["val+heldout"]["fpr"]
    m["evaluation"] = json.loads(json.dumps(ev, default=float))
    t = m["tiles"]
    data = m.get("head", {}).get("training", {}).get("data", {})
    m["description"] = PHOTO_DESCRIPTION.format(
        shape=backbone_words(m), pretrain=pretraining_words(m), trained_on="photos-train minus six held-out sources",
        augment=augment_words(int(data.get("reship_augment", 0)), float(data.get("balance") or 0.0)),
        n=t["n"],
        trim=tiling_words(t),
        b_auc=ev["photos_never_trained_on"]["this_model"]["auc"],
        b_fpr=ev["photos_never_trained_on"]["this_model"]["fpr_real_at_threshold"], a_who=a_who,
        a_auc=ev["heldout_sources"]["this_model"]["auc"], a_fpr=a_fpr)
    was = report["retiled_from"]
    what = (f"train/photo_tiles.py --retile: tiles {was['tiles']} -> {t}"
            + (f"; threshold {cal['before']:.4f} -> {cal['after']:.4f} ({cal['rule']})" if cal else "")
            + "; graphs and head unchanged; evaluation measured again")
    prov = dict(m.get("provenance", {}))
    versions = dict(prov.get("versions", {}))
    v = m["model_version"]
    continued = v == str(was["model_version"]) and v in versions  # retiled as the version just installed
    prov["versions"] = {**versions, v: f"{versions[v]}; then {what}" if continued else f"model_version {v} by {what}"}
    m["provenance"] = prov
    m.pop("files", None)
    write_manifest(dst, m)
    Bundle(dst)
    if train_dir is not None:
        from ..export.recheck import margins_after_training

        margins_after_training(dst, [train_dir / "real", train_dir / "fake"], log=log.info)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bundle", default=None, help="backbone bundle (default: the embedded cifake32)")
    src.add_argument("--mae", default=None, help="or a pretrain_mae.py mae.pth, exported to --work first")
    ap.add_argument("--work", default=None, help="with --mae: where the exported backbone bundle goes "
                                                 "(default: beside mae.pth; kept and reused)")
    ap.add_argument("--model-id", default="cinemae-photo32", help="with --mae: the exported bundle's model id")
    ap.add_argument("--train-dir")
    ap.add_argument("--eval-dir")
    ap.add_argument("--markdown", default=None, help="also write the report's tables here")
    ap.add_argument("--render", default=None, metavar="REPORT",
                    help="no run: write --markdown from an existing report")
    ap.add_argument("--heldout-sources", nargs="+", default=list(DEFAULT_HELDOUT))
    ap.add_argument("--tiles", type=int, default=None, help="crops per image (default 16; with --retile: "
                                                                "the bundle's own unless given)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default=None)
    ap.add_argument("--backend", default="onnxruntime",
                    help="runtime backend for the crop features and --retile's scores (fp32; default the "
                         "reference, ONNX Runtime, as version 1 was trained)")
    ap.add_argument("--trim-borders", action="store_true",
                    help="the bundle cuts uniform border bars (letterboxes) before tiling (runtime/tiles.py)")
    ap.add_argument("--max-side", type=int, default=None, metavar="PX",
                    help="the bundle shrinks images whose longer side exceeds PX before tiling (runtime/tiles.py)")
    ap.add_argument("--canonical-jpeg", type=int, default=None, metavar="Q",
                    help="the bundle re-encodes every picture once as JPEG quality Q before cutting it (after "
                         "trimming and max_side; runtime/tiles.py), so re-compressed copies read like the original")
    ap.add_argument("--reship-augment", type=int, default=0, metavar="N",
                    help="also train on N random re-shippings of every training image (train/reship_augment.py)")
    ap.add_argument("--balance", type=float, default=0.0, metavar="ALPHA",
                    help="weigh each training image 1 / (images of its generator or real collection)^ALPHA, each "
                         "class's weights averaging 1 (group_weights; 0: unweighted, 1: every generator alike)")
    ap.add_argument("--final-fit", action="store_true",
                    help="the bundle's head is the same recipe refit on all of photos-train, held-out sources "
                         "included (their table (a) comes from the head trained without them)")
    ap.add_argument("--oof-folds", type=int, default=0, metavar="N",
                    help="with --final-fit: set the shipped threshold at 5%% FPR on out-of-fold scores of every real "
                         "of photos-train (N folds of whole sources) instead of the validation reals")
    ap.add_argument("--consistency", type=float, default=None, metavar="W",
                    help="train on image logits (mean crop logit of each delivered image and of each view) "
                         "with W x the variance of an image's logits over its views (train.head.train_head_images); "
                         "default: per-crop BCE")
    ap.add_argument("--cache", default=None, help="keep each set's crop rows here (keyed; reruns reuse them)")
    ap.add_argument("--compare", default=None, metavar="REPORT",
                    help="a previous report: its K=2 model's scores are paired with the new ones")
    ap.add_argument("--out-bundle", default=None)
    ap.add_argument("--what", default=None, help="one line for the manifest: what the backbone is")
    ap.add_argument("--retile", default=None, metavar="NAME",
                    help="no training: give the embedded bundle NAME the tiling of --trim-borders / --max-side, "
                         "measure it again on the sets of --compare's report, write --report/--markdown, "
                         "and install it as --model-version (with --train-dir: its recheck margins too)")
    ap.add_argument("--calibrate", choices=("val", "val+heldout"), default="val",
                    help="with --retile and --train-dir: the reals the threshold is set on (5%% FPR): the validation "
                         "reals of the training sources (the original rule), or those and the held-out sources' reals")
    ap.add_argument("--model-version", default=None,
                    help="the manifest's model_version for the bundle written (default 1; required with --retile)")
    ap.add_argument("--install", default=None, metavar="NAME",
                    help="copy --out-bundle into runtime/bundles/NAME with the report's numbers (needs --mae; "
                         "with --train-dir also measures its reduced-precision recheck margins there)")
    args = ap.parse_args(argv)
    args.tiles_given = args.tiles is not None
    if args.tiles is None:
        args.tiles = 16
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.retile:
        if not args.compare:
            ap.error("--retile needs --compare REPORT (the bundle's current report: its images and scores)")
        if not args.model_version:
            ap.error("--retile needs --model-version (the version the retiled bundle becomes)")
        report = retile(args.retile, json.loads(Path(args.compare).read_text()), args.trim_borders, args.max_side,
                        args.model_version, args.backend, args.tiles if args.tiles_given else None,
                        Path(args.train_dir) if args.train_dir else None, args.seed, args.canonical_jpeg,
                        args.calibrate)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1, default=float) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(markdown(report))
        dst = install_retiled(args.retile, report, Path(args.train_dir) if args.train_dir else None)
        log.info("installed %s (model_version %s)", dst, args.model_version)
        return 0
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        if not (args.train_dir and args.eval_dir):
            ap.error("--train-dir and --eval-dir are required (or --render REPORT)")
        report = run(args)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    elif args.render:
        print(markdown(report))
    if args.install:
        if not (args.out_bundle and args.mae):
            ap.error("--install needs --out-bundle (the trained bundle) and --mae (its backbone's weights)")
        dst = install(Path(args.out_bundle), report, Path(args.mae), args.install)
        log.info("installed %s", dst)
        if args.train_dir:  # the new head moves p: the recheck margins, as cinemae-train measures them
            from ..export.recheck import margins_after_training

            margins_after_training(dst, [Path(args.train_dir) / "real", Path(args.train_dir) / "fake"], log=log.info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
