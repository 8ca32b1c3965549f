"""Robustness perturbations (``--perturb jpeg:50,jpeg:75,resize:0.5,blur:1.0`` or ``--perturb reship``).

Each perturbation maps a decoded RGB image [h, w, 3] float32 in [0, 1] to another image,
deterministically, and is applied to every image of both classes before the runtime's own
preprocessing (resize, crop or tiles, normalise). The size may change (the re-shippings):

- ``jpeg:Q``   re-encode as baseline JPEG at quality Q (Pillow, 4:2:0 chroma as by default)
- ``resize:S`` downscale by S (area), then upscale back to the original size (bicubic): the
               detail of a lower-resolution copy at the same pixel size
- ``blur:SIGMA`` Gaussian blur with standard deviation SIGMA pixels (OpenCV, kernel 2*ceil(3s)+1)
- the re-shippings of :mod:`cinemae.runtime.reship`, which change the size:
  ``shrink:S`` (area downscale by S, delivered at that size: "resize 0.5x" is ``shrink:0.5``),
  ``upscale:S`` (bicubic), ``crop:F`` (centre crop keeping F of each side: ``crop:0.6`` keeps
  60% of the width and of the height) and ``letterbox:AxB`` (black bars to the aspect A:B)
- ``none``     the image unchanged (the clean reference)

``reship`` in the list expands to :data:`cinemae.runtime.reship.RESHIP_SET` (upscale:2, crop:0.6,
letterbox:16x9, jpeg:40, jpeg:60, jpeg:75, jpeg:95, shrink:0.5): the re-shippings users report
flipping detectors' verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..runtime.preprocess import jpeg_round_trip
from ..runtime.reship import KINDS as RESHIP_KINDS
from ..runtime.reship import RESHIP_SET, Reshipping, parse_reshipping

KINDS = ("none", "jpeg", "resize", "blur", *(k for k in RESHIP_KINDS if k != "jpeg"))
PRESETS = {"reship": RESHIP_SET}


@dataclass(frozen=True)
class Perturbation:
    """One named perturbation; ``apply`` maps [h, w, 3] float32 in [0, 1] to [h', w', 3] (the
    same size except for the size-changing re-shippings). ``aspect``: letterbox's A x B."""

    kind: str
    value: float
    aspect: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind in _RESHIP_ONLY:
            return Reshipping(self.kind, self.value, self.aspect).name
        v = int(self.value) if self.kind == "jpeg" else self.value
        return f"{self.kind}:{v:g}"

    @property
    def changes_size(self) -> bool:
        return self.kind in _RESHIP_ONLY

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """[h, w, 3] float32 in [0, 1] -> [h', w', 3] float32 in [0, 1]."""
        rgb = np.asarray(rgb, dtype=np.float32)
        if self.kind in _RESHIP_ONLY:
            return Reshipping(self.kind, self.value, self.aspect).apply(rgb)
        return _FUNCS[self.kind](rgb, self.value)


def _none(rgb: np.ndarray, _: float) -> np.ndarray:
    return rgb


def _jpeg(rgb: np.ndarray, quality: float) -> np.ndarray:
    return jpeg_round_trip(rgb, int(quality))  # the runtime's re-shipping, one implementation


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    back = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(back, 0.0, 1.0).astype(np.float32)


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    ksize = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(rgb, (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT_101).astype(np.float32)


_RESHIP_ONLY = frozenset(k for k in RESHIP_KINDS if k != "jpeg")
_FUNCS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "none": _none, "jpeg": _jpeg, "resize": _resize, "blur": _blur}


def parse_perturbation(spec: str) -> Perturbation:
    """``kind:value`` -> Perturbation (ValueError with the accepted forms on a bad spec)."""
    spec = spec.strip()
    if spec in ("none", "clean"):
        return Perturbation("none", 0.0)
    kind, _, value = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS or not value:
        raise ValueError(f"bad perturbation {spec!r}; use jpeg:Q (1-100), resize:S (0-1], "
                         "blur:SIGMA (> 0), shrink:S (0-1), upscale:S (1-4], crop:F (0-1), letterbox:AxB, "
                         f"none, or a preset ({', '.join(PRESETS)})")
    if kind in _RESHIP_ONLY:
        r = parse_reshipping(spec)
        return Perturbation(r.kind, r.value, r.aspect)
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"bad perturbation value in {spec!r}") from None
    if kind == "jpeg" and not 1 <= v <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {spec!r}")
    if kind == "resize" and not 0 < v <= 1:
        raise ValueError(f"resize scale must be in (0, 1], got {spec!r}")
    if kind == "blur" and not v > 0:
        raise ValueError(f"blur sigma must be > 0, got {spec!r}")
    return Perturbation(kind, v)


def parse_perturbations(text: str | None) -> list[Perturbation]:
    """A comma-separated list (presets expanded) -> perturbations, always starting with ``none`` (clean)."""
    out = [Perturbation("none", 0.0)]
    parts = []
    for part in (text or "").split(","):
        parts += PRESETS.get(part.strip().lower(), (part,))
    for part in parts:
        if part.strip():
            p = parse_perturbation(part)
            if p not in out:
                out.append(p)
    return out
