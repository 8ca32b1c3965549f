"""A photo head on native-resolution tiles of the existing 32-px backbone, evaluated leave-generators-out.

    python -m cinemae.train.photo_tiles --train-dir ../shared/data/photos-train \\
        --eval-dir ../shared/data/photos --report report.json [--out-bundle DIR]

No new pretraining (the 1.45 M-parameter cifake32 MAE is reused as it is): only the head is
trained, on crop rows. Steps:

1. split photos-train by **source repository** (labels.csv's ``source``): the held-out sources'
   reals and generators are never seen in training (``--heldout-sources``);
2. every image -> up to ``--tiles`` 32 x 32 crops at native resolution (a grid); one row per crop
   (pooled global feature [D], LCAS statistics [3] at K=2), labelled with its image's label;
   crops at native resolution are 32 px whatever the image's size, so the head cannot read the
   image size off its input (the README's shortcut: half the reals are small);
3. a head on the training crops (K=2, and K=0 for the comparison), early-stopped on 15% of the
   training **images** (their crops together); an image's logit is the mean of its crops';
   threshold = 5% FPR on the validation reals (image level);
4. on (a) the held-out sources and (b) ``--eval-dir`` (never trained on): AUC, TPR at 5% FPR,
   FPR of reals at each model's own threshold, per generator / real source, for the new head
   (K=2 and K=0), cifake32 as shipped (one resized view) and cifake32's head on the same tiles;
   paired bootstrap (``train.calibrate.paired_comparison``) of each against cifake32.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

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


def tiled_copy(bundle_root: Path, out: Path, n: int) -> Path:
    """A copy of the bundle whose manifest asks for an n-crop native grid."""
    shutil.copytree(bundle_root, out)
    m = json.loads((out / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": n, "scale": "native", "seed": 0, "reduce": "mean_logit"}
    (out / "cinemae.json").write_text(json.dumps(m, indent=2) + "\n")
    return out


def crop_features(det: Any, rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every image's crops -> (feature [R, D], stats [R, 3], logit of the bundle's head [R], image index [R])."""
    feats, stats, logits, owner = [], [], [], []
    for i, r in enumerate(rows):
        crops = det.preprocess(r["path"])
        out = det.run_arrays(crops if crops.ndim == 4 else crops[None], want_feature=True)
        feats.append(out.feature.astype(np.float32))
        stats.append(out.stats.astype(np.float32))
        logits.append(out.logit.astype(np.float64))
        owner.append(np.full(len(crops), i))
    return np.concatenate(feats), np.concatenate(stats), np.concatenate(logits), np.concatenate(owner)



def sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def per_group(rows: list[dict[str, str]], p: np.ndarray, thr: float) -> dict[str, Any]:
    """Per generator (fakes, each against every real of the set) and per real source."""
    from ..runtime.evaluation import auc

    y = np.array([r["label"] == "fake" for r in rows])
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

    y = np.array([r["label"] == "fake" for r in rows]).astype(int)
    m = metrics(y, p, thr)
    log.info("%s: n=%d AUC %.4f TPR@5%%FPR %.4f FPR(real)@thr %.4f TPR@thr %.4f", name, m["n"], m["auc"],
             m["tpr_at_5pct_fpr"], m["at_threshold"]["fpr"], m["at_threshold"]["tpr"])
    return {"metrics": m, "per_group": per_group(rows, p, thr)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..runtime.bundle import resolve_bundle
    from ..runtime.detector import Detector
    from ..runtime.evaluation import threshold_at_fpr
    from .calibrate import paired_comparison
    from .head import TrainConfig, head_logits, train_head, write_head

    if args.mae:  # a pretraining run's weights: export them first (an untrained head; only the backbone is used)
        from .build_default import export_stage

        work = Path(args.work or Path(args.mae).parent / "bundle")
        base = resolve_bundle(export_stage(Path(args.mae), work, pooling="mean", k=2, model_id=args.model_id))
    else:
        base = resolve_bundle(args.bundle)
    default = resolve_bundle(None)  # the shipped model: every new head is compared with it
    same_backbone = base.root.resolve() == default.root.resolve()
    rows = read_labels(Path(args.train_dir))
    held = tuple(args.heldout_sources)
    train_rows = [r for r in rows if not r["source"].startswith(held)]
    test_rows = [r for r in rows if r["source"].startswith(held)]
    eval_rows = read_labels(Path(args.eval_dir))
    rng = np.random.default_rng(args.seed)
    is_val = rng.random(len(train_rows)) < 0.15
    report: dict[str, Any] = {"heldout_sources": list(held), "tiles": args.tiles,
                              "n_train_images": int((~is_val).sum()), "n_val_images": int(is_val.sum()),
                              "n_heldout": len(test_rows), "n_eval": len(eval_rows)}
    with tempfile.TemporaryDirectory() as tmp:
        tb = tiled_copy(base.root, Path(tmp) / "tiled", args.tiles)
        det = Detector(tb, backend="onnxruntime", device="cpu", provenance=False)
        plain = Detector(default, backend="onnxruntime", device="cpu", provenance=False)
        sets = {"train": train_rows, "heldout": test_rows, "photos": eval_rows}
        feats = {k: crop_features(det, v) for k, v in sets.items()}
        for k, v in feats.items():
            log.info("%s: %d images -> %d crops", k, len(sets[k]), len(v[0]))
        g, s, _, own = feats["train"]
        y_img = np.array([r["label"] == "fake" for r in train_rows], dtype=np.float32)
        tr, va = ~is_val[own], is_val[own]
        cfg = TrainConfig(epochs=args.epochs, batch=256, lr=1e-3, weight_decay=0.05, seed=args.seed, threads=2)
        heads = {}
        for k in (2, 0):
            sk = s if k else np.zeros_like(s)
            th = train_head(g[tr], sk[tr], y_img[own][tr], g[va], sk[va], y_img[own][va], fusion="add",
                            pooling=base.manifest.get("head", {}).get("pooling", "mean"), k=k, cfg=cfg)
            lv = mean_logit_by_image(head_logits(th.head, g[va], sk[va]),
                                     np.searchsorted(np.flatnonzero(is_val), own[va]), int(is_val.sum()))
            thr = threshold_at_fpr(sig(lv)[y_img[is_val] == 0], 0.05)
            heads[k] = (th, thr)
        scores: dict[str, dict[str, tuple[np.ndarray, float]]] = {}
        for name in ("heldout", "photos"):
            fg, fs, flog, fown = feats[name]
            n = len(sets[name])
            sc = {"cifake32": (np.array([r.score for r in plain.detect_many([x["path"] for x in sets[name]])]),
                               plain.threshold)}
            if same_backbone:  # the shipped head on the same tiles (a new backbone has no trained head)
                sc["cifake32_tiles"] = (sig(mean_logit_by_image(flog, fown, n)), base.threshold)
            for k, (th, thr) in heads.items():
                sk = fs if k else np.zeros_like(fs)
                sc[f"tiles_head_k{k}"] = (sig(mean_logit_by_image(head_logits(th.head, fg, sk), fown, n)), thr)
            scores[name] = sc
            y = np.array([r["label"] == "fake" for r in sets[name]]).astype(int)
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
            for m, c in [*report[name]["paired_vs_cifake32"].items(),
                         ("k2 vs k0 (not cifake32)", report[name]["paired_k2_vs_k0"])]:
                log.info("%s %s - cifake32: AUC %+.4f (95%% CI %+.4f..%+.4f), accuracy %+.4f (CI %+.4f..%+.4f)",
                         name, m, c["auc_diff"], *c["auc_diff_ci95"], c["accuracy_diff"], *c["accuracy_diff_ci95"])
        det.close()
        plain.close()
        c = report["photos"]["paired_vs_cifake32"]["tiles_head_k2"]
        report["ship"] = bool(c["auc_diff_ci95"][0] > 0)
        log.info("ship the tiled head as the default: %s (AUC difference on photos %+.4f, CI %s)",
                 report["ship"], c["auc_diff"], c["auc_diff_ci95"])
        if args.report:  # first: a failure while writing the bundle must not lose the measurements
            Path(args.report).write_text(json.dumps(report, indent=1, default=float) + "\n")
        if args.out_bundle:
            th, thr = heads[2]
            decision = {"threshold": thr, "abstain_band": [thr, thr], "calibration": {
                "rule": "threshold = smallest p with <= 5% false positives on the real validation images "
                        "(mean crop logit per image)"}}
            what = args.what or (f"{base.manifest.get('model_id', base.root.name)} MAE + head on "
                                 f"native {base.backbone.img_size}-px crops")
            training = {"k": 2, "what": what,
                        "data": {"train_dir": "photos-train minus held-out sources",
                                 **{k: ({m: v for m, v in r.items() if m not in ("images", "scores")}
                                        if isinstance(r, dict) else r) for k, r in report.items()}},
                        "epochs": args.epochs, "seed": args.seed}
            training = json.loads(json.dumps(training, default=float))  # numpy scalars -> JSON numbers
            write_head(tb, th.head, decision, training, out=args.out_bundle,
                       extra_manifest={"tiles": json.loads((tb / "cinemae.json").read_text())["tiles"]})
    return report


SETS = {"heldout": "(a) photos-train, held-out sources (their reals and generators never seen in training)",
        "photos": "(b) ../shared/data/photos (never trained on)"}
MODELS = {"cifake32": "cifake32 (shipped before; one 32-px view)", "tiles_head_k2": "new, K=2",
          "tiles_head_k0": "new, K=0 (no LCAS)", "cifake32_tiles": "cifake32 head on the tiles"}


def group_table(images: list[dict[str, str]], scores: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows per generator (AUC against every real of the set, TPR at 5% FPR, TPR at the
    model's own threshold) and per real source (FPR at the model's threshold), one column group per model."""
    from ..runtime.evaluation import auc, threshold_at_fpr

    models = [m for m in MODELS if m in scores]
    y = np.array([r["label"] == "fake" for r in images])
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


PHOTO_DESCRIPTION = (
    "Photo model: the small MAE of cifake32 (ViT, patch 4, 128 wide, 6 blocks; decoder 96x2; pixel targets) "
    "pretrained further on native-resolution 32-px crops of real photographs (photos-train, sources held out "
    "of the evaluation excluded), with a CINEMAE head (K=2) trained on crops of real photos and of images from "
    "several generators (photos-train minus six held-out sources). Every image is scored as up to {n} 32-px "
    "crops taken at native resolution (a grid), and its logit is the mean of the crops' logits, so no "
    "image is shrunk to 32 px. Measured (train/RECIPE.md, benchmarks/results/photo32_report.md): AUC {b_auc:.3f} "
    "on ../shared/data/photos (never trained on; most of its fakes are SD 1.5 fine-tunes, a family seen in "
    "training), real-photo false-positive rate {b_fpr:.1%} at the shipped threshold; on sources held out of "
    "training AUC {a_auc:.3f} and real false-positive rate {a_fpr:.1%}. It is a small CPU-trained model, not "
    "the paper's ViT-L/16 on GenImage: generators unlike its training data are detected little better than "
    "chance. The previous CIFAKE model stays available as --bundle cifake32."
)


def install(bundle_dir: Path, report: dict[str, Any], mae: Path, name: str = "photo32") -> Path:
    """Install a trained tiled bundle as the embedded ``NAME`` (``build_default.install_embedded``)
    with a plain description and the report's measured numbers in its manifest."""
    from ..runtime.bundle import Bundle
    from .build_default import install_embedded

    def at(set_name: str, model: str) -> dict[str, Any]:
        mm = report[set_name][model]["metrics"]
        return {"n": mm["n"], "auc": mm["auc"], "tpr_at_5pct_fpr": mm["tpr_at_5pct_fpr"],
                "threshold": mm["at_threshold"]["threshold"], "fpr_real_at_threshold": mm["at_threshold"]["fpr"],
                "tpr_at_threshold": mm["at_threshold"]["tpr"]}

    updates = {
        "model_id": f"cinemae-{name}", "model_version": "1",
        "description": PHOTO_DESCRIPTION.format(
            n=Bundle(bundle_dir).manifest["tiles"]["n"], b_auc=report["photos"]["tiles_head_k2"]["metrics"]["auc"],
            b_fpr=report["photos"]["tiles_head_k2"]["metrics"]["at_threshold"]["fpr"],
            a_auc=report["heldout"]["tiles_head_k2"]["metrics"]["auc"],
            a_fpr=report["heldout"]["tiles_head_k2"]["metrics"]["at_threshold"]["fpr"]),
        "evaluation": {
            "photos_never_trained_on": {
                "this_model": at("photos", "tiles_head_k2"), "cifake32": at("photos", "cifake32"),
                "paired_vs_cifake32": report["photos"]["paired_vs_cifake32"]["tiles_head_k2"]},
            "heldout_sources": {
                "sources": report["heldout_sources"], "this_model": at("heldout", "tiles_head_k2"),
                "cifake32": at("heldout", "cifake32"),
                "paired_vs_cifake32": report["heldout"]["paired_vs_cifake32"]["tiles_head_k2"]},
            "report": "benchmarks/results/photo32_report.md"}}
    return install_embedded(bundle_dir, name, mae, note="written by train/photo_tiles.py --install",
                            updates=json.loads(json.dumps(updates, default=float)))


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
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default=None)
    ap.add_argument("--out-bundle", default=None)
    ap.add_argument("--what", default=None, help="one line for the manifest: what the backbone is")
    ap.add_argument("--install", default=None, metavar="NAME",
                    help="copy --out-bundle into runtime/bundles/NAME with the report's numbers (needs --mae; "
                         "with --train-dir also measures its reduced-precision recheck margins there)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
