"""Accuracy, ROC AUC and TPR at a fixed FPR, per K, per generator and per perturbation.

Scores are logits (any monotone score works); label 1 = fake (the positive class), 0 = real.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.evaluation import auc, threshold_at_fpr
from .datasets import LabeledItem
from .perturb import Perturbation

if TYPE_CHECKING:
    from ..runtime.reship import ReshipEnsemble
    from ..runtime.tiles import TileSpec

_logger = logging.getLogger(__name__)


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve (``runtime.evaluation.auc``; ties count one half). NaN with one class."""
    return auc(np.asarray(labels), np.asarray(scores, dtype=np.float64))


def tpr_at_fpr(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
               fpr: float = 0.05) -> tuple[float, float]:
    """True-positive rate at the threshold that flags at most ``fpr`` of the real images here
    (``runtime.evaluation.threshold_at_fpr``, the rule training calibrates with). Returns (tpr, t)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if y.sum() == 0 or (~y).sum() == 0:
        return float("nan"), float("nan")
    t = threshold_at_fpr(s[~y], fpr)
    return float((s[y] >= t).mean()), t


def accuracy(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
             threshold: float) -> float:
    """Fraction right with the rule ``fake if score >= threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    return float(np.mean((s >= threshold) == y)) if len(s) else float("nan")


def metrics(scores: np.ndarray, labels: np.ndarray, threshold: float, fpr: float = 0.05
            ) -> dict[str, Any]:
    """{accuracy, auc, tpr_at_fpr, fpr, n_real, n_fake} for one set of scores."""
    tpr, _ = tpr_at_fpr(scores, labels, fpr)
    return {"accuracy": accuracy(scores, labels, threshold), "auc": roc_auc(scores, labels),
            "tpr_at_fpr": tpr, "fpr": fpr, "n_real": int((labels == 0).sum()),
            "n_fake": int((labels == 1).sum())}


@dataclass
class AccuracyRow:
    """Metrics of one (perturbation, K) over the whole set, and per named generator.

    verdicts: how the Detector's verdicts (threshold and abstain band) fare: the share
    ``uncertain``, the accuracy of the decided ones and, against the clean row of the same K, the
    flip rates (:func:`flip_rates`); ``ensemble``: the same for the re-shipping ensemble's verdicts
    (when one is asked for)."""

    perturbation: str
    k: int
    metrics: dict[str, Any]
    per_generator: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    backend: str = ""  # the runner that scored it ("onnxruntime-cpu int8", ...)
    verdicts: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"backend": self.backend, "perturbation": self.perturbation, "k": self.k, **self.metrics,
             "per_generator": self.per_generator, "seconds": round(self.seconds, 3),
             "note": self.note, "verdicts": self.verdicts}
        if self.ensemble is not None:
            d["ensemble"] = self.ensemble
        return d


def verdict_summary(verdicts: Sequence[str], labels: np.ndarray) -> dict[str, Any]:
    """[N] verdicts and labels -> {uncertain (share), decided_accuracy (right among ai/real),
    ai, real, uncertain_n (counts)}."""
    v = np.asarray(verdicts, dtype=object)
    y = np.asarray(labels).astype(bool)
    decided = v != "uncertain"
    right = (v == "ai") == y
    return {"uncertain": float(np.mean(~decided)) if len(v) else float("nan"),
            "decided_accuracy": float(np.mean(right[decided])) if decided.any() else float("nan"),
            "ai": int((v == "ai").sum()), "real": int((v == "real").sum()), "uncertain_n": int((~decided).sum())}


def flip_rates(before: Sequence[str], after: Sequence[str], labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """The verdicts of the same N images before and after a perturbation -> per class (``all``,
    ``real``, ``fake``): n, ``flipped`` (the verdict differs: ai / real / uncertain, any change),
    ``hard`` (ai <-> real) and their rates (NaN for an empty class)."""
    b = np.asarray(before, dtype=object)
    a = np.asarray(after, dtype=object)
    y = np.asarray(labels).astype(bool)
    changed = b != a
    hard = ((b == "ai") & (a == "real")) | ((b == "real") & (a == "ai"))
    out = {}
    for group, sel in (("all", np.ones(len(y), bool)), ("real", ~y), ("fake", y)):
        n = int(sel.sum())
        out[group] = {"n": n, "flipped": int((changed & sel).sum()), "hard": int((hard & sel).sum()),
                      "rate": float((changed & sel).sum() / n) if n else float("nan"),
                      "hard_rate": float((hard & sel).sum() / n) if n else float("nan")}
    return out


@dataclass
class Prepared:
    """Items ready for the backend: ``rows`` [R, 3, S, S] holds, per item in order, the rows of the
    (perturbed) image and then those of each ensemble view; ``counts[i]`` = rows per view of item
    i (the image's first; 1 each untiled, T for a tiled bundle)."""

    rows: np.ndarray
    counts: list[list[int]]
    labels: np.ndarray
    gens: list[str | None]
    names: list[str]
    errors: list[dict[str, str]]


def prepare_groups(items: list[LabeledItem], perturbation: Perturbation, img_size: int, crop_ratio: float,
                   tiles: TileSpec | None = None, views: ReshipEnsemble | None = None) -> Prepared:
    """Decode, perturb and preprocess every item as the runtime does (resize + centre crop, or the
    bundle's ``tiles``), adding the ensemble's ``views`` of each perturbed image; an item that
    cannot be read (or perturbed within the limits) is an error record, not a row."""
    from ..runtime.preprocess import InputError, load_image
    from ..runtime.reship import original_and_views

    parts, counts, labels, gens, names, errors = [], [], [], [], [], []
    for it in items:
        try:
            x = perturbation.apply(load_image(it.read()))
            group = original_and_views(x, img_size, crop_ratio, tiles, views)[0]
        except InputError as e:
            errors.append({"item": it.name, "code": e.code, "error": str(e)})
            continue
        except OSError as e:
            errors.append({"item": it.name, "code": "not_found", "error": str(e)})
            continue
        parts += group
        counts.append([len(g) for g in group])
        labels.append(it.label)
        gens.append(it.generator)
        names.append(it.name)
    rows = np.concatenate(parts) if parts else np.zeros((0, 3, img_size, img_size), np.float32)
    return Prepared(rows, counts, np.asarray(labels, dtype=np.int64), gens, names, errors)


def prepare(items: list[LabeledItem], perturbation: Perturbation, img_size: int, crop_ratio: float
            ) -> tuple[np.ndarray, np.ndarray, list[str | None], list[dict[str, str]]]:
    """Decode, perturb and preprocess every item (untiled, no views): images [N, 3, S, S],
    labels [N], generators [N], and one error record per item that could not be read."""
    p = prepare_groups(items, perturbation, img_size, crop_ratio)
    return p.rows, p.labels, p.gens, p.errors


def view_logits(row_logits: np.ndarray, counts: list[list[int]], tiles: TileSpec | None) -> list[list[float]]:
    """Backend logits [R] of :class:`Prepared` rows -> per item, one logit per view (the image's
    first); a tiled view's crop logits reduce as the runtime reduces them."""
    from ..runtime.tiles import reduce_logits

    out, at = [], 0
    for c in counts:
        item = []
        for n in c:
            seg = np.asarray(row_logits[at:at + n], dtype=np.float64)
            item.append(reduce_logits(seg, tiles) if tiles is not None else float(seg[0]))
            at += n
        out.append(item)
    return out


def _verdicts(logits: np.ndarray, threshold: float, band: Sequence[float]) -> list[str]:
    from ..runtime.detector import sigmoid
    from ..runtime.reship import decide

    return [decide(sigmoid(float(x)), threshold, band) for x in logits]


def evaluate(items: list[LabeledItem], run_logits: Callable[[np.ndarray, int], np.ndarray],
             ks: Sequence[int], perturbations: Sequence[Perturbation], img_size: int,
             crop_ratio: float, threshold_logit: float, fpr: float = 0.05,
             log: Callable[[str], None] = _logger.info, *, tiles: TileSpec | None = None,
             abstain_band: Sequence[float] = (0.0, 0.0), views: ReshipEnsemble | None = None,
             chunk: int = 32) -> tuple[list[AccuracyRow], list[dict[str, str]]]:
    """Score ``items`` at every K under every perturbation (identically for both classes).

    run_logits(rows [R, 3, S, S], k) -> logits [R]. Items are prepared ``chunk`` at a time (memory
    stays bounded for tiled bundles and views). Verdicts use the threshold p = sigmoid(
    ``threshold_logit``) and ``abstain_band``; flips compare each item's verdict with its verdict in
    the clean (``none``) pass at the same K, over the items scored in both. With ``views`` each item
    is also scored as the ensemble's views in the same call (their rows follow its own) and the
    ensemble's verdicts are reported beside the plain ones. Returns the rows and the per-item errors
    (from the clean pass; a perturbation may add its own, e.g. an upscale over the pixel limit)."""
    from ..runtime.detector import sigmoid
    from ..runtime.reship import ensemble_verdict

    thr_p = sigmoid(threshold_logit)
    rows: list[AccuracyRow] = []
    all_errors: list[dict[str, str]] = []
    clean: dict[int, dict[str, tuple[str, str | None]]] = {}  # k -> name -> (verdict, ensemble verdict)
    for pert in perturbations:
        labels_l: list[int] = []
        gens: list[str | None] = []
        names: list[str] = []
        errors: list[dict[str, str]] = []
        per_k: dict[int, list[list[float]]] = {k: [] for k in ks}
        secs = dict.fromkeys(ks, 0.0)
        for c0 in range(0, len(items), max(1, chunk)):
            prep = prepare_groups(items[c0:c0 + chunk], pert, img_size, crop_ratio, tiles, views)
            errors += prep.errors
            if not prep.counts:
                continue
            labels_l += prep.labels.tolist()
            gens += prep.gens
            names += prep.names
            for k in ks:
                t0 = time.perf_counter()
                got = run_logits(prep.rows, k)
                secs[k] += time.perf_counter() - t0
                per_k[k] += view_logits(got, prep.counts, tiles)
        if pert.kind == "none":
            all_errors = errors
        elif errors:
            log(f"  {pert.name}: {len(errors)} item(s) not scored ({errors[0]['error']})")
        if not labels_l:
            continue
        labels = np.asarray(labels_l, dtype=np.int64)
        for k in ks:
            vl = per_k[k]
            logits = np.asarray([v[0] for v in vl], dtype=np.float64)
            m = metrics(logits, labels, threshold_logit, fpr)
            per_gen: dict[str, dict[str, Any]] = {}
            named = sorted({g for g in gens if g})
            real = labels == 0
            for g in named:
                sel = real | np.array([x == g for x in gens])
                gm = metrics(logits[sel], labels[sel], threshold_logit, fpr)
                per_gen[g] = {"n_fake": gm["n_fake"], "auc": gm["auc"], "tpr_at_fpr": gm["tpr_at_fpr"],
                              "detected": float(np.mean(logits[sel & (labels == 1)] >= threshold_logit))}
            plain = _verdicts(logits, thr_p, abstain_band)
            ens: list[str | None] = [None] * len(plain)
            if views is not None:
                ens = [ensemble_verdict(v0, _verdicts(np.asarray(v[1:]), thr_p, abstain_band))
                       for v0, v in zip(plain, vl, strict=True)]
            if pert.kind == "none":
                clean[k] = {n: (a, b) for n, a, b in zip(names, plain, ens, strict=True)}
            ref = clean.get(k, {})
            both = [i for i, n in enumerate(names) if n in ref]
            yb = labels[both]
            vsum = verdict_summary(plain, labels)
            vsum["flip"] = flip_rates([ref[names[i]][0] for i in both], [plain[i] for i in both], yb)
            row = AccuracyRow(pert.name, k, m, per_gen, secs[k], verdicts=vsum)
            if views is not None:
                row.ensemble = {"views": views.names, **verdict_summary(ens, labels),
                                "flip": flip_rates([ref[names[i]][1] for i in both], [ens[i] for i in both], yb)}
            rows.append(row)
            f = vsum["flip"]["all"]
            log(f"  accuracy {pert.name:<14} K={k}: acc {m['accuracy']:.3f}  AUC {m['auc']:.3f}  "
                f"TPR@{fpr:.0%}FPR {m['tpr_at_fpr']:.3f}  flips {f['flipped']}/{f['n']}"
                + (f" (ensemble {row.ensemble['flip']['all']['flipped']})" if row.ensemble else "")
                + f"  (n={len(labels)})")
    return rows, all_errors
