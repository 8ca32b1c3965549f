"""Robustness perturbations (``--perturb jpeg:50,jpeg:75,resize:0.5,blur:1.0``).

Each perturbation maps a decoded RGB image [h, w, 3] float32 in [0, 1] to another image of the
same size, deterministically, and is applied to every image of both classes before the
runtime's own preprocessing (resize, crop, normalise):

- ``jpeg:Q``   re-encode as baseline JPEG at quality Q (Pillow, 4:2:0 chroma as by default)
- ``resize:S`` downscale by S (area), then upscale back to the original size (bicubic): the
               detail of a lower-resolution copy at the same pixel size
- ``blur:SIGMA`` Gaussian blur with standard deviation SIGMA pixels (OpenCV, kernel 2*ceil(3s)+1)
- ``none``     the image unchanged (the clean reference)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

KINDS = ("none", "jpeg", "resize", "blur")


@dataclass(frozen=True)
class Perturbation:
    """One named perturbation; ``apply`` maps [h, w, 3] float32 in [0, 1] to the same shape."""

    kind: str
    value: float

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        v = int(self.value) if self.kind == "jpeg" else self.value
        return f"{self.kind}:{v:g}"

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """[h, w, 3] float32 in [0, 1] -> [h, w, 3] float32 in [0, 1]."""
        return _FUNCS[self.kind](np.asarray(rgb, dtype=np.float32), self.value)


def _none(rgb: np.ndarray, _: float) -> np.ndarray:
    return rgb


def _to_u8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: float) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_u8(rgb), "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


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
                         "blur:SIGMA (> 0) or none")
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
    """A comma-separated list -> perturbations, always starting with ``none`` (clean)."""
    out = [Perturbation("none", 0.0)]
    for part in (text or "").split(","):
        if part.strip():
            p = parse_perturbation(part)
            if p not in out:
                out.append(p)
    return out
