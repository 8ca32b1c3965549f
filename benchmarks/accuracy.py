"""Accuracy, ROC AUC and TPR at a fixed FPR, per K, per generator and per perturbation.

Scores are logits (any monotone score works); label 1 = fake (the positive class), 0 = real.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime.evaluation import auc, threshold_at_fpr
from .datasets import LabeledItem
from .perturb import Perturbation

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
    """Metrics of one (perturbation, K) over the whole set, and per named generator."""

    perturbation: str
    k: int
    metrics: dict[str, Any]
    per_generator: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    backend: str = ""  # the runner that scored it ("onnxruntime-cpu int8", ...)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "perturbation": self.perturbation, "k": self.k, **self.metrics,
                "per_generator": self.per_generator, "seconds": round(self.seconds, 3),
                "note": self.note}


def prepare(items: list[LabeledItem], perturbation: Perturbation, img_size: int, crop_ratio: float
            ) -> tuple[np.ndarray, np.ndarray, list[str | None], list[dict[str, str]]]:
    """Decode, perturb and preprocess every item: images [N, 3, S, S], labels [N],
    generators [N], and one error record per item that could not be read."""
    from ..runtime.preprocess import InputError, load_image, normalise, resize_crop

    arrays, labels, gens, errors = [], [], [], []
    for it in items:
        try:
            rgb = load_image(it.read())
            arrays.append(normalise(resize_crop(perturbation.apply(rgb), img_size, crop_ratio)))
        except InputError as e:
            errors.append({"item": it.name, "code": e.code, "error": str(e)})
            continue
        except OSError as e:
            errors.append({"item": it.name, "code": "not_found", "error": str(e)})
            continue
        labels.append(it.label)
        gens.append(it.generator)
    images = np.stack(arrays) if arrays else np.zeros((0, 3, img_size, img_size), np.float32)
    return images, np.asarray(labels, dtype=np.int64), gens, errors


def evaluate(items: list[LabeledItem], run_logits: Callable[[np.ndarray, int], np.ndarray],
             ks: Sequence[int], perturbations: Sequence[Perturbation], img_size: int,
             crop_ratio: float, threshold_logit: float, fpr: float = 0.05,
             log: Callable[[str], None] = _logger.info) -> tuple[list[AccuracyRow], list[dict[str, str]]]:
    """Score ``items`` at every K under every perturbation (identically for both classes).

    run_logits(images [N, 3, S, S], k) -> logits [N]. Returns the rows and the per-item errors
    (from the clean pass; a perturbation never adds errors since it runs on decoded pixels)."""
    rows: list[AccuracyRow] = []
    all_errors: list[dict[str, str]] = []
    for pert in perturbations:
        images, labels, gens, errors = prepare(items, pert, img_size, crop_ratio)
        if pert.kind == "none":
            all_errors = errors
        if len(labels) == 0:
            continue
        for k in ks:
            t0 = time.perf_counter()
            logits = run_logits(images, k)
            m = metrics(logits, labels, threshold_logit, fpr)
            per_gen: dict[str, dict[str, Any]] = {}
            named = sorted({g for g in gens if g})
            real = labels == 0
            for g in named:
                sel = real | np.array([x == g for x in gens])
                gm = metrics(logits[sel], labels[sel], threshold_logit, fpr)
                per_gen[g] = {"n_fake": gm["n_fake"], "auc": gm["auc"], "tpr_at_fpr": gm["tpr_at_fpr"],
                              "detected": float(np.mean(logits[sel & (labels == 1)] >= threshold_logit))}
            rows.append(AccuracyRow(pert.name, k, m, per_gen, time.perf_counter() - t0))
            log(f"  accuracy {pert.name:<10} K={k}: acc {m['accuracy']:.3f}  AUC {m['auc']:.3f}  "
                f"TPR@{fpr:.0%}FPR {m['tpr_at_fpr']:.3f}  (n={len(labels)})")
    return rows, all_errors
