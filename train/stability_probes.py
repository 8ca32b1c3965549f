"""Why verdicts flip, and four cheap levers against it, on a shipped tiled bundle (train/RECIPE.md section 7).

    python -m cinemae.train.stability_probes --bundle photo32 --cache runs/crop-cache \
        --out benchmarks/results/photo32_stability_probes.json

Selection sets only: the validation images of photos-train's training sources and (a) the held-out
sources (:func:`photo_tiles.split_sources`); ``../shared/data/photos`` is never read. The bundle's own
graphs and head score a ``--tiles``-crop copy of its tiling (``trim_borders``, ``max_side`` 512) of
every image as delivered and re-shipped; image logit = mean crop logit; verdicts at the bundle's
threshold unless said otherwise. Reported:

- ``class_shift``: per re-shipping, the median and quartiles of the image-logit change, reals and fakes apart;
- ``quality_offset``: the verdict flips if a known JPEG quality's median real shift, times a, were subtracted
  (the upper bound of a quality-aware offset: the quality is given, not estimated);
- ``reductions``: other reductions of the crop logits than the mean (threshold at 5% FPR on these reals each);
- ``attribution``: under each ``jpeg:Q`` (same size, so the crops correspond one to one), the image-logit
  change when only the pooled global feature is re-shipped and when only the three LCAS statistics are
  (the head's torch weights, ``--head``, checked against the runtime's logits);
- ``view_mean``: one verdict from the mean of the ensemble members' logits (the image and its views, or
  a subset), threshold at 5% FPR on these reals, against the image's own logit at the same rule;
- ``fusion``: the bundle's logit plus a whole-image model's (``--companion``, cifake32: one 32-px view,
  blind to JPEG and scale), each over its spread, threshold at 5% FPR on these reals, against the bundle alone;
- ``ensemble_rules``: the re-shipping ensemble (original + ``--ensemble`` views) under its rule
  (:func:`runtime.reship.ensemble_verdict`), with per-view offsets, and by majority (``uncertain`` on a tie),
  each image and each re-shipping of it scored with its own views.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..benchmarks.accuracy import flip_rates
from ..runtime.evaluation import auc, threshold_at_fpr
from ..runtime.reship import ENSEMBLES, RESHIP_SET, ensemble_verdict
from ..runtime.tiles import mean_logit_by_image
from .photo_tiles import DEFAULT_HELDOUT, Features, crop_features, fake_labels, read_labels, split_sources, tiled_copy

log = logging.getLogger(__name__)

#: re-shippings of the class-shift, offset and reduction probes (a JPEG ladder, the half-size copy, the crop)
SHIFT_VIEWS = ("jpeg:40", "jpeg:60", "jpeg:75", "jpeg:85", "jpeg:95", "shrink:0.5", "crop:0.6")
#: re-shippings the ensemble rules are measured under (the bench's, less the two that flip ~nothing here)
ENSEMBLE_UNDER = ("upscale:2", "crop:0.6", "jpeg:40", "jpeg:60", "jpeg:75", "shrink:0.5")

REDUCTIONS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda x: float(np.mean(x)),
    "median": lambda x: float(np.median(x)),
    "trimmed_mean_20": lambda x: float(np.mean(np.sort(x)[len(x) // 5: len(x) - len(x) // 5])),
    "clip_2": lambda x: float(np.mean(np.clip(x, -2, 2))),
    "clip_1": lambda x: float(np.mean(np.clip(x, -1, 1))),
    "quantile_75": lambda x: float(np.percentile(x, 75)),
    "quantile_25": lambda x: float(np.percentile(x, 25)),
    "share_positive": lambda x: float(np.mean(x > 0)),
}


def image_logits(fs: Features, n: int, reduce: Callable[[np.ndarray], float] | None = None) -> np.ndarray:
    """Crop rows -> [V, n] image logits per view (view 0 = as delivered); ``reduce`` None = the mean."""
    views = int(fs["view"].max()) + 1
    if reduce is None:
        return np.array([mean_logit_by_image(fs["logit"][fs["view"] == v], fs["owner"][fs["view"] == v], n)
                         for v in range(views)])
    out = np.zeros((views, n))
    for v in range(views):
        sel = fs["view"] == v
        lg, own = fs["logit"][sel], fs["owner"][sel]
        order = np.argsort(own, kind="stable")
        for i, part in enumerate(np.split(lg[order], np.cumsum(np.bincount(own, minlength=n))[:-1])):
            out[v, i] = reduce(part) if len(part) else 0.0
    return out


def verdicts(logits: np.ndarray, thr: float) -> np.ndarray:
    """[...] logits -> "ai" / "real" at logit threshold ``thr`` (the runtime's rule, no abstain band)."""
    return np.where(np.asarray(logits) >= thr, "ai", "real")


def class_shift(L: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """L [1 + len(names), n] -> per re-shipping and class the median and quartiles of the logit change."""
    out: dict[str, Any] = {"logit_spread": float(np.std(L[0]))}
    for v, nm in enumerate(names):
        d = L[v + 1] - L[0]
        out[nm] = {c: {"median": float(np.median(d[y == k])), "q25": float(np.percentile(d[y == k], 25)),
                       "q75": float(np.percentile(d[y == k], 75))} for k, c in ((0, "real"), (1, "fake"))}
    return out


def quality_offset(L: np.ndarray, y: np.ndarray, names: Sequence[str], thr: float,
                   shares: Sequence[float] = (0.0, 0.5, 0.75, 1.0)) -> dict[str, Any]:
    """Flip rates (all / real / fake) under each ``jpeg:Q`` view when a x the reals' median shift at Q
    is subtracted from that view's logits (a = 0: the bundle as it is)."""
    base = verdicts(L[0], thr)
    out: dict[str, Any] = {}
    for a in shares:
        row = {}
        for v, nm in enumerate(names):
            if not nm.startswith("jpeg:"):
                continue
            off = a * float(np.median((L[v + 1] - L[0])[y == 0]))
            f = flip_rates(base, verdicts(L[v + 1] - off, thr), y)
            row[nm] = {"offset": off, **{g: f[g]["rate"] for g in ("all", "real", "fake")}}
        out[f"{a:g}"] = row
    return out


def reductions(fs: Features, y: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per crop-logit reduction: AUC and TPR as delivered and the flip rate per re-shipping, the
    threshold at 5% FPR on these reals (each reduction its own)."""
    out: dict[str, Any] = {}
    for nm, fn in REDUCTIONS.items():
        r = threshold_flips(image_logits(fs, len(y), fn), y, names)
        out[nm] = {k: r[k] for k in ("auc", "tpr", "mean_flip", "flips")}
    return out


def attribution(fs: Features, head: Any, y: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Which input of the head carries the logit shift under recompression: per ``jpeg:Q`` view (crops
    at the same places as the original's; images whose crop count changed are left out), the median
    change of the image logit, reals and fakes apart, with both inputs re-shipped (``both``), only
    the pooled global feature g (``global``) or only the statistics (``stats``); and the median
    change of each statistic against its spread. fs: rows with view 0 = as delivered."""
    from .head import head_logits

    n = len(y)
    g, s, own, view = fs["feature"], fs["stats"], fs["owner"], fs["view"]
    o = view == 0
    base = mean_logit_by_image(head_logits(head, g[o], s[o]), own[o], n)
    out: dict[str, Any] = {"max_abs_vs_runtime": float(np.max(np.abs(
        base - mean_logit_by_image(fs["logit"][o], own[o], n))))}
    counts0 = np.bincount(own[o], minlength=n)
    for v, nm in enumerate(names, start=1):
        if not nm.startswith("jpeg:"):
            continue
        m = view == v
        same = np.bincount(own[m], minlength=n) == counts0
        mm, oo = m & same[own], o & same[own]
        ok = np.flatnonzero(same)

        def change(gg: np.ndarray, ss: np.ndarray, mm: np.ndarray = mm, ok: np.ndarray = ok) -> np.ndarray:
            return mean_logit_by_image(head_logits(head, gg, ss), own[mm], n)[ok] - base[ok]

        parts = {"both": change(g[mm], s[mm]), "global": change(g[mm], s[oo]), "stats": change(g[oo], s[mm])}
        yy = y[ok]
        ds = np.abs(s[mm] - s[oo])
        out[nm] = {"images": int(len(ok)),
                   **{k: {"real": float(np.median(d[yy == 0])), "fake": float(np.median(d[yy == 1]))}
                      for k, d in parts.items()},
                   "stat_change_over_spread": (np.median(ds, 0) / s[o].std(0)).tolist()}
    return out


def threshold_flips(L: np.ndarray, y: np.ndarray, names: Sequence[str], val: np.ndarray | None = None
                    ) -> dict[str, Any]:
    """L [1 + len(names), n] image logits (row 0 as delivered) -> AUC (also on the ``val`` images),
    TPR and per re-shipping the flip share at the threshold of 5% FPR on these reals, and the logit
    shift (median |change| over the delivered logits' spread)."""
    thr = threshold_at_fpr(L[0][y == 0], 0.05)
    base = verdicts(L[0], thr)
    flips = {nm: flip_rates(base, verdicts(L[i + 1], thr), y)["all"]["rate"] for i, nm in enumerate(names)}
    out = {"auc": auc(y, L[0]), "tpr": float(np.mean(L[0][y == 1] >= thr)),
           "mean_flip": float(np.mean(list(flips.values()))), "max_flip": float(max(flips.values())),
           "flips": flips, "logit_shift": float(np.mean([np.median(np.abs(L[i + 1] - L[0]))
                                                         for i in range(len(names))]) / np.std(L[0]))}
    if val is not None:
        out["val_auc"] = auc(y[val], L[0][val])
    return out


def view_mean(L: np.ndarray, y: np.ndarray, names: Sequence[str], under: Sequence[str],
              member_sets: dict[str, Sequence[str]]) -> dict[str, Any]:
    """L as :func:`ensemble_rules` takes it -> per member set (views added to the image; () = the image
    alone) :func:`threshold_flips` of the mean of the members' logits, each image and each re-shipping
    of it with its own members."""
    ix = {nm: i + 1 for i, nm in enumerate(names)}
    ix["none"] = 0

    def score(r: str, members: Sequence[str]) -> np.ndarray:
        rows = [L[ix[r]]] + [L[ix[v]] if r == "none" else L[ix[f"{r}+{v}"]] for v in members]
        return np.mean(rows, axis=0)

    return {nm: {"members": list(m), **threshold_flips(np.array([score(r, m) for r in ("none", *under)]), y, under)}
            for nm, m in member_sets.items()}


def companion_logits(rows: list[dict[str, str]], names: Sequence[str], bundle: str, backend: str) -> np.ndarray:
    """Logits [1 + len(names), n] of another bundle on every image as delivered and re-shipped."""
    from ..runtime.detector import Detector
    from ..runtime.preprocess import load_image
    from .reship_augment import apply_view, parse_view

    out = np.zeros((1 + len(names), len(rows)))
    with Detector(bundle, backend=backend, device="cpu", provenance=False) as det:
        for i, r in enumerate(rows):
            rgb = load_image(r["path"], det.max_pixels, det.max_bytes, det.formats)
            for v, c in enumerate([None, *names]):
                im = rgb if c is None else apply_view(rgb, parse_view(c), det.max_pixels)
                out[v, i] = det.detect(im).logit
    return out


def majority_verdict(members: np.ndarray) -> np.ndarray:
    """[M, n] member verdicts ("ai"/"real") -> the majority per image; ``uncertain`` on a tie."""
    ai = (members == "ai").sum(0)
    return np.where(2 * ai > len(members), "ai", np.where(2 * ai < len(members), "real", "uncertain"))


def ensemble_rules(L: np.ndarray, y: np.ndarray, names: Sequence[str], thr: float, under: Sequence[str],
                   views: Sequence[str]) -> dict[str, Any]:
    """L [1 + len(names), n], names holding ``views``, each of ``under`` and every ``R+view`` chain ->
    per rule: clean ``uncertain`` share and decided accuracy, per re-shipping the flip (any change) and
    hard-flip (ai <-> real) counts against the clean ensemble verdict, and their totals."""
    ix = {nm: i + 1 for i, nm in enumerate(names)}
    ix["none"] = 0

    def members(r: str) -> np.ndarray:  # [1 + len(views), n]: the (re-shipped) image, then its views
        first = L[ix[r]]
        return np.array([first] + [L[ix[v]] if r == "none" else L[ix[f"{r}+{v}"]] for v in views])

    clean = members("none")
    pooled = {v: float(np.median(clean[j + 1] - clean[0])) for j, v in enumerate(views)}
    reals = {v: float(np.median((clean[j + 1] - clean[0])[y == 0])) for j, v in enumerate(views)}

    def agree(off: dict[str, float]) -> Callable[[np.ndarray], np.ndarray]:
        def rule(m: np.ndarray) -> np.ndarray:
            vs = [verdicts(m[j + 1] - off[v], thr) for j, v in enumerate(views)]
            o = verdicts(m[0], thr)
            return np.array([ensemble_verdict(o[i], [x[i] for x in vs]) for i in range(m.shape[1])])
        return rule

    rules: dict[str, tuple[Callable[[np.ndarray], np.ndarray], dict[str, float] | None]] = {
        "agree": (agree(dict.fromkeys(views, 0.0)), None),
        "agree_offset_pooled": (agree(pooled), pooled),
        "agree_offset_reals": (agree(reals), reals),
        "majority": (lambda m: majority_verdict(verdicts(m, thr)), None),
    }
    out: dict[str, Any] = {}
    for nm, (rule, off) in rules.items():
        v0 = rule(clean)
        dec = v0 != "uncertain"
        per = {}
        for r in under:
            v = rule(members(r))
            f = flip_rates(v0, v, y)["all"]
            per[r] = {"flipped": f["flipped"], "hard": f["hard"], "rate": f["rate"],
                      "uncertain": float(np.mean(v == "uncertain"))}
        out[nm] = {"offsets": off, "clean_uncertain": float(np.mean(~dec)),
                   "clean_decided_accuracy": float(np.mean((v0[dec] == "ai") == (y[dec] == 1))),
                   "mean_flip": float(np.mean([p["rate"] for p in per.values()])),
                   "hard_total": int(sum(p["hard"] for p in per.values())),
                   "pairs": int(len(y) * len(under)), "under": per}
    return out


def probe(bundle: str, train_dir: Path, cache: Path | None, tiles: int = 64, backend: str = "openvino",
          ensemble: str = "photo", head: Path | None = None, companion: str | None = "cifake32") -> dict[str, Any]:
    """Every probe above on the selection sets -> one JSON-able record (``attribution`` only with
    ``head``, the bundle head's torch weights, ``export/weights/NAME/head.pt``)."""
    from ..runtime.bundle import resolve_bundle
    from ..runtime.detector import Detector

    base = resolve_bundle(bundle)
    threshold = float(base.manifest["decision"]["threshold"])
    thr = float(np.log(threshold / (1 - threshold)))
    train_rows, held, is_val = split_sources(read_labels(train_dir), DEFAULT_HELDOUT, 0)
    rows = [r for r, v in zip(train_rows, is_val, strict=True) if v] + held
    y = fake_labels(rows).astype(int)
    n_val = int(sum(is_val))
    views = ENSEMBLES[ensemble]
    chains = list(views) + [c for r in ENSEMBLE_UNDER for c in [r] + [f"{r}+{v}" for v in views]]
    with tempfile.TemporaryDirectory() as tmp:
        tb = tiled_copy(base.root, Path(tmp) / "t", tiles, True, 512, None)
        with Detector(tb, backend=backend, device="cpu", provenance=False) as det:
            fs_shift = crop_features(det, rows, list(SHIFT_VIEWS), 0, cache)
            fs_ens = crop_features(det, rows, chains, 0, cache)
            # the val and (a) sets apart, as tiling_selection keys its cached rows
            fs_all = [crop_features(det, part, list(RESHIP_SET), 0, cache)
                      for part in (rows[:n_val], held)] if companion else None
    L = image_logits(fs_shift, len(rows))
    L_ens = image_logits(fs_ens, len(rows))
    val = np.arange(len(rows)) < n_val
    fused = None
    if companion and fs_all is not None:
        lp = np.concatenate([image_logits(f, m) for f, m in zip(fs_all, (n_val, len(held)), strict=True)], axis=1)
        lc = companion_logits(rows, RESHIP_SET, companion, "onnxruntime")
        fused = {"companion": companion, "rule": "bundle logit / its spread + companion logit / its spread",
                 "bundle": threshold_flips(lp, y, RESHIP_SET, val),
                 "companion_alone": threshold_flips(lc, y, RESHIP_SET, val),
                 "fused": threshold_flips(lp / np.std(lp[0]) + lc / np.std(lc[0]), y, RESHIP_SET, val)}
    res = {"bundle": bundle, "threshold": threshold, "tiles": tiles, "backend": backend,
           "images": {"validation": n_val, "heldout": len(held), "real": int((y == 0).sum()),
                      "fake": int((y == 1).sum())},
           "as_delivered": {"auc": auc(y, L[0]), "fpr": float(np.mean(L[0][y == 0] >= thr)),
                            "tpr": float(np.mean(L[0][y == 1] >= thr))},
           "class_shift": class_shift(L, y, SHIFT_VIEWS),
           "quality_offset": quality_offset(L, y, SHIFT_VIEWS, thr),
           "reductions": reductions(fs_shift, y, SHIFT_VIEWS),
           "attribution": attribution(fs_shift, _load_head(head), y, SHIFT_VIEWS) if head else None,
           "ensemble": {"views": list(views), "under": list(ENSEMBLE_UNDER)},
           "view_mean": view_mean(L_ens, y, chains, ENSEMBLE_UNDER,
                                  {"image alone": (), "image + " + " + ".join(views): views,
                                   "image + jpeg:60 + shrink:0.5": ("jpeg:60", "shrink:0.5")}),
           "fusion": fused,
           "ensemble_rules": ensemble_rules(L_ens, y, chains, thr, ENSEMBLE_UNDER, views)}
    return res


def _load_head(path: Path) -> Any:
    from ..export.head import load_head

    return load_head(str(path))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="photo32", help="a tiled bundle (its graphs, head and threshold)")
    ap.add_argument("--train-dir", default="../shared/data/photos-train")
    ap.add_argument("--cache", default=None, help="crop-row cache folder (photo_tiles.crop_features)")
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--ensemble", default="photo", choices=sorted(ENSEMBLES))
    ap.add_argument("--companion", default="cifake32",
                    help="a whole-image bundle for the fusion probe ('' = skip it)")
    ap.add_argument("--head", default=None,
                    help="the bundle head's torch weights for the attribution probe (default: "
                         "export/weights/BUNDLE/head.pt when the bundle is named and the file exists)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    head = Path(args.head) if args.head else Path(__file__).parents[1] / "export" / "weights" / args.bundle / "head.pt"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = probe(args.bundle, Path(args.train_dir), Path(args.cache) if args.cache else None, args.tiles,
                args.backend, args.ensemble, head if head.is_file() else None, args.companion or None)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
