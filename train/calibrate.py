"""Metrics, threshold calibration and the abstain band (numpy only).

Scores are p = sigmoid(logit), the probability of "AI-generated"; label 1 = AI-generated.
A verdict is "ai" when p >= threshold (as ``runtime.detector.Detector.verdict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with mid-ranks for ties); NaN when one class is missing."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = s[order]
    i = 0
    while i < len(ss):  # mid-ranks over runs of equal scores
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
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


def abstain_band(scores: np.ndarray, threshold: float, frac: float = 0.05) -> tuple[float, float]:
    """The band of p around ``threshold`` holding about ``frac`` of these (validation) scores,
    half on either side by rank: [lo, hi] with lo <= threshold <= hi. frac=0 gives an empty
    band (threshold, threshold), which the detector treats as "no abstention"."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if frac <= 0 or n == 0:
        return float(threshold), float(threshold)
    pos = int(np.searchsorted(s, threshold))
    half = max(1, int(round(frac * n / 2)))
    lo = s[max(0, pos - half)]
    hi = s[min(n - 1, pos + half - 1)]
    return float(min(lo, threshold)), float(max(hi, threshold))


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float,
            band: tuple[float, float] | None = None, target_fpr: float = 0.05) -> dict[str, Any]:
    """Accuracy, balanced accuracy, FPR/TPR at ``threshold`` (and at 0.5), AUC, AP, TPR at
    ``target_fpr`` (threshold re-chosen on these labels: an oracle figure, as usually reported),
    and coverage/accuracy outside the abstain band."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"n": int(len(y)), "n_real": int((~y).sum()), "n_fake": int(y.sum())}

    def at(t: float) -> dict[str, float]:
        pred = s >= t
        tpr = float(pred[y].mean()) if y.any() else float("nan")
        fpr = float(pred[~y].mean()) if (~y).any() else float("nan")
        return {"threshold": float(t), "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
                "balanced_accuracy": float(np.nanmean([tpr, 1 - fpr])), "tpr": tpr, "fpr": fpr}

    out["at_threshold"] = at(threshold)
    out["at_0.5"] = at(0.5)
    out["auc"] = auc(y, s)
    out["ap"] = average_precision(y, s)
    out[f"tpr_at_{int(round(target_fpr * 100))}pct_fpr"] = tpr_at_fpr(y, s, target_fpr)
    if band is not None and band[0] < band[1]:
        keep = ~((s >= band[0]) & (s <= band[1]))
        out["abstain"] = {"band": [float(band[0]), float(band[1])], "coverage": float(keep.mean()),
                          "accuracy_when_decided": float(((s[keep] >= threshold) == y[keep]).mean())
                          if keep.any() else float("nan")}
    return out
