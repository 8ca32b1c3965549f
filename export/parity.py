"""Parity: the torch reference against every exported form, with tolerances.

A conversion is only accepted when this check passes (reference, convert, check), the way the
TensorRT samples gate every conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..runtime.backends.base import Backend
from ..runtime.masks import MaskSet
from .reference import TorchReference

# Tolerances of each exported form against the torch fp32 reference, keyed by precision. Every
# precision of cinemae.runtime.precision.PRECISIONS has its own entry, and an unknown precision is
# an error (tolerances_for), never another precision's rules.
# fp32: ONNX Runtime vs torch on the same CPU.
# fp16/bf16/int8: "decision_agreement_decisive" counts only the items whose reference logit lies
# farther than logit_abs from the threshold (an untrained head puts every logit near 0, where any
# in-tolerance difference may flip the decision); "decision_agreement" (all items) is reported
# alongside. bf16 keeps 8 mantissa bits to fp16's 11; the bf16 and int8 entries are provisional
# until their exports (issue 14) measure them.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"logit_abs": 1e-4, "stats_rel": 1e-3, "feature_abs": 1e-3},
    "fp16": {"logit_abs": 5e-2, "stats_rel": 5e-2, "feature_abs": 5e-2, "decision_agreement_decisive": 0.99},
    "bf16": {"logit_abs": 1e-1, "stats_rel": 1e-1, "feature_abs": 1e-1, "decision_agreement_decisive": 0.98},
    "int8": {"logit_abs": 2.5e-1, "stats_rel": 2.5e-1, "feature_abs": 2.5e-1,
             "decision_agreement_decisive": 0.95},
}
FP32_TOLERANCES = TOLERANCES["fp32"]
FP16_TOLERANCES = TOLERANCES["fp16"]


def tolerances_for(precision: str) -> dict[str, float]:
    """A copy of the parity tolerances of ``precision``; ValueError for a precision with none."""
    if precision not in TOLERANCES:
        raise ValueError(f"no parity tolerances for precision {precision!r} (known: {', '.join(TOLERANCES)})")
    return dict(TOLERANCES[precision])


@dataclass
class ParityRow:
    """One comparison: a backend/precision on one input set."""

    form: str
    inputs: str
    n: int
    metrics: dict[str, float]
    tolerances: dict[str, float]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "inputs": self.inputs, "n": self.n, "metrics": self.metrics,
                "tolerances": self.tolerances, "passed": self.passed, "failures": self.failures}


def compare(ref: TorchReference, backend: Backend, images: np.ndarray, masks: MaskSet,
            inputs: str, tolerances: dict[str, float], threshold: float = 0.5) -> ParityRow:
    """Run both on ``images`` [B, 3, H, W] and measure the differences."""
    r = ref.run(images, masks)
    out = backend.run(images, masks, want_feature=True)
    g_ref = ref.head.pool(torch.from_numpy(r.global_tokens)).numpy()
    logit_abs = float(np.max(np.abs(out.logit - r.logit)))
    denom = np.maximum(np.abs(r.stats), 1e-6)
    stats_rel = float(np.max(np.abs(out.stats - r.stats) / denom)) if masks.k else 0.0
    feature_abs = float(np.max(np.abs(out.feature - g_ref)))
    t = _logit(threshold)
    same = (out.logit >= t) == (r.logit >= t)
    agree = float(np.mean(same))
    decisive = np.abs(r.logit - t) > tolerances.get("logit_abs", 0.0)
    agree_decisive = float(np.mean(same[decisive])) if decisive.any() else 1.0
    metrics = {"logit_abs": logit_abs, "stats_rel": stats_rel, "feature_abs": feature_abs,
               "decision_agreement": agree, "decision_agreement_decisive": agree_decisive,
               "n_decisive": int(decisive.sum()), "logit_ref_absmax": float(np.max(np.abs(r.logit)))}
    failures = []
    for key, tol in tolerances.items():
        v = metrics[key]
        bad = v < tol if key.startswith("decision_agreement") else not v <= tol
        if bad:
            failures.append(f"{key} = {v:.3g} (tolerance {tol:g})")
    return ParityRow(f"{backend.name}/{backend.precision}", inputs, int(images.shape[0]),
                     metrics, dict(tolerances), failures)


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return float(np.log(p / (1 - p)))


def format_rows(rows: list[ParityRow]) -> str:
    """A plain table of the parity rows."""
    lines = [f"{'form':<26} {'inputs':<10} {'n':>3} {'|dlogit|':>10} {'stats rel':>10} "
             f"{'|dfeature|':>10} {'agree':>6}  result"]
    for r in rows:
        m = r.metrics
        lines.append(f"{r.form:<26} {r.inputs:<10} {r.n:>3} {m['logit_abs']:>10.2e} "
                     f"{m['stats_rel']:>10.2e} {m['feature_abs']:>10.2e} "
                     f"{m['decision_agreement']:>6.3f}  "
                     + ("ok" if r.passed else "FAIL: " + "; ".join(r.failures)))
    return "\n".join(lines)
