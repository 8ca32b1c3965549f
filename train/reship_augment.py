"""Re-shipping augmentation: random re-shippings of a training image, for heads that must give the
same verdict however the bytes were delivered (issue 19, "Stable verdicts").

A *view* is a chain of one or two re-shippings (:mod:`cinemae.runtime.reship`) applied to the
decoded image before the runtime's own preprocessing (resize, or tiling), so the head sees what
the runtime sees when a site has re-encoded, resized, cropped or letterboxed the picture:

- one of ``jpeg:Q`` (Q 30-95), ``shrink:S`` (0.35-0.85), ``upscale:S`` (1.25-2.5),
  ``crop:F`` (0.5-0.9) or ``letterbox`` (16x9, 4x3 or 9x16), each equally likely;
- after a resize, crop or letterbox, half the time a ``jpeg:Q`` (Q 40-95) as well: the site that
  resizes a picture re-encodes it.

The parameters are drawn from ranges, not the evaluation's fixed values (``RESHIP_SET``): the
benchmark's upscale:2 / jpeg:40 / crop:0.6 are points inside them, never the only ones seen.
Draws are seeded by (seed, image index, view index): the same run gives the same views.
"""

from __future__ import annotations

import numpy as np

from ..runtime.reship import Reshipping, parse_reshipping

_ASPECTS = ("16x9", "4x3", "9x16")


def draw_view(rng: np.random.Generator) -> list[Reshipping]:
    """One random view: a chain of one or two re-shippings (see the module docstring)."""
    kind = ("jpeg", "shrink", "upscale", "crop", "letterbox")[int(rng.integers(5))]
    if kind == "jpeg":
        return [parse_reshipping(f"jpeg:{int(rng.integers(30, 96))}")]
    if kind == "letterbox":
        first = parse_reshipping(f"letterbox:{_ASPECTS[int(rng.integers(len(_ASPECTS)))]}")
    else:
        lo, hi = {"shrink": (0.35, 0.85), "upscale": (1.25, 2.5), "crop": (0.5, 0.9)}[kind]
        first = parse_reshipping(f"{kind}:{rng.uniform(lo, hi):.3f}")
    if rng.random() < 0.5:
        return [first, parse_reshipping(f"jpeg:{int(rng.integers(40, 96))}")]
    return [first]


def draw_views(n: int, seed: int, index: int) -> list[list[Reshipping]]:
    """The ``n`` views of training image ``index`` (deterministic in seed and index)."""
    rng = np.random.default_rng([seed, index, 19])
    return [draw_view(rng) for _ in range(n)]


def apply_view(rgb: np.ndarray, view: list[Reshipping], max_pixels: int | None = None) -> np.ndarray:
    """[h, w, 3] float32 in [0, 1] -> the re-shipped image [h', w', 3] (each step in turn)."""
    for r in view:
        rgb = r.apply(rgb, max_pixels)
    return rgb


def view_name(view: list[Reshipping]) -> str:
    """``shrink:0.5+jpeg:75``: how a view is named in logs and reports."""
    return "+".join(r.name for r in view)


def parse_view(name: str) -> list[Reshipping]:
    """``shrink:0.5+jpeg:75`` -> the view's steps, in order (the inverse of :func:`view_name`)."""
    return [parse_reshipping(x) for x in name.split("+")]
