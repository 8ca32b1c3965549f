"""``cinemae-detect [BUNDLE] PATH...``: score files and folders.

Prints a table (or ``--json`` lines), shows a progress bar on a terminal, reports each input
that fails without stopping, and exits 1 when any input failed (2 on a usage error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import MANIFEST, BundleError

if TYPE_CHECKING:
    from .detector import Detector

IMAGE_SUFFIXES = frozenset((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                            ".jfif", ".pgm", ".ppm", ".pbm", ".tga", ".ico"))


def iter_inputs(paths: list[str]) -> Iterator[str]:
    """Files as given (whatever their suffix), folders walked recursively in sorted order for
    files with an image suffix."""
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                        yield os.path.join(root, f)
        else:
            yield p


def split_bundle(positional: list[str], bundle: str | None) -> tuple[str | None, list[str]]:
    """``cinemae-detect BUNDLE PATH...`` or ``cinemae-detect PATH...`` (embedded bundle)."""
    if bundle is None and positional and (Path(positional[0]) / MANIFEST).is_file():
        return positional[0], positional[1:]
    return bundle, positional


def open_detector(prog: str, bundle: str | None, **kwargs: Any) -> Detector | None:
    """The Detector a command runs on (``kwargs`` go to ``Detector``). Prints the one-line
    reason and returns None when it cannot start; otherwise prints the header line (model,
    backend, and a warning for an untrained head) to stderr."""
    from .backends import BackendUnavailable
    from .detector import Detector

    try:
        det = Detector(bundle, **kwargs)
    except (BundleError, BackendUnavailable, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    print(f"# {det.bundle.model_id}: {det.describe()}"
          + ("" if det.bundle.trained else " [UNTRAINED HEAD: scores are not meaningful]"),
          file=sys.stderr)
    return det


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
    ap.add_argument("--heatmap", metavar="DIR",
                    help="write per image a PNG overlay of the per-patch LCAS map on the original image "
                         "and the map as JSON into DIR (and add it to --json records)")
    ap.add_argument("--explain-k", type=int, default=None, metavar="N",
                    help="make heatmaps from N masking runs (e.g. 8, so every patch is scored); the "
                         "verdict still comes from the bundle's K")
    ap.add_argument("--no-provenance", action="store_true",
                    help="do not read C2PA / XMP / EXIF / generator metadata")
    ap.add_argument("--no-provenance-policy", action="store_true",
                    help="report provenance but never let it change the verdict (default: signed AI "
                         "provenance or generator parameters make the verdict ai)")
    ap.add_argument("--c2pa-trust", metavar="PEM",
                    help="PEM file of trust anchors: C2PA signers under them are reported as trusted")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def format_row(d: dict) -> str:
    """One table line for a result record (``Result.to_record()`` or a scan record)."""
    if d["error"]:
        return (f"{'error':<9} {'':>7} {'':>9} {'':>9} {'':>9}  {d['source']}  "
                f"[{d['error_code']}] {d['error']}")
    s1, s2, s3 = d["stats"]
    verdict = d["verdict"] + ("[prov]" if d.get("reason") == "provenance" else "")
    return f"{verdict:<9} {d['score']:>7.4f} {s1:>9.4f} {s2:>9.4f} {s3:>9.4f}  {d['source']}"

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bundle, paths = split_bundle(args.paths, args.bundle)
    if not paths:
        print("cinemae-detect: give at least one image file or folder", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("cinemae-detect: --resume needs --out FILE", file=sys.stderr)
        return 2
    if args.explain_k is not None and not 1 <= args.explain_k <= 64:
        print("cinemae-detect: --explain-k must be in 1..64", file=sys.stderr)
        return 2
    explain = bool(args.heatmap) or args.explain_k is not None
    if explain and args.out:
        print("cinemae-detect: --heatmap/--explain-k are not available with --out", file=sys.stderr)
        return 2
    trust = None
    if args.c2pa_trust:
        try:
            trust = Path(args.c2pa_trust).read_text()
        except (OSError, UnicodeDecodeError) as e:
            print(f"cinemae-detect: cannot read --c2pa-trust {args.c2pa_trust}: {e}", file=sys.stderr)
            return 2
    from .preprocess import DEFAULT_MAX_PIXELS

    det = open_detector("cinemae-detect", bundle, backend=args.backend, device=args.device,
                        precision=args.precision, k=args.k, batch_size=args.batch_size,
                        threads=args.threads, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                        provenance=not args.no_provenance,
                        provenance_policy=not args.no_provenance_policy, trust_anchors=trust)
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
        print(f"{'verdict':<9} {'score':>7} {'s1':>9} {'s2':>9} {'s3':>9}  path")
    bar = tqdm(total=len(inputs), unit="img", file=sys.stderr,
               disable=True if args.no_progress else None)
    try:
        for r in det.detect_many(inputs, want_lcas=args.lcas and args.json, explain=explain,
                                 explain_k=args.explain_k):
            failed += not r.ok
            if args.heatmap and r.heatmap is not None:
                from .explain.files import write_heatmap

                try:
                    write_heatmap(args.heatmap, r, r.source, det.max_pixels)
                except Exception as e:  # noqa: BLE001 - a failed picture never stops the run
                    print(f"cinemae-detect: {r.source}: heatmap not written ({e})", file=sys.stderr)
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
