"""``cinemae-detect [BUNDLE] PATH...``: score files and folders.

Prints a table (or ``--json`` lines), shows a progress bar on a terminal, reports each input
that fails without stopping. Exit codes: 0 all scored, 1 some input failed, 2 usage error (or a
results file that cannot be used), 74 writing ``--out`` failed (disk full: rerun with
``--resume`` once there is room), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from .bundle import BundleError
from .commands import TABLE_HEADER, format_row, open_detector
from .inputs import IMAGE_SUFFIXES, iter_inputs, split_bundle

# serve.py and stream.py import these from here until they import .commands / .inputs directly
__all__ = ["IMAGE_SUFFIXES", "build_parser", "format_row", "iter_inputs", "main", "open_detector", "split_bundle"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cinemae-detect",
                                 description="Score images as real or AI-generated.")
    ap.add_argument("paths", nargs="*", metavar="[BUNDLE] PATH",
                    help="a bundle directory (optional; default: the embedded bundle), then "
                         "image files and folders")
    ap.add_argument("--bundle", help="bundle directory (instead of the first positional)")
    ap.add_argument("--json", action="store_true",
                    help="one JSON record per line (Result.to_record(): scores, stats, error, and the model "
                         "that produced them)")
    ap.add_argument("--lcas", action="store_true",
                    help="with --json or --out: add each image's per-patch LCAS map (K runs x L patches)")
    ap.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime"])
    ap.add_argument("--device", default="auto",
                    help="auto (a GPU when usable, else the CPU), cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--k", type=int, default=None, help="masking runs (default: the bundle's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="per-image decoded pixel limit (decompression-bomb guard)")
    ap.add_argument("--out", help="write results as JSON lines to this file, fsynced per batch "
                                  "(an existing non-empty file needs --resume)")
    ap.add_argument("--resume", action="store_true",
                    help="with --out: continue an interrupted scan, skipping inputs whose content "
                         "hash and path are already in the file")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    # intermixed: options may sit between positionals (`cinemae-detect BUNDLE --device cpu DIR`)
    args = build_parser().parse_intermixed_args(argv)
    try:
        bundle, paths = split_bundle(args.paths, args.bundle)
    except BundleError as e:
        print(f"cinemae-detect: {e}", file=sys.stderr)
        return 2
    if not paths:
        print("cinemae-detect: give at least one image file or folder", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("cinemae-detect: --resume needs --out FILE", file=sys.stderr)
        return 2
    from .preprocess import DEFAULT_MAX_PIXELS

    det = open_detector("cinemae-detect", bundle, backend=args.backend, device=args.device,
                        precision=args.precision, k=args.k, batch_size=args.batch_size,
                        threads=args.threads, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    if det is None:
        return 2
    inputs = list(iter_inputs(paths))
    if args.out:
        from .scan import scan

        return scan(det, inputs, args.out, resume=args.resume, as_json=args.json,
                    progress=not args.no_progress, want_lcas=args.lcas)
    from tqdm import tqdm

    failed = 0
    if not args.json:
        print(TABLE_HEADER)
    bar = tqdm(total=len(inputs), unit="img", file=sys.stderr,
               disable=True if args.no_progress else None)
    try:
        for r in det.detect_many(inputs, want_lcas=args.lcas and args.json):
            failed += not r.ok
            rec = r.to_record()
            line = json.dumps(rec) if args.json else format_row(rec)
            if bar.disable:
                print(line, flush=True)
            else:
                bar.write(line, file=sys.stdout)
            bar.update(1)
    except BrokenPipeError:  # `cinemae-detect ... | head`
        sys.stderr.close()
        return 0
    finally:
        bar.close()
    print(f"# {len(inputs) - failed} scored, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
