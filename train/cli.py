"""``cinemae-train``: extract features through the runtime, train the head, calibrate the
threshold and the abstain band, write the head into the bundle.

    cinemae-train --bundle BUNDLE --real DIR --fake DIR --k 2
    cinemae-train --bundle BUNDLE --csv labels.csv --k 2 --fusion concat
    cinemae-train --bundle BUNDLE --real train-real.tar --fake train-fake.tar --k 2 --ks 0,1,2,4 \
        --test-real test-real.tar --test-fake test-fake.tar --report report.json
    cinemae-train --bundle BUNDLE --csv photos-train/labels.csv --split-by source \
        --test-groups Inf-imagine/Sentry,coodie/quant --test-csv photos/labels.csv

One extraction with K_max = max(--k, --ks) runs gives the heads for every K listed. The
validation split (``--val-frac`` of the training items, per class, seeded) chooses the epoch
and calibrates the threshold and the abstain band; test sets are only reported.

``--split-by COLUMN`` (a column of the --csv files, e.g. source or generator) makes the
validation split hold out whole groups (seeded), and ``--test-groups`` moves named groups out of
the training data into the test set, so what is measured is never only a generator or a source
the head was trained on.

A tiled bundle (its manifest's ``tiles`` entry) gives one row per crop: the head trains on crop
rows labelled with their image's label, the split is by image (all crops of an image on one
side), and every validation/test figure, the threshold and the abstain band are computed per
image from the mean crop logit, the runtime's rule, so the threshold written means what
``cinemae-detect`` computes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.evaluation import probabilities
from .data import DataError, Item, gather


def default_cache_dir() -> Path:
    """``features/`` in the cinemae cache (:func:`cinemae.runtime.cache.cache_root`)."""
    from ..runtime.cache import cache_dir

    return cache_dir("features")


def split_items(items: list[Item], val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified seeded split -> (train indices, validation indices)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in (0, 1):
        idx = np.array([i for i, it in enumerate(items) if it.label == label])
        if len(idx) == 0:
            continue
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_frac * len(idx))) if len(idx) > 1 else 0
        if val_frac > 0 and len(idx) > 1:
            n_val = max(1, n_val)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def _group_matches(value: str, name: str) -> bool:
    """``name`` names the group ``value`` exactly, or without its "@commit" suffix."""
    return value == name or value.split("@")[0] == name


def item_groups(items: list[Item], column: str) -> list[str]:
    """Each item's value of CSV column ``column``; DataError when an item has none."""
    out = []
    for it in items:
        v = it.column(column)
        if v is None:
            raise DataError(f"{it.source} has no {column!r} column (folders, archives and CSVs without that "
                            f"column have no groups)")
        if not v:
            raise DataError(f"{it.source}: empty {column!r} value; every item needs a group for --split-by")
        out.append(v)
    return out


def split_groups(items: list[Item], column: str, val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split holding out whole groups (values of ``column``) -> (train indices, validation
    indices). Per class, groups in a seeded random order join the validation split while the
    class's validation count stays within ``val_frac`` of its items (a group too big to fit is
    passed over, so one large source does not swallow the split); a class that got no group that
    way gets its smallest group. No group is on both sides; DataError when a class would be left
    with no training images."""
    groups = item_groups(items, column)
    labels = np.array([it.label for it in items])
    names = sorted(set(groups))
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    size = {(g, lb): 0 for g in names for lb in (0, 1)}
    for g, lb in zip(groups, labels, strict=True):
        size[(g, int(lb))] += 1
    val: list[str] = []
    for label in (0, 1):
        n = int((labels == label).sum())
        target = max(1, int(round(val_frac * n))) if val_frac > 0 and n > 1 else 0
        have = sum(size[(g, label)] for g in val)
        if not target:
            continue
        for g in order:
            if g not in val and size[(g, label)] and have + size[(g, label)] <= target:
                val.append(g)
                have += size[(g, label)]
        if have == 0:  # every group of this class is larger than the target: take the smallest
            val.append(min((g for g in order if size[(g, label)]), key=lambda g: size[(g, label)]))
    train = [i for i, g in enumerate(groups) if g not in val]
    left = {int(labels[i]) for i in train}
    if left != {0, 1}:
        missing = "real" if 0 not in left else "fake"
        raise DataError(f"holding out whole {column} groups for validation leaves no {missing} images to train on "
                        f"(the {missing} images come from too few groups); lower --val-frac or add groups")
    return train, [i for i, g in enumerate(groups) if g in val]


def take_groups(items: list[Item], column: str, wanted: list[str]) -> tuple[list[Item], list[Item]]:
    """(items outside the ``wanted`` groups of ``column``, items inside); DataError for a group
    name that matches nothing."""
    groups = item_groups(items, column)
    for w in wanted:
        if not any(_group_matches(g, w) for g in groups):
            known = sorted({g.split("@")[0] for g in groups})
            raise DataError(f"--test-groups: no {column} group {w!r}; known: {', '.join(known)}")
    held = [any(_group_matches(g, w) for w in wanted) for g in groups]
    return ([it for it, h in zip(items, held, strict=True) if not h],
            [it for it, h in zip(items, held, strict=True) if h])


def per_group(items: list[Item], column: str, labels: np.ndarray, p: np.ndarray, thr: float) -> dict[str, Any]:
    """Per group of ``column``: for a group's fakes, n, TPR at ``thr`` and AUC against every real of
    the set; for its reals, n and FPR at ``thr``. labels [N], p [N] image-level."""
    from .calibrate import auc

    y = np.asarray(labels).astype(bool)
    out: dict[str, Any] = {}
    groups = [it.column(column) or "?" for it in items]
    for key in sorted({(int(lb), g) for lb, g in zip(y, groups, strict=True)}):
        idx = np.array([i for i, (lb, g) in enumerate(zip(y, groups, strict=True)) if (int(lb), g) == key])
        hit = float((p[idx] >= thr).mean())
        if key[0] == 1:
            sel = np.concatenate([np.flatnonzero(~y), idx])
            out[f"fake:{key[1]}"] = {"n": len(idx), "tpr": hit,
                                     "auc_vs_all_reals": auc(y[sel], p[sel]) if (~y).any() else float("nan")}
        else:
            out[f"real:{key[1]}"] = {"n": len(idx), "fpr": hit}
    return out


def limit_per_class(items: list[Item], n: int | None, seed: int) -> list[Item]:
    if not n:
        return items
    rng = np.random.default_rng(seed + 1)
    out: list[Item] = []
    for label in (0, 1):
        cls = [it for it in items if it.label == label]
        if len(cls) > n:
            keep = np.sort(rng.choice(len(cls), n, replace=False))
            cls = [cls[i] for i in keep]
        out += cls
    return out


def parse_ks(text: str | None, k: int) -> list[int]:
    ks = {k}
    if text:
        for part in text.split(","):
            if part.strip():
                ks.add(int(part))
    bad = [x for x in ks if not 0 <= x <= 8]
    if bad:
        raise ValueError(f"K must be in 0..8, got {bad}")
    return sorted(ks)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cinemae-train", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle directory (default: the embedded bundle, written into a "
                    "copy given by --out-bundle)")
    data = ap.add_argument_group("training data (any combination)")
    data.add_argument("--real", action="append", default=[], help="folder or tar archive of real images")
    data.add_argument("--fake", action="append", default=[], help="folder or tar archive of AI-generated images")
    data.add_argument("--csv", action="append", default=[], help="CSV of path,label (label real|fake)")
    data.add_argument("--limit-per-class", type=int, default=None,
                      help="use a seeded random subset of at most N images per class")
    data.add_argument("--split-by", default=None, metavar="COLUMN",
                      help="a column of the --csv files (source or generator): the validation split holds "
                           "out whole groups, and --test-groups names groups held out as test data")
    data.add_argument("--test-groups", default=None, metavar="G1,G2",
                      help="with --split-by: move these groups (a value, or a source without its @commit) "
                           "from the training data into the test set")
    test = ap.add_argument_group("held-out test data (reported only, never used for choices)")
    test.add_argument("--test-real", action="append", default=[])
    test.add_argument("--test-fake", action="append", default=[])
    test.add_argument("--test-csv", action="append", default=[])
    test.add_argument("--per-image", action="store_true",
                      help="keep the validation images' names and every test image's name and p (per K) "
                           "in the report")
    hp = ap.add_argument_group("head")
    hp.add_argument("--k", type=int, default=2, help="masking runs K of the head written into the bundle")
    hp.add_argument("--ks", default=None, help="also train and report heads for these K (e.g. 0,1,2,4); "
                    "all come from one extraction with K_max = the largest")
    hp.add_argument("--fusion", choices=["add", "concat", "gate"], default="add")
    hp.add_argument("--epochs", type=int, default=25)
    hp.add_argument("--batch", type=int, default=256)
    hp.add_argument("--lr", type=float, default=1e-3)
    hp.add_argument("--weight-decay", type=float, default=0.05)
    hp.add_argument("--seed", type=int, default=0)
    hp.add_argument("--augment", action="append", default=[], metavar="SPEC",
                    help="also extract this transform of every training-split image and train on all "
                         "(repeatable; validation and test images are never augmented): hflip (mirrored "
                         "left-right), shift:DY:DX (moved, border reflected), or steps joined by +, "
                         "e.g. hflip+shift:2:-2")
    cal = ap.add_argument_group("calibration")
    cal.add_argument("--val-frac", type=float, default=0.1,
                     help="validation share of the training images (per class; whole groups with --split-by)")
    cal.add_argument("--target-fpr", type=float, default=0.05,
                     help="false-positive rate on real validation images that sets the threshold")
    cal.add_argument("--abstain-frac", type=float, default=0.05,
                     help="share of validation images inside the abstain band around the threshold "
                          "(0: no band)")
    run = ap.add_argument_group("run")
    run.add_argument("--cache", default=None, help=f"feature cache folder (default {default_cache_dir()})")
    run.add_argument("--no-cache", action="store_true")
    run.add_argument("--batch-size", type=int, default=64, help="images per runtime call")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (ONNX Runtime and torch)")
    run.add_argument("--out-bundle", default=None, help="write the trained head into a copy of the bundle here")
    run.add_argument("--no-write", action="store_true", help="train and report only; leave the bundle as is")
    run.add_argument("--report", default=None, help="write the full report (JSON) here")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """The whole job; returns the report."""
    from ..runtime.bundle import Bundle, resolve_bundle
    from .calibrate import abstain_band, metrics, paired_comparison, threshold_at_fpr
    from .features import describe, extract, parse_augmentation
    from .head import TrainConfig, head_logits, train_head, write_head, write_json

    bundle = resolve_bundle(args.bundle)
    if args.bundle is None and not args.no_write and not args.out_bundle:
        raise DataError("no --bundle given: the embedded bundle is not modified in place; pass "
                        "--out-bundle DIR to write a trained copy (or --no-write)")
    ks = parse_ks(args.ks, args.k)
    augments = list(dict.fromkeys(args.augment))  # a repeated spec would only duplicate rows
    for aug in augments:
        try:
            parse_augmentation(aug)  # a bad spec fails before any extraction
        except ValueError as e:
            raise DataError(str(e)) from None
    k_max = max(ks)
    column = args.split_by.strip().lower() if args.split_by else None
    wanted = [g.strip() for g in (args.test_groups or "").split(",") if g.strip()]
    if wanted and not column:
        raise DataError("--test-groups needs --split-by COLUMN (which column names the groups)")
    if column:
        from .data import csv_columns

        if args.real or args.fake:
            raise DataError(f"--split-by {column}: --real/--fake folders have no groups; give every training "
                            f"image through a --csv with a {column} column")
        for c in args.csv:
            if Path(c).is_file() and column not in csv_columns(c):
                raise DataError(f"{c} has no {column!r} column (header: {', '.join(csv_columns(c)) or 'none'}); "
                                f"--split-by {column} needs it")
    items = gather(args.real, args.fake, args.csv)
    held_items: list[Item] = []
    if wanted:
        items, held_items = take_groups(items, column, wanted)  # type: ignore[arg-type]
    items = limit_per_class(items, args.limit_per_class, args.seed)
    labels = np.array([it.label for it in items])
    if (labels == 0).sum() == 0 or (labels == 1).sum() == 0:
        raise DataError(f"need both classes; got {(labels == 0).sum()} real and {(labels == 1).sum()} fake")
    cache = None if args.no_cache else (args.cache or default_cache_dir())
    threads = args.threads or min(4, os.cpu_count() or 1)
    log(f"bundle {bundle.root} ({bundle.model_id}); {len(items)} training images "
        f"({(labels == 0).sum()} real, {(labels == 1).sum()} fake); K in {ks}, K_max={k_max}")
    fs = extract(bundle, items, k_max, cache_dir=cache, batch_size=args.batch_size, threads=threads,
                 progress=not args.quiet, log=log)
    log(f"features: {describe(fs)}")
    by_source = {it.source: it for it in items}
    if column:  # whole groups on one side; images (all their crops) on one side in any case
        tr_idx, va_idx = split_groups([by_source[n] for n in fs.names], column, args.val_frac, args.seed)
    else:
        tr_idx, va_idx = split_items([Item(n, int(lbl)) for n, lbl in zip(fs.names, fs.labels, strict=True)],
                                     args.val_frac, args.seed)
    if not va_idx:
        raise DataError("the validation split is empty; give more images or a larger --val-frac")
    tr, va = fs.subset(np.array(tr_idx)), fs.subset(np.array(va_idx))
    train_items = [by_source[n] for n in tr.names]
    for aug in augments:
        fa = extract(bundle, train_items, k_max, cache_dir=cache,
                     batch_size=args.batch_size, threads=threads, progress=not args.quiet, log=log,
                     augment=aug)
        log(f"{aug} features of the training split: {describe(fa)}")
        tr = tr.concat(fa)
    test_items = list(held_items)
    if args.test_real or args.test_fake or args.test_csv:
        test_items += gather(args.test_real, args.test_fake, args.test_csv)
    te = None
    by_test = {it.source: it for it in test_items}
    if test_items:
        te = extract(bundle, test_items, k_max, cache_dir=cache, batch_size=args.batch_size,
                     threads=threads, progress=not args.quiet, log=log)
        log(f"test features: {describe(te)}")

    pooling = bundle.manifest.get("head", {}).get("pooling", "cls")
    cfg = TrainConfig(epochs=args.epochs, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                      seed=args.seed, threads=threads)
    pct = int(round(args.target_fpr * 100))
    report: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle.root), "model_id": bundle.model_id, "k_max": k_max, "ks": ks,
        "fusion": args.fusion, "pooling": pooling, "train_config": {**vars(cfg), "augment": augments},
        "data": {"train": describe(tr), "validation": describe(va), "all": describe(fs),
                 "test": describe(te) if te is not None else None,
                 "sources": {"real": args.real, "fake": args.fake, "csv": args.csv,
                             "test_real": args.test_real, "test_fake": args.test_fake,
                             "test_csv": args.test_csv},
                 "limit_per_class": args.limit_per_class, "val_frac": args.val_frac, "seed": args.seed,
                 "split_by": column, "test_groups": wanted,
                 "validation_groups": sorted({by_source[n].column(column) or "" for n in va.names}) if column else None,
                 "test_from_training_csv": len(held_items)},
        "tiles": bundle.manifest.get("tiles"),
        "calibration_rule": {"target_fpr_on_real_validation": args.target_fpr,
                             "abstain_frac_of_validation": args.abstain_frac},
        "per_k": {},
    }
    written = None
    test_scores: dict[int, tuple[np.ndarray, float]] = {}  # K -> (test p [N], threshold)
    def image_p(head: Any, f: Any, k: int) -> np.ndarray:
        """[N] p per image of feature set f: sigmoid of the mean crop logit (the runtime's rule)."""
        return probabilities(f.image_logits(head_logits(head, f.feature, f.stats(k))))

    te_items = [by_test[n] for n in te.names] if te is not None else []
    held_sources = {it.source for it in held_items}
    # two test sets when both are given: the held-out groups of the training CSVs and --test-*
    parts = {"heldout_groups": np.array([it.source in held_sources for it in te_items], bool)}
    parts["test_data"] = ~parts["heldout_groups"]
    parts = {name: m for name, m in parts.items() if m.any()} if len(parts["test_data"]) else {}
    group_col = column or next((c for c in ("generator", "source")
                                if te_items and all(it.column(c) for it in te_items)), None)
    if args.per_image:
        report["validation_images"] = list(va.names)
        if te is not None:
            report["test_images"] = [{"name": n, "label": int(lb)} for n, lb in zip(te.names, te.labels, strict=True)]
    for k in ks:
        s_tr, s_va = tr.stats(k), va.stats(k)
        # crop rows, each labelled with its image's label (one row per image when untiled)
        th = train_head(tr.feature, s_tr, tr.row_labels.astype(np.float32), va.feature, s_va,
                        va.row_labels.astype(np.float32), fusion=args.fusion, pooling=pooling, k=k,
                        cfg=cfg, log=log)
        p_va = image_p(th.head, va, k)
        thr = threshold_at_fpr(p_va[va.labels == 0], args.target_fpr)
        band = abstain_band(p_va, thr, args.abstain_frac)
        entry: dict[str, Any] = {
            "threshold": thr, "abstain_band": list(band), "best_epoch": th.best_epoch,
            "train_seconds": round(th.seconds, 1), "history": th.history,
            "validation": metrics(va.labels, p_va, thr, band, args.target_fpr),
            "stats_mean": tr.stats(k).mean(axis=0).tolist(),
        }
        if te is not None:
            p_te = image_p(th.head, te, k)
            entry["test"] = metrics(te.labels, p_te, thr, band, args.target_fpr)
            if len(parts) > 1:
                entry["test_parts"] = {name: metrics(te.labels[m], p_te[m], thr, band, args.target_fpr)
                                       for name, m in parts.items()}
            if group_col:
                entry["test_per_group"] = per_group(te_items, group_col, te.labels, p_te, thr)
            if args.per_image:
                entry["test_p"] = [float(v) for v in p_te]
            test_scores[k] = (p_te, thr)
        report["per_k"][str(k)] = entry
        v = entry["validation"]
        line = (f"K={k}: threshold {thr:.4f} band [{band[0]:.4f}, {band[1]:.4f}] | val acc "
                f"{v['at_threshold']['accuracy']:.4f} AUC {v['auc']:.4f} TPR@{pct}%FPR {v[f'tpr_at_{pct}pct_fpr']:.4f}")
        if te is not None:
            t = entry["test"]
            line += (f" | test acc {t['at_threshold']['accuracy']:.4f} (at 0.5: {t['at_0.5']['accuracy']:.4f})"
                     f" AUC {t['auc']:.4f} TPR@{pct}%FPR {t[f'tpr_at_{pct}pct_fpr']:.4f}")
            for name, t in entry.get("test_parts", {}).items():
                line += (f" | {name} (n={t['n']}) AUC {t['auc']:.4f} TPR@{pct}%FPR {t[f'tpr_at_{pct}pct_fpr']:.4f}"
                         f" FPR(real)@thr {t['at_threshold']['fpr']:.4f} TPR@thr {t['at_threshold']['tpr']:.4f}")
        log(line)
        if k == args.k and not args.no_write:
            decision = {"threshold": thr, "abstain_band": list(band), "calibration": {
                "rule": f"threshold = smallest p with <= {args.target_fpr:.0%} false positives on the real "
                        "validation images; abstain band = the p band around it holding "
                        f"{args.abstain_frac:.0%} of the validation images",
                "target_fpr": args.target_fpr, "abstain_frac": args.abstain_frac,
                "validation_images": len(va.names), "validation_real": int((va.labels == 0).sum()),
                "validation": entry["validation"]}}
            training = {"k": k, "fusion": args.fusion, "pooling": pooling, "epochs": cfg.epochs,
                        "best_epoch": th.best_epoch, "batch": cfg.batch, "lr": cfg.lr,
                        "augment": augments,
                        "weight_decay": cfg.weight_decay, "seed": cfg.seed, "data": report["data"],
                        "trained_at": report["created"],
                        **({"test": entry["test"]} if "test" in entry else {})}
            written = write_head(bundle.root, th.head, decision, training, out=args.out_bundle)
            report["written"] = {"bundle": str(written), "k": k}
            log(f"wrote the K={k} head into {written} (trained=True, threshold {thr:.4f})")
            from ..export.recheck import margins_after_training  # the new head moves p: measure again

            report["recheck"] = margins_after_training(written, args.real + args.fake, threads, log)
    if len(test_scores) > 1:
        # each K against the smallest K on the same test images: is a difference larger than chance?
        base = ks[0]
        report["paired_test"] = {"baseline_k": base, "per_k": {}}
        for k in ks[1:]:
            c = paired_comparison(te.labels, *test_scores[base], *test_scores[k], seed=args.seed)
            report["paired_test"]["per_k"][str(k)] = c
            lo, hi = c["accuracy_diff_ci95"]
            log(f"K={k} vs K={base} on test: accuracy {100 * c['accuracy_diff']:+.2f} points "
                f"(95% CI {100 * lo:+.2f} to {100 * hi:+.2f}; McNemar p={c['mcnemar_p']:.3g}, "
                f"{c['only_b_right']} vs {c['only_a_right']} images only one gets right), AUC "
                f"{c['auc_diff']:+.4f}, log-loss {c['log_loss_diff']:+.4f}")
    if args.report:
        write_json(args.report, report)
        log(f"report: {args.report}")
    if written is not None:
        Bundle(written)  # verify once more
    return report


def main(argv: list[str] | None = None) -> int:
    from ..runtime.commands import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging("stderr")
    try:
        run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (DataError, FileExistsError, ValueError) as e:
        print(f"cinemae-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cinemae-train: interrupted; extracted features are kept in the cache", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
