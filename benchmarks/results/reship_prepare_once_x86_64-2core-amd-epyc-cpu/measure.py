"""The ensemble's preparation (decode + picture + crops + views) before and after the picture is
made once (``runtime.reship.original_and_views``), side by side in one run on the same files,
alternating per image; the rows of both must be equal. Run from the repository root:

    python benchmarks/results/reship_prepare_once_x86_64-2core-amd-epyc-cpu/measure.py 24 OUT.json

'before' is the path ``Detector.prepare`` took up to commit 99bf4a4, rebuilt from functions that are
unchanged: ``preprocess_views(file)`` (decode + picture + crops), then ``load_image(file)`` and
``view_arrays(rgb)`` (a second decode and a second picture). 'after' is ``Detector.prepare`` now.
Backend time is not included."""

import io
import json
import logging
import statistics
import sys
import time
import warnings

import numpy as np
from PIL import Image

from cinemae.benchmarks.datasets import load_labeled
from cinemae.runtime.detector import Detector, Result
from cinemae.runtime.preprocess import load_image

warnings.simplefilter("ignore")
logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("measure")
limit = int(sys.argv[1]) if len(sys.argv) > 1 else 24
out_path = sys.argv[2] if len(sys.argv) > 2 else "result.json"
det = Detector("photo32", backend="onnxruntime", device="cpu", provenance=False, reship="photo")
assert det.reship is not None and det.tiles is not None
bb = det.bundle.backbone
items = load_labeled("../shared/data/photos", limit)
files = {"delivered": [it.read() for it in items]}
up = []
for b in files["delivered"]:
    im = Image.open(io.BytesIO(b)).convert("RGB")
    buf = io.BytesIO()
    im.resize((im.width * 2, im.height * 2), Image.BICUBIC).save(buf, "JPEG", quality=95)
    up.append(buf.getvalue())
files["upscaled 2x (q95)"] = up


def before(data: bytes) -> np.ndarray:
    arr, _ = det.preprocess_views(data)
    rgb = load_image(data, det.max_pixels, det.max_bytes, det.formats)
    views = det.reship.view_arrays(rgb, bb.img_size, det.bundle.crop_ratio, det.tiles, det.max_pixels)
    return np.concatenate([arr, *views])


def after(data: bytes) -> np.ndarray:
    return det.prepare(data, Result(source="x"))


out = {}
for label, fs in files.items():
    t: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(3):
        for i, data in enumerate(fs):
            got = {}
            for fn in ((before, after) if (i + r) % 2 == 0 else (after, before)):
                s = time.perf_counter()
                got[fn.__name__] = fn(data)
                t[fn.__name__].append(time.perf_counter() - s)
            assert np.array_equal(got["before"], got["after"]), "rows differ"
    b_ms, a_ms = 1000 * statistics.mean(t["before"]), 1000 * statistics.mean(t["after"])
    sizes = [Image.open(io.BytesIO(x)).size for x in fs]
    out[label] = {"images": len(fs), "median_pixels": int(statistics.median(w * h for w, h in sizes)),
                  "before_ms": round(b_ms, 1), "after_ms": round(a_ms, 1), "ratio": round(a_ms / b_ms, 3)}
    log.info("%s %s", label, out[label])
with open(out_path, "w") as fh:
    json.dump(out, fh, indent=1)
