"""Evaluation of detection scores against labels (AUC, AP, TPR at a target FPR, thresholds),
shared by training (calibration, reports) and ``cinemae-bench``. (Not the service's Prometheus
metrics, which live with the service.)

Scores are p = sigmoid(logit), the probability of "AI-generated"; label 1 = AI-generated; the
decision rule is ``ai if p >= threshold``, as ``Detector.verdict`` applies it. numpy only.
"""

from __future__ import annotations

import numpy as np


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Logits [...] -> p = sigmoid(logit) [...], float64 (a logit beyond float range gives 0 or 1,
    without an overflow warning)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with mid-ranks for ties); NaN when one class is missing."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    # mid-ranks over runs of equal scores: a run spanning sorted positions i..j gets (i + j) / 2 + 1
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], len(ss)] - 1
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends) / 2.0 + 1.0, ends - starts + 1)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP = sum over positives of precision at their rank (descending scores, ties broken
    pessimistically by grouping)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    last = np.r_[ss[1:] != ss[:-1], True]  # evaluate only at the end of a tie group
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    prev = np.r_[0.0, recall[:-1]]
    return float(((recall - prev) * precision).sum())


def threshold_at_fpr(real_scores: np.ndarray, target_fpr: float = 0.05) -> float:
    """The smallest threshold t with fraction(real p >= t) <= target_fpr on these real images.
    [N] -> scalar. With no real images: 0.5."""
    r = np.sort(np.asarray(real_scores, dtype=np.float64))[::-1]
    n = len(r)
    if n == 0:
        return 0.5
    m = int(np.floor(target_fpr * n + 1e-9))  # how many real images may be flagged
    if m >= n:
        return float(r[-1])
    # flag at most the m highest: the threshold lies just above the (m+1)-th highest score
    return float(np.nextafter(r[m], np.inf))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target_fpr: float = 0.05) -> float:
    """True-positive rate at the threshold that gives <= target_fpr on the real images here."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.sum() == 0 or (~y).sum() == 0:
        return float("nan")
    t = threshold_at_fpr(s[~y], target_fpr)
    return float((s[y] >= t).mean())
