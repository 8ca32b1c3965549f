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
from pathlib import Path

from .bundle import BundleError
from .commands import TABLE_HEADER, add_reship_arguments, configure_logging, format_row, open_detector
from .inputs import iter_inputs, split_bundle


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
    from .backends import backend_choices, device_help, precision_choices  # the backend registry

    ap.add_argument("--backend", default="auto", choices=backend_choices())
    ap.add_argument("--device", default="auto", help=device_help())
    ap.add_argument("--precision", default="fp32", choices=precision_choices())
    ap.add_argument("--k", type=int, default=None, help="masking runs (default: the bundle's)")
    rc = ap.add_mutually_exclusive_group()
    rc.add_argument("--no-recheck", action="store_true",
                    help="at bf16/int8/fp16, do not re-score borderline images at fp32 (by default an image "
                         "whose p lies within the bundle's measured margin of the threshold or an abstain-band "
                         "edge is scored again at fp32 and takes fp32's verdict; records say rechecked)")
    rc.add_argument("--recheck-margin", type=float, default=None, metavar="P",
                    help="recheck with this margin in p instead of the bundle's")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="per-image decoded pixel limit (decompression-bomb guard)")
    ap.add_argument("--require-signature", metavar="PUBKEY", default=None,
                    help="refuse a bundle whose manifest is not signed by this Ed25519 public key "
                         "(PEM; default: $CINEMAE_REQUIRE_SIGNATURE)")
    ap.add_argument("--formats", default=None, metavar="LIST",
                    help="comma-separated image formats to accept, checked from the header before "
                         "decoding (default: JPEG,PNG,WEBP,GIF,BMP,TIFF and AVIF/HEIF where a Pillow "
                         "plugin is installed)")
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
    add_reship_arguments(ap)
    ap.add_argument("--no-provenance", action="store_true",
                    help="do not read C2PA / XMP / EXIF / generator metadata")
    ap.add_argument("--no-provenance-policy", action="store_true",
                    help="report provenance but never let it change the verdict (default: signed AI "
                         "provenance or generator parameters make the verdict ai)")
    ap.add_argument("--c2pa-trust", metavar="PEM",
                    help="PEM file of trust anchors: C2PA signers under them are reported as trusted")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _plain_warnings(prog: str) -> None:
    """Warnings (e.g. the embedded model on large photos) as one plain stderr line each."""
    import warnings

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    _plain_warnings("cinemae-detect")
    # intermixed: options may sit between positionals (`cinemae-detect BUNDLE --device cpu DIR`)
    args = build_parser().parse_intermixed_args(argv)
    configure_logging("stderr")
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
                        provenance_policy=not args.no_provenance_policy, trust_anchors=trust,
                        formats=args.formats.split(",") if args.formats else None,
                        require_signature=args.require_signature, reship=args.reship,
                        reship_on=args.reship_on,
                        recheck=False if args.no_recheck else args.recheck_margin)
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
