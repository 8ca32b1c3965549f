"""Metrics, threshold calibration and the abstain band (numpy only).

Scores are p = sigmoid(logit), the probability of "AI-generated"; label 1 = AI-generated.
A verdict is "ai" when p >= threshold (as ``runtime.detector.Detector.verdict``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..runtime.evaluation import auc, average_precision, threshold_at_fpr, tpr_at_fpr

__all__ = ["abstain_band", "auc", "average_precision", "log_loss", "mcnemar_p", "metrics", "paired_comparison",
           "threshold_at_fpr", "tpr_at_fpr"]


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


def _nll(y: np.ndarray, s: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Per-image binary cross-entropy [N] (natural log; p clipped to [eps, 1-eps])."""
    s = np.clip(s, eps, 1 - eps)
    return np.where(y, -np.log(s), -np.log1p(-s))


def log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean binary cross-entropy of p against the labels (natural log; p clipped to [1e-7, 1-1e-7])."""
    y = np.asarray(labels).astype(bool)
    return float(_nll(y, np.asarray(scores, dtype=np.float64)).mean()) if len(y) else float("nan")


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: the chance of a split of the discordant pairs at least as
    uneven as (only_a, only_b) when either model is equally likely to be the one right."""
    n, m = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(m + 1))
    return float(min(1.0, 2 * tail / 2**n))


def paired_comparison(labels: np.ndarray, scores_a: np.ndarray, threshold_a: float, scores_b: np.ndarray,
                      threshold_b: float, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Model b against model a on the same images: differences b - a in accuracy at each model's
    own threshold, in AUC and in log-loss, each with a 95% paired-bootstrap interval (images
    resampled with replacement, ``n_boot`` times, seeded), and the exact McNemar test on the
    images only one of the two gets right. Inputs: labels [N], scores [N] (p) for each model."""
    y = np.asarray(labels).astype(bool)
    sa = np.asarray(scores_a, dtype=np.float64)
    sb = np.asarray(scores_b, dtype=np.float64)
    if not (len(y) == len(sa) == len(sb)) or len(y) == 0:
        raise ValueError(f"paired_comparison needs equal, non-empty lengths: {len(y)}, {len(sa)}, {len(sb)}")
    ra, rb = (sa >= threshold_a) == y, (sb >= threshold_b) == y
    la, lb = _nll(y, sa), _nll(y, sb)
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, 3))
    for i in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        boot[i] = (rb[idx].mean() - ra[idx].mean(), auc(y[idx], sb[idx]) - auc(y[idx], sa[idx]),
                   lb[idx].mean() - la[idx].mean())

    def ci(col: int) -> list[float]:
        v = boot[:, col][~np.isnan(boot[:, col])]
        return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] if len(v) else [math.nan, math.nan]

    only_a, only_b = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    return {"n": int(len(y)), "n_boot": n_boot, "seed": seed,
            "accuracy_diff": float(rb.mean() - ra.mean()), "accuracy_diff_ci95": ci(0),
            "auc_diff": auc(y, sb) - auc(y, sa), "auc_diff_ci95": ci(1),
            "log_loss_diff": float(lb.mean() - la.mean()), "log_loss_diff_ci95": ci(2),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)}


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
    out["log_loss"] = log_loss(y, s)
    out[f"tpr_at_{int(round(target_fpr * 100))}pct_fpr"] = tpr_at_fpr(y, s, target_fpr)
    if band is not None and band[0] < band[1]:
        keep = ~((s >= band[0]) & (s <= band[1]))
        out["abstain"] = {"band": [float(band[0]), float(band[1])], "coverage": float(keep.mean()),
                          "accuracy_when_decided": float(((s[keep] >= threshold) == y[keep]).mean())
                          if keep.any() else float("nan")}
    return out
