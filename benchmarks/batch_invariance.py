"""What batch-invariant scores cost (issue 16 item 16): ONNX Runtime CPU with one image per graph
call (the default, ``per_image=True``) against whole-batch calls, side by side in one process,
round by round (alternating which goes first), at several batch sizes; and how far a score moves
with its batch's other images when the batch goes through each graph whole.

    python -m cinemae.benchmarks.batch_invariance [BUNDLE] [--rounds 6] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import numpy as np

log = logging.getLogger("cinemae.benchmarks.batch_invariance")  # also when run as __main__


def measure(bundle_path: str | None, rounds: int = 6, threads: int | None = 2, batches: tuple[int, ...] = (1, 4, 16),
            seconds: float = 0.6) -> dict[str, Any]:
    """{"throughput": {B: {"whole": img/s, "per_image": img/s, "ratio": per_image/whole, and the
    process CPU time per image of each (the steadier number on a shared machine) and its ratio}},
    "max_logit_shift_whole": largest |logit alone - logit in a batch| with whole-batch calls,
    "max_logit_shift_per_image": the same with one image per call (0 when invariant)}."""
    from ..runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from ..runtime.bundle import resolve_bundle
    from ..runtime.masks import make_masks

    bundle = resolve_bundle(bundle_path)
    bb = bundle.backbone
    masks = make_masks(bb.num_patches, bundle.k, bundle.mask_ratio, bundle.mask_seed)
    x = np.random.default_rng(0).standard_normal((max(batches), 3, bb.img_size, bb.img_size)).astype(np.float32)
    backends = {"whole": OnnxRuntimeCPU(bundle, "fp32", threads, per_image=False),
                "per_image": OnnxRuntimeCPU(bundle, "fp32", threads, per_image=True)}
    shifts = {}
    for mode, be in backends.items():
        alone = float(be.run(x[:1], masks).logit[0])
        shifts[mode] = max(abs(float(be.run(np.concatenate([x[j:j + n], x[:1]]), masks).logit[-1]) - alone)
                           for n in (1, 3, 7) for j in (1, 2))
    rates: dict[tuple[str, int], list[float]] = {(m, b): [] for m in backends for b in batches}
    cpu: dict[tuple[str, int], list[float]] = {(m, b): [] for m in backends for b in batches}
    for r in range(rounds):
        for b in batches:
            # alternate which mode goes first: ONNX Runtime's threads spin a while after a run and
            # slow whatever runs next in the process
            for mode, be in (list(backends.items()) if r % 2 == 0 else list(backends.items())[::-1]):
                n, t0, c0 = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - t0 < seconds:
                    be.run(x[:b], masks)
                    n += b
                rates[(mode, b)].append(n / (time.perf_counter() - t0))
                cpu[(mode, b)].append((time.process_time() - c0) / n * 1e3)
    import os
    import platform

    import onnxruntime

    out: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()}-core",
                           "python": platform.python_version(),
                           "onnxruntime": onnxruntime.__version__, "load_average": list(os.getloadavg()),
                           "bundle": bundle.root.name, "embed_dim": bb.embed_dim, "img_size": bb.img_size,
                           "k": bundle.k, "threads": threads, "rounds": rounds, "throughput": {},
                           "max_logit_shift_whole": shifts["whole"],
                           "max_logit_shift_per_image": shifts["per_image"]}
    for b in batches:
        whole, per = statistics.median(rates[("whole", b)]), statistics.median(rates[("per_image", b)])
        cw, cp = statistics.median(cpu[("whole", b)]), statistics.median(cpu[("per_image", b)])
        out["throughput"][b] = {"whole": round(whole, 2), "per_image": round(per, 2), "ratio": round(per / whole, 3),
                                "cpu_ms_per_image_whole": round(cw, 3), "cpu_ms_per_image_per_image": round(cp, 3),
                                "cpu_ratio": round(cp / cw, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cinemae.benchmarks.batch_invariance",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: the embedded bundle)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    from ..runtime.commands import configure_logging

    configure_logging("stdout")
    r = measure(args.bundle, args.rounds, args.threads)
    log.info(f"{r['bundle']} on {r['machine']} (load {r['load_average'][0]:.1f}): D={r['embed_dim']} "
          f"S={r['img_size']} K={r['k']}, {r['threads']} threads, "
          f"median of {r['rounds']} interleaved rounds")
    for b, t in r["throughput"].items():
        log.info(f"  B={b:>2}: whole {t['whole']:.1f} img/s, per image {t['per_image']:.1f} img/s ({t['ratio']:.2f}x); "
              f"CPU per image {t['cpu_ms_per_image_whole']:.2f} vs {t['cpu_ms_per_image_per_image']:.2f} ms "
              f"({t['cpu_ratio']:.2f}x)")
    log.info(f"  max |logit alone - in a batch|: whole {r['max_logit_shift_whole']:.3g}, "
          f"per image {r['max_logit_shift_per_image']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
