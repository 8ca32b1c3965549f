"""The heatmap drawn over the original image, with a legend of its scale (PNG; OpenCV + numpy).

Patches are coloured with the ``inferno`` colour map from the lowest to the highest reduced LCAS
of the image (the legend prints both ends); patches no run masked are cross-hatched grey instead
of coloured (a tiled image's record, ``kind`` ``"tiles"``: its cells by crop logit, cells no crop
covers hatched); the image under the colours is shown in grey; the three hottest patches are outlined
in cyan; the part of the image outside the network's centre crop is dimmed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .heatmap import values_array

LEGEND_H = 44
ALPHA = 0.6


def _colours(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[...] floats -> [..., 3] uint8 RGB of the inferno map over [lo, hi]."""
    import cv2

    u = np.clip((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v), 0, 1)
    idx = np.nan_to_num(u * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(idx.reshape(-1, 1), cv2.COLORMAP_INFERNO).reshape(*v.shape, 3)
    return bgr[..., ::-1]


def render_overlay(rgb: np.ndarray, record: dict[str, Any], max_side: int = 768, min_side: int = 320
                   ) -> np.ndarray:
    """The original image [h, w, 3] (uint8 RGB, or float in [0, 1]; any size proportional to the
    record's ``image`` size, e.g. a reduced decode) + a heatmap record -> the overlay [H', W', 3]
    uint8 RGB: the image fitted into ``max_side`` (a smaller one enlarged, pixels kept square, to
    ``min_side`` so the legend fits), the patch colours, and a legend strip below."""
    import cv2

    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    h, w = rgb.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if max(h, w) < min_side:
        s = float(np.ceil(min_side / max(h, w)))
    ow, oh = max(1, round(w * s)), max(1, round(h * s))
    base = rgb.copy() if s == 1 else cv2.resize(
        rgb, (ow, oh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST)
    W, H = record["image"]
    fx, fy = ow / W, oh / H  # original-image pixels -> output pixels
    x0, y0, x1, y1 = record["crop"]
    cx0, cy0 = int(round(x0 * fx)), int(round(y0 * fy))
    cx1, cy1 = max(cx0 + 1, int(round(x1 * fx))), max(cy0 + 1, int(round(y1 * fy)))
    out = (base * 0.45).astype(np.uint8)  # dim what the network did not see
    out[cy0:cy1, cx0:cx1] = base[cy0:cy1, cx0:cx1]

    vals = values_array(record)  # [rows, cols]: g x g patches, or a tiled image's cells
    gr, gc = vals.shape
    lo, hi = record["range"] if record.get("range") else (0.0, 1.0)
    col = _colours(vals, lo, hi)  # [g, g, 3]
    cw, ch = cx1 - cx0, cy1 - cy0
    layer = cv2.resize(col, (cw, ch), interpolation=cv2.INTER_NEAREST)
    covered = cv2.resize((~np.isnan(vals)).astype(np.uint8), (cw, ch), interpolation=cv2.INTER_NEAREST)
    region = out[cy0:cy1, cx0:cx1].astype(np.float32)
    grey = region.mean(axis=-1, keepdims=True)  # the colours of the map, not of the image, carry meaning
    blend = grey * (1 - ALPHA) + layer.astype(np.float32) * ALPHA
    region = np.where(covered[..., None] > 0, blend, region)
    yy, xx = np.mgrid[0:ch, 0:cw]
    hatch = ((xx + yy) % 8 < 2) | ((xx - yy) % 8 < 2)
    region = np.where(((covered == 0) & hatch)[..., None], 160.0, region)
    out[cy0:cy1, cx0:cx1] = np.clip(region, 0, 255).astype(np.uint8)
    # patch grid lines, faint
    for i in range(1, gc):
        x = cx0 + round(cw * i / gc)
        out[cy0:cy1, x] = (out[cy0:cy1, x] * 0.7).astype(np.uint8)
    for i in range(1, gr):
        y = cy0 + round(ch * i / gr)
        out[y, cx0:cx1] = (out[y, cx0:cx1] * 0.7).astype(np.uint8)

    def outline(r: int, c: int, rgb: tuple[int, int, int]) -> None:  # one cell's border, 1 px
        p0 = (cx0 + round(cw * c / gc), cy0 + round(ch * r / gr))
        p1 = (cx0 + round(cw * (c + 1) / gc) - 1, cy0 + round(ch * (r + 1) / gr) - 1)
        cv2.rectangle(out, p0, p1, rgb, 1)

    thr = _tile_threshold(record)
    if thr is not None:  # a tile map: outline (white) every cell at or above the threshold's logit
        for r, row in enumerate(record["values"]):  # the record's own floats, not the float32 copy
            for c, v in enumerate(row):
                if v is not None and v >= thr:
                    outline(r, c, (255, 255, 255))
    for hot in record.get("hottest", [])[:3]:  # outline the three hottest patches
        outline(hot["row"], hot["col"], (0, 255, 255))
    return np.concatenate([out, legend(ow, lo, hi, record)], axis=0)


def _tile_threshold(record: dict[str, Any]) -> float | None:
    """A tile map's ``threshold_logit`` (None for an LCAS heatmap, or a tile map without one)."""
    return record.get("threshold_logit") if record.get("kind") == "tiles" else None


def legend(width: int, lo: float, hi: float, record: dict[str, Any]) -> np.ndarray:
    """[LEGEND_H, width, 3] uint8: the colour bar from lo to hi with its numbers, the runs the map
    is the mean of, and the hatch meaning."""
    import cv2

    strip = np.full((LEGEND_H, width, 3), 255, np.uint8)
    bar_w = max(16, width - 16)
    bar = _colours(np.linspace(lo, hi, bar_w)[None, :].repeat(10, 0), lo, hi)
    strip[4:14, 8:8 + bar_w] = bar
    thr = _tile_threshold(record)
    if thr is not None and hi > lo and lo <= thr <= hi:  # where the threshold falls on the scale
        x = 8 + round((bar_w - 1) * (thr - lo) / (hi - lo))
        strip[1:17, max(8, x - 1):x + 2] = (0, 0, 0)
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.35 if width < 400 else 0.45
    dark = (20, 20, 20)
    cv2.putText(strip, f"{lo:.3g}", (8, 27), font, fs, dark, 1, cv2.LINE_AA)
    txt = f"{hi:.3g}"
    (tw, _), _ = cv2.getTextSize(txt, font, fs, 1)
    cv2.putText(strip, txt, (8 + bar_w - tw, 27), font, fs, dark, 1, cv2.LINE_AA)
    tiles = record.get("kind") == "tiles"
    mid = f"crop logit, {record['tiles']} crops" if tiles else f"LCAS, mean of {record['runs']} runs"
    (mw, _), _ = cv2.getTextSize(mid, font, fs, 1)
    cv2.putText(strip, mid, (max(8, (width - mw) // 2), 27), font, fs, dark, 1, cv2.LINE_AA)
    uncovered = f"{100 * (1 - record['covered']):.1f}%"
    if thr is not None:
        cov = f"black tick: threshold (logit {thr:.3g}); white: cells above; cyan: highest"
    elif tiles:
        cov = f"hatched: no crop ({uncovered} of cells); cyan: highest"
    else:
        cov = f"hatched: never masked ({uncovered} of patches); cyan: hottest"
    cv2.putText(strip, cov, (8, 40), font, fs * 0.9, (90, 90, 90), 1, cv2.LINE_AA)
    return strip


def overlay_png(rgb: np.ndarray, record: dict[str, Any], max_side: int = 768, min_side: int = 320) -> bytes:
    """:func:`render_overlay` encoded as PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", render_overlay(rgb, record, max_side, min_side)[..., ::-1])
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    return buf.tobytes()
