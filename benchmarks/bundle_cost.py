"""What one bundle costs against another: wall and CPU time per image of ``Detector``, end to end
(encoded bytes to verdict: decode, tiles, preprocessing, the backend calls), for two or more bundles
side by side in one run on the same files, interleaved batch by batch with the order rotating each
round, so every bundle sees the same load on a shared machine. The figure to read is the ratio to
the first bundle (``--bundles BASE OTHER ...``); absolute times depend on the load.

A tiled bundle (``tiles`` in its manifest) scores each image as up to N crops, so its cost per
image is what a user pays per photo, not per crop. A bundle or backend that fails is a row with its
error, and the others still run.

    python -m cinemae.benchmarks.bundle_cost --bundles /tmp/v4/runtime/bundles/photo32 photo32 \\
        --data ../shared/data/photos --limit 12 --backends openvino,onnxruntime --out cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def measure(bundles: Sequence[str], files: Sequence[bytes], backend: str, threads: int | None,
            log: Callable[[str], None], rounds: int = 3, batch: int = 8,
            precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:
    """{row: {ms_per_image (median over rounds), cpu_ms_per_image, rounds, ratio_to_first}} for one
    backend, a row per bundle (``"BUNDLE @ PRECISION"`` when more than one precision is asked for,
    each bundle at each precision interleaved with the others); a row that cannot be built or fails
    is ``{"error": ...}``."""
    from ..runtime.detector import Detector

    runs = {(b if len(precisions) == 1 else f"{b} @ {p}"): (b, p) for b in bundles for p in precisions}
    dets: dict[str, Any] = {}
    out: dict[str, Any] = {}
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:  # every Detector closed, even on an error
        warnings.simplefilter("ignore")  # the embedded CIFAKE model's domain warning
        for b, (bundle, precision) in runs.items():
            try:
                d = stack.enter_context(Detector(bundle, backend=backend, device="cpu", threads=threads,
                                                 batch_size=batch, precision=precision, provenance=False))
                bad = [r.error for r in d.detect_batch(list(files[:batch])) if r.error]  # warm-up
                if bad:
                    raise RuntimeError(f"warm-up: {bad[0]}")
                dets[b] = d
            except Exception as e:  # noqa: BLE001 - a failing bundle is a row with its error
                out[b] = {"error": f"{type(e).__name__}: {e}"}
        wall: dict[str, list[float]] = {b: [] for b in dets}
        cpu: dict[str, list[float]] = {b: [] for b in dets}
        names = list(dets)
        for r in range(rounds):
            tot = {b: [0.0, 0.0] for b in names}
            for k, i in enumerate(range(0, len(files), batch)):
                s = (r + k) % max(len(names), 1)
                for b in names[s:] + names[:s]:  # the order rotates batch by batch and round by round
                    w, c = time.perf_counter(), time.process_time()
                    dets[b].detect_batch(list(files[i:i + batch]))
                    tot[b][0] += time.perf_counter() - w
                    tot[b][1] += time.process_time() - c
            for b in names:
                wall[b].append(1000 * tot[b][0] / len(files))
                cpu[b].append(1000 * tot[b][1] / len(files))
            log(f"  {backend} round {r + 1}: " + ", ".join(f"{b} {wall[b][-1]:.0f} ms" for b in names))
    base = statistics.median(wall[names[0]]) if names and names[0] == next(iter(runs)) else None
    for b in names:
        med = statistics.median(wall[b])
        out[b] = {"ms_per_image": round(med, 2), "cpu_ms_per_image": round(statistics.median(cpu[b]), 2),
                  "rounds_ms": [round(x, 2) for x in wall[b]],
                  "ratio_to_first": round(med / base, 3) if base else None}
    return {b: out[b] for b in runs}


def main(argv: Sequence[str] | None = None) -> int:
    from ..runtime.commands import configure_logging
    from .datasets import load_labeled
    from .environment import environment, load_average

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", nargs="+", required=True, help="bundle names or folders; ratios are to the first")
    ap.add_argument("--data", required=True, help="labelled images, as cinemae-bench --data")
    ap.add_argument("--limit", type=int, default=12, help="images per class (seeded subset)")
    ap.add_argument("--backends", default="openvino,onnxruntime")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated (fp32, bf16 with openvino, ...): each bundle at each, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", required=True, help="JSON file")
    a = ap.parse_args(argv)
    configure_logging("stdout")
    files = [it.read() for it in load_labeled(a.data, a.limit)]
    rec: dict[str, Any] = {
        "environment": environment(), "load_average_start": load_average(),
        "bundles": {b: _describe(b) for b in a.bundles},
        "images": len(files), "data": a.data, "threads": a.threads, "batch": a.batch, "rounds": a.rounds,
        "precisions": a.precisions.split(","),
        "protocol": "Detector.detect_batch on the encoded files (provenance off), one warm-up batch each, "
                    "bundles interleaved batch by batch with the order rotating; ms per image = wall time / "
                    "images, median over rounds; CPU = process CPU time (all threads)",
        "backends": {}}
    for be in a.backends.split(","):
        rec["backends"][be] = measure(a.bundles, files, be, a.threads, log.info, a.rounds, a.batch,
                                      a.precisions.split(","))
    rec["load_average_end"] = load_average()
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    log.info("wrote %s", a.out)
    return 0


def _describe(name: str) -> dict[str, Any]:
    """A bundle's identity for the record: model id, version, backbone depth, tiles; or its error."""
    from ..runtime.bundle import resolve_bundle

    try:
        b = resolve_bundle(name)
        m = b.manifest
        return {"path": str(b.root), "model_id": m.get("model_id"), "model_version": m.get("model_version"),
                "depth": m["backbone"]["depth"], "embed_dim": m["backbone"]["embed_dim"], "tiles": m.get("tiles")}
    except Exception as e:  # noqa: BLE001 - reported, and measure() reports it again as the row
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    raise SystemExit(main())
