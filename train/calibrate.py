"""Metrics, threshold calibration and the abstain band (numpy only).

Scores are p = sigmoid(logit), the probability of "AI-generated"; label 1 = AI-generated.
A verdict is "ai" when p >= threshold (as ``runtime.detector.Detector.verdict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..runtime.metrics import auc, average_precision, threshold_at_fpr, tpr_at_fpr

__all__ = ["abstain_band", "auc", "average_precision", "metrics", "threshold_at_fpr", "tpr_at_fpr"]


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
