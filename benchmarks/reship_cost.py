"""What the re-shipping ensemble costs: images per second of ``Detector`` with and without
``reship``, end to end (encoded bytes to verdict: decode, views, preprocessing, one backend call
per batch), side by side in one run on the same files, in interleaved rounds (the order
alternates so neither side always runs on a warmer cache).

Both Detectors run ONNX Runtime on the CPU with provenance reading off, so the figure is the
pixel path's (reading provenance costs both sides the same and would only shrink the ratio).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def measure_cost(bundle: Any, data: str, limit: int, reship: str, threads: int | None,
                 log: Callable[[str], None], rounds: int = 3, batch: int = 16) -> dict[str, Any]:
    """{rounds: [{plain_img_s, reship_img_s, ratio}], median ratio, ...}; an error is a row with it."""
    from ..runtime.detector import Detector
    from .datasets import load_labeled

    try:
        files = [it.read() for it in load_labeled(data, limit)]
        plain = Detector(bundle, backend="onnxruntime", device="cpu", threads=threads, provenance=False)
        ens = Detector(bundle, backend="onnxruntime", device="cpu", threads=threads, provenance=False,
                       reship=reship)
    except Exception as e:  # noqa: BLE001 - a failing measurement is a row with its error
        return {"error": f"{type(e).__name__}: {e}"}

    def once(det: Detector) -> tuple[float, int]:
        t0 = time.perf_counter()
        unc = 0
        for i in range(0, len(files), batch):
            unc += sum(r.verdict == "uncertain" for r in det.detect_batch(files[i:i + batch]))
        return len(files) / (time.perf_counter() - t0), unc

    import warnings

    out = []
    with plain, ens, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedded model's domain warning, once per Detector
        once(plain), once(ens)  # warm-up (sessions, caches)
        for r in range(rounds):
            order = (plain, ens) if r % 2 == 0 else (ens, plain)
            got = {id(d): once(d) for d in order}
            p, e = got[id(plain)], got[id(ens)]
            out.append({"plain_img_s": round(p[0], 2), "reship_img_s": round(e[0], 2),
                        "ratio": round(p[0] / e[0], 3), "uncertain_plain": p[1], "uncertain_reship": e[1]})
            log(f"  reship cost round {r + 1}: plain {p[0]:.1f} img/s, ensemble {e[0]:.1f} img/s "
                f"({p[0] / e[0]:.2f}x slower)")
        views = ens.reship.names if ens.reship else []
    return {"views": views, "images": len(files), "batch": batch, "backend": "onnxruntime-cpu fp32",
            "provenance": False, "rows_per_image": 1 + len(views), "rounds": out,
            "median_slowdown": statistics.median(x["ratio"] for x in out),
            "protocol": "Detector.detect_batch on the encoded files, batches of "
                        f"{batch}, one warm-up pass each, {rounds} interleaved rounds (order alternating); "
                        "slowdown = plain img/s / ensemble img/s"}
