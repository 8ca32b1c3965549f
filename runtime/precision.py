"""Precision as a value (DESIGN.md section 2, "Backends": fp32, fp16 on a GPU, bf16 and int8 on
the CPU).

A precision names a form of the bundle's graphs (``Bundle.graph(name, precision)``), the
tolerances its parity gate uses (``cinemae.export.parity.TOLERANCES``) and the backends that run
it (``cinemae.runtime.backends.registry``). An unknown name is an error everywhere: it never
silently takes another precision's rules.

**Borderline fp32 recheck.** A reduced precision moves p by up to the |Δp| its gate measured
(:mod:`cinemae.export.recheck`, the manifest's ``recheck`` entry). A verdict can only differ from
fp32's when p lies within that distance of a decision edge (the threshold or an abstain-band
edge), so :class:`cinemae.runtime.recheck.Recheck` re-scores exactly those images through the fp32 graphs of the same
backend, with the same masks, and the fp32 verdict is the answer.

The dtype of a tensor in device memory (the decoder output the fused LCAS kernel reads) is a
separate value, a numpy dtype (``float32`` or ``float16``), carried as such from the engine or
session to the kernel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`; ValueError (one sentence)
    otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def float_dtype(name: str) -> np.dtype:
    """The numpy dtype of an ONNX Runtime / TensorRT float tensor type name:
    ``tensor(float)``/``FLOAT``/``float32`` -> float32, ``tensor(float16)``/``HALF``/``float16``
    -> float16. ValueError for anything else (bfloat16 has no numpy dtype)."""
    key = str(name).rsplit(".", 1)[-1].lower()
    table = {"tensor(float)": np.float32, "float": np.float32, "float32": np.float32,
             "tensor(float16)": np.float16, "half": np.float16, "float16": np.float16}
    if key not in table:
        raise ValueError(f"tensor type {name!r} is neither float32 nor float16")
    return np.dtype(table[key])


#: margin = RECHECK_SAFETY x the largest |Δp| measured on the margin images. Those are a few dozen;
#: an image they did not include can move further, and a margin short of an image's |Δp| lets its
#: flip through, while every doubling of the margin only costs the fp32 pass of the few images in
#: the wider band (benchmarks/results/cpu_fast_path.md, "Borderline fp32 recheck").
RECHECK_SAFETY = 2.0


def head_sha256(manifest: dict[str, Any]) -> str | None:
    """sha256 of the fp32 head graph as the manifest lists it (None when it lists none): a
    measured margin belongs to the head it was measured with."""
    rel = manifest.get("graphs", {}).get("fp32", {}).get("head")
    return manifest.get("files", {}).get(rel) if rel else None


def recheck_margin(manifest: dict[str, Any], form: str) -> float | None:
    """The recheck margin in p for ``form`` ("openvino/bf16", "onnxruntime-cpu/int8") from the
    manifest's ``recheck`` entry: ``{"head_sha256", "safety_factor", "forms": {form: {"p_abs_max",
    "margin"}}}``. None when the form is fp32, has no measured margin, or the margin was measured
    with another head than the bundle's (a retrained head makes it stale)."""
    if form.endswith("/fp32"):
        return None
    entry = manifest.get("recheck")
    if not isinstance(entry, dict) or entry.get("head_sha256") != head_sha256(manifest):
        return None
    row = entry.get("forms", {}).get(form)
    if not isinstance(row, dict):
        return None
    margin = row.get("margin")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) \
            or margin < 0:
        return None
    return float(margin)


def edge_distance(p: np.ndarray, threshold: float, band: tuple[float, float]) -> np.ndarray:
    """p [N] -> [N] distance to the nearest decision edge (threshold, abstain-band edges)."""
    edges = np.array([threshold, *band], dtype=np.float64)
    return np.min(np.abs(np.asarray(p, np.float64)[:, None] - edges[None, :]), axis=1)


__all__ = ["PRECISIONS", "RECHECK_SAFETY", "check_precision", "edge_distance", "float_dtype",
           "head_sha256", "recheck_margin"]
